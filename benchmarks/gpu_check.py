"""The GPU check: what a lent GPU machine should measure, in one short run (<= 8 min).

Sections (each timed and recorded on its own; an error in one is recorded and the rest run):

* ``pytest -m gpu``: the CUDA tests (bf16 + SDPA SAM prior agreement, ...).
* paper-width stage-1 and stage-2 training steps (``configs/paper.yaml`` model, f = 1) in fp32
  and bf16 autocast: ms/step, counted FLOPs (``FlopCounterMode``), achieved TFLOP/s and MFU
  against the GPU's dense bf16 peak (when the device is one this script knows);
* ``torch.compile`` of the stage-1 step: compile time and compiled ms/step;
* the SAM prior (tiny randomly initialised SAM, the path Ray's prior actors run) on CUDA:
  slices/s at 256^2;
* ``Predictor`` (random-weight paper-width checkpoint, tissue prior, bf16) slices/s at 256^2.

Writes ``benchmarks/results/gpu.json``. Without CUDA it says so and exits 2, unless
``--device cpu --smoke`` (tiny sizes: a check that the script itself runs; its
torch.compile section takes minutes on CPU).

Usage::

    bash benchmarks/gpu_check.sh                       # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.step_efficiency import (  # noqa: E402
    count_flops,
    random_predictor,
    stage1_step,
    stage2_step,
)
from pgasr.config import load_config  # noqa: E402
from pgasr.models import build_stage1  # noqa: E402
from pgasr.steps import make_stage1_optimizers, stage1_update  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "gpu.json"
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
SMOKE_MODEL = ["model.channels=[8,8,8,8]", "model.n_z=8", "model.decoder_channels=8",
               "model.window_size=4", "model.num_heads=2", "model.dat_depth=1",
               "model.codebook_size=16", "model.disc_channels=8"]


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def _cfg(args, *extra: str):
    sets = ["prior.backend=tissue", f"device={args.device}", *extra]
    if args.smoke:
        sets += SMOKE_MODEL
    return load_config(ROOT / "configs" / "paper.yaml", sets)


def _steps(args, device, peak) -> list[dict]:
    rows = []
    b, crop = (2, 32) if args.smoke else (args.batch, args.crop)
    for precision in ("fp32", "bf16"):
        bf = "true" if precision == "bf16" else "false"
        cfg = _cfg(args, f"stage1.bf16={bf}", f"stage2.bf16={bf}", "stage1.disc_start=0")
        s1 = stage1_step(cfg, b, crop, device, disc=True)
        s2 = stage2_step(cfg, b, crop, device)
        for name, fn in ((f"stage1 {precision}", s1), (f"stage2 {precision}", s2)):
            flops = count_flops(fn)
            sec = _time(fn, device, args.reps)
            row = {"name": name, "batch": b, "crop": crop, "ms_per_step": sec * 1e3,
                   "tflop_per_step": flops / 1e12, "tflop_per_s": flops / sec / 1e12}
            if peak:
                row["mfu"] = flops / sec / peak
            rows.append(row)
            print(f"{name:14s} {sec * 1e3:8.1f} ms  {flops / sec / 1e12:7.2f} TFLOP/s"
                  + (f"  MFU {row['mfu']:.1%}" if "mfu" in row else ""), flush=True)
    return rows


def _compile(args, device) -> dict:
    b, crop = (2, 32) if args.smoke else (args.batch, args.crop)
    cfg = _cfg(args, "stage1.bf16=true")
    torch.manual_seed(0)
    m, _ = build_stage1(cfg)
    m = m.to(device).train()
    opt, _ = make_stage1_optimizers(cfg, m, None)
    hr = torch.randn(b, 1, crop, crop, device=device)
    batch = {"hr": hr, "prior_hr": torch.rand_like(hr)}
    eager = _time(lambda: stage1_update(m, None, opt, None, batch, cfg, step=0), device, args.reps)
    compiled = torch.compile(m)
    t0 = time.perf_counter()
    stage1_update(compiled, None, opt, None, batch, cfg, step=0)
    _sync(device)
    compile_s = time.perf_counter() - t0
    sec = _time(lambda: stage1_update(compiled, None, opt, None, batch, cfg, step=0), device,
                args.reps)
    return {"eager_ms": eager * 1e3, "compiled_ms": sec * 1e3, "compile_s": compile_s,
            "speedup": eager / sec}


def _sam(args, device) -> dict:
    from pgasr.config import PriorConfig
    from pgasr.priors.sam import SamPrior, build_tiny_sam

    n, size = (2, 64) if args.smoke else (8, 256)
    cfg = PriorConfig(backend="sam", sam_model_type="tiny", points_per_side=8 if not args.smoke
                      else 4, points_per_batch=64, cache=False, device=str(device),
                      sam_precision="bf16" if device.type == "cuda" else "fp32")
    prior = SamPrior(cfg, model=build_tiny_sam(0))
    x = np.random.default_rng(0).random((n, size, size)).astype(np.float32)
    sec = _time(lambda: prior(x), device, 1 if args.smoke else 2)
    return {"slices": n, "size": size, "slices_per_s": n / sec, "weights": "random tiny SAM"}


def _predictor(args, device, tmp: Path) -> dict:
    n, size = (2, 32) if args.smoke else (8, 256)
    pred = random_predictor(_cfg(args), tmp / "ck", device, batch=n, bf16=device.type == "cuda")
    lr = np.random.default_rng(0).standard_normal((n, 3, size // 2, size // 2)).astype(np.float32)
    sec = _time(lambda: pred.predict_triplets(lr, 2), device, 1 if args.smoke else 3)
    return {"slices": n, "size": size, "slices_per_s": n / sec, "bf16": pred.bf16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a check of the script)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-pytest", action="store_true")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on the GPU machine "
              "(or --device cpu --smoke to check the script)", file=sys.stderr)
        return 2
    if args.smoke:
        args.reps = 1
    device = torch.device(args.device)
    peak = _peak(device)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else platform.processor() or "cpu", "torch": torch.__version__,
                    "peak_bf16_flops": peak, "smoke": args.smoke, "sections": {}}
    tmp = Path(tempfile.mkdtemp(prefix="pgasr-gpu-check-"))
    sections: list[tuple[str, Callable[[], object]]] = [
        ("steps", lambda: _steps(args, device, peak)),
        ("compile", lambda: _compile(args, device)),
        ("sam_prior", lambda: _sam(args, device)),
        ("predictor", lambda: _predictor(args, device, tmp)),
    ]
    if not args.skip_pytest:
        def gpu_tests():
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                                "no:cacheprovider", str(ROOT / "tests")], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
            return {"rc": r.returncode, "tail": (r.stdout + r.stderr)[-2000:]}
        sections.insert(0, ("pytest_gpu", gpu_tests))
    failed = 0
    for name, fn in sections:
        t0 = time.perf_counter()
        try:
            value = fn()
            result["sections"][name] = {"ok": True, "seconds": time.perf_counter() - t0,
                                        "result": value}
        except Exception as e:  # recorded; the other sections still run
            failed += 1
            result["sections"][name] = {"ok": False, "seconds": time.perf_counter() - t0,
                                        "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()[-3000:]}
            print(f"gpu_check: section {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
