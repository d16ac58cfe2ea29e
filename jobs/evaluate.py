"""Evaluate the stage-2 checkpoint on the test split, on the cluster:
``python jobs/evaluate.py --config configs/tiny.yaml [--checkpoint DIR] [--scale 2]``.

Runs :func:`pgasr.evaluate.evaluate` as a Ray task (one GPU when ``resources.use_gpu``);
writes ``metrics.json``, ``metrics.md`` and PNGs under ``RUN_DIR/eval_xS``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import init_ray, job_parser, load, run_job  # noqa: E402


def run_evaluate(cfg, address=None, checkpoint=None, scale=None, max_slices=None) -> dict:
    from pgasr.checkpoint import stage_dirname
    from pgasr.data.schema import MANIFEST, priors_dir

    ray = init_ray(address, cfg)
    scale = int(scale or cfg.stage2.scale)
    ckpt = str(Path(checkpoint or Path(cfg.run_dir) / stage_dirname(2, scale)).resolve())
    data = priors_dir(cfg.data.prepared_dir)
    if not (data / MANIFEST).is_file():
        data = Path(cfg.data.prepared_dir)
    out = str((Path(cfg.run_dir) / f"eval_x{scale}").resolve())

    @ray.remote(num_cpus=1, num_gpus=1 if cfg.resources.use_gpu else 0)
    def _evaluate():
        from pgasr.evaluate import evaluate

        return evaluate(ckpt, str(data.resolve()), scale, out, max_slices_per_subject=max_slices)

    res = ray.get(_evaluate.remote())
    s = res["summary"]
    print(f"x{scale}: PGASR PSNR {s['psnr']['mean']:.3f} dB vs bicubic "
          f"{s['bicubic_psnr']['mean']:.3f} dB (gain {res.get('gain_db', float('nan')):+.3f}); "
          f"SSIM {s['ssim']['mean']:.4f} vs {s['bicubic_ssim']['mean']:.4f}; report {out}")
    return res


def main(args) -> int:
    run_evaluate(load(args), args.address, args.checkpoint, args.scale, args.max_slices)
    return 0


if __name__ == "__main__":
    p = job_parser(__doc__)
    p.add_argument("--checkpoint", help="stage-2 checkpoint (default: RUN_DIR/stage2 for x2, "
                                         "RUN_DIR/stage2_x4 for x4)")
    p.add_argument("--scale", type=int, help="2 or 4 (default: stage2.scale)")
    p.add_argument("--max-slices", type=int, help="per subject, evenly spaced")
    run_job(main, p)
