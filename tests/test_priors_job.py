"""jobs/priors.py on Ray: actor pool, output layout, skipped rows, cache reuse, job submit."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pgasr.config import RunConfig
from pgasr.data import schema
from pgasr.priors import PriorConfig, build_prior, upsample_bicubic

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32


def phantom_volume(seed: int, n: int, size: int = SIZE) -> np.ndarray:
    """(n, size, size) float32 head-like volume: skull ring, brain, ventricles, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    vol = []
    for z in range(n):
        a = 0.8 - 0.02 * abs(z - n / 2)
        r = np.hypot(xx / a, yy / (a * 0.85))
        s = 0.3 * (r < 1.0) + 0.7 * (r < 0.85) - 0.2 * (r < 0.5) \
            + 0.6 * (np.hypot((xx - 0.12) / 0.12, yy / 0.25) < 1) \
            + 0.6 * (np.hypot((xx + 0.12) / 0.12, yy / 0.25) < 1)
        vol.append(s + 0.02 * rng.standard_normal((size, size)))
    v = np.stack(vol).astype(np.float32)
    return (v - v.mean()) / v.std()


def _tensor(a: np.ndarray) -> pa.Array:
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(a))


def make_prepared(root: Path, splits: dict[str, list[str]], n_slices: int = 5,
                  scales=(2,), nan_at: tuple[str, int] | None = None) -> Path:
    """A prepared directory following pgasr.data.schema (one shard per split)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / schema.MANIFEST).write_text(json.dumps({"fixture": True, "splits": splits}))
    for split, subjects in splits.items():
        rows = {schema.SUBJECT: [], schema.SLICE: [], schema.HR: [],
                **{schema.lr_column(s): [] for s in scales}}
        for si, subj in enumerate(subjects):
            vol = phantom_volume(1000 + si * 7 + len(split), n_slices)
            for t in range(n_slices):
                idx = [max(t - 1, 0), t, min(t + 1, n_slices - 1)]  # edges replicate
                hr = vol[idx].copy()
                if nan_at == (subj, t):
                    hr[1, 3, 3] = np.nan
                rows[schema.SUBJECT].append(subj)
                rows[schema.SLICE].append(t)
                rows[schema.HR].append(hr)
                for s in scales:  # area down-sampling stands in for the degradation model
                    rows[schema.lr_column(s)].append(
                        hr.reshape(3, SIZE // s, s, SIZE // s, s).mean(axis=(2, 4)))
        out = root / split
        out.mkdir(exist_ok=True)
        table = pa.table({
            schema.SUBJECT: pa.array(rows[schema.SUBJECT], pa.string()),
            schema.SLICE: pa.array(rows[schema.SLICE], pa.int32()),
            schema.HR: _tensor(np.stack(rows[schema.HR])),
            **{schema.lr_column(s): _tensor(np.stack(rows[schema.lr_column(s)])) for s in scales},
        })
        pq.write_table(table, out / "part-00000.parquet")
    return root


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def read_split(d: Path) -> dict[str, np.ndarray]:
    """Plain pyarrow (no ray): tensor columns must come back with their shapes."""
    t = pq.read_table(d)
    out = {}
    for name in t.column_names:
        col = t.column(name).combine_chunks()
        out[name] = (col.to_numpy_ndarray() if isinstance(col.type, pa.FixedShapeTensorType)
                     else np.asarray(col.to_pylist()))
    return out


def tiny_cfg(tmp_path: Path, prepared: Path, **prior) -> RunConfig:
    cfg = RunConfig()
    cfg.data.prepared_dir = str(prepared)
    cfg.data.scales = [2]
    cfg.data.rows_per_shard = 4
    cfg.resources.prior_actors = 2
    cfg.resources.gpus_per_prior_actor = 0.0
    cfg.prior = PriorConfig(backend="tissue", cache_dir=str(tmp_path / "cache"), batch_rows=4,
                            **prior)
    return cfg


@pytest.mark.ray
def test_priors_job_end_to_end(ray_session, tmp_path):
    sys.path.insert(0, str(ROOT))
    from jobs.priors import run_priors

    splits = {"train": ["S1", "S2"], "val": ["S3"]}
    prepared = make_prepared(tmp_path / "prepared", splits, nan_at=("S2", 2))
    before = tree_digest(prepared)
    cfg = tiny_cfg(tmp_path, prepared)

    res = run_priors(cfg)
    out = schema.priors_dir(prepared)
    assert tree_digest(prepared) == before, "input must not be modified"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "priors.json", "train", "val"]
    assert not list(tmp_path.glob(".prepared_priors.*")), "temporary directories left behind"

    # NaN row reported and skipped, everything else kept in input order.
    assert res["rows_in"] == {"train": 10, "val": 5}
    assert res["rows_out"] == {"train": 9, "val": 5}
    assert res["skipped"] == [{"subject": "S2", "slice": 2, "reason": "non-finite values in hr"}]
    meta = json.loads((out / "priors.json").read_text())
    assert meta["prior"]["backend"] == "tissue" and meta["skipped_count"] == 1

    # Distinct slices: 5 HR per subject (the NaN row's slices are also other rows'
    # neighbours, computed there) + their lr_up. Requested: 14 rows x 3 slices x (HR + LR).
    # Two actors may race on a slice at a batch boundary (both compute, same bytes), so the
    # count is bounded, not exact; 4-row batches have <= 1 shared boundary slice pair each.
    n_subjects, st = 3, res["cache"]
    assert st["requested"] == 2 * 3 * 14
    assert 2 * 5 * n_subjects <= st["computed"] <= 2 * 5 * n_subjects + 2 * 4
    assert st["computed"] + st["hits"] == st["unique"]

    # Ray Data wrote the shards (>= data.rows_per_shard rows per file but the last of a
    # write); every input row but the NaN one is there once, in Ray's order.
    cfg_rows = cfg.data.rows_per_shard
    for split, n in (("train", 9), ("val", 5)):
        sizes = sorted(pq.ParquetFile(f).metadata.num_rows
                       for f in (out / split).glob("*.parquet"))
        assert res["files"][split] == len(sizes) and sum(sizes) == n
        assert all(k >= cfg_rows for k in sizes[1:]), sizes
    train = read_split(out / "train")
    order = np.lexsort((train[schema.SLICE], train[schema.SUBJECT]))
    train = {k: v[order] for k, v in train.items()}
    assert list(train[schema.SUBJECT]) == ["S1"] * 5 + ["S2"] * 4
    assert list(train[schema.SLICE]) == [0, 1, 2, 3, 4, 0, 1, 3, 4]
    assert set(read_split(out / "val")) == set(train), "helper columns are not written"
    # Columns, dtypes and values: equal to the library applied to the same slices.
    assert train["prior_hr"].dtype == np.float16 and train["prior_hr"].shape == (9, 3, SIZE, SIZE)
    assert train["prior_lr_x2"].shape == (9, 3, SIZE, SIZE)
    prior = build_prior(cfg.prior)
    np.testing.assert_array_equal(train["prior_hr"][0], prior(train["hr"][0]))
    lr_up = upsample_bicubic(train["lr_x2"][3], (SIZE, SIZE))
    np.testing.assert_array_equal(train["prior_lr_x2"][3], prior(lr_up))
    assert 0.0 <= train["prior_hr"].min() and train["prior_hr"].max() == 1.0

    # Rerun: up to date, nothing recomputed; --force: all from the cache.
    again = run_priors(cfg)
    assert again["reused"] is True
    forced = run_priors(cfg, force=True)
    assert forced["reused"] is False and forced["cache"]["computed"] == 0
    assert forced["cache"]["hits"] == forced["cache"]["unique"] == st["unique"]
    # A changed parameter lands in a new cache namespace and recomputes.
    cfg.prior.tissue_classes = 4
    changed = run_priors(cfg)
    assert changed["reused"] is False and changed["cache"]["computed"] >= 2 * 5 * n_subjects


@pytest.mark.ray
def test_priors_job_missing_scale_is_a_clear_error(ray_session, tmp_path):
    sys.path.insert(0, str(ROOT))
    from jobs.priors import run_priors

    prepared = make_prepared(tmp_path / "prepared", {"train": ["S1"]}, n_slices=3)
    cfg = tiny_cfg(tmp_path, prepared)
    cfg.data.scales = [2, 4]
    with pytest.raises(KeyError, match="lr_x4"):
        run_priors(cfg)
    cfg.data.prepared_dir = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="prepared directory not found"):
        run_priors(cfg)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_priors_job_submit(job_head, tmp_path):
    """``ray job submit --working-dir . -- python jobs/priors.py --config configs/tiny.yaml``
    against the session's local head (``conftest.job_head``: token auth, 127.0.0.1)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    prepared = make_prepared(tmp_path / "prepared", {"train": ["S1"], "test": ["S2"]},
                             n_slices=4, scales=(2, 4))
    cmd = [ray_bin, "job", "submit", "--address", job_head.url, "--working-dir", ".", "--",
           sys.executable, "jobs/priors.py", "--config", "configs/tiny.yaml",
           "--set", f"data.prepared_dir={prepared}", "--set", "data.scales=[2,4]",
           "--set", f"prior.cache_dir={tmp_path / 'cache'}", "--set", "prior.backend=tissue",
           "--set", "resources.prior_actors=2"]
    for _ in range(10):  # the job agent can lag the job API by a few seconds
        r = subprocess.run(cmd, cwd=ROOT, env=job_head.env, capture_output=True, text=True,
                           timeout=300)
        if "No available agent" not in r.stderr + r.stdout:
            break
        time.sleep(3)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "priors: wrote" in r.stdout
    out = schema.priors_dir(prepared)
    test = read_split(out / "test")
    assert test["prior_lr_x4"].shape == (4, 3, SIZE, SIZE)
    assert json.loads((out / "priors.json").read_text())["rows_out"] == {"train": 4, "test": 4}
