"""A tiny untrained stage-2 checkpoint and synthetic inputs for the Serve tests and
``benchmarks/serve.py`` (no training, a few seconds on CPU)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

# The tiny model of tests/test_inference.py.
TINY = ["model.channels=[8,8,8,8]", "model.n_z=8", "model.decoder_channels=8",
        "model.window_size=4", "model.num_heads=2", "model.dat_depth=1", "model.disc_channels=8",
        "model.codebook_size=16", "prior.backend=tissue",
        "tracking.mlflow=false"]  # tracked runs are tests/test_tracking.py's


def make_tiny_checkpoint(d: str | Path, scales=(2,), seed: int = 0,
                         extra_meta: dict | None = None) -> Path:
    """Write a stage-2 checkpoint of the tiny model (random weights) to ``d``; ``extra_meta``
    adds training-data facts (``voxel_size``, ``contrast``) a real run records."""
    import torch

    from pgasr.checkpoint import save_checkpoint
    from pgasr.config import load_config
    from pgasr.models import build_stage1, build_stage2
    from pgasr.priors import build_prior

    torch.manual_seed(seed)
    cfg = load_config(None, TINY)
    s1, _ = build_stage1(cfg)
    s1.train()(torch.randn(2, 1, 16, 16), torch.rand(2, 1, 16, 16))  # initialise the codebook
    s2 = build_stage2(cfg, s1)
    d = Path(d)
    save_checkpoint(d, stage=2, modules={"model": s2}, cfg=cfg,
                    meta={"scales": list(scales), "prior": build_prior(cfg.prior).describe(),
                          "metrics": {"val_psnr": 1.0}, **(extra_meta or {})})
    return d


def synthetic_volume(shape=(16, 12, 5), seed: int = 0) -> nib.Nifti1Image:
    """A non-constant float32 LR volume with a 2 x 2 x 3 mm affine."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    blob = (x**2 + y**2 < 0.6).astype(np.float32)[..., None]
    data = (blob * 600 + rng.random(shape) * 100 + 50).astype(np.float32)
    aff = np.array([[2.0, 0, 0, -30], [0, 2.0, 0, -40], [0, 0, 3.0, 10], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, aff)
    img.header["descrip"] = b"pgasr-serve-test"
    return img
