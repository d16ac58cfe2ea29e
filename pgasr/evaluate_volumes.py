"""``pgasr evaluate --sr DIR --hr DIR``: score SR NIfTI volumes from any tool against HR ones.

* **Pairing**: every ``*.nii``/``*.nii.gz`` under each directory (recursively; hidden files
  skipped). By subject (default), a file's key is its BIDS ``sub-<label>`` entity (with
  ``ses-<label>`` when present), so ``sub-01_desc-sr2_T2w.nii.gz`` pairs with
  ``sub-01_T2w.nii.gz``; a name without one keys by its file name. By name, the key is always
  the file name without ``.nii``/``.nii.gz``. Files without a partner are reported, not fatal;
  two files with one key on the same side are an error (which one would be meant?).
* **Grid**: SR and HR must have the same shape; nothing is resampled. Affines that differ by
  more than 1e-3 give a warning: voxels are compared index by index.
* **Mask** (``auto``): HR voxels brighter than ``b + 0.1 * (p99 - b)`` of the whole volume
  (b = the ``pgasr.intensity`` background percentile), each axial slice dilated like
  :func:`pgasr.metrics.head_mask`. The threshold is taken over the volume, not per slice as
  ``head_mask`` does, so a slice of pure background noise stays background. Slices (third
  array axis) without a head voxel are skipped. ``none``: every voxel of every slice.
* **Metrics**: PSNR over the mask's voxels (one MSE per volume) and SSIM (skimage's flavour,
  :func:`pgasr.metrics.ssim`) averaged over window centres inside the mask, per slice, then
  over slices; both with data range = the HR volume's max - min, in the files' own units.
  Identical volumes give PSNR = inf, as :func:`pgasr.metrics.psnr` does.

Writes ``per_subject.csv`` and ``summary.json`` (atomically) to the output directory, which
must be absent, empty, or an earlier output of this command holding nothing else.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pgasr import __version__
from pgasr.data.ixi import read_nifti_file
from pgasr.data.sources import bids_entities, nifti_files, nifti_stem
from pgasr.volume import check_volume
from pgasr.intensity import BACKGROUND_PERCENTILE
from pgasr.metrics import head_mask, nanmean, psnr, ssim
from pgasr.provenance import ForeignDirectoryError, Marker, atomic_write_text

__all__ = [
    "FORMAT",
    "MASK_MODES",
    "OUTPUT_FILES",
    "PAIR_BY",
    "Pairing",
    "VolumePair",
    "VolumeScore",
    "check_output_dir",
    "evaluate_volumes",
    "find_volumes",
    "pair_key",
    "pair_volumes",
    "score_pair",
    "volume_mask",
]

FORMAT = "pgasr-evaluate-volumes/1"
MASK_MODES = ("auto", "none")
PAIR_BY = ("subject", "name")
OUTPUT_FILES = ("per_subject.csv", "summary.json")
AFFINE_TOL = 1e-3  # mm (and direction cosines x mm): below any scanner's reporting precision
HEAD_THRESHOLD = 0.1  # the intensity contract's head rule (pgasr.intensity)
SSIM_WINDOW = 7
_SLICE_BATCH = 16  # slices per SSIM call: bounds the float64 maps of a 512x512 slab
_MARKER = Marker("summary.json", "format", "volume evaluation directory",
                 prefix="pgasr-evaluate-volumes/")


# --------------------------------------------------------------------------- pairing


@dataclass(frozen=True)
class VolumePair:
    """An SR volume and the HR volume it is scored against."""

    subject: str
    sr: Path
    hr: Path


@dataclass
class Pairing:
    """Matched pairs (sorted by subject) and the files of each side left without a partner."""

    pairs: list[VolumePair]
    unmatched_sr: list[Path] = field(default_factory=list)
    unmatched_hr: list[Path] = field(default_factory=list)


def find_volumes(root: str | Path) -> list[Path]:
    """Every ``*.nii`` / ``*.nii.gz`` file under ``root`` (recursively), sorted; hidden files
    (``.name``, e.g. macOS ``._`` forks) are skipped.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory: {root}")
    return nifti_files(root)


