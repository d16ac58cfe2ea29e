"""Baselines PGASR has to beat at equal budget, trained by one loop on the same data.

- ``cnn``: a plain residual CNN, VDSR-style (Kim et al., CVPR 2016, shallower): the
  bicubic-upsampled centre LR slice goes through ``depth`` 3x3 conv + ReLU layers and the
  output is added back to the input. If PGASR cannot beat this at the same CPU budget,
  something in the codebook pipeline is the bottleneck (see docs/model.md).
- ``dat``: the paper's strongest competitor, a DAT network (Chen et al., ICCV 2023: residual
  groups of alternating spatial-window / channel self-attention blocks with SGFN), built from
  the same :class:`pgasr.models.dat.DATStage` PGASR's encoder uses, at a CPU width. It works
  on the bicubic-upsampled slice with a global residual, like the CNN (DAT itself upsamples
  at its end with a pixel shuffle; here both baselines and PGASR see the same input).

Both are trained with L1 on the centre slices; no priors, no codebook, no neighbours.
"""

from __future__ import annotations

import inspect
import io
import json
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pgasr.data import schema
from pgasr.data.batches import iter_batches, random_crop, to_lr_units
from pgasr.metrics import psnr, ssim
from pgasr.runtime import tune_allocator

__all__ = ["BASELINES", "DATSR", "ResidualCNN", "build_baseline", "cnn_predict_volume",
           "evaluate_baseline", "load_cnn", "save_cnn", "train_baseline"]


class ResidualCNN(nn.Module):
    """``depth`` conv layers with a global residual: sr = lr_up + f(lr_up).

    Hidden convs use He (Kaiming-normal, ReLU gain) initialisation with zero biases, the
    output conv starts at zero (training starts at bicubic). With PyTorch's default conv init
    the signal shrinks layer by layer and Adam at lr 1e-3 killed most ReLUs of some seeds
    within tens of steps: a 669-step demo run of seed 1 stayed at bicubic (docs/model.md).

    Args:
        depth: number of conv layers (>= 2).
        width: channels of the hidden layers.
    """

    def __init__(self, depth: int = 9, width: int = 48):
        super().__init__()
        if depth < 2:
            raise ValueError("depth must be >= 2")
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        self.body = nn.Sequential(*layers)
        for conv in [m for m in self.body if isinstance(m, nn.Conv2d)][:-1]:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, lr_up: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) bicubic-upsampled LR -> (B, 1, H, W) SR."""
        return lr_up + self.body(lr_up)

    @property
    def arch(self) -> dict:
        """What :func:`build_baseline` needs to rebuild it."""
        return {"arch": "cnn", "depth": sum(isinstance(m, nn.Conv2d) for m in self.body),
                "width": self.body[0].out_channels}


class DATSR(nn.Module):
    """DAT at a CPU width: conv -> ``groups`` DAT residual groups -> conv, + the input.

    Args:
        dim: channels inside the groups.
        groups: residual groups (:class:`pgasr.models.dat.DATStage`).
        depth: transformer blocks per group (alternating spatial / channel attention).
        num_heads: attention heads; window_size: spatial window side.

    Shapes: (B, 1, H, W) bicubic-upsampled LR -> (B, 1, H, W), any H, W. The output conv is
    zero-initialised, so training starts at bicubic, as the CNN's does.
    """

    def __init__(self, dim: int = 32, groups: int = 2, depth: int = 2, num_heads: int = 2,
                 window_size: int = 8):
        super().__init__()
        from pgasr.models.dat import DATStage

        self._arch = {"arch": "dat", "dim": dim, "groups": groups, "depth": depth,
                      "num_heads": num_heads, "window_size": window_size}
        self.conv_in = nn.Conv2d(1, dim, 3, padding=1)
        self.groups = nn.Sequential(*[DATStage(dim, dim, num_heads, window_size, depth,
                                               stage_index=i) for i in range(groups)])
        self.conv_mid = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv_out = nn.Conv2d(dim, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, lr_up: torch.Tensor) -> torch.Tensor:
        f = self.conv_in(lr_up)
        return lr_up + self.conv_out(f + self.conv_mid(self.groups(f)))

    @property
    def arch(self) -> dict:
        return dict(self._arch)


BASELINES = {"cnn": ResidualCNN, "dat": DATSR}
BASELINE_NAMES = {"cnn": "residual_cnn", "dat": "dat"}  # their keys in compare_with_pgasr


def build_baseline(arch: str = "cnn", **kw) -> nn.Module:
    """A fresh baseline by name (``cnn`` / ``dat``), with its keyword arguments."""
    if arch not in BASELINES:
        raise ValueError(f"unknown baseline {arch!r}; choose from {', '.join(BASELINES)}")
    return BASELINES[arch](**kw)


def _centre(rows: Mapping[str, np.ndarray], scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lr_up, hr) centre slices in the LR volume's units, as PGASR's stage 2 sees them."""
    rows = to_lr_units(rows, scale)
    hr = torch.from_numpy(np.ascontiguousarray(rows[schema.HR][:, 1:2], dtype=np.float32))
    lr = torch.from_numpy(np.ascontiguousarray(rows[schema.lr_column(scale)][:, 1:2],
                                               dtype=np.float32))
    lr_up = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False)
    return lr_up, hr


