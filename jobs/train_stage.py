"""Ray Train driver shared by ``jobs/stage1.py`` and ``jobs/stage2.py``.

The worker loop is a thin adapter over :func:`pgasr.training.fit`: Ray Data shards feed it
(``get_dataset_shard("train")``, shuffled per epoch, equal split so DDP ranks run the same
number of steps), ``prepare_model`` wraps DDP, and ``ray.train.report`` carries a
self-describing checkpoint from rank 0 every epoch.

Fault tolerance (Train V2): ``FailureConfig(max_failures)`` restarts workers from the latest
reported checkpoint; re-running the job with the same ``RunConfig(name, storage_path)``
resumes a killed run. The loop restores model, optimisers, step, epoch and RNG state from
the checkpoint's ``train_state.pt``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

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


def _train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from pgasr.checkpoint import load_checkpoint
    from pgasr.training import fit

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_dict(config["cfg"], "train_loop_config")
    stage = int(config["stage"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    sc = cfg.stage1 if stage == 1 else cfg.stage2
    torch.set_num_threads(max(1, int(config.get("threads", 1))))

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

    def batches(epoch: int):
        return shard.iter_batches(
            batch_size=sc.batch_size, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=max(4 * sc.batch_size, 64),
            local_shuffle_seed=cfg.seed * 10_007 + epoch,
        )

    val_rows = None
    if rank == 0 and config.get("has_val"):
        val = ray.train.get_dataset_shard("val")
        parts = list(val.iter_batches(batch_size=256, batch_format="numpy"))
        if parts:
            import numpy as np

            val_rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def report(metrics: dict, ckpt_dir: Path | None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if ckpt_dir is not None:
            ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)))
            shutil.rmtree(Path(ckpt_dir).parent, ignore_errors=True)
        else:
            ray.train.report(clean)

    fit(stage, cfg, batches, val_rows=val_rows, stage1_checkpoint=config.get("stage1_checkpoint"),
        resume=resume, wrap=ray.train.torch.prepare_model, report=report,
        device=ray.train.torch.get_device(), extra_meta=config.get("meta"), is_main=rank == 0)


def run_stage(stage: int, cfg: RunConfig, address: str | None = None) -> Path:
    """Run one stage on the cluster; export the final checkpoint to ``{run_dir}/stage{N}``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.common import init_ray
    from pgasr.priors import build_prior

    init_ray(address, cfg)
    src = data_dir(cfg)
    train_files = sorted(str(p) for p in (src / "train").glob("*.parquet"))
    if not train_files:
        raise FileNotFoundError(f"no training shards in {src / 'train'}")
    scale = cfg.stage2.scale
    columns = [schema.HR, schema.prior_hr_column()] if stage == 1 else [
        schema.HR, schema.lr_column(scale), schema.prior_hr_column(), schema.prior_lr_column(scale)]
    if not cfg.model.acg:
        columns = [c for c in columns if not c.startswith("prior")]
    datasets = {"train": ray.data.read_parquet(train_files).select_columns(columns)}
    val_files = sorted(str(p) for p in (src / "val").glob("*.parquet"))
    if val_files:
        datasets["val"] = ray.data.read_parquet(val_files).select_columns(columns)
    meta = {"prior": build_prior(cfg.prior).describe() if cfg.model.acg else None,
            "data_manifest_sha256": sha256_file(src / schema.MANIFEST), "data_dir": str(src)}
    stage1_ckpt = None
    if stage == 2:
        stage1_ckpt = cfg.stage2.stage1_checkpoint or str(Path(cfg.run_dir) / "stage1")
        if not (Path(stage1_ckpt) / "model.pt").is_file():
            raise FileNotFoundError(
                f"stage-1 checkpoint not found at {stage1_ckpt}: run jobs/stage1.py first or "
                "--set stage2.stage1_checkpoint=PATH")
        stage1_ckpt = str(Path(stage1_ckpt).resolve())
    res = cfg.resources
    storage = str(Path(res.storage_path).resolve()) if "://" not in res.storage_path \
        else res.storage_path
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": config_to_dict(cfg), "stage": stage, "meta": meta,
                           "stage1_checkpoint": stage1_ckpt, "has_val": bool(val_files),
                           "threads": res.torch_threads or max(1, int(res.cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker={"CPU": res.cpus_per_worker}),
        run_config=RayRunConfig(
            name=f"{cfg.name}-stage{stage}", storage_path=storage,
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage} finished without a checkpoint ({result.error})")
    out = Path(cfg.run_dir) / f"stage{stage}"
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cfg.run_dir, prefix=f".stage{stage}-"))
    with result.checkpoint.as_directory() as d:
        shutil.copytree(d, tmp / "ckpt")
    if out.exists():
        shutil.rmtree(out)
    (tmp / "ckpt").rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    summary = {"stage": stage, "checkpoint": str(out), "ray_checkpoint": result.checkpoint.path,
               "metrics": result.metrics}
    atomic_write_text(Path(cfg.run_dir) / f"stage{stage}.json", json.dumps(summary, indent=1,
                                                                          default=str))
    print(f"stage {stage} done: checkpoint {out}\n  metrics: "
          + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                        for k, v in (result.metrics or {}).items()}))
    return out
