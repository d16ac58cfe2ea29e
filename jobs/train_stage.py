"""Ray Train driver shared by ``jobs/stage1.py``, ``jobs/stage2.py`` and the Tune sweep
(``tune/sweep.py`` builds each trial's trainer with :func:`make_trainer`).

The worker loop is a thin adapter over :func:`pgasr.training.fit`: Ray Data shards feed it
(``get_dataset_shard("train")``, shuffled per epoch, equal split so DDP ranks run the same
number of steps; the small validation split is read by rank 0 straight from its Parquet
shards), ``prepare_model`` wraps DDP, and ``ray.train.report`` carries a self-describing
checkpoint from rank 0 every epoch.

Fault tolerance (Train V2): ``FailureConfig(max_failures)`` restarts workers from the latest
reported checkpoint; re-running the job with the same ``RunConfig(name, storage_path)``
resumes a killed run. The loop restores model, optimisers, step, epoch and RNG state from
the checkpoint's ``train_state.pt``; a run that had already finished reports its last result
again instead of nothing (a Tune trial re-run after its sweep's driver died).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from pgasr.checkpoint import is_checkpoint, stage_dirname
from pgasr.config import RunConfig, config_from_dict, config_to_dict
from pgasr.data import schema
from pgasr.provenance import atomic_write_text, sha256_file

log = logging.getLogger("pgasr.jobs.train")


def data_dir(cfg: RunConfig) -> Path:
    """Prepared shards with prior columns when the priors step ran, else the plain ones."""
    p = schema.priors_dir(cfg.data.prepared_dir)
    if (p / schema.MANIFEST).is_file():
        return p
    if cfg.model.acg:
        raise FileNotFoundError(
            f"no prior shards at {p}: run `python jobs/priors.py --config ...` first "
            "(or set model.acg=false to train without anatomical priors)")
    return Path(cfg.data.prepared_dir)


def _run_fingerprint(cfg: RunConfig, stage: int) -> dict:
    """The config sections a resumed run must share with the run it resumes."""
    d = config_to_dict(cfg)
    keys = ["seed", "model", "data", f"stage{stage}"] + (["prior"] if cfg.model.acg else [])
    return {k: d[k] for k in keys}


def _check_same_run(run_path: Path, cfg: RunConfig, stage: int) -> None:
    """Train V2 resumes whatever run has the same name and storage path. Refuse to resume a
    run that was started with a different model/data/stage config (its checkpoint would not
    even load); record the fingerprint for a new run."""
    fp = json.dumps(_run_fingerprint(cfg, stage), sort_keys=True, default=str)
    marker = run_path / "pgasr_run_config.json"
    if marker.is_file() and marker.read_text() != fp:
        raise SystemExit(
            f"error: {run_path} holds a stage-{stage} run started with a different config "
            "(model/data/stage settings changed); Ray Train would resume it. Use another run "
            f"name (--set name=...), another resources.storage_path, or delete {run_path} "
            "to start afresh.")
    if not marker.is_file():
        run_path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, fp)


def _train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from pgasr.checkpoint import load_checkpoint
    from pgasr.tracking import Run
    from pgasr.training import fit

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_dict(config["cfg"], "train_loop_config")
    stage = int(config["stage"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    sc = cfg.stage1 if stage == 1 else cfg.stage2
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    # the driver's MLflow run of this stage: rank 0 logs every epoch into it (after a
    # restart too: the same run id comes back with the loop config)
    tracked = Run.from_dict(config.get("tracking") if rank == 0 else None)

    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_checkpoint(d, with_train_state=True)
        log.info("rank %d resuming from %s (epoch %s, step %s)", rank, ckpt.path,
                 resume.meta.get("epoch"), resume.meta.get("step"))
    else:
        log.info("rank %d starting stage %d from scratch", rank, stage)

    shard = ray.train.get_dataset_shard("train")
    limit = int(cfg.resources.in_memory_shard_mib) * 2**20
    cache: dict = {"rows": None, "streaming": limit <= 0}

    def batches(epoch: int):
        """Epoch 0 (and every epoch of a too-large shard) streams from Ray Data; a small shard
        is kept in memory after its first pass and reshuffled locally (seeded by epoch)."""
        import numpy as np

        from pgasr.data.batches import iter_batches

        seed = cfg.seed * 10_007 + epoch
        if cache["rows"] is not None:
            yield from iter_batches(cache["rows"], sc.batch_size, shuffle=True, seed=seed,
                                    drop_last=True)
            return
        parts, nbytes = [], 0
        for b in shard.iter_batches(batch_size=sc.batch_size, batch_format="numpy",
                                    local_shuffle_buffer_size=max(4 * sc.batch_size, 64),
                                    local_shuffle_seed=seed):
            if not cache["streaming"]:
                parts.append(b)
                nbytes += sum(v.nbytes for v in b.values())
                if nbytes > limit:
                    cache["streaming"], parts = True, []
                    log.info("rank %d: shard exceeds resources.in_memory_shard_mib=%d, "
                             "streaming every epoch", rank, cfg.resources.in_memory_shard_mib)
            n = len(next(iter(b.values())))
            if n == sc.batch_size:  # equal shards -> equal full-batch counts on every rank
                yield b
        if parts:
            cache["rows"] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            log.info("rank %d: shard of %d rows (%.1f MiB) kept in memory for later epochs",
                     rank, len(next(iter(cache["rows"].values()))), nbytes / 2**20)

    val_rows = None
    if rank == 0 and config.get("val_dir"):
        # the validation split is small and only rank 0 reads it: straight from its Parquet
        # shards (as train-local does), not through a Ray Data execution of its own (seconds
        # of task start-up per run on a small cluster)
        from pgasr.data.batches import read_split

        val_rows = read_split(config["val_dir"], "val", config["columns"])

    def report(metrics: dict, ckpt_dir: Path | None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        tracked.log_metrics(clean, step=int(clean.get("step", 0)))
        if ckpt_dir is not None:
            ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)))
            shutil.rmtree(Path(ckpt_dir).parent, ignore_errors=True)
        else:
            ray.train.report(clean)

    if resume is not None and _finished(resume, sc):
        # A run that had already finished, started again (a Tune trial re-run after its sweep
        # driver died before recording the end, a job resubmitted after it completed): report
        # the last result once more instead of training zero epochs and reporting nothing,
        # so the caller (Tune, ASHA, the results table) still sees the final metrics.
        log.info("rank %d: run already finished at epoch %s; reporting its last result", rank,
                 resume.meta.get("epoch"))
        again = None
        if rank == 0:
            again = Path(tempfile.mkdtemp(prefix=f"pgasr-s{stage}-")) / "checkpoint"
            ckpt.to_directory(str(again))
        report(dict(resume.meta.get("metrics") or {}), again)
        return

    fit(stage, cfg, batches, val_rows=val_rows, stage1_checkpoint=config.get("stage1_checkpoint"),
        resume=resume, wrap=ray.train.torch.prepare_model, report=report,
        device=ray.train.torch.get_device(), extra_meta=config.get("meta"), is_main=rank == 0)


def _finished(resume, sc) -> bool:
    """Whether a resumed checkpoint is the end of its run (all epochs, or ``max_steps``)."""
    ts = resume.train_state or {}
    epoch = int(ts.get("epoch", resume.meta.get("epoch", -1)))
    step = int(ts.get("step", resume.meta.get("step", 0)))
    return epoch + 1 >= sc.epochs or bool(sc.max_steps and step >= sc.max_steps)


def make_trainer(stage: int, cfg: RunConfig, *, name: str | None = None,
                 callbacks: list | None = None, tracking: dict | None = None):
    """The ``TorchTrainer`` of one stage (Ray must already be initialised).

    Args:
        stage: 1 or 2.
        cfg: resolved run config (``resources`` gives the scaling, ``stage2.stage1_checkpoint``
            the frozen stage 1 of a stage-2 run).
        name: Ray Train run name under ``resources.storage_path`` (default
            ``{cfg.name}-stage{N}``); a run started again under the same name resumes.
        callbacks: Ray Train ``UserCallback``s, e.g. Tune's ``TuneReportCallback`` when the
            run is a Tune trial.
        tracking: an MLflow run (``pgasr.tracking.Run.to_dict()``) rank 0 logs metrics into.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pgasr.data.batches import stage_columns
    from pgasr.data.prepare import data_meta
    from pgasr.priors import build_prior

    src = data_dir(cfg)
    train_files = sorted(str(p) for p in (src / "train").glob("*.parquet"))
    if not train_files:
        raise FileNotFoundError(f"no training shards in {src / 'train'}")
    columns = stage_columns(stage, cfg.stage2.scale, cfg.model.acg, train_files[0])
    datasets = {"train": ray.data.read_parquet(train_files).select_columns(columns)}
    has_val = any((src / "val").glob("*.parquet"))
    meta = {"prior": build_prior(cfg.prior).describe() if cfg.model.acg else None,
            "data_manifest_sha256": sha256_file(src / schema.MANIFEST), "data_dir": str(src),
            **data_meta(src)}
    stage1_ckpt = None
    if stage == 2:
        stage1_ckpt = cfg.stage2.stage1_checkpoint or str(Path(cfg.run_dir) / "stage1")
        if not is_checkpoint(stage1_ckpt):
            raise FileNotFoundError(
                f"stage-1 checkpoint not found at {stage1_ckpt}: run jobs/stage1.py first or "
                "--set stage2.stage1_checkpoint=PATH")
        stage1_ckpt = str(Path(stage1_ckpt).resolve())
    res = cfg.resources
    storage = str(Path(res.storage_path).resolve()) if "://" not in res.storage_path \
        else res.storage_path
    name = name or default_run_name(stage, cfg)
    if "://" not in storage:
        _check_same_run(Path(storage) / name, cfg, stage)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": config_to_dict(cfg), "stage": stage, "meta": meta,
                           "stage1_checkpoint": stage1_ckpt, "columns": columns,
                           "val_dir": str(src.resolve()) if has_val else None,
                           "tracking": tracking,
                           "threads": res.torch_threads or max(1, int(res.cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker={"CPU": res.cpus_per_worker}),
        run_config=RayRunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks or [])),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    return trainer


