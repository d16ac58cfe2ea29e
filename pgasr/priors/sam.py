"""SAM prior backend (paper Sec. 2.1): automatic mask generation, then sum-normalise.

Each slice is windowed (:func:`~pgasr.priors.base.to_uint8_rgb`: 0.5-99.5 percentile ->
0..255, grey replicated to RGB) and segmented by ``segment_anything``'s
``SamAutomaticMaskGenerator``; the binary masks are summed and divided by their maximum.

Throughput: the stock generator runs the ViT image encoder once per slice
(``SamPredictor.set_image``). :class:`SamPrior` instead encodes ``sam_batch_size`` slices in
one forward and hands each slice's precomputed embedding to the generator
(:class:`BatchedMaskGenerator`), optionally with the encoder's attention through
``F.scaled_dot_product_attention`` (:func:`enable_sdpa`) and bf16 autocast on CUDA. The
prompt grid, mask decoding, filtering and NMS are the library's own code, unchanged.

Weights: ``sam_model_registry[model_type](checkpoint=path)`` after the file's SHA-256 has
been checked against the official digest for that model type (``OFFICIAL_CHECKPOINTS``).
``sam_model_type: tiny`` builds a small *randomly initialised* SAM from the library's own
modules -- its masks are meaningless; it exists so the whole automatic-mask path runs in
CI and benchmarks without weights.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import types
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from segment_anything.utils.amg import (
    batch_iterator,
    batched_mask_to_box,
    calculate_stability_score,
    is_box_near_crop_edge,
)
from torchvision.ops.boxes import batched_nms

from pgasr.priors.base import Prior, _jsonable, normalise_sum, to_uint8_rgb
from pgasr.priors.config import SAM_CHECKPOINT_ENV, PriorConfig, resolve_checkpoint  # noqa: F401

log = logging.getLogger("pgasr.priors")


# Official SAM v1 checkpoints (github.com/facebookresearch/segment-anything, README "Model
# Checkpoints"). Digests/sizes as published by many independent verifiers (e.g.
# computational-cell-analytics/micro-sam `_CHECKSUMS`, Slicer SegmentAnything downloads).
OFFICIAL_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "vit_h": {
        "url": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "sha256": "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        "bytes": 2564550879,
    },
    "vit_l": {
        "url": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "sha256": "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        "bytes": 1249524607,
    },
    "vit_b": {
        "url": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "sha256": "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        "bytes": 375042383,
    },
}
MODEL_TYPES = (*OFFICIAL_CHECKPOINTS, "tiny")


# ----------------------------------------------------------------------------- weights


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file (memoised per process on path, size and mtime)."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def verify_checkpoint(path: str | Path, model_type: str, expected_sha256: str = "") -> str:
    """Check a SAM checkpoint file before loading it.

    Args:
        path: the ``.pth`` file.
        model_type: ``vit_b`` / ``vit_l`` / ``vit_h``.
        expected_sha256: digest to require; empty -> the official one for ``model_type``
            (set it to use a fine-tuned SAM, e.g. MedSAM).

    Returns:
        The file's SHA-256.

    Raises:
        FileNotFoundError: no such file.
        ValueError: digest mismatch (the message says which official checkpoint the file is,
            if any, and where to download the right one).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint not found: {p} (set prior.sam_checkpoint or {SAM_CHECKPOINT_ENV}; "
            f"download {OFFICIAL_CHECKPOINTS.get(model_type, {}).get('url', 'see docs/priors.md')})")
    digest = sha256_file(p)
    want = (expected_sha256 or OFFICIAL_CHECKPOINTS[model_type]["sha256"]).lower()
    if digest == want:
        return digest
    other = [k for k, v in OFFICIAL_CHECKPOINTS.items() if v["sha256"] == digest]
    if other:
        why = (f"it is the official {other[0]} checkpoint but prior.sam_model_type={model_type}; "
               f"set prior.sam_model_type={other[0]}")
    else:
        why = ("it is not an official SAM checkpoint (truncated download?); re-download "
               f"{OFFICIAL_CHECKPOINTS[model_type]['url']}, or, for a fine-tuned SAM, set "
               f"prior.sam_sha256={digest}")
    raise ValueError(f"SAM checkpoint {p} has SHA-256 {digest}, expected {want}: {why}")


