"""``pgasr prepare``: IXI T2 volumes -> z-scored slice triplets + degraded LR, as Parquet shards.

Paper Sec. 3 "Dataset": axial 256x256 slices, the 80 central slices per subject, z-score
normalisation, LR by blur + noise + bicubic x2/x4. Subjects are split (seeded) into
train/val/test before anything is written, so no subject ever lands in two splits.

Memory stays bounded: one volume is in memory at a time and rows are flushed every
``data.rows_per_shard`` triplets. Output is written to a temporary directory and renamed into
place at the end, so an interrupted run never leaves a half-written prepared directory and
an existing one is only replaced after the new one is complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pgasr.config import RunConfig, config_to_dict, dump_config
from pgasr.data import schema
from pgasr.data.augment import augment_rng, augment_volume, copy_name
from pgasr.data.ixi import canonical, image_to_bytes, load_nifti_bytes, sha256_bytes
from pgasr.data.sources import bids_suffix_for, detect_format, iter_sources, list_sources
from pgasr.intensity import CONTRACT, intensity_stats
from pgasr.volume import (
    degrade_slices, inplane_voxel_size, resample_inplane, rescale_affine, volume_image,
)
from pgasr.provenance import (
    PREPARED_MARKER, atomic_write_text, check_replaceable, provenance, replace_dir, sha256_json,
    temp_dir_for,
)

log = logging.getLogger(__name__)

__all__ = ["IngestResult", "PrepareResult", "crop_affine", "crop_or_pad", "ingest_local",
           "ingest_volume", "prepare", "split_subjects", "unique_sources", "volume_to_slices",
           "LR_VOLUMES"]

#: Sub-directory of a prepared directory with the test subjects' HR and LR volumes
#: (``{subject}_hr.nii.gz``, ``{subject}_lr_x{s}.nii.gz``) on the grid the model sees.
LR_VOLUMES = "volumes"


@dataclass
class PrepareResult:
    out_dir: Path
    rows: dict[str, int] = field(default_factory=dict)
    subjects: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    reused: bool = False


# --------------------------------------------------------------------------- pure pieces


def _resolve_count(value: float, n: int, name: str) -> int:
    if value < 0:
        raise ValueError(f"data.{name} must be >= 0")
    if 0 < value < 1:
        return int(round(value * n))
    if float(value).is_integer():
        return int(value)
    raise ValueError(f"data.{name}={value}: use an integer count or a fraction in (0, 1)")


def split_subjects(
    subjects: list[str], train: float, val: float, test: float, seed: int
) -> dict[str, list[str]]:
    """Seeded subject-level split. Test is drawn first, then val, then train.

    Counts >= 1 are numbers of subjects; values in (0, 1) are fractions of the cohort.

    Raises:
        ValueError: the requested counts exceed the number of subjects.
    """
    uniq = sorted(set(subjects))
    n = len(uniq)
    n_test = _resolve_count(test, n, "test_subjects")
    n_val = _resolve_count(val, n, "val_subjects")
    n_train = _resolve_count(train, n, "train_subjects")
    if n_test + n_val + n_train > n:
        raise ValueError(
            f"split asks for {n_train} train + {n_val} val + {n_test} test subjects but the "
            f"input has {n}; lower the counts or use fractions (e.g. "
            f"--set data.train_subjects=0.6 data.test_subjects=0.3)"
        )
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [uniq[i] for i in order]
    return {
        "test": sorted(shuffled[:n_test]),
        "val": sorted(shuffled[n_test : n_test + n_val]),
        "train": sorted(shuffled[n_test + n_val : n_test + n_val + n_train]),
    }


def crop_or_pad(vol: np.ndarray, size: int, fill: float) -> np.ndarray:
    """Centre crop / pad the first two axes of ``vol`` (X, Y, Z) to ``size`` x ``size``."""
    out = vol
    for axis in (0, 1):
        n = out.shape[axis]
        if n > size:
            start = (n - size) // 2
            out = np.take(out, np.arange(start, start + size), axis=axis)
        elif n < size:
            before = (size - n) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, size - n - before)
            out = np.pad(out, pad, mode="constant", constant_values=fill)
    return out


def volume_to_slices(vol: np.ndarray, cfg: RunConfig) -> dict:
    """Crop/pad one canonical volume, compute its intensity statistics, pick central slices.

    Args:
        vol: (X, Y, Z) float32 volume in RAS+ orientation, source units.
        cfg: run config (``data.size``, ``data.slices_per_volume``, ``data.head_threshold``).

    Returns:
        dict with ``volume`` ((size, size, Z) float32 source units, the grid the model sees),
        ``stats`` (:class:`~pgasr.intensity.IntensityStats` of that HR volume), ``slices``
        ((n + 2, size, size) float32 in the HR volume's model units: the kept slices plus one
        neighbour each side, edge-replicated), ``volume_index`` (the (n + 2,) source slice
        indices), ``n`` kept slices, ``offset`` (first kept slice).
    """
    d = cfg.data
    if not np.isfinite(vol).all():
        raise ValueError("volume contains NaN or inf voxels")
    vol = crop_or_pad(np.asarray(vol, dtype=np.float32), d.size, fill=float(vol.min()))
    stats = intensity_stats(vol, d.head_threshold)
    z_total = vol.shape[2]
    n = min(d.slices_per_volume, z_total)
    offset = (z_total - n) // 2
    index = np.clip(np.arange(offset - 1, offset + n + 1), 0, z_total - 1)
    slices = stats.normalise(vol[:, :, index])  # (X, Y, n + 2)
    slices = np.ascontiguousarray(np.moveaxis(slices, 2, 0))  # (n + 2, X, Y)
    return {"volume": vol, "stats": stats, "slices": slices, "volume_index": index, "n": n,
            "offset": offset}


def crop_affine(affine: np.ndarray, source_shape: tuple[int, ...], size: int) -> np.ndarray:
    """Affine of :func:`crop_or_pad`'s output grid (the first voxel moves by the crop / pad)."""
    a = np.asarray(affine, dtype=np.float64).copy()
    shift = np.zeros(3)
    for axis in (0, 1):
        n = source_shape[axis]
        shift[axis] = (n - size) // 2 if n > size else -((size - n) // 2)
    a[:3, 3] = a[:3, 3] + a[:3, :3] @ shift
    return a


