"""Anatomical priors for prepared shards: ``python jobs/priors.py --config configs/tiny.yaml``.

Reads the prepared triplet shards of every split with Ray Data, computes the prior of each
HR slice and of each bicubic-upsampled LR slice per scale (paper Sec. 2.1) on an actor pool
(``resources.prior_actors`` actors, ``resources.gpus_per_prior_actor`` GPUs each, the prior
model loaded once per actor), and writes the shards with ``prior_*`` columns added to
``<data.prepared_dir>_priors`` (:func:`pgasr.data.schema.priors_dir`).

* The input is never modified; output is assembled in a temporary sibling directory and
  renamed into place, so a crashed run leaves the previous output intact.
* Neighbouring triplet rows share slices: the content-keyed prior cache
  (``prior.cache_dir``) makes each distinct slice's prior computed once, also across reruns.
* A row with NaN/inf slices is reported (log + ``priors.json``) and skipped, not fatal.
* A rerun on an unchanged input with the same prior settings is a no-op (``--force`` redoes).

Paths are resolved on the driver; with ``ray job submit --working-dir .`` the driver runs in
a copy of the repository, so pass absolute ``data.prepared_dir`` / ``prior.cache_dir``.
Reports of skipped rows and cache counters are gathered through the filesystem (the output
directory), so on a multi-node cluster use shared storage, as for the shards themselves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import init_ray, job_parser, load, run_job  # noqa: E402
from pgasr.config import config_to_dict  # noqa: E402
from pgasr.data import schema  # noqa: E402

log = logging.getLogger("pgasr.jobs.priors")

SPLIT_COL = "_split"
PRIORS_META = "priors.json"


class PriorActor:
    """Ray Data UDF: one prior backend (and cache) per actor, reused for every batch."""

    def __init__(self, prior_cfg: dict, scales: list[int], report_dir: str, cpus: float = 1.0):
        import torch

        from pgasr.priors import PriorConfig, cached_prior

        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # Oversubscribed intra-op threads make torch CPU inference erratic (measured 10x).
        torch.set_num_threads(max(1, int(cpus)))
        self.prior = cached_prior(PriorConfig(**prior_cfg))
        self.scales = list(scales)
        self.report = Path(report_dir) / f"actor-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self.report.parent.mkdir(parents=True, exist_ok=True)
        self.batches = 0

    def __call__(self, batch: dict):
        import numpy as np

        from pgasr.priors.shards import add_prior_columns, to_arrow

        # The split is the shard's folder; it becomes the partition column of the output.
        batch[SPLIT_COL] = np.array([Path(str(p)).parent.name for p in batch.pop("path")],
                                    dtype=object)
        t0 = time.perf_counter()
        cols, skipped = add_prior_columns(batch, self.prior, self.scales)
        self.batches += 1
        for s in skipped:
            logging.getLogger("pgasr.jobs.priors").warning("skipped row %s", s)
        with self.report.open("a") as f:  # last line = this actor's running totals
            f.write(json.dumps({"skipped": skipped, "stats": self.prior.stats.as_dict(),
                                "batches": self.batches, "rows": len(batch[SPLIT_COL]),
                                "seconds": time.perf_counter() - t0}) + "\n")
        return to_arrow(cols)


def _split_files(prepared: Path) -> dict[str, list[str]]:
    return {s: sorted(str(p) for p in (prepared / s).glob("*.parquet")) for s in schema.SPLITS
            if (prepared / s).is_dir()}


def _rows(files: list[str]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _fingerprint(prepared: Path, files: dict[str, list[str]]) -> str:
    h = hashlib.sha256()
    man = prepared / schema.MANIFEST
    if man.is_file():
        h.update(man.read_bytes())
    for split, fs in sorted(files.items()):
        for f in fs:
            st = os.stat(f)
            h.update(f"{split}/{Path(f).name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _check_columns(files: dict[str, list[str]], scales: list[int]) -> None:
    import pyarrow.parquet as pq

    first = next(f for fs in files.values() for f in fs)
    names = set(pq.read_schema(first).names)
    need = [schema.HR, schema.SUBJECT, schema.SLICE, *(schema.lr_column(s) for s in scales)]
    missing = [c for c in need if c not in names]
    if missing:
        raise KeyError(f"{first} lacks column(s) {missing} (has {sorted(names)}); data.scales="
                       f"{scales} must match the prepare run")


def run_priors(cfg, address: str | None = None, force: bool = False,
               out_dir: str | None = None) -> dict:
    """Compute prior columns for every split of ``cfg.data.prepared_dir``.

    Args:
        cfg: :class:`pgasr.config.RunConfig` (``data``, ``prior``, ``resources``).
        address: Ray cluster address (None: ``RAY_ADDRESS`` / running / new local cluster).
        force: recompute even when the output is up to date.
        out_dir: output directory (default ``<prepared_dir>_priors``).

    Returns:
        The ``priors.json`` content (``reused: True`` when nothing had to be done).
    """
    from pgasr.priors import build_prior

    prepared = Path(cfg.data.prepared_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve() if out_dir else schema.priors_dir(prepared)
    if not prepared.is_dir():
        raise FileNotFoundError(
            f"prepared directory not found: {prepared} (run jobs/prepare.py first; with "
            "`ray job submit --working-dir`, pass an absolute data.prepared_dir)")
    files = {s: f for s, f in _split_files(prepared).items() if f}
    if not files:
        raise FileNotFoundError(f"no Parquet shards under {prepared}/{{{','.join(schema.SPLITS)}}}")
    scales = [int(s) for s in cfg.data.scales]
    _check_columns(files, scales)
    prior_cfg = config_to_dict(cfg.prior)
    if prior_cfg["cache"]:
        prior_cfg["cache_dir"] = str(Path(prior_cfg["cache_dir"]).expanduser().resolve())
    # Resolve once on the driver: fails fast on a bad SAM config, announces the fallback,
    # and gives the identity the output is tagged with.
    desc = build_prior(cfg.prior).describe()
    fingerprint = _fingerprint(prepared, files)
    meta_path = out / PRIORS_META
    if meta_path.is_file() and not force:
        old = json.loads(meta_path.read_text())
        same = (old.get("source_fingerprint") == fingerprint and old.get("scales") == scales
                and {k: old.get("prior", {}).get(k) for k in ("backend", "params")}
                == {k: desc.get(k) for k in ("backend", "params")})
        if same:
            print(f"priors up to date: {out} (backend={desc['backend']}; --force to redo)")
            return {**old, "reused": True}

    ray = init_ray(address, cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output rows in input order: reproducible
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    parts, reports, final = tmp / "parts", tmp / "reports", tmp / "final"
    t0 = time.perf_counter()
    try:
        all_files = [f for fs in files.values() for f in fs]
        rows_in = {s: _rows(fs) for s, fs in files.items()}
        print(f"priors: backend={desc['backend']} ({desc.get('fallback_reason') or 'as configured'})"
              f" splits={rows_in} scales={scales} actors<= {cfg.resources.prior_actors} "
              f"gpus/actor={cfg.resources.gpus_per_prior_actor}", flush=True)
        ds = ray.data.read_parquet(all_files, include_paths=True)
        ds = ds.map_batches(
            PriorActor,
            fn_constructor_kwargs={"prior_cfg": prior_cfg, "scales": scales,
                                   "report_dir": str(reports), "cpus": 1.0},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.resources.prior_actors)),
            num_cpus=1.0,
            num_gpus=cfg.resources.gpus_per_prior_actor or None,
            batch_size=max(1, cfg.prior.batch_rows),
            batch_format="numpy",
        )
        ds.write_parquet(str(parts), partition_cols=[SPLIT_COL])
        summary = _assemble(parts, reports, final, prepared, rows_in)
        summary.update({"prior": desc, "scales": scales, "source": str(prepared),
                        "source_fingerprint": fingerprint, "seconds": time.perf_counter() - t0,
                        "reused": False})
        (final / PRIORS_META).write_text(json.dumps(summary, indent=2, default=str))
        _replace_dir(final, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    st = summary["cache"]
    print(f"priors: wrote {out} rows={summary['rows_out']} skipped={len(summary['skipped'])} "
          f"slices: requested={st['requested']} computed={st['computed']} cache_hits={st['hits']} "
          f"in {summary['seconds']:.1f}s", flush=True)
    return summary


def _assemble(parts: Path, reports: Path, final: Path, prepared: Path, rows_in: dict) -> dict:
    """Move ``_split=<name>`` partitions to ``<name>/part-NNNNN.parquet``, copy the manifest
    and config, and gather the actors' reports."""
    import pyarrow.parquet as pq

    final.mkdir(parents=True)
    rows_out: dict[str, int] = {}
    for split in rows_in:
        dst = final / split
        dst.mkdir()
        src = sorted((parts / f"{SPLIT_COL}={split}").glob("*.parquet"))
        for i, f in enumerate(src):
            shutil.move(str(f), dst / f"part-{i:05d}.parquet")
        rows_out[split] = sum(pq.ParquetFile(f).metadata.num_rows for f in dst.glob("*.parquet"))
        if rows_out[split] == 0:
            log.warning("split %s: no rows left after skipping corrupt slices", split)
    for name in (schema.MANIFEST, schema.CONFIG):
        if (prepared / name).is_file():
            shutil.copy2(prepared / name, final / name)
    skipped, stats = [], {"requested": 0, "unique": 0, "hits": 0, "computed": 0}
    for rep in sorted(reports.glob("*.jsonl")) if reports.is_dir() else []:
        lines = [json.loads(x) for x in rep.read_text().splitlines() if x.strip()]
        for x in lines:
            skipped += x["skipped"]
        if lines:
            for k in stats:
                stats[k] += int(lines[-1]["stats"].get(k, 0))
    n_skip = sum(rows_in.values()) - sum(rows_out.values())
    if n_skip != len(skipped):  # reports not visible here (multi-node without shared FS)
        log.warning("%d row(s) skipped, %d reported to this node", n_skip, len(skipped))
    return {"rows_in": rows_in, "rows_out": rows_out, "skipped": skipped,
            "skipped_count": n_skip, "cache": stats}


def _replace_dir(new: Path, out: Path) -> None:
    """Put ``new`` at ``out``; an existing ``out`` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(args) -> int:
    run_priors(load(args), args.address, force=args.force, out_dir=args.out)
    return 0


if __name__ == "__main__":
    p = job_parser(__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="recompute even when up to date")
    p.add_argument("--out", default=None, help="output directory (default <prepared_dir>_priors)")
    run_job(main, p)
