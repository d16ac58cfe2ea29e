"""The whole pipeline on one Ray cluster (what ``make demo`` runs):

synth -> prepare -> priors -> stage 1 -> stage 2 (one per scale in ``stage2.scales``, on the
shared stage 1: ``RUN_DIR/stage2`` for x2, ``RUN_DIR/stage2_x4``) -> baseline (a residual CNN trained for the
wall time of stages 1 + 2; scored beside PGASR and bicubic on the same test slices, with and
without PGASR's back-projection) ->
evaluate -> ``pgasr sr`` on one held-out volume -> report (Markdown + PNGs: LR / bicubic /
PGASR / HR / error map).

``python jobs/pipeline.py --config configs/demo.yaml`` (local cluster) or
``ray job submit --working-dir . -- python jobs/pipeline.py --config configs/demo.yaml``.
Every step skips work whose output is already up to date (prepared data fingerprint, prior
cache); ``--from-stage`` restarts from a given step.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import ROOT, init_ray, job_parser, load, run_job  # noqa: E402
from pgasr.checkpoint import stage_dirname  # noqa: E402

STEPS = ("prepare", "priors", "stage1", "stage2", "baseline", "evaluate", "sr", "report")


def _held_out_volume(cfg, scale: int, out_dir: Path) -> tuple[Path, Path]:
    """The first test subject's HR and LR volumes as `pgasr prepare` exported them (the LR is
    exactly what the evaluate step scores, on the grid the model sees)."""
    import shutil

    from pgasr.data.prepare import LR_VOLUMES, load_manifest

    man = load_manifest(cfg.data.prepared_dir)
    subject = man["split"]["test"][0]
    vols = Path(cfg.data.prepared_dir) / LR_VOLUMES
    hr, lr = vols / f"{subject}_hr.nii.gz", vols / f"{subject}_lr_x{scale}.nii.gz"
    if not lr.is_file():
        raise FileNotFoundError(f"{lr} missing: prepare the data again (pgasr prepare --force)")
    shutil.copyfile(lr, out_dir / lr.name)
    return hr, out_dir / lr.name


def _report(cfg, timings: dict, eval_res: dict, sr_path: Path, hr_path: Path, lr_path: Path,
            out: Path, baseline: dict | None = None) -> Path:
    import nibabel as nib
    import numpy as np

    from pgasr.figures import panel_figure
    from pgasr.metrics import psnr, ssim

    scale = cfg.stage2.scale
    hr = np.asarray(nib.load(hr_path).dataobj, dtype=np.float32)
    sr = np.asarray(nib.load(sr_path).dataobj, dtype=np.float32)
    lr = np.asarray(nib.load(lr_path).dataobj, dtype=np.float32)
    from pgasr.data.degradation import bicubic_resize

    ks = [hr.shape[2] // 2 - hr.shape[2] // 8, hr.shape[2] // 2, hr.shape[2] // 2 + hr.shape[2] // 8]
    rows, scores = [], []
    dr = float(hr.max() - hr.min())
    for k in ks:
        bic = bicubic_resize(lr[:, :, k], hr.shape[:2])
        rows.append({"lr": lr[:, :, k], "bicubic": bic, "pgasr": sr[:, :, k], "hr": hr[:, :, k]})
        scores.append({
            "bicubic": f"{float(psnr(bic, hr[:, :, k], dr)[0]):.2f} dB / "
                       f"{float(ssim(bic, hr[:, :, k], dr)[0]):.3f}",
            "pgasr": f"{float(psnr(sr[:, :, k], hr[:, :, k], dr)[0]):.2f} dB / "
                     f"{float(ssim(sr[:, :, k], hr[:, :, k], dr)[0]):.3f}",
        })
    png = panel_figure(rows, out / "volume_slices.png", reference="hr", error_of="pgasr",
                       scores=scores, titles={"lr": f"LR x{scale}", "bicubic": "bicubic",
                                              "pgasr": "PGASR", "hr": "HR"},
                       suptitle=f"held-out volume {hr_path.name} (PSNR / SSIM per slice)")
    s = eval_res["summary"]
    md = [
        f"# PGASR demo report ({cfg.name})",
        "",
        f"Test split, x{scale}: PGASR **{s['psnr']['mean']:.2f} dB** / SSIM "
        f"{s['ssim']['mean']:.4f} vs bicubic {s['bicubic_psnr']['mean']:.2f} dB / "
        f"{s['bicubic_ssim']['mean']:.4f} — gain **{eval_res.get('gain_db', 0):+.2f} dB** "
        f"over {eval_res['subjects']} test subject(s).",
        "",
        f"Prior backend: `{eval_res['prior'].get('backend')}`. LPIPS: "
        f"{eval_res['lpips'].get('reason') or 'available'}.",
        "",
        f"![slices]({png.name})",
        "",
        f"![test slices](eval/slices_x{scale}.png)",
        "",
        f"![codes](eval/codes_x{scale}.png)",
        "",
        *(_baseline_lines(baseline) if baseline else []),
        "| step | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in timings.items()],
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _baseline_lines(b: dict) -> list[str]:
    p, q = b["psnr"], b["ssim"]
    runs = b.get("baselines") or {"cnn": {"seconds": b["seconds"], "steps": b["steps"]}}
    what = {"cnn": "the residual CNN (`pgasr.baseline.ResidualCNN`, 9 conv layers)",
            "dat": "DAT (`pgasr.baseline.DATSR`)"}
    trained = "; ".join(f"{what[a]} {r['seconds']:.0f} s ({r['steps']} steps)"
                        for a, r in runs.items())
    return [
        f"Same test slices, per-slice PSNR / SSIM (HR range of each slice); L1-trained "
        f"baselines at equal wall time: {trained}; PGASR's stages 1 + 2 took "
        f"{b.get('pgasr_train_seconds') or float('nan'):.0f} s in this run:",
        "",
        "| method | PSNR (dB) | SSIM | gain over bicubic (dB) |",
        "|---|---:|---:|---:|",
        *[f"| {m} | {p[m]:.2f} | {q[m]:.4f} | {p[m] - p['bicubic']:+.2f} |"
          for m in ("bicubic", "residual_cnn", "residual_cnn_bp", "dat", "dat_bp", "pgasr")
          if m in p],
        "",
        "`*_bp`: the baseline followed by the back-projection PGASR's inference applies "
        "(`inference.back_projection_steps`).",
        "",
    ]


def _at_scale(cfg, scale: int):
    """``cfg`` with its stage 2 at ``scale`` (its own run name and checkpoint directory)."""
    import copy

    c = copy.deepcopy(cfg)
    c.stage2.scale = int(scale)
    return c


def run_pipeline(cfg, address=None, from_step: str = "prepare",
                 baseline_seconds: float | None = None,
                 baselines: tuple[str, ...] = ("cnn",)) -> dict:
    if from_step not in STEPS:
        raise ValueError(f"--from-stage must be one of {STEPS}")
    from pgasr.baseline import BASELINES

    if not baselines or any(b not in BASELINES for b in baselines):
        raise ValueError(f"--baselines must be a comma-separated subset of "
                         f"{', '.join(BASELINES)}, got {','.join(baselines) or 'nothing'}")
    from pgasr.tracking import Run

    init_ray(address, cfg)
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = STEPS[STEPS.index(from_step):]
    # the pipeline's MLflow run: config, timings, test-split scores, the report; the stage
    # runs are its children
    tracked = Run.create(cfg, "pipeline", tags={"pgasr.steps": ",".join(todo)})
    with tracked:
        res = _run_steps(cfg, address, todo, baseline_seconds, baselines, out, tracked)
        _track_results(tracked, res, out)
    return res


def _track_results(tracked, res: dict, out: Path) -> None:
    """Timings, the test-split scores and the report of a finished pipeline, into its run."""
    tracked.log_metrics({f"seconds_{k}": v for k, v in res["timings"].items()})
    ev = res.get("eval")
    if ev:
        s = ev["summary"]
        tracked.log_metrics({"test_psnr": s["psnr"]["mean"], "test_ssim": s["ssim"]["mean"],
                             "test_bicubic_psnr": s["bicubic_psnr"]["mean"],
                             "test_bicubic_ssim": s["bicubic_ssim"]["mean"],
                             "test_gain_db": ev.get("gain_db", 0.0)})
    b = res.get("baseline")
    if b:
        tracked.log_metrics({f"baseline_psnr_{k}": v for k, v in b["psnr"].items()})
    for f in ("report.md", "volume_slices.png", "baseline.json"):
        tracked.log_artifact(out / f, "report")


def _run_steps(cfg, address, todo, baseline_seconds, baselines, out: Path, tracked) -> dict:
    from jobs.evaluate import run_evaluate
    from jobs.prepare import run_prepare
    from jobs.priors import run_priors
    from jobs.train_stage import run_stage

    timings: dict[str, float] = {}
    scale = cfg.stage2.scale

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        r = fn(*a, **kw)
        timings[name] = time.perf_counter() - t0
        return r

    if "prepare" in todo:
        timed("prepare", run_prepare, cfg, address)
    if "priors" in todo and cfg.model.acg:
        timed("priors", run_priors, cfg, address)
    if "stage1" in todo:
        timed("stage1", run_stage, 1, cfg, address, parent=tracked)
    # One stage 2 per scale on the shared stage 1 (RUN_DIR/stage2, RUN_DIR/stage2_x4, ...);
    # the baseline, sr and report steps use the x{stage2.scale} model.
    extra = [s for s in cfg.stage2.scales if s != scale]
    if "stage2" in todo:
        timed("stage2", run_stage, 2, cfg, address, parent=tracked)
        for s in extra:
            timed(f"stage2_x{s}", run_stage, 2, _at_scale(cfg, s), address, parent=tracked)
    baseline = None
    if "baseline" in todo:
        from pgasr.baseline import compare_with_pgasr
        from jobs.train_stage import data_dir

        # The CNN gets the same training wall time as PGASR's stages 1 + 2, on the same
        # cores, in the same run (an equal-budget comparison).
        pgasr_s = sum(timings.get(k, 0.0) for k in ("stage1", "stage2"))
        budget = baseline_seconds or pgasr_s
        if not budget:
            raise ValueError("the baseline step needs --baseline-seconds when stages 1 and 2 "
                             "did not run in this invocation")
        baseline = timed("baseline", compare_with_pgasr, str(out / stage_dirname(2, scale)),
                         str(data_dir(cfg)), scale, seconds=budget, seed=cfg.seed,
                         save_to=str(out / "baseline_cnn"), baselines=tuple(baselines))
        baseline["pgasr_train_seconds"] = pgasr_s or None
        (out / "baseline.json").write_text(json.dumps(baseline, indent=1))
        print("same test slices, PSNR: " + ", ".join(
            f"{k} {v:.2f} dB" for k, v in baseline["psnr"].items()), flush=True)
    elif (out / "baseline.json").is_file():
        baseline = json.loads((out / "baseline.json").read_text())
    eval_res = None
    if "evaluate" in todo:
        eval_res = timed("evaluate", run_evaluate, cfg, address, None, scale)
        for s in extra:
            timed(f"evaluate_x{s}", run_evaluate, _at_scale(cfg, s), address, None, s)
        import shutil

        from pgasr.provenance import EVAL_MARKER, replace_dir, temp_dir_for

        # RUN_DIR/eval: a copy of the report's scale, replacing only an earlier copy (#17)
        tmp = temp_dir_for(out / "eval")
        try:
            shutil.copytree(out / f"eval_x{scale}", tmp, dirs_exist_ok=True)
            replace_dir(tmp, out / "eval", EVAL_MARKER)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if "sr" in todo:
        hr_path, lr_path = _held_out_volume(cfg, scale, out)
        sr_path = out / lr_path.name.replace("_lr_", "_sr_")

        def sr():
            subprocess.run([sys.executable, "-m", "pgasr.cli", "sr", "--checkpoint",
                            str(out / stage_dirname(2, scale)), "--scale", str(scale),
                            "--input", str(lr_path), "--output", str(sr_path), "--quiet",
                            "--overwrite"], check=True, cwd=ROOT)

        timed("sr", sr)
        if eval_res is None:
            eval_res = json.loads((out / f"eval_x{scale}" / "metrics.json").read_text())
        report = _report(cfg, timings, eval_res, sr_path, hr_path, lr_path, out, baseline)
        print(f"\nreport: {report}")
    if tracked:
        print(f"MLflow: run {tracked.run_id} at {tracked.uri} (browse: mlflow ui "
              f"--backend-store-uri {tracked.uri})")
    return {"timings": timings, "eval": eval_res, "baseline": baseline}


def main(args) -> int:
    t0 = time.perf_counter()
    res = run_pipeline(load(args), args.address, args.from_stage, args.baseline_seconds,
                       tuple(b for b in args.baselines.split(",") if b))
    ev = res.get("eval")
    if ev:
        print(f"\nPGASR vs bicubic on the test split: {ev.get('gain_db', 0):+.2f} dB PSNR, "
              f"{ev['summary']['ssim']['mean'] - ev['summary']['bicubic_ssim']['mean']:+.4f} SSIM")
    print(f"pipeline wall time: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    p = job_parser(__doc__)
    p.add_argument("--from-stage", default="prepare", choices=STEPS,
                   help="start at this step (earlier outputs must exist)")
    p.add_argument("--baseline-seconds", type=float, default=None,
                   help="wall time of each baseline (default: that of stages 1 + 2)")
    p.add_argument("--baselines", default="cnn",
                   help="comma-separated baselines trained at equal wall time: cnn, dat "
                        "(each gets the full budget)")
    run_job(main, p)
