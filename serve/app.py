"""PGASR over HTTP: a Ray Serve application around :class:`pgasr.inference.Predictor`.

``build_app(args)`` is a Serve application builder::

    serve run serve.app:build_app config=configs/tiny.yaml serve.checkpoint=runs/tiny/stage2
    python -m serve.app --config configs/tiny.yaml --set serve.checkpoint=runs/tiny/stage2

and is what ``cluster/kuberay/rayservice.yaml`` imports (``args: {config, overrides}``).
Nothing starts at import time.

One deployment, :class:`PGASRServer`, is both the FastAPI ingress and the model holder (no
second hop for volumes that can be hundreds of MB). Routes (``docs/serve.md``):

* ``POST /v1/sr?scale=2``        .nii/.nii.gz body (raw or multipart field ``file``) -> SR
  volume as .nii.gz; exactly ``Predictor.predict_image``, the code path of ``pgasr sr``.
* ``POST /v1/sr/slice?scale=2``  2-D ``.npy``/PNG slice or a (3, h, w) ``.npy`` triplet -> SR
  slice as ``.npy``; slices of concurrent requests share ``@serve.batch`` batches.
* ``GET /v1/model``              ``Predictor.describe()`` plus the service limits.
* ``GET /healthz``, ``GET /readyz``, ``GET /`` (the web viewer, ``serve/static/index.html``).

Every ``/v1`` route needs an API key (``X-API-Key`` or ``Authorization: Bearer``). Serve
itself has no authentication and no body limit, so both are enforced here, before the body is
read. Every input problem is a 4xx JSON ``{"error": code, "detail": reason}``; nothing from a
request is ever used as a filesystem path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import io
import logging
import math
import os
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pgasr.config import ConfigError, RunConfig, ServeConfig, config_from_dict, config_to_dict, load_config

log = logging.getLogger("pgasr.serve")

__all__ = [
    "ApiError",
    "KeyChecker",
    "PGASRServer",
    "build_app",
    "decode_nifti",
    "decode_slice",
    "load_api_keys",
    "main",
]

STATIC_DIR = Path(__file__).resolve().parent / "static"
MIN_KEY_CHARS = 16
NIFTI1_HEADER_BYTES = 348
MAX_NIFTI_EXTENSION_BYTES = 16 * 1024 * 1024  # header extensions between byte 352 and vox_offset
MAX_MULTIPART_PARTS = 16
GZIP_MAGIC = b"\x1f\x8b"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"

# Media types per route; a missing Content-Type is accepted and the body is sniffed.
VOLUME_TYPES = {"application/octet-stream", "application/gzip", "application/x-gzip",
                "application/x-nifti", "application/nifti"}
SLICE_TYPES = {"application/octet-stream", "application/x-npy", "application/npy", "image/png"}
MULTIPART = "multipart/form-data"


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An HTTP error answered as JSON ``{"error": code, "detail": detail}``."""

    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


class TooLarge(ValueError):
    """The input is larger than a configured limit (answered 413)."""


class Aborted(Exception):
    """The request's deadline passed or its client went away while it was computing."""


def _error(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
    h = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", **(headers or {})}
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=h)


# --------------------------------------------------------------------------- API keys


def _split_keys(text: str, where: str) -> list[str]:
    keys = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        for i, k in enumerate(p.strip() for p in line.split(",")):
            if not k:
                continue
            if len(k) < MIN_KEY_CHARS:
                raise ConfigError(f"{where}: an API key is shorter than {MIN_KEY_CHARS} "
                                  f"characters; use e.g. `openssl rand -hex 32`")
            if not (k.isascii() and k.isprintable()) or any(c.isspace() for c in k):
                raise ConfigError(f"{where}: API keys must be printable ASCII without spaces")
            keys.append(k)
    return keys


def load_api_keys(cfg: ServeConfig, environ: dict | None = None) -> list[str]:
    """The API keys the service accepts.

    From the environment variable named ``cfg.api_keys_env`` (comma-separated) and the file
    ``cfg.api_keys_file`` (comma- or newline-separated, ``#`` starts a comment). Raises
    :class:`ConfigError` when there is none and ``cfg.allow_no_auth`` is not set.
    """
    environ = os.environ if environ is None else environ
    keys: list[str] = []
    if cfg.api_keys_env:
        keys += _split_keys(environ.get(cfg.api_keys_env, ""), f"${cfg.api_keys_env}")
    if cfg.api_keys_file:
        p = Path(cfg.api_keys_file)
        if not p.is_file():
            raise ConfigError(f"serve.api_keys_file: {p} not found")
        keys += _split_keys(p.read_text(), str(p))
    if not keys and not cfg.allow_no_auth:
        raise ConfigError(
            f"no API keys configured: set ${cfg.api_keys_env or 'PGASR_API_KEYS'} "
            f"(comma-separated) or serve.api_keys_file; for local development only, "
            f"serve.allow_no_auth=true disables authentication")
    return keys


