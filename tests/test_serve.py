"""The HTTP service (serve/app.py, serve/decoding.py): key handling, input decoding and
limits in-process (the bounded cost of one request: .npy dims, multi-member gzip, voxel
types, output size, body timeouts, the volume queue and health check, non-finite outputs,
JSON for unexpected errors, the client's key on redirects, the hostile mutations through the
in-process app); then the real thing on Ray Serve (marked ``ray``) over loopback HTTP on
port 8400: a volume round trip identical to ``Predictor.predict_image``, slice batching
across requests, auth, body cap, every bad input a JSON 4xx, a short body a JSON 408, a
bounded hostile-input fuzzer after which the same replica is still serving without having
grown, a replica killed under a bounded load, and the web viewer driven in headless
Chromium."""

from __future__ import annotations

import asyncio
import collections
import gzip
import io
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import yaml

from pgasr.config import ConfigError, ServeConfig, load_config
from pgasr.data.ixi import image_to_bytes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `serve` is a top-level directory, not an installed package

from serve import app as A  # noqa: E402
from serve import decoding as D  # noqa: E402
from serve_fixtures import make_tiny_checkpoint, synthetic_volume  # noqa: E402
from viewer_browser import chromium, missing_browser, run_viewer  # noqa: E402


PORT = 8400
URL = f"http://127.0.0.1:{PORT}"
KEY = "test-key-0123456789abcdef"
KEY2 = "second-key-fedcba9876543210"
H = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "stage2")


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("keys") / "api_keys"
    p.write_text(f"# test keys\n{KEY}\n{KEY2}  # second\n")
    p.chmod(0o600)
    return p


def _nii(data, affine=None, gz=True) -> bytes:
    return image_to_bytes(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), gz=gz)


def _npy(arr) -> bytes:
    b = io.BytesIO()
    np.save(b, arr, allow_pickle=True)
    return b.getvalue()


def _with_dims(raw: bytes, dims) -> bytes:
    """A NIfTI file whose header claims ``dims`` (data left as is)."""
    b = bytearray(raw)
    b[40:56] = struct.pack("<8h", len(dims), *dims, *[1] * (7 - len(dims)))
    return bytes(b)


def _singular_affine(raw: bytes) -> bytes:
    """qform off, sform on with all-zero rows: a non-invertible affine."""
    b = bytearray(raw)
    b[252:256] = struct.pack("<2h", 0, 1)
    b[280:328] = bytes(48)
    return bytes(b)


VOL = synthetic_volume()
RAW = image_to_bytes(VOL, gz=False)
GZ = image_to_bytes(VOL)
VOL_LIM = D.Limits(max_voxels=100_000)  # the limits of the decoding tests
SLICE_LIM = D.Limits(max_slice_pixels=4096)


# --------------------------------------------------------------------------- no Ray


def test_api_keys_from_env_and_file(key_file):
    cfg = ServeConfig(api_keys_env="PGASR_TEST_KEYS", api_keys_file=str(key_file))
    env = {"PGASR_TEST_KEYS": "env-key-aaaaaaaaaaaaaaaa, env-key-bbbbbbbbbbbbbbbb ,"}
    assert A.load_api_keys(cfg, env) == ["env-key-aaaaaaaaaaaaaaaa", "env-key-bbbbbbbbbbbbbbbb",
                                         KEY, KEY2]
    with pytest.raises(ConfigError, match="shorter than 16"):
        A.load_api_keys(ServeConfig(api_keys_env="K"), {"K": "short"})
    with pytest.raises(ConfigError, match="no API keys configured.*allow_no_auth"):
        A.load_api_keys(ServeConfig(api_keys_env="K"), {})
    with pytest.raises(ConfigError, match="not found"):
        A.load_api_keys(ServeConfig(api_keys_file="/nonexistent/keys"), {})
    assert A.load_api_keys(ServeConfig(api_keys_env="K", allow_no_auth=True), {}) == []


def test_key_checker():
    kc = A.KeyChecker([KEY, KEY2])
    kc.check({"x-api-key": KEY})
    kc.check({"authorization": f"Bearer {KEY2}"})
    for headers in ({}, {"x-api-key": KEY[:-1]}, {"x-api-key": KEY + "x"},
                    {"authorization": f"Basic {KEY}"}, {"authorization": "Bearer "}):
        with pytest.raises(A.ApiError) as e:
            kc.check(headers)
        assert e.value.status == 401
    with pytest.raises(ConfigError):
        A.KeyChecker([])
    A.KeyChecker([], allow_no_auth=True).check({})


BAD_VOLUMES = {
    "not_nifti": (b"hello world, not an image " * 40, "not a NIfTI-1 file"),
    "random_bytes": (random.Random(0).randbytes(5000), "NIfTI|gzip"),
    "truncated_gzip": (GZ[: len(GZ) // 2], "truncated gzip"),
    "corrupt_gzip": (GZ[:20] + bytes(200) + GZ[220:], "gzip|shorter"),
    "truncated_raw": (RAW[:1000], "shorter than its header"),
    "two_d": (_nii(np.random.rand(8, 8).astype(np.float32)), "expected a 3-D volume"),
    "four_d": (_nii(np.random.rand(8, 8, 3, 2).astype(np.float32)), "expected a 3-D volume"),
    "nan": (_nii(np.where(np.random.rand(8, 8, 3) > 0.5, np.nan, 1).astype(np.float32)), "NaN"),
    "inf": (_nii(np.full((8, 8, 3), np.inf, np.float32)), "NaN or inf"),
    "constant": (_nii(np.ones((8, 8, 3), np.float32)), "constant"),
    "zero_dim": (_with_dims(RAW, [16, 12, 0]), "empty volume"),
    "negative_dim": (_with_dims(RAW, [16, -12, 5]), "negative"),
    "nifti2": (struct.pack("<i", 540) + bytes(600), "NIfTI-2"),
    "complex": (_nii((np.random.rand(8, 8, 3) * 1j).astype(np.complex64)), "voxel type"),
    "singular_affine": (_singular_affine(RAW), "affine"),
}


@pytest.mark.parametrize("case", sorted(BAD_VOLUMES))
def test_decode_nifti_rejects(case):
    data, reason = BAD_VOLUMES[case]
    with pytest.raises(ValueError, match=reason) as e:
        A.decode_nifti(data, VOL_LIM)
    assert not isinstance(e.value, A.TooLarge)


def test_decode_nifti_limits_before_allocating():
    huge = _with_dims(RAW, [30000, 30000, 30000])
    for data in (huge, gzip.compress(huge)):
        with pytest.raises(A.TooLarge, match="voxels; the limit"):
            A.decode_nifti(data, VOL_LIM)
    # a gzip bomb behind a small valid header: only header + data are ever decompressed
    bomb = gzip.compress(RAW + bytes(200_000_000), compresslevel=1)
    assert len(bomb) < 1_000_000
    t0 = time.perf_counter()
    img = A.decode_nifti(bomb, VOL_LIM)
    assert img.shape == VOL.shape and time.perf_counter() - t0 < 2.0
    # both encodings decode to the same image
    np.testing.assert_array_equal(A.decode_nifti(RAW, D.Limits(max_voxels=10**6)).get_fdata(),
                                  A.decode_nifti(GZ, D.Limits(max_voxels=10**6)).get_fdata())


def test_decode_nifti_fuzz_raises_only_valueerror():
    """Seeded header/byte mutations: every failure is a ValueError with a reason."""
    rng = random.Random(1)
    for i in range(400):
        b = bytearray(RAW)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(0, 344)
            b[pos : pos + 4] = rng.choice([
                struct.pack("<i", rng.choice([0, -1, 2**31 - 1, 7, 65535])),
                struct.pack("<f", rng.choice([float("nan"), float("inf"), 0.0, -1.0, 1e30])),
                rng.randbytes(4)])
        data = gzip.compress(bytes(b)) if i % 2 else bytes(b)
        try:
            A.decode_nifti(data, VOL_LIM)
        except ValueError as e:
            assert str(e)


@pytest.mark.parametrize("arr,status,reason", [
    (np.zeros((2, 4, 4), np.float32), None, "expected a 2-D slice"),
    (np.zeros((3, 4, 4, 1), np.float32), None, "expected a 2-D slice"),
    (np.zeros((0, 4), np.float32), None, "empty slice"),
    (np.full((4, 4), np.nan, np.float32), None, "NaN"),
    (np.array(["a", "b"]), None, "dtype"),
    (np.array([{"x": 1}], dtype=object), None, "dtype"),
    (np.zeros((100, 100), np.float32), 413, "limit is 4096"),
])
def test_decode_slice_rejects(arr, status, reason):
    with pytest.raises(ValueError, match=reason) as e:
        A.decode_slice(_npy(arr), SLICE_LIM)
    assert isinstance(e.value, A.TooLarge) == (status == 413)


def test_decode_slice_truncated_or_unknown():
    with pytest.raises(ValueError, match="truncated"):
        A.decode_slice(_npy(np.ones((8, 8), np.float32))[:-10], SLICE_LIM)
    with pytest.raises(ValueError, match="npy array or a PNG"):
        A.decode_slice(b"not an array", SLICE_LIM)


def test_decode_slice_png_and_triplet():
    from PIL import Image

    img = (np.arange(48).reshape(6, 8) * 5).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(img).save(b, format="PNG")
    trip = A.decode_slice(b.getvalue(), SLICE_LIM)
    assert trip.shape == (3, 6, 8) and trip.dtype == np.float32
    np.testing.assert_array_equal(trip[1], img)
    t = np.random.rand(3, 5, 7).astype(">f8")
    np.testing.assert_allclose(A.decode_slice(_npy(t), SLICE_LIM), t.astype(np.float32))
    rgb = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb, format="PNG")
    with pytest.raises(ValueError, match="grayscale"):
        A.decode_slice(rgb.getvalue(), SLICE_LIM)


# --- bounded cost per request (issue 17): decoding limits, unit-tested without Serve


def _npy_with_shape(shape, data: bytes, descr: str = "<f4") -> bytes:
    """An .npy body whose header claims ``shape`` (numpy itself refuses to write one with a
    negative dimension), followed by ``data``."""
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": descr, "fortran_order": False,
                                             "shape": tuple(shape)})
    return b.getvalue() + data


