"""Dual Aggregation Transformer blocks (Chen et al., ICCV 2023), adapted for PGASR.

Follows ``basicsr/archs/dat_arch.py`` of zhengchen1999/DAT:

* **DSTB** (spatial): window self-attention with a dynamic relative position bias, plus a
  depth-wise conv branch on V; the two are fused by the Adaptive Interaction Module (AIM:
  channel map from the conv branch gates the attention, spatial map from the attention gates
  the conv branch). Windows shift by half a window in every other spatial block.
* **DCTB** (channel): XCiT-style channel self-attention (L2-normalised q, k over tokens, a
  learned temperature per head) with the same AIM fusion, roles of the maps swapped.
* **SGFN**: spatial-gate feed-forward network (half the hidden channels gate the other half
  through a depth-wise conv).

Differences from the reference, on purpose:

* BatchNorm inside AIM is replaced by a per-pixel LayerNorm over channels
  (:class:`~pgasr.models.blocks.ChannelNorm`): data-parallel training here runs one slice per
  worker, and a norm with spatial statistics (GroupNorm) made crops and whole slices disagree.
* Windows are square (``window_size`` x ``window_size``), so DAT's two rectangular-window
  branches collapse into one multi-head attention over all channels (the reference notes that
  "for square windows, window-0 and window-1 can be merged").
* Inputs of any size are padded to a multiple of the window; padded *keys* are masked out of
  the softmax (the reference lets zero-padded keys take part), and the output is cropped back.
* :class:`WindowAttention` also has a cross-attention mode (queries from one map, keys/values
  from ``M`` context maps at the same window positions), which SCAB (``scab.py``) builds on.

All modules here work on channels-last token maps ``(B, H, W, C)`` except :class:`DATStage`,
which takes and returns ``(B, C, H, W)`` like the conv blocks around it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from pgasr.models.blocks import ChannelNorm

NEG_INF = -1e4  # additive mask value; finite so fully masked rows cannot produce NaN (bf16-safe)


def _cl_to_cf(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def _cf_to_cl(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)


class DynamicPosBias(nn.Module):
    """DAT/CrossFormer dynamic relative position bias: an MLP from (dy, dx) to one bias per head.

    Shapes: (R, 2) relative offsets -> (R, heads).
    """

    def __init__(self, pos_dim: int, num_heads: int):
        super().__init__()
        self.pos_proj = nn.Linear(2, pos_dim)
        self.pos1 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, pos_dim))
        self.pos2 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, pos_dim))
        self.pos3 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, num_heads))

    def forward(self, biases: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(biases))))


def _relative_tables(ws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative offsets ((2ws-1)^2, 2) and the (N, N) index into them, N = ws*ws."""
    r = torch.arange(1 - ws, ws, dtype=torch.float32)
    biases = torch.stack(torch.meshgrid(r, r, indexing="ij")).flatten(1).t().contiguous()
    c = torch.arange(ws)
    coords = torch.stack(torch.meshgrid(c, c, indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (N, N, 2)
    index = rel[..., 0] * (2 * ws - 1) + rel[..., 1]
    return biases, index


def _aim_norm(channels: int) -> nn.Module:
    """BatchNorm in the reference; see module docstring. Bottlenecks narrower than 4 channels
    (tiny test models) get no norm: normalising 1-3 values per sample is degenerate."""
    return ChannelNorm(channels) if channels >= 4 else nn.Identity()


class _AIM(nn.Module):
    """Adaptive Interaction Module pieces shared by spatial and channel attention."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim), _aim_norm(dim), nn.GELU()
        )
        c8, c16 = max(dim // 8, 1), max(dim // 16, 1)
        self.channel_interaction = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, c8, 1),
            _aim_norm(c8),
            nn.GELU(),
            nn.Conv2d(c8, dim, 1),
        )
        self.spatial_interaction = nn.Sequential(
            nn.Conv2d(dim, c16, 1), _aim_norm(c16), nn.GELU(), nn.Conv2d(c16, 1, 1)
        )


class WindowAttention(nn.Module):
    """DAT spatial-window attention (self or cross) with AIM fusion.

    Args:
        dim: channels C (divisible by ``num_heads``).
        num_heads: attention heads.
        window_size: side of the square window.
        shift: shift windows by ``window_size // 2`` (Swin/DAT alternation).
        cross: ``None`` for self-attention; ``"concat"`` for cross-attention whose keys/values
            are the tokens of all ``M`` context maps in the same window; ``"literal"`` for keys
            from context 0 and values from context 1 (needs ``M == 2``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 8,
        shift: bool = False,
        cross: str | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if cross not in (None, "concat", "literal"):
            raise ValueError(f"cross must be None, 'concat' or 'literal', got {cross!r}")
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        self.shift_size = window_size // 2 if shift else 0
        self.cross = cross
        if cross is None:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        self.pos = DynamicPosBias(max(dim // 8, 8), num_heads)
        biases, index = _relative_tables(window_size)
        # Deterministic from window_size: not saved in checkpoints.
        self.register_buffer("rpe_biases", biases, persistent=False)
        self.register_buffer("relative_position_index", index, persistent=False)
        self.aim = _AIM(dim)
        self.proj = nn.Linear(dim, dim)
        self._mask_cache: dict[tuple, torch.Tensor | None] = {}

    # ------------------------------------------------------------------ masks
    def _mask(self, h: int, w: int, m: int, device: torch.device) -> torch.Tensor | None:
        """Additive mask (nW, N, m*N) for padding and shifted-window regions, or None."""
        key = (h, w, m, str(device))
        if key in self._mask_cache:
            return self._mask_cache[key]
        ws, s = self.window_size, self.shift_size
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        valid = torch.zeros(hp, wp)
        valid[:h, :w] = 1
        region = torch.zeros(hp, wp)
        if s:
            cnt = 0
            spans = (slice(0, -ws), slice(-ws, -s), slice(-s, None))
            for hs in spans:
                for wsl in spans:
                    region[hs, wsl] = cnt
                    cnt += 1
            valid = torch.roll(valid, (-s, -s), (0, 1))  # same roll as the features
        to_win = "(nh wh) (nw ww) -> (nh nw) (wh ww)"
        region_w = rearrange(region, to_win, wh=ws, ww=ws)  # (nW, N)
        valid_w = rearrange(valid, to_win, wh=ws, ww=ws)  # (nW, N)
        mask = torch.zeros(region_w.shape[0], ws * ws, ws * ws)
        mask.masked_fill_(region_w[:, :, None] != region_w[:, None, :], NEG_INF)
        mask.masked_fill_(valid_w[:, None, :] == 0, NEG_INF)
        out = mask.repeat(1, 1, m).to(device) if bool((mask != 0).any()) else None
        if len(self._mask_cache) > 16:
            self._mask_cache.clear()
        self._mask_cache[key] = out
        return out

    def _bias(self, m: int) -> torch.Tensor:
        """Dynamic relative position bias (heads, N, m*N), tiled over the m key windows."""
        n = self.window_size**2
        pos = self.pos(self.rpe_biases)  # ((2ws-1)^2, heads)
        bias = pos[self.relative_position_index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)
        return bias.repeat(1, 1, m)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Windowed multi-head attention with the dynamic position bias (no AIM, no proj).

        Args:
            q: (B, H, W, C) queries; k, v: (B, M, H, W, C) keys/values of M maps.

        Returns:
            (B, H, W, C): each query attends to the keys of its (shifted) window in all M maps.
        """
        h, w = q.shape[1:3]
        ws, s = self.window_size, self.shift_size
        m = k.shape[1]
        ph, pw = (-h) % ws, (-w) % ws
        if ph or pw:
            q = F.pad(q, (0, 0, 0, pw, 0, ph))  # (B, Hp, Wp, C)
            k = F.pad(k, (0, 0, 0, pw, 0, ph))  # (B, M, Hp, Wp, C)
            v = F.pad(v, (0, 0, 0, pw, 0, ph))
        if s:
            q = torch.roll(q, (-s, -s), dims=(1, 2))
            k = torch.roll(k, (-s, -s), dims=(2, 3))
            v = torch.roll(v, (-s, -s), dims=(2, 3))
        hp, wp = h + ph, w + pw
        heads = self.num_heads
        # Windows and heads share one axis: SDPA gets 4-D (B, nW*heads, tokens, d) tensors,
        # which PyTorch's fused CPU kernel takes (5-D ones fall back to the unfused math path:
        # ~2x slower forward + backward, benchmarks/step_efficiency.py).
        q = rearrange(q, "b (nh wh) (nw ww) (n d) -> b (nh nw n) (wh ww) d", wh=ws, ww=ws, n=heads)
        k, v = (
            rearrange(t, "b m (nh wh) (nw ww) (n d) -> b (nh nw n) (m wh ww) d", wh=ws, ww=ws, n=heads)
            for t in (k, v)
        )  # (B, nW*heads, M*N, d)

        attn_mask = self._bias(m)  # (heads, N, M*N)
        mask = self._mask(h, w, m, q.device)
        n_win = (hp // ws) * (wp // ws)
        if mask is not None:
            attn_mask = attn_mask + mask[:, None]  # (nW, heads, N, M*N)
        else:
            attn_mask = attn_mask.expand(n_win, *attn_mask.shape)
        attn_mask = attn_mask.reshape(1, n_win * heads, *attn_mask.shape[-2:]).to(q.dtype)
        if q.device.type == "cpu":
            # A learned bias as the mask sends CPU SDPA to its unfused math path, whose "safe"
            # softmax scans every score row for all-masked rows (aten::all + aten::where, ~8 %
            # of a demo stage-1 step). No row here is all-masked (every query sees its own
            # window's keys), so the plain softmax computes the same thing.
            scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1)) + attn_mask
            out = torch.matmul(scores.softmax(dim=-1), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = rearrange(
            out, "b (nh nw n) (wh ww) d -> b (nh wh) (nw ww) (n d)", nh=hp // ws, wh=ws, ww=ws,
            n=heads,
        )  # (B, Hp, Wp, C)
        if s:
            out = torch.roll(out, (s, s), dims=(1, 2))
        return out[:, :h, :w]  # (B, H, W, C)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within windows.

        Args:
            x: (B, H, W, C) queries (and keys/values in self mode).
            context: (B, M, H, W, C) key/value maps in cross mode; must be None in self mode.

        Returns:
            (B, H, W, C).
        """
        if self.cross is None:
            if context is not None:
                raise ValueError("self-attention got a context; build with cross='concat'")
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, H, W, C)
            k, v = k[:, None], v[:, None]  # (B, 1, H, W, C)
        else:
            if context is None or context.ndim != 5 or context.shape[2:] != x.shape[1:]:
                got = None if context is None else tuple(context.shape)
                raise ValueError(f"cross-attention needs context (B, M, H, W, C), got {got}")
            q = self.q(x)
            k, v = self.kv(context).chunk(2, dim=-1)  # 2 x (B, M, H, W, C)
            if self.cross == "literal":
                if context.shape[1] != 2:
                    raise ValueError("literal SCAB mode needs exactly two context maps")
                k, v = k[:, :1], v[:, 1:]  # keys from context 0, values from context 1
        v_img = v.mean(1)  # (B, H, W, C): input of the conv branch
        out = self.attend(q, k, v)  # (B, H, W, C)

        # AIM: conv branch on V; C-map (from conv) gates attention, S-map (from attention)
        # gates the conv branch.
        conv_x = self.aim.dwconv(_cl_to_cf(v_img))  # (B, C, H, W)
        channel_map = self.aim.channel_interaction(conv_x)  # (B, C, 1, 1)
        spatial_map = self.aim.spatial_interaction(_cl_to_cf(out))  # (B, 1, H, W)
        out = out * torch.sigmoid(_cf_to_cl(channel_map))
        conv_x = _cf_to_cl(conv_x * torch.sigmoid(spatial_map))
        return self.proj(out + conv_x)


class ChannelAttention(nn.Module):
    """DAT channel self-attention (XCiT cross-covariance attention) with AIM fusion.

    Shapes: (B, H, W, C) -> (B, H, W, C). Attention maps are (B, heads, C/heads, C/heads),
    independent of H, W, so no padding is needed.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.aim = _AIM(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        q, k, v = rearrange(
            self.qkv(x), "b h w (three n d) -> three b n d (h w)", three=3, n=self.num_heads
        )  # each (B, heads, d, H*W)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)  # (B, n, d, d)
        out = rearrange(attn @ v, "b n d (h w) -> b h w (n d)", h=h)  # (B, H, W, C)
        v_img = rearrange(v, "b n d (h w) -> b (n d) h w", h=h)  # (B, C, H, W)

        conv_x = self.aim.dwconv(v_img)  # (B, C, H, W)
        channel_map = self.aim.channel_interaction(_cl_to_cf(out))  # (B, C, 1, 1)
        spatial_map = self.aim.spatial_interaction(conv_x)  # (B, 1, H, W)
        out = out * torch.sigmoid(_cf_to_cl(spatial_map))
        conv_x = _cf_to_cl(conv_x * torch.sigmoid(channel_map))
        return self.proj(out + conv_x)


class SGFN(nn.Module):
    """Spatial-gate feed-forward network. Shapes: (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden += hidden % 2  # split in two halves
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden // 2)
        self.dwconv = nn.Conv2d(hidden // 2, hidden // 2, 3, padding=1, groups=hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = F.gelu(self.fc1(x)).chunk(2, dim=-1)  # 2 x (B, H, W, hidden/2)
        x2 = _cf_to_cl(self.dwconv(_cl_to_cf(self.norm(x2))))
        return self.fc2(x1 * x2)


class DATBlock(nn.Module):
    """One DAT transformer block: ``x + attn(LN(x))`` then ``x + SGFN(LN(x))``.

    Args:
        dim: channels C.
        num_heads: attention heads.
        kind: "spatial" (DSTB) or "channel" (DCTB).
        window_size: spatial window side (spatial blocks only).
        shift: shifted windows (spatial blocks only).
        mlp_ratio: SGFN hidden width / C.

    Shapes: (B, H, W, C) -> (B, H, W, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kind: str,
        window_size: int = 8,
        shift: bool = False,
        mlp_ratio: float = 2.0,
    ):
        super().__init__()
        self.kind = kind
        self.norm1 = nn.LayerNorm(dim)
        if kind == "spatial":
            self.attn: nn.Module = WindowAttention(dim, num_heads, window_size, shift)
        elif kind == "channel":
            self.attn = ChannelAttention(dim, num_heads)
        else:
            raise ValueError(f"kind must be 'spatial' or 'channel', got {kind!r}")
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = SGFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class DATStage(nn.Module):
    """A "DAT block" in the paper's sense: DAT's residual group.

    ``depth`` transformer blocks alternating spatial / channel attention, a 3x3 conv and a
    residual connection. Shifted windows follow DAT's pattern: every other spatial block, with
    the phase flipping between consecutive stages (``stage_index``).

    Args:
        in_channels: C_in (a 3x3 conv projects to ``dim`` when it differs).
        dim: channels C inside the stage.
        num_heads: attention heads.
        window_size: spatial window side.
        depth: number of transformer blocks (2 = one spatial + one channel).
        mlp_ratio: SGFN hidden width / C.
        stage_index: position of the stage in its network (sets the shift phase).

    Shapes: (B, C_in, H, W) -> (B, C, H, W), any H, W.
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        num_heads: int,
        window_size: int = 8,
        depth: int = 2,
        mlp_ratio: float = 2.0,
        stage_index: int = 0,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError("DAT depth must be >= 1")
        self.proj_in = nn.Conv2d(in_channels, dim, 3, padding=1) if in_channels != dim else nn.Identity()
        self.norm_in = nn.LayerNorm(dim)
        blocks = []
        for i in range(depth):
            kind = "spatial" if i % 2 == 0 else "channel"
            shift = kind == "spatial" and (i // 2 + stage_index) % 2 == 1
            blocks.append(DATBlock(dim, num_heads, kind, window_size, shift, mlp_ratio))
        self.blocks = nn.ModuleList(blocks)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)  # (B, C, H, W)
        t = self.norm_in(_cf_to_cl(x))  # (B, H, W, C)
        for blk in self.blocks:
            t = blk(t)
        return x + self.conv(_cl_to_cf(t))
