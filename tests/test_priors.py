"""pgasr.priors: aggregation, windowing, both backends (tiny random SAM on CPU), registry,
backend matching, checkpoint verification, cache and the row adapter."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator

import pgasr.priors.sam as sam_mod
from pgasr.data import schema
from pgasr.priors import (
    PRIORS,
    CachedPrior,
    PriorCache,
    PriorConfig,
    PriorMismatchError,
    SamPrior,
    TissuePrior,
    build_prior,
    cached_prior,
    check_backend_match,
    describe_prior,
    slice_key,
    sum_normalise,
    to_uint8_rgb,
    upsample_bicubic,
    window,
)
from pgasr.priors.sam import (
    OFFICIAL_CHECKPOINTS,
    build_tiny_sam,
    enable_sdpa,
    load_sam,
    verify_checkpoint,
)
from pgasr.priors.shards import add_prior_columns, to_arrow


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 shared cores: oversubscribed torch threads make CPU timings erratic.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _no_sam_env(monkeypatch):
    monkeypatch.delenv("PGASR_SAM_CHECKPOINT", raising=False)


def disc_phantom(size: int = 48) -> np.ndarray:
    """Head (r<20, level 1) > brain (r<14, level 2) > ventricle (r<5, level 4), plus an
    8-pixel bright speckle outside the head."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - 23.5, xx - 23.5)
    s = (1.0 * (r < 20) + 1.0 * (r < 14) + 2.0 * (r < 5)).astype(np.float32)
    s[40:44, 2:4] = 4.0
    return s


def noisy_slices(n: int = 3, size: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = disc_phantom(size)
    return np.stack([np.roll(base, 2 * i, axis=1) + 0.05 * rng.standard_normal(base.shape)
                     for i in range(n)]).astype(np.float32)


TINY = dict(backend="sam", sam_model_type="tiny", points_per_side=4, points_per_batch=16,
            pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, cache=False)


# ----------------------------------------------------------------------------- shared steps


def test_sum_normalise_golden():
    m = np.zeros((3, 2, 3), dtype=bool)
    m[0] = [[1, 1, 1], [1, 1, 1]]
    m[1] = [[1, 1, 0], [0, 0, 0]]
    m[2] = [[1, 0, 0], [0, 0, 1]]
    s = sum_normalise(m)
    np.testing.assert_allclose(s, np.array([[3, 2, 1], [1, 1, 2]]) / 3)
    assert s.dtype == np.float32
    assert not sum_normalise(np.zeros((2, 4, 5), bool)).any()
    assert sum_normalise(np.zeros((0, 4, 5), bool)).shape == (4, 5)
    assert sum_normalise(np.zeros((0, 0, 0), bool), (4, 5)).shape == (4, 5)
    with pytest.raises(ValueError, match=r"\(n, H, W\)"):
        sum_normalise(np.zeros((4, 5)))


def test_window_and_uint8():
    x = np.arange(201, dtype=np.float32).reshape(1, 201)  # percentiles are exact here
    w = window(x, 0.5, 99.5)
    assert w[0, 0] == 0 and w[0, 1] == 0 and w[0, -1] == 1 and w[0, -2] == 1
    np.testing.assert_allclose(w[0, 100], 0.5)
    assert not window(np.full((4, 4), 3.0)).any()
    rgb = to_uint8_rgb(x)
    assert rgb.shape == (1, 201, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 2]).all() and rgb[0, 100, 0] == 128  # round(127.5)
    # Windowing makes the prior invariant to affine intensity changes.
    p = TissuePrior()
    s = disc_phantom()
    np.testing.assert_array_equal(p(s[None]), p(3.0 * s[None] - 7.0))


def test_upsample_bicubic_matches_torch():
    lr = np.random.default_rng(0).standard_normal((2, 3, 8, 6)).astype(np.float32)
    up = upsample_bicubic(lr, (16, 12))
    ref = F.interpolate(torch.from_numpy(lr), size=(16, 12), mode="bicubic", align_corners=False)
    assert isinstance(up, np.ndarray) and up.shape == (2, 3, 16, 12) and up.dtype == np.float32
    np.testing.assert_allclose(up, ref.numpy(), atol=1e-6)
    t = upsample_bicubic(torch.from_numpy(lr[0]), (16, 12))
    assert isinstance(t, torch.Tensor) and t.shape == (3, 16, 12)


