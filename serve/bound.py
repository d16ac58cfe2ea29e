"""``serve/config.yaml``'s application as a bound Serve ``Application``, for the Serve CLI
commands that need one rather than a builder and its args::

    export PGASR_API_KEYS=...                     # build_app refuses to start without a key
    serve build serve.bound:app                   # the config Serve would generate, with the
                                                  # deployments: block (replicas, resources)
    serve run serve.bound:app                     # the same as `serve run serve/config.yaml`

The args are read from ``serve/config.yaml`` (its first application), so both describe one
service; ``PGASR_SERVE_CHECKPOINT`` replaces ``serve.checkpoint`` (tests, other models).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from serve.app import build_app

CONFIG = Path(__file__).resolve().parent / "config.yaml"


def config_args(path: Path = CONFIG) -> dict:
    """``args`` of the first application in a Serve config file, ``serve.checkpoint`` replaced
    by ``$PGASR_SERVE_CHECKPOINT`` when that is set."""
    (first, *_) = yaml.safe_load(path.read_text())["applications"]
    args = dict(first.get("args") or {})
    ckpt = os.environ.get("PGASR_SERVE_CHECKPOINT")
    if ckpt:
        args["overrides"] = [o for o in args.get("overrides", [])
                             if not o.startswith("serve.checkpoint=")] + [f"serve.checkpoint={ckpt}"]
    return args


app = build_app(config_args())
