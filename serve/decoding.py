"""Request bodies -> validated arrays, and every limit that bounds what one request costs.

Pure functions, no Serve and no FastAPI: each takes bytes and a :class:`Limits` and either
returns the decoded input or raises an :class:`InputError` that carries the HTTP status, an
error code and the reason the client is told (``serve/app.py`` turns it into JSON). Each
limit lives in one place: the configurable ones in :class:`pgasr.config.ServeConfig` (copied
into :class:`Limits` by :meth:`Limits.from_config`), the fixed ones as constants here.

What is bounded, and where (``docs/serve.md``):

* body bytes: :func:`check_content_length` before reading; ``serve/app.py`` counts the rest;
* NIfTI: everything is decided from the 348 header bytes before voxel data is decompressed:
  shape (every dimension >= 1), voxels (``max_voxels``), output voxels at the requested scale
  (``max_output_voxels``), voxel type (at most 8 bytes, real), extension bytes; then at most
  the header + data bytes it implies are decompressed (:func:`gunzip_nifti`: linear in the
  body, at most ``MAX_GZIP_MEMBERS`` gzip members, a caller's deadline checked in the loop);
* ``.npy`` / PNG slices: shape (every dimension >= 1), pixels (``max_slice_pixels``), output
  pixels, dtype, and the byte count derived from the checked shape, before any data is read;
* multipart: at most ``MAX_MULTIPART_PARTS`` parts, parsed in memory;
* a DICOM series as a ``.zip`` (:func:`decode_dicom_zip`): at most ``MAX_DICOM_FILES`` members,
  decided from the zip's directory before anything is decompressed (no encrypted members, the
  declared sizes within what ``max_voxels`` voxels and their headers need; zipfile stops at
  the declared size and checks the CRC); members are written under index names (never the
  names in the archive); every slice's Rows x Columns is read from its header and the total
  checked against ``max_voxels`` / ``max_output_voxels`` before pixel data is decoded;
* outputs: :func:`check_finite` (NaN/inf is a 500 with a reason, never a 200).
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pgasr.config import ServeConfig

__all__ = [
    "BadRequest",
    "InputError",
    "Limits",
    "OutputError",
    "TooLarge",
    "check_content_length",
    "check_finite",
    "check_output_size",
    "check_voxel_type",
    "decode_dicom_zip",
    "decode_nifti",
    "decode_slice",
    "extract_multipart",
    "gunzip_nifti",
    "is_zip",
    "nifti_needed_bytes",
]

NIFTI1_HEADER_BYTES = 348
NIFTI1_MIN_VOX_OFFSET = 352  # header + the 4-byte extension flag
MAX_NIFTI_EXTENSION_BYTES = 16 * 1024 * 1024  # extensions between byte 352 and vox_offset
MAX_VOXEL_BYTES = 8  # float64 / int64; float128 and complex types are refused
MAX_GZIP_MEMBERS = 4096  # a .nii.gz has one; concatenated / bgzip'd files have more
GZIP_PIECE_BYTES = 16 * 1024  # compressed bytes fed to zlib per call
GZIP_CHECK_EVERY = 64  # zlib calls between two deadline checks
MAX_MULTIPART_PARTS = 16
MAX_DICOM_FILES = 4096  # members of a DICOM-series .zip (one file per slice)
MAX_DICOM_HEADER_BYTES = 256 * 1024  # per member, beside its pixel data
ZIP_MAGIC = b"PK\x03\x04"
OUTPUT_VOXELS_PER_INPUT_VOXEL = 4  # serve.max_output_voxels=0: the x2 output of max_voxels
GZIP_MAGIC = b"\x1f\x8b"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"

Check = Callable[[], None]


# --------------------------------------------------------------------------- errors


class InputError(ValueError):
    """An input the service refuses: ``status`` and ``code`` are the HTTP answer, the
    message is the reason."""

    status = 422
    code = "invalid_input"

    def __init__(self, reason: str, status: int | None = None, code: str | None = None):
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class TooLarge(InputError):
    """The input, or the output it would give, is larger than a configured limit."""

    status = 413
    code = "too_large"


class BadRequest(InputError):
    """The request is malformed at the HTTP level (Content-Length, multipart framing)."""

    status = 400
    code = "bad_request"


class OutputError(Exception):
    """The model produced something that must not be returned (NaN/inf voxels)."""

    status = 500
    code = "invalid_output"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- limits


_SERVE_DEFAULTS = ServeConfig()


@dataclass(frozen=True)
class Limits:
    """Everything that bounds one request's input and output. Configurable values default
    to :class:`ServeConfig`'s defaults; the fixed ones to this module's constants."""

    max_body_bytes: int = _SERVE_DEFAULTS.max_body_bytes
    max_voxels: int = _SERVE_DEFAULTS.max_voxels
    max_output_voxels: int = OUTPUT_VOXELS_PER_INPUT_VOXEL * _SERVE_DEFAULTS.max_voxels
    max_slice_pixels: int = _SERVE_DEFAULTS.max_slice_pixels
    max_gzip_members: int = MAX_GZIP_MEMBERS
    max_multipart_parts: int = MAX_MULTIPART_PARTS
    max_nifti_extension_bytes: int = MAX_NIFTI_EXTENSION_BYTES
    max_voxel_bytes: int = MAX_VOXEL_BYTES

    @classmethod
    def from_config(cls, s: ServeConfig) -> "Limits":
        """The limits of a service configured by ``s``."""
        out = s.max_output_voxels or OUTPUT_VOXELS_PER_INPUT_VOXEL * s.max_voxels
        return cls(max_body_bytes=s.max_body_bytes, max_voxels=s.max_voxels,
                   max_output_voxels=out, max_slice_pixels=s.max_slice_pixels)

    @property
    def max_decompressed_bytes(self) -> int:
        """The most bytes a NIfTI body may decompress to: header, extensions, voxels."""
        return (NIFTI1_MIN_VOX_OFFSET + self.max_nifti_extension_bytes
                + self.max_voxels * self.max_voxel_bytes)


def check_content_length(value: str | None, max_bytes: int) -> int | None:
    """The declared body size (None without a Content-Length header), checked against
    ``max_bytes`` before any of the body is read."""
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise BadRequest(f"invalid Content-Length {value[:40]!r}")
    if n > max_bytes:
        raise TooLarge(f"body of {n} bytes exceeds the limit of {max_bytes} bytes "
                       f"(serve.max_body_bytes)")
    return n


def check_voxel_type(dtype: np.dtype, what: str, limits: Limits) -> None:
    """Refuse anything but plain real numbers of at most ``limits.max_voxel_bytes`` bytes
    (no object, structured, complex, float128 types)."""
    if (dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf"
            or dtype.itemsize > limits.max_voxel_bytes):
        raise InputError(f"unsupported {what} type {dtype} (real numbers of at most "
                         f"{limits.max_voxel_bytes} bytes; send float32)")


def check_dims(shape: tuple, what: str) -> tuple[int, ...]:
    """Every dimension an integer >= 1 (a negative or zero one never reaches a size
    computation)."""
    dims = tuple(shape)
    if any(type(d) is not int for d in dims):
        raise InputError(f"invalid {what} shape {dims}")
    if any(d == 0 for d in dims):
        raise InputError(f"empty {what}, shape {dims}")
    if any(d < 0 for d in dims):
        raise InputError(f"invalid {what} shape {dims}: negative dimension")
    return dims


def check_output_size(n_in: int, scale: int, limits: Limits, what: str) -> None:
    """The SR output of ``n_in`` input voxels at ``scale`` (in-plane: ``scale**2`` times
    more) must fit ``limits.max_output_voxels``."""
    n_out = n_in * scale * scale
    if n_out > limits.max_output_voxels:
        raise TooLarge(f"the x{scale} output of this {what} would have {n_out} voxels; the "
                       f"limit is {limits.max_output_voxels} (serve.max_output_voxels)")


def check_finite(arr: np.ndarray, what: str) -> None:
    """Raise :class:`OutputError` when ``arr`` holds NaN or inf; checked slab by slab along
    the last axis, so no full-size temporary is allocated."""
    a = np.asanyarray(arr)
    slabs = (a,) if a.ndim < 2 else (a[..., k] for k in range(a.shape[-1]))
    for slab in slabs:
        if not np.isfinite(slab).all():
            raise OutputError(f"the model produced NaN or inf values for this {what}; "
                              f"nothing was returned")


# --------------------------------------------------------------------------- NIfTI


def _nifti_header_fields(hdr_bytes: bytes) -> tuple[list[int], np.dtype, int]:
    """(dim, voxel dtype, vox_offset) of a single-file NIfTI-1 header; InputError if it is
    not one."""
    import nibabel as nib

    for order in ("<", ">"):
        size = int(np.frombuffer(hdr_bytes[:4], dtype=f"{order}i4")[0])
        if size == 540:
            raise InputError("NIfTI-2 files are not supported; save as NIfTI-1")
        if size == NIFTI1_HEADER_BYTES:
            break
    else:
        raise InputError("not a NIfTI-1 file (bad header size field)")
    try:
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(hdr_bytes), check=False)
        magic = bytes(hdr["magic"])
        dim = [int(d) for d in hdr["dim"]]
        dtype = hdr.get_data_dtype()
        raw_offset = float(hdr["vox_offset"])
    except Exception as e:  # noqa: BLE001 - nibabel raises many types on bad headers
        raise InputError(f"unreadable NIfTI-1 header ({type(e).__name__}: {e})") from None
    if magic.rstrip(b"\x00") != b"n+1":
        raise InputError("not a single-file NIfTI-1 image (magic is not 'n+1'; .hdr/.img "
                         "pairs are not accepted)")
    offset = int(raw_offset) if math.isfinite(raw_offset) else -1
    return dim, dtype, offset


def _nifti_shape(dim: list[int]) -> tuple[int, ...]:
    """The 3-D shape ``dim`` describes (trailing singleton axes allowed)."""
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise InputError(f"invalid NIfTI header: dim[0]={ndim}")
    shape = check_dims(tuple(dim[1 : ndim + 1]), "volume")
    if ndim < 3 or any(d != 1 for d in shape[3:]):
        raise InputError(f"expected a 3-D volume (X, Y, slices), got shape {shape}")
    return shape


def nifti_needed_bytes(hdr_bytes: bytes, limits: Limits, scale: int = 1) -> int:
    """Validate a NIfTI-1 header and return the file size it implies (header + data).

    Everything is decided from the 348 header bytes, before any voxel data is decompressed
    or allocated: shape, voxel and output-voxel counts, voxel type, data offset.
    """
    dim, dtype, offset = _nifti_header_fields(hdr_bytes)
    shape = _nifti_shape(dim)
    nvox = math.prod(shape)
    if nvox > limits.max_voxels:
        raise TooLarge(f"volume of shape {shape} has {nvox} voxels; the limit is "
                       f"{limits.max_voxels}")
    check_output_size(nvox, scale, limits, "volume")
    check_voxel_type(dtype, "voxel", limits)
    if not NIFTI1_HEADER_BYTES <= offset <= NIFTI1_MIN_VOX_OFFSET + limits.max_nifti_extension_bytes:
        raise InputError(f"invalid NIfTI header: vox_offset={offset}")
    need = offset + nvox * dtype.itemsize
    if need > limits.max_decompressed_bytes:  # implied by the checks above; kept explicit
        raise TooLarge(f"volume of {need} bytes; the limit is {limits.max_decompressed_bytes}")
    return need


class _Members:
    """Counts the gzip members of one body against ``limits.max_gzip_members``."""

    def __init__(self, limits: Limits):
        self.n, self.limit = 0, limits.max_gzip_members

    def next(self) -> "zlib._Decompress":
        self.n += 1
        if self.n > self.limit:
            raise InputError(f"more than {self.limit} gzip members in one body")
        return zlib.decompressobj(wbits=31)


def gunzip_nifti(data: bytes, limits: Limits, scale: int = 1, check: Check | None = None) -> bytes:
    """Decompress a gzipped NIfTI-1 file, never producing more than its header implies.

    The header is decompressed first and checked (:func:`nifti_needed_bytes`); then exactly
    the header + data bytes are decompressed, so a gzip bomb or a header claiming a huge
    image costs at most the voxel limit. Multi-member streams are followed in one pass over
    ``data`` (a memoryview offset, nothing re-copied per member), at most
    ``limits.max_gzip_members`` of them; ``check`` (e.g. a deadline) is called every
    ``GZIP_CHECK_EVERY`` zlib calls and at every member. Decompression stops as soon as those
    bytes are out, so the gzip trailer (CRC, length) is never checked: a file cut inside its
    last 8 bytes still decodes, whole.
    """
    view = memoryview(data)
    out = bytearray()
    limit, need = NIFTI1_HEADER_BYTES, None
    members = _Members(limits)
    d, pos, calls = members.next(), 0, 0
    while True:
        if need is None and len(out) >= NIFTI1_HEADER_BYTES:
            need = limit = nifti_needed_bytes(bytes(out[:NIFTI1_HEADER_BYTES]), limits, scale)
        if len(out) >= limit:
            return bytes(out) if len(out) == limit else bytes(out[:limit])
        if d.eof:
            if bytes(view[pos : pos + 2]) != GZIP_MAGIC:
                raise InputError(f"file is shorter than its header says ({len(out)} of "
                                 f"{limit} bytes)" if need else "too short to be a NIfTI-1 file")
            d = members.next()
            if check is not None:
                check()
        if pos >= len(view):
            raise InputError("truncated gzip data")
        piece = view[pos : pos + GZIP_PIECE_BYTES]
        try:
            out += d.decompress(piece, limit - len(out))
        except zlib.error as e:
            raise InputError(f"corrupt gzip data ({e})") from None
        pos += len(piece) - len(d.unused_data if d.eof else d.unconsumed_tail)
        calls += 1
        if check is not None and calls % GZIP_CHECK_EVERY == 0:
            check()


def _check_affine(img) -> None:
    aff = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(aff).all():
        raise InputError("the image's affine (qform/sform/pixdim) contains NaN or inf")
    det = float(np.linalg.det(aff[:3, :3]))
    if not math.isfinite(det) or abs(det) < 1e-12:
        raise InputError("the image's affine is not invertible (zero voxel size?)")


def _checked_volume(img, limits: Limits):
    """``img`` when its data is a usable 3-D volume within ``max_voxels`` (finite, not
    constant: :func:`pgasr.volume.check_volume`) with an invertible, finite affine."""
    from pgasr.volume import check_volume

    try:
        check_volume(img.dataobj, "input", limits.max_voxels)
    except ValueError as e:
        raise InputError(str(e)) from None
    _check_affine(img)
    return img


def _raw_nifti(data: bytes, limits: Limits, scale: int, check: Check | None) -> bytes:
    """The uncompressed header + data bytes of a NIfTI body (gzipped or not)."""
    if len(data) == 0:
        raise InputError("empty request body")
    if data[:2] == GZIP_MAGIC:
        return gunzip_nifti(data, limits, scale, check)
    if len(data) < NIFTI1_HEADER_BYTES:
        raise InputError(f"too short to be a NIfTI-1 file ({len(data)} bytes)")
    need = nifti_needed_bytes(data[:NIFTI1_HEADER_BYTES], limits, scale)
    if len(data) < need:
        raise InputError(f"file is shorter than its header says ({len(data)} of {need} bytes)")
    return data if len(data) == need else data[:need]


def decode_nifti(data: bytes, limits: Limits, scale: int = 1, check: Check | None = None):
    """Request bytes -> a validated 3-D NIfTI-1 image with its data in memory.

    ``scale`` is the SR factor the output will have (its size is checked too); ``check`` is
    called while decompressing (a deadline).

    Raises:
        TooLarge: more voxels than ``limits.max_voxels`` (or output voxels than
            ``limits.max_output_voxels``).
        InputError: anything else wrong (not NIfTI, truncated/corrupt gzip, 2-D, NaN/inf,
            constant, non-invertible affine, float128...), with the reason.
    """
    from pgasr.data.ixi import load_nifti_bytes

    raw = _raw_nifti(data, limits, scale, check)
    try:
        img = load_nifti_bytes(raw, "body")
    except ValueError as e:
        raise InputError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - e.g. HeaderDataError for a NaN affine
        raise InputError(f"not a usable NIfTI-1 image ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    del raw
    return _checked_volume(img, limits)


def is_zip(data: bytes) -> bool:
    return data[:4] == ZIP_MAGIC


def decode_dicom_zip(data: bytes, limits: Limits, scale: int = 1, check: Check | None = None):
    """A ``.zip`` holding one DICOM series (Part-10 files, one per slice, any folder layout)
    -> a validated 3-D NIfTI-1 image (RAS+, :func:`pgasr.dicom.read_dicom_series`: the same
    conversion as ``pgasr sr`` on a series folder).

    Raises:
        TooLarge: too many members, declared sizes beyond what ``max_voxels`` needs, or more
            voxels (input or output) than the limits.
        InputError: not a zip, encrypted/corrupt members, no or several series, a series
            that cannot be converted; with the reason.
    """
    import tempfile
    import zipfile
    from pathlib import Path

    import pydicom

    from pgasr.dicom import read_dicom_series

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in zf.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as e:
        raise InputError(f"not a readable .zip ({e})") from None
    if not members:
        raise InputError("the .zip holds no files")
    if len(members) > MAX_DICOM_FILES:
        raise TooLarge(f"the .zip holds {len(members)} files; at most {MAX_DICOM_FILES} "
                       "(one DICOM series, one file per slice)")
    if any(m.flag_bits & 0x1 for m in members):
        raise InputError("encrypted .zip members are not supported")
    declared = sum(m.file_size for m in members)
    cap = limits.max_voxels * limits.max_voxel_bytes + len(members) * MAX_DICOM_HEADER_BYTES
    if declared > cap:
        raise TooLarge(f"the .zip's files would decompress to {declared} bytes; at most "
                       f"{cap} for {limits.max_voxels} voxels (serve.max_voxels)")
    voxels = 0
    with tempfile.TemporaryDirectory(prefix="pgasr-dicom-") as tmp:
        for i, m in enumerate(members):
            if check is not None:
                check()
            dst = Path(tmp) / f"{i:05d}.dcm"  # never a name from the archive
            try:
                with zf.open(m) as src, open(dst, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
            except (zipfile.BadZipFile, NotImplementedError, EOFError, zlib.error,
                    RuntimeError) as e:
                raise InputError(f".zip member {i}: cannot be extracted ({e})") from None
            try:
                ds = pydicom.dcmread(dst, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - not DICOM (a README, a DICOMDIR...): skipped
                dst.unlink()
                continue
            rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            check_dims((rows, cols, frames), "DICOM slice")
            voxels += rows * cols * frames
            if voxels > limits.max_voxels:
                raise TooLarge(f"the DICOM series has more than {limits.max_voxels} voxels "
                               "(serve.max_voxels)")
        check_output_size(voxels, scale, limits, "DICOM series")
        try:
            img = read_dicom_series(tmp)
        except ValueError as e:
            raise InputError(str(e).replace(tmp, "the .zip")) from None
    return _checked_volume(img, limits)


# --------------------------------------------------------------------------- slices


def check_slice_shape(shape: tuple, limits: Limits, scale: int = 1) -> tuple[int, int, int]:
    """(planes, h, w) of a slice (h, w) or triplet (3, h, w), each dimension >= 1, within
    ``limits.max_slice_pixels`` (LR) and ``limits.max_output_voxels`` (SR)."""
    if len(shape) == 2:
        planes, (h, w) = 1, shape
    elif len(shape) == 3 and shape[0] == 3:
        planes, h, w = shape
    else:
        raise InputError(f"expected a 2-D slice (h, w) or a triplet (3, h, w), got shape "
                         f"{tuple(shape)}")
    check_dims(tuple(shape), "slice")
    if h * w > limits.max_slice_pixels:
        raise TooLarge(f"slice of {h}x{w} = {h * w} pixels; the limit is {limits.max_slice_pixels}")
    check_output_size(h * w, scale, limits, "slice")
    return planes, h, w


def _npy_header(data: bytes) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of an ``.npy`` body."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError/SyntaxError/...
        raise InputError(f"not a readable .npy array ({type(e).__name__}: {e})") from None
    return tuple(shape), bool(fortran), dtype, f.tell()


def decode_npy(data: bytes, limits: Limits, scale: int = 1) -> np.ndarray:
    """An ``.npy`` slice or triplet as float32; its byte count is derived from the checked
    shape, so no header can make it read more (or other) data than it declares."""
    shape, fortran, dtype, start = _npy_header(data)
    check_voxel_type(dtype, ".npy dtype", limits)
    planes, h, w = check_slice_shape(shape, limits, scale)
    count = planes * h * w
    nbytes = count * dtype.itemsize
    if len(data) - start < nbytes:
        raise InputError(f".npy data is truncated ({len(data) - start} of {nbytes} bytes)")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape, order="F" if fortran else "C").astype(np.float32)


def decode_png(data: bytes, limits: Limits, scale: int = 1) -> np.ndarray:
    """A grayscale (8/16-bit) PNG as float32, its size checked before its pixels are
    decompressed."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data), formats=["PNG"])
    except Image.DecompressionBombError as e:
        raise TooLarge(f"PNG too large ({e})") from None
    except Exception as e:  # noqa: BLE001
        raise InputError(f"not a readable PNG ({type(e).__name__}: {e})") from None
    w, h = img.size
    check_slice_shape((h, w), limits, scale)
    if img.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
        raise InputError(f"expected a grayscale PNG (8/16-bit), got mode {img.mode}")
    try:
        img.load()
        return np.asarray(img, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - truncated/corrupt PNG data
        raise InputError(f"corrupt or truncated PNG ({type(e).__name__}: {e})") from None


def decode_slice(data: bytes, limits: Limits, scale: int = 1) -> np.ndarray:
    """``.npy`` or PNG bytes -> a float32 LR triplet (3, h, w).

    A single 2-D slice becomes (slice, slice, slice), as the edge slices of a volume do in
    :meth:`Predictor.predict_volume`.
    """
    if len(data) == 0:
        raise InputError("empty request body")
    if data.startswith(NPY_MAGIC):
        arr = decode_npy(data, limits, scale)
    elif data.startswith(PNG_MAGIC):
        arr = decode_png(data, limits, scale)
    else:
        raise InputError("expected a .npy array or a PNG image")
    if not np.isfinite(arr).all():
        raise InputError("slice contains NaN or inf pixels")
    if arr.ndim == 2:
        arr = np.stack([arr, arr, arr])
    return np.ascontiguousarray(arr, dtype=np.float32)


# --------------------------------------------------------------------------- multipart


def _multipart_parts(body: bytes, boundary: bytes, max_parts: int) -> list[dict]:
    """The parts of a multipart body (headers, data chunks), parsed in memory."""
    from python_multipart.multipart import MultipartParser

    parts: list[dict] = []
    state: dict[str, Any] = {}

    def on_part_begin():
        if len(parts) >= max_parts:
            raise BadRequest(f"more than {max_parts} multipart parts")
        state["part"] = {"headers": {}, "data": []}
        parts.append(state["part"])

    def on_header_field(b, s, e):
        state["hf"] = state.get("hf", b"") + b[s:e]

    def on_header_value(b, s, e):
        state["hv"] = state.get("hv", b"") + b[s:e]

    def on_header_end():
        state["part"]["headers"][state.pop("hf", b"").lower()] = state.pop("hv", b"")

    def on_part_data(b, s, e):
        state["part"]["data"].append(bytes(b[s:e]))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_part_data": on_part_data})
    try:
        parser.write(body)
        parser.finalize()
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - python-multipart raises its own types
        raise BadRequest(f"malformed multipart body ({e})") from None
    return parts


def extract_multipart(body: bytes, content_type: str, field: str = "file",
                      max_parts: int = MAX_MULTIPART_PARTS) -> bytes:
    """The content of form field ``field`` (or the only file part) of a multipart body,
    parsed in memory (no temporary files)."""
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart body without a boundary")
    parts = _multipart_parts(body, boundary, max_parts)

    def disposition(p: dict) -> dict:
        return parse_options_header(p["headers"].get(b"content-disposition", b""))[1]

    named = [p for p in parts if disposition(p).get(b"name") == field.encode()]
    files = named or [p for p in parts if b"filename" in disposition(p)]
    if not named and len(files) != 1:
        raise InputError(f"multipart body needs a file field named {field!r}")
    return b"".join(files[0]["data"])
