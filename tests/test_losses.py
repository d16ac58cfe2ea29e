"""Loss terms of Eq. 3-5: values, zero points, gradients, explicit perceptual fallback."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn as nn

import pgasr.losses as L
from pgasr.models import code_log_probs


@pytest.fixture(autouse=True)
def _clean_cache():
    L._PERCEPTUAL_CACHE.clear()
    torch.manual_seed(0)
    yield
    L._PERCEPTUAL_CACHE.clear()


def test_hinge_losses():
    real, fake = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -3.0)
    assert float(L.hinge_d_loss(real, fake)) == 0.0  # both beyond the margin
    assert float(L.hinge_d_loss(torch.zeros(1), torch.zeros(1))) == 1.0
    assert float(L.generator_adv_loss(fake)) == 3.0


def test_adaptive_weight_is_grad_norm_ratio_and_clamped():
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    y = x @ w
    rec, g = y.abs().mean(), (3 * y).mean()
    gr = torch.autograd.grad(rec, w, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
    aw = L.adaptive_weight(rec, g, w)
    torch.testing.assert_close(aw, gr / (gg + 1e-4))
    assert not aw.requires_grad
    tiny_g = 1e-12 * y.mean()
    assert float(L.adaptive_weight(rec, tiny_g, w, max_weight=10.0)) == 10.0


def test_frequency_gradient_loss():
    loss = L.FrequencyGradientLoss()
    a = torch.randn(2, 1, 16, 16)
    assert float(loss(a, a.clone())) == 0.0
    assert float(loss(a, a + 0.1 * torch.randn_like(a))) > 0
    blurred = nn.functional.avg_pool2d(a, 3, 1, 1)
    assert float(loss(blurred, a)) > 0
    z = torch.zeros(1, 1, 8, 8, requires_grad=True)
    loss(z, torch.zeros(1, 1, 8, 8)).backward()  # |F| = 0: gradient must stay finite
    assert torch.isfinite(z.grad).all()


def test_perceptual_fallback_is_explicit(monkeypatch, caplog):
    monkeypatch.setattr(L, "_load_lpips", lambda net, device: (None, "no weights here"))
    with caplog.at_level(logging.WARNING, logger="pgasr.losses"):
        p = L.PerceptualLoss("auto")
    assert p.kind == "fallback-freq" and p.reason == "no weights here"
    assert "fallback-freq" in caplog.text
    with pytest.raises(RuntimeError, match="no weights here"):
        L.PerceptualLoss("lpips")
    assert L.PerceptualLoss("fallback").kind == "fallback-freq"
    none = L.PerceptualLoss("none")
    assert none.kind == "none" and float(none(torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))) == 0
    with pytest.raises(ValueError, match="perceptual"):
        L.PerceptualLoss("vgg-ish")


def test_perceptual_uses_lpips_when_available(monkeypatch):
    lpips = pytest.importorskip("lpips")
    from pgasr.metrics import load_lpips

    handle = load_lpips("alex", random_backbone=True)  # exercises the path; values meaningless
    monkeypatch.setattr(L, "_load_lpips", lambda net, device: (handle.model, None))
    p = L.PerceptualLoss("auto")
    assert p.kind == "lpips-alex"
    a = torch.randn(2, 1, 32, 32)
    assert float(p(a, a.clone())) == pytest.approx(0.0, abs=1e-6)
    pred = (a + 0.3 * torch.randn_like(a)).requires_grad_(True)
    val = p(pred, a)
    val.backward()
    assert float(val.detach()) > 0 and pred.grad.abs().sum() > 0
    assert lpips is not None


def test_get_perceptual_caches():
    assert L.get_perceptual("fallback") is L.get_perceptual("fallback")


def test_code_log_probs():
    d = torch.rand(2, 16, 3, 3) * 10
    lp = code_log_probs(d, tau=1.0)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(2, 3, 3))
    assert torch.equal(lp.argmax(1), d.argmin(1))
    sharp = code_log_probs(d, tau=0.1)
    assert (sharp.exp().amax(1) >= lp.exp().amax(1) - 1e-6).all()
    with pytest.raises(ValueError, match="tau"):
        code_log_probs(d, 0.0)


def test_kl_properties():
    p = torch.log_softmax(torch.randn(2, 8, 3, 3), 1)
    q = torch.log_softmax(torch.randn(2, 8, 3, 3), 1)
    assert float(L.kl_codes(p, p)) == pytest.approx(0.0, abs=1e-7)
    kl_pq, kl_qp = float(L.kl_codes(p, q)), float(L.kl_codes(q, p))
    assert kl_pq > 0 and kl_qp > 0 and kl_pq != pytest.approx(kl_qp)
    manual = (p.exp() * (p - q)).sum(1).mean()
    assert kl_pq == pytest.approx(float(manual))
    # two-point sanity value: KL([1, 0] || [.5, .5]) = log 2
    one = torch.log(torch.tensor([1.0, 1e-30]).reshape(1, 2, 1, 1))
    half = torch.log(torch.tensor([0.5, 0.5]).reshape(1, 2, 1, 1))
    assert float(L.kl_codes(one, half)) == pytest.approx(math.log(2), rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        L.kl_codes(p, q[:, :4])


def test_align_losses():
    a, b, c = (torch.log_softmax(torch.randn(1, 8, 2, 2), 1) for _ in range(3))
    s = L.align_s_loss(a, b, c)
    assert float(s) == pytest.approx(float(L.kl_codes(a, b) + L.kl_codes(b, c)))
    assert float(L.align_s_loss(a, a, a)) == pytest.approx(0.0, abs=1e-7)
    lt = torch.randn(1, 8, 2, 2, requires_grad=True)
    lh = torch.randn(1, 8, 2, 2, requires_grad=True)
    L.align_d_loss(torch.log_softmax(lt, 1), torch.log_softmax(lh, 1)).backward()
    assert lt.grad.abs().sum() > 0 and lh.grad is None  # a_HR is a fixed target


def test_align_d_forward_direction():
    lt = torch.randn(2, 8, 3, 3, requires_grad=True)
    lh = torch.randn(2, 8, 3, 3, requires_grad=True)
    a, h = torch.log_softmax(lt, 1), torch.log_softmax(lh, 1)
    fwd = L.align_d_loss(a, h, "forward")
    assert float(fwd) == pytest.approx(float(L.kl_codes(h, a)))
    assert float(fwd) != pytest.approx(float(L.align_d_loss(a, h, "paper")))
    fwd.backward()
    assert lt.grad.abs().sum() > 0 and lh.grad is None
    with pytest.raises(ValueError, match="align_d_direction"):
        L.align_d_loss(a, h, "backward")
