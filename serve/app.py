"""PGASR over HTTP: a Ray Serve application around :class:`pgasr.inference.Predictor`.

``build_app(args)`` is a Serve application builder::

    serve run serve.app:build_app config=configs/tiny.yaml serve.checkpoint=runs/tiny/stage2
    python -m serve.app --config configs/tiny.yaml --set serve.checkpoint=runs/tiny/stage2

and is what ``cluster/kuberay/rayservice.yaml`` imports (``args: {config, overrides}``).
Nothing starts at import time.

One deployment, :class:`PGASRServer`, is both the FastAPI ingress and the model holder (no
second hop for volumes that can be hundreds of MB). Its app is built in the replica, after the
model is loaded, by Serve's deferred ingress (``@serve.ingress()`` with
``__serve_build_asgi_app__``, the documented form for an app that needs the replica's state);
:func:`make_api` builds the same app without Serve for in-process tests. Query parameters are
typed (FastAPI), the API key is a dependency checked before them, and ``/openapi.json`` +
``/docs`` document it all (``serve.docs``). Routes (``docs/serve.md``):

* ``POST /v1/sr?scale=2[&contrast=T1w][&resample=true]`` .nii/.nii.gz or DICOM-series .zip
  body (raw or multipart field ``file``) -> SR volume as .nii.gz; exactly
  ``Predictor.predict_image``, the code path of ``pgasr sr``.
* ``POST /v1/sr/slice?scale=2``  2-D ``.npy``/PNG slice or a (3, h, w) ``.npy`` triplet -> SR
  slice as ``.npy``; slices of concurrent requests share ``@serve.batch`` batches.
* ``GET /v1/model``              ``Predictor.describe()`` plus the service limits.
* ``GET /healthz``, ``GET /readyz``, ``GET /`` (the web viewer, ``serve/static/index.html``).

Every ``/v1`` route needs an API key (``X-API-Key`` or ``Authorization: Bearer``). Serve
itself has no authentication and no body limit, so both are enforced here, before the body is
read. Input decoding and every limit on it live in :mod:`serve.decoding` (pure functions);
this module maps their typed errors to JSON ``{"error": code, "detail": reason}``, and any
other failure to a JSON 500. Nothing from a request is ever used as a filesystem path.
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
import re
import sys
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable

import numpy as np
from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import AfterValidator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pgasr.config import (SCALES, ConfigError, RunConfig, ServeConfig, config_from_dict,
                          config_to_dict, load_config, revalidate)
from serve.decoding import (
    InputError,
    Limits,
    OutputError,
    TooLarge,
    check_content_length,
    check_finite,
    check_output_size,
    decode_dicom_zip,
    decode_nifti,
    decode_slice,
    extract_multipart,
    is_zip,
)

log = logging.getLogger("pgasr.serve")

__all__ = [
    "ApiError",
    "JsonErrors",
    "KeyChecker",
    "PGASRServer",
    "TooLarge",
    "build_app",
    "decode_nifti",
    "decode_slice",
    "extract_multipart",
    "load_api_keys",
    "main",
    "replica_memory_bytes",
]

STATIC_DIR = Path(__file__).resolve().parent / "static"
MIN_KEY_CHARS = 16
WORKER_GRACE_S = 30.0  # a worker this long past its job's deadline is stuck (health check)
GZIP_LEVEL = 6  # of the answer (.nii.gz), as pgasr.data.ixi.image_to_bytes
RETRY_AFTER_S = 5  # Retry-After of a 503 "busy"

# Ray `memory` of one replica (replica_memory_bytes): the process plus the buffers the caps
# size. Per-voxel figures: numpy/Python peak of Service.run_volume under tracemalloc, 66-83 B
# per input voxel at x2 (256x256x16, 128x128x64). Model activations of one chunk of
# max_batch_size slices come on top and depend on the model (tiny test model, 16 slices of
# 512x512 HR: +2.2 GiB): set serve.memory_per_replica for a real model.
REPLICA_BASE_BYTES = 2**30  # Python, torch, the Ray worker, a small model (tiny: ~0.9 GB RSS)
VOLUME_BYTES_PER_INPUT_VOXEL = 24  # decoded bytes + loaded array (<= 8 each) + 2 float32 copies
VOLUME_BYTES_PER_OUTPUT_VOXEL = 16  # SR array, denormalised/reoriented copy, answer, slack
SLICE_BYTES_PER_OUTPUT_PIXEL = 12  # per ongoing slice: SR, its denormalised copy, the .npy

# Media types per route; a missing Content-Type is accepted and the body is sniffed.
VOLUME_TYPES = {"application/octet-stream", "application/gzip", "application/x-gzip",
                "application/x-nifti", "application/nifti", "application/zip"}
SLICE_TYPES = {"application/octet-stream", "application/x-npy", "application/npy", "image/png"}
MULTIPART = "multipart/form-data"


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An HTTP error answered as JSON ``{"error": code, "detail": detail}``."""

    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


