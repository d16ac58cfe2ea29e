"""``pgasr evaluate --sr --hr``: pairing, metrics, output-directory safety and CLI errors."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from pgasr.cli import main
from pgasr.evaluate_volumes import (VolumePair, evaluate_volumes, pair_key, pair_volumes,
                                    score_pair, volume_mask)


def head(rng, shape=(32, 32, 6)):
    """A bright textured block inside a zero background border."""
    v = np.zeros(shape, np.float32)
    v[6:-6, 6:-6, 1:-1] = 100 + 20 * rng.random((shape[0] - 12, shape[1] - 12, shape[2] - 2))
    return v


def save(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4) if affine is None else affine),
             path)
    return path


def noisy(hr, sigma, seed):
    return hr + sigma * np.random.default_rng(seed).standard_normal(hr.shape).astype(np.float32)


def test_identical_volumes_score_inf_psnr_and_ssim_one(tmp_path):
    hr = head(np.random.default_rng(0))
    pair = VolumePair("sub-01", save(tmp_path / "sr.nii.gz", hr), save(tmp_path / "hr.nii.gz", hr))
    for mask in ("auto", "none"):
        s = score_pair(pair, mask)
        assert math.isinf(s.psnr) and s.psnr > 0  # pgasr.metrics.psnr's convention
        assert s.ssim == pytest.approx(1.0, abs=1e-9)
    s = score_pair(pair, "auto")
    assert s.n_slices == 4  # the all-zero first and last slices are skipped
    assert 0 < s.n_voxels < hr.size


def test_noisier_sr_scores_lower(tmp_path):
    hr = head(np.random.default_rng(1))
    h = save(tmp_path / "hr.nii.gz", hr)
    low = score_pair(VolumePair("a", save(tmp_path / "low.nii.gz", noisy(hr, 2, 1)), h))
    high = score_pair(VolumePair("b", save(tmp_path / "high.nii.gz", noisy(hr, 10, 2)), h))
    assert high.psnr < low.psnr - 10  # 5x the noise: ~14 dB
    assert high.ssim < low.ssim < 1


def test_psnr_is_over_the_masked_voxels_with_the_hr_range(tmp_path):
    hr = head(np.random.default_rng(2))
    sr = hr.copy()
    sr[0, 0, 0] = 50.0  # an error in the background: outside the auto mask
    sr[16, 16, 3] += 10.0  # and one inside it
    pair = VolumePair("s", save(tmp_path / "sr.nii", sr), save(tmp_path / "hr.nii", hr))
    s = score_pair(pair, "auto")
    m = volume_mask(hr, "auto")
    assert not m[0, 0, 0] and m[16, 16, 3]
    dr = float(hr.max() - hr.min())
    assert s.n_voxels == int(m.sum())
    assert s.psnr == pytest.approx(10 * np.log10(dr**2 / (100.0 / m.sum())), rel=1e-5)
    whole = score_pair(pair, "none")
    assert whole.n_voxels == hr.size
    assert whole.psnr == pytest.approx(10 * np.log10(dr**2 / ((2500.0 + 100.0) / hr.size)),
                                       rel=1e-5)


def test_pairing_by_bids_subject_and_by_name(tmp_path):
    assert pair_key("sub-01_desc-sr2_T2w.nii.gz") == "sub-01"
    assert pair_key("x/sub-01_T2w.nii.gz") == "sub-01"
    assert pair_key("sub-01_ses-2_desc-sr_T2w.nii") == "sub-01_ses-2"
    assert pair_key("IXI002-Guys-0828-T2.nii.gz") == "IXI002-Guys-0828-T2"
    assert pair_key("sub-01_T2w.nii.gz", "name") == "sub-01_T2w"
    rng = np.random.default_rng(3)
    save(tmp_path / "sr" / "sub-01_desc-sr2_T2w.nii.gz", head(rng))
    save(tmp_path / "hr" / "sub-01" / "anat" / "sub-01_T2w.nii.gz", head(rng))  # recursive
    p = pair_volumes(tmp_path / "sr", tmp_path / "hr")
    assert [(x.subject, x.sr.name, x.hr.name) for x in p.pairs] == [
        ("sub-01", "sub-01_desc-sr2_T2w.nii.gz", "sub-01_T2w.nii.gz")]
    with pytest.raises(ValueError, match="no SR file .* pairs"):
        pair_volumes(tmp_path / "sr", tmp_path / "hr", "name")


def test_two_files_of_one_subject_are_an_error(tmp_path):
    rng = np.random.default_rng(4)
    save(tmp_path / "sr" / "sub-01_T2w.nii.gz", head(rng))
    save(tmp_path / "hr" / "sub-01_T2w.nii.gz", head(rng))
    save(tmp_path / "hr" / "sub-01_T1w.nii.gz", head(rng))
    with pytest.raises(ValueError, match="2 HR files pair as 'sub-01'"):
        pair_volumes(tmp_path / "sr", tmp_path / "hr")


def test_unmatched_files_are_reported_not_fatal(tmp_path, capsys):
    rng = np.random.default_rng(5)
    hr = head(rng)
    save(tmp_path / "hr" / "sub-01_T2w.nii.gz", hr)
    save(tmp_path / "hr" / "sub-03_T2w.nii.gz", hr)
    save(tmp_path / "sr" / "sub-01_desc-sr_T2w.nii.gz", noisy(hr, 3, 0))
    save(tmp_path / "sr" / "sub-02_desc-sr_T2w.nii.gz", hr)
    (tmp_path / "sr" / "notes.txt").write_text("not a volume")
    out = tmp_path / "eval"
    assert main(["evaluate", "--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"),
                 "--out", str(out), "-q"]) == 0
    cap = capsys.readouterr()
    assert "sub-01: PSNR" in cap.out and "1 pairs (mask auto)" in cap.out
    assert "sub-02_desc-sr_T2w.nii.gz" in cap.err and "sub-03_T2w.nii.gz" in cap.err
    summary = json.loads((out / "summary.json").read_text())
    assert [p.split("/")[-1] for p in summary["unmatched"]["sr"]] == ["sub-02_desc-sr_T2w.nii.gz"]
    assert [p.split("/")[-1] for p in summary["unmatched"]["hr"]] == ["sub-03_T2w.nii.gz"]
    assert summary["n_pairs"] == 1 and summary["psnr"]["n"] == 1 and summary["mask"] == "auto"
    assert summary["pgasr_version"]
    rows = list(csv.DictReader((out / "per_subject.csv").open()))
    assert [r["subject"] for r in rows] == ["sub-01"]
    assert set(rows[0]) == {"subject", "sr_file", "hr_file", "psnr", "ssim", "n_voxels"}
    assert float(rows[0]["psnr"]) == pytest.approx(summary["psnr"]["mean"], abs=1e-5)
    # a second run replaces its own outputs
    assert main(["evaluate", "--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"),
                 "--out", str(out), "-q", "--mask", "none"]) == 0
    assert json.loads((out / "summary.json").read_text())["mask"] == "none"


def test_identical_volumes_through_the_cli_write_strict_json(tmp_path, capsys):
    hr = head(np.random.default_rng(6))
    save(tmp_path / "hr" / "a.nii.gz", hr)
    save(tmp_path / "sr" / "a.nii.gz", hr)
    out = tmp_path / "eval"
    assert main(["evaluate", "--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"),
                 "--out", str(out), "-q"]) == 0
    assert "a: PSNR inf dB  SSIM 1.0000" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert summary["psnr"] == {"mean": None, "std": None, "n": 1, "n_infinite": 1}
    assert summary["ssim"]["mean"] == pytest.approx(1.0)
    assert next(csv.DictReader((out / "per_subject.csv").open()))["psnr"] == "inf"


def test_shape_mismatch_is_exit_2_with_a_message(tmp_path, capsys):
    rng = np.random.default_rng(7)
    save(tmp_path / "hr" / "sub-01_T2w.nii.gz", head(rng, (32, 32, 6)))
    save(tmp_path / "sr" / "sub-01_desc-sr_T2w.nii.gz", head(rng, (64, 64, 6)),
         np.diag([0.5, 0.5, 1.0, 1.0]))
    out = tmp_path / "eval"
    assert main(["evaluate", "--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"),
                 "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "shapes/voxel sizes differ" in err and "(64, 64, 6)" in err and "(0.5, 0.5, 1.0)" in err
    assert "Traceback" not in err and not out.exists()


def test_affine_mismatch_warns(tmp_path, capsys):
    hr = head(np.random.default_rng(8))
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    save(tmp_path / "hr" / "s.nii.gz", hr)
    save(tmp_path / "sr" / "s.nii.gz", hr, shifted)
    assert main(["evaluate", "--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"),
                 "--out", str(tmp_path / "eval"), "-q"]) == 0
    assert "affines differ by up to 2 mm" in capsys.readouterr().err


def test_sr_in_other_units_warns(tmp_path):
    hr = head(np.random.default_rng(12))
    h = save(tmp_path / "hr.nii.gz", hr)
    assert not score_pair(VolumePair("a", save(tmp_path / "a.nii.gz", noisy(hr, 3, 0)), h)).warnings
    s = score_pair(VolumePair("b", save(tmp_path / "b.nii.gz", hr / 100), h))
    assert any("different units" in w for w in s.warnings)


@pytest.mark.parametrize("argv, message", [
    (["--sr", "S"], "missing --hr"),
    (["--hr", "H"], "missing --sr"),
    (["--sr", "S", "--hr", "H", "--checkpoint", "C"], "cannot be combined with --checkpoint"),
    (["--checkpoint", "C", "--data", "D", "--scale", "2", "--mask", "none"],
     "--mask (scoring SR volumes) cannot be combined"),
    (["--checkpoint", "C", "--scale", "2"], "missing --data"),
    ([], "either --checkpoint, --data and --scale"),
])
def test_mixed_or_missing_arguments_are_exit_2(argv, message, capsys):
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_zero_pairs_is_an_error(tmp_path, capsys):
    save(tmp_path / "hr" / "sub-01_T2w.nii.gz", head(np.random.default_rng(9)))
    (tmp_path / "sr").mkdir()
    assert main(["evaluate", "--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"),
                 "--out", str(tmp_path / "eval")]) == 2
    assert "no .nii/.nii.gz files under --sr" in capsys.readouterr().err


@pytest.mark.parametrize("foreign", ["notes.txt", "summary.json", "per_subject.csv"])
def test_foreign_files_in_out_are_refused_and_left_untouched(tmp_path, capsys, foreign):
    hr = head(np.random.default_rng(10))
    save(tmp_path / "hr" / "a.nii.gz", hr)
    save(tmp_path / "sr" / "a.nii.gz", noisy(hr, 3, 0))
    out = tmp_path / "eval"
    out.mkdir()
    (out / foreign).write_text("someone else's\n")
    rc = main(["evaluate", "--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"),
               "--out", str(out), "-q"])
    assert rc == 2
    assert "refusing to write there" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [foreign]
    assert (out / foreign).read_text() == "someone else's\n"


def test_library_refuses_an_out_dir_with_extra_files_beside_its_own(tmp_path):
    hr = head(np.random.default_rng(11))
    save(tmp_path / "hr" / "a.nii.gz", hr)
    save(tmp_path / "sr" / "a.nii.gz", hr)
    out = tmp_path / "eval"
    evaluate_volumes(tmp_path / "sr", tmp_path / "hr", out)
    (out / "my_plot.png").write_bytes(b"png")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="my_plot.png"):
        evaluate_volumes(tmp_path / "sr", tmp_path / "hr", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