def build_tiny_sam(seed: int = 0, img_size: int = 128) -> Sam:
    """A small randomly initialised SAM built from ``segment_anything``'s own modules.

    ViT encoder (depth 2, width 32, 16-px patches, windowed + global attention with
    relative positions), prompt encoder, and two-way-transformer mask decoder, all at 32
    channels. Weights (including the zero-initialised position tables) are drawn from a
    seeded generator, so the model -- and its masks -- are reproducible. The masks carry no
    anatomy; use it for tests and benchmarks only.

    Args:
        seed: RNG seed of the weights.
        img_size: encoder input size (pixels, multiple of 16); slices are resized to it.
    """
    dim, patch = 32, 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=img_size, patch_size=patch, embed_dim=dim, depth=2, num_heads=2,
                mlp_ratio=2.0, out_chans=dim, qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                window_size=4, global_attn_indexes=(1,)),
            prompt_encoder=PromptEncoder(
                embed_dim=dim, image_embedding_size=(img_size // patch, img_size // patch),
                input_image_size=(img_size, img_size), mask_in_chans=4),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
                transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=32),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
        for name, p in sam.named_parameters():  # SAM zero-inits these; make them matter
            if "rel_pos" in name or name.endswith("pos_embed"):
                torch.nn.init.normal_(p, std=0.5)
    return sam.eval()


def checkpoint_info(cfg: PriorConfig) -> dict[str, Any]:
    """``{"model_type", "checkpoint_sha256", "checkpoint"[, "seed"]}`` for a config, after
    verifying the checkpoint (see :func:`verify_checkpoint`); no model is built.

    Raises:
        ValueError: unknown model type, no checkpoint configured, or digest mismatch.
        FileNotFoundError: the checkpoint path does not exist.
    """
    mt = cfg.sam_model_type
    if mt not in MODEL_TYPES:
        raise ValueError(f"prior.sam_model_type must be one of {MODEL_TYPES}, got {mt!r}")
    if mt == "tiny":
        return {"model_type": "tiny", "checkpoint_sha256": None, "checkpoint": None,
                "seed": int(cfg.tiny_sam_seed)}
    path = resolve_checkpoint(cfg)
    if not path:
        raise ValueError(
            f"prior backend 'sam' needs SAM weights: set prior.sam_checkpoint or "
            f"{SAM_CHECKPOINT_ENV} to a downloaded {mt} checkpoint "
            f"({OFFICIAL_CHECKPOINTS[mt]['url']}), or use prior.backend=tissue")
    digest = verify_checkpoint(path, mt, cfg.sam_sha256)
    return {"model_type": mt, "checkpoint_sha256": digest, "checkpoint": str(path)}


def sam_params(cfg: PriorConfig, info: dict[str, Any]) -> dict[str, Any]:
    """Output-affecting parameters of a SAM prior (its identity besides the backend name)."""
    kw = amg_kwargs(cfg)
    for k in ("points_per_batch", "output_mode"):  # do not change the masks
        kw.pop(k)
    p = {"model_type": info["model_type"], "checkpoint_sha256": info["checkpoint_sha256"],
         "window": [float(cfg.window_low), float(cfg.window_high)], **kw}
    if "seed" in info:
        p["seed"] = info["seed"]
    return p


def load_sam(cfg: PriorConfig) -> tuple[Sam, dict[str, Any]]:
    """Build the SAM model a config asks for.

    Returns:
        ``(model in eval mode on CPU, info)`` with ``info = {"model_type", "checkpoint_sha256",
        "checkpoint"}``.

    Raises:
        ValueError: unknown model type, no checkpoint configured, or digest mismatch.
        FileNotFoundError: the checkpoint path does not exist.
    """
    info = checkpoint_info(cfg)
    if info["model_type"] == "tiny":
        log.warning("SAM prior uses a TINY RANDOMLY INITIALISED SAM (seed %d): masks are "
                    "meaningless -- tests/benchmarks only", info["seed"])
        return build_tiny_sam(info["seed"]), info
    model = sam_model_registry[info["model_type"]](checkpoint=str(Path(info["checkpoint"]).expanduser()))
    return model.eval(), info


