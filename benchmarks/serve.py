"""Serve latency: HTTP requests through Ray Serve vs direct ``Predictor`` calls, same run.

Workloads (same model, same torch thread count in the replica and in this process):

* ``slice``  -- ``POST /v1/sr/slice`` with one (size x size) .npy slice per request, sent
  sequentially (concurrency 1) and by ``--concurrency`` client threads (slices of concurrent
  requests share ``@serve.batch`` batches). Direct baselines: ``predict_triplets`` on one
  slice (batch 1), and on ``--concurrency`` slices at once (what perfect batching buys).
* ``volume`` -- ``POST /v1/sr`` with a (size x size x slices) .nii.gz, sequentially. Direct
  baseline: ``Predictor.predict_image`` on the same image (no parse, no gzip).

p50/p95 latency per request in ms; throughput in slices/s. Without ``--checkpoint`` a tiny
randomly initialised stage-2 model is used (the numbers then measure the service overhead
around a small model, not the paper model). The machine's load average is recorded because
the CPU may be shared.

Writes ``benchmarks/results/serve.json`` and ``serve.png``.

Usage::

    python benchmarks/serve.py                       # tiny model, CPU
    python benchmarks/serve.py --checkpoint runs/paper/stage2 --size 128 --gpus 1
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pgasr.client import Client  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(lat_s: list[float], slices_per_req: int = 1, wall_s: float | None = None) -> dict:
    ms = [x * 1000 for x in lat_s]
    wall = wall_s if wall_s is not None else sum(lat_s)
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 2), "p95_ms": round(pct(ms, 95), 2),
            "mean_ms": round(statistics.fmean(ms), 2),
            "slices_per_s": round(len(ms) * slices_per_req / wall, 2)}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="stage-2 checkpoint (default: tiny random)")
    ap.add_argument("--size", type=int, default=64, help="LR in-plane size (pixels)")
    ap.add_argument("--slices", type=int, default=16, help="slices per volume")
    ap.add_argument("--slice-requests", type=int, default=48)
    ap.add_argument("--volume-requests", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--cpus", type=float, default=1.0, help="serve.cpus_per_replica")
    ap.add_argument("--gpus", type=float, default=0.0, help="serve.gpus_per_replica")
    ap.add_argument("--port", type=int, default=8405)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    a = ap.parse_args()

    import nibabel as nib
    import ray
    import torch
    from ray import serve

    from pgasr.data.ixi import image_to_bytes
    from pgasr.inference import Predictor
    from serve.app import build_app
    from serve_fixtures import make_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="pgasr-bench-serve-"))
    ckpt = a.checkpoint or str(make_tiny_checkpoint(tmp / "stage2"))
    key = secrets.token_hex(32)
    (tmp / "keys").write_text(key)
    (tmp / "keys").chmod(0o600)
    conc = a.concurrency
    overrides = [f"serve.checkpoint={ckpt}", f"serve.api_keys_file={tmp / 'keys'}",
                 "serve.api_keys_env=", "serve.min_replicas=1", "serve.max_replicas=1",
                 f"serve.cpus_per_replica={a.cpus}", f"serve.gpus_per_replica={a.gpus}",
                 f"serve.max_ongoing_requests={max(8, conc)}", f"serve.max_batch_size={conc}",
                 f"serve.max_slice_pixels={a.size * a.size}"]
    app = build_app({"overrides": overrides})

    threads = max(1, int(a.cpus))
    torch.set_num_threads(threads)
    device = "cuda" if a.gpus > 0 and torch.cuda.is_available() else "cpu"
    pred = Predictor.from_checkpoint(ckpt, device=device, batch_size=conc)
    scale = pred.scales[0]
    rng = np.random.default_rng(0)

    def make_slice():
        return (rng.random((a.size, a.size)) * 500 + 50).astype(np.float32)

    slices = [make_slice() for _ in range(a.slice_requests)]
    vol = (rng.random((a.size, a.size, a.slices)) * 500 + 50).astype(np.float32)
    img = nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0]))
    vol_bytes = image_to_bytes(img)

    from pgasr.inference import normalise_volume
    from serve.app import decode_nifti

    def trip(s):
        z, _, _ = normalise_volume(np.stack([s, s, s], axis=2), pred.cfg.data.head_threshold)
        return np.moveaxis(z, 2, 0)

    def direct_vol_io():
        out = pred.predict_image(decode_nifti(vol_bytes, 10**9), scale)
        image_to_bytes(out)

    ray.init(num_cpus=max(2, int(a.cpus) + 1), num_gpus=int(a.gpus > 0) or None,
             include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}})
    load_before = os.getloadavg()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": a.port})
        t0 = time.perf_counter()
        serve.run(app, name="pgasr", route_prefix="/", blocking=False)
        deploy_s = time.perf_counter() - t0
        c = Client(f"http://127.0.0.1:{a.port}", key, timeout=600)
        # warm-up both paths
        pred.predict_triplets(trip(slices[0])[None], scale)
        pred.predict_image(img, scale)
        c.sr_slice(slices[0], scale)
        c.sr_volume(vol_bytes, scale)
        # Paired measurements (direct, then HTTP, per item) so that both see the same load
        # on a shared machine.
        direct_slice, http_slice = [], []
        for s in slices:
            direct_slice.append(timed(lambda s=s: pred.predict_triplets(trip(s)[None], scale)))
            http_slice.append(timed(lambda s=s: c.sr_slice(s, scale)))

        def one(s):
            return timed(lambda: c.sr_slice(s, scale))

        direct_batch, http_conc, http_conc_wall = [], [], 0.0
        for r in range(0, len(slices) - conc + 1, conc):
            group = slices[r : r + conc]
            batch = np.stack([trip(s) for s in group])
            direct_batch.append(timed(lambda: pred.predict_triplets(batch, scale)))
            t0 = time.perf_counter()
            with ThreadPoolExecutor(conc) as ex:
                http_conc += list(ex.map(one, group))
            http_conc_wall += time.perf_counter() - t0
        ready = c.ready()
        direct_vol, direct_vol_full, http_vol = [], [], []
        for _ in range(a.volume_requests):
            direct_vol.append(timed(lambda: pred.predict_image(img, scale)))
            direct_vol_full.append(timed(direct_vol_io))
            http_vol.append(timed(lambda: gzip.decompress(c.sr_volume(vol_bytes, scale))))
    finally:
        serve.shutdown()
        ray.shutdown()

    res = {
        "config": {**vars(a), "checkpoint": a.checkpoint or "tiny random (tests/serve_fixtures.py)",
                   "scale": scale, "torch_threads": threads, "device": str(pred.device),
                   "volume_bytes": len(vol_bytes)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "torch": torch.__version__, "ray": ray.__version__},
        "deploy_s": round(deploy_s, 2),
        "slice": {
            "direct_batch1": summary(direct_slice),
            f"direct_batch{conc}": summary(direct_batch, slices_per_req=conc),
            # per-request latency of concurrent clients; slices/s over the rounds' wall time
            "http_sequential": summary(http_slice),
            f"http_concurrent{conc}": summary(http_conc, wall_s=http_conc_wall),
            "max_batch_seen": ready["slice_batches"]["max_size"],
        },
        "volume": {
            "direct_predict_image": summary(direct_vol, slices_per_req=a.slices),
            "direct_with_parse_and_gzip": summary(direct_vol_full, slices_per_req=a.slices),
            "http": summary(http_vol, slices_per_req=a.slices),
        },
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(res, indent=2))
    plot(res, out / "serve.png")
    print(json.dumps({k: res[k] for k in ("slice", "volume", "deploy_s")}, indent=2))


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("slice", "volume")):
        rows = {k: v for k, v in res[key].items() if isinstance(v, dict)}
        names = list(rows)
        x = np.arange(len(names))
        ax.bar(x - 0.2, [rows[n]["p50_ms"] for n in names], 0.4, label="p50")
        ax.bar(x + 0.2, [rows[n]["p95_ms"] for n in names], 0.4, label="p95")
        ax.set_xticks(x, [n.replace("_", "\n", 1) for n in names], fontsize=8)
        ax.set_ylabel("latency per request (ms)")
        c = res["config"]
        title = (f"{key}: {c['size']}x{c['size']}" + (f"x{c['slices']}" if key == "volume" else "")
                 + f", x{c['scale']}, {c['device']}")
        ax.set_title(title)
        for i, n in enumerate(names):
            ax.text(i, rows[n]["p95_ms"], f"{rows[n]['slices_per_s']:.0f}/s", ha="center",
                    va="bottom", fontsize=7)
        ax.legend()
    fig.suptitle("PGASR over Ray Serve vs direct Predictor (labels: slices/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
