"""Embedded synthetic IXI-like T2 cohort, built offline from the MNI152 2009 template.

IXI cannot be downloaded here, but the ``nilearn`` wheel ships the ICBM152 2009 (nlin sym)
template at 1 mm: a skull-stripped T1 and grey-/white-matter probability maps. From them we
build a T2-weighted head and, per subject, deform and corrupt it so that subjects differ the
way real scans do. ``docs/data_synth.md`` describes the model and its limits.

Pipeline, per subject (everything seeded by ``(cfg.seed, index)``):

1. **Tissue model (template space).** Brain = T1 > 0; inside it GM/WM come from the
   probability maps (sharpened, since a 152-subject average is blurrier than one brain) and
   CSF is the remainder. An intracranial envelope (smoothed, hole-filled brain mask) adds the
   subarachnoid CSF and fissures; outside it a layered head is built from the signed
   distance to the envelope: inner table, diploic marrow, outer table, galea/muscle,
   subcutaneous fat, skin, air. A fixed, smooth micro-texture modulates all tissue.
2. **Contrast.** T2-weighted fast spin echo values on the IXI int16 scale: CSF ≫ fat > GM >
   WM > muscle ≫ bone ≈ air. Each subject draws its own tissue values and global gain.
3. **Anatomy variation.** Atrophy (age): sulcal widening (tissue fractions raised to a power,
   so partial-volume sulci turn to CSF), a wider subarachnoid space, and ventricular
   enlargement (a smooth radial expansion around the lateral ventricles).
4. **Pose and shape.** Random rotation, anisotropic scaling, translation, plus a smooth
   elastic displacement (Gaussian radial-basis field, a few mm) — resampled once with
   trilinear interpolation (:func:`scipy.ndimage.map_coordinates`, ``order=1``) from a
   template level whose voxel size matches the output spacing (block averages, so small
   outputs are partial-volumed rather than aliased).
5. **Acquisition.** Smooth multiplicative bias field, Rician noise (magnitude of a complex
   signal with Gaussian noise in both channels, so the air shows the Rayleigh noise floor),
   rounding to integers as in IXI's int16 files.

The output grid is ``size × size × slices`` in RAS+ order (axial slices are
``volume[:, :, k]``) with voxel size ``FOV_MM / size`` in-plane and ``SLAB_MM / slices``
through-plane, so the head stays head-sized whatever the matrix (0.94 × 0.94 × 1.3 mm at the
default 256 × 256 × 120, like IXI's 0.94 × 0.94 × 1.2 mm).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from pgasr.config import SynthConfig

__all__ = [
    "FOV_MM",
    "GENERATOR_VERSION",
    "LABELS",
    "MANIFEST_NAME",
    "SLAB_MM",
    "T2_VALUES",
    "preview",
    "subject_filename",
    "synthesize_cohort",
    "synthesize_subject",
    "voxel_size",
]

log = logging.getLogger(__name__)

#: Bump whenever the generated data change for the same config: cached cohorts regenerate.
GENERATOR_VERSION = 1
#: In-plane field of view (mm). IXI T2: 256 × 0.9375 mm = 240 mm.
FOV_MM = 240.0
#: Through-plane coverage (mm) of the axial slab, vertex to lower cerebellum.
SLAB_MM = 156.0
#: MNI point placed at the centre of the field of view (mm).
_HEAD_CENTER_MNI = np.array([0.0, -17.0, 12.0])
#: Lateral-ventricle centre and Gaussian radii (MNI mm) for the atrophy expansion.
_VENTRICLE_CENTER_MNI = np.array([0.0, -10.0, 14.0])
_VENTRICLE_SIGMA_MM = np.array([16.0, 28.0, 14.0])

#: Label ids of ``synthesize_subject(..., return_labels=True)``.
LABELS: dict[int, str] = {
    0: "background",
    1: "csf",
    2: "gm",
    3: "wm",
    4: "bone",
    5: "soft_tissue",
    6: "fat",
}

#: Mean T2-weighted (FSE, TE ~100 ms) values on the IXI int16 scale; subjects vary around them.
T2_VALUES: dict[str, float] = {
    "csf": 1250.0,
    "gm": 620.0,
    "wm": 410.0,
    "fat": 880.0,
    "marrow": 650.0,
    "soft_tissue": 330.0,
    "skin": 460.0,
    "bone": 35.0,
}

MANIFEST_NAME = "synth.json"
_NAME_RE = re.compile(r"^IXI\d+-Synth-\d{4,}-T2\.nii\.gz$")
_PART_PREFIX = ".synth-"
_PART_SUFFIX = ".part"
_TEXTURE_SEED = 20240917  # the micro-texture is anatomy, shared by all cohorts


# --------------------------------------------------------------------------- naming / grid


def subject_filename(index: int) -> str:
    """IXI-style file name of subject ``index`` (0-based): ``IXI901-Synth-0001-T2.nii.gz``.

    Ids start at IXI901, above the real IXI range (IXI002-IXI662), so a synthetic subject can
    never be mistaken for, or collide with, a real one.
    """
    if index < 0:
        raise ValueError(f"subject index must be >= 0, got {index}")
    return f"IXI{901 + index}-Synth-{index + 1:04d}-T2.nii.gz"


def voxel_size(cfg: SynthConfig) -> tuple[float, float, float]:
    """Voxel size (mm) of the output grid: ``(FOV/size, FOV/size, SLAB/slices)``."""
    return (FOV_MM / cfg.size, FOV_MM / cfg.size, SLAB_MM / cfg.slices)


def _output_affine(cfg: SynthConfig) -> np.ndarray:
    """RAS+ voxel-to-world affine; the volume centre is the world origin."""
    spacing = np.array(voxel_size(cfg))
    shape = np.array([cfg.size, cfg.size, cfg.slices])
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -spacing * (shape - 1) / 2.0
    return aff


def _check_cfg(cfg: SynthConfig) -> None:
    if not isinstance(cfg, SynthConfig):
        raise TypeError(
            f"expected a SynthConfig, got {type(cfg).__name__} "
            "(the signature is synthesize_subject(index, cfg))"
        )
    if not isinstance(cfg.size, int) or cfg.size < 16:
        raise ValueError(f"synth.size must be an integer >= 16, got {cfg.size!r}")
    if not isinstance(cfg.slices, int) or cfg.slices < 1:
        raise ValueError(f"synth.slices must be an integer >= 1, got {cfg.slices!r}")
    if not isinstance(cfg.subjects, int) or cfg.subjects < 0:
        raise ValueError(f"synth.subjects must be an integer >= 0, got {cfg.subjects!r}")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"synth.seed must be an integer >= 0, got {cfg.seed!r}")


# --------------------------------------------------------------------------- template


_MNI152_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@functools.lru_cache(maxsize=1)
def _load_mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(t1, gm, wm, affine): the ICBM152 2009 1 mm maps nilearn ships, as uint8 (0..255).

    Read straight from the wheel's data directory, located without importing
    ``nilearn.datasets`` (which pulls in pandas/sklearn, seconds of import time); nilearn's
    own loaders are the fallback should the files ever move. No network either way.
    """
    import importlib.util

    imgs: dict[str, Any] = {}
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the synthetic cohort needs nilearn (it ships the MNI152 template)")
    root = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    if all((root / n).is_file() for n in _MNI152_FILES.values()):
        imgs = {k: nib.load(str(root / n)) for k, n in _MNI152_FILES.items()}
    else:
        from nilearn import datasets

        imgs = {
            "t1": datasets.load_mni152_template(resolution=1),
            "gm": datasets.load_mni152_gm_template(resolution=1),
            "wm": datasets.load_mni152_wm_template(resolution=1),
        }
    out = []
    for key in ("t1", "gm", "wm"):
        img = nib.as_closest_canonical(imgs[key])
        arr = np.asarray(img.dataobj)
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float32)
            hi = float(arr.max())
            if not hi > 0:
                raise RuntimeError(f"MNI152 {key} map is empty")
            arr = np.round(np.clip(arr / hi, 0, 1) * 255).astype(np.uint8)
        out.append(arr)
    affine = nib.as_closest_canonical(imgs["t1"]).affine
    if out[0].shape != out[1].shape or out[0].shape != out[2].shape:
        raise RuntimeError("MNI152 T1/GM/WM maps have different shapes")
    if not np.allclose(np.abs(np.diag(affine)[:3]), 1.0):
        raise RuntimeError(f"expected the 1 mm MNI152 template, got affine\n{affine}")
    return out[0], out[1], out[2], affine