def test_input_validation():
    p = TissuePrior()
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        p(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="floating"):
        p(np.zeros((1, 4, 4), np.int16))
    bad = np.zeros((3, 8, 8), np.float32)
    bad[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match=r"slice\(s\) \[1\]"):
        p(bad)
    assert p(np.zeros((0, 8, 8), np.float32)).shape == (0, 8, 8)


# ----------------------------------------------------------------------------- tissue


def test_tissue_golden_phantom():
    p = TissuePrior(PriorConfig(tissue_smooth_sigma=0.0, tissue_min_area=0.005))
    s = disc_phantom()
    segs = p.segments(s)
    # head, 3 class bands (ring, brain, ventricle), 2 super-level sets; speckle (8 px) dropped
    assert sorted(segs.sum(axis=(1, 2)).tolist()) == [80, 80, 536, 616, 648, 1264]
    out = p(s[None])[0]
    assert out.dtype == np.float16 and out.shape == s.shape
    # counts 0 | 2 (head+band) | 3 (+ > t1) | 4 (+ > t2), divided by the max 4
    assert out[0, 0] == 0 and out[23, 39] == 0.5 and out[23, 31] == 0.75 and out[23, 23] == 1.0
    assert out[41, 2] == 0, "segments below tissue_min_area are dropped"
    np.testing.assert_array_equal(out, sum_normalise(segs).astype(np.float16))


def test_tissue_properties():
    p = TissuePrior()
    x = noisy_slices(4)
    a, b = p(x), p(x.copy())
    np.testing.assert_array_equal(a, b)  # deterministic
    assert a.shape == x.shape and a.dtype == np.float16
    assert a.min() >= 0 and np.all(a.reshape(4, -1).max(axis=1) == 1)
    assert not p(np.zeros((1, 16, 16), np.float32)).any()  # empty slice -> zeros
    with pytest.raises(ValueError, match="tissue_classes"):
        TissuePrior(PriorConfig(tissue_classes=1))


# ----------------------------------------------------------------------------- SAM (tiny)


def test_tiny_sam_end_to_end_matches_stock_generator():
    """Precomputed embeddings + direct mask path == the stock per-slice
    ``SamAutomaticMaskGenerator.generate`` (bitwise, with plain attention and encoder batch
    1), == sum/max of its masks; SDPA + batched encoding agree up to float rounding."""
    x = noisy_slices(3)
    plain = SamPrior(PriorConfig(**TINY, sam_sdpa=False, sam_batch_size=1), model=build_tiny_sam(0))
    out = plain(x)
    assert out.shape == x.shape and out.dtype == np.float16
    assert out.min() >= 0 and out.max() <= 1

    stock = SamAutomaticMaskGenerator(build_tiny_sam(0), points_per_side=4, points_per_batch=16,
                                      pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                      box_nms_thresh=1.0)
    for i, s in enumerate(x):
        anns = stock.generate(to_uint8_rgb(s))
        assert len(anns) > 3, "thresholds are set so the random SAM yields masks"
        masks = np.stack([a["segmentation"] for a in anns])
        ref = (masks.sum(0) / masks.sum(0).max()).astype(np.float16)
        np.testing.assert_array_equal(out[i], ref)
        assert out[i].max() == 1 and len(np.unique(out[i])) > 2
    np.testing.assert_array_equal(plain(x), out)  # deterministic

    fast = SamPrior(PriorConfig(**TINY, sam_batch_size=2), model=build_tiny_sam(0))
    assert fast.sdpa_modules == 2
    got = fast(x)
    np.testing.assert_array_equal(fast(x), got)  # deterministic
    # A pixel whose logit is within rounding of the threshold may flip (benchmark: 2.4e-5).
    assert (got == out).mean() > 0.999 and np.abs(got.astype(np.float32) - out).max() < 0.05


