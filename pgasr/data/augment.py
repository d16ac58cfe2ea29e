"""Training-volume augmentation: contrast and sharpness randomisation of whole HR volumes.

A model trained on one contrast and one sharpness learns that contrast's intensity statistics
and that sharpness's spectrum; on a scan with other tissue contrasts (T2*-weighted EPI, a b=0
image) or an HR that is itself smoother (a 2 mm acquisition resampled to the model's grid) it
barely beats bicubic. Domain randomisation (as in SynthSR / SynthSeg, Billot et al.) makes
the anatomy-to-intensity mapping and the HR sharpness random, so the network has to learn
super-resolution itself rather than the training contrast.

``pgasr prepare`` writes ``augment.copies`` extra copies of every *training* volume, each
transformed by :func:`augment_volume` with its own draw (validation and test volumes are never
augmented). A copy is an ordinary prepared subject named ``<subject>-aug<k>`` (manifest entry
``augmented_from``), degraded with its own degradation draws.

One draw, applied to the whole volume in its source units, so neighbouring slices keep one
contrast (the model's neighbour channels see one scan), in this order:

1. **Contrast remap** (probability ``remap_p``): a random piecewise-linear curve over the
   volume's robust range [min, 99.5th percentile of the head] with ``remap_knots`` equally
   spaced knots; the curve keeps the minimum (background stays background) and draws every
   other knot's value in U(0.05, 1) x range, so tissue contrasts change and can invert
   (CSF dark, WM bright as on T1). Values above the range keep their offset above the curve's
   last knot.
2. **Gamma** x^g on the range-normalised intensities, log g ~ U(-gamma, gamma).
3. **In-plane Gaussian blur** of the HR, sigma ~ U(blur) pixels (skipped under 0.1), for HR
   volumes that are smoother than the synthetic template's grid.
"""

from __future__ import annotations

import hashlib

import numpy as np
from scipy import ndimage

from pgasr.config import AugmentConfig

__all__ = ["augment_rng", "augment_volume", "copy_name"]


def copy_name(subject: str, k: int) -> str:
    """The prepared subject id of ``subject``'s k-th augmented copy (k >= 1)."""
    return f"{subject}-aug{k}"


def augment_rng(seed: int, subject: str, k: int) -> np.random.Generator:
    """A generator seeded by (seed, subject, copy), stable across runs and platforms."""
    digest = hashlib.sha256(f"augment|{seed}|{subject}|{k}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def augment_volume(vol: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> tuple[
        np.ndarray, dict]:
    """One random contrast/sharpness transform of an (X, Y, Z) HR volume.

    Returns the float32 volume (same shape, same minimum) and the drawn parameters.
    """
    v = np.asarray(vol, dtype=np.float32)
    if v.ndim != 3:
        raise ValueError(f"augment_volume expects an (X, Y, Z) volume, got shape {v.shape}")
    lo = float(v.min())
    head = v[v > lo + 0.1 * (float(np.percentile(v, 99)) - lo)]
    hi = float(np.percentile(head, 99.5)) if head.size else float(v.max())
    span = max(hi - lo, 1e-6)
    x = (v - lo) / span  # 0 = the volume's minimum, 1 = its robust maximum
    params: dict = {"remap": None, "gamma": 1.0, "blur_sigma": 0.0}
    if rng.random() < cfg.remap_p:
        ys = np.concatenate([[0.0], rng.uniform(0.05, 1.0, cfg.remap_knots - 1)])
        xs = np.linspace(0.0, 1.0, cfg.remap_knots)
        above = np.clip(x - 1.0, 0.0, None)  # keep the ordering above the range
        x = np.interp(x, xs, ys).astype(np.float32) + above
        params["remap"] = [round(float(y), 4) for y in ys]
    g = float(np.exp(rng.uniform(-cfg.gamma, cfg.gamma))) if cfg.gamma > 0 else 1.0
    x = np.power(np.clip(x, 0.0, None), g, dtype=np.float32)
    params["gamma"] = g
    s = float(rng.uniform(*cfg.blur))
    if s >= 0.1:
        x = ndimage.gaussian_filter(x, (s, s, 0.0), mode="nearest")
        params["blur_sigma"] = s
    return (x * span + lo).astype(np.float32), params
