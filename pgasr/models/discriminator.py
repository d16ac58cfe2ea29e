"""Discriminator D: taming's PatchGAN ``NLayerDiscriminator`` with GroupNorm."""

from __future__ import annotations

import torch
import torch.nn as nn

from pgasr.models.blocks import group_norm


class Discriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming), BatchNorm replaced by GroupNorm.

    Args:
        in_channels: image channels (1: D judges the image alone, not the prior).
        channels: width of the first layer (ndf).
        n_layers: stride-2 layers after the first.

    Shapes: (B, 1, H, W) -> (B, 1, H', W') patch logits, H' ~ H / 2**n_layers - 2.
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                group_norm(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # taming's weights_init: N(0, 0.02) convs, N(1, 0.02) norm scales
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
