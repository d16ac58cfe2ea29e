"""Self-describing checkpoint directories.

A checkpoint is a directory::

    model.safetensors  # weights: "<module>.<parameter>" -> tensor (safetensors, no pickle);
                       # its metadata holds the stage and the module names
    config.yaml     # resolved RunConfig the weights were trained with
    meta.json       # format, stage, git sha, package versions, prior backend, perceptual loss,
                    # degradation, normalisation, data-manifest hash, scales, metrics, step
    train_state.pt  # optional: optimiser/scheduler/step/RNG state for resuming

Everything :class:`pgasr.inference.Predictor` needs is inside; nothing else is consulted.
Directories are written to a uniquely named temporary sibling, fsync'ed and renamed into
place, so a crash mid-save never leaves a half checkpoint under the final name. Only an
absent or empty path, or a directory whose ``meta.json`` has a ``pgasr-checkpoint/`` format
(:data:`pgasr.provenance.CHECKPOINT_MARKER`), is ever replaced; anything else raises
:class:`pgasr.provenance.ForeignDirectoryError`.

``meta.json`` records the SHA-256 of every other file (``sha256``: {file: hex}); loading
verifies the files it reads against it (:class:`CheckpointIntegrityError` on a mismatch;
checkpoints written before hashes were recorded load with a warning). Weights are read with
``safetensors`` (no code runs on load); ``train_state.pt`` and the ``model.pt`` of checkpoints
written before format 2 with ``torch.load(weights_only=True)``: tensors and plain containers
only, never arbitrary pickled objects. Non-finite weights are never saved.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pgasr.config import RunConfig, config_from_dict, config_to_dict
from pgasr.provenance import (
    CHECKPOINT_MARKER, check_replaceable, provenance, replace_dir, sha256_file, temp_dir_for,
)

log = logging.getLogger(__name__)

FORMAT = "pgasr-checkpoint/2"  # 2: weights in model.safetensors
READABLE_FORMATS = ("pgasr-checkpoint/1", FORMAT)  # 1: weights in model.pt (torch.save)
MODEL_FILE = "model.safetensors"
LEGACY_MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"

HASHED_FILES = (MODEL_FILE, LEGACY_MODEL_FILE, CONFIG_FILE, TRAIN_STATE_FILE)

__all__ = ["Checkpoint", "CheckpointIntegrityError", "FORMAT", "NonFiniteWeightsError",
           "is_checkpoint", "load_checkpoint", "publish_checkpoint", "save_checkpoint",
           "stage_dirname"]


def stage_dirname(stage: int, scale: int = 2) -> str:
    """A run directory's name for a stage's exported checkpoint: ``stage1``; ``stage2`` for the
    x2 model and ``stage2_x{s}`` for any other scale, so one run holds a model per scale."""
    if stage == 1:
        return "stage1"
    return "stage2" if int(scale) == 2 else f"stage2_x{int(scale)}"


def weights_file(path: str | Path) -> Path:
    """The weights file of checkpoint directory ``path``: ``model.safetensors``, or the
    ``model.pt`` of a format-1 checkpoint."""
    p = Path(path)
    return p / MODEL_FILE if (p / MODEL_FILE).is_file() or not (p / LEGACY_MODEL_FILE).is_file() \
        else p / LEGACY_MODEL_FILE


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` looks like a checkpoint directory (weights + ``meta.json``)."""
    p = Path(path)
    return weights_file(p).is_file() and (p / META_FILE).is_file()


