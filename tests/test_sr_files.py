"""``pgasr sr`` on a researcher's own data (issue #16): BIDS datasets -> derivatives with
sidecars, folders, any spacing or orientation brought to the model's grid, no silent
overwrites."""

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from pgasr.cli import main
from pgasr.sr_files import derivative_name
from serve_fixtures import make_tiny_checkpoint


def _lr(path, voxel=(2.0, 2.0, 3.0), fov=(48.0, 40.0, 12.0), seed=0, affine=None):
    shape = tuple(int(round(f / v)) for f, v in zip(fov, voxel))
    axes = [(np.arange(n) - (n - 1) / 2) * v for n, v in zip(shape, voxel)]
    x, y, _ = np.meshgrid(*axes, indexing="ij")
    rng = np.random.default_rng(seed)
    data = ((x / 18) ** 2 + (y / 15) ** 2 < 1) * (500 + 100 * np.sin(x / 4)) + rng.random(shape)
    if affine is None:
        affine = np.diag([*voxel, 1.0])
        affine[:3, 3] = -np.asarray(voxel) * (np.asarray(shape) - 1) / 2
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
    return path


def _corner(img, corner):
    """World position of a voxel corner (FOV edge) of the in-plane grid."""
    return img.affine[:3, :3] @ np.asarray(corner, dtype=float) + img.affine[:3, 3]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "stage2"
    return make_tiny_checkpoint(d, extra_meta={"voxel_size": [1.0, 1.0, 1.0],
                                               "contrast": ["T2w"]})


def test_derivative_names():
    assert derivative_name("sub-01_ses-2_T2w.nii.gz", 2) == "sub-01_ses-2_desc-sr2_T2w.nii.gz"
    assert derivative_name("sub-01_acq-x_desc-old_T1w.nii", 4) == "sub-01_acq-x_desc-sr4_T1w.nii"


