"""Ray Tune sweep of the loss weights the paper sets "empirically": alpha1 (L_align_s), alpha2
(L_align_d) and beta (commitment weight of Eq. 3).

    ray job submit --working-dir . -- python tune/sweep.py --config configs/tune_tiny.yaml
    python tune/sweep.py --config configs/tune_tiny.yaml            # a new local cluster
    python tune/sweep.py --config configs/tune_tiny.yaml --resume   # after the driver died

What it does (``docs/tune.md`` has the why and the cost):

1. ``tune.prepare``: the prepare and priors steps (both skip work that is up to date).
2. The search space from ``tune.alpha1/alpha2/beta`` (grid, choice, uniform or loguniform per
   parameter, :class:`pgasr.config.SearchSpace`); bad entries are a one-line error, exit 2.
3. Stage 1 once per distinct stage-1 config: beta changes stage 1, alpha changes only stage 2,
   so trials that share a beta share one stage-1 checkpoint. Each is cached under
   ``tune.stage1_cache/<key>``, ``key`` a hash of everything stage 1 depends on
   (:func:`stage1_key`). Missing ones are trained before any trial starts, as Ray tasks that
   each drive a ``TorchTrainer`` (at most ``tune.max_concurrent_trials`` at once), published by
   an atomic rename under a lock; ``events.jsonl`` in the cache records every training and hit.
4. A ``Tuner`` whose trials each build the stage-2 ``TorchTrainer`` (Ray's documented Train V2
   + Tune pattern) with ``TuneReportCallback``: one result per epoch, ASHA on the epoch count,
   ``max_concurrent_trials`` and per-trial workers/CPUs/GPUs from the config.
5. The results: ``results.csv`` + ``results.md`` (every trial), ``psnr_alpha.png`` (metric over
   alpha1 x alpha2, one panel per beta), the best trial's checkpoint directory (``pgasr sr``
   and Serve load it as it is) and its resolved config (``tune.best_config``, default
   ``configs/best.yaml``, with ``serve.checkpoint`` pointing at that directory).

Resuming: the experiment lives at ``resources.storage_path/<tune.name>``; ``--resume`` restores
it with ``Tuner.restore`` (finished trials are kept, unfinished ones re-run and their Train runs
continue from their last checkpoint) and finds every stage 1 in the cache.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script (``python tune/sweep.py``) from the repo root or a Ray working dir.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ray import tune as ray_tune  # noqa: E402
from ray.tune.integration.ray_train import TuneReportCallback  # noqa: E402

from pgasr.config import (  # noqa: E402
    ConfigError,
    RunConfig,
    SearchSpace,
    config_from_dict,
    config_to_dict,
    load_config,
)
from pgasr.provenance import CHECKPOINT_MARKER, atomic_write_text, check_replaceable  # noqa: E402

log = logging.getLogger("pgasr.tune")

PARAMS = ("alpha1", "alpha2", "beta")
KINDS = ("grid", "choice", "uniform", "loguniform")
# Per-epoch validation metrics of stage 2 (pgasr.training.validate_stage2) ASHA can compare.
METRICS = ("val_psnr", "val_ssim", "val_gain_db")
TIME_ATTR = "epochs_done"  # 1-based epoch count added to every result (ASHA's clock)
STAGE1_EVENTS = "events.jsonl"
# Config keys that name *where* something is, not *what* it is: excluded from the stage-1 key
# and from the resume check (a `ray job submit` working dir moves between submissions).
_PATH_KEYS = {("data", "prepared_dir"), ("prior", "cache_dir"), ("prior", "sam_checkpoint")}


# --------------------------------------------------------------------------- search space


@dataclass
class Param:
    """One resolved parameter of the search space."""

    name: str
    kind: str  # grid | choice | uniform | loguniform (ranges drawn up front become grid)
    values: list[float] = field(default_factory=list)
    low: float = 0.0
    high: float = 0.0
    drawn_from: str = ""  # "loguniform [0.01, 1]" when values were drawn up front

    def domain(self):
        """The Tune search-space object."""
        if self.kind == "grid":
            return ray_tune.grid_search(list(self.values))
        if self.kind == "choice":
            return ray_tune.choice(list(self.values))
        if self.kind == "uniform":
            return ray_tune.uniform(self.low, self.high)
        return ray_tune.loguniform(self.low, self.high)

    def describe(self) -> str:
        if self.kind in ("grid", "choice"):
            vals = ", ".join(f"{v:g}" for v in self.values)
            src = f" drawn from {self.drawn_from}" if self.drawn_from else ""
            return f"{self.kind} [{vals}]{src}"
        return f"{self.kind} [{self.low:g}, {self.high:g}] (sampled per trial)"


def resolve_space(cfg: RunConfig) -> dict[str, Param]:
    """The search space of ``cfg.tune``, checked; draws ranges with ``n > 0`` (seeded).

    Raises:
        ConfigError: naming the bad key and what would be valid.
    """
    import numpy as np

    t = cfg.tune
    if t.search not in ("grid", "random"):
        raise ConfigError(f"tune.search must be grid or random, got {t.search!r}")
    out: dict[str, Param] = {}
    for i, name in enumerate(PARAMS):
        spec = getattr(t, name)
        where = f"tune.{name}"
        if isinstance(spec, list):
            spec = SearchSpace(type="grid" if t.search == "grid" else "choice", values=spec)
        if spec.type not in KINDS:
            raise ConfigError(f"{where}.type must be one of {', '.join(KINDS)}; got {spec.type!r}")
        if spec.type in ("grid", "choice"):
            if not spec.values:
                raise ConfigError(f"{where}: a {spec.type} needs a non-empty list of values")
            if spec.low or spec.high or spec.n:
                raise ConfigError(f"{where}: low/high/n belong to uniform/loguniform ranges, "
                                  f"not to a {spec.type} (give values only)")
            vals = [float(v) for v in spec.values]
            if any(not math.isfinite(v) or v < 0 for v in vals):
                raise ConfigError(f"{where}: loss weights must be finite and >= 0, got {vals}")
            if len(set(vals)) != len(vals):
                raise ConfigError(f"{where}: duplicate values in {vals}")
            out[name] = Param(name, spec.type, vals)
            continue
        lo, hi = float(spec.low), float(spec.high)
        if spec.values:
            raise ConfigError(f"{where}: values belong to grid/choice; a {spec.type} range "
                              "takes low and high")
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
            raise ConfigError(f"{where}: a {spec.type} range needs 0 <= low < high, got "
                              f"low={lo:g}, high={hi:g}")
        if spec.type == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}: a loguniform range needs low > 0, got {lo:g}")
        if spec.n < 0:
            raise ConfigError(f"{where}.n must be >= 0, got {spec.n}")
        if spec.n == 0 and name == "beta":
            raise ConfigError(
                f"{where}: a {spec.type} range needs n > 0. beta changes stage 1, so its values "
                "are drawn once before the trials start (n of them, one stage-1 training "
                "each), e.g. tune.beta={type: loguniform, low: 0.1, high: 1.0, n: 3}")
        if spec.n == 0:
            out[name] = Param(name, spec.type, [], lo, hi)
            continue
        u = np.random.default_rng([t.seed, i]).uniform(size=spec.n)
        raw = (lo + u * (hi - lo) if spec.type == "uniform"
               else np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo))))
        vals = sorted({float(f"{v:.4g}") for v in raw})  # readable in tables and file names
        out[name] = Param(name, "grid", vals, lo, hi, f"{spec.type} [{lo:g}, {hi:g}]")
    return out


def n_trials(cfg: RunConfig, space: dict[str, Param]) -> int:
    n = cfg.tune.num_samples
    for p in space.values():
        if p.kind == "grid":
            n *= len(p.values)
    return n


def check_config(cfg: RunConfig) -> dict[str, Param]:
    """Every check of the sweep's config that needs no cluster; returns the search space."""
    t, s2 = cfg.tune, cfg.stage2
    space = resolve_space(cfg)
    checks = [
        (t.num_samples >= 1, f"tune.num_samples must be >= 1, got {t.num_samples}"),
        (t.metric in METRICS, f"tune.metric must be one of {', '.join(METRICS)} (validated every "
                              f"epoch), got {t.metric!r}"),
        (t.mode in ("max", "min"), f"tune.mode must be max or min, got {t.mode!r}"),
        (t.max_concurrent_trials >= 1,
         f"tune.max_concurrent_trials must be >= 1, got {t.max_concurrent_trials}"),
        (t.num_workers >= 0, f"tune.num_workers must be >= 0 (0 = resources.num_workers), "
                             f"got {t.num_workers}"),
        (t.trial_cpus > 0, f"tune.trial_cpus must be > 0, got {t.trial_cpus}"),
        (t.max_trial_failures >= 0, "tune.max_trial_failures must be >= 0"),
        (s2.epochs >= 1, f"stage2.epochs must be >= 1, got {s2.epochs}"),
        (s2.val_every == 1, "stage2.val_every must be 1 in a sweep: trials are compared (and "
                            f"stopped by ASHA) on every epoch's validation, got {s2.val_every}"),
        (cfg.stage1.epochs >= 1, f"stage1.epochs must be >= 1, got {cfg.stage1.epochs}"),
    ]
    if t.asha:
        checks += [
            (1 <= t.grace_period <= s2.epochs,
             f"tune.grace_period must be in 1..stage2.epochs ({s2.epochs}), got "
             f"{t.grace_period}"),
            (t.reduction_factor >= 2, f"tune.reduction_factor must be >= 2, got "
                                      f"{t.reduction_factor}"),
        ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if n_trials(cfg, space) > 10_000:
        raise ConfigError(f"the search space has {n_trials(cfg, space)} trials; that is not a "
                          "sweep you want (shrink the grids or num_samples)")
    return space


# --------------------------------------------------------------------------- paths and keys


@dataclass
class Paths:
    out: Path
    cache: Path
    best_config: Path
    best_checkpoint: Path
    storage: str
    name: str

    @property
    def experiment(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"


def _abs(p: str) -> str:
    return p if (not p or "://" in p) else str(Path(p).expanduser().resolve())


def absolutize(cfg: RunConfig) -> RunConfig:
    """A copy with the paths trials and tasks read made absolute: Tune starts each trial in its
    own directory, and Ray workers do not share the driver's cwd."""
    d = config_to_dict(cfg)
    d["run_dir"] = _abs(d["run_dir"])
    d["data"]["prepared_dir"] = _abs(d["data"]["prepared_dir"])
    d["resources"]["storage_path"] = _abs(d["resources"]["storage_path"])
    d["prior"]["cache_dir"] = _abs(d["prior"]["cache_dir"])
    d["prior"]["sam_checkpoint"] = _abs(d["prior"]["sam_checkpoint"])
    return config_from_dict(d, "sweep config")


def resolve_paths(cfg: RunConfig) -> Paths:
    t = cfg.tune
    out = Path(_abs(t.out_dir or str(Path(cfg.run_dir) / "tune")))
    return Paths(
        out=out,
        cache=Path(_abs(t.stage1_cache or str(Path(cfg.run_dir) / "stage1_cache"))),
        best_config=Path(_abs(t.best_config)),
        best_checkpoint=Path(_abs(t.best_checkpoint or str(out / "best"))),
        storage=_abs(cfg.resources.storage_path),
        name=t.name or f"{cfg.name}-tune",
    )


def _without_paths(d: dict) -> dict:
    d = json.loads(json.dumps(d))
    for section, key in _PATH_KEYS:
        if section in d:
            d[section].pop(key, None)
    return d


def stage1_key(cfg: RunConfig, data_manifest_sha256: str) -> str:
    """Hash of everything a stage-1 model depends on.

    Model, stage-1 (beta among it), data, degradation and prior sections, seed, NaN policy,
    the number of Train workers (DDP multiplies the global batch) and the prepared data's
    manifest digest (its content). Not stage 2 (alpha), not paths, not the sweep itself.
    """
    d = _without_paths(config_to_dict(cfg))
    payload = {k: d[k] for k in ("model", "stage1", "data", "degradation", "prior", "seed",
                                 "nan_policy")}
    payload["num_workers"] = cfg.resources.num_workers
    payload["data_manifest_sha256"] = data_manifest_sha256
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _semantic(cfg: RunConfig) -> dict:
    """What a resumed sweep must share with the one it continues."""
    d = _without_paths(config_to_dict(cfg))
    keep_tune = ("alpha1", "alpha2", "beta", "search", "num_samples", "seed", "metric", "mode",
                 "asha", "grace_period", "reduction_factor", "num_workers")
    out = {k: d[k] for k in ("model", "stage1", "stage2", "data", "degradation", "augment",
                             "prior", "seed", "nan_policy")}
    out["tune"] = {k: d["tune"][k] for k in keep_tune}
    return out


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _bkey(beta: float) -> str:
    return repr(float(beta))


def _is_checkpoint(p: Path) -> bool:
    from pgasr.checkpoint import is_checkpoint

    return is_checkpoint(p)


def with_point(cfg: RunConfig | dict, point: dict, stage1: dict[str, str]) -> RunConfig:
    """The run config of one trial: ``cfg`` with its alpha1, alpha2, beta and stage 1."""
    d = config_to_dict(cfg) if isinstance(cfg, RunConfig) else json.loads(json.dumps(cfg))
    beta = float(point["beta"])
    d["stage1"]["beta"] = beta
    d["stage2"]["alpha1"] = float(point["alpha1"])
    d["stage2"]["alpha2"] = float(point["alpha2"])
    d["stage2"]["stage1_checkpoint"] = stage1[_bkey(beta)]
    return config_from_dict(d, "trial config")


# --------------------------------------------------------------------------- Ray plumbing


def _quiet_data() -> None:
    """No Ray Data progress bars from this process's datasets (trials and stage-1 tasks build
    their trainers; jobs.common.init_ray does the same for the driver)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def remove_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor is dead; returns how many.

    When ASHA stops a trial (or a trial reaches ``max_t``), Tune ends the trial's actor, and
    with it the Train controller it owns, while the Train run is still going. Ray Train V2
    then relies on a detached ``PlacementGroupCleaner`` to remove the workers' placement
    group, but that cleaner asks the State API whether the controller is alive, and the State
    API needs the dashboard: on a cluster without one (a local cluster started by
    ``jobs.common.init_ray``, the test cluster) it never gets an answer and the group keeps
    its CPUs/GPUs until the sweep's job ends, so the next trials wait forever. GCS itself only
    drops a non-detached group once its creator actor *and* its job are dead. So the sweep
    does it: groups of this job whose creator actor died (the Train controllers of ended
    trials; a live run's controller is alive, Tune's own trial groups are created by the
    driver) are removed. Harmless where the cleaner works: the group is gone already.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    try:
        table = state._connect_and_get_accessor().get_placement_group_table()
    except Exception as e:  # noqa: BLE001 - best effort; a private accessor may change
        log.debug("placement group table unavailable: %s", e)
        return 0
    for raw in table:
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        # A group made by a driver (Tune's trial groups) has a nil creator actor and counts
        # as "creator actor dead" from the start: only groups made by an actor qualify.
        made_by_actor = bool(pg.creator_actor_id) and not ray.ActorID(pg.creator_actor_id).is_nil()
        if (pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached
                or not made_by_actor or not pg.creator_actor_dead
                or pg.creator_job_id.hex() != job):
            continue
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
        except Exception as e:  # noqa: BLE001
            log.warning("could not remove placement group %s: %s",
                        pg.placement_group_id.hex(), e)
    if removed:
        log.info("removed %d placement group(s) of ended Train runs", removed)
    return removed


# --------------------------------------------------------------------------- stage 1, once per key


def _train_stage1(cfg_dict: dict, key: str, cache_dir: str, run_name: str) -> dict:
    """Ray task: train (or find) the stage 1 of ``key`` and publish it at ``cache_dir/key``.

    The exclusive lock makes a second sweep sharing the cache wait for this training instead
    of repeating it; ``run_stage`` copies the final checkpoint beside the target and renames
    it into place, so a half-written stage 1 is never visible under its key.
    """
    from jobs.train_stage import run_stage

    _quiet_data()
    cfg = config_from_dict(cfg_dict, f"stage-1 config {key}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / key
    with open(cache / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_checkpoint(target):
            return {"key": key, "trained": False}
        t0 = time.perf_counter()
        run_stage(1, cfg, name=run_name, out=target)
        summary = json.loads((cache / f"{key}.json").read_text())
        return {"key": key, "trained": True, "seconds": time.perf_counter() - t0,
                "metrics": summary.get("metrics") or {}}


def _event(cache: Path, **rec) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **rec}
    with open(cache / STAGE1_EVENTS, "a") as f:
        f.write(json.dumps(rec) + "\n")


def ensure_stage1(cfg: RunConfig, betas: list[float], paths: Paths) -> dict[str, dict]:
    """One stage-1 checkpoint per distinct stage-1 config, trained only where the cache has
    none. Returns ``{repr(beta): {"key", "path", "trained"}}``."""
    import ray

    from jobs.train_stage import data_dir
    from pgasr.data import schema
    from pgasr.provenance import sha256_file

    manifest = sha256_file(data_dir(cfg) / schema.MANIFEST)
    per_beta: dict[str, dict] = {}
    todo: dict[str, tuple[float, RunConfig]] = {}
    for beta in betas:
        d = config_to_dict(cfg)
        d["stage1"]["beta"] = float(beta)
        c1 = config_from_dict(d, "stage-1 config")
        key = stage1_key(c1, manifest)
        per_beta[_bkey(beta)] = {"beta": float(beta), "key": key,
                                 "path": str(paths.cache / key), "trained": False}
        if not _is_checkpoint(paths.cache / key):
            todo.setdefault(key, (float(beta), c1))
    hits = sorted({v["key"] for v in per_beta.values()} - set(todo))
    for v in per_beta.values():
        if v["key"] in hits:
            _event(paths.cache, event="cached", key=v["key"], beta=v["beta"], sweep=paths.name)
    print(f"stage 1: {len(set(v['key'] for v in per_beta.values()))} distinct config(s) for "
          f"{len(betas)} beta value(s); {len(hits)} cached, {len(todo)} to train", flush=True)

    task = ray.remote(num_cpus=0, max_retries=0)(_train_stage1)
    queue = list(todo.items())
    pending: dict = {}
    trained: set[str] = set()
    while queue or pending:
        while queue and len(pending) < cfg.tune.max_concurrent_trials:
            key, (beta, c1) = queue.pop(0)
            print(f"stage 1: training beta={beta:g} (key {key})", flush=True)
            ref = task.remote(config_to_dict(c1), key, str(paths.cache),
                              f"{cfg.name}-stage1-{key}")
            pending[ref] = (key, beta)
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            key, beta = pending.pop(ref)
            try:
                info = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - any task failure ends the sweep here
                raise RuntimeError(f"stage-1 training for beta={beta:g} (key {key}) failed: "
                                   f"{e}") from e
            if info["trained"]:
                trained.add(key)
                _event(paths.cache, event="trained", key=key, beta=beta, sweep=paths.name,
                       seconds=round(info["seconds"], 1),
                       val_psnr=info["metrics"].get("val_psnr"))
                print(f"stage 1: beta={beta:g} trained in {info['seconds']:.0f} s "
                      f"(val PSNR {info['metrics'].get('val_psnr', float('nan')):.2f} dB)",
                      flush=True)
            else:
                _event(paths.cache, event="cached", key=key, beta=beta, sweep=paths.name)
    for v in per_beta.values():
        v["trained"] = v["key"] in trained
    return per_beta


# --------------------------------------------------------------------------- trials


class ReportToTune(TuneReportCallback):
    """``TuneReportCallback`` plus ``epochs_done``, the 1-based epoch count ASHA's rungs are
    measured in (``training_iteration`` restarts at 1 when Tune re-runs a trial whose Train run
    then continues from its checkpoint)."""

    def after_report(self, run_context, metrics, checkpoint):
        first = dict(metrics[0]) if metrics else {}
        if "epoch" in first:
            first[TIME_ATTR] = int(first["epoch"]) + 1
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def _trial(config: dict, base: dict, stage1: dict, out_dir: str) -> None:
    """One Tune trial: stage 2 with this (alpha1, alpha2) on the stage 1 of this beta, as a Ray
    Train run named after the trial (a re-run of the trial continues that run)."""
    from jobs.train_stage import make_trainer

    _quiet_data()
    ctx = ray_tune.get_context()
    trial_id = ctx.get_trial_id()
    cfg = with_point(base, config, stage1)
    # One line per start of this trial: how the resume test tells re-runs from restores.
    marks = Path(out_dir) / "trials" / trial_id
    marks.mkdir(parents=True, exist_ok=True)
    with open(marks / "starts.log", "a") as f:
        f.write(f"{time.time():.3f} {os.getpid()}\n")
    trainer = make_trainer(2, cfg, name=f"{ctx.get_experiment_name()}-{trial_id}",
                           callbacks=[ReportToTune()])
    trainer.fit()


class Progress(ray_tune.Callback):
    """One line per trial epoch and per trial end, on the driver; and, every few seconds,
    :func:`remove_orphaned_placement_groups` (the Train runs of stopped trials)."""

    def __init__(self, metric: str, epochs: int, total: int, janitor_every_s: float = 2.0):
        self.metric, self.epochs, self.total = metric, epochs, total
        self.ended = 0
        self.janitor_every_s = janitor_every_s
        self._last_janitor = 0.0

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last_janitor >= self.janitor_every_s:
            self._last_janitor = now
            remove_orphaned_placement_groups()

    def __getstate__(self):  # pickled into the experiment (Tuner.restore)
        return {**self.__dict__, "_last_janitor": 0.0}

    @staticmethod
    def _point(trial) -> str:
        c = trial.config
        return f"beta={c.get('beta'):g} alpha1={c.get('alpha1'):.4g} alpha2={c.get('alpha2'):.4g}"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        v = result.get(self.metric)
        shown = f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"
        print(f"trial {trial.trial_id} ({self._point(trial)}) epoch "
              f"{result.get(TIME_ATTR, '?')}/{self.epochs}: {self.metric}={shown}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended += 1
        done = int((trial.last_result or {}).get(TIME_ATTR, 0))
        how = "finished" if done >= self.epochs else f"stopped early after {done} epoch(s)"
        print(f"[{self.ended}/{self.total}] trial {trial.trial_id} ({self._point(trial)}) {how}",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended += 1
        print(f"[{self.ended}/{self.total}] trial {trial.trial_id} ({self._point(trial)}) FAILED "
              f"(see {trial.local_path})", flush=True)


def _trainable(cfg: RunConfig, stage1: dict[str, str], paths: Paths):
    fn = ray_tune.with_parameters(_trial, base=config_to_dict(cfg), stage1=stage1,
                                  out_dir=str(paths.out))
    return ray_tune.with_resources(fn, {"CPU": cfg.tune.trial_cpus})


def build_tuner(cfg: RunConfig, space: dict[str, Param], stage1: dict[str, str], paths: Paths,
                restore: bool):
    """A new ``Tuner`` for the sweep, or the one restored from ``paths.experiment``."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    t = cfg.tune
    trainable = _trainable(cfg, stage1, paths)
    if restore:
        return ray_tune.Tuner.restore(paths.experiment, trainable=trainable,
                                      resume_unfinished=True, resume_errored=True)
    scheduler = (ASHAScheduler(time_attr=TIME_ATTR, max_t=cfg.stage2.epochs,
                               grace_period=t.grace_period, reduction_factor=t.reduction_factor)
                 if t.asha else FIFOScheduler())
    return ray_tune.Tuner(
        trainable,
        param_space={name: p.domain() for name, p in space.items()},
        tune_config=ray_tune.TuneConfig(
            metric=t.metric, mode=t.mode, scheduler=scheduler, num_samples=t.num_samples,
            # The generator's own cap is what max_concurrent_trials would set (Tune ignores
            # the TuneConfig field when a SearchGenerator is given).
            search_alg=BasicVariantGenerator(max_concurrent=t.max_concurrent_trials,
                                             random_state=t.seed)),
        run_config=ray_tune.RunConfig(
            name=paths.name, storage_path=paths.storage,
            failure_config=ray_tune.FailureConfig(max_failures=t.max_trial_failures),
            callbacks=[Progress(t.metric, cfg.stage2.epochs, n_trials(cfg, space)),
                       *_mlflow_callbacks(cfg, paths)]),
    )


def _mlflow_callbacks(cfg: RunConfig, paths: Paths) -> list:
    """Ray's own MLflow logger: every trial an MLflow run (its alpha/beta as parameters,
    every reported epoch as metrics) in the sweep's experiment (``tracking.*``)."""
    from pgasr.tracking import init_store, resolve_uri

    uri = resolve_uri(cfg)
    if uri is None:
        return []
    try:
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError:
        log.warning("tracking.mlflow is on but mlflow is not installed: trials are not tracked")
        return []
    init_store(uri)  # the callback opens the store unlocked
    return [MLflowLoggerCallback(tracking_uri=uri,
                                 experiment_name=cfg.tracking.experiment or paths.name,
                                 tags={"pgasr.sweep": paths.name})]


# --------------------------------------------------------------------------- results


COLUMNS = ["trial_id", "status", "beta", "alpha1", "alpha2", "epochs_done", "val_psnr",
           "val_ssim", "val_gain_db", "best_epoch_metric", "eval_psnr", "eval_ssim",
           "eval_lpips", "stage1_key", "checkpoint_path", "error"]


def _trial_id(r) -> str:
    if r.metrics and r.metrics.get("trial_id"):
        return str(r.metrics["trial_id"])
    name = Path(str(r.path)).name  # _trial_{prefix}_{counter}_{n}_{params}_{date}
    parts = name.split("_")
    return "_".join(parts[2:4]) if name.startswith("_trial_") and len(parts) > 3 else name


def collect(results, cfg: RunConfig, stage1: dict[str, dict]) -> list[dict]:
    """One row per trial of a ``ResultGrid``."""
    t = cfg.tune
    rows = []
    for r in results:
        m = r.metrics or {}
        c = r.config or {}
        done = int(m.get(TIME_ATTR, 0))
        if r.error is not None:
            status = "error"
        elif done >= cfg.stage2.epochs:
            status = "completed"
        elif done > 0:
            status = "stopped_early"
        else:
            status = "no_result"
        best = None
        df = r.metrics_dataframe
        if df is not None and t.metric in getattr(df, "columns", []):
            col = df[t.metric].dropna()
            if len(col):
                best = float(col.max() if t.mode == "max" else col.min())
        beta = c.get("beta")
        rows.append({
            "trial_id": _trial_id(r), "status": status, "beta": beta,
            "alpha1": c.get("alpha1"), "alpha2": c.get("alpha2"), "epochs_done": done,
            "val_psnr": m.get("val_psnr"), "val_ssim": m.get("val_ssim"),
            "val_gain_db": m.get("val_gain_db"), "best_epoch_metric": best,
            "eval_psnr": None, "eval_ssim": None, "eval_lpips": None,
            "stage1_key": stage1.get(_bkey(beta), {}).get("key") if beta is not None else None,
            "checkpoint_path": m.get("checkpoint_path"),
            "error": (str(r.error).strip().splitlines() or [""])[-1][:300] if r.error else "",
        })
    key = (lambda row: -row[t.metric]) if t.mode == "max" else (lambda row: row[t.metric])
    rows.sort(key=lambda row: (row[t.metric] is None, key(row) if row[t.metric] is not None
                               else 0))
    return rows


def _evaluate_trial(checkpoint_path: str, data_dir: str, scale: int, out_dir: str) -> dict:
    """Ray task: PSNR/SSIM/LPIPS of one trial's last checkpoint on the val split (cached by
    checkpoint path, so a resumed sweep does not evaluate twice)."""
    import ray.train

    from pgasr.evaluate import evaluate

    out = Path(out_dir)
    done = out / "eval.json"
    if done.is_file():
        prev = json.loads(done.read_text())
        if prev.get("checkpoint_path") == checkpoint_path:
            return prev
    with tempfile.TemporaryDirectory(prefix="pgasr-eval-") as tmp:
        local = ray.train.Checkpoint(checkpoint_path).to_directory(str(Path(tmp) / "ckpt"))
        res = evaluate(local, data_dir, scale, out / "eval", split="val", n_figures=0)
    s = res["summary"]
    rec = {"checkpoint_path": checkpoint_path, "eval_psnr": s["psnr"]["mean"],
           "eval_ssim": s["ssim"]["mean"], "eval_lpips": s["lpips"]["mean"],
           "lpips_note": res["lpips"].get("reason"), "kl_hr_lr": res["codebook"]["kl_hr_lr"]}
    atomic_write_text(done, json.dumps(rec, indent=1))
    return rec


def final_eval(cfg: RunConfig, rows: list[dict], paths: Paths) -> str | None:
    """Fill eval_* of every row with a checkpoint; returns the LPIPS note (None: available)."""
    import ray

    from jobs.train_stage import data_dir

    src = str(data_dir(cfg))
    task = ray.remote(num_cpus=1, num_gpus=1 if cfg.resources.use_gpu else 0,
                      max_retries=1)(_evaluate_trial)
    refs = {task.remote(r["checkpoint_path"], src, cfg.stage2.scale,
                        str(paths.out / "trials" / r["trial_id"])): r
            for r in rows if r["checkpoint_path"]}
    note = None
    for ref, row in refs.items():
        try:
            rec = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - an evaluation failure is reported, not fatal
            log.warning("final evaluation of trial %s failed: %s", row["trial_id"], e)
            continue
        row.update({k: rec[k] for k in ("eval_psnr", "eval_ssim", "eval_lpips")})
        note = rec.get("lpips_note") or note
    return note


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_tables(rows: list[dict], paths: Paths, cfg: RunConfig, best: dict | None,
                 lpips_note: str | None) -> tuple[Path, Path]:
    paths.out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = paths.out / "results.csv", paths.out / "results.md"
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    atomic_write_text(csv_path, buf.getvalue())
    t = cfg.tune
    head = ["rank", "trial", "beta", "alpha1", "alpha2", "status", "epochs", "val PSNR (dB)",
            "val SSIM", "gain vs bicubic (dB)", "eval PSNR", "eval SSIM", "eval LPIPS",
            "stage-1 key"]
    asha = f"on (grace {t.grace_period}, reduction {t.reduction_factor})" if t.asha else "off"
    md = [f"# Sweep `{paths.name}`: {t.metric} ({t.mode}) over alpha1 x alpha2 x beta", "",
          f"{len(rows)} trials, stage 2 {cfg.stage2.epochs} epoch(s) each, ASHA {asha}; "
          f"{sum(r['status'] == 'stopped_early' for r in rows)} stopped early. "
          "val = the trial's last validated epoch; eval = its last checkpoint on the val split "
          "(per-subject means, `pgasr evaluate` conventions).", ""]
    if best:
        md += [f"Best: trial `{best['trial_id']}` (beta={best['beta']:g}, "
               f"alpha1={best['alpha1']:.4g}, alpha2={best['alpha2']:.4g}), {t.metric} = "
               f"{_fmt(best[t.metric])}.", ""]
    if lpips_note:
        md += [f"LPIPS: {lpips_note}.", ""]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        status = r["status"].replace("_", " ")
        if r["error"]:
            status += f": {r['error'][:80]}"
        md.append("| " + " | ".join([
            str(i), f"`{r['trial_id']}`", _fmt(r["beta"], 4), _fmt(r["alpha1"], 4),
            _fmt(r["alpha2"], 4), status, str(r["epochs_done"]), _fmt(r["val_psnr"], 2),
            _fmt(r["val_ssim"], 4), _fmt(r["val_gain_db"], 2), _fmt(r["eval_psnr"], 2),
            _fmt(r["eval_ssim"], 4), _fmt(r["eval_lpips"], 4), f"`{r['stage1_key']}`"]) + " |")
    atomic_write_text(md_path, "\n".join(md) + "\n")
    return csv_path, md_path


def plot(rows: list[dict], path: Path, metric: str, epochs: int, best: dict | None) -> Path:
    """``metric`` over alpha1 x alpha2, one panel per beta, one colour scale for all panels.

    Grids are drawn as annotated heat maps; sampled (random) alphas as a scatter. A cross
    marks trials ASHA stopped early (their value is from an earlier epoch), a box or star
    the best trial.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pts = [r for r in rows if r.get(metric) is not None and r.get("beta") is not None]
    betas = sorted({r["beta"] for r in rows if r.get("beta") is not None})
    n = max(1, len(betas))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1.2, 3.9), squeeze=False)
    vals = [r[metric] for r in pts]
    vmin, vmax = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    cmap = plt.get_cmap("viridis")
    norm = matplotlib.colors.Normalize(vmin, vmax)
    for ax, beta in zip(axes[0], betas):
        sub = [r for r in pts if r["beta"] == beta]
        a1 = sorted({r["alpha1"] for r in rows if r.get("beta") == beta})
        a2 = sorted({r["alpha2"] for r in rows if r.get("beta") == beta})
        cells = {(r["alpha1"], r["alpha2"]) for r in rows if r.get("beta") == beta}
        grid = len(a1) <= 10 and len(a2) <= 10 and len(cells) == len(a1) * len(a2) and \
            sum(r.get("beta") == beta for r in rows) == len(cells)
        if grid and sub:
            img = np.full((len(a2), len(a1)), np.nan)
            for r in sub:
                img[a2.index(r["alpha2"]), a1.index(r["alpha1"])] = r[metric]
            ax.imshow(img, origin="lower", cmap=cmap, norm=norm, aspect="auto")
            for r in rows:
                if r.get("beta") != beta:
                    continue
                x, y = a1.index(r["alpha1"]), a2.index(r["alpha2"])
                v = r.get(metric)
                text = "failed" if v is None else f"{v:.2f}"
                if r["status"] == "stopped_early":
                    text += f"\nstopped @{r['epochs_done']}"
                dark = v is not None and norm(v) < 0.5
                ax.text(x, y, text, ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
                if r["status"] == "stopped_early":
                    ax.plot(x, y, marker="x", ms=22, color="red", alpha=0.35, mew=1.5)
                if best is not None and r["trial_id"] == best["trial_id"]:
                    ax.add_patch(matplotlib.patches.Rectangle((x - 0.5, y - 0.5), 1, 1,
                                                              fill=False, lw=3, ec="red"))
            ax.set_xticks(range(len(a1)), [f"{v:.3g}" for v in a1])
            ax.set_yticks(range(len(a2)), [f"{v:.3g}" for v in a2])
        else:
            for r in sub:
                early = r["status"] == "stopped_early"
                ax.scatter(r["alpha1"], r["alpha2"], c=[cmap(norm(r[metric]))], s=70,
                           marker="x" if early else "o", edgecolors="none" if early else "k")
                if best is not None and r["trial_id"] == best["trial_id"]:
                    ax.scatter(r["alpha1"], r["alpha2"], marker="*", s=320, facecolors="none",
                               edgecolors="red", linewidths=1.5)
            for axis, vs in (("x", a1), ("y", a2)):
                if vs and min(vs) > 0 and max(vs) / min(vs) >= 10:
                    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        ax.set_xlabel("alpha1 (L_align_s)")
        ax.set_ylabel("alpha2 (L_align_d)")
        ax.set_title(f"beta = {beta:g}")
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[0]),
                 label=f"{metric} at the trial's last epoch")
    fig.suptitle(f"{metric} over alpha1 x alpha2 per beta ({epochs} epoch(s); red box/star = "
                 "best, x = stopped early by ASHA)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def pick_best(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The trial with the best finite ``metric`` that left a checkpoint (None if none did):
    a diverged trial's NaN/inf metric never wins."""
    ok = [r for r in rows if _finite(r.get(metric)) and r.get("checkpoint_path")]
    if not ok:
        return None
    return (max if mode == "max" else min)(ok, key=lambda r: r[metric])


def _finite(value) -> bool:
    """Whether ``value`` is a finite real number."""
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def export_best(cfg: RunConfig, best: dict, stage1: dict[str, dict], paths: Paths) -> RunConfig:
    """Copy the best trial's last checkpoint to ``paths.best_checkpoint`` (atomically) and
    write its resolved config, with ``serve.checkpoint`` set, to ``paths.best_config``."""
    import ray.train
    import yaml

    from pgasr.checkpoint import publish_checkpoint

    dest = paths.best_checkpoint
    # Verified copy renamed in; only an earlier exported checkpoint (or an empty dir) is
    # replaced, anything else at tune.best_checkpoint raises ForeignDirectoryError.
    with ray.train.Checkpoint(best["checkpoint_path"]).as_directory() as d:
        publish_checkpoint(d, dest, keep_train_state=False)  # optimiser state: not served
    best_cfg = with_point(cfg, best, {k: v["path"] for k, v in stage1.items()})
    best_cfg.serve.checkpoint = str(dest)
    header = (f"# Best trial of sweep {paths.name} ({paths.experiment}), written by "
              "tune/sweep.py.\n"
              f"# trial {best['trial_id']}: beta={best['beta']:g} alpha1={best['alpha1']:.6g} "
              f"alpha2={best['alpha2']:.6g}; {cfg.tune.metric}={_fmt(best[cfg.tune.metric], 4)} "
              f"after {best['epochs_done']} epoch(s).\n"
              f"# serve.checkpoint is the exported checkpoint: pgasr sr --checkpoint {dest} ...\n"
              "# stage2.stage1_checkpoint is the cached stage 1 this trial trained on.\n")
    text = header + yaml.safe_dump(config_to_dict(best_cfg), sort_keys=False)
    for target in {paths.best_config, paths.out / "best.yaml"}:
        atomic_write_text(target, text)
    return best_cfg


# --------------------------------------------------------------------------- driver


def _check_cluster(cfg: RunConfig) -> None:
    """Say so when one trial cannot fit the cluster as it is (an autoscaler may still add
    nodes; without one, Tune waits forever)."""
    import ray

    res = ray.cluster_resources()
    workers = cfg.resources.num_workers
    cpu = cfg.tune.trial_cpus + workers * cfg.resources.cpus_per_worker
    gpu = workers if cfg.resources.use_gpu else 0
    if cpu > res.get("CPU", 0) or gpu > res.get("GPU", 0):
        print(f"WARNING: one trial needs {cpu:g} CPU and {gpu} GPU; the cluster has "
              f"{res.get('CPU', 0):g} CPU and {res.get('GPU', 0):g} GPU now. Without an "
              "autoscaler to add nodes the sweep will wait forever (lower tune.num_workers / "
              "resources.cpus_per_worker, or set resources.use_gpu=false).", flush=True)


def run_sweep(cfg: RunConfig, address: str | None = None, resume: bool = False) -> dict:
    """Run (or resume) the sweep; returns the summary also written to ``sweep.json``."""
    from jobs.common import init_ray
    from jobs.train_stage import data_dir

    space = check_config(cfg)
    paths = resolve_paths(cfg)
    t0 = time.perf_counter()
    base = absolutize(cfg)
    if cfg.tune.num_workers:
        base.resources.num_workers = cfg.tune.num_workers

    # Decide new / resumed before touching the cluster: both mistakes are one-line errors.
    semantic_path = paths.out / "sweep_config.json"
    can = ray_tune.Tuner.can_restore(paths.experiment)
    if can and not resume:
        raise ValueError(f"a sweep already exists at {paths.experiment}: pass --resume to "
                         "continue it, or --set tune.name=NEW for a new one")
    if resume and can and semantic_path.is_file():
        changed = _diff(json.loads(semantic_path.read_text()), _semantic(base))
        if changed:
            raise ValueError(f"the config changed since the sweep at {paths.experiment} "
                             f"started ({', '.join(changed[:8])}): resume with the same "
                             "config, or --set tune.name=NEW for a new sweep")
    if resume and not can:
        print(f"nothing to resume at {paths.experiment}: starting a new sweep", flush=True)
    restore = resume and can
    # The best trial is exported there at the end: refuse foreign content now, not after it.
    check_replaceable(paths.best_checkpoint, CHECKPOINT_MARKER)

    init_ray(address, cfg)
    if cfg.tune.prepare:
        from jobs.prepare import run_prepare

        run_prepare(cfg, address)
        if cfg.model.acg:
            from jobs.priors import run_priors

            run_priors(cfg, address)
    src = data_dir(base)
    if not any((src / "val").glob("*.parquet")):
        raise ValueError(f"no validation shards in {src / 'val'}: the sweep's objective is "
                         "validation PSNR, so data.val_subjects must be > 0")
    paths.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(semantic_path, json.dumps(_semantic(base), indent=1, sort_keys=True))

    total = n_trials(cfg, space)
    print(f"sweep {paths.name}: {total} trial(s) of stage 2 ({cfg.stage2.epochs} epoch(s) each, "
          f"{base.resources.num_workers} Train worker(s) per trial, at most "
          f"{cfg.tune.max_concurrent_trials} at once), ASHA "
          f"{'on' if cfg.tune.asha else 'off'}; experiment {paths.experiment}"
          f"{' (resumed)' if restore else ''}", flush=True)
    for p in space.values():
        print(f"  {p.name}: {p.describe()}", flush=True)
    _check_cluster(base)

    betas = space["beta"].values
    stage1 = ensure_stage1(base, betas, paths)
    tuner = build_tuner(base, space, {k: v["path"] for k, v in stage1.items()}, paths, restore)
    results = tuner.fit()
    remove_orphaned_placement_groups()  # the Train runs of the last trials Tune stopped

    rows = collect(results, base, stage1)
    lpips_note = final_eval(base, rows, paths) if cfg.tune.final_eval else None
    best = pick_best(rows, cfg.tune.metric, cfg.tune.mode)
    csv_path, md_path = write_tables(rows, paths, base, best, lpips_note)
    png = plot(rows, paths.out / "psnr_alpha.png", cfg.tune.metric, cfg.stage2.epochs, best)
    summary = {
        "experiment": paths.experiment, "restored": restore, "trials": len(rows),
        "status": {s: sum(r["status"] == s for r in rows)
                   for s in ("completed", "stopped_early", "error", "no_result")},
        "stage1": stage1, "stage1_trained": sorted({v["key"] for v in stage1.values()
                                                    if v["trained"]}),
        "results_csv": str(csv_path), "results_md": str(md_path), "plot": str(png),
        "best": None, "seconds": round(time.perf_counter() - t0, 1),
    }
    if best is not None:
        export_best(base, best, stage1, paths)
        summary["best"] = {**{k: best[k] for k in ("trial_id", "beta", "alpha1", "alpha2",
                                                     "epochs_done", cfg.tune.metric)},
                           "checkpoint": str(paths.best_checkpoint),
                           "config": str(paths.best_config)}
    atomic_write_text(paths.out / "sweep.json", json.dumps(summary, indent=1, default=str))
    print(f"\nresults: {csv_path}\n         {md_path}\nplot:    {png}", flush=True)
    st = summary["status"]
    print(f"trials: {st['completed']} completed, {st['stopped_early']} stopped early by ASHA, "
          f"{st['error']} failed; stage 1 trained {len(summary['stage1_trained'])} time(s) in "
          f"this run for {len(set(v['key'] for v in stage1.values()))} distinct config(s)",
          flush=True)
    if best is None:
        print("no trial produced a checkpoint: nothing to export (see the errors above)",
              file=sys.stderr, flush=True)
    else:
        print(f"best:    trial {best['trial_id']} beta={best['beta']:g} "
              f"alpha1={best['alpha1']:.4g} alpha2={best['alpha2']:.4g} "
              f"{cfg.tune.metric}={_fmt(best[cfg.tune.metric])}\n"
              f"         checkpoint {paths.best_checkpoint}\n         config     "
              f"{paths.best_config}", flush=True)
    return summary


def parser() -> argparse.ArgumentParser:
    from jobs.common import job_parser

    p = job_parser(__doc__.split("\n\n")[0])
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep at resources.storage_path/tune.name (Tuner.restore); "
                        "starts a new one when there is nothing to restore")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; user errors are one line on stderr and exit status 2."""
    from jobs.common import RayConnectionError

    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_config(cfg)  # fail before touching the cluster
        summary = run_sweep(cfg, args.address, resume=args.resume)
    except (ConfigError, ValueError, FileNotFoundError, RayConnectionError) as e:
        if os.environ.get("PGASR_DEBUG"):
            raise
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0 if summary["best"] is not None else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Import under the package name so Ray pickles _trial & co. by reference (tune.sweep),
    # not by value from __main__.
    from tune.sweep import main as _main

    sys.exit(_main())