def _save_weights(stage: int, sd: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    """``{module: state_dict}`` as one safetensors file: keys ``<module>.<parameter>``; the
    stage and the module names (a module may have no tensors) in its metadata."""
    from safetensors.torch import save_file

    bad = [m for m in sd if "." in m]
    if bad:
        raise ValueError(f"module names must not contain '.': {bad}")
    flat = {f"{m}.{k}": v.contiguous().clone() for m, msd in sd.items() for k, v in msd.items()}
    save_file(flat, str(path), metadata={"format": FORMAT, "stage": str(stage),
                                         "modules": json.dumps(sorted(sd))})


def _load_weights(path: Path) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
    """(stage, {module: state_dict}) from :func:`_save_weights`' file (or a format-1
    ``model.pt``)."""
    if path.name == LEGACY_MODEL_FILE:
        blob = _load_pt(path)
        return int(blob["stage"]), blob["state_dicts"]
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd: dict[str, dict[str, torch.Tensor]] = {m: {} for m in json.loads(
                meta.get("modules", "[]"))}
            for key in f.keys():
                m, k = key.split(".", 1)
                sd.setdefault(m, {})[k] = f.get_tensor(key)
        return int(meta["stage"]), sd
    except (SafetensorError, KeyError, ValueError) as e:
        raise CheckpointIntegrityError(f"{path}: not a PGASR weights file ({e})") from None


class CheckpointIntegrityError(ValueError):
    """A checkpoint file differs from the hash recorded at save time, or holds more than
    tensors and plain containers."""


class NonFiniteWeightsError(ValueError):
    """A module to be saved has NaN or infinite weights."""


@dataclass
class Checkpoint:
    path: Path
    stage: int
    state_dicts: dict[str, dict]
    cfg: RunConfig
    meta: dict
    train_state: dict | None = field(default=None, repr=False)


def _unwrap(m: torch.nn.Module) -> torch.nn.Module:
    return getattr(m, "module", m)


def _state_dicts(modules: dict[str, torch.nn.Module]) -> dict[str, dict]:
    """CPU copies of each module's state dict; refuses NaN/inf floating-point entries."""
    out = {}
    for name, m in modules.items():
        sd = {k: v.detach().cpu() for k, v in _unwrap(m).state_dict().items()}
        bad = [k for k, v in sd.items()
               if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteWeightsError(
                f"refusing to save a checkpoint with non-finite weights in {name!r}: "
                f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} (training diverged; "
                "lower the learning rate or resume from an earlier checkpoint)")
        out[name] = sd
    return out


def save_checkpoint(
    path: str | Path,
    *,
    stage: int,
    modules: dict[str, torch.nn.Module],
    cfg: RunConfig,
    meta: dict[str, Any] | None = None,
    train_state: dict | None = None,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    Args:
        path: final directory: created, or replaced (only after the new one is complete) when
            it is empty or a PGASR checkpoint.
        stage: 1 or 2.
        modules: named modules (DDP wrappers are unwrapped).
        cfg: the resolved run config.
        meta: extra metadata (prior backend description, perceptual kind, metrics, step...).
        train_state: optimiser/scheduler/step state for resuming (optional): tensors and plain
            Python containers/scalars only, so it loads with ``weights_only=True``.

    Raises:
        ForeignDirectoryError: ``path`` holds something else (checked before writing).
        NonFiniteWeightsError: a module has NaN/inf weights (nothing is written).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    path = Path(path)
    check_replaceable(path, CHECKPOINT_MARKER)
    sd = _state_dicts(modules)
    tmp = temp_dir_for(path)
    try:
        _save_weights(stage, sd, tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE_FILE)
        full_meta = {
            "format": FORMAT,
            "stage": stage,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "modules": sorted(modules),
            **provenance(),
            **(meta or {}),
            "sha256": {f: sha256_file(tmp / f) for f in HASHED_FILES if (tmp / f).is_file()},
        }
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=1, default=str))
        replace_dir(tmp, path, CHECKPOINT_MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def publish_checkpoint(src: str | Path, dest: str | Path, *, keep_train_state: bool = True) -> Path:
    """Copy checkpoint ``src`` to ``dest`` atomically (temp sibling, verified, fsync'ed,
    renamed in); ``dest`` is replaced only when it is empty or a PGASR checkpoint.

    Args:
        src: a checkpoint directory (e.g. a Ray Train checkpoint's local copy).
        dest: where the copy goes.
        keep_train_state: False drops ``train_state.pt`` (optimiser state: not served).

    Raises:
        ForeignDirectoryError: ``dest`` holds something else (nothing is copied).
        CheckpointIntegrityError / ValueError: ``src`` is not a loadable checkpoint.
    """
    dest = Path(dest)
    check_replaceable(dest, CHECKPOINT_MARKER)
    tmp = temp_dir_for(dest)
    try:
        shutil.copytree(src, tmp / "ckpt")
        if not keep_train_state:
            (tmp / "ckpt" / TRAIN_STATE_FILE).unlink(missing_ok=True)
        ck = load_checkpoint(tmp / "ckpt")  # never publish one Predictor cannot read
        has_ts = (tmp / "ckpt" / TRAIN_STATE_FILE).is_file()
        if keep_train_state and has_ts and "sha256" in ck.meta:
            _verify(tmp / "ckpt", ck.meta, [TRAIN_STATE_FILE])
        replace_dir(tmp / "ckpt", dest, CHECKPOINT_MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _verify(p: Path, meta: dict, files: list[str]) -> None:
    """Check ``files`` of checkpoint ``p`` against the hashes recorded in ``meta``."""
    recorded = meta.get("sha256")
    if not isinstance(recorded, dict):
        log.warning("%s records no file hashes (written before PGASR recorded them): loading "
                    "it unverified", p)
        return
    for f in files:
        want = recorded.get(f)
        if want is None:
            raise CheckpointIntegrityError(f"{p / f}: no SHA-256 recorded in {META_FILE}")
        got = sha256_file(p / f)
        if got != want:
            raise CheckpointIntegrityError(
                f"{p / f}: SHA-256 {got[:12]}... does not match {want[:12]}... recorded in "
                f"{META_FILE}: the file changed after the checkpoint was written; refusing "
                "to load it")


def _load_pt(path: Path) -> Any:
    """``torch.load(weights_only=True)``, with a clear error for anything else pickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointIntegrityError(
            f"{path}: holds objects other than tensors and plain containers; refusing to "
            f"unpickle it ({str(e).splitlines()[0]})") from None


def load_checkpoint(path: str | Path, with_train_state: bool = False) -> Checkpoint:
    """Load a checkpoint directory, verifying the files it reads against the recorded
    SHA-256s; clear errors for anything that is not one.

    Raises:
        FileNotFoundError: no such directory.
        ValueError: not a PGASR checkpoint / unsupported format.
        CheckpointIntegrityError: a hash mismatch, or a file that is not weights-only.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {p}")
    weights = weights_file(p)
    missing = [f.name for f in (weights, p / CONFIG_FILE, p / META_FILE) if not f.is_file()]
    if missing:
        raise ValueError(f"{p} is not a PGASR checkpoint (missing {', '.join(missing)})")
    meta = json.loads((p / META_FILE).read_text())
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{p}: unsupported checkpoint format {meta.get('format')!r} (this "
                         f"version reads {', '.join(READABLE_FORMATS)})")
    want_ts = with_train_state and (p / TRAIN_STATE_FILE).is_file()
    _verify(p, meta, [weights.name, CONFIG_FILE] + ([TRAIN_STATE_FILE] if want_ts else []))
    cfg = config_from_dict(yaml.safe_load((p / CONFIG_FILE).read_text()), str(p / CONFIG_FILE))
    stage, state_dicts = _load_weights(weights)
    ts = _load_pt(p / TRAIN_STATE_FILE) if want_ts else None
    return Checkpoint(p, stage, state_dicts, cfg, meta, ts)
