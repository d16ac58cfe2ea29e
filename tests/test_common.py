"""How jobs (``jobs/common.py``) and the test fixture join or start a Ray cluster (issue #17).

No cluster is started here: ``ray.init`` is faked or must not be reached, and Ray's own
address resolution is asked what it would do.
"""

import logging
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import jobs.common as common  # noqa: E402


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture()
def fake_ray(monkeypatch):
    """``ray.init`` recorded (returning a context naming a GCS address), never run."""
    import ray

    calls: list[dict] = []

    class Ctx:
        address_info = {"gcs_address": "10.1.2.3:6379"}
        dashboard_url = None

    def init(**kw):
        calls.append(kw)
        return Ctx()

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    return calls


def test_fixture_starts_its_own_cluster_whatever_is_recorded(monkeypatch, tmp_path):
    """The session fixture's ``ray.init`` arguments make Ray start a new local cluster even
    with ``RAY_ADDRESS`` set and an address recorded by ``ray start`` (live or stale)."""
    from ray._private.services import canonicalize_bootstrap_address

    from procutil import ray_init_kwargs

    kw = ray_init_kwargs(num_cpus=4)
    assert kw["address"] == "local" and kw["num_cpus"] == 4
    (tmp_path / "ray_current_cluster").write_text("127.0.0.1:2")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert canonicalize_bootstrap_address(None, str(tmp_path)).endswith(":1")  # would join
    assert canonicalize_bootstrap_address(kw["address"], str(tmp_path)) is None  # starts one
    monkeypatch.delenv("RAY_ADDRESS")
    assert canonicalize_bootstrap_address(None, str(tmp_path)).endswith(":2")  # would join
    assert canonicalize_bootstrap_address(kw["address"], str(tmp_path)) is None


def test_jobs_start_a_local_cluster_unless_told_to_join(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    kw, source = common.ray_init_plan(None)
    assert kw["address"] == "local" and source is None and kw["num_cpus"] >= 4
    kw, source = common.ray_init_plan("auto")
    assert kw["address"] == "auto" and "num_cpus" not in kw and source.startswith("--address")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    kw, source = common.ray_init_plan(None)
    assert kw["address"] == "10.0.0.1:6379" and source == "RAY_ADDRESS"
    assert common.ray_init_plan("local")[0]["address"] == "local"


def test_init_ray_logs_whether_it_joined_or_started(monkeypatch, fake_ray, caplog):
    with socket.socket() as server:  # something listening, standing in for a live GCS
        server.bind(("", 0))
        server.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{server.getsockname()[1]}")
        with caplog.at_level(logging.INFO, logger="pgasr.jobs"):
            common.init_ray(None)
    assert "joined the existing Ray cluster at 10.1.2.3:6379 (from RAY_ADDRESS)" in caplog.text
    caplog.clear()
    monkeypatch.delenv("RAY_ADDRESS")
    with caplog.at_level(logging.INFO, logger="pgasr.jobs"):
        common.init_ray(None)
    assert fake_ray[-1]["address"] == "local"
    assert "started a new local Ray cluster" in caplog.text


def test_stale_address_is_a_one_line_error_not_a_traceback(monkeypatch, fake_ray, capsys):
    """Nothing listens at RAY_ADDRESS any more: the job says so and exits 2, before
    ``ray.init`` (which retries a dead address for minutes, then raises a traceback)."""
    port = _unused_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    monkeypatch.setattr(sys, "argv", ["job"])

    def main(args):
        common.init_ray(args.address)

    import ray

    def init(**kw):  # what Ray does after minutes of retries
        fake_ray.append(kw)
        raise ConnectionError("Failed to connect to GCS")

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(SystemExit) as exit_:
        common.run_job(main, common.job_parser("a job"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert f":{port} (from RAY_ADDRESS)" in err and "unset RAY_ADDRESS" in err
    assert len(err.strip().splitlines()) == 1
    assert fake_ray == []  # refused before ray.init
