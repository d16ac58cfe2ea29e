"""Prior throughput: the Ray pipeline vs a naive per-slice loop, same model, same parameters.

Workload: prepared-style triplet rows (HR + LR x2, ``--size`` pixels) built from
``pgasr.data.synth.synthesize_subject``. Every row needs 3 HR priors + 3 lr_up priors, so
the workload is ``rows x 6`` slice-priors; neighbouring rows share 2 of their 3 slices.

Modes, per backend (``sam`` = the tiny randomly initialised SAM on CPU, ``tissue``):

* ``naive``     -- per slice of every row: window -> stock ``SamAutomaticMaskGenerator
  .generate`` (fp32, plain attention) -> sum/max; one process. For ``tissue``: the backend
  called one slice at a time.
* ``batched``   -- :class:`pgasr.priors.SamPrior` in one process: encoder batches,
  precomputed embeddings, SDPA; no cache, no dedup (the library's own gain).
* ``pipeline``  -- ``jobs/priors.py:run_priors``: Ray Data + actor pool
  (``--actors``), content cache (fresh), Parquet in and out.
* ``pipeline_warm`` -- the same run again with ``--force`` (all priors from the cache).

slices/s = ``rows x 6 / wall seconds`` (slice-priors delivered). The pipeline is checked
against the naive loop (``agreement``: bitwise identical?, fraction of equal pixels, max
|diff| -- SDPA and batched encoding may flip a pixel whose logit is within float rounding of
the mask threshold). ``actors.busy_seconds`` is the time actors spent inside batches; the
rest of a pipeline run is fixed Ray overhead (worker start-up and imports, read, write).
Torch runs 1 thread per process; the machine's load average is recorded because the CPU may
be shared.

Writes ``benchmarks/results/priors.json`` and ``priors.png``.

Usage::

    python benchmarks/priors.py --subjects 4 --slices 24 --size 64 --actors 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgasr.config import RunConfig, SynthConfig  # noqa: E402
from pgasr.data import schema  # noqa: E402
from pgasr.priors import (  # noqa: E402
    PriorConfig, SamPrior, TissuePrior, sum_normalise, to_uint8_rgb, upsample_bicubic)
from pgasr.priors.sam import amg_kwargs, build_tiny_sam  # noqa: E402
from pgasr.priors.shards import tensor_array  # noqa: E402

# Tiny random SAM: thresholds off and NMS disabled so it yields masks at all (see docs).
SAM_PARAMS = dict(sam_model_type="tiny", points_per_side=8, points_per_batch=64,
                  pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


def make_rows(subjects: int, slices: int, size: int) -> dict[str, np.ndarray]:
    """Triplet rows of ``subjects`` synthetic T2 volumes (central ``slices`` axial slices)."""
    from pgasr.data.synth import synthesize_subject

    rows: dict[str, list] = {schema.SUBJECT: [], schema.SLICE: [], schema.HR: [], "lr_x2": []}
    for s in range(subjects):
        vol, _ = synthesize_subject(s, SynthConfig(size=size, slices=slices + 8))
        vol = np.moveaxis(vol, 2, 0)[4:4 + slices].astype(np.float32)  # (slices, size, size)
        vol = (vol - vol.mean()) / vol.std()
        for t in range(slices):
            hr = vol[[max(t - 1, 0), t, min(t + 1, slices - 1)]]
            rows[schema.SUBJECT].append(f"SYN{s:03d}")
            rows[schema.SLICE].append(t)
            rows[schema.HR].append(hr)
            rows["lr_x2"].append(hr.reshape(3, size // 2, 2, size // 2, 2).mean(axis=(2, 4)))
    return {k: np.asarray(v) if k != schema.SUBJECT else np.array(v, dtype=object)
            for k, v in rows.items()}


def write_prepared(rows: dict[str, np.ndarray], root: Path) -> Path:
    import pyarrow as pa

    (root / "train").mkdir(parents=True)
    (root / schema.MANIFEST).write_text(json.dumps({"benchmark": True}))
    pq.write_table(pa.table({
        schema.SUBJECT: pa.array(rows[schema.SUBJECT].tolist(), pa.string()),
        schema.SLICE: pa.array(rows[schema.SLICE], pa.int32()),
        schema.HR: tensor_array(rows[schema.HR]), "lr_x2": tensor_array(rows["lr_x2"]),
    }), root / "train" / "part-00000.parquet")
    return root


def all_slices(rows: dict[str, np.ndarray]) -> np.ndarray:
    """Every slice-prior the workload asks for, in row order: (rows * 6, H, W)."""
    hr = rows[schema.HR]
    n, t, H, W = hr.shape
    lr_up = upsample_bicubic(rows["lr_x2"].reshape(n * t, H // 2, W // 2), (H, W))
    return np.concatenate([hr.reshape(n * t, H, W), lr_up])


def naive_sam(slices: np.ndarray, cfg: PriorConfig) -> np.ndarray:
    from segment_anything import SamAutomaticMaskGenerator

    gen = SamAutomaticMaskGenerator(build_tiny_sam(cfg.tiny_sam_seed), **amg_kwargs(cfg))
    out = []
    for s in slices:
        img = to_uint8_rgb(s, cfg.window_low, cfg.window_high)
        anns = gen.generate(img)
        m = np.stack([a["segmentation"] for a in anns]) if anns else np.zeros((0, *s.shape), bool)
        out.append(sum_normalise(m, s.shape))
    return np.stack(out).astype(np.float16)


def read_priors(out_dir: Path) -> np.ndarray:
    t = pq.read_table(out_dir / "train")
    hr = t.column("prior_hr").combine_chunks().to_numpy_ndarray()
    lr = t.column("prior_lr_x2").combine_chunks().to_numpy_ndarray()
    n, k, H, W = hr.shape
    return np.concatenate([hr.reshape(n * k, H, W), lr.reshape(n * k, H, W)])


def agreement(got: np.ndarray, ref: np.ndarray) -> dict:
    """How close two prior stacks are: bitwise-identical?, fraction of equal pixels, max |diff|."""
    d = np.abs(got.astype(np.float32) - ref.astype(np.float32))
    return {"identical": bool(np.array_equal(got, ref)), "equal_pixels": float((d == 0).mean()),
            "max_abs_diff": float(d.max())}


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    r = fn(*a, **kw)
    return r, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()

    import ray

    from jobs.priors import run_priors

    rows = make_rows(args.subjects, args.slices, args.size)
    slices = all_slices(rows)
    n_rows, n_slices = len(rows[schema.HR]), len(slices)
    print(f"workload: {n_rows} rows -> {n_slices} slice-priors "
          f"({len({s.tobytes() for s in slices})} distinct), {args.size}x{args.size}")
    ray.init(address="local", num_cpus=max(4, args.actors + 2), object_store_memory=200_000_000,
             include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    results: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="pgasr_bench_priors_"))
    try:
        prepared = write_prepared(rows, tmp / "prepared")
        for backend in ("sam", "tissue"):
            pcfg = PriorConfig(backend=backend, cache_dir=str(tmp / f"cache_{backend}"),
                               batch_rows=8, **(SAM_PARAMS if backend == "sam" else {}))
            r: dict[str, dict] = {}
            if backend == "sam":
                ref, dt = timed(naive_sam, slices, pcfg)
                r["naive"] = {"seconds": dt}
                batched = SamPrior(pcfg, model=build_tiny_sam(pcfg.tiny_sam_seed))
                got, dt = timed(batched, slices)
                r["batched"] = {"seconds": dt, "agreement": agreement(got, ref)}
            else:
                tissue = TissuePrior(pcfg)
                ref, dt = timed(lambda x: np.concatenate([tissue(s[None]) for s in x]), slices)
                r["naive"] = {"seconds": dt}
            cfg = RunConfig()
            cfg.data.prepared_dir, cfg.data.scales = str(prepared), [2]
            cfg.resources.prior_actors, cfg.resources.gpus_per_prior_actor = args.actors, 0.0
            cfg.prior = pcfg
            out_dir = tmp / f"out_{backend}"
            summary, dt = timed(run_priors, cfg, out_dir=str(out_dir))
            r["pipeline"] = {"seconds": dt, "cache": summary["cache"], "actors": summary["actors"],
                             "agreement": agreement(read_priors(out_dir), ref)}
            summary, dt = timed(run_priors, cfg, force=True, out_dir=str(out_dir))
            r["pipeline_warm"] = {"seconds": dt, "cache": summary["cache"],
                                  "actors": summary["actors"],
                                  "agreement": agreement(read_priors(out_dir), ref)}
            for v in r.values():
                v["slices_per_s"] = n_slices / v["seconds"]
            base = r["naive"]["slices_per_s"]
            for v in r.values():
                v["speedup_vs_naive"] = v["slices_per_s"] / base
            results[backend] = r
            print(backend, json.dumps({k: round(v["slices_per_s"], 2) for k, v in r.items()}))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "workload": {"rows": n_rows, "slice_priors": n_slices, "size": args.size,
                     "subjects": args.subjects, "slices_per_subject": args.slices,
                     "scales": [2], "actors": args.actors},
        "sam_params": SAM_PARAMS, "results": results,
        "env": {"torch_threads": 1, "cpu_count": os.cpu_count(),
                "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "python": platform.python_version(),
                "torch": torch.__version__, "ray": ray.__version__},
    }
    (out / "priors.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "priors.png", report["workload"])
    print(f"wrote {out / 'priors.json'} and priors.png")


def plot(results: dict, path: Path, workload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6))
    for ax, (backend, r) in zip(np.atleast_1d(axes), results.items()):
        names = list(r)
        vals = [r[k]["slices_per_s"] for k in names]
        colors = {"naive": "#999", "batched": "#6a9", "pipeline": "#37c", "pipeline_warm": "#139"}
        bars = ax.bar(names, vals, color=[colors[k] for k in names])
        ax.set_yscale("log")
        ax.set_ylabel("slice-priors / s (log)")
        ax.set_title(f"{backend}" + (" (tiny random SAM, CPU)" if backend == "sam" else ""))
        for b, k in zip(bars, names):
            ax.annotate(f"{r[k]['speedup_vs_naive']:.1f}x", (b.get_x() + b.get_width() / 2,
                        b.get_height()), ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"{workload['rows']} triplet rows, {workload['slice_priors']} slice-priors, "
                 f"{workload['size']}px, {workload['actors']} actors", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
