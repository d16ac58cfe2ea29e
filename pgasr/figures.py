"""Figures for reports: slice panels with error maps (paper Fig. 4), code histograms (Fig. 1).

Matplotlib with the Agg backend, imported lazily; every function writes one PNG and returns
its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _display(img: np.ndarray) -> np.ndarray:
    """RAS slice (rows = x, cols = y) -> radiological-looking display (anterior up)."""
    return np.rot90(np.asarray(img, dtype=np.float32))


def panel_figure(
    rows: Sequence[Mapping[str, np.ndarray]],
    out_png: str | Path,
    titles: Mapping[str, str] | None = None,
    reference: str = "hr",
    error_of: str | None = None,
    scores: Sequence[Mapping[str, str]] | None = None,
    suptitle: str | None = None,
) -> Path:
    """One row per slice, one column per image kind (e.g. lr, bicubic, sr, hr) + error map.

    Args:
        rows: per slice, ``{kind: (H, W) array}``; all kinds share the HR grid except that
            a smaller ``lr`` is shown nearest-upsampled.
        out_png: output path.
        titles: column titles by kind.
        reference: kind used for the shared grey window and the error map.
        error_of: kind whose |x - reference| is shown in an extra column.
        scores: optional per-row per-kind caption (e.g. PSNR).
    """
    plt = _plt()
    kinds = list(rows[0].keys())
    ncol = len(kinds) + (1 if error_of else 0)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.6 * ncol, 2.7 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        ref = np.asarray(row[reference])
        lo, hi = np.percentile(ref, [0.5, 99.5])
        for c, k in enumerate(kinds):
            img = np.asarray(row[k])
            if img.shape != ref.shape:
                f = ref.shape[0] // img.shape[0]
                img = np.kron(img, np.ones((f, f)))
            ax = axes[r, c]
            ax.imshow(_display(img), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            cap = (titles or {}).get(k, k) if r == 0 else ""
            if scores and k in scores[r]:
                cap = f"{cap}\n{scores[r][k]}" if cap else scores[r][k]
            ax.set_title(cap, fontsize=8)
            ax.axis("off")
        if error_of:
            err = np.abs(np.asarray(row[error_of]) - ref)
            ax = axes[r, -1]
            ax.imshow(_display(err), cmap="inferno", vmin=0, vmax=max(0.5 * (hi - lo), 1e-6) / 2)
            ax.set_title(f"|{error_of} - {reference}|" if r == 0 else "", fontsize=8)
            ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def histogram_figure(
    hists: Mapping[str, np.ndarray], out_png: str | Path, title: str = "codebook activations"
) -> Path:
    """Code-activation histograms (paper Fig. 1): one bar series per label over code index."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3))
    n = len(next(iter(hists.values())))
    width = 0.8 / len(hists)
    for i, (label, h) in enumerate(hists.items()):
        ax.bar(np.arange(n) + i * width, h, width=width, label=label, alpha=0.85)
    ax.set_xlabel("code index")
    ax.set_ylabel("activation probability")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
