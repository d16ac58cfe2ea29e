"""Volume-level NIfTI helpers shared by ``pgasr degrade``, ``pgasr sr`` and Serve.

The in-plane grid of an axial volume (slices in the third array axis) changes by an SR
factor ``s`` while the world-space field of view stays fixed: voxel size scales by ``s`` and
the first voxel centre moves by half the difference of voxel sizes.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from pgasr.config import SCALES, DegradationConfig
from pgasr.data.degradation import degrade, slice_rng
from pgasr.data.ixi import image_to_bytes, read_nifti_file

__all__ = [
    "check_volume",
    "degrade_slices",
    "degrade_volume",
    "degrade_volume_file",
    "inplane_voxel_size",
    "resample_inplane",
    "rescale_affine",
    "volume_image",
]


def rescale_affine(affine: np.ndarray, factor: float) -> np.ndarray:
    """Affine of the in-plane grid whose voxels are ``factor`` times larger (factor < 1:
    smaller), covering the same field of view. Axis 2 (slices) is unchanged."""
    a = np.asarray(affine, dtype=np.float64).copy()
    shift = (factor - 1.0) / 2.0
    a[:3, 3] = a[:3, 3] + a[:3, :3] @ np.array([shift, shift, 0.0])
    a[:3, 0] *= factor
    a[:3, 1] *= factor
    return a


def inplane_voxel_size(affine: np.ndarray) -> tuple[float, float]:
    """In-plane voxel size (mm) of the first two array axes."""
    z = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :2], axis=0)
    return float(z[0]), float(z[1])


def inplane_grid(shape: tuple[int, ...], affine: np.ndarray, voxel_mm: float,
                 tol: float = 0.01) -> tuple[int, int] | None:
    """The in-plane shape :func:`resample_inplane` gives a volume of ``shape`` / ``affine``
    at ``voxel_mm`` (the field of view kept), or None when its spacing is already within
    ``tol`` (relative) of ``voxel_mm``: no resampling."""
    zooms = np.array(inplane_voxel_size(affine))
    if not np.isfinite(zooms).all() or (zooms <= 0).any():
        raise ValueError(f"affine has no usable in-plane voxel size: {zooms}")
    if np.all(np.abs(zooms / voxel_mm - 1) <= tol):
        return None
    ratio = voxel_mm / zooms  # > 1: coarser output
    return tuple(max(1, int(round(n / r))) for n, r in zip(shape[:2], ratio))


def resample_inplane(vol: np.ndarray, affine: np.ndarray, voxel_mm: float,
                     tol: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Resample the first two axes of ``vol`` (X, Y, Z) to ``voxel_mm`` voxels, same field of
    view; slices (axis 2) untouched. Cubic B-spline (``nibabel.processing.resample_from_to``)
    after a Gaussian anti-aliasing filter when the grid gets coarser; clipped to the input's
    range. Returns ``(volume, affine)``: the input itself when the spacing is already within
    ``tol`` (relative) of ``voxel_mm``."""
    import nibabel.processing
    from scipy.ndimage import gaussian_filter

    affine = np.asarray(affine, dtype=np.float64)
    shape = inplane_grid(vol.shape, affine, voxel_mm, tol)
    if shape is None:
        return vol, affine
    step = np.array([vol.shape[0] / shape[0], vol.shape[1] / shape[1]])  # exact FOV kept
    out_affine = affine.copy()
    out_affine[:3, 0] *= step[0]
    out_affine[:3, 1] *= step[1]
    out_affine[:3, 3] += affine[:3, :2] @ ((step - 1) / 2)
    src = np.asarray(vol, dtype=np.float32)
    sigma = [float(np.sqrt(max(s * s - 1, 0.0)) / 2) for s in step] + [0.0]
    if max(sigma) > 0:
        src = gaussian_filter(src, sigma, mode="nearest")
    img = nib.Nifti1Image(src, affine)
    res = nibabel.processing.resample_from_to(img, ((*shape, vol.shape[2]), out_affine),
                                               order=3, mode="nearest")
    data = np.clip(np.asarray(res.dataobj, dtype=np.float32), float(np.min(vol)),
                   float(np.max(vol)))
    return data, out_affine


