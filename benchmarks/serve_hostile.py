"""A long hostile run against a running PGASR service: resident memory and answers.

Deploys the tiny random model on a local Ray Serve (port ``--port``, the limits of
``tests/test_serve.py``'s ``_overrides``), warms it up, then sends ``--requests`` hostile
requests from ``--threads`` client threads, drawn from the test suite's own mutation
generator (``tests/test_serve.py::_mutations``: truncated / bit-flipped / wrong-dims / huge
headers, NaN/inf, random bytes, oversize, bad scales, missing keys, wrong types, .npy header
damage, negative/zero .npy dims, gzip member floods, short bodies over a bare socket,
float128/complex voxels, outputs over max_output_voxels). It records, per kind, the statuses
and latencies; the replica's RSS (psutil, pid from Ray's actor table) before, after every
round and its peak (sampled every 0.2 s); and whether the same replica still serves a valid
request at the end.

Writes ``benchmarks/results/serve_hostile.json``. Exit status 1 when any answer was not a
JSON 4xx (or a 200 for a header bit flip that left a valid image), or the replica changed.

Usage::

    python benchmarks/serve_hostile.py                  # 1000 requests, 4 threads
    python benchmarks/serve_hostile.py --requests 5000 --rounds 10
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


class RssSampler:
    """The peak resident memory of ``pid`` (MB), sampled every ``period_s`` in a thread."""

    def __init__(self, pid: int, period_s: float = 0.2):
        import psutil

        self.proc, self.period_s = psutil.Process(pid), period_s
        self.peak_mb = self.now_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now_mb(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak_mb = max(self.peak_mb, self.now_mb())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def make_sender(T, client, port: int):
    """``send((kind, path, body, headers)) -> (kind, status, seconds, problem)``; problem is
    "" for a JSON error answer or a 200, else what came back."""
    import httpx

    def send(req):
        kind, path, body, hdr = req
        t0 = time.perf_counter()
        try:
            if kind == "short_body":
                st, ctype, content = T._raw_post(path, body, hdr, port=port)
                ok = st == 200 or (ctype.startswith("application/json") and b'"error"' in content)
                problem = "" if ok else content[:200].decode(errors="replace")
                return kind, st, time.perf_counter() - t0, problem
            r = client.post(path, content=body, headers=hdr)
        except (httpx.HTTPError, OSError) as e:
            return kind, -1, time.perf_counter() - t0, repr(e)
        ok = r.status_code == 200 or T._is_json_error(r)
        return kind, r.status_code, time.perf_counter() - t0, "" if ok else r.text[:200]

    return send


def summarise(results: list[tuple]) -> dict:
    """Per kind: statuses and latency percentiles (ms)."""
    by_kind: dict[str, dict] = {}
    for kind in sorted({r[0] for r in results}):
        rs = [r for r in results if r[0] == kind]
        lat = [r[2] * 1000 for r in rs]
        by_kind[kind] = {"n": len(rs), "statuses": dict(collections.Counter(str(r[1]) for r in rs)),
                         "p50_ms": round(_pct(lat, 50), 1), "p95_ms": round(_pct(lat, 95), 1),
                         "max_ms": round(max(lat), 1)}
    return by_kind


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=4, help="RSS is recorded after each round")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--port", type=int, default=8411)
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_hostile.json"))
    a = ap.parse_args()

    import httpx
    import numpy as np
    import ray
    from ray import serve

    import test_serve as T  # the suite's mutations, limits and helpers
    from procutil import ray_init_kwargs
    from serve.app import build_app
    from serve_fixtures import make_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="pgasr-hostile-"))
    ckpt = make_tiny_checkpoint(tmp / "stage2")
    keys = tmp / "keys"
    keys.write_text(f"{T.KEY}\n{T.KEY2}\n")
    keys.chmod(0o600)
    overrides = T._overrides(ckpt, keys)
    ray.init(**ray_init_kwargs(num_cpus=4))
    url = f"http://127.0.0.1:{a.port}"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": a.port})
        serve.run(build_app({"config": None, "overrides": overrides}), name="pgasr",
                  route_prefix="/", blocking=False)
        with httpx.Client(base_url=url, timeout=60) as c:
            T.wait_ready(c, 180)
            replica = c.get("/readyz").json()["replica"]
            (pid,) = T._replica_pids("pgasr")
            send = make_sender(T, c, a.port)
            warm = T._mutations(random.Random(99))
            with ThreadPoolExecutor(a.threads) as ex:
                list(ex.map(send, [next(warm) for _ in range(100)]))
            valid = T._npy((np.random.default_rng(0).random((12, 10)) * 100).astype(np.float32))
            for _ in range(3):
                assert c.post("/v1/sr?scale=2", content=T.GZ, headers=T.H).status_code == 200
                assert c.post("/v1/sr/slice?scale=2", content=valid, headers=T.H).status_code == 200
            gen = T._mutations(random.Random(a.seed))
            per_round = -(-a.requests // a.rounds)
            results: list[tuple] = []
            rounds = []
            t0 = time.perf_counter()
            with RssSampler(pid) as rss:
                rss_before = rss.now_mb()
                while len(results) < a.requests:
                    batch = [next(gen) for _ in range(min(per_round, a.requests - len(results)))]
                    with ThreadPoolExecutor(a.threads) as ex:
                        results += list(ex.map(send, batch))
                    rounds.append({"requests": len(results), "rss_mb": round(rss.now_mb(), 1)})
                rss_after = rss.now_mb()
            wall = time.perf_counter() - t0
            final_ok = c.post("/v1/sr?scale=2", content=T.GZ, headers=T.H).status_code == 200
            same = (c.get("/readyz").json()["replica"] == replica
                    and T._replica_pids("pgasr") == [pid])
            healthy = c.get("/healthz").status_code == 200
    finally:
        serve.shutdown()
        ray.shutdown()

    bad = [r for r in results if r[3] or r[1] >= 500 or r[1] < 0
           or (r[1] == 200 and r[0] != "bitflip_header")]
    out = {
        "requests": len(results), "threads": a.threads, "seed": a.seed, "wall_s": round(wall, 1),
        "requests_per_s": round(len(results) / wall, 1),
        "replica_rss_mb": {"before": round(rss_before, 1), "after": round(rss_after, 1),
                           "peak": round(rss.peak_mb, 1), "growth": round(rss_after - rss_before, 1),
                           "rounds": rounds},
        "bad_answers": len(bad), "bad_examples": [list(map(str, r)) for r in bad[:10]],
        "statuses": dict(collections.Counter(str(r[1]) for r in results)),
        "by_kind": summarise(results),
        "same_replica_after": same, "healthy_after": healthy, "valid_request_after": final_ok,
        "latency_ms": {"p50": round(_pct([r[2] * 1000 for r in results], 50), 1),
                       "p95": round(_pct([r[2] * 1000 for r in results], 95), 1),
                       "mean": round(statistics.fmean(r[2] * 1000 for r in results), 1)},
        "limits": {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides
                   if o.split("=", 1)[0].startswith(("serve.max", "serve.body", "serve.request"))},
        "machine": {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "ray": ray.__version__},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("requests", "wall_s", "replica_rss_mb", "bad_answers",
                                           "statuses", "same_replica_after", "healthy_after")},
                     indent=2))
    print(f"wrote {a.out}")
    return 0 if not bad and same and healthy and final_ok else 1


if __name__ == "__main__":
    sys.exit(main())
