"""Prepare the dataset on the cluster: ``python jobs/prepare.py --config configs/tiny.yaml``.

Runs :func:`pgasr.data.prepare.prepare` as one Ray task (reading IXI or building the
synthetic cohort, writing Parquet triplet shards). The output path must be visible to the
workers that train later: a shared filesystem, or the head node in a single-node cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import init_ray, job_parser, load, run_job  # noqa: E402


def run_prepare(cfg, address=None, force: bool = False) -> dict:
    ray = init_ray(address, cfg)

    @ray.remote(num_cpus=1)
    def _prepare(cfg, force):
        from pgasr.data.prepare import prepare

        res = prepare(cfg, progress=False, force=force)
        return {"out_dir": str(res.out_dir), "rows": res.rows,
                "subjects": {k: len(v) for k, v in res.subjects.items()},
                "skipped": res.skipped, "reused": res.reused}

    out = ray.get(_prepare.remote(cfg, force))
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
