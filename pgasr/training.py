"""The epoch loop both stages share, with no Ray in it.

:func:`fit` owns what is the same for a plain single-process run (``pgasr train-local``) and a
Ray Train worker (``jobs/stage1.py``, ``jobs/stage2.py``): building models and optimisers,
the per-epoch learning-rate halving, NaN handling, periodic validation, checkpoint payloads
and resuming. The caller supplies only what differs:

* ``batches(epoch)``: an iterable of row dicts for one epoch (in-memory shuffle locally,
  ``get_dataset_shard("train").iter_batches`` under Ray),
* ``wrap(module)``: identity locally, ``ray.train.torch.prepare_model`` under Ray (DDP),
* ``report(metrics, checkpoint_dir | None)``: print locally, ``ray.train.report`` under Ray.

So the Ray-overhead benchmark compares like with like: the same step functions, the same
loop.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pgasr import steps
from pgasr.losses import get_perceptual
from pgasr.models import build_stage1, build_stage2
from pgasr.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from pgasr.config import RunConfig, config_to_dict
from pgasr.data.batches import random_crop, stage1_batch, stage2_batch
from pgasr.metrics import psnr, ssim
from pgasr.runtime import tune_allocator

log = logging.getLogger(__name__)

__all__ = ["FitResult", "fit", "resolve_device", "validate_stage1", "validate_stage2"]


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device=cuda requested but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class FitResult:
    stage: int
    steps: int
    epochs: int
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    checkpoint: Path | None = None
    nan_skipped: int = 0


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _unwrap(m: nn.Module) -> nn.Module:
    from pgasr.models import unwrap

    return unwrap(m)


def _data_range(hr: torch.Tensor) -> torch.Tensor:
    """Per-image peak-to-peak of the HR target (B,)."""
    flat = hr.flatten(1)
    return (flat.max(1).values - flat.min(1).values).clamp_min(1e-6)


@torch.no_grad()
def validate_stage1(model: nn.Module, rows: Mapping[str, np.ndarray], cfg: RunConfig,
                    device: torch.device, batch_size: int = 16) -> dict[str, float]:
    """Stage-1 reconstruction PSNR/SSIM and code usage on held-out rows."""
    m = _unwrap(model)
    m.eval()
    ps, ss, idx = [], [], []
    n = len(rows["hr"])
    for i in range(0, n, batch_size):
        b = _to(stage1_batch({k: v[i : i + batch_size] for k, v in rows.items()},
                             need_prior=cfg.model.acg), device)
        out = m(b["hr"], b["prior_hr"])
        dr = _data_range(b["hr"])
        ps.append(psnr(out.recon.float(), b["hr"], dr))
        ss.append(ssim(out.recon.float(), b["hr"], dr))
        idx.append(out.quant.indices.flatten().cpu())
    m.train()
    counts = torch.bincount(torch.cat(idx), minlength=cfg.model.codebook_size).double()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return {"val_psnr": float(torch.cat(ps).mean()), "val_ssim": float(torch.cat(ss).mean()),
            "val_code_usage": float((counts > 0).float().mean()), "val_perplexity": perplexity}


@torch.no_grad()
def validate_stage2(model: nn.Module, rows: Mapping[str, np.ndarray], cfg: RunConfig,
                    device: torch.device, batch_size: int = 8) -> dict[str, float]:
    """Stage-2 SR PSNR/SSIM on held-out triplets, with bicubic on the same slices for scale."""
    m = _unwrap(model)
    m.eval()
    scale = cfg.stage2.scale
    ps, ss, pb = [], [], []
    for i in range(0, len(rows["hr"]), batch_size):
        b = _to(stage2_batch({k: v[i : i + batch_size] for k, v in rows.items()}, scale,
                             need_prior=cfg.model.acg), device)
        lr_up = steps.upsample_lr(b["lr"], b["hr"].shape[-2:])
        sr = m(lr_up, b["prior_lr"]).float()
        hr = b["hr"][:, 1:2]
        dr = _data_range(hr)
        ps.append(psnr(sr, hr, dr))
        ss.append(ssim(sr, hr, dr))
        pb.append(psnr(lr_up[:, 1:2], hr, dr))
    m.train()
    val = float(torch.cat(ps).mean())
    bic = float(torch.cat(pb).mean())
    return {"val_psnr": val, "val_ssim": float(torch.cat(ss).mean()),
            "val_bicubic_psnr": bic, "val_gain_db": val - bic}


def _all_finite(losses: list[torch.Tensor]) -> bool:
    bad = torch.tensor([0.0 if all(torch.isfinite(x).item() for x in losses) else 1.0],
                       device=losses[0].device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0.0


def _lr_factor(cfg_stage, epoch: int) -> float:
    return 0.5 ** (epoch // max(1, cfg_stage.lr_halve_every))


def _warmup(cfg_stage, step: int) -> float:
    """Linear warm-up factor for optimisation step ``step`` (0-based): (step + 1) / warmup."""
    n = int(getattr(cfg_stage, "warmup_steps", 0) or 0)
    return 1.0 if n <= 0 else min(1.0, (step + 1) / n)


def _clip(optim: torch.optim.Optimizer, max_norm: float) -> None:
    if max_norm > 0:
        params = [p for g in optim.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def fit(
    stage: int,
    cfg: RunConfig,
    batches: Callable[[int], Iterable[Mapping[str, np.ndarray]]],
    *,
    val_rows: Mapping[str, np.ndarray] | None = None,
    stage1_checkpoint: str | Path | Checkpoint | None = None,
    resume: Checkpoint | None = None,
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    report: Callable[[dict, Path | None], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    device: torch.device | None = None,
    extra_meta: dict | None = None,
    is_main: bool = True,
) -> FitResult:
    """Train one stage for ``cfg.stage{1,2}.epochs`` epochs (or ``max_steps``).

    Args:
        stage: 1 or 2.
        cfg: resolved run config.
        batches: ``epoch -> iterable of row dicts`` (prepared-shard columns).
        val_rows: held-out rows for validation (None: skip validation).
        stage1_checkpoint: stage 2 only: the trained stage-1 checkpoint (path or loaded).
        resume: a checkpoint with ``train_state`` to continue from.
        wrap: module wrapper (DDP under Ray Train); applied after freezing.
        report: called after every epoch with metrics and the epoch's checkpoint directory.
        checkpoint_dir: where the plain loop keeps its latest checkpoint (None: temp dirs
            handed to ``report``).
        device: torch device (default from ``cfg.device``).
        extra_meta: merged into checkpoint metadata (prior backend, data manifest hash...).
        is_main: rank 0 writes checkpoints; others report without one.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    device = device or resolve_device(cfg)
    torch.manual_seed(cfg.seed)
    sc = cfg.stage1 if stage == 1 else cfg.stage2
    meta = dict(extra_meta or {})
    meta["allocator"] = tune_allocator()

    if stage == 1:
        model, disc = build_stage1(cfg)
        if resume is not None:
            model.load_state_dict(resume.state_dicts["model"])
            disc.load_state_dict(resume.state_dicts["disc"])
        model, disc = model.to(device), disc.to(device)
        perceptual = get_perceptual(sc.perceptual, sc.lpips_net, device)
        meta["perceptual"] = perceptual.kind
        model_w, disc_w = wrap(model), wrap(disc)
        if sc.compile:
            model_w = torch.compile(model_w)
        opt_g, opt_d = steps.make_stage1_optimizers(cfg, model, disc)
        optims = {"opt_g": opt_g, "opt_d": opt_d}
        modules = {"model": model, "disc": disc}
    else:
        if stage1_checkpoint is None and resume is None:
            raise ValueError("stage 2 needs a stage-1 checkpoint (stage2.stage1_checkpoint)")
        s1 = (stage1_checkpoint if isinstance(stage1_checkpoint, Checkpoint)
              else load_checkpoint(stage1_checkpoint) if stage1_checkpoint else None)
        if s1 is not None and s1.stage != 1:
            raise ValueError(f"{s1.path} is a stage-{s1.stage} checkpoint, stage 1 expected")
        stage1_model, _ = build_stage1(s1.cfg if s1 is not None else cfg)
        if s1 is not None:
            stage1_model.load_state_dict(s1.state_dicts["model"])
            meta["stage1_checkpoint"] = str(s1.path)
            meta["stage1_meta"] = {k: s1.meta.get(k) for k in ("prior", "perceptual", "metrics")}
        model = build_stage2(cfg, stage1_model)  # Z, G, Ê frozen here, before DDP wrapping
        if resume is not None:
            model.load_state_dict(resume.state_dicts["model"])
        model = model.to(device)
        model_w = wrap(model)
        if sc.compile:
            model_w = torch.compile(model_w)
        optims = {"opt": steps.make_stage2_optimizer(cfg, model)}
        modules = {"model": model}

    step, start_epoch, nan_skipped = 0, 0, 0
    if resume is not None and resume.train_state:
        ts = resume.train_state
        for k, o in optims.items():
            o.load_state_dict(ts["optims"][k])
        step, start_epoch = int(ts["step"]), int(ts["epoch"]) + 1
        nan_skipped = int(ts.get("nan_skipped", 0))
        torch.set_rng_state(ts["torch_rng"])
        meta["resumed_from"] = {"step": step, "epoch": start_epoch - 1,
                                "history": list(resume.meta.get("resumed_history", []))
                                + [step]}
        meta["resumed_history"] = meta["resumed_from"]["history"]
        log.info("resumed stage %d at epoch %d, step %d", stage, start_epoch, step)

    result = FitResult(stage, step, start_epoch, nan_skipped=nan_skipped)
    consecutive_nan = 0
    for epoch in range(start_epoch, sc.epochs):
        for o in optims.values():
            for g in o.param_groups:
                g["lr"] = sc.lr * _lr_factor(sc, epoch)
        t0, n_batches, sums = time.perf_counter(), 0, {}
        for rows in batches(epoch):
            if sc.crop:  # window position: a function of (seed, step) only -> resumable
                rows = random_crop(rows, sc.crop, np.random.default_rng([cfg.seed, step]))
            if stage == 1:
                b = _to(stage1_batch(rows, need_prior=cfg.model.acg), device)
                o1 = steps.stage1_step(model_w, disc_w, b, cfg, step, perceptual)
                losses = [o1.loss_g] + ([o1.loss_d] if o1.loss_d is not None else [])
                out = o1.metrics
            else:
                b = _to(stage2_batch(rows, cfg.stage2.scale, need_prior=cfg.model.acg), device)
                o2 = steps.stage2_step(model_w, b, cfg)
                losses, out = [o2.loss], o2.metrics
            # Check before any optimiser step: a NaN gradient would poison the weights. Under
            # DDP every rank must take the same decision, or the others hang in all-reduce.
            if not _all_finite(losses):
                nan_skipped += 1
                consecutive_nan += 1
                msg = f"non-finite loss at stage {stage} epoch {epoch} step {step}"
                if cfg.nan_policy == "error" or consecutive_nan > 10:
                    raise FloatingPointError(msg + " (nan_policy=error or >10 in a row)")
                log.warning("%s: skipped (%d so far)", msg, nan_skipped)
                continue
            lr_now = sc.lr * _lr_factor(sc, epoch) * _warmup(sc, step)
            for o in optims.values():
                for g in o.param_groups:
                    g["lr"] = lr_now
            if stage == 1:  # same order as steps.stage1_update: G then D
                optims["opt_g"].zero_grad(set_to_none=True)
                o1.loss_g.backward()
                _clip(optims["opt_g"], sc.grad_clip)
                optims["opt_g"].step()
                if o1.loss_d is not None:
                    optims["opt_d"].zero_grad(set_to_none=True)
                    o1.loss_d.backward()
                    _clip(optims["opt_d"], sc.grad_clip)
                    optims["opt_d"].step()
            else:
                optims["opt"].zero_grad(set_to_none=True)
                o2.loss.backward()
                _clip(optims["opt"], sc.grad_clip)
                optims["opt"].step()
            consecutive_nan = 0
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_batches += 1
            step += 1
            if sc.log_every and step % sc.log_every == 0 and is_main:
                log.info("stage %d epoch %d step %d %s", stage, epoch, step,
                         " ".join(f"{k}={v:.4g}" for k, v in out.items()))
            if sc.max_steps and step >= sc.max_steps:
                break
        epoch_metrics = {f"train_{k}": v / max(n_batches, 1) for k, v in sums.items()}
        epoch_metrics.update(epoch=epoch, step=step, lr=sc.lr * _lr_factor(sc, epoch),
                             epoch_time_s=time.perf_counter() - t0, nan_skipped=nan_skipped)
        last = epoch == sc.epochs - 1 or bool(sc.max_steps and step >= sc.max_steps)
        if val_rows is not None and ((epoch + 1) % max(1, sc.val_every) == 0 or last):
            v = (validate_stage1 if stage == 1 else validate_stage2)(model, val_rows, cfg, device)
            epoch_metrics.update(v)
        result.history.append(epoch_metrics)
        result.metrics, result.steps, result.epochs = epoch_metrics, step, epoch + 1
        result.nan_skipped = nan_skipped

        ckpt_path = None
        if is_main:
            train_state = {"optims": {k: o.state_dict() for k, o in optims.items()},
                           "step": step, "epoch": epoch, "nan_skipped": nan_skipped,
                           "torch_rng": torch.get_rng_state()}
            target = (Path(checkpoint_dir) if checkpoint_dir
                      else Path(tempfile.mkdtemp(prefix=f"pgasr-s{stage}-")) / "checkpoint")
            ckpt_meta = {**meta, "metrics": epoch_metrics, "step": step, "epoch": epoch,
                         "scales": [cfg.stage2.scale] if stage == 2 else list(cfg.data.scales),
                         "degradation": config_to_dict(cfg.degradation)}
            ckpt_path = save_checkpoint(target, stage=stage, modules=modules, cfg=cfg,
                                        meta=ckpt_meta, train_state=train_state)
            result.checkpoint = ckpt_path
        if report is not None:
            report(epoch_metrics, ckpt_path)
        if sc.max_steps and step >= sc.max_steps:
            break
    return result


