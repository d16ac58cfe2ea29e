import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pgasr.metrics import (activation_histogram, head_mask, kl_divergence, load_lpips, lpips_distance,
                           nanmean, psnr, ssim, ssim_split)


@pytest.mark.parametrize("seed", range(5))
def test_psnr_ssim_match_skimage(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(40, 48)).astype(np.float32)
    b = (a + rng.normal(scale=0.1 + 0.2 * seed, size=a.shape)).astype(np.float32)
    dr = float(a.max() - a.min())
    assert float(psnr(b, a, dr)[0]) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=dr), abs=1e-4)
    assert float(ssim(b, a, dr)[0]) == pytest.approx(structural_similarity(a, b, data_range=dr), abs=1e-5)


def test_masked_ssim_is_skimage_map_mean_over_mask():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 48)).astype(np.float32)
    b = (a + rng.normal(scale=0.3, size=a.shape)).astype(np.float32)
    b[:, 30:] += rng.normal(scale=1.0, size=(40, 18)).astype(np.float32)  # worse on the right
    dr = float(a.max() - a.min())
    _, smap = structural_similarity(a, b, data_range=dr, full=True)
    mask = np.zeros(a.shape, bool)
    mask[:, :24] = True
    valid = (slice(3, -3), slice(3, -3))  # skimage averages the map over this region
    want_in = smap[valid][mask[valid]].mean()
    want_out = smap[valid][~mask[valid]].mean()
    assert float(ssim(b, a, dr, mask=mask)[0]) == pytest.approx(want_in, abs=1e-5)
    assert float(ssim(b, a, dr, mask=~mask)[0]) == pytest.approx(want_out, abs=1e-5)
    assert float(ssim(b, a, dr, mask=np.ones_like(mask))[0]) == pytest.approx(
        float(ssim(b, a, dr)[0]), abs=1e-6)
    assert np.isnan(float(ssim(b, a, dr, mask=np.zeros_like(mask))[0]))  # no window centre
    with pytest.raises(ValueError, match="mask shape"):
        ssim(b, a, dr, mask=mask[:-1])


def test_ssim_split_puts_background_artefacts_in_the_background():
    yy, xx = np.mgrid[:64, :64]
    head = ((yy - 32) ** 2 + (xx - 32) ** 2 < 20**2).astype(np.float32)
    rng = np.random.default_rng(1)
    hr = torch.from_numpy(head * (2 + 0.3 * rng.normal(size=head.shape)).astype(np.float32))
    m = head_mask(hr)
    assert m.shape == (1, 64, 64) and bool(m[0, 32, 32]) and not bool(m[0, 0, 0])
    assert bool(m[0, 32, 32 + 21])  # dilated past the edge
    bad_bg = hr + torch.from_numpy((1 - head) * 0.4 * rng.normal(size=head.shape).astype(np.float32))
    dr = float(hr.max() - hr.min())
    h, b = ssim_split(bad_bg, hr, dr)
    assert float(h[0]) > 0.9 > float(b[0])  # the head is nearly intact, the background is not
    assert nanmean(torch.tensor([float("nan"), 1.0, 3.0])) == pytest.approx(2.0)
    assert nanmean(torch.tensor([float("nan")])) is None


def test_known_pair():
    a = np.zeros((8, 8), np.float32)
    b = a + 0.1
    assert float(psnr(b, a, 1.0)[0]) == pytest.approx(20.0, abs=1e-4)
    assert float(ssim(a + 1, a + 1, 1.0)[0]) == pytest.approx(1.0)


def test_batched_and_per_image_range():
    x = torch.rand(3, 1, 16, 16)
    y = x + 0.05 * torch.randn_like(x)
    per = psnr(y, x, torch.tensor([1.0, 2.0, 1.0]))
    assert per.shape == (3,)
    assert per[1] == pytest.approx(float(psnr(y[1], x[1], 2.0)[0]), abs=1e-4)
    assert ssim(y, x, 1.0).shape == (3,)
    with pytest.raises(ValueError):
        psnr(torch.rand(2, 8, 8), torch.rand(2, 8, 9), 1.0)


def test_lpips_unavailable_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("PGASR_LPIPS_WEIGHTS", raising=False)
    h = load_lpips("alex")
    assert not h.available and "not found" in h.reason
    assert lpips_distance(h, torch.rand(1, 8, 8), torch.rand(1, 8, 8), 1.0) is None
    assert h.describe()["lpips"] is None


def test_lpips_code_path_with_random_backbone(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    h = load_lpips("alex", random_backbone=True)
    assert h.available and "random" in h.reason
    x = torch.rand(2, 64, 64)
    d_same = lpips_distance(h, x, x, 1.0)
    d_diff = lpips_distance(h, torch.rand(2, 64, 64), x, 1.0)
    assert d_same.shape == (2,) and torch.allclose(d_same, torch.zeros(2), atol=1e-6)
    assert (d_diff > 0).all()


def test_lpips_loads_weights_from_file(monkeypatch, tmp_path):
    # A torchvision-format AlexNet state dict on disk is picked up through the env var.
    import torchvision

    sd = torchvision.models.alexnet().state_dict()
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(sd, path)
    monkeypatch.setenv("PGASR_LPIPS_WEIGHTS", str(tmp_path))
    h = load_lpips("alex")
    assert h.available and h.reason is None
    w = h.model.net.slice1[0].weight
    assert torch.equal(w, sd["features.0.weight"])


def test_histogram_and_kl():
    h = activation_histogram(torch.tensor([0, 0, 1, 3]), 4)
    np.testing.assert_allclose(h, [0.5, 0.25, 0, 0.25])
    assert kl_divergence(h, h) == pytest.approx(0.0, abs=1e-9)
    q = np.array([0.25, 0.25, 0.25, 0.25])
    assert kl_divergence(h, q) > 0
    assert kl_divergence(q, h) > kl_divergence(h, q)  # q has mass where h has none
    with pytest.raises(ValueError):
        activation_histogram(torch.tensor([5]), 4)
