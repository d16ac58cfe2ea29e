"""Run provenance: git sha, package versions, hashes — written beside every output."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PACKAGES = (
    "pgasr", "torch", "torchvision", "numpy", "ray", "nibabel", "pyarrow", "scikit-image",
    "segment-anything", "lpips", "nilearn",
)


def git_sha(root: str | Path | None = None) -> str | None:
    """The repository's HEAD sha (with ``-dirty`` when there are local changes), or None."""
    root = Path(root or Path(__file__).resolve().parent.parent)
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def provenance() -> dict:
    return {"git_sha": git_sha(), "versions": package_versions(), "host": platform.node()}


def _fsync_path(path: Path) -> None:
    """Flush one file's or directory's data and metadata to disk (directories: where the OS
    allows opening them; Windows does not)."""
    is_dir = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        if not is_dir:
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every regular file under ``root`` to disk, then every directory (deepest first,
    ``root`` last), so a rename of ``root`` that follows publishes complete contents."""
    root = Path(root)
    dirs = []
    for d, _, files in os.walk(root):
        dirs.append(Path(d))
        for name in files:
            p = Path(d) / name
            if p.is_file() and not p.is_symlink():
                _fsync_path(p)
    for d in reversed(dirs):
        _fsync_path(d)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a unique temp file + fsync + rename: readers never
    see half a file, two writers never share a temp file, and after a crash the path holds
    either the old or the new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 ``text``."""
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- owned directories


class ForeignDirectoryError(ValueError):
    """The output path holds something PGASR did not write (no marker): it is never replaced
    or deleted, whatever ``--force`` says."""


@dataclass(frozen=True)
class Marker:
    """How PGASR recognises an output directory it wrote itself.

    The directory must hold ``file``, a JSON object with top-level ``key`` (whose value starts
    with ``prefix`` when one is given). A bare file name is not enough: ``manifest.json`` and
    ``meta.json`` are common names in other tools' directories.
    """

    file: str
    key: str
    kind: str
    prefix: str | None = None

    def present(self, directory: Path) -> bool:
        """Whether ``directory`` carries this marker."""
        p = directory / self.file
        if not p.is_file() or p.is_symlink():
            return False
        try:
            doc = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        if not isinstance(doc, dict) or self.key not in doc:
            return False
        return self.prefix is None or str(doc[self.key]).startswith(self.prefix)


# The marker of each kind of output PGASR replaces as a whole (each written by its producer):
# prepared data (pgasr.data.prepare), prior shards (jobs/priors.py, pgasr.report.compute_priors)
# and checkpoints (pgasr.checkpoint; also run_stage's and the sweep's exported copies).
PREPARED_MARKER = Marker("manifest.json", "fingerprint", "prepared data directory")
PRIORS_MARKER = Marker("priors.json", "prior", "prior shards directory")
CHECKPOINT_MARKER = Marker("meta.json", "format", "PGASR checkpoint", prefix="pgasr-checkpoint/")
EVAL_MARKER = Marker("metrics.json", "summary", "evaluation directory")  # pgasr.evaluate


def check_replaceable(out: str | Path, marker: Marker) -> None:
    """Succeed when ``out`` may be replaced by a new ``marker.kind``: it does not exist, is an
    empty directory, or is a directory carrying ``marker``.

    Raises:
        ForeignDirectoryError: ``out`` is a file, or a non-empty directory without the marker.
    """
    out = Path(out).resolve()
    if not out.exists():
        return
    if not out.is_dir():
        raise ForeignDirectoryError(
            f"{out} exists and is not a directory; refusing to replace it with a "
            f"{marker.kind} (choose another output path)")
    if marker.present(out) or not any(out.iterdir()):
        return
    raise ForeignDirectoryError(
        f"{out} is a non-empty directory that PGASR did not write (no {marker.file} marking a "
        f"{marker.kind}); refusing to replace or delete it, --force or not. Choose another "
        "output path, or empty that directory yourself")


def temp_dir_for(out: str | Path) -> Path:
    """A new, uniquely named, empty directory beside ``out`` (in the parent of the path that
    ``out`` resolves to, so renaming it onto ``out`` stays on one filesystem). Concurrent
    writers of the same ``out`` each get their own; nobody deletes another's."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))


def replace_dir(new: str | Path, out: str | Path, marker: Marker) -> None:
    """Put directory ``new`` at ``out``, durably, replacing only what PGASR wrote itself.

    ``out`` must pass :func:`check_replaceable` (absent, empty, or carrying ``marker``). The
    contents of ``new`` are fsync'ed; an existing ``out`` is renamed aside, ``new`` renamed in,
    the parent fsync'ed, and only then is the old copy removed — re-checked for the marker
    after the move, so nothing that appeared there meanwhile is deleted. ``out`` never holds a
    half-written directory; a crash between the two renames (a moment POSIX ``rename`` cannot
    avoid) leaves the old copy intact at ``.NAME.old-*/old`` beside it. ``out`` is resolved
    first: a symlink keeps pointing at the replaced directory.

    Raises:
        ForeignDirectoryError: ``out`` holds something else (nothing is moved or deleted).
    """
    new, out = Path(new), Path(out).resolve()
    check_replaceable(out, marker)
    fsync_tree(new)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-")) / "old"
        os.replace(out, old)
    os.replace(new, out)
    _fsync_path(out.parent)
    if old is not None:
        _remove_replaced(old, marker)


def _remove_replaced(old: Path, marker: Marker) -> None:
    """Delete the copy ``replace_dir`` moved aside (and its holder), if it is still ours."""
    if marker.present(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            old.rmdir()
        except OSError:
            log.warning("kept %s: it changed while being replaced and is not a %s", old,
                        marker.kind)
            return
    try:
        old.parent.rmdir()
    except OSError:
        pass
