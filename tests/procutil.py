"""Start a private local Ray head for a test and stop exactly its processes.

``ray stop`` stops every Ray process on the machine (other tests', other users'), so a head
is started in a process session of its own (``start_new_session``) and stopped by that
session id. Its temp dir and HOME are private, its worker/agent ports are chosen by the OS,
and token auth is on with a fresh token.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def ray_init_kwargs(num_cpus: int = 4, **extra) -> dict:
    """``ray.init`` arguments for a test's own in-process cluster: ``address="local"`` always
    starts a new one, never joining whatever ``RAY_ADDRESS`` or the address ``ray start``
    recorded under /tmp/ray points at (a live cluster of the user's, or a stale one)."""
    return {"address": "local", "num_cpus": num_cpus, "object_store_memory": 200_000_000,
            "include_dashboard": False, "log_to_driver": False,
            "runtime_env": {"env_vars": {"PYTHONPATH": str(ROOT)}}, **extra}


def session_pids(sid: int) -> list[int]:
    """Live processes whose session id is ``sid`` (zombies excluded)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            pids.append(int(entry))
    return pids


def stop_session(sid: int, grace_s: float = 15.0) -> None:
    """SIGTERM every process of session ``sid``, then SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_pids(sid):
            return


def http_status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


@dataclass
class Head:
    url: str  # job API / dashboard
    gcs: str
    env: dict


@contextmanager
def local_head(gcs_port: int, dashboard_port: int, num_cpus: int = 4):
    work = Path(tempfile.mkdtemp(prefix="pgh-", dir="/tmp"))
    token = secrets.token_hex(32)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_", "AUTOSCALER_")) and k != "PYTHONPATH"}
    base["PATH"] = f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}"
    (work / "home").mkdir()
    (work / "tmp").mkdir()
    env = {**base, "HOME": str(work / "home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", f"--port={gcs_port}",
           "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={gcs_port + 1}",
           "--min-worker-port=0", "--max-worker-port=0", "--dashboard-agent-listen-port=0",
           "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, "RAY_TMPDIR": str(work / "tmp")},
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sid = proc.pid
    try:
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{out[-3000:]}")
        url = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + 90
        while http_status(f"{url}/api/jobs/", token) != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the job API did not come up")
            time.sleep(1)
        yield Head(url=url, gcs=f"127.0.0.1:{gcs_port}", env=env)
    finally:
        stop_session(sid)
        shutil.rmtree(work, ignore_errors=True)
