"""Anatomical priors S (paper Sec. 2.1): segment a slice, sum the masks, normalise to [0, 1].

Backends (``PRIORS``): ``sam`` -- SAM's automatic mask generator (needs weights and the
``sam`` extra, the segment-anything package, imported only when used);
``tissue`` -- embedded multi-Otsu tissue classes + connected components (no weights).
``build_prior(cfg)`` resolves ``prior.backend: auto`` to SAM when a checkpoint is configured,
else to ``tissue`` with a WARNING; ``prior.describe()`` records which one ran and why, and
:func:`check_backend_match` refuses to serve a model with priors it was not trained on.

Stage 1 uses priors of HR slices; stage 2 and inference use priors of ``lr_up``
(:func:`upsample_bicubic` of the LR slice onto the HR grid).

Attributes other than :class:`PriorConfig` are imported lazily, so that ``pgasr.config``
(which imports ``pgasr.priors.config``) does not pull in torch and segment_anything.
"""

from __future__ import annotations

import importlib

from pgasr.priors.config import PriorConfig

_LAZY = {
    "PRIOR_DTYPE": "base", "Prior": "base", "PriorMismatchError": "base",
    "check_backend_match": "base", "sum_normalise": "base", "to_uint8_rgb": "base",
    "upsample_bicubic": "base", "window": "base",
    "CachedPrior": "cache", "PriorCache": "cache", "slice_key": "cache",
    "SAM_CHECKPOINT_ENV": "config", "SamPrior": "sam", "resolve_checkpoint": "config",
    "TissuePrior": "tissue",
    "PRIORS": "registry", "build_prior": "registry", "cached_prior": "registry",
    "describe_prior": "registry", "resolve_backend": "registry", "prior_class": "registry",
    "MissingBackendError": "registry",
}

__all__ = ["PriorConfig", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"pgasr.priors.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pgasr.priors' has no attribute {name!r}")