def pair_key(path: str | Path, pair_by: str = "subject") -> str:
    """The key ``path`` is paired by: ``sub-01`` (or ``sub-01_ses-2``) for a BIDS name when
    ``pair_by == "subject"``, else the file name without ``.nii``/``.nii.gz``."""
    if pair_by not in PAIR_BY:
        raise ValueError(f"pair_by must be one of {PAIR_BY}, got {pair_by!r}")
    stem = nifti_stem(Path(path).name)
    ent = bids_entities(stem) if pair_by == "subject" else {}
    if "sub" in ent:
        return f"sub-{ent['sub']}" + (f"_ses-{ent['ses']}" if "ses" in ent else "")
    return stem


def _keyed(files: list[Path], pair_by: str, side: str) -> dict[str, Path]:
    by_key: dict[str, list[Path]] = {}
    for f in files:
        by_key.setdefault(pair_key(f, pair_by), []).append(f)
    dup = {k: v for k, v in by_key.items() if len(v) > 1}
    if dup:
        k, v = next(iter(sorted(dup.items())))
        hint = "" if pair_by == "name" else " (or --pair-by name)"
        raise ValueError(
            f"{len(v)} {side} files pair as {k!r}: {', '.join(str(p) for p in v)}; keep one "
            f"{side} file per {'name' if pair_by == 'name' else 'subject'}{hint}"
            + (f" ({len(dup) - 1} more such keys)" if len(dup) > 1 else ""))
    return {k: v[0] for k, v in by_key.items()}


def pair_volumes(sr_dir: str | Path, hr_dir: str | Path, pair_by: str = "subject") -> Pairing:
    """Match SR files to HR files by :func:`pair_key`.

    Raises:
        FileNotFoundError: a directory is missing.
        ValueError: two files on one side share a key, or no pair matches.
    """
    sr_files, hr_files = find_volumes(sr_dir), find_volumes(hr_dir)
    if not sr_files:
        raise ValueError(f"no .nii/.nii.gz files under --sr {sr_dir}")
    if not hr_files:
        raise ValueError(f"no .nii/.nii.gz files under --hr {hr_dir}")
    sr, hr = _keyed(sr_files, pair_by, "SR"), _keyed(hr_files, pair_by, "HR")
    pairs = [VolumePair(k, sr[k], hr[k]) for k in sorted(sr.keys() & hr.keys())]
    if not pairs:
        raise ValueError(
            f"no SR file under {sr_dir} pairs with an HR file under {hr_dir} by {pair_by} "
            f"(SR keys e.g. {sorted(sr)[:3]}, HR keys e.g. {sorted(hr)[:3]}); "
            + ("name files sub-<label>_... or use --pair-by name" if pair_by == "subject"
               else "give each SR file its HR file's name, or use --pair-by subject"))
    return Pairing(pairs, sorted(sr[k] for k in sr.keys() - hr.keys()),
                   sorted(hr[k] for k in hr.keys() - sr.keys()))


# --------------------------------------------------------------------------- scoring


@dataclass
class VolumeScore:
    """One pair's scores. ``psnr`` is inf for identical volumes; ``ssim`` None when no slice
    has a window centre inside the mask. ``n_voxels``: voxels PSNR is computed over."""

    subject: str
    sr_file: str
    hr_file: str
    psnr: float
    ssim: float | None
    n_voxels: int
    n_slices: int
    warnings: list[str] = field(default_factory=list)


