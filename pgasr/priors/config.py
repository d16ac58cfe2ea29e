"""Prior-backend config (owned by pgasr.priors; re-exported by pgasr.config)."""

from __future__ import annotations

import os

from pgasr.configbase import Section

SAM_CHECKPOINT_ENV = "PGASR_SAM_CHECKPOINT"


class PriorConfig(Section):
    """Anatomical prior S (paper Sec. 2.1).

    ``backend: auto`` resolves to SAM when a checkpoint is configured (``sam_checkpoint`` or
    the ``PGASR_SAM_CHECKPOINT`` environment variable), else to the embedded ``tissue``
    backend, announced with a WARNING and recorded in ``prior.describe()``.

    Defaults of the automatic mask generator (AMG) are chosen for speed, not for SAM's
    published ViT-H settings (shown in brackets): ``points_per_side`` 16 [32] is 4x fewer
    prompts per slice; ``pred_iou_thresh`` 0.86 [0.88] and ``stability_score_thresh`` 0.92
    [0.95] are slightly looser because a 16x16 grid yields fewer candidate masks;
    ``crop_n_layers`` 0 [0] and ``min_mask_region_area`` 0 [0] (> 0 needs OpenCV).
    """

    backend: str = "auto"  # auto | sam | tissue
    device: str = "auto"  # auto | cpu | cuda (auto: cuda when the process sees a GPU)
    # Windowing shared by both backends: slice -> [0, 1] between these percentiles.
    window_low: float = 0.5
    window_high: float = 99.5

    # --- SAM -----------------------------------------------------------------------------
    sam_model_type: str = "vit_b"  # vit_b | vit_l | vit_h | tiny (random weights, tests only)
    sam_checkpoint: str = ""  # path; empty -> $PGASR_SAM_CHECKPOINT
    sam_sha256: str = ""  # expected digest; empty -> the official one for sam_model_type
    sam_precision: str = "fp32"  # fp32 | bf16 (image encoder under CUDA autocast) | auto
    sam_sdpa: bool = True  # image-encoder attention through F.scaled_dot_product_attention
    sam_batch_size: int = 8  # slices per image-encoder forward
    tiny_sam_seed: int = 0  # seed of the randomly initialised tiny SAM
    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.86
    stability_score_thresh: float = 0.92
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    min_mask_region_area: int = 0

    # --- tissue (embedded, no weights) ----------------------------------------------------
    tissue_classes: int = 3  # multi-Otsu classes inside the head
    tissue_smooth_sigma: float = 1.0  # Gaussian pre-smoothing, pixels
    tissue_min_area: float = 0.002  # smallest segment kept, fraction of the slice area
    tissue_head_threshold: float = 0.1  # head = windowed intensity above this (then filled)

    # --- cache ----------------------------------------------------------------------------
    cache: bool = True
    cache_dir: str = "data/prior_cache"
    batch_rows: int = 16  # triplet rows per Ray Data batch in jobs/priors.py


def resolve_checkpoint(cfg: PriorConfig) -> str:
    """The SAM checkpoint path: ``cfg.sam_checkpoint``, else ``$PGASR_SAM_CHECKPOINT``, else ""."""
    return (cfg.sam_checkpoint or os.environ.get(SAM_CHECKPOINT_ENV, "")).strip()
