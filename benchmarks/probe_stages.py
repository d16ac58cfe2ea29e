"""Quick stage-1 / stage-2 probes on prepared (+priors) data: the experiments behind the
CPU-budget choices in docs/model.md ("Normalisation", "CPU budget").

Trains in-process on random crops and validates on whole held-out slices every ``--every``
steps, printing one JSON line each. Not a benchmark of speed (the machine is shared); compare
runs made side by side.

    python benchmarks/probe_stages.py stage1 --config configs/demo.yaml --crop 48 \\
        --set stage1.lr=1e-3 --set stage1.disc_start=100000 --steps 300 --save /tmp/s1.pt
    python benchmarks/probe_stages.py stage1 ... --norm group     # GroupNorm instead of ChannelNorm
    python benchmarks/probe_stages.py stage1 ... --no-vq          # plain autoencoder (no bottleneck)
    python benchmarks/probe_stages.py stage2 --stage1 /tmp/s1.pt --crop 48 \\
        --set stage2.encoder_init=stage1 --steps 300
    python benchmarks/probe_stages.py cnn --seconds 360   # the residual-CNN yardstick, same val

``--seconds`` stops any probe after that much training wall time (equal-budget comparisons).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgasr.config import load_config  # noqa: E402
from pgasr.data.batches import random_crop, read_split, stage1_batch, stage2_batch  # noqa: E402
from pgasr.data.schema import priors_dir  # noqa: E402
from pgasr.models import build_stage1, build_stage2  # noqa: E402
from pgasr.models.blocks import ChannelNorm  # noqa: E402
from pgasr.models.quantizer import QuantizerOutput  # noqa: E402
from pgasr.steps import (make_stage1_optimizers, make_stage2_optimizer,  # noqa: E402
                         stage1_update, stage2_update)
from pgasr.training import validate_stage1, validate_stage2  # noqa: E402


def _swap_norms(model: nn.Module, kind: str) -> None:
    """Replace every ChannelNorm of the generator by GroupNorm (taming) or nothing."""
    for mod in list(model.modules()):
        for name, ch in list(mod.named_children()):
            if isinstance(ch, ChannelNorm):
                c = ch.num_channels
                setattr(mod, name, nn.GroupNorm(int(np.gcd(c, 32)), c, eps=1e-6)
                        if kind == "group" else nn.Identity())


def _no_vq(model: nn.Module) -> None:
    q = model.quantizer

    def forward(z):
        zero = z.new_zeros(())
        idx = torch.zeros(z.shape[0], *z.shape[2:], dtype=torch.long)
        return QuantizerOutput(z, idx, q.distances(z), zero, zero, zero + 1)

    q.forward = forward


def _images(rows: dict) -> dict:
    return {k: v for k, v in rows.items() if getattr(v, "ndim", 0) >= 3}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("stage1", "stage2", "cnn"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--data", help="prepared dir (default: the config's, with priors if present)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--crop", type=int, default=48)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=0, help="stop after this much wall time")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--norm", choices=("channel", "group", "none"), default="channel")
    ap.add_argument("--no-vq", action="store_true",
                    help="no quantization (stage 1: plain AE; stage 2: G decodes E's features)")
    ap.add_argument("--stage1", help="stage-1 probe state saved with --save (stage 2)")
    ap.add_argument("--save", help="save the stage-1 probe state here")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    saved = torch.load(a.stage1) if a.stage == "stage2" else None
    if a.stage == "stage2" and saved is None:
        ap.error("stage2 needs --stage1")
    sets = (saved["set"] if saved else []) + a.set
    cfg = load_config(a.config, sets)
    data = a.data or (priors_dir(cfg.data.prepared_dir)
                      if priors_dir(cfg.data.prepared_dir).is_dir() else cfg.data.prepared_dir)
    torch.manual_seed(cfg.seed)
    s1, disc = build_stage1(cfg)
    norm = saved["norm"] if saved else a.norm
    if norm != "channel":
        _swap_norms(s1, norm)
    if saved:
        s1.load_state_dict(saved["model"])
    train, val = _images(read_split(data, "train")), _images(read_split(data, "val"))
    if a.stage == "cnn":
        from pgasr.baseline import ResidualCNN, _centre, evaluate_baseline
        model = ResidualCNN()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.stage1.lr)
    elif a.stage == "stage1":
        model = s1
        if a.no_vq:
            _no_vq(model)
        opt_g, opt_d = make_stage1_optimizers(cfg, model, disc)
    else:
        init, cfg.stage2.encoder_init = cfg.stage2.encoder_init, "scratch"
        model = build_stage2(cfg, s1)
        if norm != "channel":
            _swap_norms(model.encoder, norm)
        if init == "stage1":  # what build_stage2 does, after the norm swap
            model.encoder.load_state_dict(s1.encoder_hat.state_dict())
        cfg.stage2.encoder_init = init
        if a.no_vq:  # G decodes E's continuous features: is the discrete bottleneck the brake?
            _no_vq(model)
        opt = make_stage2_optimizer(cfg, model)
    rng = np.random.default_rng(cfg.seed)
    n, bs = len(train["hr"]), (cfg.stage2 if a.stage == "stage2" else cfg.stage1).batch_size
    t0, dev = time.perf_counter(), torch.device("cpu")
    for step in range(a.steps):
        idx = rng.integers(0, n, bs)  # one draw for all columns: HR, LR and priors stay paired
        rows = random_crop({k: v[idx] for k, v in train.items()}, a.crop, rng)
        done = step == a.steps - 1 or (a.seconds and time.perf_counter() - t0 > a.seconds)
        if a.stage == "cnn":
            lr_up, hr = _centre(rows, cfg.stage2.scale)
            loss = torch.nn.functional.l1_loss(model(lr_up), hr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            m = {"l1": loss.item()}
        elif a.stage == "stage1":
            m = stage1_update(model, disc, opt_g, opt_d, stage1_batch(rows, cfg.model.acg), cfg, step)
        else:
            m = stage2_update(model, opt, stage2_batch(rows, cfg.stage2.scale, cfg.model.acg), cfg)
        if (step + 1) % a.every == 0 or done:
            if a.stage == "cnn":
                e = evaluate_baseline(model, val, cfg.stage2.scale)
                v = {"val_psnr": e["psnr"], "val_ssim": e["ssim"],
                     "val_bicubic_psnr": e["bicubic_psnr"],
                     "val_gain_db": e["psnr"] - e["bicubic_psnr"]}
            else:
                v = (validate_stage1 if a.stage == "stage1" else validate_stage2)(
                    model, val, cfg, dev)
            print(json.dumps({"tag": a.tag, "stage": a.stage, "step": step + 1,
                              "s": round(time.perf_counter() - t0, 1), "train_l1": round(m["l1"], 4),
                              **{k: round(x, 3) for k, x in v.items()}}), flush=True)
        if done:
            break
    if a.save and a.stage == "stage1":
        torch.save({"model": model.state_dict(), "set": a.set, "norm": norm}, a.save)


if __name__ == "__main__":
    main()
