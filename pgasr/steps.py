"""Pure training steps: (model, batch, config) -> (loss, metrics). No Ray, no I/O.

The same functions serve a plain PyTorch loop and Ray Train workers. Modules may be wrapped in
DistributedDataParallel; submodules are reached through :func:`pgasr.models.unwrap`. Every
DDP-wrapped module gets exactly one forward and one backward per step:

* stage 1: the generator's adversarial term evaluates D through ``torch.func.functional_call``
  with *detached* parameters of the unwrapped D (gradient reaches the reconstruction, not D, and
  no DDP hook fires); D's own loss goes through the wrapper once on ``cat([hr, recon.detach()])``.
* stage 2: everything the loss needs comes out of one ``model(..., return_all=True)`` call.

Batches (float32):

* stage 1: ``{"hr": (B,1,H,W), "prior_hr": (B,1,H,W)}``
* stage 2: ``{"hr": (B,3,H,W), "lr": (B,3,H/s,W/s), "prior_lr": (B,3,H,W),
  "prior_hr": (B,3,H,W)}`` — triplets (t-1, t, t+1), channel 1 = centre t.

Priors may be absent when ``model.acg`` is false.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgasr.losses import (
    PerceptualLoss,
    adaptive_weight,
    align_d_loss,
    align_s_loss,
    generator_adv_loss,
    get_perceptual,
    hinge_d_loss,
)
from pgasr.models.pgasr import unwrap

__all__ = [
    "Stage1Out",
    "Stage2Out",
    "autocast",
    "make_stage1_optimizers",
    "make_stage2_optimizer",
    "stage1_step",
    "stage1_update",
    "stage2_step",
    "stage2_update",
    "upsample_lr",
]


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` (CUDA or CPU) when ``enabled``, else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _batch_psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) with the whole batch's target max - min as data range.

    Training monitor only (a background-only crop has no range of its own); evaluation uses
    :mod:`pgasr.metrics` with the subject's range.
    """
    with torch.no_grad():
        p, t = pred.detach().float().flatten(1), target.detach().float().flatten(1)
        mse = (p - t).pow(2).mean(1).clamp_min(1e-12)
        rng = (t.max() - t.min()).clamp_min(1e-6)
        return float((10 * torch.log10(rng**2 / mse)).mean())