def check_volume(data: np.ndarray, name: str = "volume", max_voxels: int | None = None) -> np.ndarray:
    """Validate an input volume and return it as float32 (X, Y, Z).

    Accepts 3-D, or 4-D with a singleton 4th axis. Raises ValueError with a reason for
    anything else: wrong dimensionality, empty, too large, NaN/inf voxels, constant volume.
    """
    arr = np.asanyarray(data)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D volume (X, Y, slices), got shape {arr.shape}")
    if arr.size == 0 or min(arr.shape) == 0:
        raise ValueError(f"{name}: empty volume, shape {arr.shape}")
    if max_voxels is not None and arr.size > max_voxels:
        raise ValueError(f"{name}: {arr.size} voxels exceeds the limit of {max_voxels}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name}: unsupported voxel type {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: volume contains NaN or inf voxels")
    if float(arr.max()) == float(arr.min()):
        raise ValueError(f"{name}: volume is constant (empty image)")
    return arr


def volume_image(data: np.ndarray, affine: np.ndarray, template: nib.Nifti1Image | None) -> nib.Nifti1Image:
    """A float32 NIfTI image with ``template``'s header fields, new shape/affine/zooms."""
    header = template.header.copy() if template is not None else None
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine, header)
    img.set_data_dtype(np.float32)
    img.header.set_slope_inter(1.0, 0.0)
    code_s = int(template.header["sform_code"]) if template is not None else 1
    code_q = int(template.header["qform_code"]) if template is not None else 1
    img.set_sform(affine, code=code_s or 1)
    img.set_qform(affine, code=code_q or 1)
    return img


def degrade_volume(
    img: nib.Nifti1Image, scale: int, cfg: DegradationConfig | None = None, seed: int = 0
) -> nib.Nifti1Image:
    """Degrade every axial slice (third array axis) of an HR volume into an LR volume."""
    if scale not in SCALES:
        raise ValueError(f"scale must be 2 or 4, got {scale}")
    vol = check_volume(img.dataobj, "input")
    x, y, z = vol.shape
    if x % scale or y % scale:
        raise ValueError(f"in-plane size {x}x{y} is not divisible by {scale}")
    return volume_image(degrade_slices(vol, scale, cfg, seed), rescale_affine(img.affine, scale), img)


def degrade_slices(vol: np.ndarray, scale: int, cfg: DegradationConfig | None = None,
                   seed: int = 0, subject: str = "volume") -> np.ndarray:
    """LR of every axial slice of an (X, Y, Z) volume, slice k seeded by (seed, subject, k,
    scale); returns (X / scale, Y / scale, Z) float32 in the volume's units. The degradation
    is equivariant under affine intensity maps, so the LR of a normalised volume is the
    normalised LR."""
    x, y, z = vol.shape
    out = np.empty((x // scale, y // scale, z), dtype=np.float32)
    for k in range(z):
        out[:, :, k] = degrade(vol[:, :, k], scale, slice_rng(seed, subject, k, scale), cfg)
    return out


def degrade_volume_file(
    src: str | Path, dst: str | Path, scale: int, cfg: DegradationConfig | None = None, seed: int = 0
) -> None:
    img = read_nifti_file(src)
    out = degrade_volume(img, scale, cfg, seed)
    write_nifti(out, dst)


def write_nifti(img: nib.Nifti1Image, dst: str | Path) -> None:
    """Write ``.nii``/``.nii.gz`` atomically (unique temp file + fsync + rename)."""
    from pgasr.provenance import atomic_write_bytes

    dst = Path(dst)
    if not (dst.name.endswith(".nii") or dst.name.endswith(".nii.gz")):
        raise ValueError(f"{dst}: output must end in .nii or .nii.gz")
    atomic_write_bytes(dst, image_to_bytes(img, gz=dst.name.endswith(".gz")))
