import numpy as np
import pytest

from pgasr.config import DegradationConfig
from pgasr.data import degrade, slice_rng
from pgasr.data.degradation import anisotropic_gaussian_kernel, bicubic_resize, sample_degradation


def _phantom(n=64):
    y, x = np.mgrid[:n, :n] / n
    return (np.sin(6 * x) * np.cos(4 * y) + (x > 0.5)).astype(np.float32)


def test_kernel_properties():
    k = anisotropic_gaussian_kernel(2.0, 0.5, 0.3, 15)
    assert k.shape == (15, 15)
    assert abs(k.sum() - 1) < 1e-12
    assert np.unravel_index(k.argmax(), k.shape) == (7, 7)
    np.testing.assert_allclose(k, k[::-1, ::-1])  # point symmetric
    iso = anisotropic_gaussian_kernel(1.0, 1.0, 0.7, 9)
    np.testing.assert_allclose(iso, iso.T, atol=1e-12)
    with pytest.raises(ValueError):
        anisotropic_gaussian_kernel(1, 1, 0, 4)


@pytest.mark.parametrize("scale", [2, 4])
def test_shape_dtype_determinism(scale):
    hr = _phantom()
    a = degrade(hr, scale, slice_rng(0, "IXI001", 5, scale))
    b = degrade(hr, scale, slice_rng(0, "IXI001", 5, scale))
    c = degrade(hr, scale, slice_rng(0, "IXI001", 6, scale))
    assert a.shape == (64 // scale, 64 // scale) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_golden_values():
    # Frozen output for a fixed seed: any change to the recipe must be deliberate.
    hr = _phantom()
    lr = degrade(hr, 2, slice_rng(0, "IXI001", 5, 2))
    p = sample_degradation(2, slice_rng(0, "IXI001", 5, 2))
    assert p["kernel_size"] % 2 == 1
    got = [round(float(v), 4) for v in (lr.mean(), lr.std(), lr[10, 10], lr[20, 5])]
    assert got == GOLDEN, got


GOLDEN = [0.4831, 0.8061, 0.2695, -0.6649]


def test_noise_level_matches_config():
    hr = np.zeros((128, 128), np.float32)
    hr[:, 64:] = 1.0  # robust range = 1
    cfg = DegradationConfig(blur_sigma=[0.2, 0.2], noise_sigma=[0.05, 0.05])
    # Down-sampling averages noise; measure on a flat region before resize via x2 of many draws.
    lr = degrade(hr, 2, np.random.default_rng(0), cfg)
    flat = lr[8:56, 4:24]
    # bicubic antialias at x2 averages ~ 4 px with weights; residual std well below input sigma
    assert 0.01 < flat.std() < 0.05
    clean = degrade(hr, 2, np.random.default_rng(0), DegradationConfig(blur_sigma=[0.2, 0.2],
                                                                        noise_sigma=[0.0, 0.0]))
    assert clean[8:56, 4:24].std() < 1e-5


def test_bicubic_preserves_constant_and_mean():
    img = np.full((32, 32), 3.0, np.float32)
    np.testing.assert_allclose(bicubic_resize(img, (16, 16)), 3.0, atol=1e-5)
    np.testing.assert_allclose(bicubic_resize(img, (64, 64)), 3.0, atol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="scale"):
        degrade(_phantom(), 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="divisible"):
        degrade(_phantom(66), 4, np.random.default_rng(0))
    bad = _phantom()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        degrade(bad, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="2-D"):
        degrade(np.zeros((2, 8, 8)), 2, np.random.default_rng(0))
