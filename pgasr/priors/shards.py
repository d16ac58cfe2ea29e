"""Prior columns for batches of prepared triplet rows (pure; the Ray job is an adapter).

Columns follow :mod:`pgasr.data.schema`: ``prior_hr`` is the prior of each HR slice of the
triplet; ``prior_lr_x{s}`` the prior of each LR slice after :func:`upsample_bicubic` onto the
HR grid. All are (3, H, W) float16 in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pgasr.data import schema
from pgasr.priors.base import upsample_bicubic

PriorFn = Callable[[np.ndarray], np.ndarray]  # (B, H, W) float -> (B, H, W) float16


def _row_id(batch: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    rid: dict[str, Any] = {}
    if schema.SUBJECT in batch:
        rid["subject"] = str(batch[schema.SUBJECT][i])
    if schema.SLICE in batch:
        rid["slice"] = int(batch[schema.SLICE][i])
    return rid


def _priors_of_rows(hr: np.ndarray, lrs: Sequence[np.ndarray], prior: PriorFn) -> list[np.ndarray]:
    """One prior call over all HR and lr_up slices of the rows (lets the backend batch)."""
    n, t, H, W = hr.shape  # (n, 3, H, W)
    stacks = [hr.reshape(n * t, H, W)]
    for lr in lrs:  # (n, 3, h, w) -> lr_up (n*3, H, W)
        stacks.append(upsample_bicubic(lr.reshape(n * t, *lr.shape[-2:]), (H, W)))
    out = prior(np.concatenate(stacks))  # ((1 + len(lrs)) * n * 3, H, W) float16
    return [p.reshape(n, t, H, W) for p in np.split(out, len(stacks))]


def add_prior_columns(batch: Mapping[str, np.ndarray], prior: PriorFn, scales: Sequence[int],
                      ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Prior columns for a batch of triplet rows.

    Rows whose HR or LR triplets contain NaN/inf, or on which the prior fails, are dropped
    and reported; the rest keep all their input columns plus ``prior_hr`` and
    ``prior_lr_x{s}`` for every scale.

    Args:
        batch: column name -> array, as Ray Data / pyarrow give it (``hr``: (n, 3, H, W),
            ``lr_x{s}``: (n, 3, H/s, W/s), plus ``subject``/``slice``...).
        prior: a prior backend (or :class:`~pgasr.priors.cache.CachedPrior`).
        scales: SR factors whose LR columns get a prior.

    Returns:
        ``(columns, skipped)`` where ``skipped`` lists ``{"subject", "slice", "reason"}``.

    Raises:
        KeyError: ``hr`` or a configured ``lr_x{s}`` column is missing.
    """
    lr_cols = [schema.lr_column(s) for s in scales]
    for c in (schema.HR, *lr_cols):
        if c not in batch:
            raise KeyError(f"column {c!r} missing from the prepared shards (have {sorted(batch)}); "
                           "check data.scales against the prepare run")
    hr = np.asarray(batch[schema.HR], dtype=np.float32)
    lrs = [np.asarray(batch[c], dtype=np.float32) for c in lr_cols]
    n = hr.shape[0]
    skipped: list[dict[str, Any]] = []
    ok = np.ones(n, dtype=bool)
    for name, arr in ((schema.HR, hr), *zip(lr_cols, lrs)):
        bad = ~np.isfinite(arr.reshape(n, int(np.prod(arr.shape[1:])))).all(axis=1)
        for i in np.flatnonzero(bad & ok):
            skipped.append({**_row_id(batch, i), "reason": f"non-finite values in {name}"})
        ok &= ~bad
    idx = np.flatnonzero(ok)
    try:
        priors = _priors_of_rows(hr[idx], [lr[idx] for lr in lrs], prior) if len(idx) else None
    except ValueError:  # isolate the offending row(s) instead of losing the whole batch
        rows: dict[int, list[np.ndarray]] = {}
        for i in idx:
            try:
                rows[i] = _priors_of_rows(hr[i:i + 1], [lr[i:i + 1] for lr in lrs], prior)
            except ValueError as e:
                skipped.append({**_row_id(batch, i), "reason": f"prior failed: {e}"})
        idx = np.array(sorted(rows), dtype=np.int64)
        priors = ([np.concatenate([rows[i][k] for i in idx]) for k in range(1 + len(lrs))]
                  if len(idx) else None)
    out = {k: np.asarray(v)[idx] for k, v in batch.items()}
    H, W = hr.shape[-2:]
    names = [schema.prior_hr_column(), *(schema.prior_lr_column(s) for s in scales)]
    for j, name in enumerate(names):
        out[name] = priors[j] if priors is not None else np.zeros((0, 3, H, W), np.float16)
    return out, skipped


def tensor_array(a: np.ndarray) -> pa.ExtensionArray:
    """(n, *shape) array -> ``pa.FixedShapeTensorArray`` (n may be 0)."""
    a = np.ascontiguousarray(a)
    if len(a):
        return pa.FixedShapeTensorArray.from_numpy_ndarray(a)
    value_type = pa.from_numpy_dtype(a.dtype)
    typ = pa.fixed_shape_tensor(value_type, list(a.shape[1:]))
    storage = pa.FixedSizeListArray.from_arrays(pa.array([], type=value_type),
                                                int(np.prod(a.shape[1:])))
    return pa.ExtensionArray.from_storage(typ, storage)


def to_arrow(columns: Mapping[str, np.ndarray]) -> pa.Table:
    """Columns -> ``pa.Table`` with every (n, ...) array of rank > 1 as a canonical
    ``pa.FixedShapeTensorArray`` (readable by plain pyarrow and by Ray Data alike; Ray's own
    tensor extension, written when a UDF returns NumPy, is not readable without ``ray``)."""
    cols = {}
    for k, v in columns.items():
        a = np.asarray(v)
        if a.ndim > 1:
            cols[k] = tensor_array(a)
        elif a.dtype == object:  # strings (subject ids); typed so empty batches match
            vals = a.tolist()
            cols[k] = pa.array(vals, type=pa.string() if all(isinstance(x, str) for x in vals)
                               else None)
        else:
            cols[k] = pa.array(a)
    return pa.table(cols)
