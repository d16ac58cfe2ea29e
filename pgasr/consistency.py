"""Data consistency at inference: iterative back-projection onto the LR input.

The network's output ``sr`` is corrected so that, down-sampled the way the LR was made
(bicubic with anti-aliasing, :func:`pgasr.data.degradation.bicubic_resize`), it agrees with
the LR slice it came from (Irani & Peleg's back-projection; the data-consistency step of MRI
reconstruction networks)::

    sr <- sr + weight * up(lr - down(sr))        (``steps`` times)

It restores what the codebook cannot express — intensities and contrasts outside the
training distribution, the exact intensity scale of the scan — at the LR's frequencies, and
leaves the network's detail above them. ``inference.back_projection_steps = 0`` turns it off.
Measured in docs/model.md ("Back-projection").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["back_project"]


def back_project(sr: torch.Tensor, lr: torch.Tensor, steps: int, weight: float) -> torch.Tensor:
    """Back-project ``sr`` onto ``lr``.

    Args:
        sr: (B, H, W) SR slices (model units).
        lr: (B, h, w) LR slices they were computed from (same units).
        steps: iterations (0 returns ``sr``).
        weight: step size in (0, 1].

    Returns:
        (B, H, W) corrected SR.
    """
    if steps <= 0:
        return sr
    H, W = sr.shape[-2:]
    h, w = lr.shape[-2:]
    lr = lr.to(sr)[:, None]
    x = sr[:, None]
    for _ in range(int(steps)):
        down = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        x = x + weight * F.interpolate(lr - down, size=(H, W), mode="bicubic", align_corners=False)
    return x[:, 0]
