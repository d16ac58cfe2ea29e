"""Loss terms of stage 1 (Eq. 3) and stage 2 (Eq. 4, 5).

Stage 1: L1 + perceptual + adversarial (hinge, taming's adaptive weight) + codebook +
beta * commitment. Stage 2: L1 + alpha1 * L_align_s + alpha2 * L_align_d, where the alignment
terms are KL divergences between code-index distributions a = softmax(-d / tau).

The perceptual term is LPIPS when its backbone weights are on disk; otherwise an explicit,
logged, download-free fallback (:class:`FrequencyGradientLoss`). :attr:`PerceptualLoss.kind`
says which one ran, so it can be written into checkpoint metadata.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = [
    "FrequencyGradientLoss",
    "PerceptualLoss",
    "adaptive_weight",
    "align_d_loss",
    "align_s_loss",
    "generator_adv_loss",
    "get_perceptual",
    "hinge_d_loss",
    "kl_codes",
]


# --------------------------------------------------------------------------- adversarial


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (taming): 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -E[D(G(z))]."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """taming's ``calculate_adaptive_weight``: ||grad rec|| / (||grad g|| + 1e-4) at G's last layer.

    Balances the adversarial gradient against the reconstruction gradient where they meet.
    Uses :func:`torch.autograd.grad` (no ``.grad`` accumulation, so no DDP hooks fire).

    Args:
        rec_loss: scalar reconstruction (L1 + perceptual) loss.
        g_loss: scalar generator adversarial loss.
        last_layer: weight of the decoder's last conv (``decoder.last_layer.weight``).
        max_weight: upper clamp.

    Returns:
        Detached scalar weight in [0, max_weight].
    """
    rec_grads = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = rec_grads.float().norm() / (g_grads.float().norm() + 1e-4)
    return torch.clamp(w, 0.0, max_weight).detach()


# --------------------------------------------------------------------------- perceptual


class FrequencyGradientLoss(nn.Module):
    """Download-free stand-in for LPIPS ("fallback-freq").

    At ``scales`` dyadic resolutions (average pooling) it sums
    * L1 between image gradients (finite differences), which penalises blurred edges, and
    * L1 between Fourier amplitude spectra (orthonormal ``rfft2``), which penalises lost texture
      energy at any frequency regardless of its exact phase.

    Both vanish exactly when the images are equal; the result is the mean over scales. Shapes: (B, C, H, W) x 2 -> scalar.
    """

    def __init__(self, scales: int = 3):
        super().__init__()
        self.scales = scales

    @staticmethod
    def _amplitude(x: torch.Tensor) -> torch.Tensor:
        f = torch.fft.rfft2(x, norm="ortho")
        return torch.sqrt(f.real**2 + f.imag**2 + 1e-8)  # eps: finite gradient at |F| = 0

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p, t = pred.float(), target.float()
        total, n = p.new_zeros(()), 0
        for s in range(self.scales):
            if s:
                if min(p.shape[-2:]) < 4:
                    break
                p, t = F.avg_pool2d(p, 2), F.avg_pool2d(t, 2)
            grad = (
                (p.diff(dim=-1) - t.diff(dim=-1)).abs().mean()
                + (p.diff(dim=-2) - t.diff(dim=-2)).abs().mean()
            )
            freq = (self._amplitude(p) - self._amplitude(t)).abs().mean()
            total = total + grad + freq
            n += 1
        return total / n


class _LpipsLoss(nn.Module):
    """LPIPS on single-channel z-scored images: both mapped to [-1, 1] with the target's
    per-image min/max (detached), repeated to 3 channels."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target.float()
        lo = t.flatten(1).min(1).values.reshape(-1, 1, 1, 1).detach()
        hi = t.flatten(1).max(1).values.reshape(-1, 1, 1, 1).detach()
        scale = (hi - lo).clamp_min(1e-6)

        def norm(x: torch.Tensor) -> torch.Tensor:  # (B,1,H,W) -> (B,3,H,W) in ~[-1, 1]
            return ((x.float() - lo) / scale * 2 - 1).repeat(1, 3, 1, 1)

        return self.model(norm(pred), norm(t)).mean()


