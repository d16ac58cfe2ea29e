"""Pure training steps: loss wiring, GAN schedule, freezing, ablation rows, learning smoke."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import pgasr.losses as L
from pgasr.config import RunConfig
from pgasr.models import build_stage1, build_stage2
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_models import tiny_cfg as _model_tiny_cfg  # noqa: E402

from pgasr.steps import (
    make_stage1_optimizers,
    make_stage2_optimizer,
    stage1_step,
    stage1_update,
    stage2_step,
    stage2_update,
    upsample_lr,
)


def tiny_cfg(**model) -> RunConfig:
    cfg = _model_tiny_cfg(**model)
    cfg.stage1.perceptual = "fallback"
    return cfg


def _image(b: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth structured images (B, C, size, size): blobs + a ramp, roughly z-scored."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = torch.zeros(b, c, size, size)
    for i in range(b):
        for j in range(c):
            cx, cy = (torch.rand(2, generator=g) - 0.5).tolist()
            out[i, j] = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.2) + 0.3 * xx + 0.1 * j
    return (out - out.mean()) / out.std()


def s1_batch(b: int = 2, size: int = 16) -> dict[str, torch.Tensor]:
    hr = _image(b, 1, size)
    return {"hr": hr, "prior_hr": (hr > 0).float()}


def s2_batch(b: int = 2, size: int = 16, scale: int = 2) -> dict[str, torch.Tensor]:
    hr = _image(b, 3, size, seed=1)
    lr = torch.nn.functional.avg_pool2d(hr, scale)
    return {
        "hr": hr,
        "lr": lr,
        "prior_lr": (upsample_lr(lr, (size, size)) > 0).float(),
        "prior_hr": (hr > 0).float(),
    }


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- stage 1


def test_stage1_step_before_disc_start():
    cfg = tiny_cfg()
    cfg.stage1.disc_start = 100
    model, disc = build_stage1(cfg)
    out = stage1_step(model, disc, s1_batch(), cfg, step=5)
    assert out.loss_d is None and "g_adv" not in out.metrics
    assert out.perceptual_kind == "fallback-freq"
    m = out.metrics
    expect = m["l1"] + m["perceptual"] + m["codebook"] + cfg.stage1.beta * m["commit"]
    assert m["loss_g"] == pytest.approx(expect, rel=1e-5)  # Eq. 3 without L_adv
    assert out.recon.shape == (2, 1, 16, 16) and not out.recon.requires_grad


def test_stage1_adversarial_after_disc_start_touches_only_the_right_params():
    cfg = tiny_cfg()
    cfg.stage1.disc_start = 0
    model, disc = build_stage1(cfg)
    out = stage1_step(model, disc, s1_batch(), cfg, step=0)
    assert out.loss_d is not None
    assert 0.0 <= out.metrics["d_weight"] <= cfg.stage1.adv_weight * cfg.stage1.adaptive_weight_max
    out.loss_g.backward(retain_graph=True)
    assert all(p.grad is None for p in disc.parameters())  # G-side loss never trains D
    assert model.decoder.last_layer.weight.grad is not None
    model.zero_grad()
    out.loss_d.backward()
    assert all(p.grad is None for p in model.parameters())  # D-side loss never trains G
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_stage1_update_steps_disc_only_when_on():
    cfg = tiny_cfg()
    cfg.stage1.disc_start = 1
    model, disc = build_stage1(cfg)
    opt_g, opt_d = make_stage1_optimizers(cfg, model, disc)
    d0 = [p.detach().clone() for p in disc.parameters()]
    stage1_update(model, disc, opt_g, opt_d, s1_batch(), cfg, step=0)
    assert all(torch.equal(a, b) for a, b in zip(d0, disc.parameters()))
    m = stage1_update(model, disc, opt_g, opt_d, s1_batch(), cfg, step=1)
    assert "loss_d" in m
    assert any(not torch.equal(a, b) for a, b in zip(d0, disc.parameters()))


def test_stage1_no_acg_ignores_prior_and_missing_prior_errors():
    cfg = tiny_cfg(acg=False)
    model, disc = build_stage1(cfg)
    out = stage1_step(model, disc, {"hr": s1_batch()["hr"]}, cfg, step=0)
    assert torch.isfinite(out.loss_g)
    cfg2 = tiny_cfg()
    model2, disc2 = build_stage1(cfg2)
    with pytest.raises(KeyError, match="prior_hr"):
        stage1_step(model2, disc2, {"hr": s1_batch()["hr"]}, cfg2, step=0)


def test_stage1_bf16_autocast_on_cpu():
    cfg = tiny_cfg()
    cfg.stage1.bf16, cfg.stage1.disc_start = True, 0
    model, disc = build_stage1(cfg)
    opt_g, opt_d = make_stage1_optimizers(cfg, model, disc)
    m = stage1_update(model, disc, opt_g, opt_d, s1_batch(), cfg, step=0)
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())


@pytest.mark.slow
def test_stage1_learns():
    torch.manual_seed(1)  # a fixed init: 40 steps from an unlucky one (seed 0) plateau
    cfg = tiny_cfg()
    cfg.stage1.lr, cfg.stage1.disc_start = 2e-3, 10**9
    model, disc = build_stage1(cfg)
    opt_g, opt_d = make_stage1_optimizers(cfg, model, disc)
    batch = s1_batch(2, 16)
    losses = [stage1_update(model, disc, opt_g, opt_d, batch, cfg, s)["l1"] for s in range(40)]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


# --------------------------------------------------------------------------- stage 2


def _stage2(cfg):
    s1, _ = build_stage1(cfg)
    # train stage 1 a little so codes are not all alike
    opt, _ = make_stage1_optimizers(cfg, s1, None)
    cfg.stage1.disc_start = 10**9
    for s in range(3):
        stage1_update(s1, None, opt, None, s1_batch(), cfg, s)
    s2 = build_stage2(cfg, s1)
    s2.train()
    return s1, s2


def test_stage2_frozen_parts_stay_bit_identical():
    cfg = tiny_cfg()
    _, s2 = _stage2(cfg)
    frozen = {
        n: p.detach().clone()
        for name in ("quantizer", "decoder", "encoder_hat")
        for n, p in getattr(s2, name).named_parameters(prefix=name)
    }
    trainable = {n: p.detach().clone() for n, p in s2.named_parameters() if p.requires_grad}
    assert frozen and set(frozen).isdisjoint(trainable)
    opt = make_stage2_optimizer(cfg, s2)
    for _ in range(2):
        stage2_update(s2, opt, s2_batch(), cfg)
    params = dict(s2.named_parameters())
    for n, v in frozen.items():
        assert params[n].grad is None, n
        assert torch.equal(params[n], v), n
    assert any(not torch.equal(params[n], v) for n, v in trainable.items())
    assert any(n.startswith("scab.") and not torch.equal(params[n], v) for n, v in trainable.items())


def test_stage2_loss_is_eq5():
    cfg = tiny_cfg()
    cfg.stage2.alpha1, cfg.stage2.alpha2 = 0.3, 0.7
    _, s2 = _stage2(cfg)
    out = stage2_step(s2, s2_batch(), cfg)
    m = out.metrics
    assert m["loss"] == pytest.approx(m["l1"] + 0.3 * m["align_s"] + 0.7 * m["align_d"], rel=1e-5)
    assert m["align_s"] >= 0 and m["align_d"] >= 0 and 0 <= m["code_match"] <= 1
    assert out.sr.shape == (2, 1, 16, 16)


# The five rows of Table 2: (acg, align_d, align_s, scab).
TABLE2 = {
    "exp0": (False, False, False, False),
    "exp1": (True, False, False, False),
    "exp2": (True, True, False, False),
    "exp3": (True, False, True, False),
    "exp4": (True, True, True, False),
    "ours": (True, True, True, True),
}


@pytest.mark.parametrize("row", sorted(TABLE2))
def test_table2_rows_run(row, monkeypatch):
    acg, align_d, align_s, scab = TABLE2[row]
    cfg = tiny_cfg(acg=acg, scab=scab)
    cfg.stage2.align_d, cfg.stage2.align_s = align_d, align_s
    _, s2 = _stage2(cfg)
    assert (s2.scab is not None) == scab
    assert s2.encoder.conv_in.in_channels == (2 if acg else 1)
    calls = []
    orig = L.kl_codes
    monkeypatch.setattr("pgasr.losses.kl_codes", lambda p, q: calls.append(1) or orig(p, q))
    batch = s2_batch()
    if not acg:
        batch = {k: batch[k] for k in ("hr", "lr")}  # priors are not needed without ACG
    m = stage2_update(s2, make_stage2_optimizer(cfg, s2), batch, cfg)
    assert ("align_s" in m) == align_s and ("align_d" in m) == align_d
    assert len(calls) == 2 * align_s + align_d  # KL terms actually computed
    if not (align_s or align_d):
        assert m["loss"] == pytest.approx(m["l1"])


def test_stage2_batch_validation():
    cfg = tiny_cfg()
    _, s2 = _stage2(cfg)
    b = s2_batch()
    with pytest.raises(KeyError, match="prior_lr"):
        stage2_step(s2, {k: b[k] for k in ("hr", "lr", "prior_hr")}, cfg)
    with pytest.raises(ValueError, match="triplets"):
        stage2_step(s2, {**b, "hr": b["hr"][:, :1]}, cfg)


def test_stage2_bf16_and_commit():
    cfg = tiny_cfg()
    cfg.stage2.bf16, cfg.stage2.commit_weight = True, 0.25
    _, s2 = _stage2(cfg)
    m = stage2_update(s2, make_stage2_optimizer(cfg, s2), s2_batch(), cfg)
    assert "commit" in m and all(torch.isfinite(torch.tensor(v)) for v in m.values())


def test_stage2_feature_target_pulls_e_towards_e_hat_of_hr():
    cfg = tiny_cfg()
    cfg.stage2.feature_weight = 1.0
    _, s2 = _stage2(cfg)
    b = s2_batch()
    out = stage2_step(s2, b, cfg)
    with torch.no_grad():
        full = s2(upsample_lr(b["lr"], b["hr"].shape[-2:]), b["prior_lr"], hr=b["hr"][:, 1:2],
                  prior_hr=b["prior_hr"][:, 1:2], return_all=True)
    want = torch.nn.functional.mse_loss(full.z, full.z_hr)
    assert out.metrics["feature"] == pytest.approx(float(want), rel=1e-5)
    # the term reaches E and nothing frozen
    s2.zero_grad()
    out.loss.backward()
    assert s2.encoder.conv_in.weight.grad is not None
    assert all(p.grad is None for p in s2.encoder_hat.parameters())
    cfg.stage2.align_d = False
    with pytest.raises(ValueError, match="feature_weight"):
        stage2_step(s2, b, cfg)


def test_stage2_fidelity_fusion_starts_at_the_paper_model_and_learns_only_itself():
    cfg = tiny_cfg()
    s1, plain = _stage2(cfg)
    cfg.stage2.fidelity = 1.0
    fused = build_stage2(cfg, s1).train()
    fused.encoder.load_state_dict(plain.encoder.state_dict())
    fused.scab.load_state_dict(plain.scab.state_dict())
    b = s2_batch()
    lr_up = upsample_lr(b["lr"], b["hr"].shape[-2:])
    with torch.no_grad():  # zero-initialised modulation: exactly G(Z(SCAB(E(.))))
        torch.testing.assert_close(fused(lr_up, b["prior_lr"]), plain(lr_up, b["prior_lr"]))
    frozen = {k: v.clone() for k, v in fused.state_dict().items()
              if k.split(".")[0] in fused.FROZEN}
    opt = make_stage2_optimizer(cfg, fused)
    assert any(p is fused.fidelity.to_shift.weight for g in opt.param_groups for p in g["params"])
    for _ in range(3):
        stage2_update(fused, opt, b, cfg)
    assert float(fused.fidelity.to_shift.weight.detach().abs().sum()) > 0  # the fusion trains
    for k, v in fused.state_dict().items():
        if k in frozen:
            torch.testing.assert_close(v, frozen[k], rtol=0, atol=0)
    with torch.no_grad():  # and now changes the output, through the decoder's last features
        assert not torch.allclose(fused(lr_up, b["prior_lr"]), plain(lr_up, b["prior_lr"]))
    cfg.stage2.fidelity = -1.0
    with pytest.raises(ValueError, match="fidelity"):
        build_stage2(cfg, s1)
    cfg.stage2.fidelity = 0.0
    cfg.stage2.residual_head = "yes"
    with pytest.raises(ValueError, match="residual_head must be one of off, features, refine"):
        build_stage2(cfg, s1)


@pytest.mark.parametrize("head,channels", [("features", 0), ("refine", 0), ("refine", 12)])
def test_stage2_residual_head_starts_at_the_paper_model_and_trains(head, channels):
    cfg = tiny_cfg()
    s1, plain = _stage2(cfg)
    cfg.stage2.residual_head = head
    cfg.stage2.residual_channels = channels
    res = build_stage2(cfg, s1).train()
    res.encoder.load_state_dict(plain.encoder.state_dict())
    res.scab.load_state_dict(plain.scab.state_dict())
    b = s2_batch()
    lr_up = upsample_lr(b["lr"], b["hr"].shape[-2:])
    with torch.no_grad():  # zero-initialised output conv: exactly G(Z(SCAB(E(.))))
        torch.testing.assert_close(res(lr_up, b["prior_lr"]), plain(lr_up, b["prior_lr"]))
    opt = make_stage2_optimizer(cfg, res)
    for _ in range(3):
        stage2_update(res, opt, b, cfg)
    assert float(res.residual_head[-1].weight.detach().abs().sum()) > 0
    with torch.no_grad():
        assert not torch.allclose(res(lr_up, b["prior_lr"]), plain(lr_up, b["prior_lr"]))


@pytest.mark.slow
def test_stage2_learns():
    cfg = tiny_cfg()
    cfg.stage1.lr = 2e-3
    s1, _ = build_stage1(cfg)
    opt1, _ = make_stage1_optimizers(cfg, s1, None)
    cfg.stage1.disc_start = 10**9
    b1 = {"hr": s2_batch()["hr"].reshape(-1, 1, 16, 16)}
    b1["prior_hr"] = (b1["hr"] > 0).float()
    for s in range(30):
        stage1_update(s1, None, opt1, None, b1, cfg, s)
    s2 = build_stage2(cfg, s1)
    s2.train()
    cfg.stage2.lr = 2e-3
    opt = make_stage2_optimizer(cfg, s2)
    batch = s2_batch()
    losses = [stage2_update(s2, opt, batch, cfg)["loss"] for _ in range(30)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pgasr.models import unwrap

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # identical initial weights on every rank
        cfg = tiny_cfg()
        cfg.stage1.disc_start = 1
        model, disc = build_stage1(cfg)
        model, disc = DDP(model), DDP(disc)
        opt_g, opt_d = make_stage1_optimizers(cfg, model, disc)
        for s in range(3):  # step 0 without, steps 1-2 with the adversarial term
            b = s1_batch()
            b["hr"] = b["hr"] + 0.1 * (rank + 1) * torch.randn_like(b["hr"])  # per-rank data
            stage1_update(model, disc, opt_g, opt_d, b, cfg, s)
        s2 = build_stage2(cfg, model)  # frozen before wrapping
        s2.train()
        s2 = DDP(s2)
        opt = make_stage2_optimizer(cfg, s2)
        for _ in range(2):
            b = s2_batch()
            b["lr"] = b["lr"] + 0.1 * (rank + 1) * torch.randn_like(b["lr"])
            stage2_update(s2, opt, b, cfg)
        for net in (unwrap(model), unwrap(disc), unwrap(s2)):
            vec = torch.cat([p.detach().flatten() for p in net.parameters()])
            out = [torch.zeros_like(vec) for _ in range(world)]
            dist.all_gather(out, vec)
            assert torch.equal(out[0], out[1]), f"{type(net).__name__} diverged across ranks"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_workers_stay_in_sync(tmp_path):
    """One forward + one backward per DDP module per step: stage 1 with the GAN term (adaptive
    weight, functional D call) and stage 2 with frozen parts, on 2 gloo workers."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def test_optimiser_settings_from_config():
    from pgasr.training import _clip, _warmup

    cfg = tiny_cfg()
    model, disc = build_stage1(cfg)
    opt_g, opt_d = make_stage1_optimizers(cfg, model, disc)
    assert opt_g.defaults["betas"] == (0.5, 0.9) == opt_d.defaults["betas"]  # taming, GAN on
    cfg.stage1.adam_betas = [0.9, 0.99]
    assert make_stage1_optimizers(cfg, model, None)[0].defaults["betas"] == (0.9, 0.99)
    cfg.stage1.warmup_steps = 4
    assert [_warmup(cfg.stage1, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cfg.stage1.warmup_steps = 0
    assert _warmup(cfg.stage1, 0) == 1.0
    # clipping bounds the global gradient norm of the optimiser's parameters
    out = stage1_step(model, None, s1_batch(), cfg, step=0)
    out.loss_g.backward()
    _clip(opt_g, 1e-3)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    assert float(norm) <= 1e-3 * 1.001