def train_baseline(
    train: Mapping[str, np.ndarray], scale: int, *, seconds: float | None = None,
    epochs: int = 10, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
    depth: int = 9, width: int = 48, arch: str = "cnn", max_steps: int = 0, crop: int = 0,
) -> tuple[nn.Module, dict]:
    """Train on in-memory rows for ``epochs``, until ``seconds`` of wall time pass or after
    ``max_steps`` steps (> 0), whichever comes first. ``arch``: ``cnn`` (``depth`` x
    ``width``) or ``dat`` (:class:`DATSR` defaults). ``crop`` > 0: one random ``crop`` x
    ``crop`` HR window per batch (:func:`pgasr.data.batches.random_crop`, as PGASR's stages
    crop), else whole slices."""
    tune_allocator()  # the same process settings as PGASR's training (pgasr.runtime)
    torch.manual_seed(seed)
    model = ResidualCNN(depth, width) if arch == "cnn" else build_baseline(arch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    t0, steps = time.perf_counter(), 0
    for epoch in range(epochs):
        for rows in iter_batches(train, batch_size, shuffle=True, seed=seed * 7919 + epoch,
                                 drop_last=True):
            lr_up, hr = _centre(random_crop(rows, crop, rng) if crop else rows, scale)
            loss = F.l1_loss(model(lr_up), hr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if (seconds is not None and time.perf_counter() - t0 > seconds) or steps == max_steps:
                return model, {"steps": steps, "epochs": epoch, "seconds": time.perf_counter() - t0}
    return model, {"steps": steps, "epochs": epochs, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate_baseline(model: nn.Module, rows: Mapping[str, np.ndarray], scale: int,
                      batch_size: int = 32) -> dict[str, float]:
    """Mean PSNR/SSIM (per-slice HR range) of the CNN and of bicubic on ``rows``."""
    model.eval()
    out = {"psnr": [], "ssim": [], "bicubic_psnr": [], "bicubic_ssim": []}
    for b in iter_batches(rows, batch_size, shuffle=False):
        lr_up, hr = _centre(b, scale)
        sr = model(lr_up)
        dr = (hr.flatten(1).max(1).values - hr.flatten(1).min(1).values).clamp_min(1e-6)
        out["psnr"].append(psnr(sr, hr, dr))
        out["ssim"].append(ssim(sr, hr, dr))
        out["bicubic_psnr"].append(psnr(lr_up, hr, dr))
        out["bicubic_ssim"].append(ssim(lr_up, hr, dr))
    model.train()
    return {k: float(torch.cat(v).mean()) for k, v in out.items()}


def save_cnn(model: nn.Module, out_dir: str | Path, info: dict) -> Path:
    """Weights (``cnn.pt``, a plain state dict) + ``cnn.json`` (architecture, scale, budget);
    for either baseline (the names are kept for directories written before ``dat``)."""
    from pgasr.provenance import atomic_write_bytes, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(out / "cnn.pt", buf.getvalue())
    atomic_write_text(out / "cnn.json", json.dumps({**model.arch, **info}, indent=1,
                                                   default=str))
    return out


def load_cnn(path: str | Path) -> tuple[nn.Module, dict]:
    """A baseline saved by :func:`save_cnn` (weights loaded without pickle)."""
    p = Path(path)
    if not (p / "cnn.json").is_file() or not (p / "cnn.pt").is_file():
        raise FileNotFoundError(f"{p} holds no baseline model (cnn.pt + cnn.json)")
    info = json.loads((p / "cnn.json").read_text())
    arch = info.get("arch", "cnn")  # directories written before dat existed hold a CNN
    params = inspect.signature(BASELINES.get(arch, ResidualCNN)).parameters
    model = build_baseline(arch, **{k: int(info[k]) for k in params if k in info})
    model.load_state_dict(torch.load(p / "cnn.pt", map_location="cpu", weights_only=True))
    return model.eval(), info


@torch.no_grad()
def cnn_predict_volume(model: nn.Module, lr_volume: np.ndarray, scale: int,
                       head_threshold: float = 0.1) -> np.ndarray:
    """SR of an (x, y, z) LR volume with the intensity contract PGASR uses
    (:mod:`pgasr.intensity`: units from the LR volume's statistics), in the input's units."""
    from pgasr.intensity import intensity_stats

    st = intensity_stats(lr_volume, head_threshold)
    lr = torch.from_numpy(np.moveaxis(st.normalise(lr_volume), 2, 0).copy())[:, None]
    x, y = lr.shape[-2] * scale, lr.shape[-1] * scale
    out = [model(F.interpolate(lr[i : i + 8], size=(x, y), mode="bicubic",
                               align_corners=False))[:, 0] for i in range(0, len(lr), 8)]
    return st.denormalise(np.moveaxis(torch.cat(out).numpy(), 0, 2))


@torch.no_grad()
def score_test_slices(checkpoint: str, test: Mapping[str, np.ndarray], scale: int,
                      models: Mapping[str, nn.Module]) -> dict[str, dict[str, float]]:
    """Mean PSNR/SSIM (per-slice HR range) of bicubic, PGASR (``checkpoint``, as ``pgasr sr``
    runs it) and each model of ``models`` (name -> an lr_up -> SR network) on the same test
    rows; each model also as ``<name>_bp``, with PGASR's data-consistency step, so that step
    is not what decides. Returns ``{"psnr": {name: mean}, "ssim": {name: mean}}``."""
    from pgasr.consistency import back_project
    from pgasr.inference import Predictor

    pred = Predictor.from_checkpoint(checkpoint, device="cpu")
    inf = pred.cfg.inference
    prior_col = schema.prior_lr_column(scale)
    scores: dict[str, dict[str, list]] = {"psnr": {}, "ssim": {}}
    for b in iter_batches(test, 8, shuffle=False):
        lr_up, hr = _centre(b, scale)
        lr = to_lr_units(b, scale)[schema.lr_column(scale)]
        sr = torch.from_numpy(pred.predict_triplets(
            lr, scale, b[prior_col] if prior_col in b else None))[:, None]
        dr = (hr.flatten(1).max(1).values - hr.flatten(1).min(1).values).clamp_min(1e-6)
        imgs = [("bicubic", lr_up)]
        for name, model in models.items():
            c = model(lr_up)
            c_bp = back_project(c[:, 0], torch.from_numpy(np.ascontiguousarray(lr[:, 1])),
                                inf.back_projection_steps, inf.back_projection_weight)
            imgs += [(name, c), (f"{name}_bp", c_bp[:, None])]
        for name, img in (*imgs, ("pgasr", sr)):
            scores["psnr"].setdefault(name, []).append(psnr(img, hr, dr))
            scores["ssim"].setdefault(name, []).append(ssim(img, hr, dr))
    return {k: {m: float(torch.cat(v).mean()) for m, v in d.items()} for k, d in scores.items()}


def compare_with_pgasr(checkpoint: str, data_dir: str, scale: int, *, seconds: float | None,
                       batch_size: int = 16, seed: int = 0, save_to: str | None = None,
                       baselines: tuple[str, ...] = ("cnn",), max_steps: int = 0) -> dict:
    """The issue's yardstick: each baseline (``cnn``, ``dat``) trained for ``seconds`` of wall
    time (or ``max_steps`` steps: equal-step comparisons across seeds on a busy machine) on the
    same training split, then PGASR (``checkpoint``, a stage-2 directory), the
    baselines and bicubic scored on the *same* test slices with the same metric (per-slice HR
    range). ``save_to``: the CNN's directory; another baseline goes beside it
    (``baseline_cnn`` -> ``baseline_dat``).

    Returns ``{"seconds", "steps", "slices", "psnr": {method: mean}, "ssim": {method: mean},
    "baselines": {arch: {"seconds", "steps", "epochs"}}}`` (``seconds``/``steps``: the first
    baseline's).
    """
    from pgasr.data.batches import read_split

    cols = [schema.HR, schema.lr_column(scale), schema.lr_norm_column(scale)]
    train = read_split(data_dir, "train", cols)
    test = read_split(data_dir, "test")
    unknown = [a for a in baselines if a not in BASELINES]
    if unknown or not baselines:
        raise ValueError(f"baselines must be among {', '.join(BASELINES)}, got {baselines}")
    models, infos = {}, {}
    for arch in baselines:
        models[arch], infos[arch] = train_baseline(train, scale, seconds=seconds, epochs=10**6,
                                                   batch_size=batch_size, seed=seed, arch=arch,
                                                   max_steps=max_steps)
        models[arch].eval()
        if save_to:
            dest = Path(save_to)
            if arch != "cnn":
                dest = dest.with_name(dest.name.replace("cnn", arch) if "cnn" in dest.name
                                      else f"{dest.name}_{arch}")
            save_cnn(models[arch], dest, {"scale": scale, "data": str(data_dir), **infos[arch]})
    out = score_test_slices(checkpoint, test, scale,
                            {BASELINE_NAMES[arch]: m for arch, m in models.items()})
    first = infos[baselines[0]]
    return {"seconds": first["seconds"], "steps": first["steps"],
            "slices": int(len(test[schema.HR])), **out,
            "baselines": {a: {k: infos[a][k] for k in ("seconds", "steps", "epochs")}
                          for a in baselines}}
