"""Typed run configuration, loaded once at the entry point.

One dataclass per concern, composed into :class:`RunConfig`. YAML files in ``configs/`` are
loaded with :func:`load_config`; unknown keys are an error that names the key and the file,
and ``key.sub=value`` overrides (``--set`` on every CLI) are applied after the file.

Concern-specific classes that belong to a sub-package live there (``pgasr.models.config``,
``pgasr.priors.config``) and are re-exported here so that a single import gives the whole
vocabulary.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from pgasr.configbase import Section
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
    "SCALES",
    "SynthConfig",
    "TrackingConfig",
    "TuneConfig",
    "load_config",
    "dump_config",
    "config_to_dict",
    "config_from_dict",
    "apply_overrides",
    "set_overrides",
    "revalidate",
    "config_yaml",
    "config_schema",
]


#: The SR factors the project degrades, trains and serves.
SCALES = (2, 4)


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class SynthConfig(Section):
    """Embedded synthetic IXI-like T2 cohort built from the MNI152 template nilearn ships."""

    subjects: int = 8
    size: int = 256  # in-plane matrix (pixels); the template is resampled onto it
    slices: int = 120  # axial slices per volume (>= data.slices_per_volume + margin)
    seed: int = 0
    out_dir: str = "data/synth"


class DataConfig(Section):
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
    scales: list[int] = Field(default_factory=lambda: [2, 4])
    rows_per_shard: int = 240  # slice triplets per Parquet file
    head_threshold: float = 0.1  # fraction of the 99th percentile defining "head" voxels


class DegradationConfig(Section):
    """LR synthesis: anisotropic Gaussian blur -> AWGN -> bicubic down-sampling.

    Blur sigmas are in HR pixels and scale with the SR factor (``sigma * scale / 2``) so the
    blur stays comparable to the sampling step; noise sigma is a fraction of the slice's
    robust intensity range (99.5th percentile - min). See ``docs/data.md`` for the reasoning.
    """

    blur_sigma: list[float] = Field(default_factory=lambda: [0.2, 1.2])  # at x2
    blur_kernel_max: int = 21
    noise_sigma: list[float] = Field(default_factory=lambda: [0.0, 0.02])
    seed: int = 1234


class AugmentConfig(Section):
    """Contrast/sharpness randomisation of training volumes (:mod:`pgasr.data.augment`):
    ``copies`` extra, randomly transformed copies of every training volume (0 = off)."""

    copies: int = 0
    remap_p: float = 0.7  # probability of a random piecewise-linear contrast curve
    remap_knots: int = 6
    gamma: float = 0.7  # log-gamma ~ U(-gamma, gamma)
    blur: list[float] = Field(default_factory=lambda: [0.0, 0.9])  # HR in-plane sigma, pixels
    seed: int = 0


class InferenceConfig(Section):
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


class ResourcesConfig(Section):
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


class ServeConfig(Section):
    """The HTTP service (``serve/app.py``; routes, limits and security in ``docs/serve.md``).

    API keys come from the environment variable named by ``api_keys_env`` (comma-separated)
    and/or ``api_keys_file`` (comma- or newline-separated, ``#`` comments); the service
    refuses to start without one unless ``allow_no_auth`` (development only) is set.
    """

    checkpoint: str = ""
    # More stage-2 checkpoints of other scales (e.g. RUN_DIR/stage2_x4): one replica serves
    # them all and routes each request by its ?scale=
    checkpoints: list[str] = Field(default_factory=list)
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
    # /openapi.json and its page /docs (Swagger UI, whose script comes from a CDN): they
    # describe the routes, not the model; every /v1 call still needs a key. false: both 404.
    docs: bool = True

    @model_validator(mode="after")
    def _checks(self) -> ServeConfig:
        _check_serve(self)
        return self


class TrackingConfig(Section):
    """Experiment tracking on MLflow (:mod:`pgasr.tracking`, ``docs/training.md``): every
    stage, pipeline, Tune trial and bench run logs its config, per-epoch metrics and small
    artefacts."""

    mlflow: bool = True
    # "" -> $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the driver's directory (what
    # `mlflow ui` opens there). On a multi-node cluster use a tracking server (http://...).
    uri: str = ""
    experiment: str = ""  # "" -> the config's name


class SearchSpace(Section):
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
    values: list[float] = Field(default_factory=list)
    low: float = 0.0
    high: float = 0.0
    n: int = 0


class TuneConfig(Section):
    """The Ray Tune sweep of the loss weights (``tune/sweep.py``, ``docs/tune.md``).

    Each trial trains stage 2 through Ray Train with one (alpha1, alpha2) on the stage 1 of its
    beta; stage 1 is trained once per distinct stage-1 config and cached. The defaults bracket
    the paper's alpha1 = alpha2 = 0.1, beta = 0.25 (3 beta x 9 alpha = 27 trials, 3 stage-1
    trainings).
    """

    alpha1: list[float] | SearchSpace = Field(default_factory=lambda: [0.03, 0.1, 0.3])
    alpha2: list[float] | SearchSpace = Field(default_factory=lambda: [0.03, 0.1, 0.3])
    beta: list[float] | SearchSpace = Field(default_factory=lambda: [0.1, 0.25, 0.5])
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


class RunConfig(Section):
    """Everything one run needs. ``name`` keys the run directory under ``run_dir``."""

    name: str = "pgasr"
    run_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    nan_policy: str = "error"  # error | skip: a non-finite training loss raises, or is skipped
    synth: SynthConfig = Field(default_factory=SynthConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    degradation: DegradationConfig = Field(default_factory=DegradationConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    prior: PriorConfig = Field(default_factory=PriorConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _checks(self) -> RunConfig:
        _check_run(self)
        return self


# --------------------------------------------------------------------------- checks

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_serve(s: ServeConfig) -> None:
    """``serve.*`` values that types alone cannot express (the checkpoint itself is checked
    where a service starts: ``serve.app.validate_serve_config``)."""
    _require(s.max_batch_size >= 1, "serve.max_batch_size must be >= 1")
    _require(s.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s must be >= 0")
    _require(0 <= s.min_replicas <= s.max_replicas, "serve.min_replicas must be in [0, max_replicas]")
    _require(s.max_replicas >= 1, "serve.max_replicas must be >= 1")
    _require(s.target_ongoing_requests > 0, "serve.target_ongoing_requests must be > 0")
    _require(s.max_ongoing_requests >= 1, "serve.max_ongoing_requests must be >= 1")
    _require(s.max_queued_requests >= 1 or s.max_queued_requests == -1,
             "serve.max_queued_requests must be >= 1 (or -1: unbounded)")
    _require(s.max_body_bytes >= 1024, "serve.max_body_bytes must be >= 1024")
    _require(s.max_voxels >= 1, "serve.max_voxels must be >= 1")
    _require(s.max_output_voxels >= 0, "serve.max_output_voxels must be >= 0 (0: 4 x max_voxels)")
    _require(s.max_slice_pixels >= 1, "serve.max_slice_pixels must be >= 1")
    _require(s.max_volume_queue >= 1, "serve.max_volume_queue must be >= 1")
    _require(s.request_timeout_s > 0, "serve.request_timeout_s must be > 0")
    _require(s.body_timeout_s > 0 and s.body_idle_timeout_s > 0,
             "serve.body_timeout_s / body_idle_timeout_s must be > 0")
    _require(s.gpus_per_replica >= 0 and s.cpus_per_replica >= 0 and s.memory_per_replica >= 0,
             "serve.gpus_per_replica / cpus_per_replica / memory_per_replica must be >= 0")
    _require(1 <= s.port <= 65535, "serve.port must be in 1..65535")


def _check_run(cfg: RunConfig) -> None:
    """Semantic checks of a whole run config that types alone cannot express."""
    from pgasr.data.sources import FORMATS

    d = cfg.data
    for s in d.scales:
        _require(s in SCALES, f"data.scales may contain only 2 and 4, got {s}")
    _require(d.slices_per_volume >= 1, "data.slices_per_volume must be >= 1")
    _require(d.source_format in FORMATS, f"data.source_format must be one of "
             f"{', '.join(FORMATS)}, got {d.source_format!r}")
    _require(d.voxel_size is None or 0 < d.voxel_size <= 20,
             f"data.voxel_size must be in (0, 20] mm or null, got {d.voxel_size}")
    _require(d.size >= 8 and d.size % 8 == 0,
             f"data.size must be a positive multiple of 8, got {d.size}")
    for name in ("train_subjects", "val_subjects", "test_subjects"):
        _require(getattr(d, name) >= 0, f"data.{name} must be >= 0")
    _require(len(cfg.degradation.blur_sigma) == 2 and 0 < cfg.degradation.blur_sigma[0]
             <= cfg.degradation.blur_sigma[1], "degradation.blur_sigma must be 0 < lo <= hi")
    _require(len(cfg.degradation.noise_sigma) == 2 and 0 <= cfg.degradation.noise_sigma[0]
             <= cfg.degradation.noise_sigma[1], "degradation.noise_sigma must be 0 <= lo <= hi")
    for s in cfg.stage2.scales or [cfg.stage2.scale]:
        _require(s in d.scales, f"stage 2 at x{s} (stage2.scale / stage2.scales) needs x{s} in "
                 f"data.scales, got {d.scales}")
    a = cfg.augment
    _require(a.copies >= 0, f"augment.copies must be >= 0, got {a.copies}")
    _require(0 <= a.remap_p <= 1, f"augment.remap_p must be in [0, 1], got {a.remap_p}")
    _require(a.remap_knots >= 2, f"augment.remap_knots must be >= 2, got {a.remap_knots}")
    _require(a.gamma >= 0, f"augment.gamma must be >= 0, got {a.gamma}")
    _require(len(a.blur) == 2 and 0 <= a.blur[0] <= a.blur[1],
             "augment.blur must be [lo, hi] with 0 <= lo <= hi")
    _require(cfg.nan_policy in ("error", "skip"), "nan_policy must be error or skip")
    _require(cfg.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda")
    inf = cfg.inference
    _require(inf.background in ("bicubic", "model"), f"inference.background must be bicubic "
             f"or model, got {inf.background!r}")
    _require(inf.mask_dilate >= 0 and inf.mask_feather >= 0,
             "inference.mask_dilate and mask_feather must be >= 0")
    _require(inf.back_projection_steps >= 0 and 0 < inf.back_projection_weight <= 1,
             "inference.back_projection_steps must be >= 0 and back_projection_weight in (0, 1]")




# --------------------------------------------------------------------------- loading


def _walk(cls: type, loc: tuple) -> tuple[list[str], type | None]:
    """The dotted key of an error location inside ``cls`` (pydantic's union-member tags such
    as ``SearchSpace`` dropped) and the config class found there (None: not a section)."""
    key, here = [], cls
    for part in loc:
        if here is None:
            key.append(str(part))
            continue
        field = here.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            if key and isinstance(part, str) and (part[:1].isupper() or "[" in part):
                continue  # a union member's tag (SearchSpace, list[float])
            key.append(str(part))  # an unknown key or a list index: nothing below is a section
            here = None
            continue
        key.append(part)
        members = [a for a in (typing.get_args(field.annotation) or (field.annotation,))
                   if isinstance(a, type) and issubclass(a, BaseModel)]
        here = members[0] if members else None
    return key, here


def _describe(e: ValidationError, cls: type) -> str:
    """One line per problem, each naming its dotted key: unknown keys with the valid ones,
    wrong types with the value given, failed checks with their own message."""
    errors = e.errors(include_url=False)
    # a mapping given for a `list | SearchSpace` field: the list member's complaint is noise
    mapped = {tuple(map(str, x["loc"][:-2])) for x in errors if isinstance(x["input"], dict)
              or x["type"] == "extra_forbidden"}
    out = []
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] == "list_type" and tuple(map(str, loc[:-1])) in mapped:
            continue
        if err["type"] == "model_type" and isinstance(err["input"], list):
            continue  # a list given for a `list | SearchSpace` field: the list's own errors
        parts, _ = _walk(cls, loc)
        key = ".".join(parts)
        if err["type"] == "extra_forbidden":
            _, parent = _walk(cls, loc[:-1])
            valid = f"; valid keys: {', '.join(sorted(parent.model_fields))}" if parent else ""
            out.append(f"unknown key {key!r}{valid}")
        elif err["type"] == "value_error":
            msg = str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
            _, section = _walk(cls, loc)
            head = msg.split(":", 1)[0]
            if not key or msg.startswith(f"{key}.") or msg.startswith(f"{key} "):
                out.append(msg)
            elif section is not None and head in section.model_fields:
                out.append(f"{key}.{msg}")
            else:
                out.append(f"{key}: {msg}")
        else:
            out.append(f"{key}: {err['msg'][:1].lower()}{err['msg'][1:]}, got {err['input']!r}")
    return "; ".join(out)


def config_to_dict(cfg: BaseModel) -> dict:
    """Plain nested dict (YAML/JSON-safe) of a config."""
    return cfg.model_dump(mode="json")


def config_from_dict(data: dict | None, source: str = "<dict>", cls: type = None) -> Any:
    """Build a config (default :class:`RunConfig`) from a nested dict; unknown keys, wrong
    types and failed checks raise :class:`ConfigError` naming ``source`` and the key."""
    cls = cls or RunConfig
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e, cls)}") from None


def revalidate(cfg: BaseModel, source: str = "<config>") -> BaseModel:
    """``cfg`` checked again after attributes were set on it (assignment is not validated)."""
    return config_from_dict(config_to_dict(cfg), source, type(cfg))


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def set_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply ``key.sub=value`` items (values parsed as YAML) to the nested dict ``data`` in
    place; every key must already exist (it is the resolved config's dict)."""
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
    return data


def apply_overrides(cfg: BaseModel, overrides: list[str] | None, source: str = "--set") -> Any:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) and re-validate."""
    if not overrides:
        return cfg
    data = set_overrides(config_to_dict(cfg), overrides, source)
    return config_from_dict(data, source, type(cfg))


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


def config_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML, in field order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_schema() -> dict:
    """The JSON schema of a run config (``pgasr config schema``)."""
    return RunConfig.model_json_schema()


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (every run writes one), atomically."""
    from pgasr.provenance import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), config_yaml(cfg))
