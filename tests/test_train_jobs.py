"""The Ray Train stage runner without Ray: config refusal on resume, exports, run names. The
2-worker DDP runs of both stages are in tests/test_fault_tolerance.py."""

import sys
from pathlib import Path

import pytest

from pgasr.checkpoint import load_checkpoint
from pgasr.config import load_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY_MODEL = ["model.channels=[8,8,16,16]", "model.n_z=16", "model.decoder_channels=16",
              "model.window_size=4", "model.num_heads=2", "model.dat_depth=1",
              "model.disc_channels=8", "model.codebook_size=32"]


def tiny_cfg(tmp, *extra):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"synth.out_dir={tmp}/synth", f"data.prepared_dir={tmp}/prepared", f"run_dir={tmp}/runs",
        f"resources.storage_path={tmp}/ray", "resources.num_workers=2", "model.acg=false",
        "stage1.epochs=2", "stage2.epochs=2", "stage1.batch_size=4", "stage2.batch_size=4",
        "stage1.disc_start=2", "data.slices_per_volume=8", *TINY_MODEL, *extra])


def test_refuses_to_resume_a_run_with_another_config(tmp_path):
    """Train V2 resumes any run with the same name + storage: a changed model config must be
    refused with a clear message instead of loading a checkpoint that cannot fit."""
    from jobs.train_stage import _check_same_run

    cfg = tiny_cfg(tmp_path)
    run = tmp_path / "ray" / "tiny-stage1"
    _check_same_run(run, cfg, 1)  # new run: records the fingerprint
    _check_same_run(run, cfg, 1)  # same config: resuming is fine
    changed_elsewhere = tiny_cfg(tmp_path, "resources.num_workers=1", "stage2.lr=0.1")
    _check_same_run(run, changed_elsewhere, 1)  # resources / other stage may change
    other = tiny_cfg(tmp_path, "model.n_z=8")
    with pytest.raises(SystemExit, match="different config"):
        _check_same_run(run, other, 1)


class _FakeRayCheckpoint:
    """What ``run_stage`` uses of ``ray.train.Checkpoint``: ``as_directory`` and ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def as_directory(self):
        from contextlib import nullcontext

        return nullcontext(self.path)


def test_run_stage_exports_only_over_its_own_checkpoint(tmp_path, monkeypatch):
    """No Ray: the trainer is faked. A foreign ``out`` is refused before training (issue #17);
    an earlier exported checkpoint is replaced by a verified copy."""
    import types

    import torch

    import jobs.common
    import jobs.train_stage as ts
    from pgasr.checkpoint import save_checkpoint

    cfg = tiny_cfg(tmp_path)
    src = save_checkpoint(tmp_path / "ray" / "checkpoint_000001", stage=1,
                          modules={"model": torch.nn.Linear(2, 2)}, cfg=cfg,
                          meta={"epoch": 1, "metrics": {"val_psnr": 3.0}})
    fits: list[int] = []

    class Trainer:
        def fit(self):
            fits.append(1)
            return types.SimpleNamespace(checkpoint=_FakeRayCheckpoint(src), error=None,
                                         metrics={"val_psnr": 3.0})

    monkeypatch.setattr(jobs.common, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(ts, "make_trainer", lambda *a, **k: Trainer())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="did not write"):
        ts.run_stage(1, cfg, out=mine)
    assert (mine / "thesis.txt").read_text() == "years of work" and fits == []
    first = ts.run_stage(1, cfg)
    again = ts.run_stage(1, cfg)
    assert first == again == Path(cfg.run_dir) / "stage1" and len(fits) == 2
    assert load_checkpoint(again).meta["metrics"]["val_psnr"] == 3.0
    assert sorted(p.name for p in Path(cfg.run_dir).iterdir()) == ["stage1", "stage1.json"]


def test_each_scale_has_its_own_run_and_checkpoint(tmp_path, monkeypatch):
    """No Ray (trainer faked): a x4 stage 2 neither resumes the x2 run (its own Ray run name)
    nor replaces the x2 checkpoint (its own directory), and the pipeline's per-scale configs
    differ only in the scale (#16)."""
    import types

    import torch

    import jobs.common
    import jobs.train_stage as ts
    from jobs.pipeline import _at_scale
    from pgasr.checkpoint import save_checkpoint
    from pgasr.config import ConfigError

    cfg = tiny_cfg(tmp_path, "stage2.scales=[2, 4]")
    names: list[str] = []

    def make_trainer(stage, c, name=None, **kw):
        names.append(name or ts.default_run_name(stage, c))
        src = save_checkpoint(tmp_path / "ray" / f"ck-x{c.stage2.scale}", stage=2,
                              modules={"model": torch.nn.Linear(2, 2)}, cfg=c,
                              meta={"scales": [c.stage2.scale]})
        return types.SimpleNamespace(fit=lambda: types.SimpleNamespace(
            checkpoint=_FakeRayCheckpoint(src), error=None, metrics={}))

    monkeypatch.setattr(jobs.common, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(ts, "make_trainer", make_trainer)
    x2 = ts.run_stage(2, cfg)
    x4_cfg = _at_scale(cfg, 4)
    x4 = ts.run_stage(2, x4_cfg)
    assert (x2.name, x4.name) == ("stage2", "stage2_x4")
    assert names == ["tiny-stage2", "tiny-stage2-x4"]
    assert load_checkpoint(x2).meta["scales"] == [2] and load_checkpoint(x4).meta["scales"] == [4]
    assert cfg.stage2.scale == 2 and x4_cfg.stage2.scale == 4  # the caller's config untouched
    with pytest.raises(ConfigError, match="needs x4 in data.scales"):
        tiny_cfg(tmp_path, "stage2.scales=[2, 4]", "data.scales=[2]")


def test_pipeline_refuses_unknown_baselines_before_any_work(tmp_path, monkeypatch):
    """``--baselines`` is checked before Ray starts or anything trains (a typo found after
    half an hour of training is a lost half hour)."""
    import jobs.pipeline as P

    monkeypatch.setattr(P, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    with pytest.raises(ValueError, match="--baselines must be a comma-separated subset of "
                                         "cnn, dat, got cnn,swinir"):
        P.run_pipeline(tiny_cfg(tmp_path), baselines=("cnn", "swinir"))
