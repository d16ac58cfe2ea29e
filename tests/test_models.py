"""Shapes, invariants and ablation wiring of the PGASR networks (tiny sizes, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from pgasr.config import RunConfig
from pgasr.models import (
    SCAB,
    DATStage,
    Decoder,
    Discriminator,
    Encoder,
    Quantizer,
    Stage1Model,
    build_stage1,
    build_stage2,
    count_parameters,
)
from pgasr.models.dat import NEG_INF, ChannelAttention, WindowAttention


def tiny_cfg(**model) -> RunConfig:
    cfg = RunConfig()
    m = cfg.model
    m.channels, m.n_z, m.decoder_channels = [8, 8, 16, 16], 8, 16
    m.num_heads, m.window_size, m.codebook_size = 2, 4, 32
    m.disc_channels, m.disc_layers = 8, 2
    for k, v in model.items():
        setattr(m, k, v)
    return cfg


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- DAT


@pytest.mark.parametrize("hw", [(13, 21), (5, 7), (8, 8), (1, 9)])
@pytest.mark.parametrize("stage_index", [0, 1])  # 1: shifted windows
def test_dat_stage_any_size(hw, stage_index):
    stage = DATStage(3, 8, num_heads=2, window_size=4, depth=2, stage_index=stage_index)
    x = torch.randn(2, 3, *hw, requires_grad=True)
    y = stage(x)
    assert y.shape == (2, 8, *hw)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_dat_stage_alternates_and_shifts():
    s0 = DATStage(8, 8, 2, window_size=4, depth=4, stage_index=0)
    kinds = [b.kind for b in s0.blocks]
    assert kinds == ["spatial", "channel", "spatial", "channel"]
    shifts = [b.attn.shift_size for b in s0.blocks if b.kind == "spatial"]
    assert shifts == [0, 2]  # DAT: every other spatial block shifts by half a window
    s1 = DATStage(8, 8, 2, window_size=4, depth=2, stage_index=1)
    assert s1.blocks[0].attn.shift_size == 2


def test_no_batchnorm_anywhere():
    cfg = tiny_cfg()
    model, disc = build_stage1(cfg)
    s2 = build_stage2(cfg, model)
    for net in (model, disc, s2):
        bad = [n for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert not bad, bad


def test_window_mask_pads_and_shift():
    att = WindowAttention(8, 2, window_size=4, shift=False)
    assert att._mask(8, 8, 1, torch.device("cpu")) is None  # multiple of window, no shift
    m = att._mask(6, 8, 1, torch.device("cpu"))  # 2 padded rows
    assert m.shape == (4, 16, 16)
    # windows of the bottom row (2 and 3): keys in padded rows 6-7 (window rows 2-3) masked
    assert (m[2][:, 8:] == NEG_INF).all() and (m[2][:, :8] == 0).all()
    assert (m[0] == 0).all()
    shifted = WindowAttention(8, 2, window_size=4, shift=True)
    ms = shifted._mask(8, 8, 2, torch.device("cpu"))
    assert ms.shape == (4, 16, 32)  # tiled over 2 context maps
    assert (ms[0] == 0).all() and (ms[-1] == NEG_INF).any()


def _dense_window_attention(att: WindowAttention, q, k, v):
    """Reference for ``WindowAttention.attend``: dense attention over every token of the
    image, restricted to pairs in the same window. In image coordinates a (shifted) window is
    the group ``floor((y - s) / ws)`` along each axis (Swin's cyclic shift + region mask);
    padded positions do not exist. Position bias from the (dy, dx) offset of the pair."""
    b, h, w, c = q.shape
    m, ws, s, heads = k.shape[1], att.window_size, att.shift_size, att.num_heads
    d = c // heads
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)  # (HW,)
    gy, gx = torch.div(ys - s, ws, rounding_mode="floor"), torch.div(xs - s, ws, rounding_mode="floor")
    same = (gy[:, None] == gy[None]) & (gx[:, None] == gx[None])  # (HW, HW)
    pos = att.pos(att.rpe_biases)  # ((2ws-1)^2, heads)
    idx = (ys[:, None] - ys[None] + ws - 1) * (2 * ws - 1) + (xs[:, None] - xs[None] + ws - 1)
    bias = pos[idx.clamp(0, pos.shape[0] - 1)].permute(2, 0, 1)  # (heads, HW, HW)
    logits_mask = torch.where(same, bias, torch.tensor(float("-inf")))  # (heads, HW, HW)
    qh = q.reshape(b, h * w, heads, d).transpose(1, 2)  # (B, heads, HW, d)
    kh = k.reshape(b, m, h * w, heads, d).permute(0, 3, 1, 2, 4).reshape(b, heads, m * h * w, d)
    vh = v.reshape(b, m, h * w, heads, d).permute(0, 3, 1, 2, 4).reshape(b, heads, m * h * w, d)
    logits = qh @ kh.transpose(-1, -2) * d**-0.5 + logits_mask.repeat(1, 1, m)
    out = logits.softmax(-1) @ vh  # (B, heads, HW, d)
    return out.transpose(1, 2).reshape(b, h, w, c)


@pytest.mark.parametrize("hw, shift, m", [((8, 8), False, 1), ((6, 7), False, 1),
                                           ((8, 8), True, 1), ((7, 10), True, 1),
                                           ((6, 9), True, 2), ((9, 8), False, 2)])
def test_window_attention_equals_dense_reference(hw, shift, m):
    """The windowed, padded, shifted SDPA path computes exactly masked dense attention."""
    torch.manual_seed(0)
    att = WindowAttention(8, 2, window_size=4, shift=shift)
    h, w = hw
    q, k, v = torch.randn(2, h, w, 8), torch.randn(2, m, h, w, 8), torch.randn(2, m, h, w, 8)
    got = att.attend(q, k, v)
    ref = _dense_window_attention(att, q, k, v)
    assert got.shape == (2, h, w, 8)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_window_attention_self_mode_rejects_context():
    att = WindowAttention(8, 2, window_size=4)
    x = torch.randn(1, 5, 6, 8)
    assert att(x).shape == x.shape
    with pytest.raises(ValueError, match="context"):
        att(x, torch.randn(1, 2, 5, 6, 8))


def test_channel_attention_shape():
    ca = ChannelAttention(8, 2)
    assert ca(torch.randn(2, 3, 5, 8)).shape == (2, 3, 5, 8)


# --------------------------------------------------------------------------- quantizer


def test_quantizer_lookup_and_losses():
    q = Quantizer(16, 4, init="uniform")
    q.codebook.weight.data = torch.randn(16, 4)
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    out = q(z)
    assert out.distances.shape == (2, 16, 3, 5) and out.distances.dtype == torch.float32
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.cdist(flat, q.codebook.weight.detach()).pow(2)
    assert torch.equal(out.indices.reshape(-1), brute.argmin(1))
    torch.testing.assert_close(
        out.distances.permute(0, 2, 3, 1).reshape(-1, 16), brute, rtol=1e-4, atol=1e-4
    )
    expect = q.codebook.weight[out.indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(out.z_q, expect)
    # Eq. 3: codebook term trains Z only, commitment term trains E only
    g_z = torch.autograd.grad(out.codebook_loss, [z, q.codebook.weight], allow_unused=True)
    assert g_z[0] is None and g_z[1].abs().sum() > 0
    g_c = torch.autograd.grad(out.commit_loss, [z, q.codebook.weight], allow_unused=True)
    assert g_c[0].abs().sum() > 0 and g_c[1] is None
    assert 1.0 <= float(out.perplexity) <= 16.0


def test_quantizer_straight_through():
    q = Quantizer(8, 3, init="uniform")
    z = torch.randn(1, 3, 2, 2, requires_grad=True)
    w = torch.randn(1, 3, 2, 2)
    (q(z).z_q * w).sum().backward()
    torch.testing.assert_close(z.grad, w)  # identity gradient through the argmin


def test_quantizer_data_init_and_usage():
    q = Quantizer(8, 3, init="data").train()
    assert not bool(q.initted)
    z = torch.randn(2, 3, 4, 4)
    q(z)
    assert bool(q.initted)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    # every code is (close to) one of the encoder outputs
    assert torch.cdist(q.codebook.weight.detach(), flat).min(1).values.max() < 0.1
    q.eval()
    before = q.steps_since_used.clone()
    q(z)
    assert torch.equal(before, q.steps_since_used)  # no bookkeeping in eval


def test_quantizer_dead_code_restart():
    q = Quantizer(8, 2, init="uniform", dead_code_restart=True, dead_after=1).train()
    q.codebook.weight.data = torch.arange(16.0).reshape(8, 2)
    z = torch.zeros(1, 2, 2, 2)  # only code 0 is ever used
    q(z)
    assert q.usage()["dead_codes"] == 7
    old = q.codebook.weight.detach().clone()
    q(z + 0.5)  # restart: the 7 dead codes move to (noisy) copies of the batch's vectors
    moved = (q.codebook.weight.detach() != old).any(1)
    assert int(moved.sum()) == 7 and not bool(moved[0])


# --------------------------------------------------------------------------- encoder / decoder / D


@pytest.mark.parametrize("f", [1, 2, 4, 8])
def test_encoder_decoder_latent_factor(f):
    enc = Encoder(2, [8, 8, 16, 16], n_z=4, latent_factor=f, num_heads=2, window_size=4)
    dec = Decoder(4, 16, latent_factor=f, num_heads=2, window_size=4)
    z = enc(torch.randn(1, 2, 16, 24))
    assert z.shape == (1, 4, 16 // f, 24 // f)
    assert dec(z).shape == (1, 1, 16, 24)
    assert isinstance(dec.last_layer, nn.Conv2d) and dec.last_layer.out_channels == 1


def test_encoder_rejects_bad_input():
    enc = Encoder(2, [8, 8, 16, 16], n_z=4, latent_factor=4, num_heads=2, window_size=4)
    with pytest.raises(ValueError, match="expects"):
        enc(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples"):
        enc(torch.randn(1, 2, 18, 16))
    with pytest.raises(ValueError, match="latent_factor"):
        Encoder(2, [8, 8, 16, 16], 4, latent_factor=3)


def test_discriminator_patch_logits():
    d = Discriminator(1, 8, 3)
    assert d(torch.randn(2, 1, 64, 64)).shape == (2, 1, 6, 6)


def test_stage1_model_odd_size_and_acg():
    cfg = tiny_cfg(latent_factor=4)
    model, _ = build_stage1(cfg)
    out = model(torch.randn(2, 1, 30, 22), torch.rand(2, 1, 30, 22))
    assert out.recon.shape == (2, 1, 30, 22)
    assert out.quant.indices.shape == (2, 8, 6)  # ceil(30/4), ceil(22/4)
    with pytest.raises(ValueError, match="prior"):
        model(torch.randn(1, 1, 16, 16))
    no_acg, _ = build_stage1(tiny_cfg(latent_factor=4, acg=False))
    assert no_acg.encoder_hat.conv_in.in_channels == 1
    assert model.encoder_hat.conv_in.in_channels == 2
    assert count_parameters(model) - count_parameters(no_acg) == 8 * 9  # one input channel
    assert no_acg(torch.randn(1, 1, 16, 16)).recon.shape == (1, 1, 16, 16)


# --------------------------------------------------------------------------- SCAB / stage 2


def _trained(scab: SCAB) -> SCAB:
    """A SCAB whose zero-initialised output projections have been moved off zero."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (scab.attn.proj, scab.ffn.fc2):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.3)
    return scab


def test_fresh_scab_is_the_identity():
    scab = SCAB(8, 2, window_size=4)
    z = torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(scab(z, torch.randn(2, 2, 8, 5, 6)), z)


def test_scab_duplicate_context_equals_single_neighbour():
    scab = _trained(SCAB(8, 2, window_size=4, mode="concat"))
    z, n = torch.randn(2, 8, 5, 6), torch.randn(2, 1, 8, 5, 6)
    both = scab(z, n.repeat(1, 2, 1, 1, 1))
    single = scab(z, n)
    torch.testing.assert_close(both, single, rtol=1e-5, atol=1e-5)


def test_scab_literal_mode():
    lit = _trained(SCAB(8, 2, window_size=4, mode="literal"))
    cat = SCAB(8, 2, window_size=4, mode="concat")
    cat.load_state_dict(lit.state_dict())
    z, a, b = torch.randn(1, 8, 4, 4), torch.randn(1, 1, 8, 4, 4), torch.randn(1, 1, 8, 4, 4)
    # keys and values from the same map: literal == attention over that map
    torch.testing.assert_close(lit(z, torch.cat([a, a], 1)), cat(z, a), rtol=1e-5, atol=1e-5)
    # values come from context 1: changing it changes the output
    assert not torch.allclose(lit(z, torch.cat([a, a], 1)), lit(z, torch.cat([a, b], 1)))
    with pytest.raises(ValueError, match="SCAB context"):
        lit(z, a[:, 0])


def _stage2(**model):
    cfg = tiny_cfg(**model)
    s1, _ = build_stage1(cfg)
    return cfg, build_stage2(cfg, s1)


@pytest.mark.parametrize("stage2", [{}, {"fidelity": 1.0, "residual_head": "refine"},
                                    {"residual_head": "features"}], ids=str)
def test_encoding_each_slice_once_equals_forward_on_triplets(stage2):
    """Predictor.predict_volume encodes every slice once and renders each triplet from the
    shared features (encode_slices + render): the same SR as forward() on the triplets,
    with and without the fusion / residual head (whose zero-initialised outputs are moved
    off zero here, so they matter)."""
    cfg = tiny_cfg()
    for k, v in stage2.items():
        setattr(cfg.stage2, k, v)
    s1, _ = build_stage1(cfg)
    s2 = build_stage2(cfg, s1)
    _trained(s2.scab)
    with torch.no_grad():
        for p in (*(s2.residual_head.parameters() if s2.residual_head is not None else ()),
                  *(s2.fidelity.parameters() if s2.fidelity is not None else ())):
            p.add_(torch.randn_like(p) * 0.1)
    s2.eval()
    vol, pri = torch.randn(7, 1, 18, 14), torch.rand(7, 1, 18, 14)  # 7 slices, odd sizes
    with torch.no_grad():
        ref = s2(torch.cat([vol[:-2], vol[1:-1], vol[2:]], 1),
                 torch.cat([pri[:-2], pri[1:-1], pri[2:]], 1))  # 5 triplets
        z, skip = s2.encode_slices(vol, pri, skip=s2.needs_skip)
        trip = torch.stack([z[:-2], z[1:-1], z[2:]], 1)
        out = s2.render(trip, None if skip is None else skip[1:-1], vol[1:-1])
    assert out.shape == ref.shape == (5, 1, 18, 14)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert s2.needs_skip == bool(stage2)
    if s2.needs_skip:
        with pytest.raises(ValueError, match="pass skip"):
            s2.render(trip, None, vol[1:-1])


def test_stage2_edge_members_use_only_centre():
    cfg, s2 = _stage2()
    _trained(s2.scab)
    s2.eval()
    lr_up, pri = torch.randn(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    z = s2.features(lr_up, pri, neighbours=True)
    assert z.shape == (1, 3, 8, 8, 8)
    # the centre's refined features are the same with or without the neighbour outputs
    torch.testing.assert_close(z[:, 1], s2.features(lr_up, pri)[:, 0])
    # t-1 has one neighbour (t): changing slice t+1 leaves it unchanged, but moves the centre
    lr2 = lr_up.clone()
    lr2[:, 2] += 1.0
    z2 = s2.features(lr2, pri, neighbours=True)
    torch.testing.assert_close(z2[:, 0], z[:, 0])
    assert not torch.allclose(z2[:, 1], z[:, 1])


def test_stage2_forward_shapes_and_codes():
    cfg, s2 = _stage2(latent_factor=2)
    lr_up, pri = torch.randn(2, 3, 18, 14), torch.rand(2, 3, 18, 14)
    assert s2(lr_up, pri).shape == (2, 1, 18, 14)
    out = s2(lr_up, pri, hr=torch.randn(2, 1, 18, 14), prior_hr=torch.rand(2, 1, 18, 14),
             neighbours=True, return_all=True)
    assert out.log_probs.shape == (2, 3, 32, 9, 7)
    torch.testing.assert_close(out.log_probs.exp().sum(2), torch.ones(2, 3, 9, 7))
    assert out.log_probs_hr.shape == (2, 32, 9, 7) and out.indices_hr.shape == (2, 9, 7)
    codes = s2.codes(lr_up, pri)
    assert codes.indices.shape == (2, 9, 7) and codes.probs.shape == (2, 32, 9, 7)
    assert torch.equal(codes.probs.argmax(1), codes.indices)  # softmax(-d) peaks at argmin d
    assert s2.hr_codes(torch.randn(1, 1, 18, 14), torch.rand(1, 1, 18, 14)).indices.shape == (1, 9, 7)


def test_stage2_ablation_wiring():
    _, full = _stage2()
    _, no_scab = _stage2(scab=False)
    _, no_acg = _stage2(acg=False)
    assert full.scab is not None and no_scab.scab is None
    assert count_parameters(full, True) > count_parameters(no_scab, True)
    assert count_parameters(full, True) == count_parameters(full.encoder) + count_parameters(full.scab)
    assert no_acg.encoder.conv_in.in_channels == 1 and no_acg.encoder_hat.conv_in.in_channels == 1
    # without SCAB and without neighbours, E only sees the centre slice
    seen = []
    no_scab.encoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    no_scab(torch.randn(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
    full.encoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    full(torch.randn(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
    assert seen == [2, 6]  # SCAB needs all three slices


def test_stage2_freezes_and_copies():
    cfg = tiny_cfg()
    s1, _ = build_stage1(cfg)
    s2 = build_stage2(cfg, s1)
    for name in ("quantizer", "decoder", "encoder_hat"):
        mod = getattr(s2, name)
        assert all(not p.requires_grad for p in mod.parameters())
        assert mod is not getattr(s1, name)  # deep copies: stage 1 stays trainable
    assert all(p.requires_grad for p in s1.parameters())
    s2.train()
    assert not s2.decoder.training and not s2.quantizer.training and not s2.encoder_hat.training
    assert s2.encoder.training
    torch.testing.assert_close(s2.quantizer.codebook.weight, s1.quantizer.codebook.weight)


def test_build_stage2_rejects_mismatch():
    cfg = tiny_cfg()
    s1, _ = build_stage1(cfg)
    bad = copy.deepcopy(cfg)
    bad.model.acg = False
    with pytest.raises(ValueError, match="disagree"):
        build_stage2(bad, s1)
    with pytest.raises(TypeError):
        build_stage2(cfg, nn.Linear(2, 2))


def test_stage2_encoder_init():
    cfg = tiny_cfg()
    s1, _ = build_stage1(cfg)
    x, p = torch.randn(1, 2, 16, 16).split(1, 1)
    scratch = build_stage2(cfg, s1)
    assert not torch.allclose(scratch.encoder(torch.cat([x, p], 1)), s1.encoder_hat(torch.cat([x, p], 1)))
    warm_cfg = copy.deepcopy(cfg)
    warm_cfg.stage2.encoder_init = "stage1"
    warm = build_stage2(warm_cfg, s1)
    torch.testing.assert_close(warm.encoder(torch.cat([x, p], 1)), s1.encoder_hat(torch.cat([x, p], 1)))
    assert all(q.requires_grad for q in warm.encoder.parameters())  # a trainable copy
    assert warm.encoder.conv_in.weight is not warm.encoder_hat.conv_in.weight
    assert all(not q.requires_grad for q in warm.encoder_hat.parameters())
    warm_cfg.stage2.encoder_init = "imagenet"
    with pytest.raises(ValueError, match="encoder_init"):
        build_stage2(warm_cfg, s1)