class Aborted(Exception):
    """The request's deadline passed or its client went away while it was computing."""


def _error(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
    h = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", **(headers or {})}
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=h)


def _map_compute_errors(e: BaseException) -> ApiError | None:
    """The JSON answer of an error raised while handling a request (None: unexpected)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, (InputError, OutputError)):
        return ApiError(e.status, e.code, e.reason)
    if isinstance(e, FloatingPointError):  # Predictor's own non-finite output check
        return ApiError(500, OutputError.code, str(e))
    if isinstance(e, Aborted):
        return ApiError(408, "timeout", str(e))
    if isinstance(e, ValueError):
        return ApiError(422, "invalid_input", str(e))
    return None


class JsonErrors:
    """ASGI middleware: an exception that escapes the routes and their handlers becomes a
    logged JSON 500, never Starlette's or Serve's plain-text one. Only when the response has
    already started is it re-raised (the connection is then cut)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:  # noqa: BLE001 - the point: nothing escapes as plain text
            log.exception("unhandled error")
            if started:
                raise
            answer = _map_compute_errors(e) or ApiError(
                500, "internal", f"internal error ({type(e).__name__}; logged on the server)")
            await _error(answer.status, answer.code, answer.detail, answer.headers)(
                scope, receive, send)


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


@dataclass(frozen=True)
class BodyTimeouts:
    """How long a request body may take: in all (``total_s``, ``serve.body_timeout_s``) and
    between two chunks (``idle_s``, ``serve.body_idle_timeout_s``); never past the
    request's own deadline."""

    total_s: float
    idle_s: float


async def _next_chunk(stream, deadline: Deadline, body_end: float,
                      timeouts: BodyTimeouts) -> bytes | None:
    """The next chunk of a request body (None at its end), or a 408 once a timeout passes."""
    waits = {f"no body bytes for {timeouts.idle_s:g} s (serve.body_idle_timeout_s)": timeouts.idle_s,
             f"request body not received within {timeouts.total_s:g} s (serve.body_timeout_s)":
                 body_end - time.monotonic(),
             f"request body not received within {deadline.seconds:g} s": deadline.remaining()}
    reason, wait = min(waits.items(), key=lambda kv: kv[1])
    if wait <= 0:
        raise ApiError(408, "timeout", reason)
    try:
        return await asyncio.wait_for(stream.__anext__(), timeout=wait)
    except StopAsyncIteration:
        return None
    except asyncio.TimeoutError:
        raise ApiError(408, "timeout", reason) from None
    except ClientDisconnect:
        raise ApiError(400, "bad_request", "client disconnected during upload") from None


async def read_body(request: Request, max_bytes: int, deadline: Deadline,
                    timeouts: BodyTimeouts) -> bytes:
    """The request body, at most ``max_bytes``: Content-Length is checked before anything is
    read, then the streamed bytes are counted (chunked uploads have no Content-Length); a
    body that stops arriving is a 408 after ``timeouts``, not after the request deadline."""
    declared = check_content_length(request.headers.get("content-length"), max_bytes)
    body_end = time.monotonic() + timeouts.total_s
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while (chunk := await _next_chunk(stream, deadline, body_end, timeouts)) is not None:
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"body exceeds the limit of {max_bytes} bytes (serve.max_body_bytes)")
        chunks.append(chunk)
    if declared is not None and size < declared:
        raise ApiError(400, "bad_request", f"body of {size} bytes is shorter than its "
                       f"Content-Length of {declared}")
    if size == 0:
        raise InputError("empty request body")
    return b"".join(chunks)