def _members(n_empty: int, tail: bytes = b"") -> bytes:
    """``n_empty`` empty gzip members, then ``tail``."""
    return gzip.compress(b"", mtime=0) * n_empty + tail


BAD_DIMS = [(-1, 256), (256, -1), (3, -1, 256), (3, 256, -1), (-3, 16, 16), (0, 256),
            (256, 0), (3, 0, 4)]


@pytest.mark.parametrize("shape", BAD_DIMS, ids=str)
def test_npy_dims_must_be_positive(shape):
    """A .npy header with a negative or zero dimension is a 422 before any data is read: a
    (-1, 256) header used to pass the pixel cap (h*w < 0) and decode the whole body (here
    64 KiB = 16384 float32 pixels against a cap of 4096)."""
    body = _npy_with_shape(shape, (np.random.default_rng(0).random(16384) * 100).astype("<f4").tobytes())
    with pytest.raises(D.InputError, match="negative|empty|expected a 2-D") as e:
        A.decode_slice(body, SLICE_LIM)
    assert (e.value.status, e.value.code) == (422, "invalid_input")


def _float128_nii(vol: np.ndarray) -> bytes:
    """A NIfTI-1 file of float128 voxels (datatype 1536; nibabel will not write one)."""
    b = bytearray(image_to_bytes(nib.Nifti1Image(vol.astype(np.float64), np.eye(4)), gz=False))
    b[70:74] = struct.pack("<2h", 1536, 128)
    return bytes(b[:352]) + np.asarray(vol, np.longdouble).tobytes(order="F")


def test_voxel_types_wider_than_8_bytes_refused():
    """float128 and complex voxels are refused (NIfTI and .npy) before the data is decoded;
    a float128 .npy slice used to be accepted."""
    vol = np.random.default_rng(0).random((8, 8, 3)) * 100 + 1
    for arr in (vol[:, :, 0].astype(np.longdouble), vol[:, :, 0].astype(np.complex64)):
        with pytest.raises(D.InputError, match="dtype"):
            A.decode_slice(_npy(arr), SLICE_LIM)
    for data in (_float128_nii(vol), _nii(vol.astype(np.complex128))):
        with pytest.raises(D.InputError, match="type") as e:
            A.decode_nifti(data, VOL_LIM)
        assert e.value.status == 422
    A.decode_nifti(_nii(vol.astype(np.float64)), VOL_LIM)  # 8 bytes is fine


def test_multi_member_gzip_is_linear():
    """4000 empty gzip members before an 8 MiB volume: one pass over the body (the old
    decoder re-copied the rest of the body at every member: 4000 x 8 MB), and the same
    volume split over 500 members decodes to the same image."""
    rng = np.random.default_rng(0)
    vol = (rng.random((128, 128, 128)) * 100 + 1).astype(np.float32)
    raw = image_to_bytes(nib.Nifti1Image(vol, np.eye(4)), gz=False)
    lim = D.Limits(max_voxels=vol.size)
    body = _members(4000, gzip.compress(raw, compresslevel=1, mtime=0))
    t0 = time.perf_counter()
    img = A.decode_nifti(body, lim)
    elapsed = time.perf_counter() - t0
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), vol)
    assert elapsed < 2.0, f"4000 members + 8 MiB took {elapsed:.2f} s"
    step = len(raw) // 500 + 1
    split = b"".join(gzip.compress(raw[i : i + step], compresslevel=1, mtime=0)
                     for i in range(0, len(raw), step))
    np.testing.assert_array_equal(np.asanyarray(A.decode_nifti(split, lim).dataobj), vol)


def test_gzip_member_cap_and_deadline_in_the_loop():
    """More than MAX_GZIP_MEMBERS members is a 422 that costs next to nothing, and the
    caller's deadline is checked inside the decompression loop."""
    body = _members(D.MAX_GZIP_MEMBERS + 10, GZ)
    t0 = time.perf_counter()
    with pytest.raises(D.InputError, match="gzip members") as e:
        A.decode_nifti(body, VOL_LIM)
    assert e.value.status == 422 and time.perf_counter() - t0 < 1.0

    class Late(Exception):
        pass

    calls = []

    def deadline():
        calls.append(1)
        if len(calls) >= 3:
            raise Late

    with pytest.raises(Late):
        A.decode_nifti(_members(100, GZ), VOL_LIM, check=deadline)
    assert len(calls) == 3


def test_output_voxel_cap_checked_from_the_header():
    """The SR output (scale^2 x the input voxels) is capped by max_output_voxels, decided
    from the header before anything is decompressed; x4 of an input that fits max_voxels
    can be refused while x2 of it is served."""
    lim = D.Limits(max_voxels=20000, max_output_voxels=10000)
    assert A.decode_nifti(GZ, lim, scale=2).shape == VOL.shape  # 960 -> 3840 voxels
    with pytest.raises(D.TooLarge, match="x4 output .* 15360 voxels") as e:
        A.decode_nifti(GZ, lim, scale=4)
    assert e.value.status == 413
    claim = gzip.compress(_with_dims(RAW, [100, 100, 2]))  # 20000 in, 80000 out at x2
    with pytest.raises(D.TooLarge, match="output"):
        A.decode_nifti(claim, D.Limits(max_voxels=20000, max_output_voxels=40000), scale=2)
    px = _npy((np.random.rand(40, 40) * 100).astype(np.float32))
    slim = D.Limits(max_slice_pixels=4096, max_output_voxels=20000)
    assert A.decode_slice(px, slim, scale=2).shape == (3, 40, 40)
    with pytest.raises(D.TooLarge, match="output"):
        A.decode_slice(px, slim, scale=4)


def test_limits_and_typed_errors():
    """Limits come from ServeConfig in one place; every decoding error carries its HTTP
    status and code."""
    assert D.Limits.from_config(ServeConfig()).max_output_voxels == 4 * ServeConfig().max_voxels
    assert D.Limits.from_config(ServeConfig(max_output_voxels=7)).max_output_voxels == 7
    assert D.Limits() == D.Limits.from_config(ServeConfig())
    assert D.check_content_length(None, 10) is None and D.check_content_length("10", 10) == 10
    for value, status in (("abc", 400), ("-1", 400), ("11", 413)):
        with pytest.raises(D.InputError) as e:
            D.check_content_length(value, 10)
        assert e.value.status == status
    with pytest.raises(D.OutputError, match="NaN or inf") as e:
        D.check_finite(np.array([[[1.0, np.inf]]], np.float32), "volume")
    assert (e.value.status, e.value.code) == (500, "invalid_output")
    D.check_finite(np.ones((4, 4, 3), np.float32), "volume")
    s = ServeConfig(checkpoint="x")
    for bad in ({"max_volume_queue": 0}, {"body_timeout_s": 0}, {"body_idle_timeout_s": -1},
                {"max_output_voxels": -1}):
        with pytest.raises(ConfigError):
            A.validate_serve_config(s.model_copy(update=bad))


def _overrides(ckpt, key_file, **extra):
    o = {"serve.checkpoint": str(ckpt), "serve.api_keys_file": str(key_file),
         "serve.api_keys_env": "PGASR_TEST_UNSET_ENV", "serve.min_replicas": 1,
         "serve.max_replicas": 1, "serve.cpus_per_replica": 0.5,
         "serve.max_body_bytes": 262144, "serve.max_voxels": 20000,
         "serve.max_slice_pixels": 4096, "serve.max_output_voxels": 40000,
         "serve.batch_wait_timeout_s": 0.2, "serve.request_timeout_s": 60,
         "serve.body_timeout_s": 10, "serve.body_idle_timeout_s": 1, **extra}
    return [f"{k}={v}" for k, v in o.items()]