# ----------------------------------------------------------------------------- SDPA


def _sdpa_attention_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """``Attention.forward`` with the decomposed relative-position bias passed as the
    additive ``attn_mask`` of ``F.scaled_dot_product_attention`` (same maths, fused kernel).
    """
    B, H, W, _ = x.shape
    qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)  # (B*nH, HW, C)
    bias = None
    if self.use_rel_pos:
        Rh = get_rel_pos(H, H, self.rel_pos_h)
        Rw = get_rel_pos(W, W, self.rel_pos_w)
        r_q = q.reshape(B * self.num_heads, H, W, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)  # (B*nH, H, W, H)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)  # (B*nH, H, W, W)
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(
            B * self.num_heads, H * W, H * W).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale = C**-0.5 = self.scale
    out = out.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return self.proj(out)


def enable_sdpa(model: Sam) -> int:
    """Route every image-encoder attention block of ``model`` through SDPA (in place).

    Returns:
        The number of attention modules patched.
    """
    n = 0
    for m in model.image_encoder.modules():
        if isinstance(m, Attention):
            m.forward = types.MethodType(_sdpa_attention_forward, m)
            n += 1
    return n


# ----------------------------------------------------------------------------- batching


class _PrecomputedPredictor(SamPredictor):
    """``SamPredictor`` whose next ``set_image`` takes an already computed embedding."""

    def __init__(self, sam_model: Sam) -> None:
        super().__init__(sam_model)
        self.next_features: torch.Tensor | None = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if self.next_features is None:
            return super().set_image(image, image_format)
        feats, self.next_features = self.next_features, None
        self.reset_image()
        self.original_size = image.shape[:2]
        self.input_size = self.transform.get_preprocess_shape(
            image.shape[0], image.shape[1], self.model.image_encoder.img_size)
        self.features = feats  # (1, C, h, w)
        self.is_image_set = True


