"""Anatomical priors for prepared shards: ``python jobs/priors.py --config configs/tiny.yaml``.

Reads the prepared triplet shards of every split with Ray Data, computes the prior of each
HR slice and of each bicubic-upsampled LR slice per scale (paper Sec. 2.1) on an actor pool
(``resources.prior_actors`` actors, ``resources.gpus_per_prior_actor`` GPUs each, the prior
model loaded once per actor), and writes the shards with ``prior_*`` columns added to
``<data.prepared_dir>_priors`` (:func:`pgasr.data.schema.priors_dir`).

* The rows are written by Ray Data itself (``write_parquet`` into ``{split}/``, at least
  ``data.rows_per_shard`` rows per file): no row passes through the driver. Row order inside
  and across files is Ray's (consumers sort or shuffle); each actor reports its cache counters
  and skipped rows in a small JSON file that the driver sums into ``priors.json``.
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

SPLIT_COL = "_split"  # shard folder of the row (the partition column of the write)
PRIORS_META = "priors.json"
REPORTS = ".reports"  # per-batch JSON reports of the actors, inside the temporary output


class PriorActor:
    """Ray Data UDF: one prior backend (and cache) per actor, reused for every batch.

    Output of a batch: its good rows with prior columns and ``_split`` (the shard's folder);
    rows with NaN/inf slices are left out. The batch's cache counters, compute seconds and
    skipped rows go to ``report_dir/<uuid>.json``.
    """

    def __init__(self, prior_cfg: dict, scales: list[int], report_dir: str, cpus: float = 1.0):
        import torch

        from pgasr.priors import PriorConfig, cached_prior

        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # Oversubscribed intra-op threads make torch CPU inference erratic (measured 10x).
        torch.set_num_threads(max(1, int(cpus)))
        t0 = time.perf_counter()
        self.prior = cached_prior(PriorConfig(**prior_cfg))
        self.scales = list(scales)
        self.report_dir = Path(report_dir)
        log.info("actor %d: %s prior ready in %.1fs", os.getpid(), self.prior.name,
                 time.perf_counter() - t0)

    def __call__(self, batch: dict):
        import uuid

        import numpy as np

        from pgasr.priors.shards import add_prior_columns, to_arrow
        from pgasr.provenance import atomic_write_text

        splits = np.array([Path(str(p)).parent.name for p in batch.pop("path")], dtype=object)
        before = self.prior.stats.as_dict()
        t0 = time.perf_counter()
        cols, skipped = add_prior_columns(batch, self.prior, self.scales)
        after = self.prior.stats.as_dict()
        stats = {k: after[k] - before[k] for k in after}
        stats["seconds"] = time.perf_counter() - t0
        for s in skipped:
            log.warning("skipped row %s", s)
        bad = {(s["subject"], s["slice"]) for s in skipped}
        keep = [i for i, key in enumerate(zip(batch[schema.SUBJECT], batch[schema.SLICE]))
                if (str(key[0]), int(key[1])) not in bad]  # add_prior_columns' row order
        cols[SPLIT_COL] = splits[keep]
        atomic_write_text(self.report_dir / f"{uuid.uuid4().hex}.json",
                          json.dumps({"stats": stats, "skipped": skipped,
                                      "rows": {k: int((splits[keep] == k).sum())
                                               for k in set(splits[keep].tolist())}}))
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
    tmp = temp_dir_for(out)
    t0 = time.perf_counter()
    try:
        all_files = [f for fs in files.values() for f in fs]
        rows_in = {s: _rows(fs) for s, fs in files.items()}
        print(f"priors: backend={desc['backend']} ({desc.get('fallback_reason') or 'as configured'})"
              f" splits={rows_in} scales={scales} actors<= {cfg.resources.prior_actors} "
              f"gpus/actor={cfg.resources.gpus_per_prior_actor}", flush=True)
        (tmp / REPORTS).mkdir()
        ds = ray.data.read_parquet(all_files, include_paths=True)
        ds = ds.map_batches(
            PriorActor,
            fn_constructor_kwargs={"prior_cfg": prior_cfg, "scales": scales,
                                   "report_dir": str(tmp / REPORTS), "cpus": 1.0},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.resources.prior_actors)),
            num_cpus=1.0,
            num_gpus=cfg.resources.gpus_per_prior_actor or None,
            batch_size=max(1, cfg.prior.batch_rows),
            batch_format="numpy",
        )
        ds.write_parquet(str(tmp / ".rows"), partition_cols=[SPLIT_COL],
                         min_rows_per_file=max(1, int(cfg.data.rows_per_shard)))
        summary = _collect(tmp, rows_in)
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


def _collect(tmp: Path, rows_in: dict[str, int]) -> dict:
    """Move Ray's ``.rows/_split=<split>/`` folders to ``<split>/`` and sum the actors'
    reports into the summary (rows, skipped rows, cache counters, files per split)."""
    import pyarrow.parquet as pq

    for s in rows_in:
        part = tmp / ".rows" / f"{SPLIT_COL}={s}"
        if part.is_dir():
            os.replace(part, tmp / s)
        else:
            (tmp / s).mkdir()
    shutil.rmtree(tmp / ".rows", ignore_errors=True)
    skipped: list[dict] = []
    stats = {"requested": 0, "unique": 0, "hits": 0, "computed": 0}
    busy = 0.0
    for f in sorted((tmp / REPORTS).glob("*.json")):
        rep = json.loads(f.read_text())
        busy += rep["stats"].pop("seconds", 0.0)
        for k in stats:
            stats[k] += int(rep["stats"].get(k, 0))
        skipped += rep["skipped"]
    shutil.rmtree(tmp / REPORTS, ignore_errors=True)
    skipped.sort(key=lambda r: (str(r.get("subject")), int(r.get("slice", -1))))
    files = {s: sorted((tmp / s).glob("*.parquet")) for s in rows_in}
    rows_out = {s: sum(pq.ParquetFile(f).metadata.num_rows for f in fs) for s, fs in files.items()}
    for s, n in rows_out.items():
        if n == 0:
            log.warning("split %s: no rows left after skipping corrupt slices", s)
    log.info("priors: %d rows in, %d out, %d slice priors computed, %d cache hits",
             sum(rows_in.values()), sum(rows_out.values()), stats["computed"], stats["hits"])
    return {"rows_in": rows_in, "rows_out": rows_out, "skipped": skipped,
            "skipped_count": len(skipped), "cache": stats,
            "files": {s: len(fs) for s, fs in files.items()},
            "actors": {"busy_seconds": busy}}


def main(args) -> int:
    run_priors(load(args), args.address, force=args.force, out_dir=args.out)
    return 0


if __name__ == "__main__":
    p = job_parser(__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="recompute even when up to date")
    p.add_argument("--out", default=None, help="output directory (default <prepared_dir>_priors)")
    run_job(main, p)
