import gzip
import json
import tarfile

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from pgasr.config import load_config
from pgasr.data import schema
from pgasr.data.batches import read_split, stage1_batch, stage2_batch
from pgasr.data.prepare import crop_or_pad, prepare, split_subjects


def _volume(seed, shape=(40, 36, 20)):
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = (x**2 + y**2 + (z * 0.8) ** 2) < 0.8
    vol = head * (500 + 300 * np.sin(5 * x + seed) * np.cos(3 * y)) + rng.normal(0, 5, shape)
    return np.clip(vol, 0, None).astype(np.int16)


def _write_cohort(d, n=5):
    d.mkdir(parents=True, exist_ok=True)
    aff = np.diag([1.2, 1.2, 1.5, 1.0])
    for i in range(n):
        nib.save(nib.Nifti1Image(_volume(i), aff), d / f"IXI{100 + i:03d}-Guys-{i:04d}-T2.nii.gz")
    nib.save(nib.Nifti1Image(_volume(9), aff), d / "IXI100-Guys-0000-PD.nii.gz")  # not T2
    (d / "IXI200-HH-0001-T2.nii.gz").write_bytes(gzip.compress(b"not a nifti" * 100)[:-10])
    return d


def _cfg(tmp_path, **kw):
    over = [
        "data.source=" + str(tmp_path / "ixi"), "data.prepared_dir=" + str(tmp_path / "prep"),
        "data.size=32", "data.slices_per_volume=8", "data.train_subjects=3",
        "data.val_subjects=1", "data.test_subjects=2", "data.rows_per_shard=10",
    ] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(None, over)


def test_split_is_disjoint_deterministic_and_checked():
    subs = [f"IXI{i:03d}" for i in range(20)]
    a = split_subjects(subs, 10, 2, 5, seed=3)
    b = split_subjects(subs, 10, 2, 5, seed=3)
    assert a == b
    sets = [set(v) for v in a.values()]
    assert sum(len(s) for s in sets) == 17 and len(set.union(*sets)) == 17
    assert split_subjects(subs, 0.5, 0.1, 0.25, seed=0)["train"].__len__() == 10
    with pytest.raises(ValueError, match="lower the counts"):
        split_subjects(subs, 300, 0, 176, seed=0)


def test_crop_or_pad():
    v = np.ones((10, 7, 3))
    out = crop_or_pad(v, 8, fill=0)
    assert out.shape == (8, 8, 3) and out[:, -1].sum() == 0 and out[:, :-1].min() == 1


def test_prepare_directory(tmp_path):
    _write_cohort(tmp_path / "ixi")
    cfg = _cfg(tmp_path)
    with pytest.warns(UserWarning, match="IXI200"):
        res = prepare(cfg, progress=False)
    man = json.loads((res.out_dir / schema.MANIFEST).read_text())
    # the corrupt file was skipped and reported, the PD file ignored
    assert [s["file"] for s in man["skipped"]] == ["IXI200-HH-0001-T2.nii.gz"]
    assert "truncated" in man["skipped"][0]["reason"] or "corrupt" in man["skipped"][0]["reason"]
    splits = man["split"]
    all_subs = [s for v in splits.values() for s in v]
    assert len(all_subs) == len(set(all_subs))
    assert sum(man["rows"].values()) == 8 * len(all_subs)
    tr = read_split(res.out_dir, "train")
    assert tr[schema.HR].shape[1:] == (3, 32, 32) and tr[schema.HR].dtype == np.float32
    assert tr["lr_x2"].shape[1:] == (3, 16, 16) and tr["lr_x4"].shape[1:] == (3, 8, 8)
    # triplet consistency: row k's centre is row k+1's previous slice (same subject)
    rows = [i for i, s in enumerate(tr["subject"]) if s == tr["subject"][0]]
    order = np.argsort(tr["slice"][rows])
    r = np.array(rows)[order]
    np.testing.assert_array_equal(tr[schema.HR][r[0], 1], tr[schema.HR][r[1], 0])
    np.testing.assert_array_equal(tr["lr_x2"][r[0], 1], tr["lr_x2"][r[1], 0])
    # intensity contract (pgasr.intensity): HR-volume stats, and the LR-volume stats per scale
    sub = man["subjects"][tr["subject"][0]]
    assert sub["hr_norm"]["scale"] > 0 and set(sub["lr_norm"]) == {"2", "4"}
    assert sub["n_slices"] == 8 and sub["slice_offset"] == 6
    assert tr["lr_norm_x2"].shape[1:] == (2,) and np.all(tr["lr_norm_x2"][:, 1] > 0)
    # shards hold at most rows_per_shard rows
    for f in (res.out_dir / "train").glob("*.parquet"):
        assert pq.read_metadata(f).num_rows <= 10
    # batches for both stages
    b1 = stage1_batch({k: v[:4] for k, v in tr.items()}, need_prior=False)
    assert b1["hr"].shape == (4, 1, 32, 32)
    b2 = stage2_batch({k: v[:4] for k, v in tr.items()}, 4, need_prior=False)
    assert b2["lr"].shape == (4, 3, 8, 8) and b2["prior_lr"].shape == (4, 3, 32, 32)
    with pytest.raises(KeyError, match="priors"):
        stage2_batch({k: v[:4] for k, v in tr.items()}, 2, need_prior=True)


