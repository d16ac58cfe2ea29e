"""DICOM series input for ``pgasr sr`` (issue #16): converted with the right affine
(``pgasr.dicom`` on ``dicom2nifti``), super-resolved, errors named."""

import json

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pgasr.cli import main
from pgasr.dicom import read_dicom_series
from serve_fixtures import make_tiny_checkpoint


def _world(x, y, z):
    """Intensity as a function of RAS+ world position (mm): every voxel says where it is."""
    return 1000 + 3 * x + 5 * y + 7 * z


def write_series(d, nx=24, ny=20, nz=5, dx=0.9, dy=1.1, dz=3.0, origin=(-10.0, -8.0, 20.0),
                 series=None, order=None, prefix="IM"):
    """An axial MR series, one Part-10 file per slice (LPS patient coordinates, as scanners
    write them); ``order`` shuffles the file names so slice order must come from positions."""
    d.mkdir(parents=True, exist_ok=True)
    series, study = series or generate_uid(), generate_uid()
    order = order if order is not None else range(nz)
    for n, k in enumerate(order):
        r, c = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        x_lps, y_lps, z = origin[0] + c * dx, origin[1] + r * dy, origin[2] + k * dz
        arr = np.round(_world(-x_lps, -y_lps, z)).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "MR", series, study
        ds.PatientID, ds.InstanceNumber = "anon", k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
        ds.ImagePositionPatient = [origin[0], origin[1], z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = ds.SpacingBetweenSlices = dz
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = arr.tobytes()
        ds.save_as(d / f"{prefix}{n:04d}.dcm", enforce_file_format=True)
    return d


def test_series_converts_with_the_right_affine(tmp_path):
    d = write_series(tmp_path / "s", order=[3, 0, 4, 1, 2])
    img = read_dicom_series(d)
    data = np.asanyarray(img.dataobj).astype(np.float64)
    assert data.shape == (24, 20, 5)
    idx = np.stack([g.ravel() for g in np.meshgrid(*map(np.arange, data.shape), indexing="ij")])
    world = img.affine[:3, :3] @ idx + img.affine[:3, 3:4]
    np.testing.assert_allclose(data.ravel(), np.round(_world(*world)), atol=0.5)
    assert np.linalg.norm(img.affine[:3, :3], axis=0) == pytest.approx([0.9, 1.1, 3.0])


def test_series_errors(tmp_path):
    with pytest.raises(ValueError, match="no DICOM files"):
        read_dicom_series(tmp_path)
    write_series(tmp_path / "two", nz=4)
    write_series(tmp_path / "two", nz=4, series=generate_uid(), prefix="B")
    with pytest.raises(ValueError, match="2 DICOM series"):
        read_dicom_series(tmp_path / "two")
    gap = write_series(tmp_path / "gap", nz=5)
    (gap / "IM0002.dcm").unlink()  # a missing slice: spacing no longer consistent
    with pytest.raises(ValueError, match="cannot convert"):
        read_dicom_series(gap)


def test_sr_of_a_dicom_series(tmp_path, capsys):
    ck = make_tiny_checkpoint(tmp_path / "ck", extra_meta={"voxel_size": [0.9, 1.1, 3.0]})
    d = write_series(tmp_path / "series")
    out = tmp_path / "sr.nii.gz"
    assert main(["sr", "--checkpoint", str(ck), "--scale", "2", "--input", str(d), "--quiet",
                 "--no-resample", "--output", str(out)]) == 0
    sr, lr = nib.load(out), read_dicom_series(d)
    assert sr.shape == (48, 40, 5)
    # same field of view: the first voxel's outer corner is where the LR's was
    corner = lambda im: im.affine[:3, :3] @ [-0.5, -0.5, 0] + im.affine[:3, 3]  # noqa: E731
    np.testing.assert_allclose(corner(sr), corner(lr), atol=1e-4)
    side = json.loads((tmp_path / "sr.json").read_text())
    assert len(side["InputSHA256"]) == 64 and side["Sources"] == [str(d)]
    rc = main(["sr", "--checkpoint", str(ck), "--scale", "2", "--input", str(d), "--quiet",
               "--output", str(tmp_path / "folder_out")])
    assert rc == 2 and "DICOM series: --output must be a .nii" in capsys.readouterr().err


def _zip(folder, dest, extra: dict | None = None):
    """``folder``'s files in a .zip under a sub-folder (as a PACS export looks), plus
    ``extra`` {name: bytes} members."""
    import zipfile

    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"export/series1/{f.name}")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return dest.read_bytes()