def check_scale(scale: int | None, scales: list[int]) -> int:
    """``?scale=`` (typed 2 or 4 by the route) against the scales this replica's checkpoints
    were trained for; may be left out when there is one."""
    if scale is None:
        if len(scales) == 1:
            return scales[0]
        raise ApiError(422, "invalid_input", f"query parameter scale is required (one of {scales})")
    if scale not in scales:
        raise ApiError(422, "unsupported_scale",
                       f"scale {scale} not supported by this checkpoint (trained for {scales})")
    return scale


def _contrast(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9]{1,32}", raw):
        raise ValueError(f"contrast must be 1-32 letters/digits (T1, T2w, FLAIR, ...), "
                         f"got {raw[:20]!r}")
    return raw


# The typed query parameters of the /v1 routes (validated by FastAPI before the body is read;
# a failure is a JSON 422 naming the parameter; documented in /openapi.json).
def _scale(v: int | None) -> int | None:
    if v is not None and v not in SCALES:
        raise ValueError(f"scale must be one of {list(SCALES)}, got {v}")
    return v


ScaleQuery = Annotated[int | None, AfterValidator(_scale), Query(
    json_schema_extra={"enum": list(SCALES)},
    description="SR factor; may be left out when the served checkpoints have one scale")]
ContrastQuery = Annotated[str | None, AfterValidator(lambda v: v and _contrast(v)), Query(
    max_length=64, description="what the upload is (T1w, T2w, FLAIR, ...): the answer carries "
    "X-PGASR-Warning when the model was trained on another contrast")]
ResampleQuery = Annotated[bool, Query(
    description="resample an anisotropic volume to the training voxel size first")]
NormaliseQuery = Annotated[bool, Query(
    description="z-score the slice with its own statistics and return it in the input's units")]


def _validation_detail(errors) -> str:
    """``scale (query): Input should be 2 or 4; ...`` from FastAPI's validation errors."""
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ())]
        where = f"{'.'.join(loc[1:])} ({loc[0]})" if len(loc) > 1 else ".".join(loc)
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)[:500] or "invalid request"


# --------------------------------------------------------------------------- job slots


class Slot:
    """One admitted job's place in a :class:`JobSlots`; released exactly once, from any
    thread, when the job ends (or when its request fails before handing it over)."""

    def __init__(self, slots: "JobSlots"):
        self._slots = slots
        self._held = True
        self.handed_over = False

    def release(self) -> None:
        with self._slots.lock:
            if not self._held:
                return
            self._held = False
            self._slots.used -= 1

    def hand_over(self, fut: Future) -> None:
        """From now on the job's future releases the slot when it is done (finished,
        failed or cancelled), however long after its request that is."""
        self.handed_over = True
        fut.add_done_callback(lambda _: self.release())


