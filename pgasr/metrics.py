"""Image-quality metrics and codebook statistics.

Conventions (stated once, used everywhere: training validation, ``pgasr evaluate``, reports):

* **PSNR / SSIM** are computed per slice on the *whole* slice (background included, as the
  IXI SR literature does), in the data's own units (z-scored intensities), with an explicit
  ``data_range``. ``pgasr evaluate`` uses the subject's HR range (max - min over its kept
  slices), so every slice of a subject is scored against the same peak. Per-slice values are
  averaged per subject, then mean +- std over subjects.
* **SSIM** follows Wang et al. 2004 with a 7x7 uniform window and population covariance
  corrected by N/(N-1), K1 = 0.01, K2 = 0.03 — exactly what ``skimage.metrics.
  structural_similarity`` computes by default (tests check agreement), but in torch so it
  runs batched on GPU inside validation.
* **LPIPS** via the ``lpips`` package. Its backbone (AlexNet/VGG) weights cannot be downloaded
  here; :func:`load_lpips` looks in the torch hub cache and ``PGASR_LPIPS_WEIGHTS`` and, when
  they are missing, reports LPIPS as *unavailable* with a reason — never a fake number.
* **SSIM head / background** (:func:`ssim_split`): the same SSIM map averaged separately over
  the head (:func:`head_mask` of the HR slice) and over the background. Whole-slice SSIM on a
  mostly dark slice is dominated by the background, where a generator's faint artefacts cost
  far more SSIM than PSNR; the split says which region a change came from.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = [
    "LpipsHandle",
    "activation_histogram",
    "kl_divergence",
    "nanmean",
    "load_lpips",
    "lpips_distance",
    "head_mask",
    "psnr",
    "ssim",
    "ssim_split",
]


def _as_4d(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4:
        raise ValueError(f"expected (H,W), (B,H,W) or (B,C,H,W), got shape {tuple(t.shape)}")
    return t.float()


def psnr(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    data_range: float | torch.Tensor,
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, one value per image.

    Args:
        pred, target: (H, W), (B, H, W) or (B, C, H, W).
        data_range: peak-to-peak range of the target's units (scalar or (B,) tensor).

    Returns:
        (B,) tensor of PSNR values (inf where the images are identical).
    """
    p, t = _as_4d(pred), _as_4d(target)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: {tuple(p.shape)} vs {tuple(t.shape)}")
    mse = (p - t).double().pow(2).flatten(1).mean(1)
    dr = torch.as_tensor(data_range, dtype=torch.float64, device=mse.device)
    return (10 * torch.log10(dr**2 / mse)).float()