class KeyChecker:
    """Constant-time API-key check. Keys are kept as SHA-256 digests and every digest is
    compared (``hmac.compare_digest``) so neither a key's length nor its position leaks."""

    def __init__(self, keys: list[str], allow_no_auth: bool = False):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.open = not self._digests
        if self.open and not allow_no_auth:
            raise ConfigError("KeyChecker: no API keys and allow_no_auth is not set")

    @staticmethod
    def presented(headers) -> str | None:
        key = headers.get("x-api-key")
        if key:
            return key.strip()
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None

    def check(self, headers) -> None:
        """Raise a 401 :class:`ApiError` unless ``headers`` carry a valid key."""
        if self.open:
            return
        key = self.presented(headers)
        if key is None:
            raise ApiError(401, "unauthorized",
                           "API key required: send `X-API-Key: <key>` or "
                           "`Authorization: Bearer <key>`", {"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for ref in self._digests:
            ok |= hmac.compare_digest(digest, ref)
        if not ok:
            raise ApiError(401, "unauthorized", "invalid API key",
                           {"WWW-Authenticate": 'Bearer error="invalid_token"'})


# --------------------------------------------------------------------------- decoding


def _nifti_needed_bytes(hdr_bytes: bytes, max_voxels: int) -> int:
    """Validate a NIfTI-1 header and return the file size it implies (header + data).

    Everything is decided from the 348 header bytes, before any voxel data is decompressed
    or allocated. Raises :class:`TooLarge` (more voxels than ``max_voxels``) or ValueError.
    """
    import nibabel as nib

    for order in ("<", ">"):
        size = int(np.frombuffer(hdr_bytes[:4], dtype=f"{order}i4")[0])
        if size == 540:
            raise ValueError("NIfTI-2 files are not supported; save as NIfTI-1")
        if size == NIFTI1_HEADER_BYTES:
            break
    else:
        raise ValueError("not a NIfTI-1 file (bad header size field)")
    try:
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(hdr_bytes), check=False)
        magic = bytes(hdr["magic"])
        dim = [int(d) for d in hdr["dim"]]
        dtype = hdr.get_data_dtype()
        offset = int(hdr["vox_offset"]) if math.isfinite(float(hdr["vox_offset"])) else -1
    except Exception as e:  # noqa: BLE001 - nibabel raises many types on bad headers
        raise ValueError(f"unreadable NIfTI-1 header ({type(e).__name__}: {e})") from None
    if magic.rstrip(b"\x00") != b"n+1":
        raise ValueError("not a single-file NIfTI-1 image (magic is not 'n+1'; .hdr/.img "
                         "pairs are not accepted)")
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise ValueError(f"invalid NIfTI header: dim[0]={ndim}")
    shape = dim[1 : ndim + 1]
    if any(d < 0 for d in shape):
        raise ValueError(f"invalid NIfTI header: negative dimension in {shape}")
    if any(d == 0 for d in shape):
        raise ValueError(f"empty volume, shape {tuple(shape)}")
    if ndim < 3 or any(d != 1 for d in shape[3:]):
        raise ValueError(f"expected a 3-D volume (X, Y, slices), got shape {tuple(shape)}")
    nvox = math.prod(shape)
    if nvox > max_voxels:
        raise TooLarge(f"volume of shape {tuple(shape)} has {nvox} voxels; the limit is "
                       f"{max_voxels}")
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise ValueError(f"unsupported voxel type {dtype}")
    if not NIFTI1_HEADER_BYTES <= offset <= 352 + MAX_NIFTI_EXTENSION_BYTES:
        raise ValueError(f"invalid NIfTI header: vox_offset={hdr['vox_offset']}")
    return offset + nvox * dtype.itemsize


def _gunzip_nifti(data: bytes, max_voxels: int) -> bytes:
    """Decompress a gzipped NIfTI-1 file, never producing more than its header implies.

    The header is decompressed first and checked; then exactly the header + data bytes are
    decompressed, so a gzip bomb or a header claiming a huge image costs at most the voxel
    limit. Multi-member gzip streams are followed.
    """
    chunk = 1 << 16
    out = bytearray()
    limit = NIFTI1_HEADER_BYTES
    need: int | None = None
    src, pos, pending = data, 0, b""
    d = zlib.decompressobj(wbits=31)
    while True:
        if need is None and len(out) >= NIFTI1_HEADER_BYTES:
            need = limit = _nifti_needed_bytes(bytes(out[:NIFTI1_HEADER_BYTES]), max_voxels)
        if len(out) >= limit:
            return bytes(out[:limit])
        if d.eof:
            rest = d.unused_data + pending + src[pos:]
            if rest[:2] != GZIP_MAGIC:
                raise ValueError(f"file is shorter than its header says ({len(out)} of "
                                 f"{limit} bytes)" if need else "too short to be a NIfTI-1 file")
            d = zlib.decompressobj(wbits=31)
            src, pos, pending = rest, 0, b""
            continue
        if pending:
            piece, pending = pending, b""
        elif pos < len(src):
            piece, pos = src[pos : pos + chunk], pos + chunk
        else:
            raise ValueError("truncated gzip data")
        try:
            out += d.decompress(piece, limit - len(out))
        except zlib.error as e:
            raise ValueError(f"corrupt gzip data ({e})") from None
        pending = d.unconsumed_tail


def decode_nifti(data: bytes, max_voxels: int):
    """Request bytes -> a validated 3-D NIfTI-1 image with its data in memory.

    Raises:
        TooLarge: more voxels than ``max_voxels``.
        ValueError: anything else wrong (not NIfTI, truncated/corrupt gzip, 2-D, NaN/inf,
            constant, non-invertible affine...), with the reason.
    """
    from pgasr.data.ixi import load_nifti_bytes
    from pgasr.volume import check_volume

    if len(data) == 0:
        raise ValueError("empty request body")
    if data[:2] == GZIP_MAGIC:
        raw = _gunzip_nifti(data, max_voxels)
    else:
        if len(data) < NIFTI1_HEADER_BYTES:
            raise ValueError(f"too short to be a NIfTI-1 file ({len(data)} bytes)")
        need = _nifti_needed_bytes(data[:NIFTI1_HEADER_BYTES], max_voxels)
        if len(data) < need:
            raise ValueError(f"file is shorter than its header says ({len(data)} of {need} bytes)")
        raw = data[:need]
    try:
        img = load_nifti_bytes(raw, "body")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. HeaderDataError for a NaN affine
        raise ValueError(f"not a usable NIfTI-1 image ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    check_volume(img.dataobj, "input", max_voxels)
    aff = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(aff).all():
        raise ValueError("the image's affine (qform/sform/pixdim) contains NaN or inf")
    det = float(np.linalg.det(aff[:3, :3]))
    if not math.isfinite(det) or abs(det) < 1e-12:
        raise ValueError("the image's affine is not invertible (zero voxel size?)")
    return img


def _decode_npy(data: bytes, max_pixels: int) -> np.ndarray:
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError/SyntaxError/...
        raise ValueError(f"not a readable .npy array ({type(e).__name__}: {e})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise ValueError(f"unsupported .npy dtype {dtype}; send float32")
    _check_slice_shape(tuple(shape), max_pixels)
    count = math.prod(shape)
    start = f.tell()
    if len(data) - start < count * dtype.itemsize:
        raise ValueError(f".npy data is truncated ({len(data) - start} of "
                         f"{count * dtype.itemsize} bytes)")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape, order="F" if fortran else "C").astype(np.float32)


def _check_slice_shape(shape: tuple, max_pixels: int) -> None:
    if len(shape) == 2:
        h, w = shape
    elif len(shape) == 3 and shape[0] == 3:
        _, h, w = shape
    else:
        raise ValueError(f"expected a 2-D slice (h, w) or a triplet (3, h, w), got shape {shape}")
    if h == 0 or w == 0:
        raise ValueError(f"empty slice, shape {shape}")
    if h * w > max_pixels:
        raise TooLarge(f"slice of {h}x{w} = {h * w} pixels; the limit is {max_pixels}")


def _decode_png(data: bytes, max_pixels: int) -> np.ndarray:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data), formats=["PNG"])
    except Image.DecompressionBombError as e:
        raise TooLarge(f"PNG too large ({e})") from None
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"not a readable PNG ({type(e).__name__}: {e})") from None
    w, h = img.size
    _check_slice_shape((h, w), max_pixels)
    if img.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
        raise ValueError(f"expected a grayscale PNG (8/16-bit), got mode {img.mode}")
    try:
        img.load()
        return np.asarray(img, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - truncated/corrupt PNG data
        raise ValueError(f"corrupt or truncated PNG ({type(e).__name__}: {e})") from None


def decode_slice(data: bytes, max_pixels: int) -> np.ndarray:
    """``.npy`` or PNG bytes -> a float32 LR triplet (3, h, w).

    A single 2-D slice becomes (slice, slice, slice), as the edge slices of a volume do in
    :meth:`Predictor.predict_volume`.
    """
    if len(data) == 0:
        raise ValueError("empty request body")
    if data.startswith(NPY_MAGIC):
        arr = _decode_npy(data, max_pixels)
    elif data.startswith(PNG_MAGIC):
        arr = _decode_png(data, max_pixels)
    else:
        raise ValueError("expected a .npy array or a PNG image")
    if not np.isfinite(arr).all():
        raise ValueError("slice contains NaN or inf pixels")
    if arr.ndim == 2:
        arr = np.stack([arr, arr, arr])
    return np.ascontiguousarray(arr, dtype=np.float32)


def extract_multipart(body: bytes, content_type: str, field: str = "file") -> bytes:
    """The content of form field ``field`` (or the only file part) of a multipart body,
    parsed in memory (no temporary files)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "multipart body without a boundary")
    parts: list[dict] = []
    state: dict[str, Any] = {}

    def on_part_begin():
        if len(parts) >= MAX_MULTIPART_PARTS:
            raise ApiError(400, "bad_request", f"more than {MAX_MULTIPART_PARTS} multipart parts")
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
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 - python-multipart raises its own types
        raise ApiError(400, "bad_request", f"malformed multipart body ({e})") from None
    chosen = None
    for p in parts:
        _, opts = parse_options_header(p["headers"].get(b"content-disposition", b""))
        if opts.get(b"name") == field.encode():
            chosen = p
            break
    if chosen is None:
        files = [p for p in parts if b"filename" in parse_options_header(
            p["headers"].get(b"content-disposition", b""))[1]]
        if len(files) != 1:
            raise ApiError(422, "invalid_input", f"multipart body needs a file field "
                           f"named {field!r}")
        chosen = files[0]
    return b"".join(chosen["data"])


# --------------------------------------------------------------------------- request helpers


class Deadline:
    """A request's time budget, shared with the worker thread computing it."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.seconds = seconds
        self.cancelled = threading.Event()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self, *_):
        if self.cancelled.is_set():
            raise Aborted("request cancelled (client disconnected)")
        if self.remaining() <= 0:
            raise Aborted(f"request took longer than {self.seconds:g} s")


