"""Typed run configuration, loaded once at the entry point.

One dataclass per concern, composed into :class:`RunConfig`. YAML files in ``configs/`` are
loaded with :func:`load_config`; unknown keys are an error that names the key and the file,
and ``key.sub=value`` overrides (``--set`` on every CLI) are applied after the file.

Concern-specific classes that belong to a sub-package live there (``pgasr.models.config``,
``pgasr.priors.config``) and are re-exported here so that a single import gives the whole
vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pgasr.models.config import ModelConfig, Stage1Config, Stage2Config
from pgasr.priors.config import PriorConfig

__all__ = [
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "DegradationConfig",
    "InferenceConfig",
    "ModelConfig",
    "PriorConfig",
    "ResourcesConfig",
    "RunConfig",
    "SearchSpace",
    "ServeConfig",
    "Stage1Config",
    "Stage2Config",
    "SynthConfig",
    "TuneConfig",
    "load_config",
    "dump_config",
    "config_to_dict",
    "config_from_dict",
    "apply_overrides",
]


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


@dataclass
class SynthConfig:
    """Embedded synthetic IXI-like T2 cohort built from the MNI152 template nilearn ships."""

    subjects: int = 8
    size: int = 256  # in-plane matrix (pixels); the template is resampled onto it
    slices: int = 120  # axial slices per volume (>= data.slices_per_volume + margin)
    seed: int = 0
    out_dir: str = "data/synth"


@dataclass
class DataConfig:
    """Dataset ingest (paper Sec. 3 "Dataset")."""

    # "synthetic", or where the scans are: an IXI directory/.tar, a BIDS dataset, any folder
    # of NIfTI files, a .csv/.tsv file list or a glob (pgasr.data.sources; docs/data.md)
    source: str = "synthetic"
    source_format: str = "auto"  # auto | ixi | bids | list | glob | nifti
    contrast: str = "T2"  # IXI contrast (T1, T2, PD); BIDS suffix contrast + "w" by default
    bids_suffix: str = ""  # BIDS suffix to ingest when it is not contrast + "w" (e.g. FLAIR)
    # In-plane voxel size (mm) every scan is resampled to before slicing (the paper's 1 mm);
    # null keeps each scan's own spacing. The synthetic cohort is used on its own grid.
    voxel_size: float | None = 1.0
    prepared_dir: str = "data/prepared"
    slices_per_volume: int = 80  # central axial slices kept per subject
    size: int = 256  # in-plane crop/pad target (pixels)
    # Subject split; integers are counts, floats in (0, 1) are fractions of the cohort.
    # The paper uses 300 train / 176 test subjects. Validation subjects are taken from what
    # is left after test, before train.
    train_subjects: float = 300
    val_subjects: float = 0
    test_subjects: float = 176
    split_seed: int = 0
    scales: list[int] = field(default_factory=lambda: [2, 4])
    rows_per_shard: int = 240  # slice triplets per Parquet file
    head_threshold: float = 0.1  # fraction of the 99th percentile defining "head" voxels


@dataclass
class DegradationConfig:
    """LR synthesis: anisotropic Gaussian blur -> AWGN -> bicubic down-sampling.

    Blur sigmas are in HR pixels and scale with the SR factor (``sigma * scale / 2``) so the
    blur stays comparable to the sampling step; noise sigma is a fraction of the slice's
    robust intensity range (99.5th percentile - min). See ``docs/data.md`` for the reasoning.
    """

    blur_sigma: list[float] = field(default_factory=lambda: [0.2, 1.2])  # at x2
    blur_kernel_max: int = 21
    noise_sigma: list[float] = field(default_factory=lambda: [0.0, 0.02])
    seed: int = 1234


@dataclass
class AugmentConfig:
    """Contrast/sharpness randomisation of training volumes (:mod:`pgasr.data.augment`):
    ``copies`` extra, randomly transformed copies of every training volume (0 = off)."""

    copies: int = 0
    remap_p: float = 0.7  # probability of a random piecewise-linear contrast curve
    remap_knots: int = 6
    gamma: float = 0.7  # log-gamma ~ U(-gamma, gamma)
    blur: list[float] = field(default_factory=lambda: [0.0, 0.9])  # HR in-plane sigma, pixels
    seed: int = 0


@dataclass
class InferenceConfig:
    """How a trained model is applied (``pgasr sr``, ``pgasr evaluate``, Serve, the report).

    ``background: bicubic`` keeps the background of the input: outside a head mask computed
    from the bicubic-upsampled LR slice (model units above ``background_threshold``, holes
    filled, dilated by ``mask_dilate`` HR pixels, feathered over ``mask_feather`` pixels) the
    output is the bicubic interpolation of the input, so air and zero-filled regions stay
    what they were. ``model`` uses the network's output everywhere.

    Before that, the output is back-projected onto the LR input ``back_projection_steps`` times
    with step ``back_projection_weight`` (:mod:`pgasr.consistency`).
    """

    background: str = "bicubic"  # bicubic | model
    background_threshold: float = 0.1  # model units: the head mean is 1 (pgasr.intensity)
    mask_dilate: int = 3  # HR pixels
    mask_feather: float = 1.5  # Gaussian sigma of the mask edge, HR pixels
    # Iterative back-projection of the output onto the LR input (pgasr.consistency); 0 = off.
    back_projection_steps: int = 3
    back_projection_weight: float = 0.5


@dataclass
class ResourcesConfig:
    """Ray resources. GPUs are config, never hard-coded: a GPU request on a CPU-only
    cluster waits forever."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int = 0  # intra-op threads per train worker; 0 = cpus_per_worker
    # Logical CPUs of a local cluster started by a job (0 = max(4, cores + 2)). Ray Data needs
    # CPUs beside the train workers' or the streaming read deadlocks.
    local_num_cpus: int = 0
    # Start a job's own local cluster with the dashboard (bound to 127.0.0.1; Ray moves it off
    # 8265 when that port is taken). Ray Train's placement-group cleaner and the state API
    # need it: without it every Train run logs "State API may be temporarily unavailable"
    # and placement groups of stopped Tune trials are not released.
    local_dashboard: bool = True
    prepare_cpus: float = 1.0  # CPUs of each per-volume ingest task of jobs/prepare.py
    gpus_per_prior_actor: float = 0.0
    prior_actors: int = 2
    max_failures: int = 2
    storage_path: str = "runs"
    # A train worker whose dataset shard is at most this many MiB reads it once through Ray
    # Data and reshuffles it in memory every later epoch (no per-epoch pipeline start-up,
    # which dominated small epochs: docs/training.md). Larger shards stream every epoch.
    # 0 = always stream.
    in_memory_shard_mib: int = 1024