class BatchedMaskGenerator(SamAutomaticMaskGenerator):
    """``SamAutomaticMaskGenerator`` that reuses a precomputed image embedding.

    :meth:`masks` returns the same binary masks as ``generate`` (tested against the stock
    class). With one crop layer and no small-region post-processing (the defaults) it runs
    the generator's own steps -- point grid, ``predict_torch``, predicted-IoU and stability
    filters, mask thresholding, crop-edge filter, box NMS -- but keeps the masks as a tensor
    on the model's device instead of round-tripping every candidate through RLE (the stock
    path's ``MaskData.cat`` deep-copies the RLE lists; measured ~half the CPU time of the
    tiny SAM). Other settings go through the stock ``generate`` with the embedding injected
    for the full-image crop.
    """

    def __init__(self, model: Sam, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.predictor = _PrecomputedPredictor(model)
        self._features: torch.Tensor | None = None

    def _process_crop(self, image, crop_box, crop_layer_idx, orig_size):
        full = list(crop_box) == [0, 0, orig_size[1], orig_size[0]]
        if full and self._features is not None:
            self.predictor.next_features = self._features
        try:
            return super()._process_crop(image, crop_box, crop_layer_idx, orig_size)
        finally:
            self.predictor.next_features = None

    @torch.no_grad()
    def _masks_direct(self, image: np.ndarray, features: torch.Tensor | None) -> torch.Tensor:
        """Steps of ``_process_crop`` + ``_process_batch`` for the single full-image crop."""
        h, w = image.shape[:2]
        crop_box = [0, 0, w, h]
        self.predictor.next_features = features
        self.predictor.set_image(image)  # consumes ``features`` or encodes the image
        thr = self.predictor.model.mask_threshold
        points_for_image = self.point_grids[0] * np.array([[w, h]])
        keep_masks, keep_iou, keep_boxes = [], [], []
        for (points,) in batch_iterator(self.points_per_batch, points_for_image):
            pts = torch.as_tensor(self.predictor.transform.apply_coords(points, (h, w)),
                                  device=self.predictor.device)
            labels = torch.ones(pts.shape[0], dtype=torch.int, device=pts.device)
            logits, iou, _ = self.predictor.predict_torch(
                pts[:, None, :], labels[:, None], multimask_output=True, return_logits=True)
            logits, iou = logits.flatten(0, 1), iou.flatten(0, 1)  # (P*3, h, w), (P*3,)
            if self.pred_iou_thresh > 0.0:
                k = iou > self.pred_iou_thresh
                logits, iou = logits[k], iou[k]
            stab = calculate_stability_score(logits, thr, self.stability_score_offset)
            if self.stability_score_thresh > 0.0:
                k = stab >= self.stability_score_thresh
                logits, iou = logits[k], iou[k]
            masks = logits > thr
            boxes = batched_mask_to_box(masks)
            k = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, w, h])
            keep_masks.append(masks[k])
            keep_iou.append(iou[k])
            keep_boxes.append(boxes[k])
        self.predictor.reset_image()
        masks, iou, boxes = torch.cat(keep_masks), torch.cat(keep_iou), torch.cat(keep_boxes)
        keep = batched_nms(boxes.float(), iou, torch.zeros_like(iou),
                           iou_threshold=self.box_nms_thresh)
        return masks[keep]  # (n, h, w) bool

    def mask_sum(self, image: np.ndarray, features: torch.Tensor | None = None) -> np.ndarray:
        """(H, W) int32 number of masks covering each pixel (summed on the model's device)."""
        if self.crop_n_layers == 0 and self.min_mask_region_area == 0:
            m = self._masks_direct(image, features)  # (n, H, W) bool on device
            return m.sum(dim=0, dtype=torch.int32).cpu().numpy()
        return self.masks(image, features).sum(axis=0, dtype=np.int32)

    def masks(self, image: np.ndarray, features: torch.Tensor | None = None) -> np.ndarray:
        """Binary masks of one image.

        Args:
            image: (H, W, 3) uint8 RGB.
            features: (1, C, h, w) embedding of ``image`` from ``model.image_encoder``, or
                None to let the library encode it.

        Returns:
            (n, H, W) bool, in no particular order.
        """
        if self.crop_n_layers == 0 and self.min_mask_region_area == 0:
            return self._masks_direct(image, features).cpu().numpy()
        self._features = features
        try:
            anns = self.generate(image)
        finally:
            self._features = None
        if not anns:
            return np.zeros((0, *image.shape[:2]), dtype=bool)
        return np.stack([np.asarray(a["segmentation"], dtype=bool) for a in anns])


def amg_kwargs(cfg: PriorConfig) -> dict[str, Any]:
    """``SamAutomaticMaskGenerator`` keyword arguments from a config (binary masks out)."""
    return {
        "points_per_side": int(cfg.points_per_side),
        "points_per_batch": int(cfg.points_per_batch),
        "pred_iou_thresh": float(cfg.pred_iou_thresh),
        "stability_score_thresh": float(cfg.stability_score_thresh),
        "stability_score_offset": float(cfg.stability_score_offset),
        "box_nms_thresh": float(cfg.box_nms_thresh),
        "crop_n_layers": int(cfg.crop_n_layers),
        "min_mask_region_area": int(cfg.min_mask_region_area),
        "output_mode": "binary_mask",
    }


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when this process sees a GPU, else ``cpu``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("prior.device=cuda but no CUDA device is visible to this process "
                         "(on Ray: set resources.gpus_per_prior_actor > 0)")
    return d


