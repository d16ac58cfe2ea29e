"""Run provenance: git sha, package versions, hashes — written beside every output."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import shutil
import tempfile
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

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


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file + rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(new: str | Path, out: str | Path) -> None:
    """Put directory ``new`` at ``out``: an existing ``out`` is moved aside first and removed
    only after the rename, so a crash never leaves ``out`` missing or half-written."""
    new, out = Path(new), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