def test_dicom_zip_decodes_like_the_folder_within_limits(tmp_path):
    """Serve's DICOM input (a .zip of one series): the same image as ``pgasr sr`` reads from
    the folder; member names never become paths; every limit is checked before pixel data."""
    from serve.decoding import InputError, Limits, TooLarge, decode_dicom_zip

    d = write_series(tmp_path / "s", order=[3, 0, 4, 1, 2])
    body = _zip(d, tmp_path / "s.zip", {"README.txt": b"not dicom",
                                         "../../escaped.dcm": (d / "IM0000.dcm").read_bytes()[:0]})
    img = decode_dicom_zip(body, Limits())
    ref = read_dicom_series(d)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(img.affine, ref.affine)
    assert not (tmp_path.parent / "escaped.dcm").exists()

    with pytest.raises(TooLarge, match="more than 2000 voxels"):
        decode_dicom_zip(body, Limits(max_voxels=2000))  # 24 x 20 x 5 = 2400
    with pytest.raises(TooLarge, match="x4 output .* voxels"):
        decode_dicom_zip(body, Limits(max_output_voxels=2400 * 4), scale=4)
    with pytest.raises(TooLarge, match="decompress to"):  # declared sizes, before extracting
        decode_dicom_zip(_zip(d, tmp_path / "big.zip", {"pad.bin": bytes(2_000_000)}),
                         Limits(max_voxels=2400))
    with pytest.raises(InputError, match="not a readable .zip"):
        decode_dicom_zip(b"PK\x03\x04" + b"\x00" * 100, Limits())
    two = write_series(tmp_path / "two", nz=4)
    write_series(two, nz=4, series=generate_uid(), prefix="B")
    with pytest.raises(InputError, match="2 DICOM series"):
        decode_dicom_zip(_zip(two, tmp_path / "two.zip"), Limits())
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="the .zip: no DICOM files"):
        decode_dicom_zip(_zip(tmp_path / "empty", tmp_path / "e.zip", {"a.txt": b"x"}), Limits())


def test_dicom_zip_served(tmp_path):
    """``POST /v1/sr`` with a .zip of a DICOM series: the SR volume, its field of view
    kept; a broken .zip is a JSON 422."""
    import asyncio
    import gzip

    import httpx

    from pgasr.config import load_config
    from pgasr.inference import Predictor
    from serve import app as A
    from serve_fixtures import TINY

    ck = make_tiny_checkpoint(tmp_path / "ck", extra_meta={"voxel_size": [0.9, 1.1, 3.0]})
    body = _zip(write_series(tmp_path / "series"), tmp_path / "s.zip")
    key = "dicom-key-0123456789abcdef"
    scfg = load_config(None, TINY + [f"serve.checkpoint={ck}",
                                     "serve.api_keys_env=PGASR_TEST_NO_SUCH_VAR"])
    svc = A.Service(Predictor.from_checkpoint(ck, device="cpu"), scfg, A.KeyChecker([key]))

    async def call():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=A.make_api(svc)),
                                     base_url="http://t", timeout=120) as c:
            h = {"X-API-Key": key, "Content-Type": "application/zip"}
            return (await c.post("/v1/sr?scale=2", content=body, headers=h),
                    await c.post("/v1/sr?scale=2", content=body[:200], headers=h))

    try:
        ok, bad = asyncio.run(call())
    finally:
        svc.close()
    assert ok.status_code == 200, ok.text
    sr = nib.Nifti1Image.from_bytes(gzip.decompress(ok.content))
    lr = read_dicom_series(tmp_path / "series")
    assert sr.shape == (48, 40, 5)
    corner = lambda im: im.affine[:3, :3] @ [-0.5, -0.5, 0] + im.affine[:3, 3]  # noqa: E731
    np.testing.assert_allclose(corner(sr), corner(lr), atol=1e-4)
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_input", bad.text
