"""Fidelity fusion (beyond the paper): CodeFormer's controllable feature transformation.

Zhou et al., *Towards Robust Blind Face Restoration with Codebook Lookup Transformer*
(NeurIPS 2022), Eq. 6: the decoder's features F_d are modulated by the encoder's features F_e
of the degraded input,

    alpha, beta = P(cat(F_e, F_d));   F_d' = F_d + w * (alpha * F_d + beta),

so the output is no longer limited to what the frozen codebook and decoder can reconstruct.
Here it runs once, at full resolution (E's first level -> G's last features before its output
conv), and its last convolutions start at zero: with ``w > 0`` a fresh module leaves G's output
unchanged, so stage 2 starts exactly at the paper's model and learns only what helps.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pgasr.models.blocks import ResBlock


class FidelityFusion(nn.Module):
    """F_d' = F_d + w * (alpha * F_d + beta), (alpha, beta) from [F_e, F_d].

    Args:
        enc_channels: width of E's full-resolution features (``model.channels[0]``).
        dec_channels: width of G's full-resolution features.
        blocks: ResBlocks of the predictor P.
        weight: w (0 disables the module's effect; CodeFormer's fidelity knob).

    Shapes: f_d (B, dec_channels, H, W), f_e (B, enc_channels, H, W) -> (B, dec_channels, H, W).
    """

    def __init__(self, enc_channels: int, dec_channels: int, blocks: int = 2, weight: float = 1.0):
        super().__init__()
        if blocks < 0:
            raise ValueError(f"stage2.fidelity_blocks must be >= 0, got {blocks}")
        self.weight = weight
        self.conv_in = nn.Conv2d(enc_channels + dec_channels, dec_channels, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(dec_channels, dec_channels) for _ in range(blocks)])
        self.to_scale = nn.Conv2d(dec_channels, dec_channels, 3, padding=1)
        self.to_shift = nn.Conv2d(dec_channels, dec_channels, 3, padding=1)
        for conv in (self.to_scale, self.to_shift):  # start as the identity on F_d
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, f_d: torch.Tensor, f_e: torch.Tensor) -> torch.Tensor:
        if f_d.shape[-2:] != f_e.shape[-2:] or f_d.shape[0] != f_e.shape[0]:
            raise ValueError(f"fidelity fusion: decoder features {tuple(f_d.shape)} and encoder "
                             f"features {tuple(f_e.shape)} differ in batch or size")
        h = self.body(self.conv_in(torch.cat([f_e, f_d], 1)))
        return f_d + self.weight * (f_d * self.to_scale(h) + self.to_shift(h))
