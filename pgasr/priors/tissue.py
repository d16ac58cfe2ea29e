"""Embedded prior backend that needs no weights: tissue classes + connected components.

A stand-in for SAM when its weights are not available (the default of ``backend: auto``
without a checkpoint). It produces a *set of segments* the way SAM's automatic mask
generator does -- a whole object (the head), nested parts (brighter-than-threshold
regions) and the individual tissue regions -- and aggregates them with exactly the same
:func:`~pgasr.priors.base.sum_normalise` step. Per slice:

1. window to [0, 1] (same percentiles as SAM), Gaussian smoothing (``tissue_smooth_sigma``);
2. head: ``x > tissue_head_threshold``, holes filled; its connected components are segments;
3. ``tissue_classes`` multi-Otsu classes inside the head (thresholds ``t_1 < ... <
   t_{K-1}``); segments are the connected components of every class band
   ``t_{k-1} < x <= t_k`` and of every super-level set ``x > t_k``;
4. components smaller than ``tissue_min_area`` (fraction of the slice) are dropped.

The prior therefore counts, per pixel, in how many large coherent regions it lies: head
pixels score 1 + (number of thresholds exceeded) + 1, speckle and tiny regions score less.
On T2 MRI this grades CSF > grey matter > white matter > background, a coarse anatomical
map like the "anatomical prior" of the paper's Fig. 2.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_multiotsu

from pgasr.priors.base import Prior, window
from pgasr.priors.config import PriorConfig

_STRUCT = np.ones((3, 3), dtype=bool)  # 8-connectivity


def _components(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    """Connected components (8-connected) of ``mask`` with at least ``min_area`` pixels."""
    labels, n = ndimage.label(mask, structure=_STRUCT)
    if n == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    return [labels == i for i in range(1, n + 1) if areas[i] >= min_area]


class TissuePrior(Prior):
    """Tissue-class segments aggregated like SAM's masks (see module docstring).

    Args:
        cfg: uses ``window_low/high``, ``tissue_classes`` (>= 2), ``tissue_smooth_sigma``
            (pixels, >= 0), ``tissue_min_area`` (fraction of the slice in [0, 1)) and
            ``tissue_head_threshold`` (windowed intensity in [0, 1)).
        fallback_reason: why ``backend: auto`` chose this backend (None if requested).
    """

    name = "tissue"

    def __init__(self, cfg: PriorConfig | None = None, fallback_reason: str | None = None,
                 requested: str | None = None):
        super().__init__(fallback_reason, requested)
        cfg = cfg or PriorConfig()
        if int(cfg.tissue_classes) < 2:
            raise ValueError(f"prior.tissue_classes must be >= 2, got {cfg.tissue_classes}")
        if cfg.tissue_smooth_sigma < 0:
            raise ValueError(f"prior.tissue_smooth_sigma must be >= 0, got {cfg.tissue_smooth_sigma}")
        if not 0.0 <= cfg.tissue_min_area < 1.0:
            raise ValueError(f"prior.tissue_min_area must be in [0, 1), got {cfg.tissue_min_area}")
        if not 0.0 <= cfg.window_low < cfg.window_high <= 100.0:
            raise ValueError("prior.window_low/window_high must satisfy 0 <= low < high <= 100, "
                             f"got {cfg.window_low}, {cfg.window_high}")
        self.classes = int(cfg.tissue_classes)
        self.sigma = float(cfg.tissue_smooth_sigma)
        self.min_area = float(cfg.tissue_min_area)
        if not 0.0 <= cfg.tissue_head_threshold < 1.0:
            raise ValueError("prior.tissue_head_threshold must be in [0, 1), got "
                             f"{cfg.tissue_head_threshold}")
        self.head_threshold = float(cfg.tissue_head_threshold)
        self.window_low, self.window_high = float(cfg.window_low), float(cfg.window_high)

    def _thresholds(self, vals: np.ndarray) -> np.ndarray:
        """``classes - 1`` multi-Otsu thresholds of the head's grey levels; with no more
        distinct levels than classes, the midpoints between the levels (each is a class)."""
        levels = np.unique(vals)
        if len(levels) <= self.classes:
            return (levels[:-1] + levels[1:]) / 2
        return threshold_multiotsu(vals, classes=self.classes)

    def params(self) -> dict[str, Any]:
        return {"window": [self.window_low, self.window_high], "classes": self.classes,
                "smooth_sigma": self.sigma, "min_area": self.min_area,
                "head_threshold": self.head_threshold, "version": 1}

    def segments(self, slice_: np.ndarray) -> np.ndarray:
        """(H, W) slice -> (n, H, W) bool segments (head, class bands, super-level sets)."""
        h, w = slice_.shape
        x = window(slice_, self.window_low, self.window_high)
        if self.sigma > 0:
            x = ndimage.gaussian_filter(x, self.sigma, mode="nearest")
        min_area = max(1, math.ceil(self.min_area * h * w))
        empty = np.zeros((0, h, w), dtype=bool)
        if float(x.max() - x.min()) < 1e-6:
            return empty
        head = ndimage.binary_fill_holes(x > self.head_threshold)
        segs = _components(head, min_area)
        if not segs:
            return empty
        head = np.logical_or.reduce(segs)
        thr = self._thresholds(x[head])
        edges = [-np.inf, *thr.tolist(), np.inf]
        for lo, hi in zip(edges[:-1], edges[1:]):  # class bands
            segs += _components(head & (x > lo) & (x <= hi), min_area)
        for t in thr:  # nested super-level sets (SAM's whole / part / sub-part)
            segs += _components(head & (x > t), min_area)
        return np.stack(segs)
