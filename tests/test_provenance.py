"""Owned-directory replacement, fsync and atomic writes (``pgasr.provenance``, issue #17)."""

import json
import os
import sys

import pytest

from pgasr.provenance import atomic_write_text, replace_dir

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="maps fsync'ed fds to paths through /proc/self/fd")


def _io_log(monkeypatch) -> list[tuple[str, str]]:
    """Record ("fsync", path) for every os.fsync and ("replace", dst) for every os.replace."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _prepared_like(d, tag="new"):
    (d / "train").mkdir(parents=True)
    (d / "train" / "part-00000.parquet").write_text(tag)
    (d / "manifest.json").write_text(json.dumps({"fingerprint": tag}))
    return d


@linux_only
def test_atomic_write_text_fsyncs_before_replace(tmp_path, monkeypatch):
    events = _io_log(monkeypatch)
    target = tmp_path.resolve() / "x.json"
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}"
    first_replace = events.index(("replace", str(target)))
    assert any(kind == "fsync" and os.path.basename(p).startswith(".x.json.")
               for kind, p in events[:first_replace]), events


def test_replace_dir_refuses_what_pgasr_did_not_write(tmp_path):
    from pgasr.provenance import PREPARED_MARKER, ForeignDirectoryError

    assert issubclass(ForeignDirectoryError, ValueError)
    new = _prepared_like(tmp_path / "new")
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    with pytest.raises(ForeignDirectoryError, match="did not write"):
        replace_dir(new, out, PREPARED_MARKER)
    # another tool's manifest.json is no marker
    (out / "manifest.json").write_text(json.dumps({"name": "my web app"}))
    with pytest.raises(ForeignDirectoryError, match="did not write"):
        replace_dir(new, out, PREPARED_MARKER)
    assert (out / "thesis.txt").read_text() == "years of work"
    f = tmp_path / "file.txt"
    f.write_text("mine")
    with pytest.raises(ForeignDirectoryError, match="not a directory"):
        replace_dir(new, f, PREPARED_MARKER)
    assert f.read_text() == "mine" and (new / "manifest.json").is_file()


@linux_only
def test_replace_dir_replaces_own_and_empty_dirs_durably(tmp_path, monkeypatch):
    from pgasr.provenance import PREPARED_MARKER

    tmp_path = tmp_path.resolve()  # fsync'ed paths are read back from /proc as real paths
    parent = tmp_path / "p"
    old = _prepared_like(parent / "out", "old")
    events = _io_log(monkeypatch)
    new = _prepared_like(parent / "new", "new")
    replace_dir(new, old, PREPARED_MARKER)
    assert (old / "train" / "part-00000.parquet").read_text() == "new"
    assert sorted(p.name for p in parent.iterdir()) == ["out"]  # nothing left aside
    # every file and directory of the new tree reached the disk before it was renamed in
    rename_in = events.index(("replace", str(old)))
    synced = {p for kind, p in events[:rename_in] if kind == "fsync"}
    assert {str(new / "manifest.json"), str(new / "train" / "part-00000.parquet"),
            str(new / "train"), str(new)} <= synced
    assert ("fsync", str(parent)) in events[rename_in:]
    # an empty existing directory may be used; a symlinked target is replaced where it points
    empty = tmp_path / "empty"
    empty.mkdir()
    replace_dir(_prepared_like(tmp_path / "n2"), empty, PREPARED_MARKER)
    assert (empty / "manifest.json").is_file()
    link = tmp_path / "link"
    link.symlink_to(empty)
    replace_dir(_prepared_like(tmp_path / "n3", "linked"), link, PREPARED_MARKER)
    assert link.is_symlink() and json.loads((empty / "manifest.json").read_text()) == {
        "fingerprint": "linked"}


def test_temp_dirs_are_unique_and_beside_the_target(tmp_path):
    from pgasr.provenance import temp_dir_for

    a, b = temp_dir_for(tmp_path / "out"), temp_dir_for(tmp_path / "out")
    assert a != b and a.parent == b.parent == tmp_path.resolve()
    assert a.name.startswith(".out.tmp-") and not any(a.iterdir())


@linux_only
def test_write_nifti_is_atomic_and_fsynced(tmp_path, monkeypatch):
    """SR outputs (pgasr sr, pgasr degrade, the client) go through a unique temp + fsync +
    rename: a failed write leaves the previous file, never half a NIfTI or a stray temp."""
    import nibabel as nib
    import numpy as np

    from pgasr import volume

    target = tmp_path.resolve() / "sr.nii.gz"
    img = nib.Nifti1Image(np.ones((4, 4, 2), np.float32), np.eye(4))
    events = _io_log(monkeypatch)
    volume.write_nifti(img, target)
    first_replace = events.index(("replace", str(target)))
    assert any(kind == "fsync" and os.path.basename(p).startswith(".sr.nii.gz.")
               for kind, p in events[:first_replace]), events
    before = target.read_bytes()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(volume, "image_to_bytes", lambda *a, **k: b"x" * 10)
    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        volume.write_nifti(img, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sr.nii.gz"]
