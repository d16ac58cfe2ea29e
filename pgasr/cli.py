"""``pgasr`` command line. Heavy modules are imported inside each subcommand so ``--help`` is
instant. Every user error ends with a one-line message on stderr and exit status 2 — no
traceback (set ``PGASR_DEBUG=1`` to see one)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pgasr import __version__

EXIT_USER_ERROR = 2


class CliError(Exception):
    """A user-facing error: printed without a traceback."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (configs/tiny.yaml, demo.yaml, paper.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.slices_per_volume=40 "
                        "(repeatable)")


def _load(args: argparse.Namespace):
    from pgasr.config import load_config

    return load_config(args.config, args.overrides)


def _check_scale(scale: int) -> int:
    if scale not in (2, 4):
        raise CliError(f"--scale must be 2 or 4, got {scale}")
    return scale


# --------------------------------------------------------------------------- subcommands


def cmd_synth(args: argparse.Namespace) -> None:
    from pgasr.data.synth import preview, synthesize_cohort

    cfg = _load(args)
    if args.subjects is not None:
        cfg.synth.subjects = args.subjects
    if args.size is not None:
        cfg.synth.size = args.size
    if args.slices is not None:
        cfg.synth.slices = args.slices
    out = args.out or cfg.synth.out_dir
    paths = synthesize_cohort(cfg.synth, out, progress=not args.quiet)
    print(f"wrote {len(paths)} synthetic T2 volumes to {out}")
    if args.preview:
        stats = preview(paths, args.preview)
        print(f"preview: {args.preview}")
        print(json.dumps(stats, indent=1, default=str))


def cmd_prepare(args: argparse.Namespace) -> None:
    from pgasr.data.prepare import prepare

    cfg = _load(args)
    if args.source:
        cfg.data.source = args.source
    if args.out:
        cfg.data.prepared_dir = args.out
    res = prepare(cfg, progress=not args.quiet, force=args.force)
    verb = "up to date" if res.reused else "prepared"
    print(f"{verb}: {res.out_dir}  rows={res.rows}  subjects="
          f"{ {k: len(v) for k, v in res.subjects.items()} }  skipped={len(res.skipped)}")
    for s in res.skipped:
        print(f"  skipped {s.get('file')}: {s.get('reason')}", file=sys.stderr)


def cmd_degrade(args: argparse.Namespace) -> None:
    from pgasr.volume import degrade_volume_file

    cfg = _load(args)
    _check_scale(args.scale)
    degrade_volume_file(args.input, args.output, args.scale, cfg.degradation, seed=args.seed)
    print(f"wrote LR x{args.scale} volume to {args.output}")


def cmd_train_local(args: argparse.Namespace) -> None:
    from pgasr.training import train_local

    cfg = _load(args)
    data = args.data or _default_data_dir(cfg)
    out = args.out or str(Path(cfg.run_dir) / f"local-stage{args.stage}")
    res = train_local(args.stage, cfg, data, out, stage1_checkpoint=args.stage1,
                      progress=not args.quiet)
    print(f"checkpoint: {res.checkpoint}  steps={res.steps}  metrics={res.metrics}")


def _default_data_dir(cfg) -> str:
    from pgasr.data.schema import priors_dir

    p = priors_dir(cfg.data.prepared_dir)
    return str(p) if (p / "manifest.json").is_file() else cfg.data.prepared_dir


