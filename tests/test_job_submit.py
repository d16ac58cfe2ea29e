"""`ray job submit` against a local head started for this test (and stopped by address).

Stage 1 is trained in this process (``train_local``: a few seconds, no Ray) and only the
stage-2 Ray Train job is submitted: the job API, working-dir upload, the job's own Ray Train
run with 2 workers and its checkpoint export are what this test proves (``jobs/stage1.py``
as a Ray driver is exercised by tests/test_fault_tolerance.py)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgasr.checkpoint import load_checkpoint
from pgasr.data.prepare import prepare

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_jobs import ROOT, TINY_MODEL, tiny_cfg  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.mark.ray
@pytest.mark.slow
def test_job_submit_stage2(job_head, tmp_path):
    """Against the session's shared head (``conftest.job_head``)."""
    address, env = job_head.url, job_head.env
    cfg = tiny_cfg(tmp_path)
    prepare(cfg, progress=False)
    sets = [f"synth.out_dir={tmp_path}/synth", f"data.prepared_dir={tmp_path}/prepared",
            f"run_dir={tmp_path}/runs", f"resources.storage_path={tmp_path}/ray",
            "resources.num_workers=2", "model.acg=false", "stage1.epochs=1", "stage2.epochs=1",
            "stage1.batch_size=4", "stage2.batch_size=4", "data.slices_per_volume=8", *TINY_MODEL,
            "tracking.mlflow=true", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    args = [a for s in sets for a in ("--set", s)]

    def submit(script):
        cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
               "--", sys.executable, f"jobs/{script}", "--config", "configs/tiny.yaml", *args]
        t0 = time.time()
        for _ in range(10):  # the job agent can lag the job API by a few seconds
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in r.stderr + r.stdout:
                break
            time.sleep(3)
        return r, time.time() - t0

    from pgasr.training import train_local

    train_local(1, tiny_cfg(tmp_path, "stage1.epochs=1", *sets[-2:]), tmp_path / "prepared",
                tmp_path / "runs" / "stage1", progress=False)
    r2, secs = submit("stage2.py")
    out = r2.stdout + r2.stderr
    assert r2.returncode == 0 and "succeeded" in out.lower(), out[-4000:]
    ck = load_checkpoint(tmp_path / "runs" / "stage2")
    assert ck.stage == 2
    assert Path(ck.meta["stage1_checkpoint"]).resolve() == (tmp_path / "runs" / "stage1").resolve()
    summary = json.loads((tmp_path / "runs" / "stage2.json").read_text())
    assert summary["checkpoint"].endswith("stage2")

    # MLflow: the job's driver created the stage-2 run, rank 0 logged its epoch into it from
    # the worker, the driver closed it with the checkpoint's metadata
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = {r.data.tags["mlflow.runName"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"stage1", "stage2"}
    s2 = runs["stage2"]
    assert s2.info.status == "FINISHED" and s2.data.tags["pgasr.ray_run"] == "tiny-stage2"
    assert s2.data.params["stage2.epochs"] == "1"
    assert [m.value for m in client.get_metric_history(s2.info.run_id, "epoch")] == [0.0]
    assert "checkpoint/meta.json" in [a.path for a in client.list_artifacts(s2.info.run_id,
                                                                            "checkpoint")]
