"""Ray Train overhead: the same stage-1 steps under TorchTrainer (1 and 2 workers) vs the plain
single-process loop, measured in one run (machines are shared and noisy: compare ratios).

Both paths call :func:`pgasr.training.fit` with the same config, data and step count; the
plain loop reads the shards into memory, the Ray path streams them with Ray Data. The step
time is the median per-epoch ``epoch_time_s / steps`` after the first (warm-up) epoch, so
Ray's start-up (workers, process group, dataset planning) is reported separately as
``wall_s``.

    python benchmarks/train_overhead.py [--epochs 4] [--size 64]

Writes ``benchmarks/results/train_overhead.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = ["model.channels=[16,16,32,32]", "model.n_z=16", "model.decoder_channels=32",
         "model.dat_depth=1", "model.disc_channels=16", "model.acg=false"]


def _cfg(tmp: Path, epochs: int, size: int, workers: int):
    from pgasr.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"synth.out_dir={tmp}/synth", f"synth.size={size}", f"data.size={size}",
        f"data.prepared_dir={tmp}/prepared", f"run_dir={tmp}/runs-{workers}",
        f"resources.storage_path={tmp}/ray-{workers}", f"resources.num_workers={workers}",
        "resources.cpus_per_worker=1", f"stage1.epochs={epochs}", "stage1.batch_size=4",
        "stage1.disc_start=0", "data.slices_per_volume=12", *MODEL])


def _step_time(history: list[dict]) -> float:
    per = [h["epoch_time_s"] / max(1, h["step"] - (history[i - 1]["step"] if i else 0))
           for i, h in enumerate(history)]
    return statistics.median(per[1:] if len(per) > 1 else per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--render-only", action="store_true",
                    help="redraw train_overhead.png from the existing JSON")
    args = ap.parse_args()
    if args.render_only:
        print(plot(json.loads((Path(args.out) / "train_overhead.json").read_text()), args.out))
        return

    import ray
    import torch

    from jobs.train_stage import run_stage
    from pgasr.checkpoint import load_checkpoint
    from pgasr.data.prepare import prepare
    from pgasr.training import train_local

    tmp = Path(tempfile.mkdtemp(prefix="pgasr-bench-"))
    cfg1 = _cfg(tmp, args.epochs, args.size, 1)
    prepare(cfg1, progress=False)
    torch.set_num_threads(1)  # a Ray worker with cpus_per_worker=1 runs one thread too

    t0 = time.perf_counter()
    plain = train_local(1, cfg1, cfg1.data.prepared_dir, tmp / "plain", progress=False)
    plain_wall = time.perf_counter() - t0

    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=200_000_000,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    results = {"plain": {"step_s": _step_time(plain.history), "wall_s": plain_wall,
                         "steps": plain.steps}}
    for workers in (1, 2):
        cfg = _cfg(tmp, args.epochs, args.size, workers)
        t0 = time.perf_counter()
        out = run_stage(1, cfg)
        wall = time.perf_counter() - t0
        ck = load_checkpoint(out)
        hist = json.loads((Path(cfg.run_dir) / "stage1.json").read_text())
        steps = ck.meta["step"]
        # per-epoch history is not kept by Ray's Result; use the checkpoint's last epoch time
        step_s = ck.meta["metrics"]["epoch_time_s"] / max(1, steps // args.epochs)
        results[f"ray_{workers}w"] = {"step_s": step_s, "wall_s": wall, "steps": steps,
                                      "metrics": hist["metrics"].get("train_l1")}
    ray.shutdown()

    base = results["plain"]["step_s"]
    summary = {
        "overhead_ratio_1w": results["ray_1w"]["step_s"] / base,
        "throughput_2w_vs_1w": (2 * results["ray_1w"]["step_s"]) / results["ray_2w"]["step_s"],
        "goal_overhead_ratio": 1.10,
    }
    report = {"config": {"epochs": args.epochs, "size": args.size, "batch": 4, "model": MODEL},
              "results": results, "summary": summary,
              "host": {"cpus": __import__("os").cpu_count(), "torch_threads": 1}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_overhead.json").write_text(json.dumps(report, indent=1))

    plot(report, out)
    print(json.dumps(summary, indent=1))


def plot(report: dict, out: Path) -> Path:
    """Training throughput in samples/s (global batch / step time) per setup: the plain loop,
    Ray Train with 1 and 2 workers, from the JSON report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, batch = report["results"], report["config"]["batch"]
    workers = {"plain": 1, "ray_1w": 1, "ray_2w": 2}
    labels = {"plain": "plain loop", "ray_1w": "Ray Train\n1 worker", "ray_2w": "Ray Train\n2 workers"}
    names = [n for n in workers if n in res]
    rate = [workers[n] * batch / res[n]["step_s"] for n in names]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([labels[n] for n in names], rate, color=["#777", "#36c", "#3a6"][:len(names)])
    for i, v in enumerate(rate):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("training samples / s")
    s = report["summary"]
    ax.set_title(f"stage-1 step, {report['config']['size']}² slices, batch {batch}/worker: Ray "
                 f"1 worker: {1 / s['overhead_ratio_1w']:.2f}x the plain loop's throughput", fontsize=8)
    fig.tight_layout()
    path = Path(out) / "train_overhead.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