def _block_mean(arr: np.ndarray, f: int) -> np.ndarray:
    """Average ``f``³ blocks (edge-padded to a multiple of ``f``)."""
    if f == 1:
        return arr
    pad = [(0, (-s) % f) for s in arr.shape]
    a = np.pad(arr, pad, mode="edge")
    x, y, z = (s // f for s in a.shape)
    return a.reshape(x, f, y, f, z, f).mean(axis=(1, 3, 5), dtype=np.float32)


def _level_affine(affine: np.ndarray, f: int) -> np.ndarray:
    """Affine of the ``f``-times block-averaged grid (voxel centres move to block centres)."""
    scale = np.diag([f, f, f, 1.0])
    scale[:3, 3] = (f - 1) / 2.0
    return affine @ scale


def _resample_axes(arr: np.ndarray, axes: list[np.ndarray]) -> np.ndarray:
    """Linear interpolation of ``arr`` at the separable grid ``axes`` (voxel coordinates of
    ``arr`` along each axis, clamped to its edges), one axis at a time: an axis-aligned
    regrid without a full coordinate array."""
    out = arr
    for a, x in enumerate(axes):
        n = out.shape[a]
        x = np.clip(x, 0, n - 1)
        i0 = np.minimum(np.floor(x).astype(np.intp), max(n - 2, 0))
        w = (x - i0).astype(np.float32)
        shape = [1, 1, 1]
        shape[a] = -1
        w = w.reshape(shape)
        lo = np.take(out, i0, axis=a)
        hi = np.take(out, np.minimum(i0 + 1, n - 1), axis=a)
        out = lo + w * (hi - lo)
    return out.astype(np.float32, copy=False)


@dataclass(frozen=True)
class _Template:
    """Subject-independent maps on one template level (isotropic ``spacing`` mm voxels)."""

    gm: np.ndarray  # (I, J, K) float32 fraction of the voxel that is grey matter
    wm: np.ndarray  # (I, J, K) float32 white-matter fraction
    dist: np.ndarray  # (I, J, K) float32 signed mm to the inner skull surface, > 0 outside
    dist_ic: np.ndarray  # (I, J, K) float32 signed mm to the CSF/brain space, > 0 outside
    texture: np.ndarray  # (I, J, K) float32, smooth, zero mean, unit std
    affine: np.ndarray  # (4, 4) voxel -> MNI mm
    spacing: float


@functools.lru_cache(maxsize=2)
def _template(level: int) -> _Template:
    """Template maps block-averaged ``level`` times (1 -> 1 mm), cropped to the head."""
    t1, gm8, wm8, affine = _load_mni152()
    brain1 = t1 > 0
    inv255 = np.float32(1.0 / 255.0)
    brain = _block_mean(brain1.astype(np.float32), level)  # brain fraction of each voxel
    gm = _block_mean(np.where(brain1, gm8 * inv255, np.float32(0)), level)
    wm = _block_mean(np.where(brain1, wm8 * inv255, np.float32(0)), level)
    # Fractions of the brain part of each voxel; CSF is what GM and WM leave.
    has = brain > 0
    g = np.divide(gm, brain, out=np.zeros_like(gm), where=has)
    w = np.divide(wm, brain, out=np.zeros_like(wm), where=has)
    tissue = g + w
    over = tissue > 1.0
    g[over] /= tissue[over]
    w[over] /= tissue[over]
    c = np.clip(1.0 - g - w, 0.0, 1.0)
    # The template is a 152-subject average: square-and-renormalise the class fractions to
    # give one brain's crisper cortical ribbon and GM/WM boundary.
    g *= g
    w *= w
    norm = c * c + g + w
    norm[norm == 0] = 1.0
    gm = (g / norm * brain).astype(np.float32)
    wm = (w / norm * brain).astype(np.float32)
    del g, w, c, norm, tissue, over, has

    # Envelopes at 2 mm. ``env``: the smoothed, hole-filled brain, i.e. the inner surface of
    # the skull vault; scalp layers follow it. ``ic``: the part of ``env`` within 2.5 mm of
    # brain, i.e. the CSF spaces (subarachnoid, fissures, cisterns). Where ``env`` bridges
    # deep concavities of the skull base (between temporal lobes and cerebellum, under the
    # frontal lobes) the gap is bone, not a lake of CSF.
    fe = max(level, 2)
    brain_e = brain if fe == level else _block_mean(brain1.astype(np.float32), fe)
    env = ndi.gaussian_filter(brain_e, sigma=4.0 / fe) > 0.4
    env = ndi.binary_fill_holes(ndi.binary_closing(env, iterations=2))
    near = ndi.distance_transform_edt(brain_e < 0.5) * fe <= 2.5
    ic = ndi.binary_fill_holes(env & near)
    aff_e = _level_affine(affine, fe)
    # Scalp and skull thickness vary over the head (temporalis, occipital protuberance...):
    # distances outside the skull are stretched by a smooth field, +-18 % (1 sd).
    rng = np.random.default_rng(_TEXTURE_SEED)
    lowfreq = ndi.gaussian_filter(rng.standard_normal(env.shape), sigma=14.0 / fe)
    lowfreq = (1.0 + 0.18 * lowfreq / lowfreq.std()).clip(0.6, 1.4)

    aff = _level_affine(affine, level)
    # Resample the envelope distances onto this level's grid (both are axis-aligned).
    m = np.linalg.inv(aff_e) @ aff
    axes = [m[a, a] * np.arange(gm.shape[a]) + m[a, 3] for a in range(3)]
    dists = []
    for mask in (env, ic):
        signed = ndi.distance_transform_edt(~mask) - ndi.distance_transform_edt(mask)
        if mask is env:
            signed = np.where(signed > 0, signed / lowfreq, signed)
        dists.append(_resample_axes(signed.astype(np.float32) * fe, axes))
    dist, dist_ic = dists
    del dists, env, ic, near, brain_e, lowfreq

    # Crop to the head (everything farther than 30 mm from the skull is air).
    keep = np.argwhere(dist < 30.0)
    lo, hi = keep.min(axis=0), keep.max(axis=0) + 1
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    gm, wm = gm[sl].copy(), wm[sl].copy()
    dist, dist_ic = dist[sl].copy(), dist_ic[sl].copy()
    aff = aff.copy()
    aff[:3, 3] += aff[:3, :3] @ lo

    rng = np.random.default_rng(_TEXTURE_SEED + level)
    tex = ndi.gaussian_filter(rng.standard_normal(gm.shape, dtype=np.float32), sigma=1.0)
    tex /= tex.std()
    return _Template(gm=gm, wm=wm, dist=dist, dist_ic=dist_ic, texture=tex, affine=aff,
                     spacing=float(level))


# --------------------------------------------------------------------------- subject model


@dataclass(frozen=True)
class _Subject:
    """Per-subject random parameters, drawn in a fixed order from one generator."""

    values: dict[str, float]  # tissue T2 values, gain included
    texture_amp: float
    atrophy: float  # 0 (young) .. 1 (old)
    rotation: np.ndarray  # (3, 3) world -> MNI rotation
    scale: np.ndarray  # (3,) head size relative to the template, per axis
    shift_mm: np.ndarray  # (3,)
    elastic_mm: float  # RMS elastic displacement
    elastic_spacing_mm: float
    bias_amp: float  # RMS of the log bias field
    noise_sigma: float  # Rician sigma, IXI units
    scalp: float  # scalp thickness factor
    diploe: float  # diploic marrow thickness factor


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = (math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry),
                              math.cos(rz), math.sin(rz))
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return r_z @ r_y @ r_x


