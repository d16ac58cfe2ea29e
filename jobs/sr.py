"""Super-resolve a folder or a BIDS dataset on a Ray cluster:
``python jobs/sr.py --checkpoint runs/demo/stage2 --scale 2 --input DIR [--output DIR]``.

The driver plans every output exactly as ``pgasr sr`` does (:func:`pgasr.sr_files.plan_jobs`:
the same names, BIDS derivatives, sidecars, and nothing existing replaced without
``--overwrite``); then ``--actors`` Ray actors, each holding one loaded
:class:`pgasr.inference.Predictor` (the checkpoint is read once per actor, not per volume),
super-resolve the volumes with :func:`pgasr.sr_files.run_sr_job`, the code path of
``pgasr sr``. A volume that fails is reported and the others go on; the exit status is 1 when
any failed. Inputs, outputs and the checkpoint must be visible to every node (a shared
filesystem, or the head node of a single-node cluster).
"""

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import init_ray, run_job  # noqa: E402

log = logging.getLogger("pgasr.jobs.sr")


class SRWorker:
    """One Ray actor: a Predictor and the sidecar's model record, loaded once."""

    def __init__(self, checkpoint: str, device: str, threads: int):
        import torch

        from pgasr.inference import Predictor
        from pgasr.runtime import tune_allocator
        from pgasr.sr_files import model_record

        torch.set_num_threads(max(1, threads))
        tune_allocator()
        self.pred = Predictor.from_checkpoint(checkpoint, device=device)
        self.model = model_record(self.pred, checkpoint)

    def run(self, inp: str, out: str, scale: int, resample: bool) -> dict:
        from pgasr.sr_files import SRJob, run_sr_job

        t0 = time.perf_counter()
        try:
            res = run_sr_job(self.pred, SRJob(Path(inp), Path(out)), scale, self.model,
                             resample=resample)
        except Exception as e:  # noqa: BLE001 - one bad volume is reported, the others go on
            return {"input": inp, "error": f"{type(e).__name__}: {e}"}
        return {**res, "seconds": round(time.perf_counter() - t0, 2)}


def run_sr(checkpoint: str, inp: str, output: str | None, scale: int, *, actors: int = 2,
           cpus_per_actor: float = 1.0, device: str = "cpu", contrast: str = "T2",
           bids_suffix: str = "", overwrite: bool = False, resample: bool = True,
           progress: bool = True) -> dict:
    """Plan like ``pgasr sr``, then super-resolve every volume on a pool of Ray actors.

    Returns:
        ``{"written": [result, ...], "failed": [{"input", "error"}, ...], "derivatives"}``.
    """
    import ray
    from ray.util import ActorPool
    from tqdm.auto import tqdm

    from pgasr.checkpoint import load_checkpoint
    from pgasr.config import SCALES
    from pgasr.sr_files import plan_jobs, write_dataset_description

    if scale not in SCALES:
        raise ValueError(f"--scale must be 2 or 4, got {scale}")
    if actors < 1:
        raise ValueError(f"--actors must be >= 1, got {actors}")
    load_checkpoint(checkpoint)  # a clear error on the driver, before any actor starts
    jobs, deriv = plan_jobs(inp, output, scale, contrast=contrast, bids_suffix=bids_suffix,
                            overwrite=overwrite)
    if deriv is not None:
        write_dataset_description(deriv, Path(inp))
    n = min(actors, len(jobs))
    worker = ray.remote(num_cpus=cpus_per_actor, num_gpus=1 if device == "cuda" else 0)(SRWorker)
    pool = ActorPool([worker.remote(str(Path(checkpoint).resolve()), device,
                                    max(1, int(cpus_per_actor))) for _ in range(n)])
    written, failed = [], []
    bar = tqdm(total=len(jobs), desc=f"sr x{scale} on {n} actor(s)", unit="vol",
               disable=not progress)
    for res in pool.map_unordered(
            lambda a, j: a.run.remote(str(j.input), str(j.output), scale, resample), jobs):
        (failed if "error" in res else written).append(res)
        if "error" in res:
            bar.write(f"FAILED {res['input']}: {res['error']}")
        bar.update(1)
    bar.close()
    return {"written": written, "failed": failed,
            "derivatives": str(deriv) if deriv is not None else None}


def main(args: argparse.Namespace) -> int:
    init_ray(args.address)
    res = run_sr(args.checkpoint, args.input, args.output, args.scale, actors=args.actors,
                 cpus_per_actor=args.cpus_per_actor, device=args.device,
                 contrast=args.contrast or "T2", bids_suffix=args.bids_suffix or "",
                 overwrite=args.overwrite, resample=args.resample, progress=not args.quiet)
    where = res["derivatives"] or args.output
    print(f"{len(res['written'])} volume(s) super-resolved x{args.scale} -> {where}"
          + (f"; {len(res['failed'])} failed (listed above)" if res["failed"] else ""))
    return 1 if res["failed"] else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--address", default=None,
                   help="Ray cluster address, e.g. auto (default: RAY_ADDRESS as set by `ray "
                        "job submit`, else a new local cluster)")
    p.add_argument("--checkpoint", required=True, help="stage-2 checkpoint directory")
    p.add_argument("--scale", type=int, required=True, help="2 or 4")
    p.add_argument("--input", required=True, help="a NIfTI file, a folder or a BIDS dataset")
    p.add_argument("--output", help="output folder (default for BIDS: <input>/derivatives/pgasr)")
    p.add_argument("--actors", type=int, default=2, help="Ray actors, one Predictor each")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--device", default="cpu", help="cpu | cuda (one GPU per actor)")
    p.add_argument("--contrast", help="BIDS inputs: which anat images (T2 -> *_T2w)")
    p.add_argument("--bids-suffix", help="BIDS inputs: the suffix itself (e.g. FLAIR)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-resample", dest="resample", action="store_false",
                   help="use the input grid as given (no resampling to the model's LR grid)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


if __name__ == "__main__":
    run_job(main, parser())
