"""Shared plumbing for the Ray entrypoints in ``jobs/``: one argument vocabulary, one way to
join (or start) a cluster, one way to fail.

Every job takes ``--config``, repeatable ``--set key=value`` overrides and ``--address``
(default: the cluster given by ``RAY_ADDRESS`` / ``ray job submit``, else a new local one
without a dashboard; ``--address auto`` joins a cluster already running on this machine).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

# Jobs run as scripts (``python jobs/x.py``) from the repo root or a Ray working dir: make the
# repo importable without installing it.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pgasr.config import ConfigError, RunConfig, load_config  # noqa: E402

log = logging.getLogger("pgasr.jobs")


def job_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config (configs/tiny.yaml, demo.yaml, paper.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address, e.g. auto or ray://host:10001 (default: "
                        "RAY_ADDRESS as set by `ray job submit`, else a new local cluster)")
    return p


def load(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def init_ray(address: str | None, cfg: RunConfig | None = None):
    """Connect to the cluster (or start a local one) once per process."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        n = (cfg.resources.local_num_cpus if cfg is not None else 0) or max(4, (os.cpu_count() or 2) + 2)
        # address="local": a fresh single-node cluster for this job (use --address auto to join
        # one that is already running on this machine).
        dash = bool(cfg.resources.local_dashboard) if cfg is not None else True
        ctx = ray.init(address="local", runtime_env=env, include_dashboard=dash,
                       dashboard_host="127.0.0.1", log_to_driver=True, num_cpus=n)
        if dash and getattr(ctx, "dashboard_url", None):
            print(f"Ray dashboard (this machine only): http://{ctx.dashboard_url}", flush=True)
    # Per-operator progress bars from inside train workers flood job logs; keep Ray Data quiet
    # and report progress from the training loop instead.
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def run_job(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser) -> None:
    """Parse args, run ``main``; user errors become one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser.parse_args()
    try:
        rc = main(args) or 0
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as e:
        if os.environ.get("PGASR_DEBUG"):
            raise
        print(f"{parser.prog}: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}",
              file=sys.stderr)
        rc = 2
    sys.exit(rc)
