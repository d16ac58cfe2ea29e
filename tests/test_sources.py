"""A researcher's own scans (issue #16): IXI contrasts, BIDS, NIfTI folders, file lists and
globs as ``data.source``, each volume resampled in-plane to ``data.voxel_size``."""

import json

import nibabel as nib
import numpy as np
import pytest

from pgasr.config import ConfigError, load_config
from pgasr.data.prepare import prepare
from pgasr.data.sources import bids_entities, detect_format, list_sources
from pgasr.volume import inplane_voxel_size, resample_inplane


def _head(shape, voxel, seed=0):
    """A smooth ellipsoidal 'head' in world mm (so two spacings show the same anatomy)."""
    axes = [(np.arange(n) - (n - 1) / 2) * v for n, v in zip(shape, voxel)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    inside = (x / 30) ** 2 + (y / 36) ** 2 + (z / 40) ** 2 < 1
    vol = inside * (400 + 150 * np.sin(x / 6 + seed) * np.cos(y / 7))
    return vol.astype(np.float32)


def _save(path, voxel=(1.0, 1.0, 1.0), fov=(80.0, 88.0, 24.0), seed=0):
    shape = tuple(int(round(f / v)) for f, v in zip(fov, voxel))
    aff = np.diag([*voxel, 1.0])
    aff[:3, 3] = -np.asarray(voxel) * (np.asarray(shape) - 1) / 2
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(_head(shape, voxel, seed), aff), path)
    return path


def _bids(root):
    """5 subjects, T2w + T1w each; sub-02 has two sessions; sub-03/04 are 0.8 x 0.8 x 3 mm."""
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.8.0"}')
    for i in range(1, 6):
        sub = f"sub-{i:02d}"
        voxel = (0.8, 0.8, 3.0) if i in (3, 4) else (1.0, 1.0, 1.0)
        sessions = ["ses-1", "ses-2"] if i == 2 else [None]
        for ses in sessions:
            d = root / sub / ses / "anat" if ses else root / sub / "anat"
            stem = f"{sub}_{ses}" if ses else sub
            _save(d / f"{stem}_T2w.nii.gz", voxel, seed=i)
            _save(d / f"{stem}_T1w.nii.gz", voxel, seed=10 + i)
    (root / "sub-01" / "anat" / "sub-01_T2w.json").write_text("{}")  # sidecars are ignored
    return root


def _cfg(tmp_path, source, *sets):
    return load_config(None, [
        f"data.source={source}", f"data.prepared_dir={tmp_path}/prep", "data.size=96",
        "data.slices_per_volume=4", "data.train_subjects=3", "data.val_subjects=1",
        "data.test_subjects=1", "data.rows_per_shard=8", "data.scales=[2]", *sets])


def test_bids_listing_contrasts_and_sessions(tmp_path):
    root = _bids(tmp_path / "bids")
    assert detect_format(root) == "bids"
    t2 = list_sources(root)
    assert [s.volume for s in t2] == ["sub-01", "sub-02_ses-1", "sub-02_ses-2", "sub-03",
                                      "sub-04", "sub-05"]
    assert {s.subject for s in t2} == {f"sub-{i:02d}" for i in range(1, 6)}
    assert all(s.name.endswith("_T2w.nii.gz") and s.contrast == "T2w" for s in t2)
    t1 = list_sources(root, contrast="T1")
    assert len(t1) == 6 and all(s.name.endswith("_T1w.nii.gz") for s in t1)
    assert list_sources(root, bids_suffix="FLAIR") == []
    assert bids_entities("sub-07_ses-b_acq-fast_T2w.nii.gz") == {"sub": "07", "ses": "b"}


def test_bids_prepare_mixed_spacing_on_one_grid(tmp_path):
    root = _bids(tmp_path / "bids")
    res = prepare(_cfg(tmp_path, root), progress=False)
    man = json.loads((res.out_dir / "manifest.json").read_text())
    assert man["source_format"] == "bids" and man["contrast"] == ["T2w"]
    assert man["voxel_size"] == 1.0
    subs = man["subjects"]
    assert set(subs) == {"sub-01", "sub-02_ses-1", "sub-02_ses-2", "sub-03", "sub-04", "sub-05"}
    for vol, m in subs.items():  # every volume on the 1 mm in-plane training grid
        assert m["voxel_size"][:2] == pytest.approx([1.0, 1.0], abs=0.02), vol
    assert subs["sub-03"]["source_voxel_size"] == pytest.approx([0.8, 0.8])
    assert subs["sub-03"]["voxel_size"][2] == pytest.approx(3.0)  # slices kept as they are
    # both sessions of sub-02 in one split, never two
    assert subs["sub-02_ses-1"]["split"] == subs["sub-02_ses-2"]["split"]
    assert man["split"][subs["sub-02_ses-1"]["split"]].count("sub-02_ses-1") == 1
    # the same anatomy at 0.8 mm and at 1 mm gives the same prepared slices after resampling
    test_vol = man["split"]["test"][0]
    assert (res.out_dir / "volumes" / f"{test_vol}_hr.nii.gz").is_file()


