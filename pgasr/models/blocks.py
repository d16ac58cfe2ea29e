"""Small convolutional building blocks shared by the encoder and decoder.

Normalisation in the generator (Ê, E, G) is :class:`ChannelNorm`: a LayerNorm over the
channels of each pixel. It has no batch statistics (data-parallel training runs one slice per
worker, where BatchNorm breaks) and, unlike GroupNorm, no *spatial* statistics either: a pixel's
output does not depend on how much background the rest of the image or crop holds. GroupNorm
(taming's choice) made training on crops and inference on whole slices disagree and removed the
absolute intensity level the decoder has to reproduce (EDSR's argument against normalisation
in SR networks); measured in docs/model.md ("Normalisation"). The discriminator keeps
GroupNorm (:func:`group_norm`): it only has to rank real vs fake.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Border handling of the generator's convolutions (``model.padding``, :func:`set_padding`).
PADDING_MODES = ("zeros", "replicate", "reflect")


def num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= ``max_groups`` that divides ``channels`` (GroupNorm needs one)."""
    return math.gcd(channels, max_groups)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels, eps=1e-6)


class ChannelNorm(nn.Module):
    """LayerNorm over C at every pixel of a (B, C, H, W) map (ConvNeXt's "channels_first" LN).

    Shapes: (B, C, H, W) -> (B, C, H, W). Invariant to crop size and to other pixels.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_channels = channels
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    """Pre-activation residual block (taming's ``ResnetBlock`` without the time embedding).

    Args:
        in_channels: C_in.
        out_channels: C_out (a 1x1 shortcut projects when it differs).

    Shapes: (B, C_in, H, W) -> (B, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = ChannelNorm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = ChannelNorm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric (0, 1, 0, 1) padding (``pad_mode``).

    Shapes: (B, C, H, W) -> (B, C, H/2, W/2); H and W must be even (the models pad inputs to a
    multiple of the latent factor first).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)
        self.pad_mode = "constant"  # F.pad mode; set_padding changes it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            raise ValueError(f"Downsample needs even H, W, got {tuple(x.shape[-2:])}")
        return self.conv(F.pad(x, (0, 1, 0, 1), mode=self.pad_mode))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv (no checkerboard artefacts).

    Shapes: (B, C_in, H, W) -> (B, C_out, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels or in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def set_padding(module: nn.Module, mode: str) -> nn.Module:
    """Set the border padding of every padded convolution in ``module`` (in place).

    ``zeros`` is PyTorch's default; ``replicate`` / ``reflect`` continue the image at its
    border, so a uniform background stays uniform up to the edge (zero padding puts a value
    there that the image does not have: a frame along the border of the output). Weights are
    unaffected, so a checkpoint loads under any mode. See docs/model.md ("Padding").
    """
    if mode not in PADDING_MODES:
        raise ValueError(f"model.padding must be one of {PADDING_MODES}, got {mode!r}")
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and any(p > 0 for p in m.padding):
            m.padding_mode = mode
        elif isinstance(m, Downsample):
            m.pad_mode = "constant" if mode == "zeros" else mode
    return module


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "replicate") -> torch.Tensor:
    """Pad the bottom/right of (B, C, H, W) so H and W are multiples of ``multiple``.

    Returns (B, C, ceil(H/m)*m, ceil(W/m)*m); crop back with ``y[..., :H, :W]``.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"  # reflect padding must be smaller than the input
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def check_latent_factor(f: int) -> int:
    """Validate ModelConfig.latent_factor and return the number of x2 resampling steps."""
    if f not in (1, 2, 4, 8):
        raise ValueError(f"model.latent_factor must be one of 1, 2, 4, 8, got {f}")
    return int(math.log2(f))