def default_run_name(stage: int, cfg: RunConfig) -> str:
    """Ray Train run name of a stage: ``{name}-stage1``, ``{name}-stage2`` (x2) and
    ``{name}-stage2-x{s}`` (other scales: never resumes the x2 run)."""
    return f"{cfg.name}-{stage_dirname(stage, cfg.stage2.scale).replace('_', '-')}"


def run_stage(stage: int, cfg: RunConfig, address: str | None = None, *,
              name: str | None = None, out: str | Path | None = None, parent=None) -> Path:
    """Run one stage on the cluster; export the final checkpoint to ``out`` (default
    ``{run_dir}/{stage_dirname(stage, stage2.scale)}``, with a ``.json`` summary beside it).

    ``name`` is the Ray Train run name (default :func:`default_run_name`): running again under
    the same name and ``resources.storage_path`` resumes from the latest checkpoint.
    The stage is an MLflow run (:mod:`pgasr.tracking`; a child of ``parent``, the pipeline's
    run) with the config, every epoch's metrics and the checkpoint's ``meta.json``.

    Raises:
        pgasr.provenance.ForeignDirectoryError: ``out`` exists and is neither empty nor a
            PGASR checkpoint (checked before training; nothing is deleted).
    """
    from jobs.common import init_ray
    from pgasr.checkpoint import publish_checkpoint
    from pgasr.provenance import CHECKPOINT_MARKER, check_replaceable
    from pgasr.tracking import Run

    out = Path(out) if out is not None else Path(cfg.run_dir) / stage_dirname(stage, cfg.stage2.scale)
    check_replaceable(out, CHECKPOINT_MARKER)  # before training, not after it
    init_ray(address, cfg)
    tracked = Run.create(cfg, out.name, parent=parent, tags={"pgasr.ray_run": name
                                                            or default_run_name(stage, cfg)})
    with tracked:  # FAILED if anything below raises, else FINISHED
        trainer = make_trainer(stage, cfg, name=name, tracking=tracked.to_dict())
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"stage {stage} finished without a checkpoint ({result.error})")
        # Copied beside the destination, verified and renamed in: a crash never leaves half a
        # checkpoint there, and only an earlier checkpoint (or an empty dir) is replaced.
        with result.checkpoint.as_directory() as d:
            publish_checkpoint(d, out)
        summary = {"stage": stage, "checkpoint": str(out),
                   "ray_checkpoint": result.checkpoint.path, "metrics": result.metrics}
        atomic_write_text(out.parent / f"{out.name}.json", json.dumps(summary, indent=1,
                                                                      default=str))
        for f in ("meta.json", "config.yaml"):
            tracked.log_artifact(out / f, "checkpoint")
    print(f"stage {stage} done: checkpoint {out}\n  metrics: "
          + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                        for k, v in (result.metrics or {}).items()}))
    return out