def test_tiny_sam_crop_layers_use_the_stock_path_with_injected_embedding():
    x = noisy_slices(1)
    kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
              box_nms_thresh=1.0, crop_n_layers=1)
    prior = SamPrior(PriorConfig(**{**TINY, "crop_n_layers": 1}), model=build_tiny_sam(0))
    calls = []
    orig = prior.model.image_encoder.forward
    prior.model.image_encoder.forward = lambda t: calls.append(t.shape[0]) or orig(t)
    out = prior(x)
    assert calls[0] == 1 and len(calls) == 1 + 4, "1 batched full-image pass + 4 crop passes"
    anns = SamAutomaticMaskGenerator(build_tiny_sam(0), **kw).generate(to_uint8_rgb(x[0]))
    masks = np.stack([a["segmentation"] for a in anns])
    np.testing.assert_array_equal(out[0], (masks.sum(0) / masks.sum(0).max()).astype(np.float16))


def test_tiny_sam_thresholds_can_remove_all_masks():
    cfg = PriorConfig(**{**TINY, "pred_iou_thresh": 1.5})  # no IoU prediction exceeds 1.5
    out = SamPrior(cfg, model=build_tiny_sam(0))(noisy_slices(2))
    assert out.shape == (2, 48, 48) and not out.any()