def _draw_subject(rng: np.random.Generator) -> _Subject:
    gain = rng.uniform(0.85, 1.15)
    jitter = {k: rng.uniform(0.92, 1.08) for k in T2_VALUES}
    values = {k: T2_VALUES[k] * jitter[k] * gain for k in T2_VALUES}
    atrophy = float(rng.beta(1.3, 2.0))
    deg = math.pi / 180.0
    rot = _rotation(rng.uniform(-8, 8) * deg,  # pitch (nodding) varies most between scans
                    rng.uniform(-3, 3) * deg,  # roll
                    rng.uniform(-5, 5) * deg)  # yaw (in-plane)
    scale = rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, size=3)
    shift = rng.uniform(-1, 1, size=3) * np.array([5.0, 7.0, 4.0])
    return _Subject(
        values=values,
        texture_amp=float(rng.uniform(0.035, 0.06)),
        atrophy=atrophy,
        rotation=rot,
        scale=scale,
        shift_mm=shift,
        elastic_mm=float(rng.uniform(1.5, 3.0)),
        elastic_spacing_mm=float(rng.uniform(26.0, 36.0)),
        bias_amp=float(rng.uniform(0.05, 0.15)),
        noise_sigma=float(rng.uniform(7.0, 15.0)) * gain,
        scalp=float(rng.uniform(0.8, 1.35)),
        diploe=float(rng.uniform(0.7, 1.4)),
    )