@dataclass
class ServeConfig:
    """The HTTP service (``serve/app.py``; routes, limits and security in ``docs/serve.md``).

    API keys come from the environment variable named by ``api_keys_env`` (comma-separated)
    and/or ``api_keys_file`` (comma- or newline-separated, ``#`` comments); the service
    refuses to start without one unless ``allow_no_auth`` (development only) is set.
    """

    checkpoint: str = ""
    # More stage-2 checkpoints of other scales (e.g. RUN_DIR/stage2_x4): one replica serves
    # them all and routes each request by its ?scale=
    checkpoints: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys_env: str = "PGASR_API_KEYS"
    api_keys_file: str = ""
    max_body_bytes: int = 512 * 1024 * 1024
    max_voxels: int = 512 * 512 * 512
    request_timeout_s: float = 300.0
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 8
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    memory_per_replica: int = 0  # bytes of Ray memory a replica reserves; 0: from the caps
    max_queued_requests: int = 64  # per caller; beyond it Serve answers 503 at once
    max_slice_pixels: int = 1024 * 1024  # LR pixels (h x w) of one /v1/sr/slice image
    max_output_voxels: int = 0  # SR voxels of one answer; 0: 4 x max_voxels (x2 of the largest)
    max_volume_queue: int = 4  # volume jobs per replica (computing + waiting); beyond: 503
    body_timeout_s: float = 120.0  # the whole request body must arrive within this
    body_idle_timeout_s: float = 10.0  # longest pause between two chunks of a body
    bf16: bool = False  # autocast on CUDA replicas
    allow_no_auth: bool = False  # development only: no API key needed (loud warning)