# --------------------------------------------------------------------------- writer


def _tensor_column(arr: np.ndarray) -> pa.Array:
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(arr))


def rows_table(rows: dict) -> pa.Table:
    """Triplet rows (``{column: values}``) as the Arrow table of a prepared shard: subject
    strings, int32 slice indices, every array column a fixed-shape tensor column."""
    return pa.table({
        k: (pa.array(v, pa.string()) if k == schema.SUBJECT
            else pa.array(np.asarray(v), pa.int32()) if k == schema.SLICE
            else _tensor_column(v))
        for k, v in rows.items()
    })


class _ShardWriter:
    """Buffers triplet rows of one split and flushes fixed-size Parquet files."""

    def __init__(self, out: Path, rows_per_shard: int):
        self.out = out
        self.rows_per_shard = rows_per_shard
        self.buf: dict[str, list] = {}
        self.n_buf = 0
        self.n_files = 0
        self.n_rows = 0
        out.mkdir(parents=True, exist_ok=True)

    def add(self, rows: dict[str, np.ndarray | list]) -> None:
        n = len(rows[schema.SUBJECT])
        for k, v in rows.items():
            self.buf.setdefault(k, []).append(v)
        self.n_buf += n
        while self.n_buf >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n: int) -> None:
        cols = {}
        rest = {}
        for k, parts in self.buf.items():
            if k == schema.SUBJECT:
                allv = [x for p in parts for x in p]
                cols[k], rest[k] = allv[:n], [allv[n:]]
            else:
                allv = np.concatenate(parts) if len(parts) > 1 else parts[0]
                cols[k], rest[k] = allv[:n], [allv[n:]]
        pq.write_table(rows_table(cols), self.out / f"part-{self.n_files:05d}.parquet")
        self.n_files += 1
        self.n_rows += n
        self.buf = rest
        self.n_buf -= n

    def close(self) -> None:
        if self.n_buf:
            self._flush(self.n_buf)


# --------------------------------------------------------------------------- driver


def _sources(cfg: RunConfig, source: Path, read: bool = True):
    d = cfg.data
    kw = {"fmt": d.source_format, "contrast": d.contrast, "bids_suffix": d.bids_suffix}
    return iter_sources(source, read=read, **kw) if read else list_sources(source, **kw)


def _list_subjects(cfg: RunConfig, source: Path) -> list[tuple[str, str, str]]:
    """(subject, volume, file name) of every volume in the source, names only."""
    return [(s.subject, s.volume, s.name) for s in _sources(cfg, source, read=False)]