def _read(path: Path, role: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(float32 (X, Y, Z) data, affine, voxel size in mm) of a NIfTI file."""
    img = read_nifti_file(path)
    arr = check_volume(img.dataobj, f"{role} {path}")
    zooms = tuple(round(float(z), 4) for z in img.header.get_zooms()[:3])
    return arr, np.asarray(img.affine, dtype=np.float64), zooms


def volume_mask(hr: np.ndarray, mode: str = "auto") -> np.ndarray:
    """Voxels scored for HR volume ``hr`` (X, Y, Z): see the module docstring.

    Returns:
        (X, Y, Z) bool array.

    Raises:
        ValueError: unknown mode, or (``auto``) no contrast above the background level.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask must be one of {MASK_MODES}, got {mode!r}")
    if mode == "none":
        return np.ones(hr.shape, dtype=bool)
    b, p99 = np.percentile(hr, [BACKGROUND_PERCENTILE, 99.0])
    if not p99 > b:
        raise ValueError("HR volume has no contrast above its background level; "
                         "use --mask none to score every voxel")
    fg = torch.from_numpy(np.moveaxis(hr > b + HEAD_THRESHOLD * (p99 - b), 2, 0).copy())
    # head_mask of a 0/1 slice is that slice dilated (empty stays empty): its dilation,
    # our volume-level threshold
    return np.moveaxis(head_mask(fg.float()).numpy(), 0, 2)


def score_pair(pair: VolumePair, mask: str = "auto") -> VolumeScore:
    """PSNR and SSIM of one SR volume against its HR volume.

    Raises:
        ValueError: unreadable files, shapes that differ, a constant HR volume, or a slice
            smaller than the SSIM window.
    """
    sr, sr_aff, sr_zooms = _read(pair.sr, "SR")
    hr, hr_aff, hr_zooms = _read(pair.hr, "HR")
    if sr.shape != hr.shape:
        raise ValueError(
            f"{pair.subject}: SR {pair.sr} has shape {sr.shape} (voxel {sr_zooms} mm) but HR "
            f"{pair.hr} has shape {hr.shape} (voxel {hr_zooms} mm); the shapes/voxel sizes "
            "differ and volumes are not resampled: bring the SR onto the HR grid first")
    if min(hr.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"{pair.subject}: slices of {hr.shape[:2]} voxels are smaller than "
                         f"the SSIM window ({SSIM_WINDOW})")
    warnings = []
    if not np.allclose(sr_aff, hr_aff, rtol=0, atol=AFFINE_TOL):
        warnings.append(f"{pair.subject}: SR and HR affines differ by up to "
                        f"{np.abs(sr_aff - hr_aff).max():.4g} mm; voxels are compared index "
                        "by index")
    dr = float(hr.max() - hr.min())
    if not dr > 0:
        raise ValueError(f"{pair.subject}: HR {pair.hr} is constant (empty image)")
    try:
        m = volume_mask(hr, mask)
    except ValueError as e:
        raise ValueError(f"{pair.subject}: HR {pair.hr}: {e}") from None
    keep = np.flatnonzero(m.any(axis=(0, 1)))  # slices with HR head voxels
    if mask == "auto":  # an intensity scale far off makes both numbers meaningless
        ratio = float(sr[m].mean() / hr[m].mean()) if hr[m].mean() != 0 else float("nan")
        if not 0.5 <= ratio <= 2.0:
            warnings.append(f"{pair.subject}: mean SR/HR intensity in the mask is {ratio:.3g}; "
                            "the files may be in different units (no rescaling is done)")
    p = float(psnr(sr[m][None], hr[m][None], dr)[0])  # one MSE over the masked voxels
    per_slice = []
    for i in range(0, len(keep), _SLICE_BATCH):
        k = keep[i : i + _SLICE_BATCH]
        s_sr = np.moveaxis(sr[:, :, k], 2, 0)  # (B, X, Y)
        s_hr = np.moveaxis(hr[:, :, k], 2, 0)
        s_m = None if mask == "none" else np.moveaxis(m[:, :, k], 2, 0)
        per_slice.append(ssim(s_sr, s_hr, dr, SSIM_WINDOW, mask=s_m))
    s = nanmean(torch.cat(per_slice)) if per_slice else None
    return VolumeScore(pair.subject, str(pair.sr), str(pair.hr), p, s, int(m.sum()),
                       int(len(keep)), warnings)


# --------------------------------------------------------------------------- outputs


def check_output_dir(out: str | Path) -> None:
    """Succeed when ``out`` may receive this command's outputs: it does not exist, is empty,
    or holds only ``per_subject.csv``/``summary.json`` with a ``summary.json`` this command
    wrote. Nothing else is ever overwritten or deleted.

    Raises:
        ForeignDirectoryError: anything else is at ``out``.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ForeignDirectoryError(f"--out {out} exists and is not a directory; choose "
                                    "another output path")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    foreign = [e for e in entries if e not in OUTPUT_FILES]
    if foreign or not _MARKER.present(out):
        what = (f"holds files this command did not write ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''})" if foreign
                else f"holds {', '.join(entries)} without a summary.json from `pgasr evaluate "
                     "--sr`")
        raise ForeignDirectoryError(
            f"--out {out} {what}; refusing to write there. Choose another output path, or "
            "empty that directory yourself")


def _stats(vals: list[float | None]) -> dict:
    """mean/std/n over the values that exist; mean and std are null when any is infinite
    (strict JSON has no inf), with ``n_infinite`` saying why."""
    v = np.array([x for x in vals if x is not None], dtype=np.float64)
    n_inf = int(np.isinf(v).sum())
    if not v.size or n_inf:
        return {"mean": None, "std": None, "n": int(v.size), "n_infinite": n_inf}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size), "n_infinite": 0}


def _cell(x: float | None) -> str:
    if x is None:
        return ""
    return "inf" if math.isinf(x) else f"{x:.6f}"


def _csv(scores: list[VolumeScore]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["subject", "sr_file", "hr_file", "psnr", "ssim", "n_voxels"])
    for s in scores:
        w.writerow([s.subject, s.sr_file, s.hr_file, _cell(s.psnr), _cell(s.ssim), s.n_voxels])
    return buf.getvalue()


def evaluate_volumes(
    sr_dir: str | Path,
    hr_dir: str | Path,
    out_dir: str | Path,
    mask: str = "auto",
    pair_by: str = "subject",
    progress: Callable[[int, int, VolumeScore], None] | None = None,
) -> dict:
    """Pair, score and write ``per_subject.csv`` + ``summary.json`` to ``out_dir``.

    Args:
        sr_dir, hr_dir: directories searched recursively for ``.nii``/``.nii.gz``.
        out_dir: output directory (see :func:`check_output_dir`).
        mask: ``auto`` (head mask of the HR) or ``none`` (every voxel).
        pair_by: ``subject`` or ``name`` (see :func:`pair_key`).
        progress: called as ``progress(done, total, score)`` after each pair.

    Returns:
        The summary written to ``summary.json``, plus ``per_subject``: the
        :class:`VolumeScore` list (not written to the JSON).

    Raises:
        ForeignDirectoryError: ``out_dir`` holds something else (checked first).
        FileNotFoundError, ValueError: see :func:`pair_volumes` and :func:`score_pair`.
    """
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {MASK_MODES}, got {mask!r}")
    check_output_dir(out_dir)
    pairing = pair_volumes(sr_dir, hr_dir, pair_by)
    scores = []
    for i, pair in enumerate(pairing.pairs):
        scores.append(score_pair(pair, mask))
        if progress is not None:
            progress(i + 1, len(pairing.pairs), scores[-1])
    summary = {
        "format": FORMAT,
        "pgasr_version": __version__,
        "sr_dir": str(sr_dir),
        "hr_dir": str(hr_dir),
        "mask": mask,
        "pair_by": pair_by,
        "conventions": "PSNR over the masked voxels of each volume (inf when identical); SSIM "
                       "(7x7 uniform window) over window centres in the mask, per axial slice "
                       "(third array axis, slices without HR head skipped), mean over slices; "
                       "data range = HR volume max - min, files' own units; mean +- std over "
                       "subjects",
        "n_pairs": len(scores),
        "psnr": _stats([s.psnr for s in scores]),
        "ssim": _stats([s.ssim for s in scores]),
        "unmatched": {"sr": [str(p) for p in pairing.unmatched_sr],
                      "hr": [str(p) for p in pairing.unmatched_hr]},
        "warnings": [w for s in scores for w in s.warnings],
    }
    out_dir = Path(out_dir)
    check_output_dir(out_dir)  # again: scoring can take a while
    atomic_write_text(out_dir / "per_subject.csv", _csv(scores))
    # last: its format key is what marks the directory as this command's
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1, allow_nan=False))
    return {**summary, "per_subject": scores}