def media_type(request: Request, allowed: set[str]) -> str | None:
    """The request's media type if acceptable (None when absent), else 415."""
    ctype = request.headers.get("content-type")
    if not ctype:
        return None
    mt = ctype.split(";", 1)[0].strip().lower()
    if mt in allowed or mt == MULTIPART:
        return mt
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {mt!r} not accepted here; use one of "
                   f"{sorted(allowed | {MULTIPART})}")


async def read_body(request: Request, max_bytes: int, deadline: Deadline) -> bytes:
    """The request body, at most ``max_bytes``: Content-Length is checked before anything is
    read, then the streamed bytes are counted (chunked uploads have no Content-Length)."""
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
            if n < 0:
                raise ValueError
        except ValueError:
            raise ApiError(400, "bad_request", f"invalid Content-Length {cl!r}") from None
        if n > max_bytes:
            raise ApiError(413, "too_large", f"body of {n} bytes exceeds the limit of "
                           f"{max_bytes} bytes (serve.max_body_bytes)")
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        left = deadline.remaining()
        if left <= 0:
            raise ApiError(408, "timeout", f"request body not received within "
                           f"{deadline.seconds:g} s")
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=left)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ApiError(408, "timeout", f"request body not received within "
                           f"{deadline.seconds:g} s") from None
        except ClientDisconnect:
            raise ApiError(400, "bad_request", "client disconnected during upload") from None
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "too_large", f"body exceeds the limit of {max_bytes} bytes "
                           f"(serve.max_body_bytes)")
        chunks.append(chunk)
    if size == 0:
        raise ApiError(422, "invalid_input", "empty request body")
    return b"".join(chunks)