def ssim(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    data_range: float | torch.Tensor,
    win_size: int = 7,
    mask: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Structural similarity (skimage's default flavour), one value per image.

    Args:
        pred, target: (H, W), (B, H, W) or (B, 1, H, W); single channel.
        data_range: peak-to-peak range (scalar or (B,) tensor).
        win_size: odd uniform-window size (7 as in skimage).
        mask: optional boolean image(s) of the same size; the SSIM map is averaged only over
            window centres inside the mask (NaN for an image whose mask misses the valid region).

    Returns:
        (B,) tensor of mean SSIM over the valid (un-padded) region (and the mask).
    """
    s = _ssim_map(pred, target, data_range, win_size)
    return s.flatten(1).mean(1).float() if mask is None else _masked_mean(s, mask, win_size)


def _ssim_map(pred, target, data_range, win_size: int) -> torch.Tensor:
    """(B, 1, H - win + 1, W - win + 1) float64 SSIM map over the valid window centres."""
    p, t = _as_4d(pred).double(), _as_4d(target).double()
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: {tuple(p.shape)} vs {tuple(t.shape)}")
    if p.shape[1] != 1:
        raise ValueError("ssim expects single-channel images")
    if min(p.shape[-2:]) < win_size:
        raise ValueError(f"image smaller than the SSIM window ({win_size})")
    dr = torch.as_tensor(data_range, dtype=torch.float64, device=p.device).reshape(-1, 1, 1, 1)
    c1, c2 = (0.01 * dr) ** 2, (0.03 * dr) ** 2
    n = win_size * win_size
    cov_norm = n / (n - 1)

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, win_size, stride=1)  # valid region only, like skimage's crop

    ux, uy = filt(p), filt(t)
    uxx, uyy, uxy = filt(p * p), filt(t * t), filt(p * t)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))


def _masked_mean(s: torch.Tensor, mask, win_size: int) -> torch.Tensor:
    """Mean of an SSIM map over the window centres inside ``mask`` (NaN where none are)."""
    m = _as_4d(mask).to(s.device) > 0.5
    r = win_size // 2
    if tuple(m.shape[-2:]) != (s.shape[-2] + 2 * r, s.shape[-1] + 2 * r):
        raise ValueError(f"mask shape {tuple(m.shape)} does not match the images "
                         f"{(s.shape[0], 1, s.shape[-2] + 2 * r, s.shape[-1] + 2 * r)}")
    m = m[..., r : m.shape[-2] - r, r : m.shape[-1] - r].expand_as(s)  # window centres
    n_in = m.flatten(1).sum(1)
    total = torch.where(m, s, torch.zeros_like(s)).flatten(1).sum(1)
    return torch.where(n_in > 0, total / n_in.clamp_min(1), torch.full_like(total, float("nan"))).float()


def head_mask(hr: torch.Tensor | np.ndarray, threshold: float = 0.1, dilate: int = 7
              ) -> torch.Tensor:
    """Head region of HR slices: pixels above ``min + threshold * (max - min)`` of each
    slice, dilated by a ``dilate`` x ``dilate`` square so the scalp edge counts as head.

    Returns a (B, H, W) bool tensor (all False for a constant slice).
    """
    t = _as_4d(hr)[:, :1].double()
    lo = t.flatten(1).min(1).values.reshape(-1, 1, 1, 1)
    hi = t.flatten(1).max(1).values.reshape(-1, 1, 1, 1)
    fg = (t > lo + threshold * (hi - lo)) & (hi > lo)
    if dilate > 1:
        fg = F.max_pool2d(fg.float(), dilate, stride=1, padding=dilate // 2) > 0
    return fg[:, 0]


def nanmean(x: torch.Tensor) -> float | None:
    """Mean over the finite entries (None when there are none): per-region SSIM is NaN for
    slices without that region."""
    x = torch.as_tensor(x).double()
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else None


def ssim_split(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
               data_range: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(SSIM inside :func:`head_mask` of ``target``, SSIM outside it), each (B,)."""
    m = head_mask(target)
    s = _ssim_map(pred, target, data_range, 7)  # one map, two masked means
    return _masked_mean(s, m, 7), _masked_mean(s, ~m, 7)


# --------------------------------------------------------------------------- LPIPS

_TORCHVISION_WEIGHTS = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
}


@dataclass
class LpipsHandle:
    """An LPIPS model, or why there is none. ``model(a, b)`` takes (B,3,H,W) in [-1, 1]."""

    model: nn.Module | None
    reason: str | None
    net: str

    @property
    def available(self) -> bool:
        return self.model is not None

    def describe(self) -> dict:
        return {"lpips": f"lpips-{self.net}" if self.available else None, "reason": self.reason}


def _find_backbone_weights(net: str) -> Path | None:
    name = _TORCHVISION_WEIGHTS[net]
    candidates = []
    env = os.environ.get("PGASR_LPIPS_WEIGHTS")
    if env:
        p = Path(env)
        candidates.append(p / name if p.is_dir() else p)
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / name)
    for c in candidates:
        if c.is_file():
            return c
    return None


