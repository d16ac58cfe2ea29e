"""benchmarks/real_scans.py: the real volumes load, and the resampling to the model grid keeps
world coordinates (the check scores SR against a correctly placed HR)."""

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import real_scans  # noqa: E402


def test_real_volumes_ship_with_the_installed_packages():
    got = real_scans.load_sources(list(real_scans.SOURCES))
    assert "nibabel-example4d" in got
    for name, (desc, img) in got.items():
        data = np.asarray(img.dataobj)
        assert data.ndim == 3 and min(data.shape) >= 8, name
        assert float(data.max()) > float(data.min())


def test_to_model_grid_resamples_in_plane_and_keeps_world_positions():
    data = np.zeros((40, 30, 4), np.float32)
    data[20, 10, :] = 1000.0  # a point at a known voxel
    aff = np.diag([-2.0, 2.0, 3.0, 1.0])  # LAS: brought to RAS by the check
    aff[:3, 3] = [40.0, -30.0, -6.0]
    img = nib.Nifti1Image(data, aff)
    out = real_scans.to_model_grid(img, 2.5)
    assert np.allclose(out.header.get_zooms()[:3], (2.5, 2.5, 3.0))
    assert out.shape[0] % 4 == 0 and out.shape[1] % 4 == 0 and out.shape[2] == 4
    world = aff @ np.array([20, 10, 0, 1.0])
    res = np.asarray(out.dataobj)
    peak = np.unravel_index(np.argmax(res[:, :, 0]), res.shape[:2])
    got = out.affine @ np.array([peak[0], peak[1], 0, 1.0])
    assert np.allclose(got[:3], world[:3], atol=2.5)  # within one output voxel


def test_background_mask_is_outside_the_head():
    hr = np.zeros((32, 32, 3), np.float32)
    hr[8:24, 8:24] = 500.0
    bg = real_scans.background_mask(hr)
    assert bg[0, 0, 0] and not bg[16, 16, 1]
    assert 0.6 < bg.mean() <= 0.75  # the square (25 %) plus a conservative 1-pixel rim
