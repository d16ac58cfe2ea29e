"""Figure for docs/priors.md: synthetic T2 slices and their priors, both backends.

``python -m pgasr.priors.montage [out.png]`` (default ``docs/img/priors_montage.png``).

Rows: HR slice; tissue prior S_HR; the x4 LR slice (degraded with
:func:`pgasr.data.degradation.degrade`, bicubic-upsampled); tissue prior of that ``lr_up``;
the SAM prior of the HR slice: from the configured SAM weights when there are some
(``$PGASR_SAM_CHECKPOINT``, the path ``pgasr prepare`` uses), else from the *tiny randomly
initialised* SAM that CI runs, and the row says so (its masks carry no anatomy, so it looks
like noise by construction).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def montage_slices(size: int = 128, levels=(0.35, 0.5, 0.62, 0.75)) -> np.ndarray:
    """(len(levels), size, size) z-scored axial slices of synthetic subject 0."""
    from pgasr.config import SynthConfig
    from pgasr.data.synth import synthesize_subject

    vol, _ = synthesize_subject(0, SynthConfig(size=size, slices=60))
    vol = vol.astype(np.float32)
    vol = (vol - vol.mean()) / vol.std()
    ks = [int(f * (vol.shape[2] - 1)) for f in levels]
    return np.stack([np.rot90(vol[:, :, k]) for k in ks]).astype(np.float32)


def sam_for_montage(cfg=None):
    """``(SamPrior, row title)``: SAM with the weights ``cfg`` (default: a ``sam`` config
    reading ``$PGASR_SAM_CHECKPOINT``) points to, else the tiny random SAM, titled as such."""
    from pgasr.priors import PriorConfig, SamPrior, resolve_checkpoint
    from pgasr.priors.sam import build_tiny_sam

    cfg = cfg or PriorConfig(backend="sam")
    weights = resolve_checkpoint(cfg)
    if weights and cfg.sam_model_type != "tiny":
        return SamPrior(cfg), f"SAM prior S_HR\n({cfg.sam_model_type}, {Path(weights).name})"
    tiny = PriorConfig(backend="sam", sam_model_type="tiny", points_per_side=8,
                       pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    return (SamPrior(tiny, model=build_tiny_sam(0)),
            "tiny RANDOM SAM prior\n(no SAM weights: CI model,\nno anatomy)")


def save_montage(path: str | Path = "docs/img/priors_montage.png", size: int = 128,
                 sam_config=None) -> Path:
    """Render the montage (see module docstring) to ``path``; returns the path.
    ``sam_config``: the SAM row's config (default: SAM weights from the environment)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pgasr.data.degradation import degrade
    from pgasr.priors import PriorConfig, TissuePrior, upsample_bicubic

    hr = montage_slices(size)
    rng = np.random.default_rng(0)
    lr_up = np.stack([upsample_bicubic(degrade(s, 4, rng), (size, size)) for s in hr])
    tissue = TissuePrior(PriorConfig(backend="tissue"))
    sam, sam_title = sam_for_montage(sam_config)
    rows = [("HR slice", hr, None), ("tissue prior S_HR", tissue(hr), (0, 1)),
            ("LR x4, bicubic up (lr_up)", lr_up, None),
            ("tissue prior of lr_up", tissue(lr_up), (0, 1)),
            (sam_title, sam(hr), (0, 1))]
    n = len(hr)
    fig, axes = plt.subplots(len(rows), n, figsize=(2.1 * n, 2.15 * len(rows)))
    for r, (title, imgs, lim) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            im = np.asarray(imgs[c], dtype=np.float32)
            vmin, vmax = lim or np.percentile(im, [0.5, 99.5])
            ax.imshow(im, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.suptitle("Anatomical priors S (sum of segments / max) on synthetic T2 slices", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(save_montage(*(sys.argv[1:2] or ["docs/img/priors_montage.png"])))
