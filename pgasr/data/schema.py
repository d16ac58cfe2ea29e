"""The prepared-data layout: one vocabulary for every reader and writer.

A prepared directory holds::

    manifest.json            # sources + hashes, split, per-subject normalisation, config, versions
    config.yaml              # resolved RunConfig of the prepare run
    train/part-00000.parquet # slice triplets, one row per centre slice
    val/...
    test/...

Each Parquet row is one **slice triplet** (t-1, t, t+1) of one subject; edge slices replicate
their neighbour. Arrays are fixed-shape tensor columns (``pyarrow.FixedShapeTensorArray``),
so Ray Data reads them as ``ArrowTensorType`` and pandas/NumPy as ndarrays.

Columns written by ``pgasr prepare``:

=============  ==========  =====================  =======================================
column         dtype       shape                  meaning
=============  ==========  =====================  =======================================
subject        string      -                      IXI subject id, e.g. ``IXI002``
slice          int32       -                      index of the centre slice in the kept 80
hr             float32     (3, H, W)              HR triplet in the HR volume's units
lr_x2          float32     (3, H/2, W/2)          degraded LR triplet at x2 (if configured)
lr_x4          float32     (3, H/4, W/4)          degraded LR triplet at x4 (if configured)
lr_norm_x2     float32     (2,)                   (offset, scale) of the x2 LR volume
lr_norm_x4     float32     (2,)                   (offset, scale) of the x4 LR volume
=============  ==========  =====================  =======================================

Units (``pgasr.intensity``): ``hr`` and ``lr_x{s}`` are stored in the model units of the HR
volume's own statistics (background 0, head mean 1), which is what stage 1 trains on.
``lr_norm_x{s}`` holds the statistics of the whole LR volume at scale ``s`` expressed in those
units; a stage-2 batch at scale ``s`` maps ``hr`` and ``lr_x{s}`` with it
(``pgasr.data.batches.to_lr_units``), so training sees exactly what inference computes from an
LR volume.

Columns added by the priors job (``jobs/priors.py``), all float16 in [0, 1] on the HR grid:

=============  ==========  =====================  =======================================
prior_hr       float16     (3, H, W)              prior S_HR of each HR slice
prior_lr_x2    float16     (3, H, W)              prior of the bicubic-upsampled x2 LR
prior_lr_x4    float16     (3, H, W)              prior of the bicubic-upsampled x4 LR
=============  ==========  =====================  =======================================
"""

from __future__ import annotations

from pathlib import Path

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
CONFIG = "config.yaml"

SUBJECT = "subject"
SLICE = "slice"
HR = "hr"


def lr_column(scale: int) -> str:
    """Name of the LR triplet column for an SR factor."""
    return f"lr_x{int(scale)}"


def lr_norm_column(scale: int) -> str:
    """Name of the per-row LR-volume intensity statistics column for an SR factor."""
    return f"lr_norm_x{int(scale)}"


def prior_hr_column() -> str:
    return "prior_hr"


def prior_lr_column(scale: int) -> str:
    """Prior computed on the bicubic-upsampled LR at ``scale`` (HR grid)."""
    return f"prior_lr_x{int(scale)}"


def priors_dir(prepared_dir: str | Path) -> Path:
    """Where the priors job writes the shards with prior columns added (a sibling of the
    prepared directory, never the prepared directory itself)."""
    p = Path(prepared_dir)
    return p.with_name(p.name + "_priors")