def test_bids_dataset_to_derivatives(tmp_path, ckpt, caplog):
    root = tmp_path / "bids"
    (root).mkdir()
    (root / "dataset_description.json").write_text('{"Name": "lr", "BIDSVersion": "1.8.0"}')
    a = _lr(root / "sub-01" / "anat" / "sub-01_T2w.nii.gz")  # the model's LR grid (2 mm)
    b = _lr(root / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T2w.nii.gz",
            voxel=(1.6, 1.6, 3.0), seed=1)  # finer: resampled to 2 mm first
    _lr(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", seed=2)  # another contrast: not run
    assert main(["sr", "--checkpoint", str(ckpt), "--scale", "2", "--input", str(root),
                 "--quiet"]) == 0
    deriv = root / "derivatives" / "pgasr"
    outs = sorted(p.relative_to(deriv).as_posix() for p in deriv.rglob("*.nii.gz"))
    assert outs == ["sub-01/anat/sub-01_desc-sr2_T2w.nii.gz",
                    "sub-02/ses-1/anat/sub-02_ses-1_desc-sr2_T2w.nii.gz"]
    desc = json.loads((deriv / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "pgasr"
    for src, rel, resampled in [(a, outs[0], False), (b, outs[1], True)]:
        out = nib.load(deriv / rel)
        side = json.loads((deriv / rel.replace(".nii.gz", ".json")).read_text())
        assert side["Scale"] == 2 and side["Grid"]["resampled"] is resampled
        assert side["InputSHA256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert len(side["Model"]["checkpoint_sha256"]) == 64
        assert side["Model"]["prior_backend"] == "tissue"
        # the model's 1 mm output voxels, the input's field of view, finite values
        assert out.header.get_zooms()[:2] == pytest.approx((1.0, 1.0))
        inp = nib.load(src)
        np.testing.assert_allclose(_corner(out, [-0.5, -0.5, 0]), _corner(inp, [-0.5, -0.5, 0]),
                                   atol=1e-4)
        assert np.isfinite(np.asarray(out.dataobj)).all()
    assert nib.load(deriv / outs[1]).shape == (48, 40, 4)  # 48 x 40 mm at 1 mm

    # a second run refuses to replace them; --overwrite does
    caplog.clear()
    assert main(["sr", "--checkpoint", str(ckpt), "--scale", "2", "--input", str(root),
                 "--quiet"]) == 2
    assert main(["sr", "--checkpoint", str(ckpt), "--scale", "2", "--input", str(root),
                 "--quiet", "--overwrite"]) == 0
    # other contrasts on request, with a warning that the model was trained on T2w
    caplog.clear()
    assert main(["sr", "--checkpoint", str(ckpt), "--scale", "2", "--input", str(root),
                 "--quiet", "--contrast", "T1"]) == 0
    assert (deriv / "sub-01" / "anat" / "sub-01_desc-sr2_T1w.nii.gz").is_file()
    assert "trained on T2w" in caplog.text


def test_folder_input_and_errors(tmp_path, ckpt, capsys):
    scans = tmp_path / "scans"
    _lr(scans / "p1.nii.gz")
    _lr(scans / "visit2" / "p2.nii", seed=3)
    out = tmp_path / "sr"
    assert main(["sr", "--checkpoint", str(ckpt), "--scale", "2", "--input", str(scans),
                 "--output", str(out), "--quiet"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii*")) == [
        "p1_sr2.nii.gz", "visit2/p2_sr2.nii"]
    assert (out / "p1_sr2.json").is_file()
    for argv, message in [
        (["--input", str(scans)], "--output (a folder) is needed"),
        (["--input", str(scans), "--output", str(tmp_path / "x.nii.gz")], "must be a folder"),
        (["--input", str(scans / "p1.nii.gz")], "--output is needed"),
        (["--input", str(tmp_path / "missing.nii.gz"), "--output", str(out / "y.nii.gz")],
         "not found"),
        (["--input", str(scans / "p1.nii.gz"), "--output", str(out / "p1_sr2.nii.gz")],
         "exist"),
    ]:
        rc = main(["sr", "--checkpoint", str(ckpt), "--scale", "2", "--quiet", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (argv, err)


def test_non_axial_volume_is_reoriented(tmp_path, ckpt):
    """A sagittal acquisition (slices along x) is processed as the axial volume it is, and the
    output's affine says so: the same result as SR of its RAS+ version."""
    axial = _lr(tmp_path / "axial.nii.gz", seed=4)
    img = nib.load(axial)
    sag_data = np.transpose(np.asarray(img.dataobj), (2, 0, 1))  # (z, x, y): slices along x
    perm = img.affine[:, [2, 0, 1, 3]]
    sag = tmp_path / "sag.nii.gz"
    nib.save(nib.Nifti1Image(sag_data, perm), sag)
    for src, dst in [(axial, "a_sr.nii.gz"), (sag, "s_sr.nii.gz")]:
        assert main(["sr", "--checkpoint", str(ckpt), "--scale", "2", "--input", str(src),
                     "--output", str(tmp_path / dst), "--quiet"]) == 0
    a, s = nib.load(tmp_path / "a_sr.nii.gz"), nib.load(tmp_path / "s_sr.nii.gz")
    side = json.loads((tmp_path / "s_sr.json").read_text())
    assert side["Grid"]["reoriented"] is True
    np.testing.assert_allclose(s.affine, a.affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s.dataobj), np.asarray(a.dataobj), rtol=1e-5,
                               atol=1e-3)


@pytest.mark.ray
def test_sr_job_on_ray_actors_equals_the_cli(tmp_path, ckpt, ray_session):
    """``jobs/sr.py``: the same plan, files and sidecars as ``pgasr sr``, computed by a pool of
    Ray actors; a bad volume is reported and the others are still written."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from jobs.sr import run_sr

    scans = tmp_path / "scans"
    for i in range(3):
        _lr(scans / f"p{i}.nii.gz", seed=i)
    assert main(["sr", "--checkpoint", str(ckpt), "--scale", "2", "--input", str(scans),
                 "--output", str(tmp_path / "cli"), "--quiet"]) == 0
    (scans / "broken.nii.gz").write_bytes(b"not a nifti")
    res = run_sr(str(ckpt), str(scans), str(tmp_path / "ray"), 2, actors=2, progress=False)
    assert sorted(Path(r["output"]).name for r in res["written"]) == [
        "p0_sr2.nii.gz", "p1_sr2.nii.gz", "p2_sr2.nii.gz"]
    assert [Path(r["input"]).name for r in res["failed"]] == ["broken.nii.gz"]
    for i in range(3):
        a = nib.load(tmp_path / "cli" / f"p{i}_sr2.nii.gz")
        b = nib.load(tmp_path / "ray" / f"p{i}_sr2.nii.gz")
        np.testing.assert_allclose(np.asarray(b.dataobj), np.asarray(a.dataobj), rtol=1e-5,
                                   atol=1e-3)
        np.testing.assert_array_equal(a.affine, b.affine)
        sa, sb = (json.loads((tmp_path / d / f"p{i}_sr2.json").read_text())
                  for d in ("cli", "ray"))
        assert sb["Grid"] == sa["Grid"] and sb["InputSHA256"] == sa["InputSHA256"]
    # planned like the CLI: existing outputs are refused before any actor starts
    with pytest.raises(ValueError, match="exist"):
        run_sr(str(ckpt), str(scans), str(tmp_path / "ray"), 2, progress=False)
