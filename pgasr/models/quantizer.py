"""Vector quantizer: the codebook Z (paper Eq. 1 and the codebook terms of Eq. 3)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

log = logging.getLogger(__name__)


@dataclass
class QuantizerOutput:
    """What :meth:`Quantizer.forward` returns.

    Attributes:
        z_q: (B, n_z, h, w) quantized features with the straight-through estimator applied
            (forward value = the selected codes, gradient = identity into ``z``).
        indices: (B, h, w) int64 code index k of every latent position (Eq. 1).
        distances: (B, N, h, w) float32 squared L2 distance ||z_ij - z_k||^2 to every code;
            L_align turns these into code probabilities.
        codebook_loss: ||sg[E(x)] - z_q||^2 (mean over elements); trains Z.
        commit_loss: ||sg[z_q] - E(x)||^2 (mean over elements); trains E, weighted by beta.
        perplexity: exp(entropy) of this batch's code histogram (1 = collapse, N = uniform).
    """

    z_q: torch.Tensor
    indices: torch.Tensor
    distances: torch.Tensor
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor
    perplexity: torch.Tensor


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


class Quantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient.

    Args:
        codebook_size: N (paper: 256).
        n_z: code dimension.
        init: "uniform" (taming: U(-1/N, 1/N)) or "data" (the first training batch's encoder
            outputs, sampled without replacement, plus small noise; avoids the early collapse
            onto a handful of codes that a tiny uniform init causes).
        dead_code_restart: re-initialise codes unused for ``dead_after`` training steps to
            random encoder outputs of the current batch (off by default, as in the paper).
        dead_after: steps without use before a code counts as dead.

    Code usage is tracked in training mode in the buffer ``steps_since_used`` (N,). Under
    ``torch.distributed`` the data init and restarts are broadcast from rank 0 and usage is
    all-reduced when restarts are on, so every rank keeps the same codebook.
    """

    def __init__(
        self,
        codebook_size: int = 256,
        n_z: int = 64,
        init: str = "data",
        dead_code_restart: bool = False,
        dead_after: int = 200,
    ):
        super().__init__()
        if init not in ("data", "uniform"):
            raise ValueError(f"codebook init must be 'data' or 'uniform', got {init!r}")
        self.codebook_size, self.n_z = codebook_size, n_z
        self.codebook = nn.Embedding(codebook_size, n_z)
        self.codebook.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.dead_code_restart, self.dead_after = dead_code_restart, dead_after
        self.register_buffer("initted", torch.tensor(init == "uniform"))
        self.register_buffer("steps_since_used", torch.zeros(codebook_size, dtype=torch.long))

    # ------------------------------------------------------------------ lookup
    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances to every code, in float32 (also under autocast).

        Args:
            z: (B, n_z, h, w) encoder features.

        Returns:
            (B, N, h, w) float32.
        """
        if z.ndim != 4 or z.shape[1] != self.n_z:
            raise ValueError(f"expected (B, {self.n_z}, h, w) features, got {tuple(z.shape)}")
        b, c, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float().reshape(b, c, h * w)  # (B, n_z, hw)
            e = self.codebook.weight.float()  # (N, n_z)
            # ||e||^2 - 2 e.z in one batched GEMM, written directly in (B, N, hw) order (the
            # code axis second, as every consumer reduces over it: no transposed copies)
            d = torch.baddbmm(e.pow(2).sum(-1)[None, :, None], e.expand(b, -1, -1), zf,
                              alpha=-2.0)
            d = d + zf.pow(2).sum(1, keepdim=True)  # + ||z||^2
            return d.clamp_min(0).view(b, -1, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices. (B, h, w) int64 -> (B, n_z, h, w)."""
        return rearrange(self.codebook(indices), "b h w c -> b c h w")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize encoder features (Eq. 1) and compute the codebook terms of Eq. 3.

        Args:
            z: (B, n_z, h, w) encoder output E(x).
        """
        # A non-finite batch (skipped by the training loop) must not seed the codebook.
        if self.training and not bool(self.initted) and bool(torch.isfinite(z).all()):
            self._init_from_data(z)
        if self.training and self.dead_code_restart:
            self._restart_dead_codes(z)
        d = self.distances(z)  # (B, N, h, w)
        indices = d.argmin(dim=1)  # (B, h, w)
        z_q = self.lookup(indices).float()  # (B, n_z, h, w), float32 even under autocast
        zf = z.float()
        codebook_loss = F.mse_loss(z_q, zf.detach())
        commit_loss = F.mse_loss(zf, z_q.detach())
        z_q_st = z + (z_q.to(z.dtype) - z).detach()  # straight-through: dL/dz := dL/dz_q
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size)
        p = counts.float() / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        if self.training:
            self._track_usage(counts)
        return QuantizerOutput(z_q_st, indices, d, codebook_loss, commit_loss, perplexity)

    # ------------------------------------------------------------------ usage bookkeeping
    @torch.no_grad()
    def _track_usage(self, counts: torch.Tensor) -> None:
        if self.dead_code_restart and _dist_ready():
            dist.all_reduce(counts)  # restart decisions must agree across ranks
        used = counts > 0
        self.steps_since_used.add_(1).masked_fill_(used, 0)

    @torch.no_grad()
    def _random_vectors(self, z: torch.Tensor, n: int) -> torch.Tensor:
        flat = rearrange(z.detach().float(), "b c h w -> (b h w) c")
        idx = torch.randperm(flat.shape[0], device=flat.device)[:n]
        if idx.numel() < n:  # fewer latent positions than codes: sample with replacement
            idx = torch.randint(flat.shape[0], (n,), device=flat.device)
        vec = flat[idx]
        return vec + 0.01 * vec.std() * torch.randn_like(vec)

    @torch.no_grad()
    def _init_from_data(self, z: torch.Tensor) -> None:
        w = self._random_vectors(z, self.codebook_size).to(self.codebook.weight.dtype)
        if _dist_ready():
            dist.broadcast(w, 0)
        self.codebook.weight.data.copy_(w)
        self.initted.fill_(True)

    @torch.no_grad()
    def _restart_dead_codes(self, z: torch.Tensor) -> None:
        dead = self.steps_since_used >= self.dead_after  # same on all ranks (all-reduced usage)
        n = int(dead.sum())
        if n == 0:
            return
        w = self._random_vectors(z, n).to(self.codebook.weight.dtype)
        if _dist_ready():
            dist.broadcast(w, 0)
        self.codebook.weight.data[dead] = w
        self.steps_since_used[dead] = 0
        log.info("restarted %d dead codes", n)

    def usage(self) -> dict[str, float]:
        """Codebook health from the training-time usage buffer.

        Returns:
            ``{"dead_codes": count of codes unused for >= dead_after steps,
            "active_codes": codes used within the last dead_after steps}``.
        """
        dead = int((self.steps_since_used >= self.dead_after).sum())
        return {"dead_codes": float(dead), "active_codes": float(self.codebook_size - dead)}