def load_lpips(
    net: str = "alex", device: str | torch.device = "cpu", random_backbone: bool = False
) -> LpipsHandle:
    """Load LPIPS without touching the network.

    The ``lpips`` wheel ships its linear calibration layers; the backbone (torchvision
    AlexNet/VGG ImageNet weights) must already be on disk: ``$PGASR_LPIPS_WEIGHTS`` (file or
    directory) or the torch hub cache (``~/.cache/torch/hub/checkpoints``).

    Args:
        net: "alex" or "vgg".
        device: where to put the model.
        random_backbone: build with a randomly initialised backbone (tests only: exercises the
            code path; the numbers are meaningless and the handle says so).

    Returns:
        :class:`LpipsHandle`; ``.model is None`` with a ``.reason`` when weights are missing.
    """
    if net not in _TORCHVISION_WEIGHTS:
        raise ValueError(f"LPIPS net must be one of {sorted(_TORCHVISION_WEIGHTS)}, got {net!r}")
    try:
        import lpips
    except ImportError as e:  # pragma: no cover - lpips is a pinned dependency
        return LpipsHandle(None, f"lpips package not importable: {e}", net)
    weights = _find_backbone_weights(net)
    if weights is None and not random_backbone:
        reason = (
            f"LPIPS unavailable: {net} backbone weights ({_TORCHVISION_WEIGHTS[net]}) not found "
            f"in $PGASR_LPIPS_WEIGHTS or {Path(torch.hub.get_dir()) / 'checkpoints'}; "
            "they cannot be downloaded here"
        )
        log.warning(reason)
        return LpipsHandle(None, reason, net)
    # pnet_rand=True builds the backbone without torchvision's download; we load it ourselves.
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    reason = None
    if weights is not None:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        features = {k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")}
        tv = lpips.pn.tv
        backbone = (tv.alexnet() if net == "alex" else tv.vgg16()).features
        backbone.load_state_dict(features)
        slices = [model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4,
                  model.net.slice5]
        for sl in slices:
            for name, mod in sl.named_children():
                mod.load_state_dict(backbone[int(name)].state_dict())
    else:
        reason = "random backbone (test mode): values are not LPIPS"
    model.eval().requires_grad_(False).to(device)
    return LpipsHandle(model, reason, net)


def lpips_distance(
    handle: LpipsHandle, pred: torch.Tensor, target: torch.Tensor, data_range: float | torch.Tensor
) -> torch.Tensor | None:
    """LPIPS per image for single-channel images, or None when unavailable.

    Images are mapped to [-1, 1] with the target's minimum and ``data_range`` and repeated to
    3 channels.
    """
    if not handle.available:
        return None
    p, t = _as_4d(pred), _as_4d(target)
    dev = next(handle.model.parameters()).device
    lo = t.flatten(1).min(1).values.reshape(-1, 1, 1, 1)
    dr = torch.as_tensor(data_range, dtype=torch.float32).reshape(-1, 1, 1, 1)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return ((x - lo) / dr * 2 - 1).clamp(-1, 1).repeat(1, 3, 1, 1).to(dev)

    with torch.no_grad():
        return handle.model(norm(p), norm(t)).flatten().cpu()


# --------------------------------------------------------------------------- codebook statistics


def activation_histogram(indices: torch.Tensor | np.ndarray, codebook_size: int) -> np.ndarray:
    """Normalised frequency of each code index (paper Fig. 1). Returns (N,) float64 summing to 1."""
    idx = np.asarray(torch.as_tensor(indices).cpu()).ravel().astype(np.int64)
    if idx.size == 0:
        raise ValueError("no code indices given")
    if idx.min() < 0 or idx.max() >= codebook_size:
        raise ValueError("code index out of range")
    h = np.bincount(idx, minlength=codebook_size).astype(np.float64)
    return h / h.sum()


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-10) -> float:
    """KL(p || q) in nats between two histograms (Table 3). ``eps`` smooths empty bins so an
    activation missing in ``q`` gives a large finite value rather than inf."""
    p = np.asarray(p, dtype=np.float64) + eps
    q = np.asarray(q, dtype=np.float64) + eps
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))
