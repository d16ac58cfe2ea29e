"""Backend registry: resolve ``prior.backend`` (``auto`` included) and build priors.

The SAM backend needs the ``segment-anything`` package (the ``sam`` extra:
``pip install -e ".[sam]"``); it is imported only when a config resolves to ``sam``, so
the tissue backend (and ``auto`` without SAM weights) runs without it.
"""

from __future__ import annotations

import logging

from pgasr.priors.base import Prior
from pgasr.priors.cache import CachedPrior
from pgasr.priors.config import SAM_CHECKPOINT_ENV, PriorConfig, resolve_checkpoint
from pgasr.priors.tissue import TissuePrior

log = logging.getLogger("pgasr.priors")

BACKENDS = ("sam", "tissue")


class MissingBackendError(ValueError):
    """A configured prior backend whose package is not installed."""


def prior_class(name: str) -> type[Prior]:
    """The :class:`Prior` class of backend ``name`` (``sam`` imported on first use)."""
    if name == "tissue":
        return TissuePrior
    if name == "sam":
        try:
            from pgasr.priors.sam import SamPrior
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("segment_anything"):
                raise
            raise MissingBackendError(
                "prior.backend resolves to 'sam' but the segment-anything package is not "
                "installed: pip install -e \".[sam]\" (or use prior.backend: tissue)") from None
        return SamPrior
    raise ValueError(f"prior.backend must be 'auto' or one of {list(BACKENDS)}, got {name!r}")


def __getattr__(name: str):
    if name == "PRIORS":  # {backend: class}; importing it imports segment_anything
        return {b: prior_class(b) for b in BACKENDS}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_backend(cfg: PriorConfig) -> tuple[str, str | None]:
    """``(backend name, fallback reason or None)`` for a config, without building anything.

    ``auto`` -> ``sam`` when ``prior.sam_checkpoint`` / ``$PGASR_SAM_CHECKPOINT`` is set,
    else ``tissue`` (reason given). A configured but broken checkpoint is an error at build
    time, never a silent fallback.
    """
    b = cfg.backend
    if b == "auto":
        if resolve_checkpoint(cfg):
            return "sam", None
        return "tissue", (f"backend 'auto' and no SAM checkpoint configured "
                          f"(prior.sam_checkpoint / {SAM_CHECKPOINT_ENV})")
    if b not in BACKENDS:
        raise ValueError(f"prior.backend must be 'auto' or one of {list(BACKENDS)}, got {b!r}")
    return b, None


def _announce(reason: str | None) -> None:
    if reason:
        log.warning("ANATOMICAL PRIOR FALLBACK: using the embedded 'tissue' backend, not SAM "
                    "-- %s. Models trained now need the tissue backend at inference; "
                    "see docs/priors.md to use SAM.", reason)


def build_prior(cfg: PriorConfig | None = None) -> Prior:
    """The prior backend a config asks for (uncached; see :func:`cached_prior`).

    Raises:
        ValueError / FileNotFoundError: unknown backend, SAM without (valid) weights.
    """
    cfg = cfg or PriorConfig()
    name, reason = resolve_backend(cfg)
    _announce(reason)
    return prior_class(name)(cfg, fallback_reason=reason, requested=cfg.backend)


def describe_prior(cfg: PriorConfig | None = None) -> dict:
    """``build_prior(cfg).describe()`` without loading SAM weights (the checkpoint is still
    verified); the fallback is announced the same way. For drivers and metadata."""
    cfg = cfg or PriorConfig()
    name, reason = resolve_backend(cfg)
    _announce(reason)
    cls = prior_class(name)
    if name == "sam":
        return cls.describe_config(cfg, fallback_reason=reason, requested=cfg.backend)
    return cls(cfg, fallback_reason=reason, requested=cfg.backend).describe()


def cached_prior(cfg: PriorConfig | None = None) -> CachedPrior:
    """:func:`build_prior` behind the on-disk cache at ``cfg.cache_dir`` (if ``cfg.cache``)."""
    cfg = cfg or PriorConfig()
    return CachedPrior(build_prior(cfg), cfg.cache_dir if cfg.cache else None)
