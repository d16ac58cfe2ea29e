"""Background handling at inference: the output keeps the input's background.

A radiologist reads texture in air as an artefact, and a global metric counts it as error.
:func:`head_weight` finds the head in the bicubic-upsampled LR slice (model units of
:mod:`pgasr.intensity`: background 0, head mean 1) and returns a soft weight that is 1 inside
the head and 0 in the background; :func:`keep_background` blends the network's output with
the bicubic input by that weight. Everything is computed from the input alone, so it is the
same for ``pgasr sr``, ``pgasr evaluate`` and Serve.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from pgasr.config import InferenceConfig

__all__ = ["head_weight", "keep_background"]


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def head_weight(lr_up: np.ndarray, cfg: InferenceConfig) -> np.ndarray:
    """Soft head mask of bicubic-upsampled LR slices.

    Args:
        lr_up: (B, H, W) slices in model units.
        cfg: thresholds (``inference.*``).

    Returns:
        (B, H, W) float32 weights in [0, 1]: 1 inside the head, exactly 0 beyond the head
        mask dilated by ``mask_dilate`` pixels, with a Gaussian edge inside that margin.
    """
    x = np.asarray(lr_up, dtype=np.float32)
    out = np.empty_like(x)
    for i, img in enumerate(x):
        smooth = ndimage.gaussian_filter(img, 1.0, mode="nearest")
        mask = smooth > cfg.background_threshold
        mask = ndimage.binary_opening(mask, structure=_disk(1))  # isolated noise pixels
        mask = ndimage.binary_fill_holes(mask)
        if cfg.mask_dilate > 0:
            mask = ndimage.binary_dilation(mask, structure=_disk(int(cfg.mask_dilate)))
        w = mask.astype(np.float32)
        if cfg.mask_feather > 0:  # feathered inwards: exactly 0 outside the dilated mask
            w = ndimage.gaussian_filter(w, cfg.mask_feather, mode="nearest") * mask
        out[i] = w
    return out


def keep_background(sr: torch.Tensor, lr_up: torch.Tensor, cfg: InferenceConfig) -> torch.Tensor:
    """``w * sr + (1 - w) * lr_up`` with ``w`` = :func:`head_weight` of ``lr_up``.

    Args:
        sr: (B, H, W) network output, model units.
        lr_up: (B, H, W) bicubic-upsampled centre LR slices, model units.
        cfg: ``inference`` config; ``background == "model"`` returns ``sr`` unchanged.
    """
    if cfg.background == "model":
        return sr
    w = torch.from_numpy(head_weight(lr_up.detach().cpu().numpy(), cfg)).to(sr)
    return w * sr + (1.0 - w) * lr_up.to(sr)
