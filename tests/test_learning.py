"""Learning test (issue: model): on the tiny preset, stage 1 learns to reconstruct and stage 2
beats bicubic on held-out slices. Plain loop, CPU, the CPU-budget recipe of configs/demo.yaml
(crops, lr 1e-3, no GAN, E initialised from Ê) at the tiny model width."""

import sys
from pathlib import Path

import pytest

from pgasr.data.prepare import prepare
from pgasr.training import train_local

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_jobs import tiny_cfg  # noqa: E402

RECIPE = ["model.acg=false", "data.slices_per_volume=12", "stage1.crop=32", "stage1.lr=1e-3",
          "stage1.disc_start=100000", "stage1.dead_code_restart=true", "stage1.dead_code_after=20",
          "stage1.batch_size=4", "stage1.epochs=40", "stage1.lr_halve_every=20",
          "stage1.val_every=40", "stage2.crop=32", "stage2.lr=5e-4", "stage2.batch_size=4",
          "stage2.epochs=30", "stage2.lr_halve_every=15", "stage2.val_every=30",
          "stage2.encoder_init=stage1", "model.codebook_size=64"]


@pytest.mark.slow
def test_stage1_learns_and_stage2_beats_bicubic(tmp_path):
    cfg = tiny_cfg(tmp_path, *RECIPE)
    prepare(cfg, progress=False)
    untrained = tiny_cfg(tmp_path, *RECIPE, "stage1.max_steps=1")
    r0 = train_local(1, untrained, cfg.data.prepared_dir, tmp_path / "s1-0", progress=False)
    r1 = train_local(1, cfg, cfg.data.prepared_dir, tmp_path / "s1", progress=False)
    print("stage 1 val PSNR after 1 step:", r0.metrics["val_psnr"], "after", r1.steps, "steps:",
          r1.metrics["val_psnr"])
    assert r1.metrics["val_psnr"] > r0.metrics["val_psnr"] + 5.0
    r2 = train_local(2, cfg, cfg.data.prepared_dir, tmp_path / "s2",
                     stage1_checkpoint=tmp_path / "s1", progress=False)
    m = r2.metrics
    print("stage 2 val PSNR", m["val_psnr"], "bicubic", m["val_bicubic_psnr"], "gain",
          m["val_gain_db"])
    assert m["val_gain_db"] > 0.0, m

    # the demo's yardstick: residual CNN, PGASR and bicubic on the same test slices
    from pgasr.baseline import compare_with_pgasr

    cmp = compare_with_pgasr(str(tmp_path / "s2"), cfg.data.prepared_dir, 2, seconds=4,
                             baselines=("cnn", "dat"), save_to=str(tmp_path / "baseline_cnn"))
    print("same test slices:", cmp["psnr"])
    assert cmp["steps"] > 0 and cmp["slices"] == cfg.data.slices_per_volume * cfg.data.test_subjects
    assert set(cmp["psnr"]) == set(cmp["ssim"]) == {"bicubic", "residual_cnn", "residual_cnn_bp",
                                                     "dat", "dat_bp", "pgasr"}
    assert set(cmp["baselines"]) == {"cnn", "dat"} and cmp["baselines"]["dat"]["steps"] > 0
    assert (tmp_path / "baseline_dat" / "cnn.json").is_file()  # beside the CNN's directory
    assert all(10 < v < 60 for v in cmp["psnr"].values())
    assert cmp["psnr"]["residual_cnn"] > cmp["psnr"]["bicubic"] - 0.05  # starts as bicubic


def test_dat_baseline_starts_at_bicubic_trains_and_round_trips(tmp_path):
    """The paper's strongest competitor as a baseline (``dat``): identity at init (zero output
    conv), trained by the same loop as the CNN, saved and reloaded without pickle."""
    import numpy as np
    import torch

    from pgasr.baseline import DATSR, build_baseline, load_cnn, save_cnn, train_baseline
    from pgasr.data import schema

    x = torch.randn(2, 1, 20, 28)
    assert torch.equal(DATSR()(x), x)
    with pytest.raises(ValueError, match="unknown baseline 'swinir'"):
        build_baseline("swinir")
    rng = np.random.default_rng(0)
    hr = rng.random((8, 3, 24, 24)).astype(np.float32)
    rows = {schema.HR: hr, schema.lr_column(2): hr[:, :, ::2, ::2].copy(),
            schema.lr_norm_column(2): np.tile([[0.0, 1.0]], (8, 1)).astype(np.float32)}
    model, info = train_baseline(rows, 2, epochs=2, batch_size=4, arch="dat")
    assert info["steps"] == 4 and isinstance(model, DATSR)
    assert train_baseline(rows, 2, epochs=5, batch_size=4, max_steps=3)[1]["steps"] == 3
    # crops as PGASR's stages take them (benchmarks/sample_efficiency.py); a crop must be a
    # multiple of the scale, as random_crop requires
    assert train_baseline(rows, 2, epochs=5, batch_size=4, max_steps=2, crop=12)[1]["steps"] == 2
    with pytest.raises(ValueError, match="multiple of the LR scales"):
        train_baseline(rows, 2, epochs=1, batch_size=4, crop=11)
    assert float(model.conv_out.weight.abs().sum()) > 0  # it trained
    save_cnn(model, tmp_path / "dat", {"scale": 2, **info})
    back, meta = load_cnn(tmp_path / "dat")
    assert meta["arch"] == "dat" and isinstance(back, DATSR)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x))


def test_residual_cnn_keeps_its_relus_alive_at_init():
    """He initialisation: at init every hidden layer of the CNN baseline passes signal (no
    layer with most of its ReLUs dead, activations not vanishing with depth). With PyTorch's
    default conv init the last layers started with ~45 % dead channels and some seeds never
    left bicubic."""
    import torch

    from pgasr.baseline import ResidualCNN

    # head-like images in the LR volume's units: textured tissue (mean ~1) on a zero background
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    head = (((yy - 48) / 40) ** 2 + ((xx - 48) / 32) ** 2 < 1).float()
    tex = torch.nn.functional.avg_pool2d(torch.rand(4, 1, 100, 100), 5, 1)
    x = head * (0.5 + tex)
    for seed in range(5):
        torch.manual_seed(seed)
        m = ResidualCNN()
        h, stds = x, []
        with torch.no_grad():
            for layer in m.body[:-1]:
                h = layer(h)
                if isinstance(layer, torch.nn.ReLU):
                    dead = float((h.amax(dim=(0, 2, 3)) <= 0).float().mean())
                    assert dead < 0.15, (seed, len(stds), dead)
                    stds.append(float(h.std()))
        assert stds[-1] > 0.3 * stds[0], (seed, stds)
        assert torch.equal(m(x), x)  # the output conv starts at zero: bicubic
