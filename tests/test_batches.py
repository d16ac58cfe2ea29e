"""Batch adapters: random crops keep HR, LR and priors aligned."""

import numpy as np
import pytest
import torch

from pgasr.data.batches import random_crop, stage2_batch
from pgasr.models.blocks import ChannelNorm


def _rows(b=2, h=32, w=40, scales=(2, 4)):
    rng = np.random.default_rng(0)
    hr = rng.standard_normal((b, 3, h, w)).astype(np.float32)
    rows = {"hr": hr, "prior_hr": hr * 2, "subject": np.array(["a"] * b)}
    for s in scales:
        rows[f"lr_x{s}"] = hr[..., ::s, ::s].copy()  # LR pixel (i, j) <-> HR pixel (s*i, s*j)
        rows[f"prior_lr_x{s}"] = hr * 3
    return rows


def test_crop_keeps_columns_aligned():
    rows = _rows()
    for seed in range(20):
        out = random_crop(rows, 16, np.random.default_rng(seed))
        assert out["hr"].shape == (2, 3, 16, 16)
        assert out["lr_x2"].shape == (2, 3, 8, 8) and out["lr_x4"].shape == (2, 3, 4, 4)
        np.testing.assert_array_equal(out["prior_hr"], out["hr"] * 2)
        np.testing.assert_array_equal(out["prior_lr_x4"], out["hr"] * 3)
        np.testing.assert_array_equal(out["lr_x2"], out["hr"][..., ::2, ::2])
        np.testing.assert_array_equal(out["lr_x4"], out["hr"][..., ::4, ::4])
        assert out["subject"] is rows["subject"]


def test_crop_positions_vary_and_are_seeded():
    rows = _rows()
    a = random_crop(rows, 16, np.random.default_rng(1))["hr"]
    b = random_crop(rows, 16, np.random.default_rng(1))["hr"]
    np.testing.assert_array_equal(a, b)
    corners = {random_crop(rows, 16, np.random.default_rng(s))["hr"][0, 0, 0, 0]
               for s in range(30)}
    assert len(corners) > 5


def test_crop_noop_and_errors():
    rows = _rows()
    assert random_crop(rows, 0, np.random.default_rng(0))["hr"] is rows["hr"]
    assert random_crop(rows, 64, np.random.default_rng(0))["hr"].shape == rows["hr"].shape
    with pytest.raises(ValueError, match="multiple of the LR scales"):
        random_crop(rows, 18, np.random.default_rng(0))


def test_cropped_rows_make_a_stage2_batch():
    rows = _rows(scales=(2,))
    b = stage2_batch(random_crop(rows, 16, np.random.default_rng(0)), 2)
    assert b["hr"].shape == (2, 3, 16, 16) and b["lr"].shape == (2, 3, 8, 8)


def test_channel_norm_is_local_to_each_pixel():
    """The generator's norm: a pixel's output is independent of the rest of the image, so a
    crop sees exactly what the whole slice sees (GroupNorm fails this)."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 16, 16)
    norm = ChannelNorm(8)
    full = norm(x)
    torch.testing.assert_close(norm(x[..., 4:12, 4:12]), full[..., 4:12, 4:12])
    gn = torch.nn.GroupNorm(4, 8)
    assert not torch.allclose(gn(x[..., 4:12, 4:12]), gn(x)[..., 4:12, 4:12], atol=1e-3)
    assert abs(float(full.mean(1).abs().max())) < 1e-5  # zero mean over channels per pixel
