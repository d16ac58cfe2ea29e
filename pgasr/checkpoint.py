"""Self-describing checkpoint directories.

A checkpoint is a directory::

    model.pt        # {"stage": 1|2, "state_dicts": {name: state_dict}}
    config.yaml     # resolved RunConfig the weights were trained with
    meta.json       # format, stage, git sha, package versions, prior backend, perceptual loss,
                    # degradation, normalisation, data-manifest hash, scales, metrics, step
    train_state.pt  # optional: optimiser/scheduler/step/RNG state for resuming

Everything :class:`pgasr.inference.Predictor` needs is inside; nothing else is consulted.
Directories are written to a temporary sibling and renamed into place, so a crash mid-save
never leaves a half checkpoint under the final name.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pgasr.config import RunConfig, config_from_dict, config_to_dict
from pgasr.provenance import provenance

FORMAT = "pgasr-checkpoint/1"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"

__all__ = ["Checkpoint", "load_checkpoint", "save_checkpoint", "FORMAT"]


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
        path: final directory (replaced if it exists, only after the new one is complete).
        stage: 1 or 2.
        modules: named modules (DDP wrappers are unwrapped).
        cfg: the resolved run config.
        meta: extra metadata (prior backend description, perceptual kind, metrics, step...).
        train_state: optimiser/scheduler/step state for resuming (optional).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sd = {name: {k: v.detach().cpu() for k, v in _unwrap(m).state_dict().items()}
              for name, m in modules.items()}
        torch.save({"stage": stage, "state_dicts": sd}, tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        full_meta = {
            "format": FORMAT,
            "stage": stage,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "modules": sorted(modules),
            **provenance(),
            **(meta or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=1, default=str))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE_FILE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
    return path


def load_checkpoint(path: str | Path, with_train_state: bool = False) -> Checkpoint:
    """Load a checkpoint directory; clear errors for anything that is not one."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {p}")
    missing = [f for f in (MODEL_FILE, CONFIG_FILE, META_FILE) if not (p / f).is_file()]
    if missing:
        raise ValueError(f"{p} is not a PGASR checkpoint (missing {', '.join(missing)})")
    meta = json.loads((p / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p}: unsupported checkpoint format {meta.get('format')!r}")
    cfg = config_from_dict(yaml.safe_load((p / CONFIG_FILE).read_text()), str(p / CONFIG_FILE))
    blob = torch.load(p / MODEL_FILE, map_location="cpu", weights_only=True)
    ts = None
    if with_train_state and (p / TRAIN_STATE_FILE).is_file():
        ts = torch.load(p / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    return Checkpoint(p, int(blob["stage"]), blob["state_dicts"], cfg, meta, ts)
