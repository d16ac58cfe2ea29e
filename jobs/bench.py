"""`make bench` (paper Tables 1-3, Figs. 1/4) on a Ray cluster, for the paper budget:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/bench.py --config configs/paper.yaml \\
        --set data.prepared_dir=/shared/ixi/prepared --set run_dir=/shared/runs/paper \\
        --set bench.out_dir=/shared/bench/paper --set bench.report=/shared/bench/paper.md

The same code as ``pgasr report`` (pgasr/report.py): prepare in the driver, priors through
the priors job (actor pool), then every training run as a Ray task (``resources.cpus_per_worker`` CPUs, one GPU each when
``resources.use_gpu``): all stage-1 models in parallel, then every ablation-ladder row at
every scale for every seed, then the residual CNNs. Paths must be on storage every node
sees. Takes the same options as ``pgasr report`` plus ``--address``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import init_ray, run_job  # noqa: E402


def ray_map(ray, num_cpus: float, num_gpus: float):
    """A ``map_fn`` for :func:`pgasr.report.run_bench`: one Ray task per unit, results in
    submission order, ``on_done`` called as each finishes (progress lines in the job log)."""

    def map_fn(fn, argsets, on_done):
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)(fn)
        refs = [remote.remote(*a) for a in argsets]
        order = {r: i for i, r in enumerate(refs)}
        out = [None] * len(refs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = order[ready[0]]
            out[i] = ray.get(ready[0])
            on_done(out[i])
        return out

    return map_fn


def ray_priors(cfg, log=print) -> Path:
    """Prior columns through the priors job (Ray Data + actor pool, GPU actors when
    ``resources.gpus_per_prior_actor``), not in the driver: SAM over every slice of IXI."""
    from jobs.priors import run_priors
    from pgasr.data import schema

    run_priors(cfg)
    return schema.priors_dir(Path(cfg.data.prepared_dir).expanduser().resolve())


def main(args) -> int:
    from pgasr.report import load_bench_config, run

    cfg, _ = load_bench_config(args.config, args.overrides)  # fail on bad config before Ray
    if args.render_only:
        run(args)
        return 0
    ray = init_ray(args.address, cfg)
    r = cfg.resources
    run(args, map_fn=ray_map(ray, r.cpus_per_worker, 1 if r.use_gpu else 0),
        priors_fn=ray_priors)
    return 0


def build_parser():
    import argparse

    from pgasr.report import add_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS as set by `ray job submit`, "
                        "else a new local cluster)")
    return p


if __name__ == "__main__":
    run_job(main, build_parser())
