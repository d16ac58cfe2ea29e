"""Shared plumbing for the Ray entrypoints in ``jobs/``: one argument vocabulary, one way to
join (or start) a cluster, one way to fail.

Every job takes ``--config``, repeatable ``--set key=value`` overrides and ``--address``
(default: the cluster given by ``RAY_ADDRESS`` / ``ray job submit``, else a new local one
without a dashboard; ``--address auto`` joins a cluster already running on this machine).
The job logs whether it joined an existing cluster or started a local one; an address where
nothing answers (a stale ``RAY_ADDRESS`` or recorded address) is a one-line error, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
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


class RayConnectionError(ConnectionError):
    """The requested Ray cluster cannot be joined (e.g. a stale ``RAY_ADDRESS``, or the address
    ``ray start`` recorded for a cluster that is gone)."""


def _job_env() -> dict:
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}}


def ray_init_plan(address: str | None, cfg: RunConfig | None = None) -> tuple[dict, str | None]:
    """The ``ray.init`` keyword arguments for a job, and where a joined address came from.

    ``address`` (``--address``) wins, then ``RAY_ADDRESS`` (set by ``ray job submit``); with
    neither, a new local cluster is started with ``address="local"``, so Ray never falls back
    to an address it recorded earlier. Returns ``(kwargs, source)``; ``source`` is None for a
    new local cluster, else a phrase naming the setting the address came from.
    """
    env_address = os.environ.get("RAY_ADDRESS")
    target = address or env_address
    if target and target != "local":
        source = "--address" if address else "RAY_ADDRESS"
        if target == "auto":
            source += " auto: RAY_ADDRESS, else the cluster `ray start` recorded on this machine"
        return {"address": target, "runtime_env": _job_env(), "log_to_driver": True}, source
    n = (cfg.resources.local_num_cpus if cfg is not None else 0) or max(4, (os.cpu_count() or 2) + 2)
    dash = bool(cfg.resources.local_dashboard) if cfg is not None else True
    return {"address": "local", "runtime_env": _job_env(), "include_dashboard": dash,
            "dashboard_host": "127.0.0.1", "log_to_driver": True, "num_cpus": n}, None


def _join_error(address: str, source: str, why: str) -> RayConnectionError:
    return RayConnectionError(
        f"cannot join the Ray cluster at {address} (from {source}): {why}. If that cluster is "
        "gone (a stale RAY_ADDRESS, or the address `ray start` recorded under /tmp/ray), unset "
        "RAY_ADDRESS and pass no --address to start a local cluster for this job, or start "
        "the cluster again")


def _gcs_endpoint(address: str) -> tuple[str, int] | None:
    """The host and port ``ray.init(address)`` dials, resolved the way Ray resolves it (None
    when it is not a ``host:port``).

    Raises:
        ConnectionError: ``auto`` finds no cluster at all.
    """
    from ray._private import services

    if address.startswith("ray://"):
        hostport = address[len("ray://"):].split("/", 1)[0]
    else:
        hostport = services.canonicalize_bootstrap_address(address)
    parsed = services.parse_address(hostport or "")
    return (parsed[0], int(parsed[1])) if parsed else None


def _probe(address: str, source: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at the cluster's address: ``ray.init`` would retry a
    dead address for minutes before giving up."""
    try:
        endpoint = _gcs_endpoint(address)
    except ConnectionError as e:
        raise _join_error(address, source, str(e).split(". ")[0]) from None
    except Exception:  # noqa: BLE001 - an address this check cannot parse: ray.init judges
        return
    if endpoint is None:
        return
    try:
        socket.create_connection(endpoint, timeout=timeout_s).close()
    except OSError as e:
        raise _join_error(address, source, f"nothing answers at {endpoint[0]}:{endpoint[1]} "
                                           f"({e.strerror or e})") from None


def init_ray(address: str | None, cfg: RunConfig | None = None):
    """Connect to the cluster (or start a local one) once per process, and log which.

    Raises:
        RayConnectionError: the cluster named by ``address`` / ``RAY_ADDRESS`` cannot be
            joined (checked before ``ray.init``, which would retry a dead address for minutes).
    """
    import ray

    if ray.is_initialized():
        return ray
    kwargs, source = ray_init_plan(address, cfg)
    if source is None:
        ctx = ray.init(**kwargs)
        log.info("started a new local Ray cluster for this job (%d CPUs); pass --address "
                 "auto to join one already running on this machine", kwargs["num_cpus"])
        if kwargs["include_dashboard"] and getattr(ctx, "dashboard_url", None):
            print(f"Ray dashboard (this machine only): http://{ctx.dashboard_url}", flush=True)
    else:
        _probe(kwargs["address"], source)
        try:
            ctx = ray.init(**kwargs)
        except (ConnectionError, TimeoutError, RuntimeError) as e:
            raise _join_error(kwargs["address"], source, str(e).splitlines()[0]) from None
        info = getattr(ctx, "address_info", None) or {}
        log.info("joined the existing Ray cluster at %s (from %s)",
                 info.get("gcs_address") or kwargs["address"], source)
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
    except (ConfigError, ValueError, FileNotFoundError, KeyError, RayConnectionError) as e:
        if os.environ.get("PGASR_DEBUG"):
            raise
        print(f"{parser.prog}: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}",
              file=sys.stderr)
        rc = 2
    sys.exit(rc)
