"""Ray Train jobs on 2 DDP workers and their failure recovery: a worker killed mid-run, and a
killed driver whose job is resubmitted, both resume from the latest checkpoint (the step
counter continues); stage 2 trains on the resumed stage 1."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pgasr.checkpoint import load_checkpoint
from pgasr.data.prepare import prepare

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_jobs import ROOT, tiny_cfg  # noqa: E402

EPOCHS = 3


def _first_checkpoint(storage: Path, name: str) -> bool:
    """A checkpoint is on disk *and* registered by the Train controller (its snapshot lists
    it): only then does a restarted worker group get it from ``get_checkpoint``."""
    snap = storage / name / "checkpoint_manager_snapshot.json"
    try:
        return snap.is_file() and "checkpoint_" in snap.read_text()
    except OSError:
        return False


def _train_worker_pids() -> list[int]:
    # GCS actor table (works without the dashboard that ray.util.state needs).
    from ray._private import state

    return [a["Pid"] for a in state.actors().values()
            if a.get("State") == "ALIVE" and "RayTrainWorker" in a.get("ActorClassName", "")
            and a.get("Pid")]


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_ddp_worker_killed_mid_run_resumes_then_stage2(ray_session, tmp_path):
    """Stage 1 on 2 DDP workers loses a worker after its first checkpoint and resumes from it
    (the step counter continues); stage 2 then trains on 2 workers from that stage 1. One
    test for both: a Train run on this machine costs a minute."""
    import json

    from jobs.train_stage import run_stage

    cfg = tiny_cfg(tmp_path, f"stage1.epochs={EPOCHS}", "resources.max_failures=2")
    prepare(cfg, progress=False)
    storage = Path(cfg.resources.storage_path)
    killed: list[int] = []

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not _first_checkpoint(storage, f"{cfg.name}-stage1"):
            time.sleep(0.5)
        pids = _train_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    out = run_stage(1, cfg)
    t.join(timeout=5)
    assert killed, "no training worker was found to kill"
    ck = load_checkpoint(out, with_train_state=True)
    assert ck.meta["epoch"] == EPOCHS - 1
    resumed = ck.meta.get("resumed_from")
    assert resumed is not None and resumed["step"] > 0, "run restarted from scratch"
    # the step counter continued: same total as an uninterrupted run of this length
    steps_per_epoch = ck.meta["step"] // EPOCHS
    assert ck.meta["step"] == steps_per_epoch * EPOCHS
    assert ck.meta["metrics"]["val_psnr"] > 0
    assert ck.stage == 1 and ck.train_state["step"] == ck.meta["step"]

    s2 = run_stage(2, cfg)
    ck2 = load_checkpoint(s2)
    assert ck2.stage == 2 and ck2.meta["stage1_checkpoint"].endswith("stage1")
    summary = json.loads((Path(cfg.run_dir) / "stage2.json").read_text())
    assert summary["metrics"]["val_psnr"] > 0


@pytest.mark.ray
@pytest.mark.slow
def test_driver_killed_job_resubmitted_resumes(ray_session, tmp_path):
    cfg = tiny_cfg(tmp_path, f"stage1.epochs={EPOCHS}")
    prepare(cfg, progress=False)
    storage = Path(cfg.resources.storage_path)
    address = ray_session.get_runtime_context().gcs_address
    sets = []
    for item in [f"synth.out_dir={tmp_path}/synth", f"data.prepared_dir={tmp_path}/prepared",
                 f"run_dir={tmp_path}/runs", f"resources.storage_path={storage}",
                 "resources.num_workers=2", "model.acg=false", f"stage1.epochs={EPOCHS}",
                 "stage1.batch_size=4", "stage1.disc_start=2", "data.slices_per_volume=8",
                 "model.channels=[8,8,16,16]", "model.n_z=16", "model.decoder_channels=16",
                 "model.window_size=4", "model.num_heads=2", "model.dat_depth=1",
                 "model.disc_channels=8", "model.codebook_size=32"]:
        sets += ["--set", item]
    cmd = [sys.executable, str(ROOT / "jobs" / "stage1.py"), "--config",
           str(ROOT / "configs" / "tiny.yaml"), "--address", address, *sets]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not _first_checkpoint(storage, f"{cfg.name}-stage1"):
        assert proc.poll() is None, "driver exited before its first checkpoint"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver's own process group only
    proc.wait(timeout=30)
    time.sleep(3)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(Path(cfg.run_dir) / "stage1")
    assert ck.meta["epoch"] == EPOCHS - 1
    assert ck.meta.get("resumed_from", {}).get("step", 0) > 0