class JobSlots:
    """At most ``capacity`` jobs admitted and not finished (thread-safe). A job keeps its
    slot until it really ends, even after its request gave up on it, so jobs stuck behind a
    stuck worker cannot pile up."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.lock = threading.Lock()

    def take(self) -> Slot | None:
        """A slot, or None when all ``capacity`` are in use."""
        with self.lock:
            if self.used >= self.capacity:
                return None
            self.used += 1
        return Slot(self)


# --------------------------------------------------------------------------- the service


@dataclass
class SliceJob:
    lr: np.ndarray  # (3, h, w) LR triplet in model units
    scale: int


@dataclass
class VolumeJob:
    """One volume request's work for the volume thread. ``body`` is dropped as soon as it
    is decoded, or when the request gives up on a job that has not started."""

    body: bytes | None
    scale: int
    deadline: Deadline
    resample: bool = False  # ?resample=true: to the model's grid first, as pgasr sr does


class _GzipSink(io.RawIOBase):
    """A write-only file object that gzips what is written to it (for ``to_stream``): the
    answer is compressed while nibabel writes it, with no uncompressed copy of the volume.
    Same bytes as ``gzip.compress(raw, GZIP_LEVEL, mtime=0)``."""

    def __init__(self):
        super().__init__()
        self._z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        self._parts: list[bytes] = []
        self._pos = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self._parts.append(self._z.compress(data))
        self._pos += n
        return n

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos if whence == 0 else self._pos + pos
        if target < self._pos or whence == 2:
            raise io.UnsupportedOperation("gzip sink seeks forward only")
        self.write(bytes(target - self._pos))
        return self._pos

    def flush(self) -> None:
        pass

    def getvalue(self) -> bytes:
        return b"".join([*self._parts, self._z.flush()])


def encode_volume(img) -> tuple[bytes, tuple[int, ...]]:
    """An SR image -> (.nii.gz bytes, shape), after checking that every voxel is finite."""
    check_finite(np.asanyarray(img.dataobj), "volume")
    sink = _GzipSink()
    img.to_stream(sink)
    return sink.getvalue(), tuple(int(s) for s in img.shape)


class Service:
    """Everything behind the routes, independent of Serve: the predictor, the limits, the key
    check and two single-thread executors (volumes; slice batches). One volume computes at a
    time per replica, at most ``serve.max_volume_queue`` are admitted (computing + waiting),
    which bounds memory; slice batches do not queue behind it.

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
        self.caps = Limits.from_config(cfg.serve)
        self.keys = keys
        self.submit_slice = submit_slice or self._submit_unbatched
        self.slices_inflight = 0  # slice jobs submitted and not yet answered
        self.scales = list(predictor.scales)
        self.volume_pool = ThreadPoolExecutor(1, thread_name_prefix="pgasr-volume")
        self.slice_pool = ThreadPoolExecutor(1, thread_name_prefix="pgasr-slices")
        self.volume_slots = JobSlots(cfg.serve.max_volume_queue)
        self.volume_running: Deadline | None = None  # the deadline of the volume computing
        self.worker_grace_s = WORKER_GRACE_S
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

    def prepare_slice(self, body: bytes, normalise: bool,
                      scale: int = 1) -> tuple[np.ndarray, float, float]:
        """Bytes -> (triplet (3, h, w) in model units, offset, scale factor); normalised per
        triplet as a volume is (``normalise_volume``), or passed through when ``normalise``
        is False. The output size at ``scale`` is checked too."""
        from pgasr.inference import normalise_volume

        trip = decode_slice(body, self.caps, scale)
        if not normalise:
            return trip, 0.0, 1.0
        z, mean, std = normalise_volume(np.moveaxis(trip, 0, 2), self.cfg.data.head_threshold)
        return np.ascontiguousarray(np.moveaxis(z, 2, 0)), mean, std

    # -- volumes
    def run_volume(self, job: VolumeJob) -> tuple[bytes, tuple]:
        """NIfTI bytes -> SR .nii.gz bytes, via ``Predictor.predict_image`` (as ``pgasr sr``).
        Runs in the volume thread; stops between slice chunks once the deadline passes. The
        body is released once decoded; the output is checked finite and gzipped as written."""
        body, job.body = job.body, None
        if body is None:
            raise Aborted("the request gave up on this volume before it started")
        self.volume_running = job.deadline
        try:
            job.deadline.check()
            decode = decode_dicom_zip if is_zip(body) else decode_nifti  # a DICOM series .zip
            img = decode(body, self.caps, job.scale, job.deadline.check)
            del body
            job.deadline.check()
            if job.resample:
                img = self.to_model_grid(img, job.scale)
            sr = self.predictor.predict_image(img, job.scale, progress=job.deadline.check)
            del img
            job.deadline.check()
            return encode_volume(sr)
        finally:
            self.volume_running = None

    def to_model_grid(self, img, scale: int):
        """``img`` on the model's grid (``pgasr sr``'s default), its size checked against
        the voxel caps from the header before anything is resampled."""
        shape = self.predictor.model_grid_shape(img, scale)
        n = math.prod(shape)
        if n > self.caps.max_voxels:
            raise TooLarge(f"on the model's grid this volume would have {n} voxels {shape}; "
                           f"the limit is {self.caps.max_voxels} (serve.max_voxels)")
        check_output_size(n, scale, self.caps, "volume on the model's grid")
        return self.predictor.to_model_grid(img, scale)[0]

    def health_problem(self) -> str | None:
        """Why this replica should be replaced (None: healthy): an executor shut down, or the
        volume worker still busy ``worker_grace_s`` after its job's deadline (stuck outside
        the deadline checks, holding the volume queue)."""
        if self.volume_pool._shutdown or self.slice_pool._shutdown:
            return "executors shut down"
        running = self.volume_running
        if running is not None and -running.remaining() > self.worker_grace_s:
            return (f"the volume worker is stuck: {-running.remaining():.0f} s past its job's "
                    f"{running.seconds:g} s deadline")
        return None

    def check_health(self) -> None:
        """Raise RuntimeError when :meth:`health_problem` finds one (Serve's health check)."""
        problem = self.health_problem()
        if problem:
            raise RuntimeError(problem)

    def limits(self) -> dict:
        s, c = self.scfg, self.caps
        return {"max_body_bytes": c.max_body_bytes, "max_voxels": c.max_voxels,
                "max_output_voxels": c.max_output_voxels, "max_slice_pixels": c.max_slice_pixels,
                "max_gzip_members": c.max_gzip_members, "max_volume_queue": s.max_volume_queue,
                "request_timeout_s": s.request_timeout_s, "body_timeout_s": s.body_timeout_s,
                "body_idle_timeout_s": s.body_idle_timeout_s, "max_batch_size": s.max_batch_size}

    def close(self) -> None:
        self.volume_pool.shutdown(wait=False, cancel_futures=True)
        self.slice_pool.shutdown(wait=False, cancel_futures=True)


