import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pgasr.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "pgasr.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("synth", "prepare", "degrade"):
        assert cmd in r.stdout


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"pgasr {version('pgasr')}"


@pytest.mark.parametrize("cmd", ["synth", "prepare", "degrade"])
def test_subcommand_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "usage" in r.stdout


def test_clear_errors_no_traceback(tmp_path, capsys):
    assert main(["degrade", "--input", str(tmp_path / "missing.nii.gz"), "--output",
                 str(tmp_path / "o.nii.gz"), "--scale", "2"]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err
    txt = tmp_path / "x.txt"
    txt.write_text("hello")
    assert main(["degrade", "--input", str(txt), "--output", str(tmp_path / "o.nii.gz"),
                 "--scale", "2"]) == 2
    assert ".nii" in capsys.readouterr().err
    vol = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(16, 16, 4).astype(np.float32), np.eye(4)), vol)
    assert main(["degrade", "--input", str(vol), "--output", str(tmp_path / "o.nii.gz"),
                 "--scale", "3"]) == 2
    assert "2 or 4" in capsys.readouterr().err
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(16, 16).astype(np.float32), np.eye(4)), flat)
    assert main(["degrade", "--input", str(flat), "--output", str(tmp_path / "o.nii.gz"),
                 "--scale", "2"]) == 2
    assert "3-D" in capsys.readouterr().err
    assert main(["prepare", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_degrade_volume_affine(tmp_path):
    vol = tmp_path / "v.nii.gz"
    aff = np.array([[1.0, 0, 0, -10], [0, 1.0, 0, -20], [0, 0, 2.0, 5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.random.rand(16, 16, 4).astype(np.float32) + 1, aff), vol)
    out = tmp_path / "lr.nii.gz"
    assert main(["degrade", "--input", str(vol), "--output", str(out), "--scale", "2"]) == 0
    img = nib.load(out)
    assert img.shape == (8, 8, 4)
    np.testing.assert_allclose(img.header.get_zooms(), (2, 2, 2))
    # field of view unchanged: the LR voxel 0 centre sits between HR voxels 0 and 1
    np.testing.assert_allclose(img.affine[:3, 3], [-9.5, -19.5, 5])


def test_prepare_refuses_a_foreign_out_dir_with_exit_2(tmp_path, capsys):
    """`pgasr prepare --out DIR --force` on the user's own directory: a one-line error, exit
    status 2, and every file still there (issue #17)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_prepare import _write_cohort

    src = _write_cohort(tmp_path / "ixi")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    sets = ["data.size=32", "data.slices_per_volume=8", "data.train_subjects=3",
            "data.val_subjects=1", "data.test_subjects=2"]
    rc = main(["prepare", "--source", str(src), "--out", str(out), "--force", "-q",
               *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert rc == 2
    assert "pgasr prepare: error:" in err and "did not write" in err and "Traceback" not in err
    assert (out / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"]