def _fingerprint(cfg: RunConfig, source: Path, listing: list) -> str:
    listing = sorted(listing)
    # augmentation joins the fingerprint only when on: prepared dirs without it keep theirs
    augment = {"augment": config_to_dict(cfg.augment)} if cfg.augment.copies else {}
    return sha256_json({
        **augment,
        "data": {k: v for k, v in config_to_dict(cfg.data).items() if k != "prepared_dir"},
        "degradation": config_to_dict(cfg.degradation),
        "source": listing,
        "synth": config_to_dict(cfg.synth) if cfg.data.source == "synthetic" else None,
        "intensity": CONTRACT,
    })


def resolve_source(cfg: RunConfig, progress: bool = True) -> Path:
    """The directory/tar to ingest; for ``data.source: synthetic`` build the cohort first."""
    if cfg.data.source == "synthetic":
        from pgasr.data.synth import synthesize_cohort

        paths = synthesize_cohort(cfg.synth, cfg.synth.out_dir, progress=progress)
        return Path(paths[0]).parent if paths else Path(cfg.synth.out_dir)
    return Path(cfg.data.source)


def _target_voxel(cfg: RunConfig) -> float | None:
    """In-plane voxel size (mm) scans are resampled to; None = as they are (the synthetic
    cohort always: it is generated on the grid it is used on)."""
    return None if cfg.data.source == "synthetic" else cfg.data.voxel_size


