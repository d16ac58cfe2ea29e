"""Backend registry: resolve ``prior.backend`` (``auto`` included) and build priors."""

from __future__ import annotations

import logging

from pgasr.priors.base import Prior
from pgasr.priors.cache import CachedPrior
from pgasr.priors.config import PriorConfig
from pgasr.priors.sam import SAM_CHECKPOINT_ENV, SamPrior, resolve_checkpoint
from pgasr.priors.tissue import TissuePrior

log = logging.getLogger("pgasr.priors")

PRIORS: dict[str, type[Prior]] = {"sam": SamPrior, "tissue": TissuePrior}


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
    if b not in PRIORS:
        raise ValueError(f"prior.backend must be 'auto' or one of {sorted(PRIORS)}, got {b!r}")
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
    return PRIORS[name](cfg, fallback_reason=reason, requested=cfg.backend)


def describe_prior(cfg: PriorConfig | None = None) -> dict:
    """``build_prior(cfg).describe()`` without loading SAM weights (the checkpoint is still
    verified); the fallback is announced the same way. For drivers and metadata."""
    cfg = cfg or PriorConfig()
    name, reason = resolve_backend(cfg)
    _announce(reason)
    if name == "sam":
        return SamPrior.describe_config(cfg, fallback_reason=reason, requested=cfg.backend)
    return PRIORS[name](cfg, fallback_reason=reason, requested=cfg.backend).describe()


def cached_prior(cfg: PriorConfig | None = None) -> CachedPrior:
    """:func:`build_prior` behind the on-disk cache at ``cfg.cache_dir`` (if ``cfg.cache``)."""
    cfg = cfg or PriorConfig()
    return CachedPrior(build_prior(cfg), cfg.cache_dir if cfg.cache else None)
