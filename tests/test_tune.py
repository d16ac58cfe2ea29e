"""The loss-weight sweep (``tune/sweep.py``, issue #7).

Fast tests (no Ray): the search-space config and its errors, the stage-1 key.
Ray tests (``ray`` + ``slow``): a 2 beta x 2 alpha tiny sweep on CPU through Ray Tune + Ray
Train trains stage 1 twice (not four times), ASHA stops a trial early, and the exported best
checkpoint serves ``pgasr sr`` and Serve's config loader; a second sweep, whose driver is
killed mid-sweep, is resumed with ``Tuner.restore`` from the same experiment path.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgasr.config import load_config  # noqa: E402
from tune import sweep  # noqa: E402


CONFIG = ROOT / "configs" / "tune_tiny.yaml"


def _sets(tmp: Path, *extra: str) -> list[str]:
    """``--set`` items putting every output of the tiny sweep under ``tmp``; priors off (as in
    the other Ray tests: the tissue-prior step would add ~25 s and nothing to what is tested)."""
    items = [f"synth.out_dir={tmp}/synth", f"data.prepared_dir={tmp}/prepared",
             f"run_dir={tmp}/runs", f"resources.storage_path={tmp}/ray",
             f"tune.best_config={tmp}/best.yaml", "model.acg=false", *extra]
    return [a for item in items for a in ("--set", item)]


def _events(cache: Path) -> list[dict]:
    f = cache / sweep.STAGE1_EVENTS
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


# --------------------------------------------------------------------------- config (no Ray)


def test_tiny_config_space():
    cfg = load_config(CONFIG)
    space = sweep.check_config(cfg)
    assert space["beta"].kind == "grid" and space["beta"].values == [0.1, 0.5]
    assert sweep.n_trials(cfg, space) == 4
    # the defaults bracket the paper's alpha1 = alpha2 = 0.1, beta = 0.25: 3 beta x 9 alpha
    d = load_config(None)
    assert sweep.n_trials(d, sweep.check_config(d)) == 27
    assert 0.1 in d.tune.alpha1 and 0.1 in d.tune.alpha2 and 0.25 in d.tune.beta


def test_ranges_are_drawn_once_seeded_and_in_range():
    sets = ["tune.beta={type: loguniform, low: 0.05, high: 1.0, n: 3}",
            "tune.alpha1={type: uniform, low: 0.0, high: 0.5}",
            "tune.alpha2={type: choice, values: [0.05, 0.1, 0.2]}", "tune.num_samples=5"]
    cfg = load_config(CONFIG, sets)
    a, b = sweep.resolve_space(cfg), sweep.resolve_space(load_config(CONFIG, sets))
    assert a["beta"].kind == "grid" and a["beta"].values == b["beta"].values
    assert len(a["beta"].values) == 3 and all(0.05 <= v <= 1.0 for v in a["beta"].values)
    assert a["alpha1"].kind == "uniform" and a["alpha2"].kind == "choice"
    assert sweep.n_trials(cfg, a) == 15  # 3 beta x 5 samples
    c = sweep.resolve_space(load_config(CONFIG, [*sets, "tune.seed=1"]))
    assert c["beta"].values != a["beta"].values
    # search: random reads plain lists as choices
    r = sweep.resolve_space(load_config(CONFIG, ["tune.search=random"]))
    assert r["alpha1"].kind == "choice" and r["beta"].kind == "choice"


@pytest.mark.parametrize("item, message", [
    ("tune.beta={type: loguniform, low: 0.1, high: 1.0}", "needs n > 0"),
    ("tune.alpha1={type: gaussian, values: [1]}", "must be one of grid, choice"),
    ("tune.alpha1={type: loguniform, low: 0.0, high: 1.0}", "needs low > 0"),
    ("tune.alpha2={type: uniform, low: 1.0, high: 0.5}", "0 <= low < high"),
    ("tune.alpha1=[]", "non-empty"),
    ("tune.alpha1=[0.1, -1]", ">= 0"),
    ("tune.beta=[0.25, 0.25]", "duplicate"),
    ("tune.alpha1={type: grid, values: [0.1], low: 1}", "low/high/n"),
    ("tune.metric=loss", "tune.metric"),
    ("tune.grace_period=5", "grace_period"),
    ("stage2.val_every=2", "val_every"),
    ("tune.search=bayes", "tune.search"),
    ("tune.beta={typo: 1}", "unknown key 'tune.beta.typo'; valid keys: high, low"),
])
def test_bad_search_space_is_one_line_and_exit_2(tmp_path, capsys, item, message):
    rc = sweep.main(["--config", str(CONFIG), *_sets(tmp_path, item)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "ray").exists()  # failed before touching the cluster


def test_stage1_key_depends_on_beta_not_on_alpha_or_paths(tmp_path):
    cfg = sweep.absolutize(load_config(CONFIG))
    key = sweep.stage1_key(cfg, "m")
    same = [["stage2.alpha1=7", "stage2.alpha2=3", "tune.alpha1=[1]"],
            [f"data.prepared_dir={tmp_path}/elsewhere", f"run_dir={tmp_path}/r"]]
    for sets in same:
        assert sweep.stage1_key(sweep.absolutize(load_config(CONFIG, sets)), "m") == key
    for sets in (["stage1.beta=0.5"], ["model.n_z=8"], ["seed=1"], ["resources.num_workers=2"]):
        assert sweep.stage1_key(load_config(CONFIG, sets), "m") != key, sets
    assert sweep.stage1_key(cfg, "other-data") != key


def test_finished_run_is_recognised_for_rereport():
    """A Tune trial re-run after its driver died may find its Train run already complete;
    jobs.train_stage then re-reports the last result instead of reporting nothing."""
    from types import SimpleNamespace as NS

    from jobs.train_stage import _finished

    sc = NS(epochs=2, max_steps=0)
    assert _finished(NS(train_state={"epoch": 1, "step": 8}, meta={}), sc)
    assert not _finished(NS(train_state={"epoch": 0, "step": 4}, meta={}), sc)
    assert _finished(NS(train_state=None, meta={"epoch": 1, "step": 8}), sc)
    assert _finished(NS(train_state={"epoch": 0, "step": 4}, meta={}), NS(epochs=9, max_steps=4))


# --------------------------------------------------------------------------- the sweep (Ray)


@pytest.fixture(scope="module")
def tiny_sweep(ray_session, tmp_path_factory):
    """The 2 beta x 2 alpha sweep of configs/tune_tiny.yaml, in this process (the session's
    4-CPU cluster): 2 trials at once, ASHA on."""
    tmp = tmp_path_factory.mktemp("sweep")
    t0 = time.perf_counter()
    rc = sweep.main(["--config", str(CONFIG), *_sets(tmp), "--set", "tracking.mlflow=true",
                     "--set", f"tracking.uri=sqlite:///{tmp}/mlflow.db"])
    seconds = time.perf_counter() - t0
    out = tmp / "runs" / "tune"
    summary = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() \
        else None
    return {"rc": rc, "tmp": tmp, "out": out, "summary": summary, "seconds": seconds}


# the module fixture runs the whole sweep inside this test's setup: ~5 min alone on 2 cores,
# >10 min when the machine is shared with another training job (pytest-timeout's 600 s
# default then fails a healthy sweep)
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sweep_trains_stage1_once_per_beta_and_asha_stops_early(tiny_sweep):
    assert tiny_sweep["rc"] == 0, "the sweep failed"
    tmp, out, summary = tiny_sweep["tmp"], tiny_sweep["out"], tiny_sweep["summary"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and summary["trials"] == 4
    assert {(float(r["beta"]), float(r["alpha1"])) for r in rows} == {
        (b, a) for b in (0.1, 0.5) for a in (0.1, 3.0)}

    # Stage 1 trained 2 times for 4 trials, counted three ways: the cache's event log, the
    # Ray Train runs in storage, the cache entries; each trial used its beta's one.
    cache = tmp / "runs" / "stage1_cache"
    trained = [e for e in _events(cache) if e["event"] == "trained"]
    assert len(trained) == 2 and {e["beta"] for e in trained} == {0.1, 0.5}
    assert len(glob.glob(str(tmp / "ray" / "tune_tiny-stage1-*"))) == 2
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    assert len(summary["stage1_trained"]) == 2
    keys = {float(r["beta"]): set() for r in rows}
    for r in rows:
        keys[float(r["beta"])].add(r["stage1_key"])
    assert all(len(k) == 1 for k in keys.values()) and len(set.union(*keys.values())) == 2
    # ... and each trial's Train run is its own (named after the trial), 4 in all
    assert len(glob.glob(str(tmp / "ray" / "tune_tiny-tune-*"))) == 4

    # ASHA (grace 1, reduction 2, max_t 2) stopped at least one trial after epoch 1. Reliable
    # here, not luck: at epoch 1 the alpha1=3 trials are ~0.06 dB below the alpha1=0.1 ones
    # while beta moves PSNR by < 0.01 dB, and the second beta's pair starts only after the
    # first pair has passed the rung, so its alpha1=3 trial lands below the cutoff (the mean
    # or median of the earlier results) whichever order the first pair arrived in.
    stopped = [r for r in rows if r["status"] == "stopped_early"]
    assert stopped and all(int(r["epochs_done"]) == 1 for r in stopped)
    assert all(r["status"] in ("completed", "stopped_early") for r in rows)
    assert summary["status"]["stopped_early"] == len(stopped)
    # objective recorded per trial (val PSNR/SSIM every epoch, final PSNR/SSIM on the val split)
    assert all(float(r["val_psnr"]) > 0 and float(r["eval_psnr"]) > 0 for r in rows)
    assert all(0 < float(r["val_ssim"]) <= 1 for r in rows)

    md = (out / "results.md").read_text()
    assert md.count("| `") >= 4 and "stopped early" in md
    # every trial an MLflow run (Ray's MLflowLoggerCallback), with its alphas and epochs
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
            if r.data.tags.get("pgasr.sweep")]
    assert len(runs) == 4
    assert {(float(r.data.params["beta"]), float(r.data.params["alpha1"])) for r in runs} == {
        (b, a) for b in (0.1, 0.5) for a in (0.1, 3.0)}
    assert all("val_psnr" in r.data.metrics for r in runs)
    png = out / "psnr_alpha.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    print(f"\ntiny sweep: {tiny_sweep['seconds']:.0f} s")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_best_checkpoint_serves_sr(tiny_sweep, tmp_path):
    import nibabel as nib
    import numpy as np
    import yaml

    from pgasr.checkpoint import load_checkpoint
    from pgasr.cli import main as pgasr_main

    assert tiny_sweep["rc"] == 0
    tmp, summary = tiny_sweep["tmp"], tiny_sweep["summary"]
    best_dir, best_yaml = Path(summary["best"]["checkpoint"]), tmp / "best.yaml"
    assert best_yaml.is_file()
    ck = load_checkpoint(best_dir)
    assert ck.stage == 2
    best = yaml.safe_load(best_yaml.read_text())
    assert best["serve"]["checkpoint"] == str(best_dir)
    assert best["stage2"]["alpha1"] == summary["best"]["alpha1"] == ck.cfg.stage2.alpha1
    assert best["stage1"]["beta"] == summary["best"]["beta"] == ck.cfg.stage1.beta
    assert ck.meta["stage1_checkpoint"] == best["stage2"]["stage1_checkpoint"]
    assert Path(best["stage2"]["stage1_checkpoint"]).parent == tmp / "runs" / "stage1_cache"
    # the best.yaml is a run config every entry point loads
    assert load_config(best_yaml).stage2.alpha2 == summary["best"]["alpha2"]

    lr = tmp_path / "lr.nii.gz"
    vol = (np.random.default_rng(0).random((24, 20, 3)) * 400 + 50).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0])), lr)
    out = tmp_path / "sr.nii.gz"
    assert pgasr_main(["sr", "--checkpoint", str(best_dir), "--scale", "2", "--input", str(lr),
                       "--output", str(out), "--quiet", "--no-resample"]) == 0
    assert nib.load(out).shape == (48, 40, 3)

    from serve.app import load_serve_config

    assert load_serve_config({"config": str(best_yaml)}).serve.checkpoint == str(best_dir)


def _terminated(experiment: Path) -> set[str]:
    """Trial ids the saved experiment state lists as TERMINATED (what a restore keeps)."""
    ids = set()
    for f in experiment.glob("experiment_state-*.json"):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):  # being rewritten
            continue
        for state, _meta in data.get("trial_data", []):
            t = json.loads(state)
            if t.get("status") == "TERMINATED":
                ids.add(t["trial_id"])
    return ids


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sweep_resumes_after_driver_is_killed(tiny_sweep, ray_session, capsys):
    """A second sweep (1 beta x 2 alpha, one trial at a time) on the same stage-1 cache: its
    driver is killed after the first trial is recorded as finished; ``--resume`` restores the
    experiment, keeps that trial, runs the other, and trains no stage 1."""
    assert tiny_sweep["rc"] == 0
    tmp = tiny_sweep["tmp"]
    sets = _sets(tmp, "tune.name=resume", f"tune.out_dir={tmp}/resume",
                 f"tune.best_config={tmp}/resume/best.yaml", "tune.beta=[0.1]",
                 "tune.max_concurrent_trials=1", "tune.asha=false", "stage2.epochs=1",
                 "tune.final_eval=false")  # the main sweep proves the evaluation and ASHA
    cache = tmp / "runs" / "stage1_cache"
    n_events = len(_events(cache))
    experiment = tmp / "ray" / "resume"
    address = ray_session.get_runtime_context().gcs_address
    log = open(tmp / "resume-driver.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tune" / "sweep.py"), "--config", str(CONFIG),
         "--address", address, *sets],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and not _terminated(experiment):
        assert proc.poll() is None, (tmp / "resume-driver.log").read_text()[-3000:]
        time.sleep(1)
    done_before = _terminated(experiment)
    assert done_before, "no trial finished in time"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver's own process group only
    proc.wait(timeout=30)
    log.close()
    trials_before = {"_".join(p.name.split("_")[2:4]) for p in experiment.glob("_trial_*")}
    assert len(trials_before) == 2

    # the experiment exists: starting it again without --resume is refused
    assert sweep.main(["--config", str(CONFIG), *sets]) == 2
    assert "--resume" in capsys.readouterr().err

    assert sweep.main(["--config", str(CONFIG), *sets, "--resume"]) == 0
    summary = json.loads((tmp / "resume" / "sweep.json").read_text())
    assert summary["restored"] is True and summary["stage1_trained"] == []
    assert summary["status"]["completed"] == 2
    rows = {r["trial_id"]: r for r in csv.DictReader(open(tmp / "resume" / "results.csv"))}
    assert set(rows) == trials_before  # the same trials, not a new sweep
    for trial_id in done_before:  # finished before the kill: kept, not run again
        starts = (tmp / "resume" / "trials" / trial_id / "starts.log").read_text().splitlines()
        assert len(starts) == 1, trial_id
    new = _events(cache)[n_events:]
    assert new and all(e["event"] == "cached" for e in new)  # stage 1 came from the cache
    assert Path(summary["best"]["checkpoint"]).is_dir()


def test_pick_best_ignores_non_finite_metrics():
    """A diverged trial (NaN/inf validation PSNR) never becomes the exported best (#17)."""
    rows = [{"trial_id": t, "val_psnr": v, "checkpoint_path": f"/ck/{t}"} for t, v in
            [("nan", float("nan")), ("inf", float("inf")), ("ok", 20.0), ("low", 10.0),
             ("none", None), ("-inf", float("-inf"))]]
    assert sweep.pick_best(rows, "val_psnr", "max")["trial_id"] == "ok"
    assert sweep.pick_best(rows, "val_psnr", "min")["trial_id"] == "low"
    assert sweep.pick_best(rows[:2], "val_psnr", "max") is None


def test_export_best_never_replaces_foreign_content(tmp_path):
    """No Ray cluster: the best trial's checkpoint is a local directory (#17)."""
    import torch

    from pgasr.checkpoint import load_checkpoint, save_checkpoint

    cfg = load_config(CONFIG, [f"run_dir={tmp_path}/runs", "model.acg=false"])
    m = torch.nn.Linear(2, 2)
    trial = save_checkpoint(tmp_path / "trial" / "checkpoint", stage=2, modules={"model": m},
                            cfg=cfg, train_state={"step": 1})
    paths = sweep.Paths(out=tmp_path / "tune", cache=tmp_path / "cache",
                        best_config=tmp_path / "best.yaml", best_checkpoint=tmp_path / "best",
                        storage=str(tmp_path / "ray"), name="t")
    best = {"trial_id": "t1", "beta": 0.25, "alpha1": 0.1, "alpha2": 0.2, "epochs_done": 1,
            cfg.tune.metric: 20.0, "checkpoint_path": str(trial)}
    stage1 = {sweep._bkey(0.25): {"path": str(trial)}}
    paths.best_checkpoint.mkdir()
    (paths.best_checkpoint / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="did not write"):
        sweep.export_best(cfg, best, stage1, paths)
    assert (paths.best_checkpoint / "thesis.txt").read_text() == "years of work"
    (paths.best_checkpoint / "thesis.txt").unlink()
    sweep.export_best(cfg, best, stage1, paths)
    sweep.export_best(cfg, best, stage1, paths)  # over its own earlier export
    assert load_checkpoint(paths.best_checkpoint).stage == 2
    assert not (paths.best_checkpoint / "train_state.pt").exists()
    assert (tmp_path / "best.yaml").is_file()
