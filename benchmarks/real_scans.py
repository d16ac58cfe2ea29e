"""Real-scan generalization check: a trained model on real brain MRI it has never seen.

The synthetic cohort the demo trains on is built from the MNI152 template. This check takes
real brain volumes that public Python packages ship in their wheels (no download), degrades
them with the project's own degradation at x2 and x4 (``pgasr degrade``), super-resolves them
through the CLI (``pgasr sr``), and scores PGASR, bicubic and the residual CNN trained on the
same data against the real HR:

* ``nibabel-example4d``: ``nibabel/tests/data/example4d.nii.gz``, frame 0 — a T2*-weighted
  EPI brain volume (128 x 96 x 24, 2 x 2 x 2.2 mm, int16).
* ``dipy-S0``: ``dipy/data/files/S0_10slices.nii.gz`` — the b = 0 image of a diffusion scan,
  T2-weighted EPI (128 x 128 x 10, 2 mm, 12-bit uint16, with EPI ghosting). Needs ``dipy``
  (a dev dependency).

Each HR volume is brought to RAS+, resampled in-plane to the model's training HR voxel size
(from the checkpoint's prepared data; cubic spline, ``scipy.ndimage.zoom``) so the anatomy has
the scale the model was trained on, and cropped to a multiple of 4. Scores: PSNR / SSIM over
whole slices with the HR volume's range as data range (the evaluate convention), and the mean
absolute error in the background (outside the HR head mask), for every slice.

Run (after ``make demo``)::

    .venv/bin/python benchmarks/real_scans.py --checkpoint runs/demo/stage2 \
        --cnn runs/demo/baseline_cnn

writes ``benchmarks/results/real_scans/{real_scans.json, real_scans.md, <volume>_x<s>.png}``;
``pgasr report`` includes the table in ``docs/results.md`` when the JSON exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgasr.background import head_weight  # noqa: E402
from pgasr.baseline import cnn_predict_volume, load_cnn  # noqa: E402
from pgasr.checkpoint import load_checkpoint  # noqa: E402
from pgasr.cli import main as cli  # noqa: E402
from pgasr.config import InferenceConfig  # noqa: E402
from pgasr.consistency import back_project  # noqa: E402
from pgasr.data.degradation import bicubic_resize  # noqa: E402
from pgasr.intensity import intensity_stats  # noqa: E402
from pgasr.metrics import psnr, ssim  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "real_scans"


# ----------------------------------------------------------------------------- sources


def _nibabel_example4d() -> nib.Nifti1Image:
    p = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    img = nib.load(p)
    data = np.asanyarray(img.dataobj)[..., 0]
    return nib.Nifti1Image(data.astype(np.float32), img.affine)


def _dipy_s0() -> nib.Nifti1Image:
    import dipy

    p = Path(dipy.__file__).parent / "data" / "files" / "S0_10slices.nii.gz"
    img = nib.load(p)
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    return nib.Nifti1Image(data.astype(np.float32), img.affine)


SOURCES = {
    "nibabel-example4d": ("T2*-w EPI (nibabel test data, frame 0)", _nibabel_example4d),
    "dipy-S0": ("T2-w EPI, b=0 (dipy test data)", _dipy_s0),
}


def load_sources(names: list[str]) -> dict[str, tuple[str, nib.Nifti1Image]]:
    """The requested real volumes; a package that is not installed is reported, not fatal."""
    out = {}
    for name in names:
        desc, fn = SOURCES[name]
        try:
            out[name] = (desc, fn())
        except ImportError as e:
            print(f"skipping {name}: {e} (install the dev extras: pip install -e '.[dev]')")
    return out


# ----------------------------------------------------------------------------- preparation


def to_model_grid(img: nib.Nifti1Image, voxel_mm: float, multiple: int = 4) -> nib.Nifti1Image:
    """RAS+, in-plane resampled to ``voxel_mm`` (cubic spline), cropped to ``multiple``."""
    from scipy import ndimage

    img = nib.as_closest_canonical(img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    f = zooms[:2] / voxel_mm
    res = ndimage.zoom(data, (f[0], f[1], 1.0), order=3, mode="nearest", grid_mode=True)
    res = np.clip(res, float(data.min()), None)  # no undershoot below the scan's minimum
    x, y = (res.shape[0] // multiple) * multiple, (res.shape[1] // multiple) * multiple
    ox, oy = (res.shape[0] - x) // 2, (res.shape[1] - y) // 2
    res = res[ox : ox + x, oy : oy + y]
    aff = img.affine.copy()
    aff[:3, 0] *= voxel_mm / zooms[0]
    aff[:3, 1] *= voxel_mm / zooms[1]
    # first voxel centre of the resampled grid (grid_mode: voxel edges stay put), then the crop
    corner = img.affine[:3, :3] @ np.array([-0.5, -0.5, 0.0]) + img.affine[:3, 3]
    aff[:3, 3] = corner + aff[:3, :3] @ np.array([0.5 + ox, 0.5 + oy, 0.0])
    out = nib.Nifti1Image(res.astype(np.float32), aff)
    out.set_sform(aff, 1)
    out.set_qform(aff, 1)
    return out


def model_voxel_mm(ckpt_dir: Path) -> float:
    """In-plane HR voxel size the checkpoint was trained on (its prepared data's manifest)."""
    ck = load_checkpoint(ckpt_dir)
    vs = ck.meta.get("voxel_size")
    if vs:
        return float(vs[0])
    for d in (ck.meta.get("data_dir"), ck.cfg.data.prepared_dir):
        m = Path(d or "") / "manifest.json"
        if d and m.is_file():
            subj = next(iter(json.loads(m.read_text())["subjects"].values()))
            if "voxel_size" in subj:
                return float(subj["voxel_size"][0])
            return float(np.linalg.norm(np.asarray(subj["affine"])[:3, 0]))
    raise ValueError(f"{ckpt_dir}: cannot tell the training voxel size; pass --voxel-mm")


# ----------------------------------------------------------------------------- scoring


def _scores(pred: np.ndarray, hr: np.ndarray, bg: np.ndarray, dr: float) -> dict:
    p = torch.from_numpy(np.moveaxis(pred, 2, 0).copy())
    h = torch.from_numpy(np.moveaxis(hr, 2, 0).copy())
    err = np.abs(pred - hr)
    return {"psnr": float(psnr(p, h, dr).mean()), "ssim": float(ssim(p, h, dr).mean()),
            "bg_abs_err": float(err[bg].mean()) if bg.any() else None,
            "bg_mean_out": float(pred[bg].mean()) if bg.any() else None,
            "mean_ratio": float(pred.mean() / hr.mean())}


def background_mask(hr: np.ndarray) -> np.ndarray:
    """Voxels outside the HR head mask (the same mask builder inference uses)."""
    st = intensity_stats(hr)
    w = head_weight(np.moveaxis(st.normalise(hr), 2, 0), InferenceConfig(mask_dilate=0,
                                                                         mask_feather=0))
    return np.moveaxis(w, 0, 2) < 0.5


def _panel(name: str, scale: int, imgs: dict[str, np.ndarray], scores: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = imgs["hr"].shape[2] // 2
    hr = imgs["hr"][:, :, k]
    vmax = float(np.percentile(hr, 99.5))
    keys = ["lr", "bicubic", "cnn", "pgasr", "hr"]
    fig, ax = plt.subplots(2, len(keys), figsize=(3 * len(keys), 6.4))
    for i, key in enumerate(keys):
        im = imgs[key][:, :, k]
        ax[0, i].imshow(np.rot90(im), cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        t = {"lr": f"LR x{scale}", "bicubic": "bicubic", "cnn": "residual CNN", "pgasr": "PGASR",
             "hr": "HR (real)"}[key]
        if key in scores:
            t += f"\n{scores[key]['psnr']:.2f} dB / {scores[key]['ssim']:.3f}"
        ax[0, i].set_title(t, fontsize=9)
        if key in ("bicubic", "cnn", "pgasr"):
            e = ax[1, i].imshow(np.rot90(np.abs(im - hr)), cmap="magma", vmin=0, vmax=0.25 * vmax)
            ax[1, i].set_title(f"|{key} - HR|", fontsize=9)
            fig.colorbar(e, ax=ax[1, i], fraction=0.046)
        for a in ax[:, i]:
            a.axis("off")
    fig.suptitle(f"{name}: real scan, x{scale} (slice {k})", fontsize=10)
    fig.tight_layout()
    p = out / f"{name}_x{scale}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def check(ckpts: dict[int, Path], cnn_dir: Path | None, names: list[str], out: Path,
          voxel_mm: float | None = None, seed: int = 0, dat_dir: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(ckpts.values()))
    vox = voxel_mm or model_voxel_mm(first)
    cnn, cnn_info = load_cnn(cnn_dir) if cnn_dir else (None, None)
    baselines = {"cnn": (cnn, cnn_info)}
    if dat_dir:
        baselines["dat"] = load_cnn(dat_dir)
    ck = load_checkpoint(first)
    results = {"checkpoints": {str(s): str(p) for s, p in ckpts.items()},
               "cnn": str(cnn_dir) if cnn_dir else None, "cnn_scale": (cnn_info or {}).get("scale"),
               "dat": str(dat_dir) if dat_dir else None,
               "voxel_mm": vox, "degradation": ck.cfg.degradation.__dict__, "seed": seed,
               "inference": dict(ck.cfg.inference.__dict__),
               "volumes": {}}
    tmp = Path(tempfile.mkdtemp(prefix="pgasr-realscan-"))
    for name, (desc, img) in load_sources(names).items():
        hr_img = to_model_grid(img, vox)
        hr = np.asarray(hr_img.dataobj, dtype=np.float32)
        hr_path = tmp / f"{name}_hr.nii.gz"
        nib.save(hr_img, hr_path)
        bg = background_mask(hr)
        dr = float(hr.max() - hr.min())
        entry = {"description": desc, "source_shape": list(img.shape),
                 "source_voxel": [float(z) for z in img.header.get_zooms()[:3]],
                 "hr_shape": list(hr.shape), "background_fraction": float(bg.mean()),
                 "scales": {}}
        for scale in (2, 4):
            lr_path, sr_path = tmp / f"{name}_lr_x{scale}.nii.gz", tmp / f"{name}_sr_x{scale}.nii.gz"
            cli(["degrade", "--input", str(hr_path), "--output", str(lr_path), "--scale",
                 str(scale), "--seed", str(seed)])
            lr = np.asarray(nib.load(lr_path).dataobj, dtype=np.float32)
            bic = np.stack([bicubic_resize(lr[:, :, k], hr.shape[:2]) for k in range(lr.shape[2])], 2)
            imgs = {"lr": np.kron(lr, np.ones((scale, scale, 1), np.float32)), "bicubic": bic,
                    "hr": hr}
            row = {"bicubic": _scores(bic, hr, bg, dr)}
            if scale in ckpts:
                t0 = time.perf_counter()
                rc = cli(["sr", "--checkpoint", str(ckpts[scale]), "--scale", str(scale),
                          "--input", str(lr_path), "--output", str(sr_path), "--quiet",
                          "--overwrite"])
                if rc:
                    raise RuntimeError(f"pgasr sr failed on {name} x{scale} (exit {rc})")
                imgs["pgasr"] = np.asarray(nib.load(sr_path).dataobj, dtype=np.float32)
                row["pgasr"] = _scores(imgs["pgasr"], hr, bg, dr)
                row["pgasr"]["seconds"] = time.perf_counter() - t0
            for key, (model, info) in baselines.items():
                if model is None or (info or {}).get("scale") != scale:
                    continue
                imgs[key] = cnn_predict_volume(model, lr, scale)
                row[key] = _scores(imgs[key], hr, bg, dr)
                # the same data-consistency step PGASR's inference applies, for a fair reading
                inf = ck.cfg.inference
                bp = back_project(torch.from_numpy(np.moveaxis(imgs[key], 2, 0).copy()),
                                  torch.from_numpy(np.moveaxis(lr, 2, 0).copy()),
                                  inf.back_projection_steps, inf.back_projection_weight)
                row[f"{key}_bp"] = _scores(np.moveaxis(bp.numpy(), 0, 2), hr, bg, dr)
            imgs.setdefault("cnn", bic)
            imgs.setdefault("pgasr", bic)
            row["figure"] = os.path.relpath(_panel(name, scale, imgs, row, out), out)
            entry["scales"][str(scale)] = row
            msg = "  ".join(f"{k} {v['psnr']:.2f} dB" for k, v in row.items() if isinstance(v, dict))
            print(f"{name} x{scale}: {msg}", flush=True)
        results["volumes"][name] = entry
    (out / "real_scans.json").write_text(json.dumps(results, indent=1))
    (out / "real_scans.md").write_text(to_markdown(results))
    return results


def to_markdown(r: dict, fig_prefix: str = "") -> str:
    """The real-scan table (also embedded in docs/results.md by ``pgasr report``)."""
    bp = r.get("inference", {})
    L = [f"Real brain MRI shipped by public Python packages, resampled to the model's "
         f"{r['voxel_mm']:.2f} mm training grid, degraded with the project's degradation, "
         "super-resolved by `pgasr sr`. PSNR / SSIM over whole slices (data range = HR volume "
         "range); *bg err* = mean |output - HR| outside the HR head mask, in the scan's units; "
         "*mean ratio* = output mean / HR mean. PGASR runs with its inference settings "
         f"({bp.get('back_projection_steps', '?')} back-projection steps of weight "
         f"{bp.get('back_projection_weight', '?')}, background `{bp.get('background', '?')}`); "
         "the baselines trained on the same data (residual CNN; DAT when given) are shown "
         "with and without the same back-projection. Generated by "
         "`benchmarks/real_scans.py`.", "",
         "| volume | scale | method | PSNR | SSIM | bg err | mean ratio |",
         "|---|---|---|---|---|---|---|"]
    for name, v in r["volumes"].items():
        for s, row in v["scales"].items():
            for m in ("bicubic", "cnn", "cnn_bp", "dat", "dat_bp", "pgasr"):
                if m not in row:
                    continue
                x = row[m]
                bg = "-" if x["bg_abs_err"] is None else f"{x['bg_abs_err']:.2f}"
                label = {"bicubic": "bicubic", "cnn": "residual CNN",
                         "cnn_bp": "residual CNN + back-projection", "dat": "DAT",
                         "dat_bp": "DAT + back-projection", "pgasr": "**PGASR**"}[m]
                L.append(f"| {name} | x{s} | {label} | {x['psnr']:.2f} | {x['ssim']:.4f} | {bg} | "
                         f"{x['mean_ratio']:.3f} |")
    L.append("")
    for name, v in r["volumes"].items():
        for s, row in v["scales"].items():
            L.append(f"![{name} x{s}]({fig_prefix}{row['figure']})")
    missing = [s for s in ("2", "4") if s not in r["checkpoints"]]
    if missing:
        L += ["", f"No PGASR checkpoint for x{', x'.join(missing)} was given: those rows show "
              "bicubic (and the CNN where it was trained for that scale) only."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="stage-2 checkpoint (x2, or its scale)")
    p.add_argument("--checkpoint-x4", help="stage-2 checkpoint for x4")
    p.add_argument("--cnn", help="residual CNN directory (runs/demo/baseline_cnn)")
    p.add_argument("--dat", help="DAT baseline directory (runs/demo/baseline_dat, from "
                                 "jobs/pipeline.py --baselines cnn,dat)")
    p.add_argument("--volumes", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    p.add_argument("--voxel-mm", type=float, help="override the model's training voxel size")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ck = load_checkpoint(a.checkpoint)
    ckpts = {int(ck.meta.get("scales", [ck.cfg.stage2.scale])[0]): Path(a.checkpoint)}
    if a.checkpoint_x4:
        ckpts[4] = Path(a.checkpoint_x4)
    check(ckpts, Path(a.cnn) if a.cnn else None, a.volumes, Path(a.out), a.voxel_mm,
          dat_dir=Path(a.dat) if a.dat else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
