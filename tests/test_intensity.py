"""The intensity contract (pgasr.intensity) and background handling (pgasr.background):
prepare and inference compute the same units from the LR volume, rescaled scans give rescaled
output, background stays background, and the generator has no border frame."""


import nibabel as nib
import numpy as np
import pytest
import torch

from pgasr.background import head_weight
from pgasr.cli import main
from pgasr.config import InferenceConfig, load_config
from pgasr.data import schema
from pgasr.data.batches import read_split, to_lr_units
from pgasr.data.prepare import LR_VOLUMES, prepare
from pgasr.evaluate import evaluate
from pgasr.inference import Predictor
from pgasr.intensity import intensity_stats

from serve_fixtures import TINY, make_tiny_checkpoint  # noqa: E402


def _head_volume(seed: int, shape=(32, 32, 12), scale=700.0, offset=0.0, r=1.0) -> np.ndarray:
    """A bright ellipsoid 'head' (relative size ``r``) with texture on a zero background."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = ((x / r) ** 2 / 0.5 + (y / r) ** 2 / 0.6 + (z * 0.5) ** 2) < 1
    tex = 1 + 0.4 * np.sin(9 * x + seed) * np.cos(7 * y) + rng.normal(0, 0.05, shape)
    return (head * tex * scale + offset).astype(np.float32)


def _write_cohort(d, n=4):
    d.mkdir(parents=True, exist_ok=True)
    aff = np.diag([2.0, 2.0, 2.5, 1.0])
    for i in range(n):
        vol = np.clip(_head_volume(i), 0, None).astype(np.int16)
        nib.save(nib.Nifti1Image(vol, aff), d / f"IXI{100 + i:03d}-Guys-{i:04d}-T2.nii.gz")
    return d


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A tiny untrained stage-2 checkpoint: its output in the background is texture, which
    is what the background handling has to remove."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "stage2")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    _write_cohort(root / "ixi")
    cfg = load_config(None, TINY + [
        "data.source=" + str(root / "ixi"), "data.prepared_dir=" + str(root / "prep"),
        "data.size=32", "data.slices_per_volume=6", "data.train_subjects=2",
        "data.val_subjects=1", "data.test_subjects=1", "data.rows_per_shard=8",
        "data.scales=[2]", "data.voxel_size=2.0"])  # the cohort's own 2 mm grid
    prepare(cfg, progress=False)
    return root / "prep"


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("a,c", [(10.0, 0.0), (0.05, 300.0), (3.0, -1000.0)])
def test_stats_are_equivariant_under_affine_intensity_maps(a, c):
    vol = _head_volume(0)
    st, st2 = intensity_stats(vol), intensity_stats(a * vol + c)
    assert st.offset == pytest.approx(0.0, abs=1e-6)  # zero background
    assert st2.offset == pytest.approx(a * st.offset + c, rel=1e-5, abs=1e-4)
    assert st2.scale == pytest.approx(a * st.scale, rel=1e-5)
    np.testing.assert_allclose(st2.normalise(a * vol + c), st.normalise(vol), atol=1e-4)


def test_stats_background_zero_head_mean_one_and_robust_to_bright_outliers():
    vol = _head_volume(1)
    st = intensity_stats(vol)
    u = st.normalise(vol)
    assert abs(float(u[vol == 0].mean())) < 1e-6
    head = u > 0.1
    assert float(u[head].mean()) == pytest.approx(1.0, rel=1e-3)
    hot = vol.copy()
    hot.flat[:: 997] = vol.max() * 3  # bright vessels / fat / ghosting, 0.1 % of voxels
    assert intensity_stats(hot).scale == pytest.approx(st.scale, rel=0.05)


def test_stats_errors():
    with pytest.raises(ValueError, match="no contrast"):
        intensity_stats(np.zeros((8, 8, 4)))
    bad = _head_volume(0)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        intensity_stats(bad)


# --------------------------------------------------------------------------- prepare == sr


def test_prepare_stores_the_lr_volume_statistics(prepared):
    rows = read_split(prepared, "test")
    subj = rows[schema.SUBJECT][0]
    lr_img = nib.load(prepared / LR_VOLUMES / f"{subj}_lr_x2.nii.gz")
    hr_img = nib.load(prepared / LR_VOLUMES / f"{subj}_hr.nii.gz")
    lr_vol = np.asarray(lr_img.dataobj, dtype=np.float32)
    hr_vol = np.asarray(hr_img.dataobj, dtype=np.float32)
    assert lr_vol.shape == (16, 16, 12) and hr_vol.shape == (32, 32, 12)
    np.testing.assert_allclose(lr_img.header.get_zooms()[:2], (4.0, 4.0))
    st = intensity_stats(lr_vol)
    units = to_lr_units(rows, 2)
    k = int(rows[schema.SLICE][0])
    off = 3  # (12 - 6) // 2 kept-slice offset
    # stage-2 rows in LR units == the exported LR / HR volumes normalised by the LR volume
    np.testing.assert_allclose(units[schema.lr_column(2)][0, 1], st.normalise(lr_vol[:, :, off + k]),
                               atol=2e-4)
    np.testing.assert_allclose(units[schema.HR][0, 1], st.normalise(hr_vol[:, :, off + k]),
                               atol=2e-4)


def test_sr_cli_on_a_prepared_lr_volume_equals_the_evaluate_path(prepared, ckpt_dir, tmp_path):
    rows = read_split(prepared, "test")
    subj = rows[schema.SUBJECT][0]
    out = tmp_path / "sr.nii.gz"
    assert main(["sr", "--checkpoint", str(ckpt_dir), "--scale", "2", "--input",
                 str(prepared / LR_VOLUMES / f"{subj}_lr_x2.nii.gz"), "--output", str(out)]) == 0
    sr_vol = np.asarray(nib.load(out).dataobj, dtype=np.float32)
    lr_vol = np.asarray(nib.load(prepared / LR_VOLUMES / f"{subj}_lr_x2.nii.gz").dataobj,
                        dtype=np.float32)
    st = intensity_stats(lr_vol)
    # the evaluate path: prepared rows in LR units through Predictor.predict_triplets
    units = to_lr_units(rows, 2)
    sel = np.argsort(rows[schema.SLICE])
    pred = Predictor.from_checkpoint(ckpt_dir, device="cpu")
    ev = pred.predict_triplets(units[schema.lr_column(2)][sel], 2)
    for i, r in enumerate(sel):
        k = 3 + int(rows[schema.SLICE][r])
        np.testing.assert_allclose(st.normalise(sr_vol[:, :, k]), ev[i], atol=2e-3)
    res = evaluate(pred, prepared, 2, tmp_path / "eval", n_figures=0)
    assert np.isfinite(res["summary"]["psnr"]["mean"])


# --------------------------------------------------------------------------- sr behaviour


def test_scaled_input_gives_scaled_output(ckpt_dir):
    pred = Predictor.from_checkpoint(ckpt_dir, device="cpu")
    lr = _head_volume(2, shape=(16, 16, 5), scale=400.0)
    a = pred.predict_volume(lr, np.eye(4), 2).sr
    b = pred.predict_volume(10 * lr + 250, np.eye(4), 2).sr
    np.testing.assert_allclose(b, 10 * a + 250, rtol=1e-4, atol=0.05 * float(np.abs(a).max()) * 1e-2)


def test_background_stays_background(ckpt_dir):
    pred = Predictor.from_checkpoint(ckpt_dir, device="cpu")
    hr = _head_volume(3, shape=(48, 48, 5), scale=900.0, r=0.6)
    lr = hr[::2, ::2]  # zero background stays zero
    sr = pred.predict_volume(lr, np.eye(4), 2).sr
    far = np.ones(hr.shape[:2], bool)
    far[6:-6, 6:-6] = False  # a 6-pixel band along the border: background, far from the head
    assert float(np.abs(sr[far]).mean()) < 1e-3 * float(hr.max())
    # and the untrained network alone does fill it (what the handling removes)
    pred.cfg.inference.background = "model"
    raw = pred.predict_volume(lr, np.eye(4), 2).sr
    assert float(np.abs(raw[far]).mean()) > 1e-2 * float(hr.max())


def test_head_weight_covers_dark_structures_inside_the_head():
    img = np.zeros((1, 40, 40), np.float32)
    yy, xx = np.mgrid[:40, :40]
    ring = ((yy - 20) ** 2 + (xx - 20) ** 2 < 15**2)
    img[0][ring] = 1.0
    img[0][((yy - 20) ** 2 + (xx - 20) ** 2 < 5**2)] = 0.0  # dark ventricle inside the head
    w = head_weight(img, InferenceConfig())
    assert w[0, 20, 20] == pytest.approx(1.0) and w[0, 0, 0] == 0.0 and w[0][ring].min() > 0.95


def _frame(model) -> float:
    """Largest deviation from the interior of the raw network output on a uniform
    background slice (a frame along the border shows up here)."""
    with torch.no_grad():
        sr = model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))[0, 0]
    return float((sr - sr[12:20, 12:20].mean()).abs().max())


def test_border_frame_comes_from_zero_padding_and_replicate_padding_removes_it(ckpt_dir):
    from pgasr.models.blocks import set_padding

    pred = Predictor.from_checkpoint(ckpt_dir, device="cpu")
    assert pred.cfg.model.padding == "zeros"
    assert _frame(pred.model) > 1e-2  # the cause: zero padding inside the network
    set_padding(pred.model, "replicate")
    assert _frame(pred.model) < 1e-4  # uniform up to the border


def test_default_output_has_no_frame_on_a_background_border(ckpt_dir):
    """With the default zero padding the output is still frame-free where the border is
    background: the background handling keeps the input's (bicubic) background there."""
    pred = Predictor.from_checkpoint(ckpt_dir, device="cpu")
    lr = _head_volume(4, shape=(24, 24, 3), scale=600.0, r=0.6)
    sr = pred.predict_volume(lr, np.eye(4), 2).sr
    for edge in (sr[0], sr[-1], sr[:, 0], sr[:, -1]):
        assert float(np.abs(edge).max()) < 1e-3


