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


def zoom_window(err: np.ndarray, frac: float = 0.3) -> tuple[slice, slice]:
    """The square window (``frac`` of the shorter side) centred where the smoothed error is
    largest: the region a reader should look at closely."""
    from scipy.ndimage import uniform_filter

    err = np.asarray(err, dtype=np.float32)
    side = max(8, int(round(frac * min(err.shape))))
    smooth = uniform_filter(err, size=side, mode="constant")
    cy, cx = np.unravel_index(int(np.argmax(smooth)), err.shape)
    y0 = int(np.clip(cy - side // 2, 0, err.shape[0] - side))
    x0 = int(np.clip(cx - side // 2, 0, err.shape[1] - side))
    return slice(y0, y0 + side), slice(x0, x0 + side)


def panel_figure(
    rows: Sequence[Mapping[str, np.ndarray]],
    out_png: str | Path,
    titles: Mapping[str, str] | None = None,
    reference: str = "hr",
    error_of: str | None = None,
    scores: Sequence[Mapping[str, str]] | None = None,
    suptitle: str | None = None,
    zoom: bool = True,
) -> Path:
    """One row per slice, one column per image kind (e.g. lr, bicubic, sr, hr) + error map.

    Args:
        rows: per slice, ``{kind: (H, W) array}``; all kinds share the HR grid except that
            a smaller ``lr`` is shown nearest-upsampled.
        out_png: output path.
        titles: column titles by kind.
        reference: kind used for the shared grey window and the error map.
        error_of: kind whose |x - reference| is shown in an extra column, with a colour bar
            in the images' intensity units.
        scores: optional per-row per-kind caption (e.g. PSNR).
        zoom: under every slice, the same crop of every column (the window of largest
            error, :func:`zoom_window`), marked by a yellow box on the full view.
    """
    plt = _plt()
    from matplotlib.patches import Rectangle

    kinds = list(rows[0].keys())
    ncol = len(kinds) + (1 if error_of else 0)
    per = 2 if zoom else 1
    fig, axes = plt.subplots(per * len(rows), ncol, figsize=(2.6 * ncol, 2.7 * per * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        ref = np.asarray(row[reference])
        lo, hi = np.percentile(ref, [0.5, 99.5])
        imgs = {}
        for k in kinds:
            img = np.asarray(row[k], dtype=np.float32)
            if img.shape != ref.shape:
                f = ref.shape[0] // img.shape[0]
                img = np.kron(img, np.ones((f, f), np.float32))
            imgs[k] = img
        err = np.abs(imgs[error_of] - ref) if error_of else None
        panels = [(k, imgs[k], dict(cmap="gray", vmin=lo, vmax=hi)) for k in kinds]
        if err is not None:
            emax = max(0.5 * (hi - lo), 1e-6) / 2
            panels.append(("error", err, dict(cmap="inferno", vmin=0, vmax=emax)))
        # display coordinates (rot90): the window is chosen on the displayed error / reference
        win = zoom_window(_display(err if err is not None else ref)) if zoom else None
        for c, (k, img, style) in enumerate(panels):
            ax = axes[per * r, c]
            shown = ax.imshow(_display(img), interpolation="nearest", **style)
            if k == "error":
                cap = f"|{error_of} - {reference}|" if r == 0 else ""
                cb = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
                cb.ax.tick_params(labelsize=6)
            else:
                cap = (titles or {}).get(k, k) if r == 0 else ""
                if scores and k in scores[r]:
                    cap = f"{cap}\n{scores[r][k]}" if cap else scores[r][k]
            ax.set_title(cap, fontsize=8)
            ax.axis("off")
            if win is not None:
                ys, xs = win
                ax.add_patch(Rectangle((xs.start - 0.5, ys.start - 0.5), xs.stop - xs.start,
                                       ys.stop - ys.start, fill=False, ec="yellow", lw=0.8))
                zax = axes[per * r + 1, c]
                zax.imshow(_display(img)[ys, xs], interpolation="nearest", **style)
                zax.set_title("zoom" if c == 0 else "", fontsize=7)
                zax.axis("off")
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
    """Code-activation histograms (paper Fig. 1): every series over the same code order (the
    first series' codes from most to least used), as lines on a log scale, so 2-3 series of
    256 codes stay readable and rarely used codes remain visible."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3))
    first = np.asarray(next(iter(hists.values())), dtype=np.float64)
    order = np.argsort(-first, kind="stable")
    floor = 1e-5  # never-used codes drawn at the bottom of the axis, not dropped
    for label, h in hists.items():
        h = np.asarray(h, dtype=np.float64)[order]
        ax.step(np.arange(len(h)), np.maximum(h, floor), where="mid", label=label, lw=1.2)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xlim(-0.5, len(first) - 0.5)
    ax.set_xlabel(f"codes, ordered by {next(iter(hists))} activation (most used first)")
    ax.set_ylabel("activation probability")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
