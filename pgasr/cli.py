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

log = logging.getLogger("pgasr.cli")

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
    from pgasr.config import SCALES

    if scale not in SCALES:
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
    for key in ("source_format", "contrast", "bids_suffix", "voxel_size"):  # --flag = data.key
        if getattr(args, key) is not None:
            setattr(cfg.data, key, getattr(args, key))
    from pgasr.config import revalidate

    cfg = revalidate(cfg, "pgasr prepare")
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

    from pgasr.inference import Predictor
    from pgasr.runtime import tune_allocator
    from pgasr.sr_files import model_record, plan_jobs, run_sr_job, write_dataset_description

    _check_scale(args.scale)
    jobs, deriv = plan_jobs(args.input, args.output, args.scale, contrast=args.contrast or "T2",
                            bids_suffix=args.bids_suffix or "", overwrite=args.overwrite)
    tune_allocator()
    pred = Predictor.from_checkpoint(args.checkpoint, device=args.device, bf16=args.bf16)
    contrast = args.bids_suffix or args.contrast
    if contrast and (msg := pred.contrast_warning(contrast)):
        log.warning(msg)
    model = model_record(pred, args.checkpoint)
    if deriv is not None:
        write_dataset_description(deriv, Path(args.input))
    files = tqdm(jobs, desc="sr", unit="vol", disable=args.quiet or len(jobs) == 1)
    for job in files:
        files.set_postfix_str(job.input.name)
        bar = tqdm(total=0, desc=job.input.name, unit="slice",
                   disable=args.quiet or len(jobs) > 1, leave=False)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        res = run_sr_job(pred, job, args.scale, model, resample=args.resample, progress=progress)
        bar.close()
        files.write(f"wrote {job.output}  shape={tuple(res['shape'])}  voxel="
                    f"{tuple(res['output_voxel_size'])}  prior={model['prior_backend']}")
    if len(jobs) > 1:
        print(f"{len(jobs)} volumes super-resolved x{args.scale} -> "
              f"{deriv or Path(args.output)}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    volume_form = {"--sr": args.sr, "--hr": args.hr, "--mask": args.mask,
                   "--pair-by": args.pair_by}
    split_form = {"--checkpoint": args.checkpoint, "--data": args.data, "--scale": args.scale,
                  "--split": args.split, "--max-slices": args.max_slices}
    given_volume = [k for k, v in volume_form.items() if v is not None]
    given_split = [k for k, v in split_form.items() if v is not None]
    if given_volume and given_split:
        raise CliError(f"{', '.join(given_volume)} (scoring SR volumes) cannot be combined with "
                       f"{', '.join(given_split)} (scoring a checkpoint on a prepared split)")
    if given_volume:
        missing = [k for k in ("--sr", "--hr") if volume_form[k] is None]
        if missing:
            raise CliError(f"scoring SR volumes needs --sr and --hr; missing {', '.join(missing)}")
        _evaluate_volumes(args)
        return
    missing = [k for k in ("--checkpoint", "--data", "--scale") if split_form[k] is None]
    if missing:
        raise CliError("evaluate needs either --checkpoint, --data and --scale (a checkpoint on "
                       "a prepared split) or --sr and --hr (SR volumes from any tool); missing "
                       + ", ".join(missing))
    from pgasr.evaluate import evaluate
    from pgasr.runtime import tune_allocator

    _check_scale(args.scale)
    split = args.split or "test"
    tune_allocator()
    out = args.out or str(Path(args.checkpoint) / f"eval_x{args.scale}")
    res = evaluate(args.checkpoint, args.data, args.scale, out, split=split,
                   max_slices_per_subject=args.max_slices)
    s = res["summary"]
    print(f"x{args.scale} {split}: PSNR {s['psnr']['mean']:.3f} (bicubic "
          f"{s['bicubic_psnr']['mean']:.3f}), SSIM {s['ssim']['mean']:.4f}, "
          f"KL(HR||LR) {res['codebook']['kl_hr_lr']:.4f}; written to {out}")