def test_build_app_options_and_refusals(ckpt, key_file, monkeypatch):
    app = A.build_app({"config": str(ROOT / "configs/tiny.yaml"),
                       "overrides": _overrides(ckpt, key_file, **{"serve.max_replicas": 3})})
    d = app._bound_deployment
    assert d.name == "PGASR" and d._deployment_config.max_ongoing_requests == 8
    a = d._deployment_config.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests) == (1, 3, 2.0)
    mem = A.replica_memory_bytes(load_config(None, _overrides(ckpt, key_file)).serve)
    assert d.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.0, "memory": mem}
    # `serve run serve.app:build_app serve.checkpoint=...` style arguments
    app = A.build_app({"serve.checkpoint": str(ckpt), "serve.api_keys_file": str(key_file)})
    assert app._bound_deployment is not None
    monkeypatch.delenv("PGASR_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="no API keys configured"):
        A.build_app({"overrides": [f"serve.checkpoint={ckpt}"]})
    monkeypatch.setenv("PGASR_API_KEYS", f"{KEY},{KEY2}")
    A.build_app({"overrides": [f"serve.checkpoint={ckpt}"]})
    with pytest.raises(ConfigError, match="serve.checkpoint is not set"):
        A.build_app({})
    with pytest.raises(ConfigError, match="not a directory"):
        A.build_app({"overrides": ["serve.checkpoint=/nonexistent/ckpt"]})
    with pytest.raises(ConfigError, match="unknown argument"):
        A.build_app({"checkpoint": str(ckpt)})
    with pytest.raises(ConfigError, match="unknown key"):
        A.build_app({"overrides": ["serve.nope=1"]})


def test_checked_in_serve_config_is_private(repo_root):
    from ray.serve.schema import ServeDeploySchema

    cfg = ServeDeploySchema.model_validate(yaml.safe_load((repo_root / "serve/config.yaml").read_text()))
    assert cfg.http_options.host == "127.0.0.1"
    (app,) = cfg.applications
    assert app.import_path == "serve.app:build_app"
    run = load_config(repo_root / app.args["config"], app.args["overrides"])
    assert cfg.http_options.request_timeout_s > run.serve.request_timeout_s
    assert ServeConfig().host == "127.0.0.1"


def test_serve_config_deployments_are_what_serve_build_generates(repo_root, tmp_path):
    """serve/config.yaml's deployments: block equals the one `serve build serve.bound:app`
    writes for the same application (replicas, queue limits, CPUs, GPUs, Ray memory)."""
    import subprocess

    (tmp_path / "ckpt").mkdir()  # build_app checks the directory; replicas would load it
    env = {**os.environ, "PGASR_API_KEYS": "k" * 24, "PGASR_SERVE_CHECKPOINT": str(tmp_path / "ckpt"),
           "PYTHONPATH": str(repo_root)}
    serve_cli = Path(sys.executable).parent / "serve"
    r = subprocess.run([str(serve_cli), "build", "serve.bound:app", "-o", str(tmp_path / "b.yaml")],
                       cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (built,) = yaml.safe_load((tmp_path / "b.yaml").read_text())["applications"]
    (mine,) = yaml.safe_load((repo_root / "serve/config.yaml").read_text())["applications"]
    assert mine["deployments"] == built["deployments"]


@pytest.fixture(scope="module")
def service(ckpt, key_file):
    """The replica's Service and FastAPI app, in-process (no Ray)."""
    from pgasr.inference import Predictor

    cfg = load_config(None, _overrides(ckpt, key_file, **{"serve.request_timeout_s": 1.0,
                                                          "serve.max_output_voxels": 80000}))
    pred = Predictor.from_checkpoint(ckpt, device="cpu", batch_size=cfg.serve.max_batch_size)
    svc = A.Service(pred, cfg, A.KeyChecker(A.load_api_keys(cfg.serve)))
    yield svc
    svc.close()


def test_timeouts_in_process(service):
    """A stalled upload and a computation past the deadline both end in a JSON 408."""

    async def run():
        app = A.make_api(service)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            async def slow():
                yield GZ[:100]
                await asyncio.sleep(3)
                yield GZ[100:]

            t0 = time.perf_counter()
            r = await c.post("/v1/sr?scale=2", content=slow(), headers=H)
            assert r.status_code == 408 and r.json()["error"] == "timeout", r.text
            assert time.perf_counter() - t0 < 2.5
            # compute deadline: checked between slice chunks of predict_volume
            big = _nii((np.random.rand(40, 40, 12) * 100).astype(np.float32))
            service.scfg.request_timeout_s = 0.05
            try:
                r = await c.post("/v1/sr?scale=2", content=big, headers=H)
            finally:
                service.scfg.request_timeout_s = 1.0
            assert r.status_code == 408, r.text
            r = await c.post("/v1/sr?scale=2", content=GZ, headers=H)
            assert r.status_code == 200

    asyncio.run(run())


def test_lone_slice_skips_the_batcher(service, monkeypatch):
    """A slice job alone in the replica is computed at once; jobs that overlap others go
    through the batcher (in Serve, @serve.batch) so they can share a batch."""
    batched = []

    async def batcher(job):
        batched.append(job)
        return await service._submit_unbatched(job)

    monkeypatch.setattr(service, "submit_slice", batcher)
    rng = np.random.default_rng(3)
    jobs = [A.SliceJob(rng.normal(size=(3, 6, 5)).astype(np.float32), 2) for _ in range(4)]

    async def run():
        alone = await service.submit(jobs[0])
        together = await asyncio.gather(*(service.submit(j) for j in jobs[1:]))
        return [alone, *together]

    out = asyncio.run(run())
    # jobs[1] started alone; jobs[2:] overlapped it
    assert len(batched) == 2 and all(b is j for b, j in zip(batched, jobs[2:]))
    assert service.slices_inflight == 0
    for j, o in zip(jobs, out):
        np.testing.assert_allclose(o, service.predictor.predict_triplets(j.lr[None], 2)[0],
                                   rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def predictor(ckpt):
    from pgasr.inference import Predictor

    return Predictor.from_checkpoint(ckpt, device="cpu", batch_size=16)


class _StubPredictor:
    """The real Predictor, except for the methods a test replaces."""

    def __init__(self, real, predict_image=None, predict_triplets=None):
        self._real = real
        if predict_image is not None:
            self.predict_image = predict_image
        if predict_triplets is not None:
            self.predict_triplets = predict_triplets

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def make_service(ckpt, key_file, predictor):
    """``make(predictor=None, **serve_fields)``: a fresh in-process Service."""
    made = []

    def make(pred=None, **fields):
        cfg = load_config(None, _overrides(ckpt, key_file))
        for k, v in fields.items():
            setattr(cfg.serve, k, v)
        svc = A.Service(pred or predictor, cfg, A.KeyChecker(A.load_api_keys(cfg.serve)))
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()


def _asgi_client(svc) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=A.make_api(svc)),
                             base_url="http://t", timeout=60)


def _json_status(r: httpx.Response, status: int, error: str | None = None) -> bool:
    ok = r.status_code == status and r.headers["content-type"].startswith("application/json")
    return ok and (error is None or r.json()["error"] == error)


def test_typed_query_key_first_and_openapi(make_service):
    """Query parameters are typed (422 JSON naming the parameter, before the body is read),
    the API key is checked before them, /openapi.json documents the routes, parameters and
    key schemes, and serve.docs=false turns the schema and /docs off."""
    svc = make_service()

    async def run():
        async with _asgi_client(svc) as c:
            for q, word in [("scale=3", "scale"), ("scale=two", "scale"), ("normalise=maybe", "normalise"),
                            ("contrast=T2%20w", "contrast must be")]:
                r = await c.post(f"/v1/sr/slice?{q}", content=b"x", headers=H)
                assert _json_status(r, 422, "invalid_input") and word in r.json()["detail"], (q, r.text)
                # without a key the same request is a 401 and says nothing about the query
                r = await c.post(f"/v1/sr/slice?{q}", content=b"x")
                assert _json_status(r, 401, "unauthorized"), (q, r.text)
            r = await c.get("/openapi.json")
            assert r.status_code == 200
            spec = r.json()
            op = spec["paths"]["/v1/sr"]["post"]
            params = {p["name"]: p for p in op["parameters"]}
            assert {"scale", "contrast", "resample"} <= set(params)
            assert params["scale"]["schema"]["enum"] == [2, 4], params["scale"]
            assert "application/gzip" in op["requestBody"]["content"]
            assert {"401", "413", "422"} <= set(op["responses"])
            assert {"X-API-Key", "Bearer"} <= set(spec["components"]["securitySchemes"])
            assert "normalise" in {p["name"] for p in spec["paths"]["/v1/sr/slice"]["post"]["parameters"]}
            assert (await c.get("/docs")).status_code == 200
        svc.scfg.docs = False
        async with _asgi_client(svc) as c:
            for path in ("/openapi.json", "/docs"):
                assert _json_status(await c.get(path), 404, "not_found"), path

    asyncio.run(run())


def test_short_body_is_408_within_the_body_timeout(make_service):
    """A body shorter than its Content-Length (the client stops sending) or one that drips
    in too slowly is a JSON 408 after serve.body_idle_timeout_s / body_timeout_s, not after
    the 60 s request deadline."""
    svc = make_service(request_timeout_s=60.0, body_idle_timeout_s=0.3, body_timeout_s=1.0)

    async def short():
        yield GZ[:100]
        await asyncio.sleep(4)
        yield GZ[100:]

    async def drip():
        for i in range(0, len(GZ), 50):
            yield GZ[i : i + 50]
            await asyncio.sleep(0.2)

    async def run():
        async with _asgi_client(svc) as c:
            for body, reason in ((short, "no body bytes for 0.3 s"), (drip, "within 1 s")):
                t0 = time.perf_counter()
                r = await c.post("/v1/sr?scale=2", content=body(),
                                 headers={**H, "Content-Length": str(len(GZ))})
                assert _json_status(r, 408, "timeout"), (r.status_code, r.text)
                assert reason in r.json()["detail"]
                assert time.perf_counter() - t0 < 2.5
            assert svc.inflight == 0

    asyncio.run(run())


def test_volume_queue_is_bounded_and_a_stuck_worker_fails_health(make_service, predictor):
    """A volume worker stuck outside the deadline checks: its request and the one queued
    behind it get a 408 (the queued one is cancelled and drops its body), a third while
    both hold the queue (max_volume_queue=2) gets a JSON 503 at once, and the health check
    fails until the worker is free again."""
    free = threading.Event()

    def stuck(img, scale, progress=None):
        free.wait(30)  # ignores the deadline, as a hung kernel would
        return predictor.predict_image(img, scale)

    svc = make_service(_StubPredictor(predictor, predict_image=stuck),
                       request_timeout_s=0.3, max_volume_queue=2)
    svc.worker_grace_s = 0.2

    async def wait_for(cond, timeout=10.0):
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end
            await asyncio.sleep(0.02)

    async def run():
        async with _asgi_client(svc) as c:
            r = await c.post("/v1/sr?scale=2", content=GZ, headers=H)
            assert _json_status(r, 408, "timeout"), r.text
            await asyncio.sleep(0.15)
            assert "stuck" in (svc.health_problem() or "")
            with pytest.raises(RuntimeError, match="volume worker is stuck"):
                svc.check_health()
            assert _json_status(await c.get("/healthz"), 503, "unhealthy")
            queued = asyncio.create_task(c.post("/v1/sr?scale=2", content=GZ, headers=H))
            await wait_for(lambda: svc.volume_slots.used == 2)
            t0 = time.perf_counter()
            r = await c.post("/v1/sr?scale=2", content=GZ, headers=H)
            assert _json_status(r, 503, "busy") and r.headers["retry-after"]
            assert time.perf_counter() - t0 < 1.0
            assert _json_status(await queued, 408, "timeout")
            await wait_for(lambda: svc.volume_slots.used == 1)  # cancelled, body dropped
            free.set()
            await wait_for(lambda: svc.volume_slots.used == 0 and svc.health_problem() is None)
            assert (await c.get("/healthz")).json() == {"status": "ok"}
            svc.scfg.request_timeout_s = 30.0
            assert (await c.post("/v1/sr?scale=2", content=GZ, headers=H)).status_code == 200

    try:
        asyncio.run(run())
    finally:
        free.set()


def test_non_finite_output_is_a_json_500(make_service, predictor):
    """An SR volume or slice with NaN/inf voxels is a JSON 500 with the reason, never a 200."""

    def nan_image(img, scale, progress=None):
        sr = predictor.predict_image(img, scale, progress)
        np.asanyarray(sr.dataobj)[1, 2, 3] = np.nan
        return sr

    def inf_triplets(lr, scale, prior_lr=None):
        out = predictor.predict_triplets(lr, scale, prior_lr)
        out[:, 0, 0] = np.inf
        return out

    svc = make_service(_StubPredictor(predictor, nan_image, inf_triplets))

    async def run():
        async with _asgi_client(svc) as c:
            for path, body in (("/v1/sr?scale=2", GZ),
                               ("/v1/sr/slice?scale=2", _npy(np.random.rand(12, 10) * 100))):
                r = await c.post(path, content=body, headers=H)
                assert _json_status(r, 500, "invalid_output"), (r.status_code, r.text[:200])
                assert "NaN or inf" in r.json()["detail"]

    asyncio.run(run())


def test_unexpected_errors_are_json_500(make_service, predictor):
    """An exception no handler knows (here a RuntimeError from the model, inside and outside
    the shared v1 prologue) reaches the client as a JSON 500 that does not leak its text."""

    def boom(*_a, **_k):
        raise RuntimeError("secret internals")

    svc = make_service(_StubPredictor(predictor, boom, boom))
    svc.predictor.describe = boom

    async def run():
        async with _asgi_client(svc) as c:
            for method, path, body in (("POST", "/v1/sr?scale=2", GZ),
                                       ("POST", "/v1/sr/slice?scale=2", _npy(np.random.rand(6, 5))),
                                       ("GET", "/v1/model", None)):
                r = await c.request(method, path, content=body, headers=H)
                assert _json_status(r, 500, "internal"), (path, r.status_code, r.text[:200])
                assert "secret" not in r.text

    asyncio.run(run())


@pytest.fixture(scope="module")
def ckpt_x4(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve_x4") / "stage2", scales=(2, 4))


def test_hostile_mutations_in_process(ckpt_x4, key_file):
    """The hostile-input fuzzer's mutations (including negative/zero .npy dims, multi-member
    gzip, short bodies, float128/complex voxels and huge x2/x4 outputs) sent to one
    in-process replica of a x2/x4 checkpoint: every answer is a JSON 4xx with the status its
    kind calls for (a bit flip that leaves a valid image may give 200), never a 5xx."""
    from pgasr.inference import Predictor

    cfg = load_config(None, _overrides(ckpt_x4, key_file))
    cfg.serve.body_idle_timeout_s, cfg.serve.request_timeout_s = 0.2, 20.0
    pred = Predictor.from_checkpoint(ckpt_x4, device="cpu", batch_size=16)
    svc = A.Service(pred, cfg, A.KeyChecker(A.load_api_keys(cfg.serve)))
    gen = _mutations(random.Random(7), x4=True)
    reqs = [next(gen) for _ in range(240)]

    async def stalled(body: bytes):
        yield body
        await asyncio.sleep(5)

    async def run():
        out = []
        async with _asgi_client(svc) as c:
            for kind, path, body, hdr in reqs:
                content = stalled(body) if kind == "short_body" else body
                r = await c.post(path, content=content, headers=hdr)
                is_json = r.headers.get("content-type", "").startswith("application/json")
                out.append((kind, r.status_code, is_json))
        return out

    try:
        results = asyncio.run(run())
    finally:
        svc.close()
    print(collections.Counter((k, st) for k, st, _ in results))
    bad = [r for r in results if r[1] != 200 and not (400 <= r[1] < 500 and r[2])]
    assert not bad, bad[:10]
    assert {k for k, st, _ in results if st == 200} <= {"bitflip_header"}
    expected = {"npy_bad_dims": {422}, "gzip_members": {422}, "short_body": {408},
                "wide_type": {422}, "huge_output": {413}}
    for kind, statuses in expected.items():
        got = {st for k, st, _ in results if k == kind}
        assert got and got <= statuses, (kind, got)


def test_client_does_not_resend_the_key_on_redirects():
    """pgasr.client sends X-API-Key to the service it was given, never to wherever a
    redirect points (two local http.servers: one redirects, the other records headers)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pgasr.client import Client

    seen: dict[str, dict] = {}

    class Target(BaseHTTPRequestHandler):
        def do_GET(self):
            seen["target"] = {k.lower(): v for k, v in self.headers.items()}
            body = b'{"scales": [2]}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    target = ThreadingHTTPServer(("127.0.0.1", 0), Target)

    class Redirect(Target):
        def do_GET(self):
            seen["origin"] = {k.lower(): v for k, v in self.headers.items()}
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{target.server_port}/v1/model")
            self.send_header("Content-Length", "0")
            self.end_headers()

    origin = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for srv in (target, origin):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = Client(f"http://127.0.0.1:{origin.server_port}", KEY, timeout=10)
        assert client.model() == {"scales": [2]}
    finally:
        for srv in (target, origin):
            srv.shutdown()
            srv.server_close()
    assert seen["origin"]["x-api-key"] == KEY
    assert "x-api-key" not in seen["target"] and "authorization" not in seen["target"]


# --------------------------------------------------------------------------- on Ray Serve


def wait_ready(client: httpx.Client, seconds: float) -> None:
    """Poll ``/readyz`` until it answers 200; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "Serve app did not become ready"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def served(ray_session, ckpt, key_file):
    from ray import serve

    app = A.build_app({"config": None, "overrides": _overrides(ckpt, key_file)})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    try:
        serve.run(app, name="pgasr", route_prefix="/", blocking=False)
        with httpx.Client(base_url=URL, timeout=60) as c:
            wait_ready(c, 120)
            yield c
    finally:
        serve.shutdown()


def _is_json_error(r: httpx.Response, status: int | None = None) -> bool:
    ok = 400 <= r.status_code < 500 and r.headers["content-type"].startswith("application/json")
    ok = ok and {"error", "detail"} <= set(r.json())
    return ok and (status is None or r.status_code == status)


def _reference(served, fn):
    """``fn()`` with the replica's torch thread count (float reductions depend on it)."""
    import torch

    n, threads = torch.get_num_threads(), served.get("/readyz").json()["torch_threads"]
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


@pytest.mark.ray
def test_volume_roundtrip_identical_to_predictor(served, ckpt):
    from pgasr.inference import Predictor

    r = served.post("/v1/sr?scale=2", content=GZ, headers={**H, "Content-Type": "application/gzip"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip" and r.content[:2] == b"\x1f\x8b"
    out = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    ref = _reference(served, lambda: Predictor.from_checkpoint(
        ckpt, device="cpu", batch_size=16).predict_image(VOL, 2))
    assert out.shape == (32, 24, 5) and r.headers["x-pgasr-shape"] == "32,24,5"
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(out.affine, ref.affine)
    np.testing.assert_allclose(out.header.get_zooms(), (1.0, 1.0, 3.0))
    assert out.header["descrip"].tobytes().startswith(b"pgasr-serve-test")
    # uncompressed NIfTI in a multipart upload gives the same bytes back
    r2 = served.post("/v1/sr?scale=2", files={"file": ("lr.nii", RAW, "application/octet-stream")},
                     headers={"Authorization": f"Bearer {KEY2}"})
    assert r2.status_code == 200 and r2.content == r.content


@pytest.mark.ray
def test_slices_batch_across_requests(served, ckpt):
    from pgasr.inference import Predictor, normalise_volume

    pred = Predictor.from_checkpoint(ckpt, device="cpu", batch_size=16)
    rng = np.random.default_rng(0)
    slices = [(rng.random((12, 10)) * 500 + 20).astype(np.float32) for _ in range(6)]

    def call(s):
        return served.post("/v1/sr/slice?scale=2", content=_npy(s),
                           headers={**H, "Content-Type": "application/x-npy"})

    with ThreadPoolExecutor(6) as ex:
        rs = list(ex.map(call, slices))
    for s, r in zip(slices, rs):
        assert r.status_code == 200, r.text
        got = np.load(io.BytesIO(r.content), allow_pickle=False)
        z, mean, std = normalise_volume(np.stack([s, s, s], axis=2), 0.1)
        ref = pred.predict_triplets(np.moveaxis(z, 2, 0)[None], 2)[0] * std + mean
        assert got.shape == (24, 20) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
    assert served.get("/readyz").json()["slice_batches"]["max_size"] > 1
    # an explicit triplet, already z-scored, passes through unnormalised
    t = rng.normal(size=(3, 12, 10)).astype(np.float32)
    r = served.post("/v1/sr/slice?scale=2&normalise=false", content=_npy(t), headers=H)
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), pred.predict_triplets(t[None], 2)[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.ray
def test_auth_everywhere_on_v1(served):
    for method, path in (("get", "/v1/model"), ("post", "/v1/sr"), ("post", "/v1/sr/slice")):
        r = served.request(method, path, content=b"x")
        assert _is_json_error(r, 401) and r.headers["www-authenticate"].startswith("Bearer")
        r = served.request(method, path, content=b"x", headers={"X-API-Key": "wrong-key-0123456789"})
        assert _is_json_error(r, 401) and r.json()["detail"] == "invalid API key"
    assert served.get("/v1/model", headers={"Authorization": f"Bearer {KEY2}"}).status_code == 200
    assert served.get("/healthz").json() == {"status": "ok"}
    # the viewer page is public (it asks for the key); its API calls are not
    r = served.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"] and "/v1/sr" in r.text


@pytest.mark.ray
def test_model_info(served):
    m = served.get("/v1/model", headers=H).json()
    assert m["scales"] == [2] and m["prior"]["backend"] == "tissue"
    assert m["metrics"] == {"val_psnr": 1.0} and m["device"] == "cpu"
    assert m["limits"]["max_body_bytes"] == 262144 and m["limits"]["max_voxels"] == 20000


@pytest.mark.ray
def test_body_cap(served):
    big = b"\x00" * 300_000
    r = served.post("/v1/sr?scale=2", content=big, headers=H)
    assert _is_json_error(r, 413) and "300000 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: the streamed bytes are counted
        for _ in range(40):
            yield b"\x00" * 10_000

    r = served.post("/v1/sr?scale=2", content=chunks(), headers=H)
    assert _is_json_error(r, 413), r.text
    # a header claiming a huge body is refused before any of it is read
    with socket.create_connection(("127.0.0.1", PORT), timeout=30) as s:
        s.sendall(f"POST /v1/sr?scale=2 HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
                  f"Content-Length: {10**12}\r\n\r\n".encode())
        resp = b""
        while b"\r\n\r\n" not in resp or b"}" not in resp.split(b"\r\n\r\n", 1)[1]:
            chunk = s.recv(4096)
            if not chunk:
                break
            resp += chunk
    assert resp.startswith(b"HTTP/1.1 413") and b'"too_large"' in resp


def _zip_of(members: dict[str, bytes]) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


HTTP_BAD = {
    # name: (path, body, extra headers, expected status)
    "not_nifti": ("/v1/sr?scale=2", b"definitely not a volume" * 30, {}, 422),
    "truncated_gzip": ("/v1/sr?scale=2", GZ[: len(GZ) // 2], {}, 422),
    "two_d": ("/v1/sr?scale=2", BAD_VOLUMES["two_d"][0], {}, 422),
    "absurd_dims": ("/v1/sr?scale=2", gzip.compress(_with_dims(RAW, [30000, 30000, 30000])), {}, 413),
    "over_voxel_cap": ("/v1/sr?scale=2", _nii(np.random.rand(40, 40, 20).astype(np.float32)), {}, 413),
    "nan": ("/v1/sr?scale=2", BAD_VOLUMES["nan"][0], {}, 422),
    "zero_size": ("/v1/sr?scale=2", b"", {}, 422),
    "zero_dim": ("/v1/sr?scale=2", _with_dims(RAW, [16, 12, 0]), {}, 422),
    "unsupported_scale": ("/v1/sr?scale=4", GZ, {}, 422),
    "non_integer_scale": ("/v1/sr?scale=2.5", GZ, {}, 422),
    "wrong_content_type": ("/v1/sr?scale=2", GZ, {"Content-Type": "text/plain"}, 415),
    "json_content_type": ("/v1/sr/slice?scale=2", b"{}", {"Content-Type": "application/json"}, 415),
    "multipart_no_file": ("/v1/sr?scale=2", b"--b\r\nContent-Disposition: form-data; name=\"x\""
                          b"\r\n\r\n1\r\n--b--\r\n", {"Content-Type": "multipart/form-data; boundary=b"}, 422),
    "multipart_garbage": ("/v1/sr?scale=2", b"garbage", {"Content-Type": "multipart/form-data"}, 400),
    "slice_not_array": ("/v1/sr/slice?scale=2", b"\x00" * 100, {}, 422),
    "slice_4d": ("/v1/sr/slice?scale=2", _npy(np.zeros((3, 4, 4, 1), np.float32)), {}, 422),
    "slice_too_big": ("/v1/sr/slice?scale=2", _npy(np.ones((100, 100), np.float32)), {}, 413),
    "slice_constant": ("/v1/sr/slice?scale=2", _npy(np.ones((8, 8), np.float32)), {}, 422),
    "slice_bad_flag": ("/v1/sr/slice?scale=2&normalise=maybe", _npy(np.ones((8, 8))), {}, 422),
    "unknown_route": ("/v1/nope", b"", {}, 404),
    # bounded cost per request (issue 17)
    # (-1, 256) over 51200 finite pixels: used to pass the 4096-pixel cap and be computed
    "npy_negative_dim": ("/v1/sr/slice?scale=2", _npy_with_shape(
        (-1, 256), (np.random.default_rng(5).random(51_200) * 100).astype("<f4").tobytes()), {}, 422),
    "npy_zero_dim": ("/v1/sr/slice?scale=2", _npy_with_shape((3, 0, 16), bytes(1000)), {}, 422),
    "gzip_member_flood": ("/v1/sr?scale=2", _members(D.MAX_GZIP_MEMBERS + 1, GZ), {}, 422),
    "float128_slice": ("/v1/sr/slice?scale=2", _npy(np.ones((8, 8), np.longdouble)), {}, 422),
    "float128_volume": ("/v1/sr?scale=2", _float128_nii(np.random.rand(8, 8, 3) + 1), {}, 422),
    # 20000 voxels (= max_voxels) in, 80000 out at x2 (max_output_voxels: 40000)
    "huge_output": ("/v1/sr?scale=2", _nii((np.random.default_rng(6).random((100, 100, 2)) * 100
                                           + 1).astype(np.float32)), {}, 413),
    "huge_output_claim": ("/v1/sr?scale=2", gzip.compress(_with_dims(RAW, [100, 100, 2])), {}, 413),
    # a DICOM-series .zip: its declared sizes (8 MB of zeros, 8 kB on the wire) are refused
    # before anything is decompressed; a .zip without DICOM is a 422
    "zip_bomb": ("/v1/sr?scale=2", _zip_of({"x.dcm": bytes(8_000_000)}),
                 {"Content-Type": "application/zip"}, 413),
    "zip_not_dicom": ("/v1/sr?scale=2", _zip_of({"README.txt": b"hi"}),
                      {"Content-Type": "application/zip"}, 422),
}


@pytest.mark.ray
@pytest.mark.parametrize("case", sorted(HTTP_BAD))
def test_bad_input_is_json_4xx(served, case):
    path, body, headers, status = HTTP_BAD[case]
    r = served.post(path, content=body, headers={**H, **headers})
    assert _is_json_error(r, status), (r.status_code, r.text)


BOUNDED_COST_KINDS = ["npy_bad_dims", "gzip_members", "short_body", "wide_type", "huge_output",
                      "dicom_zip"]


def _hostile_zip(rng: random.Random) -> bytes:
    """A .zip body that must be refused (Serve's DICOM-series input): a member declaring far
    more bytes than max_voxels need (a zip bomb), a truncated archive, no DICOM inside,
    escaping member names, garbage after the magic."""
    kind = rng.choice(["bomb", "truncated", "not_dicom", "escaping", "garbage"])
    if kind == "bomb":
        return _zip_of({"x.dcm": bytes(rng.choice([2, 8, 32]) * 1_000_000)})
    if kind == "truncated":
        z = _zip_of({f"{i}.dcm": rng.randbytes(300) for i in range(4)})
        return z[: rng.randrange(4, len(z) - 1)]
    if kind == "not_dicom":
        return _zip_of({"README.txt": b"hello", "a/b.dcm": rng.randbytes(500)})
    if kind == "escaping":
        return _zip_of({"../../../tmp/pgasr_evil.dcm": b"DICM" * 40, "/etc/x.dcm": b"x"})
    return b"PK\x03\x04" + rng.randbytes(rng.randrange(0, 2000))


def _bounded_cost_mutation(k: str, rng: random.Random, raw: bytes, gz: bytes,
                           x4: bool) -> tuple[str, bytes, dict]:
    """(path, body, headers) of the issue-17 kinds (limits: ``_overrides``): negative/zero
    .npy dims, multi-member gzip, a body shorter than its Content-Length, float128/complex
    voxels, outputs over max_output_voxels at x2 (and x4 when the checkpoint has it)."""
    path, hdr = "/v1/sr?scale=2", dict(H)
    if k == "npy_bad_dims":
        body = _npy_with_shape(rng.choice(BAD_DIMS), bytes(rng.choice([0, 4096, 200_000])))
        path = "/v1/sr/slice?scale=2"
    elif k == "gzip_members":
        n = rng.choice([3, 500, D.MAX_GZIP_MEMBERS + 1])
        body = _members(n, gz if n > D.MAX_GZIP_MEMBERS else gz[: rng.randrange(0, len(gz) // 2)])
    elif k == "short_body":  # sent stalled after these bytes (the client keeps the socket)
        body = gz[: rng.randrange(1, len(gz))]
        hdr["Content-Length"] = str(len(gz))
    elif k == "wide_type":
        vol = np.random.default_rng(rng.randrange(99)).random((8, 8, 3)) * 100 + 1
        dtype = rng.choice([np.longdouble, np.complex128, np.complex64])
        if rng.random() < 0.5:
            body = _float128_nii(vol) if dtype is np.longdouble else _nii(vol.astype(dtype))
        else:
            body, path = _npy(vol[:, :, 0].astype(dtype)), "/v1/sr/slice?scale=2"
    elif k == "dicom_zip":
        body = _hostile_zip(rng)
        hdr["Content-Type"] = rng.choice(["application/zip", "application/octet-stream"])
    else:  # huge_output: within max_voxels / max_slice_pixels, over max_output_voxels
        scale = 4 if x4 and rng.random() < 0.5 else 2
        path = f"/v1/sr?scale={scale}"
        if scale == 4 and rng.random() < 0.5:
            body, path = _npy(np.ones((60, 60), np.float32)), "/v1/sr/slice?scale=4"
        else:
            body = gzip.compress(_with_dims(raw, [60, 60, 3] if scale == 4 else [100, 100, 2]))
    return path, body, hdr


def _mutations(rng: random.Random, x4: bool = False):
    """(kind, path, body, headers) for hostile requests; ``x4``: the service has scale 4."""
    small = synthetic_volume((8, 8, 3), seed=1)
    raw, gz = image_to_bytes(small, gz=False), image_to_bytes(small)
    arr = _npy((np.random.default_rng(1).random((8, 8)) * 100).astype(np.float32))
    kinds = ["truncated", "bitflip_header", "wrong_dims", "huge_header", "nan", "random",
             "oversize", "bad_scale", "no_key", "bad_ctype", "npy_header", "npy_truncated",
             *BOUNDED_COST_KINDS]
    bad_scales = ["0", "-2", "3", "1e9", "%00", "x" * 300] + ([] if x4 else ["4"])
    while True:
        k = rng.choice(kinds)
        path, hdr = "/v1/sr?scale=2", dict(H)
        if k == "truncated":  # a .gz cut inside its 8-byte trailer still holds the whole image
            src = rng.choice([raw, gz])
            body = src[: rng.randrange(0, len(src) - (8 if src is gz else 1))]
        elif k == "bitflip_header":
            b = bytearray(raw)
            for _ in range(rng.randint(1, 6)):
                b[rng.randrange(0, 348)] ^= 1 << rng.randrange(8)
            body = gzip.compress(bytes(b)) if rng.random() < 0.5 else bytes(b)
        elif k == "wrong_dims":
            dims = rng.choice([[8], [8, 8], [8, 8, 3, 2], [8, 8, 3, 1, 4], [0, 8, 3], [8, 8, -3]])
            body = _with_dims(raw, dims)
        elif k == "huge_header":
            b = bytearray(raw)
            field = rng.choice([(40, "<8h", [3, 32767, 32767, 32767, 1, 1, 1, 1]),
                                (108, "<f", [rng.choice([1e38, -1.0, float("nan")])]),
                                (70, "<h", [rng.choice([32767, -1, 1536, 2047])]),
                                (0, "<i", [rng.choice([2**31 - 1, -1, 0])])])
            off, fmt, vals = field
            b[off : off + struct.calcsize(fmt)] = struct.pack(fmt, *vals)
            body = gzip.compress(bytes(b))
        elif k == "nan":
            d = np.asanyarray(small.dataobj).copy()
            d[rng.randrange(8), rng.randrange(8), rng.randrange(3)] = rng.choice([np.nan, np.inf])
            body = _nii(d)
        elif k == "random":
            body = rng.randbytes(rng.randrange(0, 4000))
            if rng.random() < 0.3:
                body = b"\x1f\x8b" + body
            path = rng.choice(["/v1/sr?scale=2", "/v1/sr/slice?scale=2"])
        elif k == "oversize":
            body = rng.randbytes(1024) * 260
        elif k == "bad_scale":
            path = f"/v1/sr?scale={rng.choice(bad_scales)}"
            body = gz
        elif k == "no_key":
            hdr = rng.choice([{}, {"X-API-Key": KEY[:-1]}, {"Authorization": "Bearer"}])
            body = gz
        elif k == "bad_ctype":
            hdr["Content-Type"] = rng.choice(["text/html", "application/json", "image/jpeg",
                                              "application/x-www-form-urlencoded"])
            body = gz
        elif k == "npy_header":
            b = bytearray(arr)
            i = rng.randrange(8, 80)
            b[i : i + 8] = rng.choice([b"(9999999", b"'<O',   ", b"\x00" * 8, b"((((((((", b"99999999"])
            body, path = bytes(b), "/v1/sr/slice?scale=2"
        elif k in BOUNDED_COST_KINDS:
            path, body, hdr = _bounded_cost_mutation(k, rng, raw, gz, x4)
        else:  # npy_truncated
            body, path = arr[: rng.randrange(0, len(arr) - 1)], "/v1/sr/slice?scale=2"
        yield k, path, body, hdr


def _raw_post(path: str, body: bytes, headers: dict, timeout: float = 30.0,
              port: int = PORT) -> tuple[int, str, bytes]:
    """POST over a bare socket, sending exactly ``body`` whatever Content-Length says (a
    short body keeps the connection open); returns (status, content type, content)."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body)
        resp = b""
        while b"\r\n\r\n" not in resp:
            resp += s.recv(65536) or b"\r\n\r\n"
        top, _, content = resp.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        while len(content) < int(fields.get("content-length", 0)):
            chunk = s.recv(65536)
            if not chunk:
                break
            content += chunk
    return int(lines[0].split()[1]), fields.get("content-type", ""), content


def _replica_pids(app: str) -> list[int]:
    """Pids of the live replicas of Serve application ``app`` (deployment ``PGASR``).

    Read from GCS's actor table: ``ray.util.state.list_actors`` gives the same rows but goes
    through the dashboard's API server, which the test session does not start."""
    import ray

    return sorted(a["Pid"] for a in ray._private.state.actors().values()
                  if a["ActorClassName"] == f"ServeReplica:{app}:PGASR" and a["State"] == "ALIVE")


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


FUZZ_RSS_GROWTH_MB = 100


@pytest.mark.ray
def test_hostile_input_fuzzer(served):
    """500 hostile requests (fixed seed, loopback; the kinds of ``_mutations``, including
    negative/zero .npy dims, multi-member gzip, short bodies sent over a bare socket,
    float128/complex voxels and outputs over max_output_voxels): every one answered with a
    JSON 4xx (a header bit flip that leaves a valid image may legitimately give 200), short
    bodies with a 408, never a 5xx, and
    the same replica keeps serving; its resident memory grows by less than
    FUZZ_RSS_GROWTH_MB over the 500 (after a warm-up of 100 others and valid requests)."""
    replica = served.get("/readyz").json()["replica"]
    (pid,) = _replica_pids("pgasr")

    def send(req):
        kind, path, body, hdr = req
        try:
            if kind == "short_body":
                st, ctype, content = _raw_post(path, body, hdr)
                json_ok = ctype.startswith("application/json") and b'"error"' in content
                return kind, st, "" if json_ok else content[:200]
            r = served.post(path, content=body, headers=hdr)
        except (httpx.HTTPError, OSError) as e:  # the connection itself must not break either
            return kind, -1, repr(e)
        if r.status_code == 200:
            return kind, 200, ""
        return kind, r.status_code, "" if _is_json_error(r) else r.text[:200]

    # warm-up: allocator arenas of the executor threads, lazily imported decoders, caches
    warm = _mutations(random.Random(99))
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(send, [next(warm) for _ in range(100)]))
    for _ in range(2):
        assert served.post("/v1/sr?scale=2", content=GZ, headers=H).status_code == 200
        assert served.post("/v1/sr/slice?scale=2", content=_npy(np.random.rand(12, 10) * 100),
                           headers=H).status_code == 200
    rss_before = _rss_mb(pid)

    gen = _mutations(random.Random(1234))
    reqs = [next(gen) for _ in range(500)]
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(send, reqs))
    rss_after = _rss_mb(pid)
    print(collections.Counter((k, st) for k, st, _ in results))
    print(f"replica {pid} RSS {rss_before:.1f} MB -> {rss_after:.1f} MB over 500 requests")
    bad = [r for r in results if r[1] != 200 and (r[1] < 400 or r[1] >= 500 or r[2])]
    assert not bad, bad[:10]
    ok = [r for r in results if r[1] == 200]
    assert all(k == "bitflip_header" for k, _, _ in ok), ok
    assert len(ok) < 50
    statuses = {st for _, st, _ in results}
    assert {401, 408, 413, 415, 422} <= statuses, statuses
    assert {st for k, st, _ in results if k == "short_body"} == {408}
    assert served.get("/healthz").status_code == 200
    assert served.get("/readyz").json()["replica"] == replica
    assert _replica_pids("pgasr") == [pid]
    assert rss_after - rss_before < FUZZ_RSS_GROWTH_MB, (rss_before, rss_after)
    r = served.post("/v1/sr?scale=2", content=GZ, headers=H)
    assert r.status_code == 200


@pytest.mark.ray
def test_short_body_is_408_over_http(served):
    """Through Serve's proxy: a body shorter than its Content-Length is a JSON 408 after
    serve.body_idle_timeout_s (1 s here), not after the 60 s request deadline, and the
    replica's slot is free again."""
    t0 = time.perf_counter()
    status, ctype, content = _raw_post("/v1/sr?scale=2", GZ[:200],
                                       {**H, "Content-Length": str(len(GZ))})
    elapsed = time.perf_counter() - t0
    assert status == 408 and ctype.startswith("application/json"), (status, content[:200])
    assert b"serve.body_idle_timeout_s" in content and elapsed < 10, elapsed
    assert served.get("/readyz").json()["inflight"] == 0


@pytest.mark.ray
def test_client_library_and_cli(served, tmp_path, monkeypatch):
    import argparse

    from pgasr.client import Client, ServiceError, register

    src = tmp_path / "lr.nii.gz"
    src.write_bytes(GZ)
    keyf = tmp_path / "key"
    keyf.write_text(KEY + "\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["client", "sr", "--url", URL, "--api-key-file", str(keyf),
                              "--scale", "2", str(src), str(tmp_path / "sr.nii.gz")])
    args.func(args)
    direct = served.post("/v1/sr?scale=2", content=GZ, headers=H).content
    assert (tmp_path / "sr.nii.gz").read_bytes() == direct
    # pgasr sr's argument style: --input / --output (the positionals above still work)
    args = parser.parse_args(["client", "sr", "--url", URL, "--api-key-file", str(keyf),
                              "--input", str(src), "--output", str(tmp_path / "sr2.nii.gz")])
    args.func(args)
    assert (tmp_path / "sr2.nii.gz").read_bytes() == direct
    for bad in (["--input", str(src)], ["--input", str(src), str(src), "o.nii.gz"]):
        args = parser.parse_args(["client", "sr", "--url", URL, *bad])
        with pytest.raises(ValueError, match="--output is required|once"):
            args.func(args)
    monkeypatch.setenv("PGASR_API_KEY", KEY2)
    args = parser.parse_args(["client", "info", "--url", URL])
    args.func(args)
    c = Client(URL, KEY)
    out = c.sr_file(src, tmp_path / "sr.nii", 2)
    assert nib.load(out).shape == (32, 24, 5)
    assert c.sr_slice(np.random.rand(6, 5) * 100, 2).shape == (12, 10)
    assert c.model()["scales"] == [2] and c.health() == {"status": "ok"}
    with pytest.raises(ServiceError) as e:
        Client(URL, "wrong-key-0123456789").model()
    assert e.value.status == 401 and e.value.error == "unauthorized"
    with pytest.raises(ServiceError, match="HTTP 422 invalid_input: not a NIfTI-1") as e:
        c.sr_volume(b"junk" * 100, 2)
    with pytest.raises(ServiceError, match="cannot reach") as e:
        Client("http://127.0.0.1:8409", KEY, timeout=5).health()
    assert e.value.status == 0
    with pytest.raises(ValueError, match="http"):
        Client("file:///etc/passwd")


@pytest.mark.skipif(__import__("shutil").which("node") is None, reason="needs node")
def test_viewer_js_parses_nifti_and_matches_bicubic(tmp_path, repo_root):
    """The viewer's own JS (serve/static/index.html), run by node: it reads .nii.gz and .nii
    (both endiannesses, int16 with scaling) and its bicubic equals the pipeline's lr_up."""
    import json
    import subprocess

    import torch

    from pgasr.steps import upsample_lr

    html = (repo_root / "serve/static/index.html").read_text()
    js = html.split('<script>', 1)[1].split('$("info").onclick', 1)[0]
    rng = np.random.default_rng(0)
    vol = (rng.random((7, 5, 3)) * 1000).astype(np.float32)
    files = {"f32.nii.gz": image_to_bytes(nib.Nifti1Image(vol, np.eye(4))),
             "be.nii": image_to_bytes(nib.Nifti1Image(vol.astype(">f4"), np.eye(4)), gz=False)}
    i16 = nib.Nifti1Image(np.round(vol).astype(np.int16), np.eye(4))
    i16.header.set_slope_inter(0.5, 10.0)
    files["i16.nii.gz"] = image_to_bytes(i16)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    js += """
    const fs = require("fs");
    (async () => {
      const out = {};
      for (const name of process.argv.slice(2)) {
        const buf = fs.readFileSync(name);
        const ab = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.length);
        const v = parseNifti(await gunzipIfNeeded(ab));
        out[name] = { shape: [v.nx, v.ny, v.nz], data: Array.from(v.data),
                      bic: Array.from(bicubic(sliceOf(v, 1), v.nx, v.ny, 2)) };
      }
      console.log(JSON.stringify(out));
    })();
    """
    (tmp_path / "viewer.js").write_text(js)
    res = subprocess.run(["node", str(tmp_path / "viewer.js"), *[str(tmp_path / n) for n in files]],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for name in files:
        o = out[str(tmp_path / name)]
        ref = nib.Nifti1Image.from_bytes(gzip.decompress(files[name]) if name.endswith(".gz")
                                         else files[name]).get_fdata().astype(np.float32)
        assert o["shape"] == list(ref.shape)
        js_vol = np.array(o["data"], np.float32).reshape(ref.shape[::-1]).T  # X fastest
        np.testing.assert_allclose(js_vol, ref, rtol=1e-6)
        lr_slice = torch.from_numpy(ref[:, :, 1].T.copy())[None, None]  # (1, 1, ny, nx)
        bic = upsample_lr(lr_slice, (ref.shape[1] * 2, ref.shape[0] * 2))[0, 0].numpy()
        np.testing.assert_allclose(np.array(o["bic"]).reshape(bic.shape), bic, rtol=1e-4, atol=1e-2)


@pytest.mark.ray
def test_replica_killed_under_bounded_load(served, ckpt, key_file):
    """Two replicas (a second application under /ha), 60 slice requests from 4 client
    threads; one replica process is SIGKILLed after the first 15 answers. Every request ends
    as a correct 200 or a clean retryable failure (a 5xx or a dropped connection, never a
    4xx or a wrong body); most succeed; the load ends by itself; Serve replaces the replica
    and every request after that succeeds."""
    from ray import serve

    n_requests, kill_after, threads = 60, 15, 4
    app = A.build_app({"config": None, "overrides": _overrides(
        ckpt, key_file, **{"serve.min_replicas": 2, "serve.max_replicas": 2,
                           "serve.batch_wait_timeout_s": 0.01})})
    serve.run(app, name="pgasr-ha", route_prefix="/ha", blocking=False)
    try:
        deadline = time.monotonic() + 120
        while len(pids := _replica_pids("pgasr-ha")) < 2:
            assert time.monotonic() < deadline, "two replicas did not start"
            time.sleep(0.5)
        assert served.get("/ha/readyz").status_code == 200
        victim = pids[0]
        rng = np.random.default_rng(7)
        body = _npy((rng.random((12, 10)) * 500 + 20).astype(np.float32))
        done = threading.Semaphore(0)

        def one(_):
            try:
                with httpx.Client(base_url=URL, timeout=60) as c:
                    r = c.post("/ha/v1/sr/slice?scale=2", content=body, headers=H)
            except httpx.HTTPError as e:
                return "conn_error", type(e).__name__
            finally:
                done.release()
            if r.status_code == 200:
                try:
                    a = np.load(io.BytesIO(r.content), allow_pickle=False)
                    good = a.shape == (24, 20) and bool(np.isfinite(a).all())
                except ValueError:
                    good = False
                return ("ok", "") if good else ("malformed", f"200 {r.content[:80]!r}")
            if r.status_code >= 500:
                return "5xx", f"{r.status_code} {r.text[:120]}"
            return "malformed", f"{r.status_code} {r.text[:120]}"

        t0 = time.monotonic()
        with ThreadPoolExecutor(threads) as ex:
            futs = [ex.submit(one, i) for i in range(n_requests)]
            for _ in range(kill_after):
                assert done.acquire(timeout=120)
            os.kill(victim, signal.SIGKILL)
            t_kill = time.monotonic() - t0
            finished, pending = wait(futs, timeout=240)
        assert not pending, f"{len(pending)} requests never ended"
        load_s = time.monotonic() - t0
        results = [f.result() for f in futs]
        counts = collections.Counter(kind for kind, _ in results)
        print(f"killed replica pid {victim} at {t_kill:.1f} s; load of {n_requests} ended after "
              f"{load_s:.1f} s: {dict(counts)}; failures: "
              f"{collections.Counter(d for k, d in results if k != 'ok')}")
        assert counts["malformed"] == 0, [r for r in results if r[0] == "malformed"][:5]
        assert counts["ok"] >= n_requests // 2, counts
        assert sum(counts.values()) == n_requests

        # recovery: the controller replaces the dead replica; /readyz answers and every
        # request after that succeeds
        deadline = time.monotonic() + 180
        while True:
            pids = _replica_pids("pgasr-ha")
            if len(pids) == 2 and victim not in pids:
                break
            assert time.monotonic() < deadline, f"replica not replaced: {pids}"
            time.sleep(0.5)
        recovered_s = time.monotonic() - t0 - t_kill
        assert served.get("/ha/readyz").json()["ready"] is True
        for _ in range(10):
            r = served.post("/ha/v1/sr/slice?scale=2", content=body, headers=H)
            assert r.status_code == 200, r.text
        print(f"replaced after {recovered_s:.1f} s: replicas {pids}")
    finally:
        serve.delete("pgasr-ha")


@pytest.fixture
def chromium_installed():
    """Debian's chromium + chromedriver, or a skip with the reason (a failure under CI=true:
    CI installs them through `make test`, so their absence there is a broken setup)."""
    missing = missing_browser()
    if missing:
        msg = (f"{missing} not installed; `make setup` installs Debian's chromium and "
               f"chromium-driver when run as root with apt-get")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.mark.ray
def test_viewer_in_headless_chromium(chromium_installed, served, tmp_path):
    """GET / in a real headless Chromium (Debian's chromium + chromedriver via selenium):
    the key is checked, a NIfTI goes in through the file input, and the SR panel shows
    exactly the service's SR slice under the page's display window."""
    nii = tmp_path / "lr.nii.gz"
    nii.write_bytes(GZ)
    shot = tmp_path / "viewer.png"
    with chromium(tmp_path / "profile") as driver:
        res = run_viewer(driver, URL, KEY, nii, timeout_s=120, screenshot=shot)
    assert res.status.startswith("SR 32 x 24 x 5"), res.status
    assert res.download_visible and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lw, lh, lr_px = res.lr_canvas
    assert (lw, lh) == (16, 12) and len(set(lr_px)) > 10
    w, h, px = res.sr_canvas
    assert (w, h) == (32, 24)
    got = np.array(px, np.float64).reshape(h, w)
    assert len(np.unique(got)) > 20 and got.std() > 10  # an image, not a blank panel
    # the same pixels from the service's answer, drawn as the page draws (rows flipped,
    # window from the LR volume, Math.round)
    r = served.post("/v1/sr?scale=2", content=GZ, headers=H)
    sr = nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).get_fdata(dtype=np.float32)
    lo, hi = res.window
    sl = sr[:, :, res.slice_index].T[::-1].astype(np.float64)
    want = np.clip(np.floor(255 * (sl - lo) / (hi - lo) + 0.5), 0, 255)
    assert np.abs(got - want).max() <= 1


def test_one_replica_serves_a_checkpoint_per_scale(tmp_path, key_file):
    """A run's x2 model (stage2) and x4 model (stage2_x4), each trained on its own (#16): one
    Service routes each request by ?scale= to the model trained for it."""
    from pgasr.inference import Predictor, PredictorSet

    x2 = make_tiny_checkpoint(tmp_path / "stage2", scales=(2,), seed=0)
    x4 = make_tiny_checkpoint(tmp_path / "stage2_x4", scales=(4,), seed=1)
    cfg = load_config(None, _overrides(x2, key_file) + [f"serve.checkpoints=[{x4}]"])
    assert A.load_serve_config({"overrides": _overrides(x2, key_file) + [
        f"serve.checkpoints=[{x4}]"]}).serve.checkpoints == [str(x4.resolve())]
    with pytest.raises(ConfigError, match=r"serve.checkpoints\[0\]"):
        A.load_serve_config({"overrides": _overrides(x2, key_file) + [
            f"serve.checkpoints=[{tmp_path / 'missing'}]"]})
    pset = PredictorSet.from_checkpoints([x2, x4], device="cpu")
    with pytest.raises(ValueError, match="x2 is served by both"):
        PredictorSet.from_checkpoints([x2, x2], device="cpu")
    svc = A.Service(pset, cfg, A.KeyChecker(A.load_api_keys(cfg.serve)))
    vol = synthetic_volume()
    refs = {s: Predictor.from_checkpoint(p, device="cpu", batch_size=16).predict_image(vol, s)
            for s, p in ((2, x2), (4, x4))}

    async def run():
        async with _asgi_client(svc) as c:
            info = (await c.get("/v1/model", headers=H)).json()
            assert info["scales"] == [2, 4] and set(info["checkpoints"]) == {"2", "4"}
            for s in (2, 4):
                r = await c.post(f"/v1/sr?scale={s}", content=image_to_bytes(vol), headers=H)
                assert r.status_code == 200, r.text
                out = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
                np.testing.assert_allclose(np.asarray(out.dataobj), refs[s].get_fdata(),
                                           rtol=1e-5, atol=1e-4)
            r = await c.post("/v1/sr?scale=3", content=image_to_bytes(vol), headers=H)
            assert _json_status(r, 422, "invalid_input") and "scale" in r.json()["detail"]

    try:
        asyncio.run(run())
    finally:
        svc.close()


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_python_m_serve_app_serves_and_refuses_caps_the_cluster_cannot_hold(ckpt, tmp_path):
    """`python -m serve.app` (README, `make serve-demo`) in its own process and cluster: caps
    whose memory reservation the cluster cannot hold are a one-line exit 2 instead of a replica
    that waits forever; then a /v1/sr round trip answers 200 (it was a 422 for every call when
    the app ran from __main__: the replica could not resolve FastAPI's Request annotation)."""
    port = _unused_port()
    env = {**os.environ, "PGASR_API_KEYS": KEY, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    base = [sys.executable, "-m", "serve.app", "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--set", f"serve.checkpoint={ckpt}", "--set", f"serve.port={port}"]
    r = subprocess.run([*base, "--set", "serve.memory_per_replica=10000000000000"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "lower the caps or set serve.memory_per_replica" in r.stderr
    proc = subprocess.Popen([*base, "--set", "serve.memory_per_replica=1500000000"], cwd=ROOT,
                            env=env, stdout=open(tmp_path / "serve.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        r = httpx.post(f"{url}/v1/sr?scale=2", content=GZ, timeout=120,
                       headers={**H, "Content-Type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        assert nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).shape[:2] == (32, 24)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the process group this test started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_resample_to_the_model_grid_is_bounded_by_the_caps(make_service, tmp_path):
    """``?resample=true``: the volume goes to the model's grid first, as ``pgasr sr`` does by
    default; the grid's size is computed from the header and checked against the voxel caps
    before anything is resampled (a 100 mm pixdim would otherwise upsample 50x per axis)."""
    from pgasr.inference import Predictor

    pred = Predictor.from_checkpoint(
        make_tiny_checkpoint(tmp_path / "ck", extra_meta={"voxel_size": [1.0, 1.0, 1.0]}),
        device="cpu")  # LR voxels of 2 mm at x2
    svc = make_service(pred)
    vol = (np.random.default_rng(3).random((12, 10, 3)) * 100 + 1).astype(np.float32)

    async def go():
        async with _asgi_client(svc) as c:
            out = {}
            for name, aff, q in [("native", np.diag([4.0, 4.0, 3.0, 1.0]), ""),
                                 ("model", np.diag([4.0, 4.0, 3.0, 1.0]), "&resample=true"),
                                 ("huge", np.diag([100.0, 100.0, 3.0, 1.0]), "&resample=true"),
                                 ("bad", np.diag([4.0, 4.0, 3.0, 1.0]), "&resample=maybe")]:
                out[name] = await c.post(f"/v1/sr?scale=2{q}", content=_nii(vol, aff), headers=H)
            return out

    r = asyncio.run(go())
    assert r["native"].status_code == 200 and r["native"].headers["X-PGASR-Shape"] == "24,20,3"
    assert r["model"].status_code == 200 and r["model"].headers["X-PGASR-Shape"] == "48,40,3"
    sr = nib.Nifti1Image.from_bytes(gzip.decompress(r["model"].content))
    assert sr.header.get_zooms()[:2] == pytest.approx((1.0, 1.0))
    assert pred.model_grid_shape(nib.Nifti1Image(vol, np.diag([100.0, 100.0, 3.0, 1.0])), 2) \
        == (600, 500, 3)
    assert _json_status(r["huge"], 413, "too_large"), r["huge"].text
    assert "on the model's grid this volume would have 900000 voxels" in r["huge"].json()["detail"]
    assert _json_status(r["bad"], 422), r["bad"].text
