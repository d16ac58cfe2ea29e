"""Ingest throughput: volumes/s of ``pgasr prepare`` (one process) and of ``jobs/prepare.py``
(one Ray task per volume) with 1 and 2 tasks at a time, on the same NIfTI folder, in one run
(machines are shared and noisy: compare ratios).

A 2-CPU local Ray cluster runs the distributed ingest with ``resources.prepare_cpus`` 2 (one
task at a time) and 1 (two at a time); each variant prepares the same folder of synthetic
volumes (resampled from 0.8 mm to 1 mm, sliced, degraded at x2 and x4) into its own directory.

    python benchmarks/ingest.py [--volumes 8] [--size 200] [--repeats 2]

Writes ``benchmarks/results/ingest.json`` and ``.png``.
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
OUT = ROOT / "benchmarks" / "results"


def _cohort(d: Path, n: int, size: int) -> None:
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    d.mkdir(parents=True)
    for i in range(n):
        x, y, z = np.meshgrid(*[np.linspace(-1, 1, k) for k in (size, size, 48)], indexing="ij")
        head = (x**2 + y**2 + (0.8 * z) ** 2) < 0.7
        vol = head * (500 + 200 * np.sin(9 * x + i) * np.cos(7 * y)) + rng.normal(0, 5, head.shape)
        nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([0.8, 0.8, 3.0, 1.0])),
                 d / f"scan{i:03d}.nii.gz")


def _cfg(tmp: Path, name: str, cpus: float):
    from pgasr.config import load_config

    return load_config(None, [
        f"data.source={tmp / 'scans'}", f"data.prepared_dir={tmp / name}", "data.size=256",
        "data.slices_per_volume=32", "data.train_subjects=0.5", "data.val_subjects=0",
        "data.test_subjects=0.25", "data.scales=[2, 4]", f"resources.prepare_cpus={cpus}"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--volumes", type=int, default=8)
    p.add_argument("--size", type=int, default=200, help="in-plane matrix at 0.8 mm")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)

    import ray

    from jobs.prepare import run_prepare
    from pgasr.data.prepare import prepare

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    times: dict[str, list[float]] = {"local (1 process)": [], "Ray, 1 task at a time": [],
                                     "Ray, 2 tasks at a time": []}
    with tempfile.TemporaryDirectory(prefix="pgasr-ingest-") as t:
        tmp = Path(t)
        _cohort(tmp / "scans", a.volumes, a.size)
        for r in range(a.repeats):  # interleaved: machine noise hits every variant alike
            for label, cpus in (("local (1 process)", 0), ("Ray, 1 task at a time", 2.0),
                                ("Ray, 2 tasks at a time", 1.0)):
                cfg = _cfg(tmp, f"prep-{cpus}-{r}", cpus or 1.0)
                t0 = time.perf_counter()
                if cpus:
                    run_prepare(cfg)
                else:
                    prepare(cfg, progress=False)
                times[label].append(time.perf_counter() - t0)
                print(f"{label}: {times[label][-1]:.1f} s", flush=True)
    ray.shutdown()
    res = {"volumes": a.volumes, "size": a.size, "repeats": a.repeats,
           "seconds": times, "volumes_per_s": {k: a.volumes / statistics.median(v)
                                               for k, v in times.items()}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ingest.json").write_text(json.dumps(res, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(res["volumes_per_s"])
    ax.barh(names, [res["volumes_per_s"][k] for k in names], color="#4c72b0")
    ax.set_xlabel("volumes / s (median of repeats; higher is better)")
    ax.set_title(f"ingest of {a.volumes} volumes ({a.size}² at 0.8 mm -> 1 mm, x2 + x4)")
    fig.tight_layout()
    fig.savefig(OUT / "ingest.png", dpi=120)
    print(json.dumps(res["volumes_per_s"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
