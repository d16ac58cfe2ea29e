"""Experiment tracking on MLflow (pgasr.tracking): train-local stages, the pipeline's run and
its children, failures that must not stop training. The Ray side (rank 0 logging into the
driver's run) is checked by tests/test_job_submit.py; the sweep's trials by tests/test_tune.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pgasr.config import load_config
from pgasr.tracking import Run, flatten, resolve_uri

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_jobs import tiny_cfg  # noqa: E402


def _tracked(cfg_or_tmp, tmp: Path, *extra):
    return tiny_cfg(cfg_or_tmp, "tracking.mlflow=true", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                    "tracking.experiment=t", *extra)


def _client(tmp: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp}/mlflow.db")


def test_uri_resolution_and_off_switch(tmp_path, monkeypatch):
    cfg = load_config(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"  # what `mlflow ui` opens
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_uri(cfg) == "http://tracking:5000"
    cfg.tracking.uri = "sqlite:///sub/x.db"
    assert resolve_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/sub/x.db"
    cfg.tracking.mlflow = False
    assert resolve_uri(cfg) is None
    off = Run.create(cfg, "stage1")
    assert not off and off.to_dict() is None
    off.log_metrics({"a": 1.0}, step=1)  # no-ops
    off.end()
    assert not (tmp_path / "mlflow.db").exists()
    assert flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1], "e": {}}


def test_train_local_logs_config_metrics_and_checkpoint(tmp_path):
    from pgasr.data.prepare import prepare
    from pgasr.training import train_local

    cfg = _tracked(tmp_path, tmp_path, "stage1.epochs=2")
    prepare(cfg, progress=False)
    res = train_local(1, cfg, cfg.data.prepared_dir, tmp_path / "s1", progress=False)
    client = _client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "stage1"
    assert run.data.tags["pgasr.runner"] == "train-local"
    assert run.data.params["stage1.epochs"] == "2" and run.data.params["model.n_z"] == str(cfg.model.n_z)
    history = client.get_metric_history(run.info.run_id, "val_psnr")
    assert [m.step for m in history] == sorted(m.step for m in history) and len(history) == 2
    assert history[-1].value == pytest.approx(res.metrics["val_psnr"])
    names = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
    assert names == ["checkpoint/config.yaml", "checkpoint/meta.json"]


def test_pipeline_run_is_the_parent_and_holds_the_results(tmp_path):
    from jobs.pipeline import _track_results

    cfg = _tracked(tmp_path, tmp_path)
    parent = Run.create(cfg, "pipeline")
    child = Run.create(cfg, "stage2", parent=parent, log_config=False)
    child.log_metrics({"val_psnr": 30.0, "flag": True, "nan": float("nan")}, step=5)
    child.end()
    (tmp_path / "report.md").write_text("# report")
    ev = {"summary": {"psnr": {"mean": 27.4}, "ssim": {"mean": 0.9},
                      "bicubic_psnr": {"mean": 24.6}, "bicubic_ssim": {"mean": 0.8}},
          "gain_db": 2.8}
    _track_results(parent, {"timings": {"stage1": 10.0}, "eval": ev,
                            "baseline": {"psnr": {"cnn": 27.8}}}, tmp_path)
    parent.end()
    client = _client(tmp_path)
    p = client.get_run(parent.run_id)
    assert p.data.metrics == {"seconds_stage1": 10.0, "test_psnr": 27.4, "test_ssim": 0.9,
                              "test_bicubic_psnr": 24.6, "test_bicubic_ssim": 0.8,
                              "test_gain_db": 2.8, "baseline_psnr_cnn": 27.8}
    assert [a.path for a in client.list_artifacts(parent.run_id, "report")] == ["report/report.md"]
    c = client.get_run(child.run_id)
    assert c.data.tags["mlflow.parentRunId"] == parent.run_id
    assert c.data.metrics == {"val_psnr": 30.0}  # booleans and NaN are not metrics
    assert c.data.params == {}


def test_tracking_failures_never_stop_training(tmp_path, caplog):
    (tmp_path / "a_file").write_text("not a directory")
    cfg = tiny_cfg(tmp_path, "tracking.mlflow=true",
                   f"tracking.uri=sqlite:///{tmp_path}/a_file/mlflow.db")
    run = Run.create(cfg, "stage1")
    assert not run and "not tracking" in caplog.text
    good = Run.create(_tracked(tmp_path, tmp_path), "stage1", log_config=False)
    assert good
    good.run_id = "0" * 32  # a run the store does not know: the first call fails, then no-ops
    good.log_metrics({"a": 1.0})
    assert not good and "no more tracking" in caplog.text
    good.log_metrics({"a": 2.0})
    json.dumps(good.to_dict())  # None, still serialisable


def test_without_mlflow_installed_tracking_is_a_warning_and_no_ops(tmp_path, monkeypatch, caplog):
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    run = Run.create(_tracked(tmp_path, tmp_path), "stage1")
    assert not run and "mlflow is not installed" in caplog.text
    run.log_params({"a": 1})
    run.log_metrics({"a": 1.0}, step=1)
    run.log_artifact(tmp_path)
    run.set_tags({"a": 1})
    run.end()
    assert not (tmp_path / "mlflow.db").exists()


def test_concurrent_first_use_of_a_sqlite_store(tmp_path):
    """Two processes creating runs in a new SQLite store at once (a sweep's two stage-1
    trainings): the schema is created once, under the lock, and both runs exist."""
    import subprocess

    code = ("import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + '/tests');"
            "from pathlib import Path; from test_tracking import _tracked; from pgasr.tracking import Run;"
            "r = Run.create(_tracked(Path(sys.argv[2]), Path(sys.argv[2])), sys.argv[3], log_config=False);"
            "assert r, 'no run'; r.end()")
    root = str(Path(__file__).resolve().parent.parent)
    procs = [subprocess.Popen([sys.executable, "-c", code, root, str(tmp_path), f"run{i}"],
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1", "run2"]


def test_run_as_a_context_ends_failed_on_an_exception(tmp_path):
    cfg = _tracked(tmp_path, tmp_path)
    with pytest.raises(KeyError):
        with Run.create(cfg, "stage1", log_config=False) as bad:
            raise KeyError("boom")
    with Run.create(cfg, "stage2", log_config=False) as good:
        good.log_metrics({"a": 1.0})
    client = _client(tmp_path)
    assert client.get_run(bad.run_id).info.status == "FAILED"
    assert client.get_run(good.run_id).info.status == "FINISHED"
