"""LR synthesis (paper Sec. 3 "Dataset"): anisotropic Gaussian blur -> AWGN -> bicubic x2/x4.

The paper gives the recipe, not the numbers. Our choices (see ``docs/data.md``):

* **Blur**: a general anisotropic Gaussian kernel with sigmas drawn uniformly from
  ``DegradationConfig.blur_sigma`` (HR pixels, stated for x2 and multiplied by ``scale / 2``)
  and a uniform rotation in [0, pi). This is the BSRGAN/Real-ESRGAN family of kernels, scaled
  so that x4 is blurred as much, relative to its sampling step, as x2.
* **Noise**: additive white Gaussian noise whose sigma is drawn uniformly from
  ``DegradationConfig.noise_sigma`` as a fraction of the slice's robust intensity range
  (99.5th percentile - minimum), so the level does not depend on z-scoring.
* **Down-sampling**: bicubic with anti-aliasing (``torch.nn.functional.interpolate(...,
  mode="bicubic", antialias=True)``), the MATLAB ``imresize`` convention most SR work uses.

Everything is a pure function of its inputs and a ``numpy.random.Generator``; seeding per
(subject, slice, scale) with :func:`slice_rng` makes a rerun bit-identical.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from pgasr.config import SCALES, DegradationConfig

__all__ = [
    "anisotropic_gaussian_kernel",
    "bicubic_resize",
    "degrade",
    "sample_degradation",
    "slice_rng",
]


def slice_rng(seed: int, subject: str, slice_index: int, scale: int) -> np.random.Generator:
    """A generator seeded by (seed, subject, slice, scale), stable across runs and platforms."""
    key = f"{seed}|{subject}|{slice_index}|{scale}".encode()
    digest = hashlib.sha256(key).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def anisotropic_gaussian_kernel(
    sigma1: float, sigma2: float, theta: float, size: int
) -> np.ndarray:
    """Normalised 2-D Gaussian with principal sigmas ``sigma1, sigma2`` (pixels) rotated by
    ``theta`` (radians). Returns a (size, size) float64 array summing to 1; ``size`` is odd."""
    if size % 2 != 1 or size < 1:
        raise ValueError(f"kernel size must be a positive odd integer, got {size}")
    if sigma1 <= 0 or sigma2 <= 0:
        raise ValueError("kernel sigmas must be positive")
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([sigma1**2, sigma2**2]) @ rot.T
    inv = np.linalg.inv(cov)
    r = np.arange(size) - size // 2
    xx, yy = np.meshgrid(r, r, indexing="xy")
    pts = np.stack([xx, yy], axis=-1)  # (size, size, 2)
    k = np.exp(-0.5 * np.einsum("...i,ij,...j->...", pts, inv, pts))
    return k / k.sum()


def bicubic_resize(img: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a 2-D image (or stack (N, H, W)) to ``size`` = (H', W').

    Anti-aliased when shrinking, plain bicubic (``align_corners=False``) when enlarging —
    the same call the model uses to build ``lr_up``.
    """
    t = torch.as_tensor(np.asarray(img, dtype=np.float32))
    squeeze = t.ndim == 2
    if squeeze:
        t = t[None]
    shrink = size[0] < t.shape[-2] or size[1] < t.shape[-1]
    out = F.interpolate(
        t[:, None], size=size, mode="bicubic", align_corners=False, antialias=shrink
    )[:, 0]
    out = out.numpy()
    return out[0] if squeeze else out


def sample_degradation(
    scale: int, rng: np.random.Generator, cfg: DegradationConfig | None = None
) -> dict:
    """Draw the random parameters of one degradation (recorded in tests and metadata)."""
    cfg = cfg or DegradationConfig()
    lo, hi = cfg.blur_sigma
    f = scale / 2.0
    s1 = float(rng.uniform(lo * f, hi * f))
    s2 = float(rng.uniform(lo * f, hi * f))
    theta = float(rng.uniform(0.0, math.pi))
    noise = float(rng.uniform(*cfg.noise_sigma))
    size = min(cfg.blur_kernel_max, 2 * math.ceil(3 * max(s1, s2)) + 1)
    size += 1 - size % 2
    return {"sigma1": s1, "sigma2": s2, "theta": theta, "noise": noise, "kernel_size": size}


def degrade(
    hr: np.ndarray,
    scale: int,
    rng: np.random.Generator,
    cfg: DegradationConfig | None = None,
) -> np.ndarray:
    """Degrade one HR slice into its LR counterpart.

    Args:
        hr: (H, W) float slice (any units; z-scored in the pipeline). H and W must be
            divisible by ``scale``.
        scale: SR factor, 2 or 4.
        rng: source of randomness; the same generator state gives the same output.
        cfg: degradation ranges (defaults: :class:`DegradationConfig`).

    Returns:
        (H / scale, W / scale) float32 LR slice in the same units as ``hr``.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be 2 or 4, got {scale}")
    hr = np.asarray(hr, dtype=np.float32)
    if hr.ndim != 2:
        raise ValueError(f"degrade expects a 2-D slice, got shape {hr.shape}")
    h, w = hr.shape
    if h % scale or w % scale:
        raise ValueError(f"slice size {hr.shape} is not divisible by scale {scale}")
    if not np.isfinite(hr).all():
        raise ValueError("slice contains NaN or inf")
    p = sample_degradation(scale, rng, cfg)
    k = anisotropic_gaussian_kernel(p["sigma1"], p["sigma2"], p["theta"], p["kernel_size"])
    pad = p["kernel_size"] // 2
    x = torch.from_numpy(hr)[None, None].double()
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect" if pad < min(h, w) else "replicate")
    blurred = F.conv2d(x, torch.from_numpy(k)[None, None]).float()[0, 0].numpy()
    lo = float(hr.min())
    rng_range = float(np.percentile(hr, 99.5)) - lo
    sigma = p["noise"] * max(rng_range, 1e-6)
    noisy = blurred + rng.standard_normal(blurred.shape).astype(np.float32) * np.float32(sigma)
    return bicubic_resize(noisy, (h // scale, w // scale)).astype(np.float32)
