"""Synthetic IXI-like T2 cohort (pgasr.data.synth) at 64x64x24: fast, offline."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pgasr.config import SynthConfig
from pgasr.data.ixi import IXI_T2_PATTERN, subject_id
from pgasr.data.synth import (
    FOV_MM,
    GENERATOR_VERSION,
    LABELS,
    MANIFEST_NAME,
    SLAB_MM,
    preview,
    subject_filename,
    synthesize_cohort,
    synthesize_subject,
    voxel_size,
)

CFG = SynthConfig(subjects=3, size=64, slices=24, seed=7)
LABEL_ID = {name: k for k, name in LABELS.items()}


@pytest.fixture(scope="module")
def subject0():
    return synthesize_subject(0, CFG, return_labels=True)


def test_shape_dtype_affine(subject0):
    vol, aff, lab = subject0
    assert vol.shape == (64, 64, 24) and vol.dtype == np.float32
    assert lab.shape == vol.shape and lab.dtype == np.int8
    assert aff.shape == (4, 4)
    assert nib.aff2axcodes(aff) == ("R", "A", "S")
    np.testing.assert_allclose(nib.affines.voxel_sizes(aff), voxel_size(CFG))
    np.testing.assert_allclose(voxel_size(CFG), (FOV_MM / 64, FOV_MM / 64, SLAB_MM / 24))
    # Centre of the grid is the world origin; field of view is head-sized.
    centre = aff @ np.array([31.5, 31.5, 11.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    # IXI-like integer intensities in the int16 range.
    assert vol.min() >= 0 and vol.max() < 32767
    np.testing.assert_array_equal(vol, np.rint(vol))
    assert 800 < vol.max() < 4000


def test_head_is_head_sized(subject0):
    vol, aff, lab = subject0
    head = lab > 0
    extent_mm = [np.ptp(np.nonzero(head.any(axis=tuple(a for a in range(3) if a != ax)))[0])
                 * voxel_size(CFG)[ax] for ax in range(2)]
    # An adult head is ~150 mm wide and ~190 mm long; brain + skull + scalp.
    assert 130 < extent_mm[0] < 200, extent_mm
    assert 160 < extent_mm[1] < 235, extent_mm
    # Air all around the head in-plane (nothing touches the edge of the FOV).
    assert not head[[0, -1], :, :].any() and not head[:, [0, -1], :].any()


def test_tissue_ordering_and_noise_floor(subject0):
    vol, _, lab = subject0
    mean = {name: float(vol[lab == k].mean()) for k, name in LABELS.items() if (lab == k).any()}
    for name in ("background", "csf", "gm", "wm", "bone", "fat"):
        assert name in mean, f"no {name} voxels"
    # T2-weighted: CSF bright, GM intermediate, WM dark; fat bright-ish, bone dark.
    assert mean["csf"] > 1.25 * mean["gm"] > 1.25 * 1.15 * mean["wm"]
    assert mean["fat"] > mean["wm"] > mean["bone"]
    # Air: a Rician (Rayleigh) noise floor, near zero but not exactly zero.
    assert 3 < mean["background"] < 40
    assert (vol[lab == 0] > 0).mean() > 0.9


def test_deterministic_per_seed_and_subject(subject0):
    vol0, aff0, lab0 = subject0
    again, aff1 = synthesize_subject(0, CFG)
    assert hashlib.sha256(again.tobytes()).digest() == hashlib.sha256(vol0.tobytes()).digest()
    np.testing.assert_array_equal(aff0, aff1)
    other, _ = synthesize_subject(1, CFG)
    reseeded, _ = synthesize_subject(0, SynthConfig(size=64, slices=24, seed=8))
    for b in (other, reseeded):
        assert not np.array_equal(vol0, b)
        # Different anatomy/pose/contrast, not only different noise.
        assert np.abs(vol0 - b).mean() > 40


def test_subjects_differ_in_anatomy():
    labs = [synthesize_subject(i, CFG, return_labels=True)[2] for i in range(3)]
    brain = [np.isin(lb, [LABEL_ID["gm"], LABEL_ID["wm"]]) for lb in labs]
    for i in range(3):
        for j in range(i + 1, 3):
            dice = 2 * (brain[i] & brain[j]).sum() / (brain[i].sum() + brain[j].sum())
            assert 0.5 < dice < 0.97, (i, j, dice)


def test_golden_values(subject0):
    # Frozen summary of subject 0 at seed 7. A deliberate change to the recipe must bump
    # GENERATOR_VERSION (so cached cohorts regenerate) and update these numbers.
    vol, _, lab = subject0
    assert GENERATOR_VERSION == 1
    np.testing.assert_allclose([vol.mean(), vol.std(), vol[:, :, 12].mean()],
                               [222.677, 307.641, 307.475], rtol=2e-3)
    counts = np.bincount(lab.ravel(), minlength=7)
    np.testing.assert_allclose(counts, [65048, 1739, 11449, 6206, 2370, 2932, 8560], rtol=0.01)


def test_bad_arguments():
    with pytest.raises(TypeError, match="synthesize_subject\\(index, cfg\\)"):
        synthesize_subject(CFG, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="index"):
        synthesize_subject(-1, CFG)
    with pytest.raises(ValueError, match="synth.size"):
        synthesize_subject(0, SynthConfig(size=4))
    with pytest.raises(ValueError, match="synth.seed"):
        synthesize_subject(0, SynthConfig(seed=-1))


def test_small_subject_is_fast(subject0):
    t0 = time.perf_counter()
    synthesize_subject(5, CFG)
    assert time.perf_counter() - t0 < 3.0  # template already cached by the fixture


def test_filenames():
    assert subject_filename(0) == "IXI901-Synth-0001-T2.nii.gz"
    assert subject_filename(41) == "IXI942-Synth-0042-T2.nii.gz"
    names = [subject_filename(i) for i in range(200)]
    assert len({subject_id(n) for n in names}) == 200
    assert all(IXI_T2_PATTERN.match(n) for n in names)


def test_cohort_files_cache_and_atomicity(tmp_path, subject0):
    out = tmp_path / "synth"
    paths = synthesize_cohort(CFG, out)
    assert [p.name for p in paths] == [subject_filename(i) for i in range(3)]
    img = nib.load(str(paths[0]))
    assert img.get_data_dtype() == np.int16
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.header.get_zooms(), voxel_size(CFG))
    np.testing.assert_array_equal(np.asarray(img.dataobj, dtype=np.float32), subject0[0])
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {p.name for p in paths}
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]

    # Rerun: nothing regenerated (mtimes unchanged).
    mtimes = [p.stat().st_mtime_ns for p in paths]
    time.sleep(0.01)
    assert synthesize_cohort(CFG, out) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes

    # A corrupted file (hash mismatch) is regenerated; a stale old part file is removed.
    paths[1].write_bytes(b"garbage")
    stale = out / ".synth-IXI999.part"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    synthesize_cohort(CFG, out)
    assert nib.load(str(paths[1])).shape == (64, 64, 24)
    assert not stale.exists()

    # Fewer subjects: extra synthetic files go, other files stay.
    keep = out / "notes.txt"
    keep.write_text("mine")
    two = synthesize_cohort(SynthConfig(subjects=2, size=64, slices=24, seed=7), out)
    assert sorted(p.name for p in out.glob("IXI*")) == [p.name for p in two]
    assert keep.exists()

    # Other parameters: everything regenerated, with the new content.
    new = synthesize_cohort(SynthConfig(subjects=2, size=64, slices=24, seed=9), out)
    assert json.loads((out / MANIFEST_NAME).read_text())["params"]["seed"] == 9
    expected, _ = synthesize_subject(0, SynthConfig(size=64, slices=24, seed=9))
    np.testing.assert_array_equal(np.asarray(nib.load(str(new[0])).dataobj), expected)


def test_cohort_defaults_to_cfg_out_dir(tmp_path):
    cfg = SynthConfig(subjects=1, size=32, slices=8, seed=0, out_dir=str(tmp_path / "d"))
    (p,) = synthesize_cohort(cfg)
    assert p.parent == Path(cfg.out_dir) and p.is_file()


def test_preview(tmp_path):
    paths = synthesize_cohort(CFG, tmp_path / "c")
    png = tmp_path / "img" / "montage.png"
    stats = preview(paths, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stats["files"] == [str(p) for p in paths]
    assert len(stats["per_subject"]) == 3
    assert stats["csf_mean"] > stats["gm_mean"] > stats["wm_mean"]
    assert stats["csf_gm_ratio"] > 1.2 and stats["gm_wm_ratio"] > 1.1
    assert stats["head_p1"] < stats["head_p50"] < stats["head_p99"] <= stats["max"]
    assert stats["background_mean"] < 0.1 * stats["head_mean"]
    with pytest.raises(ValueError, match="at least one"):
        preview([], png)