def prepare(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
    ingest=None,
) -> PrepareResult:
    """Ingest the configured source into Parquet triplet shards (see ``pgasr.data.schema``).

    A prepared directory whose manifest fingerprint matches the config and the input listing
    is reused (returns ``reused=True``) unless ``force``.

    The output directory is replaced only when it is absent, empty, or a prepared directory
    (its ``manifest.json`` has a ``fingerprint``); ``force`` does not change that.

    ``ingest(cfg, source, split_of, tmp, progress, total) -> IngestResult`` turns the source's
    volumes into shards under ``tmp/{split}``; default :func:`ingest_local` (one process).
    ``jobs/prepare.py`` passes one that runs :func:`ingest_volume` as a Ray task per volume.

    Raises:
        FileNotFoundError / ValueError: missing source, bad split, or no readable volume.
        pgasr.provenance.ForeignDirectoryError: the output path holds other files (nothing is
            written or deleted).
    """
    source = resolve_source(cfg, progress)
    out = Path(out_dir or cfg.data.prepared_dir)
    if not source.exists() and not set("*?[") & set(str(source)):
        raise FileNotFoundError(f"data source not found: {source}")
    listing = _list_subjects(cfg, source)
    fp = _fingerprint(cfg, source, listing)
    manifest_path = out / schema.MANIFEST
    if manifest_path.is_file() and not force:
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("fingerprint") == fp:
            log.info("prepared data up to date in %s (fingerprint match); reusing", out)
            return PrepareResult(out, rows=old.get("rows", {}), subjects=old.get("split", {}),
                                 skipped=old.get("skipped", []), reused=True)

    if not listing:
        fmt = cfg.data.source_format if cfg.data.source_format != "auto" else detect_format(source)
        what = {"ixi": f"IXI {cfg.data.contrast} files (IXI<id>-<site>-<num>-{cfg.data.contrast}"
                       ".nii[.gz])",
                "bids": f"BIDS anat files with suffix "
                        f"'{bids_suffix_for(cfg.data.contrast, cfg.data.bids_suffix)}' "
                        "(sub-*/[ses-*/]anat/*.nii[.gz]; set data.bids_suffix / --contrast)",
                }.get(fmt, ".nii/.nii.gz files")
        raise ValueError(f"no {what} found in {source} (read as '{fmt}')")
    split = split_subjects([s for s, _, _ in listing], cfg.data.train_subjects,
                           cfg.data.val_subjects, cfg.data.test_subjects, cfg.data.split_seed)
    split_of = {s: name for name, subs in split.items() for s in subs}

    # Only an absent/empty dir or one this function wrote (manifest.json) is ever replaced;
    # each run writes into its own uniquely named temp dir, so concurrent runs never collide.
    check_replaceable(out, PREPARED_MARKER)
    tmp = temp_dir_for(out)
    target_mm = _target_voxel(cfg)
    try:
        res = (ingest or ingest_local)(cfg, source, split_of, tmp, progress, len(listing))
        subjects_meta, skipped = res.subjects, res.skipped
        if not subjects_meta:
            raise ValueError(f"no readable volume in {source} ({len(skipped)} skipped)")
        # rows are named by volume (a BIDS session adds _ses-X): list volumes per split
        final_split = {k: sorted(vol for vol, m in subjects_meta.items()
                                 if m["split"] == k and "augmented_from" not in m)
                       for k in split}
        manifest = {
            "fingerprint": fp,
            "source": str(source),
            "source_format": (cfg.data.source_format if cfg.data.source_format != "auto"
                              else detect_format(source)),
            "contrast": sorted({m["contrast"] for m in subjects_meta.values()}),
            "voxel_size": target_mm,
            "split": final_split,
            "rows": res.rows,
            "shards": res.shards,
            "subjects": subjects_meta,
            "skipped": skipped,
            "augmented": sorted(k for k, m in subjects_meta.items() if "augmented_from" in m),
            "scales": list(cfg.data.scales),
            "size": cfg.data.size,
            "slices_per_volume": cfg.data.slices_per_volume,
            "intensity": CONTRACT,
            "config": config_to_dict(cfg),
            **provenance(),
        }
        atomic_write_text(tmp / schema.MANIFEST, json.dumps(manifest, indent=1))
        dump_config(cfg, tmp / schema.CONFIG)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap into place only now: an existing prepared dir survives any failure above.
    try:
        replace_dir(tmp, out, PREPARED_MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename
    return PrepareResult(out, rows=manifest["rows"], subjects=final_split, skipped=skipped)

@dataclass
class IngestResult:
    """What an ingest wrote under the temporary prepared directory."""

    subjects: dict[str, dict]  # volume (and augmented copy) -> manifest entry
    skipped: list[dict]
    rows: dict[str, int]  # per split
    shards: dict[str, int]  # Parquet files per split


def unique_sources(cfg: RunConfig, sources, split_of: dict[str, str]):
    """``(source, split)`` of every volume to ingest, in order: volumes of unsplit subjects
    are left out; a second volume with an already-seen name is reported and skipped."""
    seen: set[str] = set()
    for src in sources:
        which = split_of.get(src.subject)
        if which is None:
            continue
        if src.volume in seen:
            warnings.warn(f"{src.name}: second volume named {src.volume}; ignored", stacklevel=2)
            yield src, None
            continue
        seen.add(src.volume)
        yield src, which


def ingest_volume(cfg: RunConfig, src, which: str, tmp: Path) -> tuple[list, dict | None]:
    """One volume (and its augmented copies for a training volume): read, reorient, resample,
    slice, degrade. Returns ``([(rows, manifest entry), ...], None)``, or ``([], skipped)``
    for an unreadable volume. Test volumes are exported to ``tmp / LR_VOLUMES``."""
    raw = src.read_bytes()
    try:
        img = load_nifti_bytes(raw, src.name)
        vol, affine = canonical(img)
        source_voxel = inplane_voxel_size(affine)
        target_mm = _target_voxel(cfg)
        if target_mm is not None:
            vol, affine = resample_inplane(vol, affine, target_mm)
        v = volume_to_slices(vol, cfg)
    except ValueError as e:
        log.warning("skipping %s: %s", src.name, e)
        return [], {"file": src.name, "subject": src.subject, "reason": str(e)}
    variants = [(src.volume, v, None)]
    if which == "train":
        for k in range(1, cfg.augment.copies + 1):
            aug, params = augment_volume(vol, augment_rng(cfg.augment.seed, src.volume, k),
                                         cfg.augment)
            variants.append((copy_name(src.volume, k), volume_to_slices(aug, cfg), params))
    out = []
    digest = sha256_bytes(raw)
    for name, v, params in variants:
        rows, meta = _subject_rows(cfg, name, v, affine, vol.shape, which, tmp)
        meta.update({"file": src.name, "sha256": digest, "subject": src.subject,
                     "contrast": src.contrast, "source_voxel_size": list(source_voxel)})
        if params is not None:
            meta.update({"augmented_from": src.subject, "augment": params})
        out.append((rows, meta))
    return out, None


def ingest_local(cfg: RunConfig, source: Path, split_of: dict[str, str], tmp: Path,
                 progress: bool, total: int) -> IngestResult:
    """Every volume in this process, one in memory at a time, into fixed-size shards."""
    writers = {name: _ShardWriter(tmp / name, cfg.data.rows_per_shard) for name in schema.SPLITS}
    subjects: dict[str, dict] = {}
    skipped: list[dict] = []
    bar = tqdm(unique_sources(cfg, _sources(cfg, source), split_of), total=total,
               desc="prepare", unit="vol", disable=not progress)
    for src, which in bar:
        bar.set_postfix_str(src.volume)
        if which is None:
            skipped.append({"file": src.name, "reason": "duplicate volume"})
            continue
        variants, skip = ingest_volume(cfg, src, which, tmp)
        if skip is not None:
            warnings.warn(f"skipping {src.name}: {skip['reason']}", stacklevel=2)
            skipped.append(skip)
        for rows, meta in variants:
            writers[which].add(rows)
            subjects[meta_name(rows)] = meta
    for w in writers.values():
        w.close()
    return IngestResult(subjects, skipped, {k: w.n_rows for k, w in writers.items()},
                        {k: w.n_files for k, w in writers.items()})


def meta_name(rows: dict) -> str:
    """The volume a block of rows belongs to."""
    return rows[schema.SUBJECT][0]


def _subject_rows(cfg: RunConfig, subject: str, v: dict, affine: np.ndarray,
                  source_shape: tuple[int, ...], which: str, tmp: Path) -> tuple[dict, dict]:
    """One prepared subject's triplet rows (all scales) and its manifest entry; a test
    subject's HR and LR volumes are exported to ``tmp / LR_VOLUMES``."""
    n = v["n"]
    hr_stats, idx = v["stats"], v["volume_index"]
    rows: dict = {
        schema.SUBJECT: [subject] * n,
        schema.SLICE: np.arange(n, dtype=np.int32),
        schema.HR: np.stack([v["slices"][i : i + 3] for i in range(n)]),
    }
    lr_norm: dict[str, dict] = {}
    grid_affine = crop_affine(affine, source_shape, cfg.data.size)
    export = which == "test"
    if export:
        _write_volume(tmp / LR_VOLUMES / f"{subject}_hr.nii.gz", v["volume"], grid_affine)
    for scale in cfg.data.scales:
        lr_vol = degrade_slices(v["volume"], scale, cfg.degradation, cfg.degradation.seed,
                                subject)
        lr_stats = intensity_stats(lr_vol, cfg.data.head_threshold)
        rel = lr_stats.relative_to(hr_stats)
        lr = np.moveaxis(hr_stats.normalise(lr_vol[:, :, idx]), 2, 0)  # (n + 2, h, w)
        rows[schema.lr_column(scale)] = np.stack([lr[i : i + 3] for i in range(n)])
        rows[schema.lr_norm_column(scale)] = np.tile(rel.as_array(), (n, 1))
        lr_norm[str(scale)] = lr_stats.to_dict()
        if export:
            _write_volume(tmp / LR_VOLUMES / f"{subject}_lr_x{scale}.nii.gz", lr_vol,
                          rescale_affine(grid_affine, scale))
    kept = v["slices"][1 : n + 1]
    meta = {
        "split": which, "hr_norm": hr_stats.to_dict(), "lr_norm": lr_norm,
        "n_slices": n, "slice_offset": v["offset"],
        "source_shape": list(source_shape), "affine": np.asarray(affine).tolist(),
        "grid_affine": grid_affine.tolist(),
        "voxel_size": [float(x) for x in np.linalg.norm(grid_affine[:3, :3], axis=0)],
        "hr_min": float(kept.min()), "hr_max": float(kept.max()),
    }
    return rows, meta



def _write_volume(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """A float32 NIfTI inside the (temporary, later renamed) prepared directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_to_bytes(volume_image(data, affine, None), gz=True))


def data_meta(prepared_dir: str | Path) -> dict:
    """What a checkpoint records about its training grid and units: the HR voxel size (mm)
    of the prepared volumes and the intensity contract (:mod:`pgasr.intensity`)."""
    p = Path(prepared_dir) / schema.MANIFEST
    if not p.is_file():
        return {}
    man = json.loads(p.read_text())
    sizes = [s["voxel_size"] for s in man.get("subjects", {}).values() if "voxel_size" in s]
    out = {"intensity": man.get("intensity")}
    if man.get("contrast"):
        out["contrast"] = man["contrast"]
    if sizes:
        out["voxel_size"] = [float(x) for x in np.median(np.asarray(sizes), axis=0)]
    return out


def load_manifest(prepared_dir: str | Path) -> dict:
    """Read a prepared directory's manifest with a clear error when it is missing."""
    p = Path(prepared_dir) / schema.MANIFEST
    if not p.is_file():
        raise FileNotFoundError(
            f"{prepared_dir} is not a prepared data directory (no {schema.MANIFEST}); "
            "run `pgasr prepare` first"
        )
    return json.loads(p.read_text())
