"""Encoders Ê (stage 1) and E (stage 2): same architecture, trained separately."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgasr.models.blocks import Downsample, ResBlock, ChannelNorm, check_latent_factor
from pgasr.models.dat import DATStage


class Encoder(nn.Module):
    """4-level ResNet-transformer encoder (paper Sec. 2.1 and 3 "Implementation Detail").

    Levels 1-2 are ResNet blocks (local features), levels 3-4 DAT stages (spatial and channel
    attention). The ``log2(f)`` stride-2 downsamplings sit after the first levels, so the
    expensive DAT levels run at the lowest resolution.

    Args:
        in_channels: 2 (image + anatomical prior, ACG) or 1 (no ACG, Table 2 Exp. 0).
        channels: widths of the 4 levels.
        n_z: code dimension (output channels).
        latent_factor: f in {1, 2, 4, 8}.
        num_heads, window_size, dat_depth, mlp_ratio: DAT stage settings.

    Shapes: (B, in_channels, H, W) -> (B, n_z, H/f, W/f); H, W must be multiples of f.
    """

    def __init__(
        self,
        in_channels: int,
        channels: list[int] | tuple[int, ...],
        n_z: int,
        latent_factor: int = 2,
        num_heads: int = 4,
        window_size: int = 8,
        dat_depth: int = 2,
        mlp_ratio: float = 2.0,
    ):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"the encoder has 4 levels; model.channels has {len(channels)}")
        n_down = check_latent_factor(latent_factor)
        self.in_channels, self.latent_factor = in_channels, latent_factor
        c0, c1, c2, c3 = channels
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.levels = nn.ModuleList(
            [
                ResBlock(c0, c0),
                ResBlock(c0, c1),
                DATStage(c1, c2, num_heads, window_size, dat_depth, mlp_ratio, stage_index=0),
                DATStage(c2, c3, num_heads, window_size, dat_depth, mlp_ratio, stage_index=1),
            ]
        )
        widths = (c0, c1, c2)
        self.downs = nn.ModuleList(
            [Downsample(widths[i]) if i < n_down else nn.Identity() for i in range(3)]
        )
        self.norm_out = ChannelNorm(c3)
        self.conv_out = nn.Conv2d(c3, n_z, 1)

    def forward(self, x: torch.Tensor, return_skip: bool = False):
        """(B, in_channels, H, W) -> z (B, n_z, H/f, W/f); with ``return_skip`` also the
        full-resolution features after level 1, (B, channels[0], H, W) (fidelity fusion)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"encoder expects (B, {self.in_channels}, H, W) (image"
                f"{' + prior' if self.in_channels == 2 else ''}), got {tuple(x.shape)}"
            )
        f = self.latent_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"H, W must be multiples of latent_factor {f}, got {tuple(x.shape)}")
        h = self.conv_in(x)  # (B, c0, H, W)
        skip = None
        for i, level in enumerate(self.levels):
            h = level(h)
            if i == 0:
                skip = h  # (B, c0, H, W): before any downsampling
            if i < 3:
                h = self.downs[i](h)  # halves H, W for the first log2(f) levels
        z = self.conv_out(F.silu(self.norm_out(h)))  # (B, n_z, H/f, W/f)
        return (z, skip) if return_skip else z
