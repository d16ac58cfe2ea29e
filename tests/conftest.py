"""Shared fixtures. Ray is started once per test session (3-5 s) with logical CPUs and a small
object store; tests that need it take ``ray_session``. The session's cluster is always a new
local one (``procutil.ray_init_kwargs``: ``address="local"``), and ``RAY_ADDRESS`` is dropped
so that jobs the tests start as subprocesses never join the user's own cluster either."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.pop("RAY_ADDRESS", None)
# MLflow runs of tests that track go to a throw-away store, never to the user's server or to an
# mlflow.db in the checkout (the test presets turn tracking off; tests that track set a URI)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp(prefix='pgasr-mlflow-')}/mlflow.db"
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from procutil import ray_init_kwargs

    if not ray.is_initialized():
        ray.init(**ray_init_kwargs(num_cpus=4))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def job_head():
    """One local Ray head with the job API (token auth, 127.0.0.1, ports away from the
    session cluster and Ray's worker range), shared by the ``ray job submit`` tests and
    stopped by its own process session at the end: starting and draining a head costs
    ~25 s each time."""
    from procutil import local_head

    with local_head(6391, 8266) as h:
        yield h


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