def _evaluate_volumes(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from pgasr.evaluate_volumes import evaluate_volumes

    out = args.out or "eval_volumes"
    bar = tqdm(total=0, desc="evaluate", unit="volume", disable=args.quiet)

    def progress(done: int, total: int, sc) -> None:
        bar.total = total
        bar.update(done - bar.n)
        ssim = "n/a" if sc.ssim is None else f"{sc.ssim:.4f}"
        tqdm.write(f"{sc.subject}: PSNR {sc.psnr:.2f} dB  SSIM {ssim}  ({sc.n_voxels} voxels, "
                   f"{sc.n_slices} slices)")

    try:
        res = evaluate_volumes(args.sr, args.hr, out, mask=args.mask or "auto",
                               pair_by=args.pair_by or "subject", progress=progress)
    finally:
        bar.close()
    for side in ("sr", "hr"):
        for f in res["unmatched"][side]:
            print(f"warning: {side.upper()} file without a partner: {f}", file=sys.stderr)
    for w in res["warnings"]:
        print(f"warning: {w}", file=sys.stderr)

    def fmt(m: dict, digits: int, unit: str = "") -> str:
        if m["n_infinite"]:
            return f"inf{unit} ({m['n_infinite']} of {m['n']} volumes identical)"
        if m["mean"] is None:
            return "n/a"
        return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}{unit}"

    n_un = len(res["unmatched"]["sr"]) + len(res["unmatched"]["hr"])
    print(f"{res['n_pairs']} pairs (mask {res['mask']}): PSNR {fmt(res['psnr'], 2, ' dB')}, "
          f"SSIM {fmt(res['ssim'], 4)}; {n_un} unmatched; written to {out}")


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

    s = sub.add_parser("prepare", help="scans (IXI, BIDS, a folder, a list) -> triplet shards + LR",
                       description="Ingest MRI volumes (or the synthetic cohort) into "
                                   "Parquet slice-triplet shards with degraded LR per scale.")
    _add_config_args(s)
    s.add_argument("--source", help="IXI directory or .tar, BIDS dataset, folder of NIfTI "
                                    "files, .csv/.tsv list (path[, subject]) or a glob "
                                    "(default: data.source)")
    s.add_argument("--source-format", choices=("auto", "ixi", "bids", "list", "glob", "nifti"),
                   help="how to read --source (default: data.source_format, auto)")
    s.add_argument("--contrast", help="IXI contrast T1/T2/PD; BIDS suffix contrast+'w' "
                                      "(default: data.contrast, T2)")
    s.add_argument("--bids-suffix", help="BIDS suffix when it is not contrast+'w' (e.g. FLAIR)")
    s.add_argument("--voxel-size", type=float,
                   help="in-plane mm every scan is resampled to (default: data.voxel_size, 1.0)")
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

    s = sub.add_parser("sr", help="super-resolve LR NIfTI volumes (a file, a folder, a BIDS "
                                  "dataset) with a checkpoint",
                       description="LR .nii/.nii.gz -> SR volume on the model's grid: "
                                   "non-axial volumes are reoriented, the in-plane spacing is "
                                   "resampled to the model's LR voxels, the output's affine "
                                   "describes the voxels written; a JSON sidecar records the "
                                   "model and what was done. A folder gives <name>_sr<S>.nii.gz "
                                   "under --output; a BIDS dataset gives derivatives/pgasr/"
                                   "sub-*/.../*_desc-sr<S>_<suffix>.nii.gz.")
    s.add_argument("--checkpoint", required=True, help="stage-2 checkpoint directory")
    s.add_argument("--scale", type=int, required=True, help="2 or 4")
    s.add_argument("--input", required=True,
                   help="LR .nii/.nii.gz, a folder of them, a BIDS dataset, or a folder "
                        "holding one DICOM series")
    s.add_argument("--output", help="SR .nii/.nii.gz for a file; a folder for a folder; for "
                                    "BIDS default <input>/derivatives/pgasr")
    s.add_argument("--contrast", help="BIDS inputs: which anat images (T2 -> *_T2w; default T2)")
    s.add_argument("--bids-suffix", help="BIDS inputs: the suffix itself (e.g. FLAIR)")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    s.add_argument("--no-resample", dest="resample", action="store_false",
                   help="process the volume on its own grid (a warning says when it is far "
                        "from the training spacing)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--bf16", action="store_true", help="bfloat16 autocast on GPU")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sr)

    s = sub.add_parser(
        "evaluate", help="PSNR/SSIM of a checkpoint on a prepared split, or of SR volumes",
        description="Either evaluate a stage-2 checkpoint against bicubic on a prepared split "
                    "(--checkpoint --data --scale; JSON + Markdown + PNGs), or score SR NIfTI "
                    "volumes from any tool against HR volumes (--sr --hr; per_subject.csv + "
                    "summary.json).")
    s.add_argument("--checkpoint", help="stage-2 checkpoint directory (checkpoint form)")
    s.add_argument("--data", help="prepared (+priors) directory (checkpoint form)")
    s.add_argument("--scale", type=int, help="2 or 4 (checkpoint form)")
    s.add_argument("--split", choices=("train", "val", "test"),
                   help="prepared split (checkpoint form; default: test)")
    s.add_argument("--max-slices", type=int, default=None,
                   help="per subject, evenly spaced (checkpoint form)")
    s.add_argument("--sr", help="directory of SR .nii/.nii.gz volumes, searched recursively "
                                "(volume form)")
    s.add_argument("--hr", help="directory of HR .nii/.nii.gz volumes (volume form)")
    s.add_argument("--mask", choices=("auto", "none"),
                   help="auto: HR head mask (default); none: every voxel (volume form)")
    s.add_argument("--pair-by", choices=("subject", "name"),
                   help="subject: BIDS sub-<label> in the name, else the file name (default); "
                        "name: identical file names (volume form)")
    s.add_argument("--out", help="output directory (default: CHECKPOINT/eval_xS, or "
                                 "./eval_volumes for --sr/--hr)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
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


def cmd_config_show(args: argparse.Namespace) -> None:
    from pgasr.config import config_yaml

    print(config_yaml(_load(args)), end="")


def cmd_config_schema(args: argparse.Namespace) -> None:
    from pgasr.config import config_schema

    print(json.dumps(config_schema(), indent=1))


def _register_config(sub) -> None:
    s = sub.add_parser("config", help="print the resolved run config or its JSON schema",
                       description="`show`: the config every command would use (file + --set "
                                   "overrides, defaults filled in) as YAML; `schema`: the JSON "
                                   "schema of a run config (for editors and validation).")
    cs = s.add_subparsers(dest="config_command", metavar="{show,schema}")
    cs.required = True
    show = cs.add_parser("show", help="the resolved config as YAML")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)
    cs.add_parser("schema", help="the JSON schema of a run config").set_defaults(
        func=cmd_config_schema)


# Modules with their own subcommand groups register them here.
_EXTRA_COMMANDS: list = [_register_client, _register_report, _register_config]


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

