"""DICOM series in, NIfTI image out, for ``pgasr sr`` (a folder of one series' files).

The conversion is ``dicom2nifti`` (vendor-aware slice ordering, mosaic and multiframe
handling, orthogonality and slice-increment checks; reads with ``pydicom``), chosen over a
hand-written ImagePositionPatient/ImageOrientationPatient affine because those vendor cases
are where hand-written converters go wrong, and over SimpleITK because it hands back a
``nibabel`` image, the type the rest of ``pgasr`` uses. The image is returned in RAS+ storage
order (``nibabel.as_closest_canonical``) with its world affine; nothing is written to disk.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["dicom_files", "is_dicom_dir", "read_dicom_series", "series_digest"]

log = logging.getLogger(__name__)


def _is_dicom_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_files(path: str | Path) -> list[Path]:
    """The DICOM files (Part-10, ``DICM`` magic) directly inside ``path``, sorted."""
    p = Path(path)
    return sorted(f for f in p.iterdir() if f.is_file() and _is_dicom_file(f)) if p.is_dir() else []


def is_dicom_dir(path: str | Path) -> bool:
    return bool(dicom_files(path))


def series_digest(path: str | Path) -> str:
    """SHA-256 over the series' file names and contents (sidecar provenance)."""
    h = hashlib.sha256()
    for f in dicom_files(path):
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def read_dicom_series(path: str | Path, series_uid: str | None = None) -> nib.Nifti1Image:
    """Convert the single series in folder ``path`` (or the one with ``series_uid``).

    Raises:
        ValueError: no DICOM files, several series and none chosen, a non-image series, or a
            series ``dicom2nifti`` cannot convert (inconsistent slice spacing, missing slices,
            non-orthogonal geometry); the message says which.
    """
    import pydicom
    from dicom2nifti import convert_dicom
    from dicom2nifti.exceptions import ConversionError, ConversionValidationError

    files = dicom_files(path)
    if not files:
        raise ValueError(f"{path}: no DICOM files (Part-10, 'DICM' magic) in this folder")
    series: dict[str, list] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception as e:  # pydicom raises several types on corrupt files
            raise ValueError(f"{f}: not a readable DICOM file ({type(e).__name__}: {e})") from None
        series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append(ds)
    if series_uid is not None:
        if series_uid not in series:
            raise ValueError(f"{path}: no series {series_uid}; found {sorted(series)}")
        chosen = series[series_uid]
    elif len(series) > 1:
        raise ValueError(f"{path}: {len(series)} DICOM series in one folder "
                         f"({', '.join(sorted(series))}); put each series in its own folder")
    else:
        chosen = next(iter(series.values()))
    try:
        # dicom2nifti's own reorientation writes a file; nibabel's is done in memory
        res = convert_dicom.dicom_array_to_nifti(chosen, None, reorient_nifti=False)
    except (ConversionError, ConversionValidationError) as e:
        raise ValueError(f"{path}: cannot convert this DICOM series ({e})") from None
    img = nib.as_closest_canonical(res["NII"])
    data = np.asanyarray(img.dataobj)
    log.info("DICOM series %s: %d files -> %s volume", path, len(chosen), data.shape)
    return nib.Nifti1Image(data, img.affine)