def _abandon(fut: Future, deadline: Deadline, on_abandon: Callable[[], None] | None) -> None:
    """Give up on a job: its deadline is flagged (a running job stops at its next check),
    a queued one is cancelled, and ``on_abandon`` drops what it holds."""
    deadline.cancelled.set()
    fut.cancel()
    if on_abandon is not None:
        on_abandon()


async def _in_thread(pool: ThreadPoolExecutor, deadline: Deadline, grace_s: float, fn, *args,
                     slot: Slot | None = None, on_abandon: Callable[[], None] | None = None):
    """Run ``fn(*args)`` in ``pool``; if the request is cancelled (client gone, proxy
    timeout) or the job outlives its deadline by ``grace_s``, the job is abandoned
    (:func:`_abandon`). ``slot`` is released when the job really ends."""
    fut = pool.submit(fn, *args)
    if slot is not None:
        slot.hand_over(fut)
    try:
        # The computation checks the deadline itself; the extra grace only guards a worker
        # thread stuck outside those checks.
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)),
                                      timeout=max(deadline.remaining(), 0) + grace_s)
    except asyncio.TimeoutError:
        _abandon(fut, deadline, on_abandon)
        raise Aborted(f"request took longer than {deadline.seconds:g} s") from None
    except asyncio.CancelledError:
        _abandon(fut, deadline, on_abandon)
        raise


@dataclass
class V1Call:
    """A ``POST /v1/sr*`` request after the shared prologue (``make_api``'s ``v1_call``)."""

    scale: int
    deadline: Deadline
    body: bytes
    t0: float  # perf_counter at admission, for X-PGASR-Seconds
    slot: Slot | None = None  # the job slot, for routes admitted through JobSlots
    warning: str | None = None  # X-PGASR-Warning (e.g. another contrast than the model's)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _admit(slots: JobSlots | None) -> Slot | None:
    """A job slot, or a 503 when the replica's queue for this kind of job is full."""
    if slots is None:
        return None
    slot = slots.take()
    if slot is None:
        raise ApiError(503, "busy", f"{slots.capacity} volumes are already being computed or "
                       f"waiting on this replica (serve.max_volume_queue); retry later",
                       {"Retry-After": str(RETRY_AFTER_S)})
    return slot


