"""Experiment tracking on MLflow.

Every training stage (Ray job or ``pgasr train-local``), pipeline run, Tune trial and bench run
is an MLflow run: its resolved config as parameters, its per-epoch metrics with the training
step, small artefacts (the checkpoint's ``meta.json``/``config.yaml``, reports). A pipeline run
is the parent of its stage runs.

Where runs go (``tracking.*`` in the config, ``docs/training.md``):

* ``tracking.uri`` when set (an MLflow server ``http://...``, ``sqlite:///path.db``,
  ``databricks``...), else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
  directory the driver runs in, made absolute there: ``mlflow ui`` started in that
  directory lists the runs.
* ``tracking.experiment`` (default: the config's ``name``).

A run created on the driver is handed to Ray workers as ``{"uri", "run_id"}``
(:meth:`Run.to_dict`); rank 0 logs into it, also after a worker restart. Tracking never stops
training: when MLflow is missing or a call fails, a warning is logged once and that run is
left alone from then on.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("pgasr.tracking")

__all__ = ["Run", "flatten", "init_store", "resolve_uri"]

_BATCH = 100  # MLflow's limit on params / metrics per log_batch call
_PARAM_CHARS = 6000


_SQLITE = "sqlite:///"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store)."""
    return Path(uri[len(_SQLITE):]) if uri.startswith(_SQLITE) else None


def resolve_uri(cfg) -> str | None:
    """The tracking URI of ``cfg`` (None: tracking off), relative SQLite paths made absolute."""
    t = cfg.tracking
    if not t.mlflow:
        return None
    uri = t.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"{_SQLITE}mlflow.db"
    db = _sqlite_path(uri)
    if db is not None and not db.is_absolute():
        uri = _SQLITE + str(db.expanduser().resolve())
    return uri


def _client(uri: str):
    """An ``MlflowClient`` for ``uri``. Its first use of a new SQLite store creates the schema
    (Alembic migrations); processes that do it at once (two stage-1 trainings of a sweep)
    corrupt each other's migration, so for SQLite it happens under a lock file beside the
    database and the schema is complete before anyone else looks."""
    from mlflow import MlflowClient

    db = _sqlite_path(uri)
    if db is None:
        return MlflowClient(uri)
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock"):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the store (and its schema) exists now
    return client


def init_store(uri: str | None) -> None:
    """Create the tracking store's schema now (for code that opens the store through MLflow
    itself afterwards, e.g. Ray's MLflowLoggerCallback beside concurrent Ray tasks)."""
    if uri:
        try:
            _client(uri)
        except ImportError:
            pass


def _artifact_root(uri: str, experiment: str) -> str | None:
    """Artefacts of a SQLite store beside the database (``mlartifacts/<experiment>``), as an
    absolute location that every process and worker resolves alike; the server's default
    for any other store."""
    db = _sqlite_path(uri)
    return None if db is None else (db.parent / "mlartifacts" / experiment).as_uri()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"stage2": {"lr": 1e-3}}`` -> ``{"stage2.lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Run:
    """One MLflow run this process logs into; with no run (tracking off) every method is a
    no-op, so callers never branch on it."""

    def __init__(self, uri: str | None = None, run_id: str | None = None):
        self.uri, self.run_id = uri, run_id
        self._client = None

    def __bool__(self) -> bool:
        return bool(self.uri and self.run_id)

    # ----------------------------------------------------------------- create / hand over

    @classmethod
    def create(cls, cfg, name: str, *, parent: Run | None = None,
               tags: Mapping[str, str] | None = None, log_config: bool = True) -> Run:
        """A new run named ``name`` in ``cfg``'s experiment (a child of ``parent`` when that
        is a run), with the resolved config as parameters; a no-op run when tracking is off
        or MLflow is missing."""
        uri = resolve_uri(cfg)
        if uri is None:
            return cls()
        try:
            import mlflow  # noqa: F401
        except ImportError:
            log.warning("tracking.mlflow is on but mlflow is not installed: runs are not "
                        "tracked (pip install mlflow, or --set tracking.mlflow=false)")
            return cls()
        try:
            client = _client(uri)
            experiment = cfg.tracking.experiment or cfg.name
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(
                experiment, artifact_location=_artifact_root(uri, experiment))
            all_tags = {"pgasr.stage": name, **(tags or {})}
            if parent:
                all_tags["mlflow.parentRunId"] = parent.run_id
            info = client.create_run(exp_id, tags=all_tags, run_name=name).info
        except Exception as e:  # a tracking server down must not stop training
            log.warning("MLflow run %r not created at %s (%s): not tracking it", name, uri, e)
            return cls()
        run = cls(uri, info.run_id)
        run._client = client
        log.info("MLflow run %s (%s) at %s", name, info.run_id, uri)
        if log_config:
            from pgasr.config import config_to_dict

            run.log_params(flatten(config_to_dict(cfg)))
        return run

    def to_dict(self) -> dict | None:
        """What a Ray worker needs to log into this run (None: no run)."""
        return {"uri": self.uri, "run_id": self.run_id} if self else None

    @classmethod
    def from_dict(cls, d: Mapping[str, str] | None) -> Run:
        return cls(d["uri"], d["run_id"]) if d else cls()

    # ----------------------------------------------------------------- logging

    def _call(self, what: str, fn) -> None:
        if not self:
            return
        try:
            if self._client is None:
                self._client = _client(self.uri)
            fn(self._client)
        except Exception as e:
            log.warning("MLflow %s failed for run %s at %s (%s): no more tracking of this "
                        "run", what, self.run_id, self.uri, e)
            self.uri = self.run_id = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self._call("log_params", lambda c, part=items[i:i + _BATCH]:
                       c.log_batch(self.run_id, params=part))

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Finite numeric values of ``metrics`` at ``step`` (others are skipped)."""
        if not self:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and float(v) == float(v) and abs(float(v)) != float("inf")]
        for i in range(0, len(items), _BATCH):
            self._call("log_metrics", lambda c, part=items[i:i + _BATCH]:
                       c.log_batch(self.run_id, metrics=part))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._call("log_artifact", lambda c: c.log_artifact(self.run_id, str(path),
                                                                artifact_path))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._call("set_tag", lambda c, k=k, v=v: c.set_tag(self.run_id, k, str(v)))

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Ends the run: FAILED when the block raised (the exception goes on), else FINISHED."""
        self.end(failed=exc_type is not None)

    def end(self, failed: bool = False) -> None:
        self._call("end", lambda c: c.set_terminated(self.run_id,
                                                     "FAILED" if failed else "FINISHED"))