def test_sr_rejects_a_volume_without_contrast(ckpt_dir, tmp_path, capsys):
    p = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32) + 5, np.eye(4)), p)
    assert main(["sr", "--checkpoint", str(ckpt_dir), "--scale", "2", "--input", str(p),
                 "--output", str(tmp_path / "o.nii.gz")]) == 2
    assert "constant" in capsys.readouterr().err


# --------------------------------------------------------------------------- back-projection


def test_back_projection_makes_the_output_consistent_with_the_lr():
    import torch.nn.functional as F

    from pgasr.consistency import back_project

    g = torch.Generator().manual_seed(0)
    lr = torch.rand(2, 12, 10, generator=g)
    sr = torch.rand(2, 24, 20, generator=g) * 3  # far from consistent

    def residual(x):
        d = F.interpolate(x[:, None], size=(12, 10), mode="bicubic", align_corners=False,
                          antialias=True)[:, 0]
        return float((d - lr).abs().mean())

    assert back_project(sr, lr, 0, 0.5) is sr
    r = [residual(back_project(sr, lr, n, 0.5)) for n in (0, 1, 3, 10)]
    assert r[0] > r[1] > r[2] > r[3] and r[3] < 0.05 * r[0]


def test_predictor_back_projects_before_keeping_the_background(ckpt_dir):
    pred = Predictor.from_checkpoint(ckpt_dir, device="cpu")
    lr = _head_volume(5, shape=(16, 16, 3), scale=500.0, r=0.9)
    pred.cfg.inference.back_projection_steps = 0
    raw = pred.predict_volume(lr, np.eye(4), 2).sr
    pred.cfg.inference.back_projection_steps = 3
    bp = pred.predict_volume(lr, np.eye(4), 2).sr

    def err(x):  # the output, down-sampled like the LR was made, against the LR
        from pgasr.data.degradation import bicubic_resize

        return float(np.mean([np.abs(bicubic_resize(x[:, :, k], (16, 16)) - lr[:, :, k]).mean()
                              for k in range(3)]))

    assert err(bp) < 0.5 * err(raw)


def test_evaluate_never_writes_into_a_foreign_directory(prepared, ckpt_dir, tmp_path):
    """`pgasr evaluate --out` on a folder holding the user's own files is refused, nothing is
    written there; an earlier evaluation is rewritten (#17)."""
    from pgasr.evaluate import evaluate
    from pgasr.provenance import ForeignDirectoryError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(ForeignDirectoryError, match="did not write"):
        evaluate(ckpt_dir, prepared, 2, mine, max_slices_per_subject=1, n_figures=0)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.txt"]
    out = tmp_path / "eval"
    evaluate(ckpt_dir, prepared, 2, out, max_slices_per_subject=1, n_figures=0)
    evaluate(ckpt_dir, prepared, 2, out, max_slices_per_subject=1, n_figures=0)  # its own
    assert (out / "metrics.json").is_file()
