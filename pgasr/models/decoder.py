"""Decoder G (paper Eq. 2): four DAT stages, then nearest + conv upsampling to full size."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgasr.models.blocks import ResBlock, Upsample, ChannelNorm, check_latent_factor
from pgasr.models.dat import DATStage


class Decoder(nn.Module):
    """G: ``n_z`` latent codes -> 1-channel image.

    As in DAT's SR network, the four DAT stages run at the (low) latent resolution with a
    long residual ("conv after body"); ``log2(f)`` upsampling steps (nearest x2 + 3x3 conv, then
    a ResBlock) follow, halving the width each time (>= 16) to keep full-resolution cost low.

    Args:
        n_z: code dimension.
        channels: width of the DAT stages.
        latent_factor: f in {1, 2, 4, 8}.
        num_heads, window_size, dat_depth, mlp_ratio: DAT stage settings.
        num_stages: DAT stages (paper: 4).

    Attributes:
        last_layer: the final conv; taming's adaptive GAN weight uses its weight's gradient.

    Shapes: (B, n_z, h, w) -> (B, 1, h*f, w*f).
    """

    def __init__(
        self,
        n_z: int,
        channels: int,
        latent_factor: int = 2,
        num_heads: int = 4,
        window_size: int = 8,
        dat_depth: int = 2,
        mlp_ratio: float = 2.0,
        num_stages: int = 4,
    ):
        super().__init__()
        n_up = check_latent_factor(latent_factor)
        self.n_z = n_z
        self.conv_in = nn.Conv2d(n_z, channels, 3, padding=1)
        self.stages = nn.Sequential(
            *[
                DATStage(channels, channels, num_heads, window_size, dat_depth, mlp_ratio, i)
                for i in range(num_stages)
            ]
        )
        self.conv_after_body = nn.Conv2d(channels, channels, 3, padding=1)
        ups: list[nn.Module] = []
        c = channels
        for _ in range(n_up):
            c_next = max(c // 2, 16)
            ups += [Upsample(c, c_next), ResBlock(c_next, c_next)]
            c = c_next
        self.ups = nn.Sequential(*ups)
        self.norm_out = ChannelNorm(c)
        self.last_layer = nn.Conv2d(c, 1, 3, padding=1)

    @property
    def out_channels(self) -> int:
        """Width of the full-resolution features before ``last_layer``."""
        return self.last_layer.in_channels

    def forward(self, z_q: torch.Tensor, fuse=None) -> torch.Tensor:
        """``fuse``: optional callable on the full-resolution features (B, C', H, W) before the
        output conv (stage 2's fidelity fusion); None = Eq. 2 exactly."""
        if z_q.ndim != 4 or z_q.shape[1] != self.n_z:
            raise ValueError(f"decoder expects (B, {self.n_z}, h, w), got {tuple(z_q.shape)}")
        h = self.conv_in(z_q)  # (B, C, h, w)
        h = h + self.conv_after_body(self.stages(h))
        h = self.ups(h)  # (B, C', h*f, w*f)
        if fuse is not None:
            h = fuse(h)
        return self.last_layer(F.silu(self.norm_out(h)))  # (B, 1, h*f, w*f)
