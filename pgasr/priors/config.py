"""Prior-backend config (owned by pgasr.priors; re-exported by pgasr.config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PriorConfig:
    """Anatomical prior S (paper Sec. 2.1). ``backend: auto`` = SAM when a checkpoint is
    configured (``sam_checkpoint`` or ``PGASR_SAM_CHECKPOINT``), else the embedded tissue
    backend, announced loudly."""

    backend: str = "auto"  # auto | sam | tissue
    sam_model_type: str = "vit_b"  # vit_b | vit_l | vit_h
    sam_checkpoint: str = ""
    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.86
    stability_score_thresh: float = 0.92
    min_mask_region_area: int = 0
    tissue_classes: int = 3
    cache_dir: str = "data/prior_cache"