def test_prepare_is_reproducible_reused_and_tar_equivalent(tmp_path):
    _write_cohort(tmp_path / "ixi")
    cfg = _cfg(tmp_path)
    with pytest.warns(UserWarning):
        a = prepare(cfg, progress=False)
    first = read_split(a.out_dir, "test")
    again = prepare(cfg, progress=False)
    assert again.reused
    # tar input (streamed) gives bit-identical shards
    tar = tmp_path / "IXI-T2.tar"
    with tarfile.open(tar, "w") as tf:
        for f in sorted((tmp_path / "ixi").iterdir()):
            tf.add(f, arcname=f.name)
    cfg2 = _cfg(tmp_path, **{"data.source": str(tar), "data.prepared_dir": str(tmp_path / "prep2")})
    with pytest.warns(UserWarning):
        b = prepare(cfg2, progress=False)
    second = read_split(b.out_dir, "test")
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])


def test_failed_prepare_keeps_existing_output(tmp_path):
    _write_cohort(tmp_path / "ixi")
    cfg = _cfg(tmp_path)
    with pytest.warns(UserWarning):
        res = prepare(cfg, progress=False)
    before = (res.out_dir / schema.MANIFEST).read_text()
    bad = _cfg(tmp_path, **{"data.train_subjects": 50})
    with pytest.raises(ValueError, match="split"):
        prepare(bad, progress=False, force=True)
    assert (res.out_dir / schema.MANIFEST).read_text() == before