def test_resampled_anatomy_matches_native(tmp_path):
    fine = _head((100, 110, 4), (0.8, 0.8, 3.0))
    native = _head((80, 88, 4), (1.0, 1.0, 3.0))
    aff = np.diag([0.8, 0.8, 3.0, 1.0])
    aff[:3, 3] = -np.array([0.8, 0.8, 3.0]) * (np.array(fine.shape) - 1) / 2
    out, out_aff = resample_inplane(fine, aff, 1.0)
    assert out.shape == native.shape
    assert inplane_voxel_size(out_aff) == pytest.approx((1.0, 1.0))
    # the grid's world positions are the native 1 mm grid's
    assert out_aff[:3, 3] == pytest.approx(-np.array([1.0, 1.0, 3.0]) * (np.array(native.shape) - 1) / 2)
    inside = native > 0
    err = np.abs(out - native)[inside].mean() / native[inside].mean()
    assert err < 0.025, err  # 0.012 here; 0.048 with the grid one voxel off
    same, same_aff = resample_inplane(native, np.diag([1.0, 1.0, 3.0, 1.0]), 1.0)
    assert same is native  # already on the grid: untouched


def test_folder_list_and_glob_sources(tmp_path):
    scans = tmp_path / "scans"
    for i, name in enumerate(["alice_t2.nii.gz", "bob_t2.nii", "carol_t2.nii.gz",
                              "dave_t2.nii.gz", "erin_t2.nii.gz"]):
        _save(scans / ("nested" if i == 4 else "") / name, seed=i)
    (scans / "notes.txt").write_text("not a scan")
    assert detect_format(scans) == "nifti"
    assert [s.subject for s in list_sources(scans)] == ["alice_t2", "bob_t2", "carol_t2",
                                                        "dave_t2", "erin_t2"]
    lst = tmp_path / "cohort.tsv"
    lst.write_text("subject\tpath\n" + "".join(
        f"P{i}\tscans/{n}\n" for i, n in enumerate(["alice_t2.nii.gz", "bob_t2.nii",
                                                    "nested/erin_t2.nii.gz"])))
    assert [(s.subject, s.name) for s in list_sources(lst)] == [
        ("P0", "alice_t2.nii.gz"), ("P1", "bob_t2.nii"), ("P2", "erin_t2.nii.gz")]
    pattern = str(scans / "*_t2.nii*")
    assert detect_format(pattern) == "glob"
    assert len(list_sources(pattern)) == 4  # not the nested one
    res = prepare(_cfg(tmp_path, scans), progress=False)
    assert sum(len(v) for v in res.subjects.values()) == 5
    res = prepare(_cfg(tmp_path, lst, f"data.prepared_dir={tmp_path}/prep_list",
                       "data.train_subjects=1"), progress=False)
    assert sorted(s for v in res.subjects.values() for s in v) == ["P0", "P1", "P2"]


def test_bad_sources_have_clear_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.nii.gz\n")
    with pytest.raises(ValueError, match="'path' column"):
        list_sources(bad)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .tar archive or a .csv/.tsv"):
        detect_format(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "missing")
    root = _bids(tmp_path / "bids")
    with pytest.raises(ValueError, match="suffix 'FLAIR'"):
        prepare(_cfg(tmp_path, root, "data.bids_suffix=FLAIR"), progress=False)
    with pytest.raises(ConfigError, match="source_format"):
        load_config(None, ["data.source_format=dicom"])
    with pytest.raises(ConfigError, match="voxel_size"):
        load_config(None, ["data.voxel_size=0"])


def test_ixi_contrast_selects_files(tmp_path):
    d = tmp_path / "ixi"
    for i in range(3):
        _save(d / f"IXI{10 + i:03d}-Guys-{i:04d}-T2.nii.gz", seed=i)
        _save(d / f"IXI{10 + i:03d}-Guys-{i:04d}-PD.nii.gz", seed=i)
    assert detect_format(d) == "ixi"
    pd = list_sources(d, contrast="PD")
    assert [s.subject for s in pd] == ["IXI010", "IXI011", "IXI012"]
    assert all(s.name.endswith("-PD.nii.gz") for s in pd)
    assert len(list_sources(d)) == 3  # T2 by default