class PerceptualLoss(nn.Module):
    """The perceptual term of Eq. 3, or an explicit substitute.

    Args:
        mode: "auto" (LPIPS if weights exist, else the fallback, with a warning), "lpips"
            (LPIPS or a RuntimeError), "fallback" (:class:`FrequencyGradientLoss`), "none" (no
            perceptual term: returns 0, kind "none").
        net: LPIPS backbone, "alex" or "vgg".
        device: where to put LPIPS.

    Attributes:
        kind: "lpips-alex" / "lpips-vgg" / "fallback-freq" / "none"; record it with the run.
        reason: why LPIPS is not used (None when it is).
    """

    def __init__(self, mode: str = "auto", net: str = "alex", device: str | torch.device = "cpu"):
        super().__init__()
        if mode not in ("auto", "lpips", "fallback", "none"):
            raise ValueError(f"stage1.perceptual must be auto|lpips|fallback|none, got {mode!r}")
        self.reason: str | None = None
        self.loss: nn.Module | None = None
        if mode == "none":
            self.kind, self.reason = "none", "disabled by stage1.perceptual=none"
            log.warning("stage-1 perceptual loss disabled (stage1.perceptual=none)")
            return
        if mode in ("auto", "lpips"):
            model, reason = _load_lpips(net, device)
            if model is not None:
                self.kind, self.loss = f"lpips-{net}", _LpipsLoss(model)
                return
            if mode == "lpips":
                raise RuntimeError(f"stage1.perceptual=lpips but LPIPS is unavailable: {reason}")
            self.reason = reason
            log.warning(
                "LPIPS unavailable (%s); stage-1 perceptual term falls back to fallback-freq "
                "(multi-scale gradient + Fourier-amplitude L1)",
                reason,
            )
        else:
            self.reason = "stage1.perceptual=fallback"
        self.kind, self.loss = "fallback-freq", FrequencyGradientLoss()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss between (B, 1, H, W) images (z-scored units)."""
        if self.loss is None:
            return pred.new_zeros((), dtype=torch.float32)
        return self.loss(pred, target)


def _load_lpips(net: str, device) -> tuple[nn.Module | None, str | None]:
    try:
        from pgasr.metrics import load_lpips
    except ImportError as e:  # metrics module not available: treat LPIPS as unavailable
        return None, f"pgasr.metrics.load_lpips not importable: {e}"
    try:
        handle = load_lpips(net=net, device=device)
    except Exception as e:  # a broken weights file must not kill training; say why
        return None, f"load_lpips failed: {type(e).__name__}: {e}"
    model = getattr(handle, "model", None)
    if model is not None:
        model.requires_grad_(False).eval()
    return model, getattr(handle, "reason", None)


_PERCEPTUAL_CACHE: dict[tuple[str, str, str], PerceptualLoss] = {}


def get_perceptual(mode: str, net: str = "alex", device: str | torch.device = "cpu") -> PerceptualLoss:
    """Cached :class:`PerceptualLoss` per (mode, net, device), so LPIPS loads once per process."""
    key = (mode, net, str(torch.device(device)))
    if key not in _PERCEPTUAL_CACHE:
        _PERCEPTUAL_CACHE[key] = PerceptualLoss(mode, net, device)
    return _PERCEPTUAL_CACHE[key]


# --------------------------------------------------------------------------- alignment (Eq. 4)


def kl_codes(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """D_KL(p || q) over the code axis, averaged over latent positions.

    Args:
        log_p, log_q: (B, N, h, w) log-probabilities over the N codes (dim 1).

    Returns:
        Scalar: mean over (B, h, w) of sum_k p_k (log p_k - log q_k), in nats (>= 0).
    """
    if log_p.shape != log_q.shape:
        raise ValueError(f"shape mismatch: {tuple(log_p.shape)} vs {tuple(log_q.shape)}")
    log_p, log_q = log_p.float(), log_q.float()
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def align_s_loss(log_prev: torch.Tensor, log_centre: torch.Tensor, log_next: torch.Tensor) -> torch.Tensor:
    """L_align_s = KL(a^{t-1} || a^t) + KL(a^t || a^{t+1}) (Eq. 4), each (B, N, h, w)."""
    return kl_codes(log_prev, log_centre) + kl_codes(log_centre, log_next)


def align_d_loss(log_centre: torch.Tensor, log_hr: torch.Tensor,
                 direction: str = "paper") -> torch.Tensor:
    """L_align_d between the LR code probabilities a^t and the frozen Ê's a^t_HR (Sec. 2.2).

    ``direction="paper"``: KL(a^t || a^t_HR), the paper's D_KL(a^t, a^t_HR) (mode-seeking in
    a^t). ``"forward"``: KL(a^t_HR || a^t), the cross-entropy of a^t under the HR codes up to a
    constant (mass-covering: every code Ê uses gets probability). ``log_hr`` is detached, so
    only E (and SCAB) move.
    """
    if direction == "paper":
        return kl_codes(log_centre, log_hr.detach())
    if direction == "forward":
        return kl_codes(log_hr.detach(), log_centre)
    raise ValueError(f"stage2.align_d_direction must be 'paper' or 'forward', got {direction!r}")
