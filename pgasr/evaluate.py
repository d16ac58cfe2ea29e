"""``pgasr evaluate``: a stage-2 checkpoint on the prepared test split (paper Tables 1 and 3).

* PSNR / SSIM (and LPIPS, or "unavailable" with the reason) per slice, averaged per subject,
  then mean +- std over subjects; data range = the subject's HR range (manifest), whole slice.
* The same numbers for bicubic up-sampling of the same LR, side by side.
* Table 3: KL divergence between the code-activation histograms of HR slices (frozen
  stage-1 encoder Ê + HR prior) and LR slices (stage-2 E + SCAB), and code usage.
* Fig. 4-style PNGs: LR / bicubic / PGASR / HR / error map for a few slices; Fig. 1-style
  histogram of code activations.

Writes ``metrics.json`` + ``metrics.md`` + PNGs to the output directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from pgasr import steps
from pgasr.data import schema
from pgasr.data.batches import read_split, to_lr_units
from pgasr.data.prepare import load_manifest
from pgasr.figures import histogram_figure, panel_figure
from pgasr.inference import Predictor
from pgasr.metrics import (activation_histogram, kl_divergence, load_lpips, lpips_distance,
                           nanmean, psnr, ssim, ssim_split)
from pgasr.provenance import EVAL_MARKER, atomic_write_text, check_replaceable

log = logging.getLogger(__name__)

__all__ = ["evaluate", "summarise"]


def summarise(per_subject: dict[str, dict[str, float]], key: str) -> dict[str, float | None]:
    vals = [v[key] for v in per_subject.values() if v.get(key) is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}


def evaluate(
    checkpoint: str | Path | Predictor,
    data_dir: str | Path,
    scale: int,
    out_dir: str | Path,
    split: str = "test",
    max_slices_per_subject: int | None = None,
    n_figures: int = 3,
    progress=None,
) -> dict:
    """Evaluate on a prepared split; returns the metrics dict also written to ``out_dir``.

    ``out_dir`` must be absent, empty or an earlier evaluation (its ``metrics.json``): a
    directory holding anything else raises :class:`pgasr.provenance.ForeignDirectoryError`.

    ``data_dir`` is a prepared directory (with prior columns when the priors step ran;
    otherwise priors are computed here with the checkpoint's backend).
    """
    out_dir = Path(out_dir)
    # writes into out_dir only when it is new, empty or an earlier evaluation (#17)
    check_replaceable(out_dir, EVAL_MARKER)
    pred = checkpoint if isinstance(checkpoint, Predictor) else Predictor.from_checkpoint(checkpoint)
    pred._check_scale(scale)
    manifest = load_manifest(data_dir)
    rows = read_split(data_dir, split)
    lr_col = schema.lr_column(scale)
    if lr_col not in rows:
        raise ValueError(f"{data_dir} has no {lr_col} column (prepared scales: "
                         f"{manifest.get('scales')})")
    norm_col = schema.lr_norm_column(scale)
    unit = rows[norm_col][:, 1].astype(np.float64) if norm_col in rows else None
    rows = to_lr_units(rows, scale)  # what `pgasr sr` computes from the LR volume
    prior_col = schema.prior_lr_column(scale)
    have_priors = prior_col in rows and schema.prior_hr_column() in rows
    if have_priors:
        check_prior_meta(data_dir, pred)
    lp = load_lpips("alex")
    out_dir.mkdir(parents=True, exist_ok=True)

    subjects = sorted(set(rows[schema.SUBJECT].tolist()))
    per_subject: dict[str, dict] = {}
    hr_idx, lr_idx = [], []
    figure_rows, figure_scores = [], []
    model = pred.model
    for si, subj in enumerate(subjects):
        sel = np.where(rows[schema.SUBJECT] == subj)[0]
        sel = sel[np.argsort(rows[schema.SLICE][sel])]
        if max_slices_per_subject:
            keep = np.linspace(0, len(sel) - 1, min(len(sel), max_slices_per_subject)).round()
            sel = sel[keep.astype(int)]
        info = manifest["subjects"].get(subj, {})
        dr = float(info.get("hr_max", 0) - info.get("hr_min", 0)) or None
        if dr is not None and unit is not None:  # the subject's HR range, in LR units
            dr = dr / float(unit[sel[0]])
        hr = rows[schema.HR][sel][:, 1]  # (n, H, W)
        if dr is None:
            dr = float(hr.max() - hr.min())
        lr = rows[lr_col][sel]
        prior_lr = rows[prior_col][sel].astype(np.float32) if have_priors else None
        sr = pred.predict_triplets(lr, scale, prior_lr)
        H, W = hr.shape[-2:]
        bic = steps.upsample_lr(torch.from_numpy(lr[:, 1:2].astype(np.float32)), (H, W))[:, 0]
        hr_t, sr_t = torch.from_numpy(hr), torch.from_numpy(sr)
        m = {
            "psnr": float(psnr(sr_t, hr_t, dr).mean()),
            "ssim": float(ssim(sr_t, hr_t, dr).mean()),
            "bicubic_psnr": float(psnr(bic, hr_t, dr).mean()),
            "bicubic_ssim": float(ssim(bic, hr_t, dr).mean()),
            "slices": int(len(sel)),
        }
        for prefix, img in (("", sr_t), ("bicubic_", bic)):  # where SSIM is won or lost
            head, bg = ssim_split(img, hr_t, dr)
            m[f"{prefix}ssim_head"], m[f"{prefix}ssim_bg"] = nanmean(head), nanmean(bg)
        d_sr = lpips_distance(lp, sr_t, hr_t, dr)
        d_bi = lpips_distance(lp, bic, hr_t, dr)
        m["lpips"] = None if d_sr is None else float(d_sr.mean())
        m["bicubic_lpips"] = None if d_bi is None else float(d_bi.mean())
        per_subject[subj] = m
        # code activations (Table 3): HR through Ê, LR through E + SCAB
        with torch.no_grad():
            dev = pred.device
            lr_up = steps.upsample_lr(torch.from_numpy(lr.astype(np.float32)), (H, W))
            hr3 = torch.from_numpy(rows[schema.HR][sel].astype(np.float32))
            p_lr = p_hr = None
            if pred.acg:
                p_lr = _prior_tensor(pred, rows, prior_col, sel, lr_up, have_priors)
                p_hr = _prior_tensor(pred, rows, schema.prior_hr_column(), sel, hr3, have_priors)
            for i in range(0, len(sel), pred.batch_size):
                s = slice(i, i + pred.batch_size)
                lr_idx.append(model.codes(lr_up[s].to(dev), _at(p_lr, s, dev)).indices.cpu())
                hr_idx.append(model.hr_codes(hr3[s, 1:2].to(dev),
                                             _at(p_hr, s, dev, centre=True)).indices.cpu())
        if si < n_figures:
            k = len(sel) // 2
            up = np.kron(lr[k, 1], np.ones((scale, scale)))
            figure_rows.append({"lr": up, "bicubic": bic[k].numpy(), "pgasr": sr[k], "hr": hr[k]})
            figure_scores.append({
                "bicubic": f"{float(psnr(bic[k], hr_t[k], dr)[0]):.2f} dB",
                "pgasr": f"{float(psnr(sr_t[k], hr_t[k], dr)[0]):.2f} dB",
            })
        if progress is not None:
            progress(si + 1, len(subjects))

    n_codes = pred.cfg.model.codebook_size
    h_hr = activation_histogram(torch.cat(hr_idx), n_codes)
    h_lr = activation_histogram(torch.cat(lr_idx), n_codes)
    result = {
        "checkpoint": str(pred.ckpt.path),
        "data": str(data_dir),
        "split": split,
        "scale": scale,
        "subjects": len(subjects),
        "prior": pred.describe()["prior"],
        "lpips": lp.describe(),
        "conventions": "PSNR/SSIM on whole slices in the LR volume's model units "
                       "(pgasr.intensity), data range = subject HR range; "
                       "per-slice -> per-subject mean -> mean +- std over subjects",
        "summary": {k: summarise(per_subject, k) for k in
                    ("psnr", "ssim", "lpips", "bicubic_psnr", "bicubic_ssim", "bicubic_lpips",
                     "ssim_head", "ssim_bg", "bicubic_ssim_head", "bicubic_ssim_bg")},
        "codebook": {
            "kl_hr_lr": kl_divergence(h_hr, h_lr),
            "usage_hr": float((h_hr > 0).mean()),
            "usage_lr": float((h_lr > 0).mean()),
            # activation probabilities per code (Fig. 1; the bench report plots HR/x2/x4)
            "hist_hr": [float(x) for x in h_hr],
            "hist_lr": [float(x) for x in h_lr],
        },
        "per_subject": per_subject,
    }
    s = result["summary"]
    if s["psnr"]["mean"] is not None and s["bicubic_psnr"]["mean"] is not None:
        result["gain_db"] = s["psnr"]["mean"] - s["bicubic_psnr"]["mean"]
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=1))
    atomic_write_text(out_dir / "metrics.md", to_markdown(result))
    if figure_rows:
        panel_figure(figure_rows, out_dir / f"slices_x{scale}.png", reference="hr",
                     error_of="pgasr", scores=figure_scores,
                     titles={"lr": f"LR x{scale}", "bicubic": "bicubic", "pgasr": "PGASR",
                             "hr": "HR"})
    histogram_figure({"HR (Ê)": h_hr, f"LR x{scale} (E+SCAB)": h_lr},
                     out_dir / f"codes_x{scale}.png",
                     title=f"code activations, KL(HR||LR) = {result['codebook']['kl_hr_lr']:.4f}")
    return result


def _prior_tensor(pred: Predictor, rows, col: str, sel, images: torch.Tensor,
                  have_priors: bool) -> torch.Tensor:
    """Stored priors for the selected rows, or the checkpoint backend's priors of ``images``."""
    if have_priors:
        return torch.from_numpy(rows[col][sel].astype(np.float32))
    flat = images.reshape(-1, *images.shape[-2:]).numpy()
    return torch.from_numpy(pred.prior(flat).astype(np.float32)).reshape(images.shape)


def _at(t: torch.Tensor | None, s: slice, dev, centre: bool = False) -> torch.Tensor | None:
    if t is None:
        return None
    t = t[s, 1:2] if centre else t[s]
    return t.to(dev)


def check_prior_meta(data_dir: str | Path, pred: Predictor) -> None:
    """Priors stored in the shards must come from the backend the checkpoint was trained with."""
    from pgasr.priors import check_backend_match

    meta_path = Path(data_dir) / "priors.json"
    if meta_path.is_file() and pred.ckpt.meta.get("prior"):
        stored = json.loads(meta_path.read_text())
        check_backend_match(pred.ckpt.meta["prior"], stored.get("prior", stored))


def _fmt(s: dict, digits: int = 4) -> str:
    if s.get("mean") is None:
        return "unavailable"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def to_markdown(r: dict) -> str:
    s = r["summary"]
    lines = [
        f"# Evaluation x{r['scale']} on `{r['split']}` ({r['subjects']} subjects)",
        "",
        f"checkpoint `{r['checkpoint']}` · prior backend `{r['prior'].get('backend')}`",
        "",
        "| method | PSNR ↑ | SSIM ↑ | LPIPS ↓ |",
        "|---|---|---|---|",
        f"| Bicubic | {_fmt(s['bicubic_psnr'], 2)} | {_fmt(s['bicubic_ssim'])} | "
        f"{_fmt(s['bicubic_lpips'])} |",
        f"| PGASR | {_fmt(s['psnr'], 2)} | {_fmt(s['ssim'])} | {_fmt(s['lpips'])} |",
        "",
        f"Codebook: KL(HR ‖ LR) = {r['codebook']['kl_hr_lr']:.4f}; usage HR "
        f"{r['codebook']['usage_hr']:.1%}, LR {r['codebook']['usage_lr']:.1%}.",
        "",
        f"LPIPS: {r['lpips'].get('reason') or r['lpips'].get('lpips')}",
        "",
        f"_{r['conventions']}_",
        "",
    ]
    return "\n".join(lines)
