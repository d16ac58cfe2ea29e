"""Reading NIfTI volumes (bytes or files) with clear errors, and IXI file names.

IXI file names look like ``IXI002-Guys-0828-T2.nii.gz``; the subject id is ``IXI002``.
Finding a cohort's files (IXI, BIDS, folders, lists) is :mod:`pgasr.data.sources`.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "IXI_T2_PATTERN",
    "canonical",
    "load_nifti_bytes",
    "subject_id",
]

IXI_T2_PATTERN = re.compile(r"^(IXI\d+)-([A-Za-z]+)-(\d+)-T2\.nii(\.gz)?$")
_GZIP_MAGIC = b"\x1f\x8b"


def subject_id(name: str) -> str | None:
    """``IXI002`` for ``IXI002-Guys-0828-T2.nii.gz``; None when the name is not an IXI T2 file."""
    m = IXI_T2_PATTERN.match(Path(name).name)
    return m.group(1) if m else None


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

