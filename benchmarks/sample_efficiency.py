"""Sample efficiency: what PGASR's stage 2 learns per training batch, and what a batch costs.

At a fixed wall time, a model's quality is (batches it sees) x (what it learns per batch).
This benchmark separates the two for a trained stage-2 checkpoint:

* **Per batch.** The residual CNN (the yardstick of ``make demo`` and ``make bench``) trained
  on exactly the batches PGASR's stage 2 trains on (the checkpoint's ``stage2.batch_size`` x
  ``stage2.crop``^2 random crops of the same training split, same learning rate as the CNN's
  default) for as many steps as PGASR's stage 2 took, and for as many as stages 1 + 2 took;
  then the CNN with its own recipe (whole slices, batch 16, 8x the pixels of a 48^2 crop batch)
  for stage 2's step count. All are
  scored with PGASR and bicubic on the same test slices (per-slice HR range, the evaluate
  convention, data-consistency step included for PGASR as ``pgasr sr`` runs it).
* **Per step.** Median ms of one stage-2 optimisation step on such a batch (forward, backward,
  Adam) for the checkpoint's config and with its parts switched off one at a time
  (``L_align_s``'s neighbour passes, ``L_align_d``'s HR pass through Ê, the residual head and
  fidelity fusion), beside one CNN step on the same batch, in the same process.

Run (after ``make demo``)::

    .venv/bin/python benchmarks/sample_efficiency.py --checkpoint runs/demo/stage2

writes ``benchmarks/results/sample_efficiency.{json,png}`` (~10 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgasr.baseline import ResidualCNN, _centre, score_test_slices, train_baseline  # noqa: E402
from pgasr.checkpoint import load_checkpoint  # noqa: E402
from pgasr.config import apply_overrides  # noqa: E402
from pgasr.data import schema  # noqa: E402
from pgasr.data.batches import iter_batches, random_crop, read_split, stage2_batch  # noqa: E402
from pgasr.models import build_stage1, build_stage2  # noqa: E402
from pgasr.provenance import atomic_write_bytes, atomic_write_text  # noqa: E402
from pgasr.steps import stage2_step  # noqa: E402

OUT = ROOT / "benchmarks" / "results"

# stage-2 parts switched off one more at a time (config overrides), for the step-cost rows
ABLATIONS = [
    ("PGASR stage-2 step", []),
    ("without L_align_s (neighbour passes)", ["stage2.align_s=false"]),
    ("and without L_align_d (HR through Ê)", ["stage2.align_s=false", "stage2.align_d=false"]),
    ("and without residual head, fusion", ["stage2.align_s=false", "stage2.align_d=false",
                                           "stage2.residual_head=off", "stage2.fidelity=0"]),
]


def _batches(train, cfg, rng, seed: int = 0):
    """The stage-2 training batches (rows, cropped) in the training loop's order."""
    sc = cfg.stage2
    for epoch in range(10**6):
        for rows in iter_batches(train, sc.batch_size, shuffle=True, seed=seed * 7919 + epoch,
                                 drop_last=True):
            yield random_crop(rows, sc.crop, rng) if sc.crop else rows


def step_costs(ck, train, steps: int = 10) -> dict[str, float]:
    """Median ms per optimisation step: stage 2 as configured and with parts off, and the CNN."""
    s1 = load_checkpoint(ck.meta["stage1_checkpoint"])
    scale = ck.cfg.stage2.scale
    out = {}
    for name, sets in ABLATIONS:
        cfg = apply_overrides(ck.cfg, sets)
        stage1, _ = build_stage1(s1.cfg)
        stage1.load_state_dict(s1.state_dicts["model"])
        model = build_stage2(cfg, stage1).train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-5)
        it, times = _batches(train, cfg, np.random.default_rng(0)), []
        for _ in range(steps + 2):
            batch = stage2_batch(next(it), scale, cfg.model.acg)
            t0 = time.perf_counter()
            loss = stage2_step(model, batch, cfg).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[name] = 1000 * float(np.median(times[2:]))
    cnn = ResidualCNN()
    opt = torch.optim.Adam(cnn.parameters(), 1e-5)
    it, times = _batches(train, ck.cfg, np.random.default_rng(0)), []
    for _ in range(steps + 2):
        lr_up, hr = _centre(next(it), scale)
        t0 = time.perf_counter()
        loss = (cnn(lr_up) - hr).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    out["residual CNN step"] = 1000 * float(np.median(times[2:]))
    return out


def test_psnr(ck_path: str, test, scale: int, cnns: dict) -> dict[str, float]:
    """Mean test PSNR (per-slice HR range) of bicubic, PGASR (as ``pgasr sr`` runs it) and
    each CNN, on the same slices (:func:`pgasr.baseline.score_test_slices`)."""
    scores = score_test_slices(ck_path, test, scale, cnns)["psnr"]
    return {"bicubic": scores["bicubic"], "PGASR": scores["pgasr"],
            **{k: scores[k] for k in cnns}}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    names = list(res["test_psnr"])
    vals = [res["test_psnr"][n] for n in names]
    colors = ["0.6" if n == "bicubic" else "C3" if n == "PGASR" else "C0" for n in names]
    a.barh(names[::-1], vals[::-1], color=colors[::-1])
    lo = min(vals) - 0.5
    a.set_xlim(lo, max(vals) + 0.6)
    for y, v in enumerate(vals[::-1]):
        a.text(v + 0.05, y, f"{v:.2f}", va="center", fontsize=8)
    a.set_xlabel(f"test PSNR, dB (x{res['scale']}, {res['test_slices']} slices)")
    a.set_title("what each model learned (CNN rows: training batches and steps)", fontsize=9)
    cost = res["ms_per_step"]
    b.barh(list(cost)[::-1], list(cost.values())[::-1], color="C2")
    for y, v in enumerate(list(cost.values())[::-1]):
        b.text(v + 3, y, f"{v:.0f}", va="center", fontsize=8)
    b.set_xlabel(f"ms per optimisation step ({res['batch']})")
    b.set_title("what a step costs (same process, same batches)", fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="stage-2 checkpoint (runs/demo/stage2)")
    p.add_argument("--data", help="prepared data (default: the checkpoint's training data)")
    p.add_argument("--seed", type=int, default=0, help="the CNNs' seed")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    try:
        ck = load_checkpoint(a.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        print(f"sample_efficiency: error: {e}", file=sys.stderr)
        return 2
    if ck.stage != 2 or "stage1_checkpoint" not in ck.meta:
        print(f"sample_efficiency: error: {a.checkpoint} is not a stage-2 checkpoint with its "
              f"stage-1 recorded", file=sys.stderr)
        return 2
    data = a.data or ck.meta.get("data_dir") or ck.cfg.data.prepared_dir
    s1 = load_checkpoint(ck.meta["stage1_checkpoint"])
    sc, scale = ck.cfg.stage2, ck.cfg.stage2.scale
    n2 = int(ck.meta.get("metrics", {}).get("step") or 0)
    n1 = int(s1.meta.get("metrics", {}).get("step") or 0)
    if not n2 or not n1:
        print("sample_efficiency: error: the checkpoints do not record their step counts "
              "(meta.json metrics.step)", file=sys.stderr)
        return 2
    cols = [schema.HR, schema.lr_column(scale), schema.lr_norm_column(scale)]
    train, test = read_split(data, "train", cols), read_split(data, "test")
    t_all = time.perf_counter()
    print(f"step costs ({sc.batch_size} x {sc.crop or 'whole'}^2 crops) ...", flush=True)
    costs = step_costs(ck, read_split(data, "train"))
    cnns, runs = {}, {}
    crops = f"{sc.batch_size} x {sc.crop}^2 crops" if sc.crop else f"{sc.batch_size} slices"
    for label, crop, bs, steps in [(crops, sc.crop, sc.batch_size, n2),
                                   (crops, sc.crop, sc.batch_size, n1 + n2),
                                   ("16 whole slices", 0, 16, n2)]:
        name = f"CNN, {steps} steps of {label}"
        print(f"training {name} ...", flush=True)
        m, info = train_baseline(train, scale, epochs=10**6, batch_size=bs, seed=a.seed,
                                 max_steps=steps, crop=crop)
        cnns[name], runs[name] = m.eval(), info
    res = {
        "checkpoint": str(a.checkpoint), "data": str(data), "scale": scale, "seed": a.seed,
        "stage1_steps": n1, "stage2_steps": n2,
        "batch": crops,
        "test_slices": int(len(test[schema.HR])),
        "ms_per_step": costs,
        "cnn_runs": runs,
        "test_psnr": test_psnr(a.checkpoint, test, scale, cnns),
        "torch_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t_all,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sample_efficiency.json", json.dumps(res, indent=1))
    plot(res, out / "sample_efficiency.png")
    w = max(map(len, res["test_psnr"]))
    for k, v in res["test_psnr"].items():
        print(f"  {k:<{w}}  {v:6.2f} dB")
    for k, v in costs.items():
        print(f"  {k:<{w}}  {v:6.0f} ms/step")
    print(f"wrote {out / 'sample_efficiency.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