# What the OpenAPI page says a /v1 POST takes: raw bytes (or multipart field ``file``).
def _body_doc(types: set[str], what: str) -> dict:
    binary = {"schema": {"type": "string", "format": "binary"}}
    content = {t: binary for t in sorted(types)}
    content[MULTIPART] = {"schema": {"type": "object", "required": ["file"],
                                     "properties": {"file": {"type": "string", "format": "binary"}}}}
    return {"requestBody": {"required": True, "description": what, "content": content}}


ERROR_RESPONSES = {
    code: {"description": what, "content": {"application/json": {"example": {
        "error": name, "detail": "why, in words"}}}}
    for code, name, what in [
        (401, "unauthorized", "no or a wrong API key"),
        (408, "timeout", "the body or the computation took too long"),
        (413, "too_large", "body, voxels or pixels over the service's caps (GET /v1/model)"),
        (415, "unsupported_media_type", "a Content-Type the route does not take"),
        (422, "invalid_input", "a bad query parameter or an input that is not a valid image"),
        (503, "busy", "the replica's queue is full (Retry-After)"),
    ]}


def make_api(svc: Service) -> FastAPI:
    """The FastAPI app of one replica (usable without Serve, e.g. with httpx's ASGI
    transport). ``serve.docs`` serves the OpenAPI schema at ``/openapi.json`` and its page at
    ``/docs`` (they describe the routes; every ``/v1`` call still needs a key)."""
    from pgasr import __version__

    docs = svc.scfg.docs
    app = FastAPI(title="PGASR", version=__version__,
                  description="MRI super-resolution (PGASR) over HTTP; docs/serve.md.",
                  docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.add_middleware(JsonErrors)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return _error(e.status, e.code, e.detail, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _error(e.status_code, code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return _error(422, "invalid_input", _validation_detail(e.errors()))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        log.exception("unhandled error")
        return _error(500, "internal", "internal error (logged on the server)")

    def _guard(e: BaseException):
        api = _map_compute_errors(e)
        if api is None:
            raise e
        raise api from None

    # The key is a dependency: FastAPI runs it before it validates the query, so a request
    # without a valid key learns nothing else. The two schemes document the headers.
    api_key = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="X-API-Key")
    bearer = HTTPBearer(auto_error=False, scheme_name="Bearer")

    async def authorised(request: Request, _key=Security(api_key), _bearer=Security(bearer)):
        svc.keys.check(request.headers)

    v1 = {"dependencies": [Depends(authorised)], "responses": ERROR_RESPONSES}

    @app.get("/healthz")
    async def healthz():
        problem = svc.health_problem()
        if problem:
            return _error(503, "unhealthy", problem)
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        b = svc.batches
        return {"ready": True, "replica": svc.replica_id, "scales": svc.scales,
                "inflight": svc.inflight, "volume_jobs": svc.volume_slots.used,
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

    @app.get("/v1/model", dependencies=v1["dependencies"],
             responses={401: ERROR_RESPONSES[401]})
    async def model():
        """The served model: ``Predictor.describe()`` and the service's limits."""
        return JSONResponse({**svc.predictor.describe(), "limits": svc.limits()},
                            headers={"Cache-Control": "no-store"})

    @contextlib.asynccontextmanager
    async def v1_call(request: Request, allowed: set[str], scale: int | None,
                      contrast: str | None = None, slots: JobSlots | None = None) -> AsyncIterator[V1Call]:
        """The prologue and epilogue every ``POST /v1/sr*`` route shares after the key and the
        typed query: ``scale`` against the checkpoints, the contrast warning, media type, a
        job slot from ``slots``
        (503 when full, before the body is read), deadline, the body (read under the size
        cap and body timeouts, multipart unwrapped) and the in-flight count; input and
        compute errors raised inside the block become JSON 4xx/5xx (others reach
        :class:`JsonErrors`)."""
        scale = check_scale(scale, svc.scales)
        warning = svc.predictor.contrast_warning(contrast, scale) if contrast else None
        mt = media_type(request, allowed)
        deadline = Deadline(svc.scfg.request_timeout_s)
        timeouts = BodyTimeouts(svc.scfg.body_timeout_s, svc.scfg.body_idle_timeout_s)
        slot = _admit(slots)
        svc.inflight += 1
        t0 = time.perf_counter()
        try:
            body = await read_body(request, svc.caps.max_body_bytes, deadline, timeouts)
            if mt == MULTIPART:
                body = extract_multipart(body, request.headers["content-type"],
                                         max_parts=svc.caps.max_multipart_parts)
            call = V1Call(scale, deadline, body, t0, slot, warning)
            del body  # the route may drop call.body once it has handed it on
            yield call
        except (ApiError, ValueError, Aborted, OutputError, FloatingPointError) as e:
            _guard(e)
        finally:
            svc.inflight -= 1
            if slot is not None and not slot.handed_over:
                slot.release()

    def sr_response(call: V1Call, data: bytes, media: str, suffix: str, shape) -> Response:
        headers = {
            "Content-Disposition": f'attachment; filename="sr_x{call.scale}{suffix}"',
            "X-PGASR-Shape": ",".join(map(str, shape)), "X-PGASR-Scale": str(call.scale),
            "X-PGASR-Seconds": f"{time.perf_counter() - call.t0:.3f}",
            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        if call.warning:
            headers["X-PGASR-Warning"] = call.warning
        return Response(data, media_type=media, headers=headers)

    @app.post("/v1/sr", response_class=Response, **v1, openapi_extra=_body_doc(
        VOLUME_TYPES, "a 3-D volume: .nii / .nii.gz, or a .zip of one DICOM series"))
    async def sr_volume(request: Request, scale: ScaleQuery = None, contrast: ContrastQuery = None,
                        resample: ResampleQuery = False):
        """Super-resolve a volume through the slices of its acquisition plane (the code path
        of ``pgasr sr``); the answer is the SR volume as .nii.gz."""
        async with v1_call(request, VOLUME_TYPES, scale, contrast,
                           slots=svc.volume_slots) as call:
            job = VolumeJob(call.body, call.scale, call.deadline, resample)
            call.body = b""

            def drop_body() -> None:
                job.body = None

            data, shape = await _in_thread(svc.volume_pool, call.deadline, svc.worker_grace_s,
                                           svc.run_volume, job, slot=call.slot,
                                           on_abandon=drop_body)
        return sr_response(call, data, "application/gzip", ".nii.gz", shape)

    @app.post("/v1/sr/slice", response_class=Response, **v1, openapi_extra=_body_doc(
        SLICE_TYPES, "a 2-D .npy or PNG slice, or a (3, h, w) .npy triplet (t-1, t, t+1)"))
    async def sr_slice(request: Request, scale: ScaleQuery = None, contrast: ContrastQuery = None,
                       normalise: NormaliseQuery = True):
        """Super-resolve one slice; the answer is the SR slice as .npy. Slices of concurrent
        requests share batches."""
        async with v1_call(request, SLICE_TYPES, scale, contrast) as call:
            # decoding + percentiles of up to 3 x max_slice_pixels: off the event loop
            lr, mean, std = await asyncio.get_running_loop().run_in_executor(
                None, svc.prepare_slice, call.body, normalise, call.scale)
            call.body = b""
            try:
                res = await asyncio.wait_for(svc.submit(SliceJob(lr, call.scale)),
                                             timeout=max(call.deadline.remaining(), 0.001))
            except asyncio.TimeoutError:
                raise ApiError(408, "timeout", f"request took longer than "
                               f"{call.deadline.seconds:g} s") from None
            if isinstance(res, BaseException):
                raise res
            sr = (res * std + mean).astype(np.float32) if normalise else res
            check_finite(sr, "slice")
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
        from pgasr.inference import Predictor, PredictorSet

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
        kw = {"device": "auto", "bf16": s.bf16, "batch_size": s.max_batch_size}
        predictor = (PredictorSet.from_checkpoints([s.checkpoint, *s.checkpoints], **kw)
                     if s.checkpoints else Predictor.from_checkpoint(s.checkpoint, **kw))
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
        """Serve's periodic health check: a failure gets the replica replaced."""
        self.service.check_health()

    def __del__(self):
        svc = getattr(self, "service", None)
        if svc is not None:
            svc.close()


def validate_serve_config(s: ServeConfig) -> None:
    """A service needs a checkpoint; every other ``serve.*`` check is ServeConfig's own
    (run again here: attributes may have been set since it was loaded)."""
    if not s.checkpoint:
        raise ConfigError("serve.checkpoint is not set (a stage-2 checkpoint directory)")
    revalidate(s, "serve config")


def replica_memory_bytes(s: ServeConfig) -> int:
    """The Ray ``memory`` one replica reserves: ``serve.memory_per_replica`` when set, else
    the process itself plus the buffers its caps allow at once (every ongoing request
    holding a full body, one volume of ``max_voxels`` in and ``max_output_voxels`` out, the
    largest slice of every ongoing request), so Ray does not pack more replicas on a node
    than their caps let them use. Model activations are not included (see the constants)."""
    if s.memory_per_replica > 0:
        return int(s.memory_per_replica)
    lim = Limits.from_config(s)
    bodies = s.max_ongoing_requests * lim.max_body_bytes
    volume = (lim.max_voxels * VOLUME_BYTES_PER_INPUT_VOXEL
              + lim.max_output_voxels * VOLUME_BYTES_PER_OUTPUT_VOXEL)
    slice_out = min(lim.max_slice_pixels * 16, lim.max_output_voxels)  # x4 at most
    slices = s.max_ongoing_requests * slice_out * SLICE_BYTES_PER_OUTPUT_PIXEL
    return int(REPLICA_BASE_BYTES + bodies + volume + slices)


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
    s.checkpoints = [str(Path(c).expanduser().resolve()) for c in s.checkpoints]
    for key, path in [("serve.checkpoint", s.checkpoint)] + [
            (f"serve.checkpoints[{i}]", c) for i, c in enumerate(s.checkpoints)]:
        if not Path(path).is_dir():
            raise ConfigError(f"{key}: {path} is not a directory")
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
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica,
                           "memory": replica_memory_bytes(s)},
        **scaling,
    )
    return dep.bind(config_to_dict(cfg))


def http_options(s: ServeConfig) -> dict:
    """Serve proxy options for ``serve.start``. The proxy's own timeout is a little longer
    than the app's so the app answers its own JSON 408 first."""
    return {"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s + 30}


def main(argv: list[str] | None = None) -> int:
    """``python -m serve.app --config configs/tiny.yaml --set serve.checkpoint=...``:
    start a local Ray cluster (or join the one ``--address`` / ``RAY_ADDRESS`` names), bind
    Serve's proxy to ``serve.host:serve.port`` and run the app."""
    p = argparse.ArgumentParser(prog="python -m serve.app", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (auto: the one `ray start` recorded; default: "
                        "RAY_ADDRESS, else a new local cluster)")
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
    from jobs.common import RayConnectionError, init_ray

    try:  # the jobs' policy: join only what --address / RAY_ADDRESS names, say which
        init_ray(a.address, load_serve_config(args))
    except RayConnectionError as e:
        print(f"serve.app: error: {e}", file=sys.stderr)
        return 2
    need, have = replica_memory_bytes(s), float(ray.cluster_resources().get("memory", 0.0))
    if need > have:  # Serve would wait for such a replica forever, logging only warnings
        print(f"serve.app: error: a replica reserves {need / 2**30:.1f} GiB of Ray memory (from "
              f"the serve.* caps: max_body_bytes x max_ongoing_requests, max_voxels, "
              f"max_output_voxels, max_slice_pixels; docs/serve.md) but this cluster has "
              f"{have / 2**30:.1f} GiB: lower the caps or set serve.memory_per_replica",
              file=sys.stderr)
        ray.shutdown()
        return 2
    serve.start(http_options=http_options(s))
    serve.run(app, name="pgasr", route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":
    # Through the importable module, not __main__: Ray pickles __main__'s classes by value,
    # without the names only their annotations use, so FastAPI in the replica could not
    # resolve ``request: Request`` and took it for a query parameter (every /v1 call a 422).
    from serve.app import main as _main

    sys.exit(_main())