def test_missing_source(tmp_path):
    cfg = _cfg(tmp_path, **{"data.source": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError):
        prepare(cfg, progress=False)
    (tmp_path / "empty").mkdir()
    cfg = _cfg(tmp_path, **{"data.source": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match=r"no \.nii/\.nii\.gz files found in .*\(read as 'nifti'\)"):
        prepare(cfg, progress=False)
    cfg = _cfg(tmp_path, **{"data.source": str(tmp_path / "empty"), "data.source_format": "ixi"})
    with pytest.raises(ValueError, match="no IXI T2 files"):
        prepare(cfg, progress=False)


# --------------------------------------------------------------------------- owned output (#17)


def test_prepare_never_replaces_a_directory_it_did_not_write(tmp_path):
    _write_cohort(tmp_path / "ixi")
    out = tmp_path / "prep"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="did not write"):
        prepare(_cfg(tmp_path), progress=False, force=True)  # --force does not override it
    assert (out / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ixi", "prep"]  # no temp dir left
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(ValueError, match="not a directory"):
        prepare(_cfg(tmp_path, **{"data.prepared_dir": str(f)}), progress=False)
    assert f.read_text() == "mine"


def test_prepare_uses_an_empty_dir_and_replaces_its_own_output(tmp_path):
    _write_cohort(tmp_path / "ixi")
    (tmp_path / "prep").mkdir()
    cfg = _cfg(tmp_path)
    with pytest.warns(UserWarning):
        prepare(cfg, progress=False)
    with pytest.warns(UserWarning):
        res = prepare(cfg, progress=False, force=True)
    assert not res.reused and (res.out_dir / schema.MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ixi", "prep"]


def test_prepare_leaves_a_concurrent_runs_temp_dir_alone(tmp_path):
    """Another prepare of the same --out is writing its temp dir (the old fixed name
    ``.prep.tmp``, which every run used to rmtree on start): this run must not touch it."""
    _write_cohort(tmp_path / "ixi")
    other = tmp_path / ".prep.tmp"
    (other / "train").mkdir(parents=True)
    (other / "train" / "part-00000.parquet").write_bytes(b"the other run's rows")
    with pytest.warns(UserWarning):
        res = prepare(_cfg(tmp_path), progress=False)
    assert (other / "train" / "part-00000.parquet").read_bytes() == b"the other run's rows"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prep.tmp", "ixi", "prep"]
    assert sum(json.loads((res.out_dir / schema.MANIFEST).read_text())["rows"].values()) > 0


def test_two_concurrent_prepares_each_publish_a_complete_directory(tmp_path):
    import threading
    import warnings

    _write_cohort(tmp_path / "ixi")
    cfgs = [_cfg(tmp_path), _cfg(tmp_path, **{"data.slices_per_volume": 6})]
    errors: list[BaseException] = []

    def run(cfg):
        try:
            prepare(cfg, progress=False, force=True)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threads = [threading.Thread(target=run, args=(c,)) for c in cfgs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    man = json.loads((tmp_path / "prep" / schema.MANIFEST).read_text())
    rows = {s: len(read_split(tmp_path / "prep", s)[schema.HR]) for s in man["rows"]
            if man["rows"][s]}
    assert rows == {s: n for s, n in man["rows"].items() if n}  # shards match their manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ixi", "prep"]


# --------------------------------------------------------------------------- distributed (#16)


@pytest.mark.ray
def test_distributed_prepare_equals_the_local_one(ray_session, tmp_path):
    """jobs/prepare.py (one Ray task per volume, write_parquet) writes the same rows, split,
    exported volumes and manifest as the single-process path; the unreadable file is skipped
    the same way. Only the shard layout may differ."""
    from pgasr.data.batches import read_split
    from jobs.prepare import run_prepare

    _write_cohort(tmp_path / "ixi")
    sets = {"augment.copies": 1}
    local = prepare(_cfg(tmp_path, **sets, **{"data.prepared_dir": tmp_path / "local"}),
                    progress=False)
    dist_cfg = _cfg(tmp_path, **sets, **{"data.prepared_dir": tmp_path / "dist"})
    out = run_prepare(dist_cfg)
    assert out["reused"] is False and out["rows"] == local.rows
    ml, md = (json.loads((tmp_path / d / schema.MANIFEST).read_text()) for d in ("local", "dist"))
    volatile = {"shards", "config", "git_sha", "versions", "host"}  # config: its prepared_dir
    assert {k: v for k, v in ml.items() if k not in volatile} == \
        {k: v for k, v in md.items() if k not in volatile}
    assert [s["reason"][:20] for s in md["skipped"]] == [s["reason"][:20] for s in ml["skipped"]]
    assert sum(local.rows.values()) > 0
    for split in schema.SPLITS:
        if local.rows[split] == 0:  # the unreadable subject's split
            assert out["rows"][split] == 0
            continue
        a, b = read_split(tmp_path / "local", split), read_split(tmp_path / "dist", split)
        ka = np.lexsort((a[schema.SLICE], a[schema.SUBJECT]))
        kb = np.lexsort((b[schema.SLICE], b[schema.SUBJECT]))
        assert set(a) == set(b) and len(ka) == len(kb) == local.rows[split]
        for col in a:
            np.testing.assert_array_equal(a[col][ka], b[col][kb], err_msg=f"{split}/{col}")
    vols = sorted(p.name for p in (tmp_path / "local" / "volumes").iterdir())
    assert vols and vols == sorted(p.name for p in (tmp_path / "dist" / "volumes").iterdir())
    for name in vols:
        assert (tmp_path / "local" / "volumes" / name).read_bytes() == \
            (tmp_path / "dist" / "volumes" / name).read_bytes()
    assert not (tmp_path / "dist" / ".ingest").exists()
    # a tar is a stream: one task ingests it, with the same rows
    tar = tmp_path / "IXI-T2.tar"
    with tarfile.open(tar, "w") as tf:
        for p in sorted((tmp_path / "ixi").iterdir()):
            tf.add(p, arcname=f"IXI-T2/{p.name}")
    from_tar = run_prepare(_cfg(tmp_path, **sets, **{"data.source": tar,
                                                     "data.prepared_dir": tmp_path / "tar"}))
    assert from_tar["rows"] == local.rows