def parse_scale(request: Request, scales: list[int]) -> int:
    raw = request.query_params.get("scale")
    if raw is None:
        if len(scales) == 1:
            return scales[0]
        raise ApiError(422, "invalid_input", f"query parameter scale is required (one of {scales})")
    try:
        scale = int(raw)
    except ValueError:
        raise ApiError(422, "invalid_input", f"scale must be an integer, got {raw[:20]!r}") from None
    if scale not in scales:
        raise ApiError(422, "unsupported_scale",
                       f"scale {scale} not supported by this checkpoint (trained for {scales})")
    return scale


def parse_bool(request: Request, name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise ApiError(422, "invalid_input", f"{name} must be true or false, got {raw[:20]!r}")


# --------------------------------------------------------------------------- the service


@dataclass
class SliceJob:
    lr: np.ndarray  # (3, h, w) z-scored LR triplet
    scale: int


class Service:
    """Everything behind the routes, independent of Serve: the predictor, the limits, the key
    check and two single-thread executors (volumes; slice batches). One volume computes at a
    time per replica, which bounds memory; slice batches do not queue behind it.

    Args:
        predictor: a loaded :class:`pgasr.inference.Predictor`.
        cfg: the run config (``cfg.serve`` limits, ``cfg.data.head_threshold``).
        keys: the API-key check.
        submit_slice: ``async (SliceJob) -> np.ndarray``; in Serve the ``@serve.batch``
            method, which calls :meth:`run_slice_batch` with jobs from many requests. Used
            through :meth:`submit`.
    """

    def __init__(self, predictor, cfg: RunConfig, keys: KeyChecker,
                 submit_slice: Callable | None = None):
        self.predictor = predictor
        self.cfg = cfg
        self.scfg = cfg.serve
        self.keys = keys
        self.submit_slice = submit_slice or self._submit_unbatched
        self.slices_inflight = 0  # slice jobs submitted and not yet answered
        self.scales = list(predictor.scales)
        self.volume_pool = ThreadPoolExecutor(1, thread_name_prefix="pgasr-volume")
        self.slice_pool = ThreadPoolExecutor(1, thread_name_prefix="pgasr-slices")
        self.inflight = 0
        self.replica_id = os.urandom(6).hex()  # changes when a replica is replaced
        self.batches: list[int] = []  # sizes of recent slice batches (for /readyz and tests)
        html = STATIC_DIR / "index.html"
        self.viewer_html = html.read_text() if html.is_file() else None

    # -- slices
    def run_slice_batch(self, jobs: list[SliceJob]) -> list:
        """Super-resolve jobs from any number of requests: same (scale, h, w) are stacked
        into one ``predict_triplets`` call. Returns, per job, an array or the exception."""
        self.batches = (self.batches + [len(jobs)])[-100:]
        out: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault((j.scale, j.lr.shape), []).append(i)
        for (scale, _), idx in groups.items():
            try:
                sr = self.predictor.predict_triplets(np.stack([jobs[i].lr for i in idx]), scale)
                for k, i in enumerate(idx):
                    out[i] = sr[k]
            except Exception as e:  # noqa: BLE001 - handed to each caller of the group
                for i in idx:
                    out[i] = e
        return out

    async def run_slice_batch_async(self, jobs: list[SliceJob]) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.slice_pool, self.run_slice_batch, jobs)

    async def _submit_unbatched(self, job: SliceJob):
        return (await self.run_slice_batch_async([job]))[0]

    async def submit(self, job: SliceJob):
        """Super-resolve one slice job: through the batcher while other slice jobs are in
        flight (they, or later ones, can share its batch), directly when it is alone, so a
        lone request does not wait ``batch_wait_timeout_s`` for company that is not coming."""
        self.slices_inflight += 1
        try:
            if self.slices_inflight == 1:
                return await self._submit_unbatched(job)
            return await self.submit_slice(job)
        finally:
            self.slices_inflight -= 1

    def prepare_slice(self, body: bytes, normalise: bool) -> tuple[np.ndarray, float, float]:
        """Bytes -> (z-scored triplet (3, h, w), mean, std); normalised per triplet as a
        volume is (``normalise_volume``), or passed through when ``normalise`` is False."""
        from pgasr.inference import normalise_volume

        trip = decode_slice(body, self.scfg.max_slice_pixels)
        if not normalise:
            return trip, 0.0, 1.0
        z, mean, std = normalise_volume(np.moveaxis(trip, 0, 2), self.cfg.data.head_threshold)
        return np.ascontiguousarray(np.moveaxis(z, 2, 0)), mean, std

    # -- volumes
    def run_volume(self, body: bytes, scale: int, deadline: Deadline) -> tuple[bytes, tuple]:
        """NIfTI bytes -> SR .nii.gz bytes, via ``Predictor.predict_image`` (as ``pgasr sr``).
        Runs in the volume thread; stops between slice chunks once the deadline passes."""
        from pgasr.data.ixi import image_to_bytes

        deadline.check()
        img = decode_nifti(body, self.scfg.max_voxels)
        del body
        deadline.check()
        sr = self.predictor.predict_image(img, scale, progress=deadline.check)
        deadline.check()
        return image_to_bytes(sr, gz=True), tuple(int(s) for s in sr.shape)

    def limits(self) -> dict:
        s = self.scfg
        return {"max_body_bytes": s.max_body_bytes, "max_voxels": s.max_voxels,
                "max_slice_pixels": s.max_slice_pixels, "request_timeout_s": s.request_timeout_s,
                "max_batch_size": s.max_batch_size}

    def close(self) -> None:
        self.volume_pool.shutdown(wait=False, cancel_futures=True)
        self.slice_pool.shutdown(wait=False, cancel_futures=True)


