"""Anatomical priors for prepared shards: ``python jobs/priors.py --config configs/tiny.yaml``.

Reads the prepared triplet shards of every split with Ray Data, computes the prior of each
HR slice and of each bicubic-upsampled LR slice per scale (paper Sec. 2.1) on an actor pool
(``resources.prior_actors`` actors, ``resources.gpus_per_prior_actor`` GPUs each, the prior
model loaded once per actor), and writes the shards with ``prior_*`` columns added to
``<data.prepared_dir>_priors`` (:func:`pgasr.data.schema.priors_dir`).

* Output rows keep the input order (``preserve_order``; the driver streams the ordered
  blocks into ``{split}/part-NNNNN.parquet`` of ``data.rows_per_shard`` rows -- Ray's own
  ``write_parquet`` does not keep row order inside a file, measured with Ray 2.60).
* The input is never modified; output is assembled in a temporary sibling directory and
  renamed into place, so a crashed run leaves the previous output intact.
* Neighbouring triplet rows share slices: the content-keyed prior cache
  (``prior.cache_dir``) makes each distinct slice's prior computed once, also across reruns.
* A row with NaN/inf slices is reported (log + ``priors.json``) and skipped, not fatal.
  Reports and cache counters travel in-band with the data, so they work on any cluster.
* A rerun on an unchanged input with the same prior settings is a no-op (``--force`` redoes).

Paths are resolved on the driver; with ``ray job submit --working-dir .`` the driver runs in
a copy of the repository, so pass absolute ``data.prepared_dir`` / ``prior.cache_dir``. On a
multi-node cluster the prepared shards and the cache must be on shared storage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import init_ray, job_parser, load, run_job  # noqa: E402
from pgasr.config import config_to_dict  # noqa: E402
from pgasr.data import schema  # noqa: E402
from pgasr.provenance import (  # noqa: E402
    PRIORS_MARKER, check_replaceable, replace_dir, temp_dir_for,
)

log = logging.getLogger("pgasr.jobs.priors")

SPLIT_COL = "_split"  # shard folder of the row
SKIP_COL = "_skip"  # "" or why the row was skipped
STATS_COL = "_stats"  # JSON cache counters of the batch (first row of each batch)
PRIORS_META = "priors.json"


class PriorActor:
    """Ray Data UDF: one prior backend (and cache) per actor, reused for every batch.

    Output of a batch: its rows with prior columns, then one row per skipped input row
    (zero priors, ``_skip`` = reason); ``_split`` from the shard's folder; ``_stats`` (JSON
    cache counters of this batch) on the first row. The driver strips the ``_`` columns.
    """

    def __init__(self, prior_cfg: dict, scales: list[int], cpus: float = 1.0):
        import torch

        from pgasr.priors import PriorConfig, cached_prior

        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # Oversubscribed intra-op threads make torch CPU inference erratic (measured 10x).
        torch.set_num_threads(max(1, int(cpus)))
        t0 = time.perf_counter()
        self.prior = cached_prior(PriorConfig(**prior_cfg))
        self.scales = list(scales)
        log.info("actor %d: %s prior ready in %.1fs", os.getpid(), self.prior.name,
                 time.perf_counter() - t0)

    def __call__(self, batch: dict):
        import numpy as np

        from pgasr.priors.shards import add_prior_columns, to_arrow

        # The split is the shard's folder.
        batch[SPLIT_COL] = np.array([Path(str(p)).parent.name for p in batch.pop("path")],
                                    dtype=object)
        before = self.prior.stats.as_dict()
        t0 = time.perf_counter()
        cols, skipped = add_prior_columns(batch, self.prior, self.scales)
        after = self.prior.stats.as_dict()
        stats = {k: after[k] - before[k] for k in after}
        stats["seconds"] = time.perf_counter() - t0
        n = len(cols[schema.HR])
        if skipped:
            keys = [(str(a), int(b)) for a, b in zip(batch[schema.SUBJECT], batch[schema.SLICE])]
            idx = [keys.index((s["subject"], s["slice"])) for s in skipped]
            for s in skipped:
                log.warning("skipped row %s", s)
            for k, v in cols.items():
                extra = (np.asarray(batch[k])[idx] if k in batch
                         else np.zeros((len(idx), *v.shape[1:]), v.dtype))
                cols[k] = np.concatenate([v, extra])
        reasons = [""] * n + [s["reason"] for s in skipped]
        cols[SKIP_COL] = np.array(reasons, dtype=object)
        cols[STATS_COL] = np.array([json.dumps(stats)] + [""] * (len(reasons) - 1), dtype=object)
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
        out_dir: output directory (default ``<prepared_dir>_priors``); replaced only when
            absent, empty, or earlier prior shards (with ``priors.json``).

    Returns:
        The ``priors.json`` content (``reused: True`` when nothing had to be done).

    Raises:
        pgasr.provenance.ForeignDirectoryError: ``out_dir`` holds other files.
    """
    from pgasr.priors import describe_prior, resolve_checkpoint

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
    # Resolve once on the driver (no model load): fails fast on a bad SAM config, announces
    # the fallback, and gives the identity the output is tagged with.
    desc = describe_prior(cfg.prior)
    # Actors get the *resolved* backend and absolute paths: their cwd and environment (e.g.
    # PGASR_SAM_CHECKPOINT) may differ from the driver's, and "auto" must not resolve twice.
    prior_cfg = config_to_dict(cfg.prior)
    prior_cfg["backend"] = desc["backend"]
    if desc["backend"] == "sam" and resolve_checkpoint(cfg.prior):
        prior_cfg["sam_checkpoint"] = str(Path(resolve_checkpoint(cfg.prior)).expanduser().resolve())
    if prior_cfg["cache"]:
        prior_cfg["cache_dir"] = str(Path(prior_cfg["cache_dir"]).expanduser().resolve())
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
    # Replace only an absent/empty dir or earlier prior shards (priors.json), checked before
    # any work; refuse anything else (ForeignDirectoryError, one line and exit 2 in the job).
    check_replaceable(out, PRIORS_MARKER)

    ray = init_ray(address, cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # blocks reach the driver in input order
    tmp = temp_dir_for(out)
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
            fn_constructor_kwargs={"prior_cfg": prior_cfg, "scales": scales, "cpus": 1.0},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.resources.prior_actors)),
            num_cpus=1.0,
            num_gpus=cfg.resources.gpus_per_prior_actor or None,
            batch_size=max(1, cfg.prior.batch_rows),
            batch_format="numpy",
        )
        summary = _write_shards(ds, tmp, rows_in, max(1, int(cfg.data.rows_per_shard)))
        for name in (schema.MANIFEST, schema.CONFIG):
            if (prepared / name).is_file():
                shutil.copy2(prepared / name, tmp / name)
        summary.update({"prior": desc, "scales": scales, "source": str(prepared),
                        "source_fingerprint": fingerprint, "seconds": time.perf_counter() - t0,
                        "reused": False})
        (tmp / PRIORS_META).write_text(json.dumps(summary, indent=2, default=str))
        replace_dir(tmp, out, PRIORS_MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    st = summary["cache"]
    print(f"priors: wrote {out} rows={summary['rows_out']} skipped={len(summary['skipped'])} "
          f"slices: requested={st['requested']} computed={st['computed']} cache_hits={st['hits']} "
          f"in {summary['seconds']:.1f}s", flush=True)
    return summary


def _write_shards(ds, root: Path, rows_in: dict[str, int], rows_per_shard: int) -> dict:
    """Stream the ordered output blocks into ``root/{split}/part-NNNNN.parquet``.

    Strips the helper columns, drops (and collects) skipped rows, sums the cache counters,
    and logs progress. Returns the summary (rows, skipped rows, cache counters).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    writers: dict[str, pq.ParquetWriter] = {}
    counts = {s: {"rows": 0, "in_file": 0, "files": 0} for s in rows_in}
    skipped: list[dict] = []
    stats = {"requested": 0, "unique": 0, "hits": 0, "computed": 0}
    busy, total, done, last_log = 0.0, sum(rows_in.values()), 0, time.perf_counter()

    def write(split: str, table) -> None:
        c = counts[split]
        while table.num_rows:
            if split not in writers or c["in_file"] >= rows_per_shard:
                if split in writers:
                    writers.pop(split).close()
                path = root / split / f"part-{c['files']:05d}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                writers[split] = pq.ParquetWriter(path, table.schema)
                c["files"] += 1
                c["in_file"] = 0
            take = min(table.num_rows, rows_per_shard - c["in_file"])
            writers[split].write_table(table.slice(0, take))
            c["in_file"] += take
            c["rows"] += take
            table = table.slice(take)

    try:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for js in block.column(STATS_COL).to_pylist():
                if js:
                    d = json.loads(js)
                    busy += d.pop("seconds", 0.0)
                    for k in stats:
                        stats[k] += int(d.get(k, 0))
            skip = block.column(SKIP_COL)
            bad = block.filter(pc.not_equal(skip, ""))
            for sub, sl, why in zip(bad.column(schema.SUBJECT).to_pylist(),
                                    bad.column(schema.SLICE).to_pylist(),
                                    bad.column(SKIP_COL).to_pylist()):
                skipped.append({"subject": sub, "slice": sl, "reason": why})
            good = block.filter(pc.equal(skip, ""))
            splits = good.column(SPLIT_COL)
            data = good.drop_columns([SPLIT_COL, SKIP_COL, STATS_COL])
            for split in pc.unique(splits).to_pylist():  # usually one per block
                write(split, data.filter(pc.equal(splits, split)))
            done += block.num_rows
            if time.perf_counter() - last_log > 10 or done == total:
                last_log = time.perf_counter()
                log.info("priors: %d/%d rows, %d slice priors computed, %d cache hits",
                         done, total, stats["computed"], stats["hits"])
    finally:
        for w in writers.values():
            w.close()
    rows_out = {s: c["rows"] for s, c in counts.items()}
    for s, n in rows_out.items():
        (root / s).mkdir(parents=True, exist_ok=True)
        if n == 0:
            log.warning("split %s: no rows left after skipping corrupt slices", s)
    return {"rows_in": rows_in, "rows_out": rows_out, "skipped": skipped,
            "skipped_count": len(skipped), "cache": stats,
            "files": {s: c["files"] for s, c in counts.items()},
            "actors": {"busy_seconds": busy}}


def main(args) -> int:
    run_priors(load(args), args.address, force=args.force, out_dir=args.out)
    return 0


if __name__ == "__main__":
    p = job_parser(__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="recompute even when up to date")
    p.add_argument("--out", default=None, help="output directory (default <prepared_dir>_priors)")
    run_job(main, p)