def _head_profile(s: _Subject, spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intensity and label as functions of the distance (mm) outside the intracranial surface.

    Returns (d, value, label) samples; the value is box-averaged over one voxel (``spacing``)
    so thin layers are partial-volumed on coarse grids instead of aliased.
    """
    v = s.values
    layers = [  # (thickness mm, value, label) from the inner table outward
        (1.8, v["bone"], 4),
        (2.6 * s.diploe, v["marrow"], 6),
        (1.6, v["bone"], 4),
        (1.3 * s.scalp, v["soft_tissue"], 5),
        (4.5 * s.scalp, v["fat"], 6),
        (1.5, v["skin"], 5),
    ]
    step = 0.05
    d = np.arange(-8.0, 40.0, step)
    val = np.zeros_like(d)
    lab = np.zeros(d.shape, dtype=np.int8)
    val[d < 0] = v["bone"]  # inside: replaced by the brain model, see _compose
    lab[d < 0] = 4
    edge = 0.0
    for thick, value, label in layers:
        sel = (d >= edge) & (d < edge + thick)
        val[sel], lab[sel] = value, label
        edge += thick
    width = max(1, int(round(max(spacing, 0.7) / step)))
    val = ndi.uniform_filter1d(val, width, mode="nearest")
    return d, val, lab


def _compose(t: _Template, s: _Subject, labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """T2 intensities (and labels) of subject ``s`` on template grid ``t`` (pre-warp)."""
    v = s.values
    # Atrophy: tissue fractions to a power >= 1 turns partial-volume sulci into CSF.
    k = 1.0 + 1.2 * s.atrophy
    tissue = t.gm + t.wm
    ratio = np.zeros_like(tissue)
    np.power(tissue, k - 1.0, out=ratio, where=tissue > 0)
    gm = t.gm * ratio
    wm = t.wm * ratio
    del tissue, ratio
    inside = v["csf"] + gm * (v["gm"] - v["csf"]) + wm * (v["wm"] - v["csf"])

    shift = 2.0 * s.atrophy  # wider subarachnoid space with age
    d = t.dist - np.float32(shift)
    prof_d, prof_v, prof_l = _head_profile(s, t.spacing)
    outside = np.interp(d, prof_d, prof_v).astype(np.float32)
    ramp = max(t.spacing, 1.0)
    w_in = np.clip(0.5 - (t.dist_ic - np.float32(shift)) / ramp, 0.0, 1.0)
    img = w_in * inside + (1.0 - w_in) * outside
    # The micro-texture has a ~1 mm correlation length: averaged over a coarse voxel its
    # amplitude falls like (voxel volume)^-1/2.
    img *= 1.0 + np.float32(s.texture_amp / t.spacing**1.5) * t.texture
    lab = None
    if labels:
        idx = np.clip(np.searchsorted(prof_d, d), 0, len(prof_d) - 1)
        lab = prof_l[idx]
        brain_cls = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0).astype(np.int8) + 1
        lab = np.where(w_in >= 0.5, brain_cls, lab).astype(np.int8)
    return img.astype(np.float32, copy=False), lab


def _rbf_field(rng: np.random.Generator, axes_mm: list[np.ndarray], spacing_mm: float,
               n_fields: int) -> list[np.ndarray]:
    """Smooth random fields (unit RMS) on the grid ``axes_mm``: Gaussian RBFs on a lattice
    of control points ``spacing_mm`` apart, evaluated separably (three small matmuls)."""
    mats, n_ctrl = [], []
    for ax in axes_mm:
        lo, hi = float(ax.min()) - spacing_mm, float(ax.max()) + spacing_mm
        n = max(2, int(math.ceil((hi - lo) / spacing_mm)) + 1)
        ctrl = np.linspace(lo, hi, n)
        w = np.exp(-0.5 * ((ax[:, None] - ctrl[None, :]) / (0.7 * spacing_mm)) ** 2)
        mats.append(w / w.sum(axis=1, keepdims=True))
        n_ctrl.append(n)
    fields = []
    for _ in range(n_fields):
        c = rng.standard_normal(n_ctrl)
        f = np.einsum("abc,xa->xbc", c, mats[0])
        f = np.einsum("xbc,yb->xyc", f, mats[1])
        f = (f @ mats[2].T).astype(np.float32)  # (X, Y, Z)
        f /= max(float(np.sqrt(np.mean(f * f))), 1e-12)
        fields.append(f)
    return fields


def _level_for(cfg: SynthConfig) -> int:
    """Template level whose voxels are no larger than the output voxels (1..4 mm)."""
    return int(min(4, max(1, math.floor(min(voxel_size(cfg)) + 1e-6))))


def synthesize_subject(
    index: int, cfg: SynthConfig, return_labels: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic IXI-like T2 volume, deterministic in ``(cfg.seed, index)``.

    Args:
        index: subject index (0-based; file name :func:`subject_filename`). Any index >= 0 is
            valid, also beyond ``cfg.subjects``.
        cfg: ``size`` (in-plane matrix), ``slices`` (axial slices) and ``seed`` are used.
        return_labels: also return the tissue label map (ids in :data:`LABELS`), warped with
            the same deformation (nearest neighbour) — ground truth for tests and stats.

    Returns:
        ``(volume, affine)`` or ``(volume, affine, labels)``: ``volume`` float32
        (size, size, slices) holding non-negative integers (IXI int16 range, air ~10-20,
        WM ~400, GM ~600, CSF ~1250), RAS+ with axial slices ``volume[:, :, k]``; ``affine``
        (4, 4) float64 voxel -> world mm; ``labels`` int8 (size, size, slices).

    Raises:
        TypeError: ``cfg`` is not a :class:`~pgasr.config.SynthConfig`.
        ValueError: negative index or seed, size < 16, slices < 1.
    """
    _check_cfg(cfg)
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
        raise ValueError(f"subject index must be an integer >= 0, got {index!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), int(index), 0x5E7]))
    s = _draw_subject(rng)
    t = _template(_level_for(cfg))
    img_t, lab_t = _compose(t, s, return_labels)

    out_aff = _output_affine(cfg)
    shape = (cfg.size, cfg.size, cfg.slices)
    axes = [out_aff[a, a] * np.arange(shape[a]) + out_aff[a, 3] for a in range(3)]  # world mm

    # World (scanner) mm -> template voxel: elastic, then the affine pose, then atrophy.
    ux, uy, uz = _rbf_field(rng, axes, s.elastic_spacing_mm, 3)
    amp = np.float32(s.elastic_mm / math.sqrt(3.0))
    lin = np.linalg.inv(t.affine)[:3, :3] @ s.rotation @ np.diag(1.0 / s.scale)
    off = np.linalg.inv(t.affine) @ np.append(_HEAD_CENTER_MNI + s.shift_mm, 1.0)
    p = [axes[0][:, None, None] + amp * ux, axes[1][None, :, None] + amp * uy,
         axes[2][None, None, :] + amp * uz]
    del ux, uy, uz
    coords = np.empty((3, *shape), dtype=np.float32)
    for a in range(3):
        coords[a] = lin[a, 0] * p[0] + lin[a, 1] * p[1] + lin[a, 2] * p[2] + off[a]
    del p
    # Ventricular enlargement: sample closer to the ventricle centre (Jacobian 1 - e there).
    e = np.float32(0.3 * s.atrophy**1.5)
    if e > 0:
        vc = (np.linalg.inv(t.affine) @ np.append(_VENTRICLE_CENTER_MNI, 1.0))[:3]
        sig = _VENTRICLE_SIGMA_MM / t.spacing
        g = np.zeros(shape, dtype=np.float32)
        for a in range(3):
            g += ((coords[a] - np.float32(vc[a])) / np.float32(sig[a])) ** 2
        g = e * np.exp(-0.5 * g)
        for a in range(3):
            coords[a] -= g * (coords[a] - np.float32(vc[a]))
        del g

    vol = ndi.map_coordinates(img_t, coords, order=1, mode="nearest", output=np.float32)
    labels = None
    if return_labels:
        labels = ndi.map_coordinates(lab_t, coords, order=0, mode="nearest").astype(np.int8)
    del coords, img_t, lab_t

    (bias,) = _rbf_field(rng, axes, 110.0, 1)
    vol *= np.exp(np.float32(s.bias_amp) * bias)
    del bias
    sigma = np.float32(s.noise_sigma)
    n1 = rng.standard_normal(shape, dtype=np.float32)
    n1 *= sigma
    vol += n1
    np.square(vol, out=vol)
    rng.standard_normal(shape, dtype=np.float32, out=n1)
    n1 *= sigma
    np.square(n1, out=n1)
    vol += n1
    del n1
    np.sqrt(vol, out=vol)
    np.rint(vol, out=vol)
    np.clip(vol, 0, 32767, out=vol)
    if return_labels:
        return vol, out_aff, labels
    return vol, out_aff


# --------------------------------------------------------------------------- cohort on disk


def _params(cfg: SynthConfig) -> dict:
    """What determines a file's content (``subjects`` only decides how many files)."""
    return {"version": GENERATOR_VERSION, "size": cfg.size, "slices": cfg.slices,
            "seed": cfg.seed, "fov_mm": FOV_MM, "slab_mm": SLAB_MM}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling + rename (never a partial file)."""
    unique = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f"{_PART_PREFIX}{path.name}.{unique}{_PART_SUFFIX}"
    try:
        with open(tmp, "xb") as f:  # plain open: permissions follow the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _nifti_bytes(vol: np.ndarray, affine: np.ndarray, description: str) -> bytes:
    img = nib.Nifti1Image(vol.astype(np.int16), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header["descrip"] = description.encode()[:79]
    # mtime=0: identical data give identical bytes (and hashes) on every run.
    return gzip.compress(img.to_bytes(), compresslevel=4, mtime=0)


def _read_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def synthesize_cohort(
    cfg: SynthConfig, out_dir: str | Path | None = None, progress: bool = False
) -> list[Path]:
    """Write ``cfg.subjects`` IXI-named T2 volumes (``.nii.gz``, int16) to ``out_dir``.

    Generation is one subject at a time (memory ~1 GB at 256×256×120). ``synth.json`` in the
    directory records the parameters and each file's SHA-256: a rerun with the same
    parameters reuses files whose hash matches, regenerates the rest, and removes synthetic
    files beyond ``cfg.subjects`` (so a directory always holds exactly this cohort). Files
    are written to a temporary sibling and renamed, so an interrupted run never leaves a
    truncated volume. Files that are not synthetic (other names) are left alone.

    Args:
        cfg: cohort parameters (``subjects``, ``size``, ``slices``, ``seed``).
        out_dir: output directory; defaults to ``cfg.out_dir``. Created if missing.
        progress: show a tqdm progress bar.

    Returns:
        The paths of the ``cfg.subjects`` volumes, in subject order.
    """
    _check_cfg(cfg)
    out = Path(out_dir if out_dir is not None else cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    params = _params(cfg)
    manifest = _read_manifest(manifest_path)
    if manifest.get("params") != params:
        if manifest:
            log.info("synth: parameters changed in %s, regenerating", out)
        manifest = {}
    hashes: dict[str, str] = dict(manifest.get("files") or {})
    names = [subject_filename(i) for i in range(cfg.subjects)]

    # Leftovers: temporary parts of an interrupted run, synthetic files beyond the cohort.
    wanted = set(names)
    now = time.time()
    for p in out.iterdir():
        # A part file is stale after a minute (a write takes ~1 s); younger ones may belong
        # to a concurrent run.
        stale_part = (p.name.startswith(_PART_PREFIX) and p.name.endswith(_PART_SUFFIX)
                      and now - p.stat().st_mtime > 60)
        if stale_part or (_NAME_RE.match(p.name) and p.name not in wanted):
            p.unlink(missing_ok=True)
            hashes.pop(p.name, None)

    def save_manifest() -> None:
        doc = {"generator": "pgasr.data.synth", "params": params, "subjects": cfg.subjects,
               "files": dict(sorted(hashes.items()))}
        _atomic_write(manifest_path, (json.dumps(doc, indent=1) + "\n").encode())

    from tqdm.auto import tqdm

    paths = []
    reused = 0
    for i, name in enumerate(tqdm(names, desc="synth", unit="subject", disable=not progress)):
        path = out / name
        if path.is_file() and hashes.get(name) and hashes[name] == _sha256(path):
            reused += 1
        else:
            vol, aff = synthesize_subject(i, cfg)
            desc = f"pgasr synth v{GENERATOR_VERSION} seed={cfg.seed} subject={i}"
            data = _nifti_bytes(vol, aff, desc)
            del vol
            _atomic_write(path, data)
            hashes[name] = hashlib.sha256(data).hexdigest()
            save_manifest()
        paths.append(path)
    hashes = {k: v for k, v in hashes.items() if k in wanted}
    save_manifest()
    log.info("synth: %d volumes in %s (%d reused)", len(paths), out, reused)
    return paths


# --------------------------------------------------------------------------- preview


def _kmeans_1d(x: np.ndarray, k: int = 3, iters: int = 30) -> np.ndarray:
    """Sorted cluster centres of 1-D data (percentile init, Lloyd iterations)."""
    c = np.percentile(x, np.linspace(15, 90, k))
    for _ in range(iters):
        edges = (c[1:] + c[:-1]) / 2
        idx = np.searchsorted(edges, x)
        new = np.array([x[idx == j].mean() if np.any(idx == j) else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return np.sort(c)


def _volume_stats(vol: np.ndarray, spacing: tuple[float, float, float]) -> dict:
    """Head/background statistics and CSF/GM/WM estimates of one volume.

    Head = voxels above 10 % of the 99th percentile (``DataConfig.head_threshold``), holes
    filled per slice, on up to 24 slices of the central 70 % of the slab. Brain tissue is
    estimated without labels (so this also works on real IXI files): the head eroded by
    18 mm in-plane (scalp and skull gone) is split into three intensity clusters, read as
    WM < GM < CSF.
    """
    # Up to 24 slices spread over the central 70 % of the slab: the per-slice morphology is
    # the slow part, and the statistics do not need every slice.
    nz = vol.shape[2]
    ks = np.unique(np.linspace(0.15 * (nz - 1), 0.85 * (nz - 1), min(nz, 24)).round().astype(int))
    vol = vol[:, :, ks]
    p99 = float(np.percentile(vol, 99))
    head = vol > 0.1 * p99
    inner = np.zeros_like(head)
    for k in range(vol.shape[2]):
        filled = ndi.binary_fill_holes(head[:, :, k])
        head[:, :, k] = filled
        if filled.any():
            dist = ndi.distance_transform_edt(filled, sampling=spacing[:2])
            inner[:, :, k] = dist > 18.0
    h = vol[head]
    bg = vol[~head]
    stats = {
        "head_fraction": float(head.mean()),
        "head_mean": float(h.mean()),
        "head_p1": float(np.percentile(h, 1)),
        "head_p50": float(np.percentile(h, 50)),
        "head_p99": float(np.percentile(h, 99)),
        "max": float(vol.max()),
        "background_mean": float(bg.mean()) if bg.size else float("nan"),
        "background_std": float(bg.std()) if bg.size else float("nan"),
    }
    x = vol[inner & (vol > 0.05 * p99)]
    if x.size > 100:
        wm, gm, csf = _kmeans_1d(x.astype(np.float64))
        stats.update(csf_mean=float(csf), gm_mean=float(gm), wm_mean=float(wm),
                     csf_gm_ratio=float(csf / gm), gm_wm_ratio=float(gm / wm),
                     csf_wm_ratio=float(csf / wm))
    return stats


def _head_box(vol: np.ndarray, margin: float = 0.04) -> tuple[slice, slice]:
    """In-plane bounding box (x, y slices) of the head over all slices, with a margin."""
    proj = vol.max(axis=2)
    mask = proj > 0.1 * float(np.percentile(vol, 99))
    if not mask.any():
        return slice(None), slice(None)
    box = []
    for axis in (1, 0):
        idx = np.flatnonzero(mask.any(axis=axis))
        pad = int(round(margin * mask.shape[1 - axis]))
        box.append(slice(max(0, idx[0] - pad), min(mask.shape[1 - axis], idx[-1] + 1 + pad)))
    return box[0], box[1]


def preview(paths: list[Path], out_png: str | Path, max_subjects: int = 4) -> dict:
    """Montage of axial slices of several volumes plus intensity/contrast statistics.

    Rows are subjects (at most ``max_subjects``), columns four slice levels (25, 45, 60 and
    75 % of the slab, inferior to superior), cropped to the head and shown in radiological
    convention (patient right on the left, anterior up) with one grey window per subject
    (0 .. 99.5th percentile). The PNG is 8-bit greyscale.

    Args:
        paths: NIfTI volumes (synthetic or real IXI T2; reoriented to RAS+ for display).
        out_png: where to write the PNG (parent directories are created).
        max_subjects: rows of the montage; statistics also use only these volumes.

    Returns:
        Statistics averaged over the shown volumes (``head_*`` intensity mean/percentiles,
        ``background_*`` noise floor, ``csf/gm/wm_mean`` cluster estimates and their ratios),
        plus ``per_subject`` (the same per file) and ``files``.

    Raises:
        ValueError: ``paths`` is empty or a file is not a 3-D volume.
    """
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image

    paths = [Path(p) for p in paths][:max_subjects]
    if not paths:
        raise ValueError("preview needs at least one volume")
    levels = (0.25, 0.45, 0.60, 0.75)
    per_subject, panels = [], []
    for p in paths:
        img = nib.as_closest_canonical(nib.load(str(p)))
        vol = np.asarray(img.dataobj, dtype=np.float32)
        if vol.ndim == 4 and vol.shape[3] == 1:
            vol = vol[..., 0]
        if vol.ndim != 3:
            raise ValueError(f"{p}: expected a 3-D volume, got shape {vol.shape}")
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        bx, by = _head_box(vol)
        vmax = float(np.percentile(vol, 99.5))
        row = [np.fliplr(np.rot90(vol[bx, by, min(vol.shape[2] - 1, int(f * vol.shape[2]))]))
               for f in levels]
        panels.append((row, vmax, zooms))
        st = _volume_stats(vol, zooms)
        st["file"] = p.name
        per_subject.append(st)
        del vol

    n, m = len(panels), len(levels)
    h_in = max(sl.shape[0] * z[1] / (sl.shape[1] * z[0]) for (row, _, z) in panels
               for sl in row[:1])
    cell = 2.2
    text_h = 0.45
    fig = plt.figure(figsize=(cell * m, cell * h_in * n + text_h), facecolor="black")
    for r, (row, vmax, zooms) in enumerate(panels):
        for c, sl in enumerate(row):
            ax = fig.add_axes([c / m, 1 - (r + 1) * cell * h_in / (cell * h_in * n + text_h),
                               1 / m, cell * h_in / (cell * h_in * n + text_h)])
            ax.imshow(sl, cmap="gray", vmin=0, vmax=vmax, interpolation="antialiased",
                      aspect=zooms[1] / zooms[0])
            ax.set_axis_off()
            if c == 0:
                ax.text(0.02, 0.98, per_subject[r]["file"].split("-T2")[0], color="white",
                        fontsize=6, va="top", transform=ax.transAxes)
                ax.text(0.02, 0.5, "R", color="white", fontsize=7, transform=ax.transAxes)

    keys = [k for k in per_subject[0] if k != "file"]
    summary: dict[str, Any] = {}
    for k in keys:
        vals = [s[k] for s in per_subject if k in s]
        if len(vals) == len(per_subject):
            summary[k] = float(np.mean(vals))
    text = (f"head mean {summary['head_mean']:.0f}  p1/p50/p99 {summary['head_p1']:.0f}/"
            f"{summary['head_p50']:.0f}/{summary['head_p99']:.0f}  "
            f"air {summary['background_mean']:.0f}±{summary['background_std']:.0f}")
    if "csf_mean" in summary:
        text += (f"\nCSF/GM/WM ≈ {summary['csf_mean']:.0f}/{summary['gm_mean']:.0f}/"
                 f"{summary['wm_mean']:.0f}  CSF:GM {summary['csf_gm_ratio']:.2f}  "
                 f"GM:WM {summary['gm_wm_ratio']:.2f}")
    fig.text(0.5, 0.004, text, color="white", ha="center", va="bottom", fontsize=6.5)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, facecolor="black", format="png")
    plt.close(fig)
    buf.seek(0)
    Image.open(buf).convert("L").save(out_png, optimize=True)
    summary["per_subject"] = per_subject
    summary["files"] = [str(p) for p in paths]
    return summary