async def _in_thread(pool: ThreadPoolExecutor, deadline: Deadline, fn, *args):
    """Run ``fn`` in ``pool``; if the request is cancelled (client gone, proxy timeout) the
    deadline is flagged so the computation stops at its next check."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(pool, fn, *args)
    try:
        # The computation checks the deadline itself; the extra grace only guards a worker
        # thread stuck outside those checks.
        return await asyncio.wait_for(asyncio.shield(fut), timeout=max(deadline.remaining(), 0) + 30)
    except asyncio.TimeoutError:
        deadline.cancelled.set()
        raise Aborted(f"request took longer than {deadline.seconds:g} s") from None
    except asyncio.CancelledError:
        deadline.cancelled.set()
        raise


@dataclass
class V1Call:
    """A ``POST /v1/sr*`` request after the shared prologue (``make_api``'s ``v1_call``)."""

    scale: int
    flags: dict[str, bool]
    deadline: Deadline
    body: bytes
    t0: float  # perf_counter at admission, for X-PGASR-Seconds


def _map_compute_errors(e: BaseException) -> ApiError | None:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, TooLarge):
        return ApiError(413, "too_large", str(e))
    if isinstance(e, Aborted):
        return ApiError(408, "timeout", str(e))
    if isinstance(e, ValueError):
        return ApiError(422, "invalid_input", str(e))
    return None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def make_api(svc: Service) -> FastAPI:
    """The FastAPI app of one replica (usable without Serve, e.g. with httpx's ASGI
    transport)."""
    app = FastAPI(title="PGASR", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return _error(e.status, e.code, e.detail, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _error(e.status_code, code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return _error(422, "invalid_input", str(e.errors())[:500])

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        log.exception("unhandled error")
        return _error(500, "internal", "internal error (logged on the server)")

    def _guard(e: BaseException):
        api = _map_compute_errors(e)
        if api is None:
            raise e
        raise api from None

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        b = svc.batches
        return {"ready": True, "replica": svc.replica_id, "scales": svc.scales,
                "inflight": svc.inflight,
                "device": str(svc.predictor.device), "torch_threads": _torch_threads(),
                "slice_batches": {"recent": len(b), "max_size": max(b, default=0)}}

    @app.get("/")
    async def viewer():
        if svc.viewer_html is None:
            raise ApiError(404, "not_found", "the web viewer (serve/static/index.html) is missing")
        return HTMLResponse(svc.viewer_html, headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                       "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:",
            "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer"})

    @app.get("/v1/model")
    async def model(request: Request):
        svc.keys.check(request.headers)
        return JSONResponse({**svc.predictor.describe(), "limits": svc.limits()},
                            headers={"Cache-Control": "no-store"})

    @contextlib.asynccontextmanager
    async def v1_call(request: Request, allowed: set[str],
                      flags: dict[str, bool] | None = None) -> AsyncIterator[V1Call]:
        """The prologue and epilogue every ``POST /v1/sr*`` route shares: API key, ``scale``,
        boolean query ``flags`` (name -> default), media type, deadline, the body (read under
        the size cap, multipart unwrapped) and the in-flight count; input and compute errors
        raised inside the block become JSON 4xx (others reach the 500 handler)."""
        svc.keys.check(request.headers)
        scale = parse_scale(request, svc.scales)
        parsed = {k: parse_bool(request, k, d) for k, d in (flags or {}).items()}
        mt = media_type(request, allowed)
        deadline = Deadline(svc.scfg.request_timeout_s)
        svc.inflight += 1
        t0 = time.perf_counter()
        try:
            body = await read_body(request, svc.scfg.max_body_bytes, deadline)
            if mt == MULTIPART:
                body = extract_multipart(body, request.headers["content-type"])
            yield V1Call(scale, parsed, deadline, body, t0)
        except (ApiError, ValueError, Aborted) as e:
            _guard(e)
        finally:
            svc.inflight -= 1

    def sr_response(call: V1Call, data: bytes, media: str, suffix: str, shape) -> Response:
        return Response(data, media_type=media, headers={
            "Content-Disposition": f'attachment; filename="sr_x{call.scale}{suffix}"',
            "X-PGASR-Shape": ",".join(map(str, shape)), "X-PGASR-Scale": str(call.scale),
            "X-PGASR-Seconds": f"{time.perf_counter() - call.t0:.3f}",
            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    @app.post("/v1/sr")
    async def sr_volume(request: Request):
        async with v1_call(request, VOLUME_TYPES) as call:
            data, shape = await _in_thread(svc.volume_pool, call.deadline, svc.run_volume,
                                           call.body, call.scale, call.deadline)
        return sr_response(call, data, "application/gzip", ".nii.gz", shape)

    @app.post("/v1/sr/slice")
    async def sr_slice(request: Request):
        async with v1_call(request, SLICE_TYPES, {"normalise": True}) as call:
            normalise = call.flags["normalise"]
            # decoding + percentiles of up to 3 x max_slice_pixels: off the event loop
            lr, mean, std = await asyncio.get_running_loop().run_in_executor(
                None, svc.prepare_slice, call.body, normalise)
            try:
                res = await asyncio.wait_for(svc.submit(SliceJob(lr, call.scale)),
                                             timeout=max(call.deadline.remaining(), 0.001))
            except asyncio.TimeoutError:
                raise ApiError(408, "timeout", f"request took longer than "
                               f"{call.deadline.seconds:g} s") from None
            if isinstance(res, BaseException):
                raise res
            sr = (res * std + mean).astype(np.float32) if normalise else res
            buf = io.BytesIO()
            np.save(buf, sr, allow_pickle=False)
        return sr_response(call, buf.getvalue(), "application/x-npy", ".npy", sr.shape)

    return app


# --------------------------------------------------------------------------- Serve


@serve.deployment(name="PGASR")
@serve.ingress()
class PGASRServer:
    """One replica: a Predictor, the slice batcher and the FastAPI app (late-bound, built in
    the replica after the model is loaded). Options come from ``ServeConfig`` in
    :func:`build_app`."""

    def __init__(self, cfg: dict):
        from pgasr.inference import Predictor

        run_cfg = config_from_dict(cfg, "serve app")
        # nibabel logs a line per odd header field; hostile uploads would flood the logs.
        logging.getLogger("nibabel").setLevel(logging.ERROR)
        s = run_cfg.serve
        keys = load_api_keys(s)
        if not keys:
            log.warning("SERVING WITHOUT AUTHENTICATION (serve.allow_no_auth=true): anyone who "
                        "can reach this port can use the API; development only")
        import torch

        # Intra-op threads = the CPUs this replica reserved (Ray's OMP_NUM_THREADS says the
        # same); results are bitwise reproducible for a given thread count.
        torch.set_num_threads(max(1, int(s.cpus_per_replica)))
        predictor = Predictor.from_checkpoint(s.checkpoint, device="auto", bf16=s.bf16,
                                              batch_size=s.max_batch_size)
        self._sr_batch.set_max_batch_size(s.max_batch_size)
        self._sr_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.service = Service(predictor, run_cfg, KeyChecker(keys, s.allow_no_auth),
                               submit_slice=self._sr_batch)
        log.info("PGASR replica ready: checkpoint=%s scales=%s device=%s", s.checkpoint,
                 predictor.scales, predictor.device)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _sr_batch(self, jobs: list[SliceJob]) -> list:
        return await self.service.run_slice_batch_async(jobs)

    def __serve_build_asgi_app__(self):
        return make_api(self.service)

    def check_health(self):
        if self.service.volume_pool._shutdown or self.service.slice_pool._shutdown:
            raise RuntimeError("executors shut down")

    def __del__(self):
        svc = getattr(self, "service", None)
        if svc is not None:
            svc.close()


def validate_serve_config(s: ServeConfig) -> None:
    """Checks of ``serve.*`` values that types alone cannot express."""
    if not s.checkpoint:
        raise ConfigError("serve.checkpoint is not set (a stage-2 checkpoint directory)")
    checks = [
        (s.max_batch_size >= 1, "serve.max_batch_size must be >= 1"),
        (s.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s must be >= 0"),
        (0 <= s.min_replicas <= s.max_replicas, "serve.min_replicas must be in [0, max_replicas]"),
        (s.max_replicas >= 1, "serve.max_replicas must be >= 1"),
        (s.target_ongoing_requests > 0, "serve.target_ongoing_requests must be > 0"),
        (s.max_ongoing_requests >= 1, "serve.max_ongoing_requests must be >= 1"),
        (s.max_queued_requests >= 1 or s.max_queued_requests == -1,
         "serve.max_queued_requests must be >= 1 (or -1: unbounded)"),
        (s.max_body_bytes >= 1024, "serve.max_body_bytes must be >= 1024"),
        (s.max_voxels >= 1, "serve.max_voxels must be >= 1"),
        (s.max_slice_pixels >= 1, "serve.max_slice_pixels must be >= 1"),
        (s.request_timeout_s > 0, "serve.request_timeout_s must be > 0"),
        (s.gpus_per_replica >= 0 and s.cpus_per_replica >= 0,
         "serve.gpus_per_replica / cpus_per_replica must be >= 0"),
        (1 <= s.port <= 65535, "serve.port must be in 1..65535"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def _parse_args(args: dict | None) -> tuple[str | None, list[str]]:
    args = dict(args or {})
    config = args.pop("config", None)
    overrides = args.pop("overrides", None) or []
    if isinstance(overrides, str):
        overrides = [overrides]
    if not isinstance(overrides, (list, tuple)):
        raise ConfigError(f"build_app: overrides must be a list of key.sub=value, got {overrides!r}")
    overrides = [str(o) for o in overrides]
    # `serve run serve.app:build_app config=... serve.checkpoint=...` passes dotted keys.
    for k in [k for k in args if "." in k]:
        overrides.append(f"{k}={args.pop(k)}")
    if args:
        raise ConfigError(f"build_app: unknown argument(s) {sorted(args)}; expected config, "
                          f"overrides, or key.sub=value")
    return config, overrides


def load_serve_config(args: dict | None) -> RunConfig:
    """The run config an application builder's ``args`` describe, with ``serve.*`` checked
    and relative paths made absolute (replicas do not share the builder's cwd)."""
    config, overrides = _parse_args(args)
    cfg = load_config(config, overrides)
    s = cfg.serve
    validate_serve_config(s)
    s.checkpoint = str(Path(s.checkpoint).expanduser().resolve())
    if not Path(s.checkpoint).is_dir():
        raise ConfigError(f"serve.checkpoint: {s.checkpoint} is not a directory")
    if s.api_keys_file:
        s.api_keys_file = str(Path(s.api_keys_file).expanduser().resolve())
    return cfg


def build_app(args: dict | None = None):
    """Serve application builder.

    Args:
        args: ``{"config": <yaml path or None>, "overrides": ["serve.checkpoint=...", ...]}``;
            keys containing a dot are taken as overrides too (``serve run`` style).

    Returns:
        A bound Serve ``Application``. Fails here, before anything is deployed, on a bad
        config, a missing checkpoint directory or missing API keys.
    """
    cfg = load_serve_config(args)
    s = cfg.serve
    if not load_api_keys(s):
        log.warning("serve.allow_no_auth=true and no API keys: THE API IS UNAUTHENTICATED")
    if s.min_replicas == s.max_replicas:
        scaling: dict[str, Any] = {"num_replicas": s.max_replicas}
    else:
        scaling = {"autoscaling_config": {
            "min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests}}
    dep = PGASRServer.options(
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        **scaling,
    )
    return dep.bind(config_to_dict(cfg))


def http_options(s: ServeConfig) -> dict:
    """Serve proxy options for ``serve.start``. The proxy's own timeout is a little longer
    than the app's so the app answers its own JSON 408 first."""
    return {"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s + 30}


def main(argv: list[str] | None = None) -> int:
    """``python -m serve.app --config configs/tiny.yaml --set serve.checkpoint=...``:
    start (or join) Ray, bind Serve's proxy to ``serve.host:serve.port`` and run the app."""
    p = argparse.ArgumentParser(prog="python -m serve.app", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", default=None, help="Ray address (default: local / RAY_ADDRESS)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = {"config": a.config, "overrides": a.set}
        app = build_app(args)
        s = load_serve_config(args).serve
    except ConfigError as e:
        print(f"serve.app: error: {e}", file=sys.stderr)
        return 2
    import ray

    if s.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s:%d: anything that can reach this address can call the API "
                    "(an API key is still required); put TLS in front", s.host, s.port)
    ray.init(address=a.address)
    serve.start(http_options=http_options(s))
    serve.run(app, name="pgasr", route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