def cmd_sr(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from pgasr.data.ixi import read_nifti_file
    from pgasr.inference import Predictor
    from pgasr.runtime import tune_allocator
    from pgasr.volume import write_nifti

    _check_scale(args.scale)
    out = Path(args.output)
    if not (out.name.endswith(".nii") or out.name.endswith(".nii.gz")):
        raise CliError(f"--output must end in .nii or .nii.gz: {out}")
    img = read_nifti_file(args.input)
    tune_allocator()
    pred = Predictor.from_checkpoint(args.checkpoint, device=args.device, bf16=args.bf16)
    bar = tqdm(total=img.shape[2] if len(img.shape) > 2 else 0, desc="sr", unit="slice",
               disable=args.quiet)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    sr = pred.predict_image(img, args.scale, progress=progress)
    bar.close()
    write_nifti(sr, out)
    # describe() has backend None for a model.acg=false checkpoint (pred.prior is None there)
    print(f"wrote {out}  shape={sr.shape}  voxel={tuple(round(float(z), 4) for z in sr.header.get_zooms()[:3])}"
          f"  prior={pred.describe()['prior'].get('backend')}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pgasr.evaluate import evaluate
    from pgasr.runtime import tune_allocator

    _check_scale(args.scale)
    tune_allocator()
    out = args.out or str(Path(args.checkpoint) / f"eval_x{args.scale}")
    res = evaluate(args.checkpoint, args.data, args.scale, out, split=args.split,
                   max_slices_per_subject=args.max_slices)
    s = res["summary"]
    print(f"x{args.scale} {args.split}: PSNR {s['psnr']['mean']:.3f} (bicubic "
          f"{s['bicubic_psnr']['mean']:.3f}), SSIM {s['ssim']['mean']:.4f}, "
          f"KL(HR||LR) {res['codebook']['kl_hr_lr']:.4f}; written to {out}")


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgasr",
        description="PGASR: prior-guided anatomical alignment for MRI super-resolution.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"pgasr {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("synth", help="write the embedded synthetic IXI-like T2 cohort (NIfTI)",
                       description="Build IXI-like T2 volumes from the MNI152 template nilearn "
                                   "ships (no download).")
    _add_config_args(s)
    s.add_argument("--out", help="output directory (default: synth.out_dir)")
    s.add_argument("--subjects", type=int, help="number of subjects")
    s.add_argument("--size", type=int, help="in-plane matrix size")
    s.add_argument("--slices", type=int, help="axial slices per volume")
    s.add_argument("--preview", metavar="PNG", help="also write a montage + statistics")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("prepare", help="IXI T2 (dir or .tar) -> normalised triplet shards + LR",
                       description="Ingest IXI T2 volumes (or the synthetic cohort) into "
                                   "Parquet slice-triplet shards with degraded LR per scale.")
    _add_config_args(s)
    s.add_argument("--source", help="IXI T2 directory or IXI-T2.tar (default: data.source)")
    s.add_argument("--out", help="prepared directory (default: data.prepared_dir)")
    s.add_argument("--force", action="store_true", help="rebuild even when up to date")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("degrade", help="make an LR volume from an HR NIfTI (blur+noise+bicubic)",
                       description="Degrade every axial slice of an HR volume like `prepare` "
                                   "does; the affine's in-plane voxel size grows by the scale.")
    _add_config_args(s)
    s.add_argument("--input", required=True, help="HR .nii/.nii.gz")
    s.add_argument("--output", required=True, help="LR .nii/.nii.gz")
    s.add_argument("--scale", type=int, required=True, help="2 or 4")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_degrade)

    s = sub.add_parser("train-local", help="train stage 1 or 2 in one process (no Ray)",
                       description="Plain single-process training loop over prepared shards; "
                                   "the same step functions the Ray jobs run.")
    _add_config_args(s)
    s.add_argument("--stage", type=int, choices=(1, 2), required=True)
    s.add_argument("--data", help="prepared (+priors) directory (default from config)")
    s.add_argument("--out", help="checkpoint directory (default: RUN_DIR/local-stageN)")
    s.add_argument("--stage1", help="stage-1 checkpoint (stage 2 only)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_train_local)

    s = sub.add_parser("sr", help="super-resolve an LR NIfTI volume with a checkpoint",
                       description="LR .nii/.nii.gz (axial slices in the third axis) -> SR "
                                   "volume; in-plane size x scale, affine updated, header kept.")
    s.add_argument("--checkpoint", required=True, help="stage-2 checkpoint directory")
    s.add_argument("--scale", type=int, required=True, help="2 or 4")
    s.add_argument("--input", required=True, help="LR .nii/.nii.gz")
    s.add_argument("--output", required=True, help="SR .nii/.nii.gz")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--bf16", action="store_true", help="bfloat16 autocast on GPU")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sr)

    s = sub.add_parser("evaluate", help="PSNR/SSIM/LPIPS + codebook KL on a prepared split",
                       description="Evaluate a stage-2 checkpoint against bicubic on the test "
                                   "split; JSON + Markdown + PNGs.")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--data", required=True, help="prepared (+priors) directory")
    s.add_argument("--scale", type=int, required=True)
    s.add_argument("--split", default="test", choices=("train", "val", "test"))
    s.add_argument("--out", help="output directory (default: CHECKPOINT/eval_xS)")
    s.add_argument("--max-slices", type=int, default=None, help="per subject, evenly spaced")
    s.set_defaults(func=cmd_evaluate)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return p


def _register_client(sub) -> None:
    from pgasr.client import register

    register(sub)


def _register_report(sub) -> None:
    from pgasr import report

    s = sub.add_parser("report", help="paper Tables 1-3 + Figs. 1/4 (what `make bench` runs)",
                       description="Train and evaluate the ablation ladder, a residual-CNN "
                                   "baseline and the stage-1 upper bound; JSON + PNG + "
                                   "docs/results.md.")
    report.add_args(s)
    s.set_defaults(func=report.run)


# Modules with their own subcommand groups register them here.
_EXTRA_COMMANDS: list = [_register_client, _register_report]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pgasr.config import ConfigError

    try:
        args.func(args)
    except (CliError, ConfigError, ValueError, FileNotFoundError, KeyError, OSError) as e:
        if os.environ.get("PGASR_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"pgasr {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

