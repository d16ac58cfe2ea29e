"""Reading IXI-style T2 NIfTI volumes from a directory or straight from the IXI-T2 tar.

IXI file names look like ``IXI002-Guys-0828-T2.nii.gz``; the subject id is ``IXI002``.
Files that are not T2 are ignored; files that cannot be read are reported, never fatal.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "IXI_T2_PATTERN",
    "VolumeSource",
    "canonical",
    "iter_sources",
    "load_nifti_bytes",
    "subject_id",
]

IXI_T2_PATTERN = re.compile(r"^(IXI\d+)-([A-Za-z]+)-(\d+)-T2\.nii(\.gz)?$")
_GZIP_MAGIC = b"\x1f\x8b"


def subject_id(name: str) -> str | None:
    """``IXI002`` for ``IXI002-Guys-0828-T2.nii.gz``; None when the name is not an IXI T2 file."""
    m = IXI_T2_PATTERN.match(Path(name).name)
    return m.group(1) if m else None


@dataclass
class VolumeSource:
    """One T2 file found in the input: where it came from and a way to read its bytes."""

    subject: str
    name: str  # file name (or tar member name)
    origin: str  # directory path or tar path
    _data: bytes | None = None
    _path: Path | None = None

    def read_bytes(self) -> bytes:
        if self._data is not None:
            return self._data
        assert self._path is not None
        return self._path.read_bytes()


def load_nifti_bytes(data: bytes, name: str = "<bytes>") -> nib.Nifti1Image:
    """Parse NIfTI-1 bytes (gzipped or not) into an image with its data loaded.

    Ray Data and some HTTP clients hand over already-decompressed ``.nii.gz`` content, so the
    gzip magic is checked rather than trusted from the name.

    Raises:
        ValueError: the bytes are not a readable NIfTI-1 image (message names ``name``).
    """
    if len(data) == 0:
        raise ValueError(f"{name}: empty file")
    try:
        if data[:2] == _GZIP_MAGIC:
            data = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise ValueError(f"{name}: corrupt or truncated gzip data ({e})") from None
    if len(data) < 348:
        raise ValueError(f"{name}: too short to be a NIfTI-1 file ({len(data)} bytes)")
    try:
        img = nib.Nifti1Image.from_bytes(data)
        arr = np.asanyarray(img.dataobj)
        out = nib.Nifti1Image(arr, img.affine, img.header)
    except Exception as e:  # nibabel raises a zoo of types on malformed headers
        raise ValueError(f"{name}: not a readable NIfTI-1 image ({type(e).__name__}: {e})") from None
    if out.affine is None or not np.isfinite(out.affine).all():
        raise ValueError(f"{name}: header affine is missing or not finite")
    return out


def canonical(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Reorient to canonical RAS+ and return (float32 volume (X, Y, Z), affine).

    Axial slices are then ``volume[:, :, k]``.
    """
    can = nib.as_closest_canonical(img)
    vol = np.asarray(can.dataobj, dtype=np.float32)
    if vol.ndim == 4 and vol.shape[3] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {vol.shape}")
    return vol, can.affine


def _iter_dir(root: Path) -> Iterator[VolumeSource]:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            sid = subject_id(p.name)
            if sid:
                yield VolumeSource(sid, p.name, str(root), _path=p)


def _iter_tar(path: Path) -> Iterator[VolumeSource]:
    # Streamed: members are read one by one, never the whole archive extracted.
    with tarfile.open(path, mode="r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            sid = subject_id(member.name)
            if not sid:
                continue
            f = tf.extractfile(member)
            if f is None:
                continue
            yield VolumeSource(sid, Path(member.name).name, str(path), _data=f.read())


def iter_sources(source: str | Path) -> Iterator[VolumeSource]:
    """Yield IXI T2 files from a directory (recursively) or a ``.tar``/``.tar.gz`` archive.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` is a file that is not a tar archive.
    """
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"IXI source not found: {p}")
    if p.is_dir():
        yield from _iter_dir(p)
    elif tarfile.is_tarfile(p):
        yield from _iter_tar(p)
    else:
        raise ValueError(f"IXI source must be a directory or a .tar archive: {p}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_nifti_file(path: str | Path) -> nib.Nifti1Image:
    """Read a ``.nii``/``.nii.gz`` file with a clear error for every failure mode."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    if not (p.name.endswith(".nii") or p.name.endswith(".nii.gz")):
        raise ValueError(f"{p}: expected a .nii or .nii.gz file")
    return load_nifti_bytes(p.read_bytes(), str(p))


def image_to_bytes(img: nib.Nifti1Image, gz: bool = True) -> bytes:
    """Serialise a NIfTI image (gzipped when ``gz``) without touching the filesystem."""
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw

