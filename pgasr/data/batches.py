"""Prepared-shard rows -> model batches, and a small in-process reader of the shards.

The same two adapters (:func:`stage1_batch`, :func:`stage2_batch`) feed the plain loop, Ray
Train workers (from ``get_dataset_shard(...).iter_batches``) and evaluation, so every path
sees identical tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pgasr.data import schema

__all__ = ["read_split", "iter_batches", "stage1_batch", "stage2_batch", "split_files",
           "random_crop", "stage_columns", "to_lr_units"]


def random_crop(rows: Mapping[str, np.ndarray], crop: int, rng: np.random.Generator
                ) -> dict[str, np.ndarray]:
    """One random ``crop`` x ``crop`` window (HR pixels) of every image column of a batch.

    HR-grid columns (``hr``, priors) are cut at (y, x); LR columns (``lr_x{s}``) at
    (y/s, x/s) with size crop/s, so a crop keeps HR, LR and priors aligned. The window's
    corner is a multiple of every LR scale present. ``crop <= 0`` or a crop at least the
    slice size returns the rows unchanged; non-image columns pass through.

    Args:
        rows: ``{column: (B, 3, H, W) or (B, 3, H/s, W/s) ndarray, ...}``.
        crop: side in HR pixels; must be a multiple of every LR scale in ``rows``.
        rng: source of the window position (seed it per step for reproducible runs).
    """
    hr = np.asarray(rows[schema.HR])
    h, w = hr.shape[-2:]
    if crop <= 0 or (crop >= h and crop >= w):
        return dict(rows)
    scales = [int(k.rsplit("x", 1)[1]) for k in rows if k.startswith("lr_x")]
    step = int(np.lcm.reduce([1, *scales]))
    if crop % step:
        raise ValueError(f"crop {crop} must be a multiple of the LR scales {scales}")
    ch, cw = min(crop, h), min(crop, w)
    y = int(rng.integers(0, (h - ch) // step + 1)) * step
    x = int(rng.integers(0, (w - cw) // step + 1)) * step
    out = {}
    for k, v in rows.items():
        v = np.asarray(v)
        if k.startswith("lr_x"):
            s = int(k.rsplit("x", 1)[1])
            out[k] = v[..., y // s : (y + ch) // s, x // s : (x + cw) // s]
        elif v.ndim >= 3 and v.shape[-2:] == (h, w):
            out[k] = v[..., y : y + ch, x : x + cw]
        else:
            out[k] = v
    return out


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(x, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))


def _prior_or_zeros(rows: Mapping, name: str, like: np.ndarray, required: bool) -> np.ndarray:
    if name in rows:
        return np.asarray(rows[name], dtype=np.float32)
    if required:
        raise KeyError(
            f"column {name!r} missing from the shards: run the priors step "
            "(`python jobs/priors.py` or `pgasr priors`) first, or disable ACG (model.acg=false)"
        )
    return np.zeros_like(like, dtype=np.float32)


def stage1_batch(rows: Mapping[str, np.ndarray], need_prior: bool = True) -> dict[str, torch.Tensor]:
    """Stage 1 batch: centre HR slice and its prior, ``{"hr", "prior_hr"}`` each (B, 1, H, W)."""
    hr = np.asarray(rows[schema.HR])[:, 1:2]
    prior = _prior_or_zeros(rows, schema.prior_hr_column(), np.asarray(rows[schema.HR]), need_prior)
    return {"hr": _t(hr), "prior_hr": _t(prior[:, 1:2])}


def to_lr_units(rows: Mapping[str, np.ndarray], scale: int) -> dict[str, np.ndarray]:
    """``hr`` and ``lr_x{scale}`` mapped into the model units of the scale's LR volume.

    Each row carries ``lr_norm_x{scale}`` = (offset, scale) of its subject's LR volume in the
    stored (HR-volume) units; the result is ``(x - offset) / scale`` for both images, the
    same map ``pgasr sr`` derives from an LR volume (``pgasr.intensity``). Rows without the
    column (data prepared before the contract) are returned unchanged.
    """
    name = schema.lr_norm_column(scale)
    if name not in rows:
        return dict(rows)
    norm = np.asarray(rows[name], dtype=np.float32).reshape(-1, 2)
    out = dict(rows)
    for col in (schema.HR, schema.lr_column(scale)):
        if col in rows:
            x = np.asarray(rows[col], dtype=np.float32)
            shape = (-1,) + (1,) * (x.ndim - 1)
            out[col] = (x - norm[:, 0].reshape(shape)) / norm[:, 1].reshape(shape)
    return out


def stage2_batch(
    rows: Mapping[str, np.ndarray], scale: int, need_prior: bool = True
) -> dict[str, torch.Tensor]:
    """Stage 2 batch of triplets (channel 1 = centre slice t), in the LR volume's units.

    Returns ``{"hr": (B,3,H,W), "lr": (B,3,H/s,W/s), "prior_lr": (B,3,H,W), "prior_hr":
    (B,3,H,W)}``.
    """
    lr_name = schema.lr_column(scale)
    if lr_name not in rows:
        raise KeyError(f"column {lr_name!r} missing: data was prepared without scale {scale}")
    rows = to_lr_units(rows, scale)
    hr = np.asarray(rows[schema.HR])
    return {
        "hr": _t(hr),
        "lr": _t(np.asarray(rows[lr_name])),
        "prior_lr": _t(_prior_or_zeros(rows, schema.prior_lr_column(scale), hr, need_prior)),
        "prior_hr": _t(_prior_or_zeros(rows, schema.prior_hr_column(), hr, need_prior)),
    }


def stage_columns(stage: int, scale: int, acg: bool, shard: str | Path) -> list[str]:
    """The shard columns a stage trains on: HR (+ LR at ``scale``, and the LR volume's
    intensity statistics when ``shard`` has them) (+ priors with ACG)."""
    cols = [schema.HR, schema.prior_hr_column()] if stage == 1 else [
        schema.HR, schema.lr_column(scale), schema.prior_hr_column(), schema.prior_lr_column(scale)]
    if not acg:
        cols = [c for c in cols if not c.startswith("prior")]
    if stage == 2 and schema.lr_norm_column(scale) in pq.read_schema(shard).names:
        cols.append(schema.lr_norm_column(scale))
    return cols


def split_files(prepared_dir: str | Path, split: str) -> list[Path]:
    """Parquet files of one split, sorted; a clear error when the split is empty/missing."""
    if split not in schema.SPLITS:
        raise ValueError(f"split must be one of {schema.SPLITS}, got {split!r}")
    d = Path(prepared_dir) / split
    files = sorted(d.glob("*.parquet")) if d.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no Parquet shards for split {split!r} in {prepared_dir}")
    return files


def _to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks()
    if isinstance(arr.type, pa.FixedShapeTensorType):
        return arr.to_numpy_ndarray()
    return arr.to_numpy(zero_copy_only=False)


def read_split(
    prepared_dir: str | Path, split: str, columns: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Read a whole split into memory as ``{column: ndarray}`` (small cohorts, evaluation).

    Rows come sorted by (subject, slice) when both columns are read: the same arrays however
    the shards were laid out (one process or Ray Data's ``write_parquet``), so a seeded
    shuffle of them is reproducible."""
    tables = [pq.read_table(f, columns=columns) for f in split_files(prepared_dir, split)]
    table = pa.concat_tables(tables)
    if schema.SUBJECT in table.column_names and schema.SLICE in table.column_names:
        table = table.sort_by([(schema.SUBJECT, "ascending"), (schema.SLICE, "ascending")])
    return {name: _to_numpy(table.column(name)) for name in table.column_names}


def iter_batches(
    data: Mapping[str, np.ndarray], batch_size: int, shuffle: bool, seed: int = 0,
    drop_last: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Mini-batches of row dicts from in-memory columns (seeded shuffle per call)."""
    n = len(next(iter(data.values())))
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    stop = n - (n % batch_size) if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        yield {k: v[idx] for k, v in data.items()}