def _f(t: torch.Tensor | float) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def _require(batch: Mapping, keys: tuple[str, ...], stage: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{stage} batch lacks {missing}; has {sorted(batch)}")


# ============================================================================ stage 1


@dataclass
class Stage1Out:
    """Result of :func:`stage1_step`.

    Attributes:
        loss_g: scalar loss of Ê, Z, G (Eq. 3).
        loss_d: scalar hinge loss of D, or None before ``stage1.disc_start``.
        metrics: floats for logging.
        perceptual_kind: which perceptual term ran ("lpips-alex", "fallback-freq", "none").
        recon: (B, 1, H, W) detached reconstruction.
    """

    loss_g: torch.Tensor
    loss_d: torch.Tensor | None
    metrics: dict[str, float]
    perceptual_kind: str = ""
    recon: torch.Tensor | None = field(default=None, repr=False)


def _disc_without_param_grad(disc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """D(x) with gradient w.r.t. ``x`` only (D's parameters detached, DDP bypassed)."""
    d = unwrap(disc)
    state = {k: v.detach() for k, v in d.named_parameters()}
    state.update(dict(d.named_buffers()))
    return torch.func.functional_call(d, state, (x,))


def stage1_step(
    model: nn.Module,
    disc: nn.Module | None,
    batch: Mapping[str, torch.Tensor],
    cfg,
    step: int,
    perceptual: PerceptualLoss | None = None,
) -> Stage1Out:
    """Losses of one stage-1 step (Eq. 3) without touching gradients or optimizers.

    ``loss_g = l1_weight*L1 + perceptual_weight*L_per + lambda*L_adv + ||sg[E(x)] - z_q||^2
    + beta*||sg[z_q] - E(x)||^2`` with ``lambda = adv_weight * adaptive_weight`` once
    ``step >= stage1.disc_start`` (0 before), and ``loss_d`` the hinge loss of D.

    Args:
        model: :class:`~pgasr.models.Stage1Model` (optionally DDP-wrapped).
        disc: :class:`~pgasr.models.Discriminator` (optionally DDP-wrapped) or None.
        batch: ``{"hr": (B,1,H,W), "prior_hr": (B,1,H,W)}``.
        cfg: :class:`pgasr.config.RunConfig`.
        step: global optimisation step (for ``disc_start``).
        perceptual: perceptual loss to use; default: the cached one for ``cfg.stage1``.
    """
    s1 = cfg.stage1
    _require(batch, ("hr", "prior_hr") if cfg.model.acg else ("hr",), "stage-1")
    hr = batch["hr"]
    prior = batch["prior_hr"] if cfg.model.acg else None
    dev = hr.device
    if perceptual is None:
        perceptual = get_perceptual(s1.perceptual, s1.lpips_net, dev)

    with autocast(dev, s1.bf16):
        out = model(hr, prior)
    recon = out.recon.float()
    q = out.quant
    l1 = (recon - hr).abs().mean()
    p_loss = perceptual(recon, hr) if s1.perceptual_weight > 0 else recon.new_zeros(())
    rec_loss = s1.l1_weight * l1 + s1.perceptual_weight * p_loss
    loss_g = rec_loss + q.codebook_loss + s1.beta * q.commit_loss
    metrics = {
        "l1": _f(l1),
        "perceptual": _f(p_loss),
        "codebook": _f(q.codebook_loss),
        "commit": _f(q.commit_loss),
        "perplexity": _f(q.perplexity),
        "psnr": _batch_psnr(recon, hr),
    }

    loss_d = None
    if disc is not None and s1.adv_weight > 0 and step >= s1.disc_start:
        with autocast(dev, s1.bf16):
            g_logits = _disc_without_param_grad(disc, recon)
        g_loss = generator_adv_loss(g_logits.float())
        last = unwrap(model).decoder.last_layer.weight
        if torch.is_grad_enabled() and last.requires_grad:
            d_weight = adaptive_weight(rec_loss, g_loss, last, s1.adaptive_weight_max)
        else:  # evaluation: no graph to differentiate
            d_weight = torch.ones((), device=dev)
        d_weight = d_weight * s1.adv_weight
        loss_g = loss_g + d_weight * g_loss
        with autocast(dev, s1.bf16):
            logits = disc(torch.cat([hr, recon.detach()])).float()  # one DDP forward
        logits_real, logits_fake = logits.chunk(2)
        loss_d = hinge_d_loss(logits_real, logits_fake)
        metrics.update(
            g_adv=_f(g_loss),
            d_weight=_f(d_weight),
            loss_d=_f(loss_d),
            logits_real=_f(logits_real.mean()),
            logits_fake=_f(logits_fake.mean()),
        )
    metrics["loss_g"] = _f(loss_g)
    metrics.update(unwrap(model).quantizer.usage())
    return Stage1Out(loss_g, loss_d, metrics, perceptual.kind, recon.detach())


def stage1_update(
    model: nn.Module,
    disc: nn.Module | None,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer | None,
    batch: Mapping[str, torch.Tensor],
    cfg,
    step: int,
    perceptual: PerceptualLoss | None = None,
) -> dict[str, float]:
    """One stage-1 optimisation step: G-side backward/step, then D-side backward/step.

    Returns:
        The step's metrics.
    """
    out = stage1_step(model, disc, batch, cfg, step, perceptual)
    opt_g.zero_grad(set_to_none=True)
    out.loss_g.backward()
    opt_g.step()
    if out.loss_d is not None:
        if opt_d is None:
            raise ValueError("the adversarial term is on (step >= disc_start) but opt_d is None")
        opt_d.zero_grad(set_to_none=True)
        out.loss_d.backward()  # D's graph only sees recon.detach(): independent of opt_g.step
        opt_d.step()
    return out.metrics


def make_stage1_optimizers(
    cfg, model: nn.Module, disc: nn.Module | None
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """Adam(lr=stage1.lr, betas=stage1.adam_betas) for Ê+Z+G and for D (default: taming's
    VQGAN betas (0.5, 0.9))."""
    betas = tuple(float(b) for b in cfg.stage1.adam_betas)
    opt_g = torch.optim.Adam(model.parameters(), lr=cfg.stage1.lr, betas=betas)
    opt_d = None if disc is None else torch.optim.Adam(disc.parameters(), lr=cfg.stage1.lr,
                                                       betas=betas)
    return opt_g, opt_d


# ============================================================================ stage 2


@dataclass
class Stage2Out:
    """Result of :func:`stage2_step`.

    Attributes:
        loss: scalar L_stage2 (Eq. 5).
        metrics: floats for logging.
        sr: (B, 1, H, W) detached SR centre slices.
    """

    loss: torch.Tensor
    metrics: dict[str, float]
    sr: torch.Tensor | None = field(default=None, repr=False)


def upsample_lr(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """lr_up: bicubic interpolation (align_corners=False) of (B, C, h, w) to (B, C, *size)."""
    return F.interpolate(lr.float(), size=tuple(size), mode="bicubic", align_corners=False)


def stage2_step(model: nn.Module, batch: Mapping[str, torch.Tensor], cfg) -> Stage2Out:
    """Loss of one stage-2 step: L1 + alpha1*L_align_s + alpha2*L_align_d (Eq. 5).

    Terms switched off by ``stage2.align_s`` / ``stage2.align_d`` are not computed (the
    neighbours' distributions and the HR pass through Ê are skipped). ``stage2.feature_weight``
    > 0 adds ``||z^t - sg[Ê(HR)]||^2`` (CodeFormer-style dense target; not in the paper).
    ``stage2.commit_weight``
    > 0 adds ``||sg[z_q] - E(x)||^2`` (not in the paper; 0 by default).

    Args:
        model: :class:`~pgasr.models.Stage2Model` (optionally DDP-wrapped).
        batch: ``{"hr", "lr", "prior_lr", "prior_hr"}`` triplets (see module docstring).
        cfg: :class:`pgasr.config.RunConfig`.
    """
    s2, acg = cfg.stage2, cfg.model.acg
    keys = ["hr", "lr"]
    if acg:
        keys += ["prior_lr", "prior_hr"] if s2.align_d else ["prior_lr"]
    _require(batch, tuple(keys), "stage-2")
    hr, lr = batch["hr"], batch["lr"]
    if hr.ndim != 4 or hr.shape[1] != 3 or lr.shape[:2] != hr.shape[:2]:
        raise ValueError(
            f"stage-2 batch needs triplets hr (B,3,H,W), lr (B,3,h,w); got {tuple(hr.shape)}, "
            f"{tuple(lr.shape)}"
        )
    dev = hr.device
    lr_up = upsample_lr(lr, hr.shape[-2:])  # (B, 3, H, W)
    hr_t = hr[:, 1:2]  # (B, 1, H, W) centre
    prior_lr = batch["prior_lr"] if acg else None
    prior_hr_t = batch["prior_hr"][:, 1:2] if (acg and s2.align_d) else None

    with autocast(dev, s2.bf16):
        out = model(
            lr_up,
            prior_lr,
            hr=hr_t if s2.align_d else None,
            prior_hr=prior_hr_t,
            neighbours=s2.align_s,
            return_all=True,
        )
    sr = out.sr.float()
    l1 = (sr - hr_t).abs().mean()
    loss = l1
    metrics = {
        "l1": _f(l1),
        "psnr": _batch_psnr(sr, hr_t),
        "psnr_bicubic": _batch_psnr(lr_up[:, 1:2], hr_t),
    }
    if s2.align_s:
        l_s = align_s_loss(*out.member_log_probs)  # a^{t-1}, a^t, a^{t+1}: (B, N, h, w) each
        loss = loss + s2.alpha1 * l_s
        metrics["align_s"] = _f(l_s)
    if s2.align_d:
        l_d = align_d_loss(out.centre_log_probs, out.log_probs_hr, s2.align_d_direction)
        loss = loss + s2.alpha2 * l_d
        metrics["align_d"] = _f(l_d)
        metrics["code_match"] = float((out.indices == out.indices_hr).float().mean())
    if s2.feature_weight > 0:
        if out.z_hr is None:
            raise ValueError("stage2.feature_weight > 0 needs stage2.align_d (the HR pass through Ê)")
        feat = F.mse_loss(out.z.float(), out.z_hr.detach().float())
        loss = loss + s2.feature_weight * feat
        metrics["feature"] = _f(feat)
    if s2.commit_weight > 0:
        commit = F.mse_loss(out.z.float(), out.z_q.detach().float())
        loss = loss + s2.commit_weight * commit
        metrics["commit"] = _f(commit)
    metrics["loss"] = _f(loss)
    return Stage2Out(loss, metrics, sr.detach())


def stage2_update(
    model: nn.Module, opt: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor], cfg
) -> dict[str, float]:
    """One stage-2 optimisation step (E and SCAB only; Z, G, Ê are frozen). Returns metrics."""
    out = stage2_step(model, batch, cfg)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    return out.metrics


def make_stage2_optimizer(cfg, model: nn.Module) -> torch.optim.Adam:
    """Adam(lr=stage2.lr, betas=stage2.adam_betas) over the trainable parameters (E, SCAB)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("stage-2 model has no trainable parameters")
    return torch.optim.Adam(params, lr=cfg.stage2.lr,
                            betas=tuple(float(b) for b in cfg.stage2.adam_betas))
