"""Step efficiency: how close the training and inference steps run to the machine's arithmetic.

For stage-1 and stage-2 training steps (forward + backward + Adam) of the demo model at latent
factor f = 2 and f = 1, and of the paper-width model at a small batch, and for inference
(:class:`pgasr.inference.Predictor` on 96^2 and 256^2 slices, tissue prior and
back-projection included), this reports ms/step, the FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode``, the achieved GFLOP/s and its ratio to a 1024^2
fp32 matmul measured in the same run (the machine's practical dense rate), plus a
``torch.profiler`` table of the top ops of the demo f = 1 stage-1 step.

Every case runs in this one process with ``torch.set_num_threads(--threads)``; cases are
interleaved over ``--rounds`` rounds and the median is reported, so load from other processes
affects all cases alike.

Writes ``benchmarks/results/step_efficiency.json`` and ``step_efficiency.png``.

Usage::

    python benchmarks/step_efficiency.py --threads 2            # ~3 min on 2 cores
    python benchmarks/step_efficiency.py --quick                # one round, fewer cases
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgasr.config import load_config  # noqa: E402
from pgasr.models import build_stage1, build_stage2  # noqa: E402
from pgasr.steps import (  # noqa: E402
    make_stage1_optimizers,
    make_stage2_optimizer,
    stage1_update,
    stage2_update,
)

OUT = ROOT / "benchmarks" / "results"
DEMO = ROOT / "configs" / "demo.yaml"
PAPER_MODEL = ["model.channels=[64,64,128,128]", "model.n_z=64", "model.decoder_channels=128",
               "model.num_heads=8", "model.dat_depth=2"]


# --------------------------------------------------------------------------- cases


def _cfg(f: int, paper: bool):
    sets = [f"model.latent_factor={f}", "prior.backend=tissue"]
    return load_config(DEMO, sets + (PAPER_MODEL if paper else []))


def stage1_step(cfg, batch: int, crop: int, device="cpu", disc: bool = False
                ) -> Callable[[], None]:
    """One stage-1 update (random data) as a callable; with ``disc`` the GAN side too."""
    device = torch.device(device)
    torch.manual_seed(0)
    model, d = build_stage1(cfg)
    model = model.to(device).train()
    d = d.to(device).train() if disc else None
    opt, opt_d = make_stage1_optimizers(cfg, model, d)
    hr = torch.randn(batch, 1, crop, crop, device=device)
    b = {"hr": hr, "prior_hr": torch.rand_like(hr)}
    return lambda: stage1_update(model, d, opt, opt_d, b, cfg, step=1 if disc else 0)


def stage2_step(cfg, batch: int, crop: int, device="cpu") -> Callable[[], None]:
    """One stage-2 update (random triplets) as a callable."""
    device = torch.device(device)
    torch.manual_seed(0)
    s1, _ = build_stage1(cfg)
    s1.train()(torch.randn(2, 1, crop, crop), torch.rand(2, 1, crop, crop))  # codebook init
    model = build_stage2(cfg, s1).to(device).train()
    opt = make_stage2_optimizer(cfg, model)
    s = cfg.stage2.scale

    full, low = (batch, 3, crop, crop), (batch, 3, crop // s, crop // s)
    b = {"hr": torch.randn(full, device=device), "lr": torch.randn(low, device=device),
         "prior_lr": torch.rand(full, device=device), "prior_hr": torch.rand(full, device=device)}
    return lambda: stage2_update(model, opt, b, cfg)


def random_predictor(cfg, d: Path, device="cpu", batch: int = 8, bf16: bool = False):
    """A ``Predictor`` on a random-weight stage-2 checkpoint of ``cfg`` written to ``d``."""
    from pgasr.checkpoint import save_checkpoint
    from pgasr.inference import Predictor
    from pgasr.priors import build_prior

    torch.manual_seed(0)
    s1, _ = build_stage1(cfg)
    s1.train()(torch.randn(2, 1, 32, 32), torch.rand(2, 1, 32, 32))  # codebook init
    save_checkpoint(d, stage=2, modules={"model": build_stage2(cfg, s1)}, cfg=cfg,
                    meta={"scales": [2], "prior": build_prior(cfg.prior).describe()})
    return Predictor.from_checkpoint(d, device=str(device), batch_size=batch, bf16=bf16)


def _stage1_case(f: int, paper: bool, batch: int, crop: int) -> Callable[[], None]:
    return stage1_step(_cfg(f, paper), batch, crop)


def _stage2_case(f: int, paper: bool, batch: int, crop: int) -> Callable[[], None]:
    return stage2_step(_cfg(f, paper), batch, crop)


def _inference_case(f: int, size: int, batch: int, tmp: Path) -> Callable[[], None]:
    pred = random_predictor(_cfg(f, False), tmp / f"ck_f{f}_{size}", batch=batch)
    lr = np.random.default_rng(0).standard_normal((batch, 3, size // 2, size // 2)).astype(np.float32)
    return lambda: pred.predict_triplets(lr, 2)


def _volume_case(f: int, size: int, slices: int, tmp: Path) -> Callable[[], None]:
    """``Predictor.predict_volume`` on a (size/2, size/2, slices) LR volume at x2: each slice
    through E once, triplets rendered from shared features (what ``pgasr sr`` runs)."""
    pred = random_predictor(_cfg(f, False), tmp / f"ck_vol_f{f}_{size}", batch=8)
    vol = (np.random.default_rng(0).random((size // 2, size // 2, slices)) * 1000).astype(np.float32)
    return lambda: pred.predict_volume(vol, np.eye(4), 2)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _matmul_rate(n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def _profile(fn: Callable[[], None], top: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            fn()
    rows = []
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    for e in events[:top]:
        rows.append({"op": e.key, "calls": e.count // 2,
                     "self_ms": e.self_cpu_time_total / 2e3,
                     "share": e.self_cpu_time_total / total})
    return rows


# --------------------------------------------------------------------------- run


def run(args) -> dict:
    from pgasr.runtime import tune_allocator

    allocator = {"allocator": "default", "reason": "--default-allocator"} if \
        args.default_allocator else tune_allocator()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="pgasr-step-eff-"))
    specs: list[tuple[str, str, int, Callable[[], Callable[[], None]]]] = [
        ("stage1 demo f=2 8x48^2", "stage1", 8, lambda: _stage1_case(2, False, 8, 48)),
        ("stage1 demo f=1 8x48^2", "stage1", 8, lambda: _stage1_case(1, False, 8, 48)),
        ("stage2 demo f=2 8x48^2", "stage2", 8, lambda: _stage2_case(2, False, 8, 48)),
        ("stage2 demo f=1 8x48^2", "stage2", 8, lambda: _stage2_case(1, False, 8, 48)),
        ("infer demo f=2 8x96^2", "inference", 8, lambda: _inference_case(2, 96, 8, tmp)),
        ("infer demo f=1 8x96^2", "inference", 8, lambda: _inference_case(1, 96, 8, tmp)),
        ("infer demo f=2 2x256^2", "inference", 2, lambda: _inference_case(2, 256, 2, tmp)),
        ("volume demo f=2 96^2 x48", "inference", 48, lambda: _volume_case(2, 96, 48, tmp)),
    ]
    if not args.quick:
        specs += [
            ("stage1 paper f=1 2x48^2", "stage1", 2, lambda: _stage1_case(1, True, 2, 48)),
            ("stage2 paper f=1 2x48^2", "stage2", 2, lambda: _stage2_case(1, True, 2, 48)),
            ("infer demo f=1 2x256^2", "inference", 2, lambda: _inference_case(1, 256, 2, tmp)),
        ]
    cases = []
    for name, kind, batch, build in specs:
        fn = build()
        fn()  # warm-up (allocator, oneDNN primitives, mask caches)
        cases.append({"name": name, "kind": kind, "batch": batch, "fn": fn,
                      "flops": count_flops(fn), "times": []})
    matmul = []
    for _ in range(args.rounds):
        matmul.append(_matmul_rate())
        for c in cases:
            for _ in range(args.reps):
                t0 = time.perf_counter()
                c["fn"]()
                c["times"].append(time.perf_counter() - t0)
    rate = statistics.median(matmul)
    rows = []
    for c in cases:
        sec = statistics.median(c["times"])
        gflops = c["flops"] / sec / 1e9
        row = {"name": c["name"], "kind": c["kind"], "batch": c["batch"],
               "ms_per_step": sec * 1e3, "gflop_per_step": c["flops"] / 1e9,
               "gflop_per_s": gflops, "matmul_ratio": gflops / rate}
        if c["kind"] == "inference":
            row["slices_per_s"] = c["batch"] / sec
        rows.append(row)
        print(f"{c['name']:28s} {sec * 1e3:8.1f} ms  {c['flops'] / 1e9:7.2f} GFLOP  "
              f"{gflops:6.1f} GFLOP/s  {gflops / rate:5.1%} of matmul"
              + (f"  {row['slices_per_s']:.1f} slices/s" if "slices_per_s" in row else ""))
    prof_case = next(c for c in cases if c["name"].startswith("stage1 demo f=1"))
    profile_rows = _profile(prof_case["fn"])
    return {"threads": args.threads, "rounds": args.rounds, "reps": args.reps,
            "allocator": allocator,
            "matmul_gflop_per_s": rate, "torch": torch.__version__, "cases": rows,
            "profile": {"case": prof_case["name"], "top_ops": profile_rows}}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["cases"]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["name"] for r in rows]
    y = np.arange(len(rows))
    ax[0].barh(y, [r["ms_per_step"] for r in rows], color="#4477aa")
    ax[0].set_yticks(y, names, fontsize=8)
    ax[0].invert_yaxis()
    ax[0].set_xlabel("ms per step (median)")
    ax[1].barh(y, [100 * r["matmul_ratio"] for r in rows], color="#cc6677")
    ax[1].set_yticks(y, [""] * len(rows))
    ax[1].invert_yaxis()
    ax[1].axvline(50, color="k", ls="--", lw=1, label="target 50 %")
    ax[1].set_xlabel(f"% of a 1024² matmul ({result['matmul_gflop_per_s']:.0f} GFLOP/s)")
    ax[1].legend(loc="lower right")
    fig.suptitle(f"PGASR step efficiency, {result['threads']} CPU threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="one round, demo cases only")
    p.add_argument("--default-allocator", action="store_true",
                   help="leave glibc malloc as it is (pgasr.runtime.tune_allocator not called)")
    p.add_argument("--out", type=Path, default=OUT / "step_efficiency.json")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
    result = run(args)
    from pgasr.provenance import atomic_write_text

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