class SamPrior(Prior):
    """SAM automatic-mask prior with batched image encoding.

    Args:
        cfg: prior config (model type/checkpoint, windowing, AMG parameters, batching,
            precision, device).
        model: an already built ``Sam`` (skips loading; ``cfg.sam_model_type`` is still
            recorded). Tests pass :func:`build_tiny_sam` here.
        fallback_reason, requested: see :class:`~pgasr.priors.base.Prior`.
    """

    name = "sam"

    def __init__(self, cfg: PriorConfig | None = None, model: Sam | None = None,
                 fallback_reason: str | None = None, requested: str | None = None):
        super().__init__(fallback_reason, requested)
        cfg = cfg or PriorConfig()
        self.cfg = cfg
        if not 0.0 <= cfg.window_low < cfg.window_high <= 100.0:
            raise ValueError("prior.window_low/window_high must satisfy 0 <= low < high <= 100, "
                             f"got {cfg.window_low}, {cfg.window_high}")
        if cfg.sam_precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"prior.sam_precision must be fp32|bf16|auto, got {cfg.sam_precision!r}")
        if int(cfg.sam_batch_size) < 1:
            raise ValueError(f"prior.sam_batch_size must be >= 1, got {cfg.sam_batch_size}")
        if cfg.min_mask_region_area > 0:
            try:
                import cv2  # noqa: F401
            except ImportError as e:
                raise ValueError("prior.min_mask_region_area > 0 needs OpenCV "
                                 "(opencv-python-headless); set it to 0") from e
        self.device = resolve_device(cfg.device)
        if cfg.sam_precision == "bf16" and self.device.type != "cuda":
            raise ValueError("prior.sam_precision=bf16 needs CUDA; use fp32 or auto on CPU")
        self.bf16 = cfg.sam_precision == "bf16" or (
            cfg.sam_precision == "auto" and self.device.type == "cuda")
        if model is None:
            model, self.info = load_sam(cfg)
        else:
            self.info = {"model_type": cfg.sam_model_type, "checkpoint_sha256": None,
                         "checkpoint": None, "injected": True}
            if cfg.sam_model_type == "tiny":
                self.info["seed"] = int(cfg.tiny_sam_seed)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.sdpa_modules = enable_sdpa(self.model) if cfg.sam_sdpa else 0
        self.generator = BatchedMaskGenerator(self.model, **amg_kwargs(cfg))
        self.batch_size = int(cfg.sam_batch_size)

    def params(self) -> dict[str, Any]:
        return sam_params(self.cfg, self.info)

    @classmethod
    def describe_config(cls, cfg: PriorConfig, fallback_reason: str | None = None,
                        requested: str | None = None) -> dict[str, Any]:
        """``describe()`` of the prior ``cfg`` would build, without loading the model (the
        checkpoint is still hashed). For drivers that only need the identity."""
        info = checkpoint_info(cfg)
        return {"backend": cls.name, "params": _jsonable(sam_params(cfg, info)),
                "requested_backend": requested or cls.name, "fallback_reason": fallback_reason,
                "runtime": {"checkpoint": info.get("checkpoint")}}

    def runtime(self) -> dict[str, Any]:
        return {"device": str(self.device), "bf16_encoder": self.bf16,
                "sdpa_modules": self.sdpa_modules, "encoder_batch": self.batch_size,
                "points_per_batch": int(self.cfg.points_per_batch),
                "checkpoint": self.info.get("checkpoint")}

    def image(self, slice_: np.ndarray) -> np.ndarray:
        """(H, W) slice -> (H, W, 3) uint8 RGB SAM input (percentile windowing)."""
        return to_uint8_rgb(slice_, self.cfg.window_low, self.cfg.window_high)

    @torch.no_grad()
    def embed(self, images: list[np.ndarray]) -> torch.Tensor:
        """Image-encoder embeddings of same-sized RGB images in one forward.

        Each image goes through exactly the preprocessing of ``SamPredictor.set_image``
        (resize longest side, normalise, pad) before being stacked.

        Returns:
            (B, C, h, w) float32 on ``self.device``.
        """
        tf = self.generator.predictor.transform
        xs = []
        for im in images:
            t = torch.as_tensor(tf.apply_image(im), device=self.device)
            xs.append(self.model.preprocess(t.permute(2, 0, 1).contiguous()[None]))
        x = torch.cat(xs)  # (B, 3, S, S)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with ctx:
            feats = self.model.image_encoder(x)
        return feats.float()

    def segments(self, slice_: np.ndarray) -> np.ndarray:
        img = self.image(slice_)
        return self.generator.masks(img, self.embed([img]))

    def compute(self, slices: np.ndarray) -> np.ndarray:
        out = np.zeros(slices.shape, dtype=np.float32)
        for i in range(0, len(slices), self.batch_size):
            imgs = [self.image(s) for s in slices[i:i + self.batch_size]]
            feats = self.embed(imgs)  # (b, C, h, w): one encoder pass per batch
            for j, img in enumerate(imgs):
                out[i + j] = normalise_sum(self.generator.mask_sum(img, feats[j:j + 1]))
        return out
