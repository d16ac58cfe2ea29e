"""The shared epoch loop (plain single process): reproducibility, NaN policy, resume."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pgasr.checkpoint import load_checkpoint
from pgasr.data.batches import read_split
from pgasr.data.prepare import prepare
from pgasr.training import fit, train_local

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_jobs import tiny_cfg  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny_cfg(tmp, "stage1.epochs=2", "stage1.disc_start=1")
    prepare(cfg, progress=False)
    return tmp, cfg


@pytest.mark.slow
def test_same_seed_same_metrics(prepared, tmp_path):
    tmp, cfg = prepared
    a = train_local(1, cfg, cfg.data.prepared_dir, tmp_path / "a", progress=False)
    b = train_local(1, cfg, cfg.data.prepared_dir, tmp_path / "b", progress=False)
    for k in ("train_l1", "train_loss_g", "val_psnr", "val_ssim"):
        assert a.metrics[k] == pytest.approx(b.metrics[k], abs=1e-4), k
    sa = load_checkpoint(tmp_path / "a").state_dicts["model"]
    sb = load_checkpoint(tmp_path / "b").state_dicts["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_resume_continues_step_counter(prepared, tmp_path):
    tmp, cfg = prepared
    one = tiny_cfg(tmp, "stage1.epochs=1", "stage1.disc_start=1")
    r1 = train_local(1, one, cfg.data.prepared_dir, tmp_path / "r", progress=False)
    ck = load_checkpoint(tmp_path / "r", with_train_state=True)
    train = read_split(cfg.data.prepared_dir, "train", ["hr"])

    def batches(epoch):
        idx = np.random.default_rng(epoch).permutation(len(train["hr"]))
        for i in range(0, len(idx) - 3, 4):
            yield {"hr": train["hr"][idx[i : i + 4]]}

    r2 = fit(1, cfg, batches, resume=ck, checkpoint_dir=tmp_path / "r2")
    assert r2.steps == 2 * r1.steps and r2.epochs == 2
    assert load_checkpoint(tmp_path / "r2").meta["resumed_from"]["step"] == r1.steps


def test_nan_policy(prepared, tmp_path):
    tmp, cfg = prepared
    bad = {"hr": np.full((4, 3, 64, 64), np.nan, np.float32)}

    def batches(epoch):
        yield from [bad] * 3

    with pytest.raises(FloatingPointError, match="non-finite"):
        fit(1, cfg, batches, checkpoint_dir=tmp_path / "e")
    skip = tiny_cfg(tmp, "nan_policy=skip", "stage1.epochs=1")
    res = fit(1, skip, batches, checkpoint_dir=tmp_path / "s")
    assert res.nan_skipped == 3 and res.steps == 0
    weights = load_checkpoint(tmp_path / "s").state_dicts["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert not math.isnan(res.metrics.get("train_l1", 0.0))
