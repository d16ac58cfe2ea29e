"""What every prior backend shares: the contract, windowing, and the paper's aggregation.

Paper Sec. 2.1: a segmenter produces segments ``{s_i}`` of a slice; they are "aggregated via
a summation operation ... followed by normalization to [0, 1]". Here that is
:func:`sum_normalise`: the per-pixel count of binary masks covering the pixel, divided by
its maximum over the slice (an all-zero sum stays zero). Both backends (SAM and the
embedded tissue segmenter) only differ in how they produce the masks.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("pgasr.priors")

PRIOR_DTYPE = np.float16


class PriorMismatchError(ValueError):
    """A model trained with one prior backend/parameter set is used with another."""


def normalise_sum(total: np.ndarray) -> np.ndarray:
    """Second half of :func:`sum_normalise`: a per-pixel segment count divided by its max.

    Args:
        total: (H, W) non-negative counts (sum of binary masks).

    Returns:
        (H, W) float32 in [0, 1]; all zeros when ``total`` is all zero.
    """
    total = np.asarray(total)
    peak = float(total.max()) if total.size else 0.0
    if peak <= 0:
        return np.zeros(total.shape, dtype=np.float32)
    return (total / np.float32(peak)).astype(np.float32)


def sum_normalise(masks: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Aggregate binary segments into the prior S (paper Sec. 2.1).

    Args:
        masks: (n, H, W) boolean (or 0/1) segment masks; n may be 0.
        shape: (H, W), needed only when ``n == 0`` and ``masks`` carries no spatial shape.

    Returns:
        (H, W) float32 in [0, 1]: ``sum_i s_i / max(sum_i s_i)``; all zeros when no pixel
        is covered by any segment.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (n, H, W), got shape {masks.shape}")
    if masks.shape[0] == 0:
        hw = masks.shape[1:] if shape is None else tuple(shape)
        return np.zeros(hw, dtype=np.float32)
    return normalise_sum(masks.astype(bool).sum(axis=0, dtype=np.int32))  # (H, W) counts


def window(slice_: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Percentile windowing of one slice to [0, 1].

    Intensities at or below the ``low`` percentile map to 0, at or above the ``high``
    percentile to 1, linearly in between. The slice's own percentiles are used, so z-scored,
    raw and bicubic-upsampled slices of one anatomy look alike. A constant slice maps to 0.

    Args:
        slice_: (H, W) finite floats.
        low: lower percentile in [0, 100).
        high: upper percentile in (low, 100].

    Returns:
        (H, W) float32 in [0, 1].
    """
    x = np.asarray(slice_, dtype=np.float32)
    lo, hi = np.percentile(x, [low, high])
    if not hi > lo:
        return np.zeros(x.shape, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def to_uint8_rgb(slice_: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Windowed slice as the HWC uint8 RGB image SAM expects (grey replicated 3x).

    Args:
        slice_: (H, W) finite floats.

    Returns:
        (H, W, 3) uint8, ``round(255 * window(slice_))`` in every channel.
    """
    g = np.rint(window(slice_, low, high) * 255.0).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def upsample_bicubic(lr: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray | torch.Tensor:
    """``lr_up``: bicubic up-sampling of LR slices onto the HR grid.

    ``F.interpolate(mode="bicubic", align_corners=False)``, the same operator the model's
    stage 2 and inference use before computing LR priors (values are not clamped: bicubic
    overshoot is kept, as in the model input).

    Args:
        lr: (..., h, w) array or tensor; leading dims are flattened and restored.
        size: target (H, W) in pixels.

    Returns:
        (..., H, W) float32, NumPy in -> NumPy out, tensor in -> tensor out.
    """
    is_np = not isinstance(lr, torch.Tensor)
    t = torch.tensor(np.asarray(lr, dtype=np.float32)) if is_np else lr.float()  # copy: may be read-only
    if t.ndim < 2:
        raise ValueError(f"lr must be (..., h, w), got shape {tuple(t.shape)}")
    lead, (h, w) = t.shape[:-2], t.shape[-2:]
    flat = t.reshape(-1, 1, h, w)  # (N, 1, h, w)
    up = F.interpolate(flat, size=tuple(int(s) for s in size), mode="bicubic", align_corners=False)
    up = up.reshape(*lead, *up.shape[-2:])
    return up.numpy() if is_np else up


def check_slices(slices: np.ndarray) -> np.ndarray:
    """Validate a prior input batch and return it as float32 (B, H, W).

    Raises:
        ValueError: wrong rank, non-float dtype, empty spatial size, or non-finite values
            (the message names the offending slice indices).
    """
    arr = np.asarray(slices)
    if arr.ndim != 3:
        raise ValueError(f"slices must be (B, H, W), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"slices must be floating point, got {arr.dtype}")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"slices have an empty spatial size {arr.shape[1:]}")
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr).reshape(len(arr), arr.shape[1] * arr.shape[2]).all(axis=1)
    if bad.any():
        raise ValueError(f"non-finite values (NaN/inf) in slice(s) {np.flatnonzero(bad).tolist()}")
    return arr


class Prior(ABC):
    """A prior backend: ``prior(slices) -> S``.

    Subclasses implement :meth:`segments` (binary masks of one windowed slice) or override
    :meth:`compute` for batched work; aggregation is always :func:`sum_normalise`.

    Attributes:
        name: backend name as used in the registry and in ``describe()["backend"]``.
    """

    name: str = "base"

    def __init__(self, fallback_reason: str | None = None, requested: str | None = None):
        self.fallback_reason = fallback_reason
        self.requested = requested or self.name

    def __call__(self, slices: np.ndarray) -> np.ndarray:
        """Priors of a batch of slices.

        Args:
            slices: (B, H, W) floating point, finite.

        Returns:
            (B, H, W) float16 in [0, 1]; deterministic for a given input and configuration.
        """
        arr = check_slices(slices)
        if arr.shape[0] == 0:
            return np.zeros(arr.shape, dtype=PRIOR_DTYPE)
        out = self.compute(arr)
        return np.asarray(out, dtype=np.float32).clip(0.0, 1.0).astype(PRIOR_DTYPE)

    def compute(self, slices: np.ndarray) -> np.ndarray:
        """(B, H, W) float32 -> (B, H, W) float32 priors; default: one slice at a time."""
        return np.stack([sum_normalise(self.segments(s), s.shape) for s in slices])

    @abstractmethod
    def segments(self, slice_: np.ndarray) -> np.ndarray:
        """(H, W) float32 slice -> (n, H, W) bool segment masks."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Parameters that change the output (they key the cache and the backend match)."""

    def runtime(self) -> dict[str, Any]:
        """Settings that do not change the prior (device, batch sizes); informational."""
        return {}

    def identity(self) -> dict[str, Any]:
        """``{"backend", "params"}``: what a trained model depends on."""
        return {"backend": self.name, "params": _jsonable(self.params())}

    def describe(self) -> dict[str, Any]:
        """Metadata for run/checkpoint meta and ``GET /v1/model``.

        Returns:
            ``{"backend", "params", "requested_backend", "fallback_reason", "runtime"}``;
            ``fallback_reason`` is None unless ``backend: auto`` fell back to ``tissue``.
        """
        return {
            **self.identity(),
            "requested_backend": self.requested,
            "fallback_reason": self.fallback_reason,
            "runtime": _jsonable(self.runtime()),
        }


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def check_backend_match(trained: dict, configured: dict) -> None:
    """Refuse to use a model with priors other than those it was trained on.

    A checkpoint trained with SAM priors must be served with SAM (same model type and
    checkpoint digest, same mask-generator parameters); one trained with the tissue backend
    must be served with the tissue backend and the same parameters. Runtime settings
    (device, batch sizes, ``fallback_reason``) may differ.

    Args:
        trained: ``prior.describe()`` (or ``identity()``) recorded at training time.
        configured: the same for the prior about to be used.

    Raises:
        PriorMismatchError: backends or parameters differ; the message lists the
            differences and how to fix the configuration.
    """
    if not trained:
        return
    tb, cb = trained.get("backend"), configured.get("backend")
    if tb != cb:
        hint = ("provide the SAM weights (prior.backend=sam, prior.sam_checkpoint=... or "
                "PGASR_SAM_CHECKPOINT)" if tb == "sam" else f"set prior.backend={tb}")
        raise PriorMismatchError(
            f"prior backend mismatch: the model was trained with {tb!r} priors but the "
            f"configured prior backend is {cb!r}"
            + (f" (fell back: {configured.get('fallback_reason')})"
               if configured.get("fallback_reason") else "")
            + f"; {hint}")
    tp, cp = trained.get("params") or {}, configured.get("params") or {}
    diffs = sorted(k for k in set(tp) | set(cp) if tp.get(k) != cp.get(k))
    if diffs:
        detail = ", ".join(f"{k}: trained={tp.get(k)!r} configured={cp.get(k)!r}" for k in diffs)
        raise PriorMismatchError(
            f"prior parameters differ from those the model was trained with ({tb}): {detail}; "
            "set the same prior.* values as at training time")
