"""Prepare the dataset on the cluster: ``python jobs/prepare.py --config configs/tiny.yaml``.

Runs :func:`pgasr.data.prepare.prepare` with a distributed ingest: the driver lists the
source (names only), splits the subjects and checks the output path; then Ray Data runs
:func:`pgasr.data.prepare.ingest_volume` as one task per volume (``resources.prepare_cpus``
CPUs each) and writes the rows with ``write_parquet`` (partitioned by split, at least
``data.rows_per_shard`` rows per file) -- no row passes through the driver. Each task writes
its volumes' manifest entries (and a test volume's exported NIfTIs) into the temporary
prepared directory, which the driver turns into ``manifest.json`` and renames into place as
the local path does. A ``.tar`` source is a stream, not a set of files a task can open: it
is ingested by one task (:func:`pgasr.data.prepare.ingest_local`), and the job says so.

The prepared path and the source must be visible to every worker (a shared filesystem, or
the head node in a single-node cluster).
"""

import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import init_ray, job_parser, load, run_job  # noqa: E402

META_DIR = ".ingest"  # per-volume manifest entries, inside the temporary prepared dir
SPLIT_COL = "_split"  # the rows' split: the partition column of the write


def _ingest_batch(batch: dict, cfg, tmp: str) -> "pyarrow.Table":  # noqa: F821
    """One volume (a batch of one item) -> its rows as an Arrow table; its manifest entries
    (or its skip record) are written to ``tmp/.ingest/<volume>.json``."""
    import pyarrow as pa

    from pgasr.data import schema
    from pgasr.data.prepare import ingest_volume, rows_table
    from pgasr.data.sources import VolumeSource
    from pgasr.provenance import atomic_write_text

    tables = []
    for i in range(len(batch["volume"])):
        src = VolumeSource(str(batch["subject"][i]), str(batch["name"][i]),
                           str(batch["origin"][i]), volume=str(batch["volume"][i]),
                           contrast=str(batch["contrast"][i]), _path=Path(str(batch["path"][i])))
        variants, skipped = ingest_volume(cfg, src, str(batch["split"][i]), Path(tmp))
        record = {"skipped": skipped, "subjects": {r[schema.SUBJECT][0]: m for r, m in variants},
                  "rows": sum(len(r[schema.SUBJECT]) for r, _ in variants)}
        atomic_write_text(Path(tmp) / META_DIR / f"{src.volume}.json", json.dumps(record))
        for rows, _ in variants:
            t = rows_table(rows)
            tables.append(t.append_column(SPLIT_COL, pa.array([str(batch["split"][i])] * len(t))))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables)


def make_ray_ingest(cpus: float = 1.0):
    """An ``ingest`` for :func:`pgasr.data.prepare.prepare` that runs on the cluster."""

    def ingest(cfg, source, split_of, tmp, progress, total):
        import ray

        from pgasr.data import schema
        from pgasr.data.prepare import IngestResult, _sources, ingest_local, unique_sources

        listed = list(unique_sources(cfg, _sources(cfg, source, read=False), split_of))
        if any(src._path is None for src, _ in listed):
            print(f"prepare: {source} is a tar stream; ingesting it in one task", flush=True)
            task = ray.remote(num_cpus=cpus)(ingest_local)
            return ray.get(task.remote(cfg, source, split_of, tmp, False, total))
        skipped = [{"file": s.name, "reason": "duplicate volume"} for s, w in listed if w is None]
        items = [{"subject": s.subject, "volume": s.volume, "name": s.name, "origin": s.origin,
                  "contrast": s.contrast, "path": str(s._path), "split": w}
                 for s, w in listed if w is not None]
        if items:  # every volume of every split in one pipeline: as many tasks as CPUs allow
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map_batches(_ingest_batch, batch_size=1, batch_format="numpy",
                                fn_kwargs={"cfg": cfg, "tmp": str(tmp)}, num_cpus=cpus)
            ds.write_parquet(str(Path(tmp) / ".rows"), partition_cols=[SPLIT_COL],
                             min_rows_per_file=cfg.data.rows_per_shard)
        rows, shards = {}, {}
        for split in schema.SPLITS:
            out, part = Path(tmp) / split, Path(tmp) / ".rows" / f"{SPLIT_COL}={split}"
            if part.is_dir():
                os.replace(part, out)
            out.mkdir(parents=True, exist_ok=True)
            shards[split] = len(list(out.glob("*.parquet")))
        shutil.rmtree(Path(tmp) / ".rows", ignore_errors=True)
        subjects: dict = {}
        for f in sorted((Path(tmp) / META_DIR).glob("*.json")):
            rec = json.loads(f.read_text())
            subjects.update(rec["subjects"])
            if rec["skipped"]:
                skipped.append(rec["skipped"])
            split = next(iter(rec["subjects"].values()))["split"] if rec["subjects"] else None
            if split:
                rows[split] = rows.get(split, 0) + rec["rows"]
        shutil.rmtree(Path(tmp) / META_DIR, ignore_errors=True)
        return IngestResult(subjects, skipped, {s: rows.get(s, 0) for s in schema.SPLITS},
                            shards)

    return ingest


def run_prepare(cfg, address=None, force: bool = False) -> dict:
    init_ray(address, cfg)
    from pgasr.data.prepare import prepare

    res = prepare(cfg, progress=False, force=force,
                  ingest=make_ray_ingest(cfg.resources.prepare_cpus))
    out = {"out_dir": str(res.out_dir), "rows": res.rows,
           "subjects": {k: len(v) for k, v in res.subjects.items()},
           "skipped": res.skipped, "reused": res.reused}
    verb = "up to date" if out["reused"] else "prepared"
    print(f"{verb}: {out['out_dir']} rows={out['rows']} subjects={out['subjects']} "
          f"skipped={len(out['skipped'])}")
    return out


def main(args) -> int:
    run_prepare(load(args), args.address, force=args.force)
    return 0


if __name__ == "__main__":
    p = job_parser(__doc__)
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    run_job(main, p)