@dataclass
class SearchSpace:
    """The search space of one swept loss weight (``tune.alpha1``, ``tune.alpha2``,
    ``tune.beta``), written as a mapping; a plain YAML list is shorthand for ``values``.

    * ``grid``: every value in ``values`` (cartesian product with the other grids),
    * ``choice``: one of ``values`` drawn per trial (``tune.num_samples`` trials),
    * ``uniform`` / ``loguniform``: a range ``[low, high]``, drawn per trial by Tune or, with
      ``n > 0``, ``n`` values drawn once up front (seeded by ``tune.seed``) and swept as a grid.

    ``beta`` changes stage 1, so its values must be known before the stage-2 trials start (one
    stage-1 training per value): grid, choice, or a range with ``n > 0``.
    """

    type: str = "grid"  # grid | choice | uniform | loguniform
    values: list[float] = field(default_factory=list)
    low: float = 0.0
    high: float = 0.0
    n: int = 0


@dataclass
class TuneConfig:
    """The Ray Tune sweep of the loss weights (``tune/sweep.py``, ``docs/tune.md``).

    Each trial trains stage 2 through Ray Train with one (alpha1, alpha2) on the stage 1 of its
    beta; stage 1 is trained once per distinct stage-1 config and cached. The defaults bracket
    the paper's alpha1 = alpha2 = 0.1, beta = 0.25 (3 beta x 9 alpha = 27 trials, 3 stage-1
    trainings).
    """

    alpha1: list[float] | SearchSpace = field(default_factory=lambda: [0.03, 0.1, 0.3])
    alpha2: list[float] | SearchSpace = field(default_factory=lambda: [0.03, 0.1, 0.3])
    beta: list[float] | SearchSpace = field(default_factory=lambda: [0.1, 0.25, 0.5])
    search: str = "grid"  # grid | random: how plain lists are read (grid, or choice per trial)
    num_samples: int = 1  # Tune's num_samples: grid repeats / random draws per grid cell
    seed: int = 0  # up-front draws (ranges with n > 0) and Tune's random sampling
    metric: str = "val_psnr"  # val_psnr | val_ssim | val_gain_db (per-epoch validation)
    mode: str = "max"
    asha: bool = True
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: int = 2
    max_concurrent_trials: int = 2  # Train runs in flight (stage-1 trainings included)
    num_workers: int = 0  # Train workers per trial (0 = resources.num_workers)
    trial_cpus: float = 1.0  # CPUs held by each trial's driver actor (it only drives Train)
    max_trial_failures: int = 0  # Tune re-runs of a trial whose driver died
    final_eval: bool = True  # PSNR/SSIM/LPIPS of every trial's last checkpoint on the val split
    prepare: bool = True  # run the (idempotent) prepare/priors steps before sweeping
    name: str = ""  # experiment name under resources.storage_path (default {name}-tune)
    out_dir: str = ""  # results table, plot, best checkpoint (default {run_dir}/tune)
    stage1_cache: str = ""  # cached stage-1 checkpoints (default {run_dir}/stage1_cache)
    best_config: str = "configs/best.yaml"  # the best trial's resolved config
    best_checkpoint: str = ""  # the best trial's checkpoint directory (default {out_dir}/best)


@dataclass
class RunConfig:
    """Everything one run needs. ``name`` keys the run directory under ``run_dir``."""

    name: str = "pgasr"
    run_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    nan_policy: str = "error"  # error | skip: a non-finite training loss raises, or is skipped
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


