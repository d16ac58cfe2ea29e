"""Checkpoint round trip, Predictor and the `pgasr sr` contract, on a tiny untrained model."""

import json

import nibabel as nib
import numpy as np
import pytest

from pgasr.checkpoint import load_checkpoint
from pgasr.cli import main
from pgasr.inference import Predictor

from serve_fixtures import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "stage2")


def test_checkpoint_is_self_describing(ckpt_dir):
    assert {p.name for p in ckpt_dir.iterdir()} >= {"model.safetensors", "config.yaml", "meta.json"}
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    assert meta["stage"] == 2 and meta["format"].startswith("pgasr-checkpoint")
    assert "torch" in meta["versions"] and meta["prior"]["backend"] == "tissue"
    ck = load_checkpoint(ckpt_dir)
    assert ck.cfg.model.n_z == 8


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a PGASR checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_roundtrip_identical_outputs(ckpt_dir):
    a = Predictor.from_checkpoint(ckpt_dir, device="cpu")
    b = Predictor.from_pretrained(ckpt_dir, device="cpu")  # the same loader by its other name
    lr = np.random.default_rng(0).normal(size=(3, 3, 12, 10)).astype(np.float32)
    out_a = a.predict_triplets(lr, 2)
    out_b = b.predict_triplets(lr, 2)
    assert out_a.shape == (3, 24, 20) and out_a.dtype == np.float32
    np.testing.assert_array_equal(out_a, out_b)
    with pytest.raises(ValueError, match="scale 4 not supported"):
        a.predict_triplets(lr, 4)


def test_volume_any_size_and_units(ckpt_dir):
    p = Predictor.from_checkpoint(ckpt_dir, device="cpu", batch_size=3)
    vol = (np.random.default_rng(1).random((13, 11, 5)) * 800 + 100).astype(np.float32)
    res = p.predict_volume(vol, np.eye(4), 2)
    assert res.sr.shape == (26, 22, 5)
    # mapped back to input units: mean of the same order as the input, not z-scores
    assert 10 < float(res.sr.mean()) < 5000
    # chunking does not change the result
    p2 = Predictor.from_checkpoint(ckpt_dir, device="cpu", batch_size=2)
    np.testing.assert_allclose(p2.predict_volume(vol, np.eye(4), 2).sr, res.sr, rtol=1e-5, atol=1e-3)


def test_orientation_is_restored(ckpt_dir):
    p = Predictor.from_checkpoint(ckpt_dir, device="cpu")
    vol = (np.random.default_rng(2).random((12, 10, 4)) * 500 + 50).astype(np.float32)
    ras = np.diag([1.0, 1.0, 1.0, 1.0])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    a = p.predict_volume(vol, ras, 2).sr
    # the same anatomy stored flipped in-plane must give the flipped result
    b = p.predict_volume(vol[::-1, ::-1].copy(), lps, 2).sr
    np.testing.assert_allclose(b[::-1, ::-1], a, rtol=1e-4, atol=1e-2)


def _save(path, data, affine):
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = b"pgasr-test"
    nib.save(img, path)
    return path


def test_sr_cli_contract(ckpt_dir, tmp_path):
    aff = np.array([[2.0, 0, 0, -30], [0, 2.0, 0, -40], [0, 0, 3.0, 10], [0, 0, 0, 1]])
    src = _save(tmp_path / "lr.nii.gz", (np.random.rand(12, 10, 4) * 300).astype(np.float32), aff)
    out = tmp_path / "sr.nii.gz"
    assert main(["sr", "--checkpoint", str(ckpt_dir), "--scale", "2", "--input", str(src),
                 "--output", str(out), "--quiet"]) == 0
    img = nib.load(out)
    assert img.shape == (24, 20, 4)
    np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 3.0))
    # world-space field of view unchanged: corners of the grids coincide
    lo_lr = aff @ np.array([-0.5, -0.5, 0, 1])
    lo_sr = img.affine @ np.array([-0.5, -0.5, 0, 1])
    np.testing.assert_allclose(lo_sr, lo_lr, atol=1e-6)
    assert img.header["descrip"].tobytes().startswith(b"pgasr-test")
    assert img.get_data_dtype() == np.float32


@pytest.mark.parametrize("case", ["not_nifti", "2d", "nan", "empty", "scale", "stage1",
                                  "nan_affine"])
def test_sr_cli_rejects_bad_input(ckpt_dir, tmp_path, capsys, case):
    out = tmp_path / "sr.nii.gz"
    args = ["sr", "--checkpoint", str(ckpt_dir), "--scale", "2", "--output", str(out)]
    if case == "not_nifti":
        p = tmp_path / "x.nii.gz"
        p.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    elif case == "2d":
        p = _save(tmp_path / "x.nii", np.random.rand(8, 8).astype(np.float32), np.eye(4))
    elif case == "nan":
        d = np.random.rand(8, 8, 3).astype(np.float32)
        d[1, 1, 1] = np.nan
        p = _save(tmp_path / "x.nii", d, np.eye(4))
    elif case == "empty":
        p = _save(tmp_path / "x.nii", np.zeros((8, 8, 3), np.float32), np.eye(4))
    elif case == "nan_affine":
        img = nib.Nifti1Image(np.random.rand(8, 8, 3).astype(np.float32), np.eye(4))
        raw = bytearray(img.to_bytes())
        import struct

        raw[280:284] = struct.pack("<f", float("nan"))  # srow_x[0]
        raw[254:256] = struct.pack("<h", 1)  # sform_code: use the (broken) sform
        p = tmp_path / "x.nii"
        p.write_bytes(bytes(raw))
    elif case == "scale":
        p = _save(tmp_path / "x.nii", np.random.rand(8, 8, 3).astype(np.float32), np.eye(4))
        args[4] = "4"
    else:
        p = _save(tmp_path / "x.nii", np.random.rand(8, 8, 3).astype(np.float32), np.eye(4))
        args[2] = str(tmp_path)
    assert main(args + ["--input", str(p)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
    assert not out.exists()


def test_model_grid_shape_is_what_to_model_grid_gives(tmp_path):
    """The header-only shape Serve checks against its caps equals the grid ``pgasr sr``
    resamples to: axial, anisotropic, sagittal and coronal inputs."""
    p = Predictor.from_checkpoint(
        make_tiny_checkpoint(tmp_path / "ck", extra_meta={"voxel_size": [1.0, 1.0, 1.0]}),
        device="cpu")
    rng = np.random.default_rng(0)
    for aff in [np.diag([0.9, 0.9, 3, 1]), np.diag([2.0, 2.0, 2, 1]), np.diag([3.0, 1.2, 5, 1]),
                np.array([[0, 0, 4.0, 0], [1.1, 0, 0, 0], [0, 0.7, 0, 0], [0, 0, 0, 1]]),
                np.array([[-0.8, 0, 0, 0], [0, 0, 3.0, 0], [0, 1.3, 0, 0], [0, 0, 0, 1]])]:
        img = nib.Nifti1Image((rng.random((30, 26, 7)) * 100 + 1).astype(np.float32), aff)
        assert p.model_grid_shape(img, 2) == p.to_model_grid(img, 2)[0].shape, aff