def train_local(stage: int, cfg: RunConfig, data_dir: str | Path, out_dir: str | Path,
                stage1_checkpoint: str | Path | None = None, progress: bool = True) -> FitResult:
    """Single-process training from prepared shards (``pgasr train-local``).

    Reads the whole train split into memory (fine for debugging-sized cohorts; the Ray job
    streams), shuffles per epoch with a seeded permutation, validates on the val split when
    there is one, and keeps the latest checkpoint in ``out_dir``.

    Raises:
        pgasr.provenance.ForeignDirectoryError: ``out_dir`` exists and is neither empty nor a
            PGASR checkpoint (checked before training starts; nothing is deleted).
    """
    from tqdm.auto import tqdm

    from pgasr.data import schema
    from pgasr.data.batches import iter_batches, read_split, split_files, stage_columns
    from pgasr.provenance import CHECKPOINT_MARKER, check_replaceable, sha256_file

    check_replaceable(out_dir, CHECKPOINT_MARKER)  # fail now, not after the first epoch
    cols = stage_columns(stage, cfg.stage2.scale, cfg.model.acg,
                         split_files(data_dir, "train")[0])
    train = read_split(data_dir, "train", cols)
    try:
        val = read_split(data_dir, "val", cols)
    except FileNotFoundError:
        val = None
        log.warning("no val split in %s: training without validation", data_dir)
    sc = cfg.stage1 if stage == 1 else cfg.stage2
    n_batches = len(train[schema.HR]) // sc.batch_size

    def batches(epoch: int):
        it = iter_batches(train, sc.batch_size, shuffle=True, seed=cfg.seed * 10_007 + epoch,
                          drop_last=True)
        return tqdm(it, total=n_batches, desc=f"stage {stage} epoch {epoch}", unit="batch",
                    disable=not progress, leave=False)

    from pgasr.data.prepare import data_meta

    meta = {"data_dir": str(data_dir), **data_meta(data_dir)}
    manifest = Path(data_dir) / schema.MANIFEST
    if manifest.is_file():
        meta["data_manifest_sha256"] = sha256_file(manifest)
    if cfg.model.acg:
        from pgasr.priors import build_prior

        meta["prior"] = build_prior(cfg.prior).describe()

    from pgasr.tracking import Run

    tracked = Run.create(cfg, f"stage{stage}", tags={"pgasr.runner": "train-local",
                                                     "pgasr.checkpoint": str(out_dir)})

    def report(metrics: dict, ckpt: Path | None) -> None:
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        print(f"stage {stage} epoch {metrics['epoch']}: {shown}", flush=True)
        tracked.log_metrics(metrics, step=int(metrics.get("step", 0)))

    with tracked:
        res = fit(stage, cfg, batches, val_rows=val, stage1_checkpoint=stage1_checkpoint,
                  report=report, checkpoint_dir=out_dir, extra_meta=meta)
        for f in ("meta.json", "config.yaml"):
            tracked.log_artifact(Path(out_dir) / f, "checkpoint")
    return res