# --------------------------------------------------------------------------- conversion


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (YAML/JSON-safe) of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        # Name why each alternative failed (e.g. an unknown key inside a mapping).
        raise ConfigError(f"{where}: {value!r} does not match {tp} ({'; '.join(errors)})")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _from_dict(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict, source: str = "<dict>", cls: type = RunConfig) -> Any:
    """Build a config from a nested dict; unknown keys raise :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    try:
        cfg = _from_dict(cls, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {str(e).lstrip(': ')}") from None
    validate(cfg, source)
    return cfg


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(cfg: RunConfig, overrides: list[str] | None, source: str = "--set") -> RunConfig:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) and re-validate."""
    if not overrides:
        return cfg
    data = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"{source}: unknown key {'.'.join(parts[: i + 1])!r} in {item!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"{source}: unknown key {key!r} in {item!r}")
        node[parts[-1]] = _parse_scalar(raw)
    return config_from_dict(data, source)


def validate(cfg: RunConfig, source: str = "<config>") -> None:
    """Semantic checks that types alone cannot express."""
    d = cfg.data
    for s in d.scales:
        if s not in (2, 4):
            raise ConfigError(f"{source}: data.scales may contain only 2 and 4, got {s}")
    if d.slices_per_volume < 1:
        raise ConfigError(f"{source}: data.slices_per_volume must be >= 1")
    from pgasr.data.sources import FORMATS

    if d.source_format not in FORMATS:
        raise ConfigError(f"{source}: data.source_format must be one of {', '.join(FORMATS)}, "
                          f"got {d.source_format!r}")
    if d.voxel_size is not None and not 0 < d.voxel_size <= 20:
        raise ConfigError(f"{source}: data.voxel_size must be in (0, 20] mm or null, "
                          f"got {d.voxel_size}")
    if d.size < 8 or d.size % 8:
        raise ConfigError(f"{source}: data.size must be a positive multiple of 8, got {d.size}")
    for name in ("train_subjects", "val_subjects", "test_subjects"):
        v = getattr(d, name)
        if v < 0:
            raise ConfigError(f"{source}: data.{name} must be >= 0")
    lo, hi = cfg.degradation.blur_sigma
    if not 0 < lo <= hi:
        raise ConfigError(f"{source}: degradation.blur_sigma must be 0 < lo <= hi")
    nlo, nhi = cfg.degradation.noise_sigma
    if not 0 <= nlo <= nhi:
        raise ConfigError(f"{source}: degradation.noise_sigma must be 0 <= lo <= hi")
    for s in cfg.stage2.scales or [cfg.stage2.scale]:
        if s not in d.scales:
            raise ConfigError(f"{source}: stage 2 at x{s} (stage2.scale / stage2.scales) needs "
                              f"x{s} in data.scales, got {d.scales}")
    a = cfg.augment
    if a.copies < 0:
        raise ConfigError(f"{source}: augment.copies must be >= 0, got {a.copies}")
    if not 0 <= a.remap_p <= 1:
        raise ConfigError(f"{source}: augment.remap_p must be in [0, 1], got {a.remap_p}")
    if a.remap_knots < 2:
        raise ConfigError(f"{source}: augment.remap_knots must be >= 2, got {a.remap_knots}")
    if a.gamma < 0:
        raise ConfigError(f"{source}: augment.gamma must be >= 0, got {a.gamma}")
    if len(a.blur) != 2 or not 0 <= a.blur[0] <= a.blur[1]:
        raise ConfigError(f"{source}: augment.blur must be [lo, hi] with 0 <= lo <= hi")
    if cfg.nan_policy not in ("error", "skip"):
        raise ConfigError(f"{source}: nan_policy must be error or skip")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{source}: device must be auto, cpu or cuda")
    inf = cfg.inference
    if inf.background not in ("bicubic", "model"):
        raise ConfigError(f"{source}: inference.background must be bicubic or model, "
                          f"got {inf.background!r}")
    if inf.mask_dilate < 0 or inf.mask_feather < 0:
        raise ConfigError(f"{source}: inference.mask_dilate and mask_feather must be >= 0")
    if inf.back_projection_steps < 0 or not 0 < inf.back_projection_weight <= 1:
        raise ConfigError(f"{source}: inference.back_projection_steps must be >= 0 and "
                          "back_projection_weight in (0, 1]")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or defaults when ``path`` is None) and apply overrides."""
    if path is None:
        cfg = RunConfig()
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        cfg = config_from_dict(data or {}, str(p))
    return apply_overrides(cfg, overrides)


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (every run writes one)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
