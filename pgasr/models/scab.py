"""SCAB: spatial cross-attention block (paper Sec. 2.2, Fig. 3), built on DAT's DSTB."""

from __future__ import annotations

import torch
import torch.nn as nn

from pgasr.models.dat import SGFN, WindowAttention


class SCAB(nn.Module):
    """Refine a slice's features with its neighbours' features.

    A DSTB whose window attention takes queries from slice t and keys/values from the context
    slices: ``x + CrossAttn(LN(x), LN(ctx))`` then ``x + SGFN(LN(x))``.

    Args:
        dim: feature channels (n_z).
        num_heads: attention heads.
        window_size: spatial window side.
        mlp_ratio: SGFN hidden width / dim.
        mode: "concat" (keys/values = tokens of both context maps) or "literal" (keys from
            context 0, values from context 1).

    Both residual branches end in zero-initialised projections: a fresh SCAB returns ``z``.

    Edge members of a triplet (t-1, t+1) have one neighbour only (t); callers pass it twice.
    In "concat" mode duplicating every key/value leaves softmax attention unchanged, so that is
    exactly attention over the one available neighbour.
    """

    def __init__(
        self, dim: int, num_heads: int, window_size: int = 8, mlp_ratio: float = 2.0,
        mode: str = "concat",
    ):
        super().__init__()
        if mode not in ("concat", "literal"):
            raise ValueError(f"model.scab_mode must be 'concat' or 'literal', got {mode!r}")
        self.mode = mode
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, shift=False, cross=mode)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = SGFN(dim, int(dim * mlp_ratio))
        # Zero-initialised residual outputs: a fresh SCAB is the identity, so a stage 2 whose
        # E starts as a copy of Ê starts exactly at Ê's codes (and its SR at stage 1's).
        for layer in (self.attn.proj, self.ffn.fc2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Args:
            z: (B, C, h, w) query features (slice t).
            context: (B, M, C, h, w) neighbour features (M = 2).

        Returns:
            (B, C, h, w) refined features.
        """
        if context.ndim != 5 or context.shape[0] != z.shape[0] or context.shape[2:] != z.shape[1:]:
            raise ValueError(
                f"SCAB context must be (B, M, C, h, w) matching z {tuple(z.shape)}, "
                f"got {tuple(context.shape)}"
            )
        x = z.permute(0, 2, 3, 1)  # (B, h, w, C)
        ctx = context.permute(0, 1, 3, 4, 2)  # (B, M, h, w, C)
        x = x + self.attn(self.norm_q(x), self.norm_kv(ctx))
        x = x + self.ffn(self.norm2(x))
        return x.permute(0, 3, 1, 2)  # (B, C, h, w)