def test_sdpa_attention_is_equivalent():
    x = torch.randn(2, 3, 128, 128)
    ref_model, sdpa_model = build_tiny_sam(1), build_tiny_sam(1)
    assert enable_sdpa(sdpa_model) == 2
    with torch.no_grad():
        a = ref_model.image_encoder(x)
        b = sdpa_model.image_encoder(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sam_config_errors():
    with pytest.raises(ValueError, match="needs SAM weights.*sam_vit_b_01ec64"):
        load_sam(PriorConfig(backend="sam"))
    with pytest.raises(ValueError, match="sam_model_type"):
        load_sam(PriorConfig(backend="sam", sam_model_type="vit_x"))
    with pytest.raises(FileNotFoundError, match="SAM checkpoint not found"):
        load_sam(PriorConfig(backend="sam", sam_checkpoint="/nonexistent/sam.pth"))
    with pytest.raises(ValueError, match="bf16 needs CUDA"):
        SamPrior(PriorConfig(**{**TINY, "device": "cpu", "sam_precision": "bf16"}),
                 model=build_tiny_sam(0))


def test_checkpoint_sha256_checked_then_loaded_through_registry(tmp_path, monkeypatch):
    src = build_tiny_sam(3)
    ckpt = tmp_path / "sam_tiny.pth"
    torch.save(src.state_dict(), ckpt)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()

    # Wrong file for the model type: clear error naming expected digest and the URL.
    with pytest.raises(ValueError, match=OFFICIAL_CHECKPOINTS["vit_b"]["sha256"]) as e:
        verify_checkpoint(ckpt, "vit_b")
    assert "not an official SAM checkpoint" in str(e.value) and f"prior.sam_sha256={digest}" in str(e.value)
    # An official checkpoint of another type is recognised.
    monkeypatch.setitem(OFFICIAL_CHECKPOINTS, "vit_h", {**OFFICIAL_CHECKPOINTS["vit_h"], "sha256": digest})
    with pytest.raises(ValueError, match="official vit_h checkpoint.*sam_model_type=vit_h"):
        verify_checkpoint(ckpt, "vit_b")

    # Loading goes through sam_model_registry[model_type](checkpoint=path).
    seen = {}

    def fake_vit_b(checkpoint=None):
        seen["checkpoint"] = checkpoint
        m = build_tiny_sam(99)
        m.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        return m

    monkeypatch.setitem(sam_mod.sam_model_registry, "vit_b", fake_vit_b)
    cfg = PriorConfig(backend="sam", sam_checkpoint=str(ckpt), sam_sha256=digest)
    model, info = load_sam(cfg)
    assert seen["checkpoint"] == str(ckpt) and info["checkpoint_sha256"] == digest
    for (k, a), b in zip(src.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    # And via the environment variable + backend auto.
    monkeypatch.setenv("PGASR_SAM_CHECKPOINT", str(ckpt))
    prior = build_prior(PriorConfig(sam_sha256=digest, **{k: v for k, v in TINY.items()
                                                          if k not in ("backend", "sam_model_type")}))
    assert isinstance(prior, SamPrior) and prior.describe()["fallback_reason"] is None
    assert prior.describe()["params"]["checkpoint_sha256"] == digest


def test_montage_shows_the_configured_sam_and_says_when_it_is_the_random_one(tmp_path, monkeypatch):
    """docs/img/priors_montage.png's SAM row: the weights the environment configures (loaded
    through the real path), else the tiny random SAM, titled as such."""
    from pgasr.priors.montage import sam_for_montage

    monkeypatch.delenv("PGASR_SAM_CHECKPOINT", raising=False)
    sam, title = sam_for_montage()
    assert "RANDOM" in title and sam.describe()["params"]["model_type"] == "tiny"

    ckpt = tmp_path / "sam_weights.pth"
    torch.save(build_tiny_sam(5).state_dict(), ckpt)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    monkeypatch.setitem(sam_mod.sam_model_registry, "vit_b", lambda checkpoint=None: (
        lambda m: (m.load_state_dict(torch.load(checkpoint, weights_only=True)), m)[1])(build_tiny_sam(0)))
    monkeypatch.setenv("PGASR_SAM_CHECKPOINT", str(ckpt))
    sam, title = sam_for_montage(PriorConfig(backend="sam", sam_sha256=digest))
    assert "RANDOM" not in title and "vit_b" in title and "sam_weights.pth" in title
    assert sam.describe()["params"]["checkpoint_sha256"] == digest


def test_sam_backend_without_segment_anything_is_a_clear_error(monkeypatch):
    """segment-anything is the ``sam`` extra: without it the tissue backend (and ``auto``
    without SAM weights) still runs, and asking for SAM names the extra to install."""
    import sys

    from pgasr.priors import MissingBackendError

    monkeypatch.setitem(sys.modules, "segment_anything", None)  # import fails as if absent
    monkeypatch.delitem(sys.modules, "pgasr.priors.sam", raising=False)
    monkeypatch.delenv("PGASR_SAM_CHECKPOINT", raising=False)
    assert isinstance(build_prior(PriorConfig()), TissuePrior)
    assert describe_prior(PriorConfig(backend="tissue"))["backend"] == "tissue"
    with pytest.raises(MissingBackendError, match=r'pip install -e "\.\[sam\]"'):
        build_prior(PriorConfig(backend="sam", sam_model_type="tiny"))
    with pytest.raises(ValueError, match="segment-anything"):  # the CLI's exit-2 errors
        describe_prior(PriorConfig(backend="sam", sam_model_type="tiny"))


# ----------------------------------------------------------------------------- registry


def test_registry_and_auto_fallback_is_loud(caplog):
    assert PRIORS == {"sam": SamPrior, "tissue": TissuePrior}
    with caplog.at_level(logging.WARNING, logger="pgasr.priors"):
        p = build_prior(PriorConfig())
    assert isinstance(p, TissuePrior)
    assert any(r.levelno == logging.WARNING and "FALLBACK" in r.getMessage() for r in caplog.records)
    d = p.describe()
    assert d["backend"] == "tissue" and d["requested_backend"] == "auto"
    assert "no SAM checkpoint" in d["fallback_reason"]
    assert d["params"]["classes"] == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pgasr.priors"):
        q = build_prior(PriorConfig(backend="tissue"))
    assert q.describe()["fallback_reason"] is None and not caplog.records
    with pytest.raises(ValueError, match="prior.backend must be"):
        build_prior(PriorConfig(backend="sam2"))


def test_auto_with_a_configured_but_missing_checkpoint_does_not_fall_back(monkeypatch):
    monkeypatch.setenv("PGASR_SAM_CHECKPOINT", "/nonexistent/sam_vit_b.pth")
    with pytest.raises(FileNotFoundError):
        build_prior(PriorConfig())


def test_describe_prior_matches_built_prior_without_loading(monkeypatch):
    cfg = PriorConfig(**TINY)
    assert describe_prior(cfg)["params"] == SamPrior(cfg, model=build_tiny_sam(0)).describe()["params"]
    assert describe_prior(PriorConfig()) == build_prior(PriorConfig()).describe()

    def boom(*a, **k):
        raise AssertionError("describe_prior must not build the model")

    monkeypatch.setattr(sam_mod, "build_tiny_sam", boom)
    assert describe_prior(cfg)["backend"] == "sam"


def test_check_backend_match():
    tissue = TissuePrior().describe()
    check_backend_match(tissue, TissuePrior(PriorConfig(device="cpu")).describe())
    check_backend_match({}, tissue)  # nothing recorded: nothing to check
    sam = SamPrior(PriorConfig(**TINY), model=build_tiny_sam(0)).describe()
    with pytest.raises(PriorMismatchError, match="trained with 'sam' priors.*'tissue'.*SAM weights"):
        check_backend_match(sam, tissue)
    with pytest.raises(PriorMismatchError, match="trained with 'tissue'.*prior.backend=tissue"):
        check_backend_match(tissue, sam)
    with pytest.raises(PriorMismatchError, match="classes: trained=3 configured=4"):
        check_backend_match(tissue, TissuePrior(PriorConfig(tissue_classes=4)).describe())
    # Runtime-only settings (encoder batch, points per batch) do not matter.
    other = SamPrior(PriorConfig(**{**TINY, "sam_batch_size": 3, "points_per_batch": 8}),
                     model=build_tiny_sam(0)).describe()
    check_backend_match(sam, other)


# ----------------------------------------------------------------------------- cache


class CountingPrior(TissuePrior):
    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.computed = 0

    def compute(self, slices):
        self.computed += len(slices)
        return super().compute(slices)


def test_cache_dedups_reuses_and_keys_on_parameters(tmp_path):
    x = noisy_slices(3)
    batch = np.concatenate([x, x[:2]])  # 5 slices, 3 distinct
    p = CountingPrior()
    c = CachedPrior(p, tmp_path)
    t0 = time.perf_counter()
    first = c(batch)
    t_cold = time.perf_counter() - t0
    assert p.computed == 3 and c.stats.as_dict() == {"requested": 5, "unique": 3, "hits": 0, "computed": 3}
    np.testing.assert_array_equal(first, p(batch))

    p2 = CountingPrior()
    c2 = CachedPrior(p2, tmp_path)  # a rerun (new process, same disk cache)
    t0 = time.perf_counter()
    again = c2(batch)
    t_warm = time.perf_counter() - t0
    assert p2.computed == 0 and c2.stats.hits == 3
    np.testing.assert_array_equal(again, first)
    print(f"cache: cold {t_cold * 1e3:.1f} ms, warm {t_warm * 1e3:.1f} ms for 5 slices")

    p3 = CountingPrior(PriorConfig(tissue_min_area=0.01))  # changed parameter -> recompute
    c3 = CachedPrior(p3, tmp_path)
    c3(batch)
    assert p3.computed == 3 and c3.cache.dir != c.cache.dir
    assert len(c.cache) == 3 and len(c3.cache) == 3
    assert (c.cache.dir / "identity.json").is_file()
    assert not list(tmp_path.rglob("*.tmp")), "no temporary files left"


def test_cache_recovers_from_a_corrupt_entry(tmp_path):
    x = noisy_slices(1)
    p = CountingPrior()
    c = CachedPrior(p, tmp_path)
    ref = c(x)
    c.cache.path(slice_key(x[0])).write_bytes(b"\x93NUMPY garbage")
    p.computed = 0
    np.testing.assert_array_equal(c(x), ref)
    assert p.computed == 1


def test_slice_key_content_and_shape():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert slice_key(a) == slice_key(a.astype(np.float64))  # keyed on float32 values
    assert slice_key(a) != slice_key(a.reshape(4, 3))
    b = a.copy()
    b[0, 0] += 1e-3
    assert slice_key(a) != slice_key(b)


def _writer(args):
    root, seed = args
    from pgasr.priors.cache import PriorCache

    cache = PriorCache(root, {"backend": "test", "params": {}})
    rng = np.random.default_rng(seed)
    for i in range(40):  # every process writes the same 10 keys, different order
        k = f"{(i * 7 + seed) % 10:064x}"
        cache.put(k, np.full((32, 32), int(k, 16) / 10, np.float16))
        got = cache.get(k, (32, 32))
        assert got is not None and got[0, 0] == np.float16(int(k, 16) / 10)
        if rng.random() < 0.3:
            time.sleep(0.001)
    return True


def test_cache_concurrent_writers(tmp_path):
    with mp.get_context("fork").Pool(3) as pool:  # fork: no re-import of torch per worker
        assert all(pool.map(_writer, [(str(tmp_path), s) for s in range(3)]))
    cache = PriorCache(tmp_path, {"backend": "test", "params": {}})
    assert len(cache) == 10 and not list(tmp_path.rglob("*.tmp"))
    for i in range(10):
        assert cache.get(f"{i:064x}")[0, 0] == np.float16(i / 10)


def test_cached_prior_from_config(tmp_path):
    c = cached_prior(PriorConfig(backend="tissue", cache_dir=str(tmp_path / "c")))
    assert isinstance(c, CachedPrior) and c.describe()["runtime"]["cache_dir"] == str(tmp_path / "c")
    assert cached_prior(PriorConfig(backend="tissue", cache=False)).cache is None


# ----------------------------------------------------------------------------- rows


def test_add_prior_columns_skips_and_reports_nan_rows():
    rng = np.random.default_rng(1)
    hr = np.stack([noisy_slices(3, 32, seed=i) for i in range(4)])  # (4, 3, 32, 32)
    lr = hr.reshape(4, 3, 16, 2, 16, 2).mean(axis=(3, 5))
    lr[2, 0, 1, 1] = np.inf
    batch = {schema.SUBJECT: np.array(["A", "A", "B", "B"], dtype=object),
             schema.SLICE: np.array([0, 1, 0, 1], dtype=np.int32), schema.HR: hr,
             schema.lr_column(2): lr, "other": rng.random(4)}
    p = TissuePrior()
    cols, skipped = add_prior_columns(batch, p, [2])
    assert skipped == [{"subject": "B", "slice": 0, "reason": "non-finite values in lr_x2"}]
    assert cols[schema.SLICE].tolist() == [0, 1, 1] and cols["other"].shape == (3,)
    assert cols["prior_hr"].shape == (3, 3, 32, 32) and cols["prior_hr"].dtype == np.float16
    np.testing.assert_array_equal(cols["prior_hr"][2], p(hr[3]))
    np.testing.assert_array_equal(cols["prior_lr_x2"][0], p(upsample_bicubic(lr[0], (32, 32))))
    with pytest.raises(KeyError, match="lr_x4"):
        add_prior_columns(batch, p, [4])
    table = to_arrow(cols)
    assert table.num_rows == 3 and table.schema.field("subject").type == "string"
    assert table.column("prior_lr_x2").combine_chunks().to_numpy_ndarray().shape == (3, 3, 32, 32)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_sdpa_agreement_on_gpu():
    """bf16 encoder + SDPA vs fp32 reference on CUDA: the priors should barely move.
    Prints the agreement (fraction of equal pixels, mean |diff|) for the report."""
    x = noisy_slices(4, 64)
    ref = SamPrior(PriorConfig(**{**TINY, "device": "cuda", "sam_sdpa": False}),
                   model=build_tiny_sam(0))(x).astype(np.float32)
    fast = SamPrior(PriorConfig(**{**TINY, "device": "cuda", "sam_precision": "bf16"}),
                    model=build_tiny_sam(0))(x).astype(np.float32)
    equal, mad = float((ref == fast).mean()), float(np.abs(ref - fast).mean())
    print(f"bf16+SDPA vs fp32: equal pixels {equal:.4f}, mean |diff| {mad:.4f}")
    assert equal > 0.95 and mad < 0.02
