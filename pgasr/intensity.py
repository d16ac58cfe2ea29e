"""The intensity contract: how MRI voxel values become model units, in one place.

Every path that feeds the model — ``pgasr prepare`` (training rows), ``pgasr evaluate``,
``pgasr sr``, Serve and the report — maps intensities with :class:`IntensityStats` computed by
:func:`intensity_stats` from **the LR volume**, because that is all inference has:

* ``offset`` b: the background level, the ``BACKGROUND_PERCENTILE``-th percentile of the
  volume (0 for a masked or zero-filled scan, the noise floor for a magnitude image);
* ``scale`` s: the mean of the head voxels above b, where head voxels are those brighter
  than ``b + head_threshold * (p99 - b)``.

Model units are ``(x - b) / s``: background sits at 0 (so zero padding inside the network
*is* background) and the mean head intensity at 1. Both statistics are equivariant under any
affine intensity change ``a * x + c`` with ``a > 0`` (int16 or float data, a 12-bit range, a
scanner's scaling, an added offset), so a rescaled copy of a scan gives the correspondingly
rescaled output. The head mean is robust to a few bright voxels (fat, vessels, EPI ghosts):
unlike a maximum or a high percentile it barely moves when they are present.

Training computes the same statistics from the same LR volume: ``pgasr prepare`` degrades
every slice of a volume, computes the stats of that LR volume per scale and stores them beside
the rows (``lr_norm_x{s}``), and the stage-2 batches map HR and LR with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BACKGROUND_PERCENTILE", "IntensityStats", "intensity_stats"]

#: Percentile of all voxels taken as the background level.
BACKGROUND_PERCENTILE = 0.5
#: Version of the contract; part of the prepare fingerprint and of checkpoint metadata.
CONTRACT = "lr-volume/bg-p0.5/head-mean/v1"


@dataclass(frozen=True)
class IntensityStats:
    """An affine map between a volume's units and model units: ``(x - offset) / scale``."""

    offset: float
    scale: float

    def normalise(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float32) - np.float32(self.offset))
                / np.float32(self.scale)).astype(np.float32)

    def denormalise(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, dtype=np.float32) * np.float32(self.scale)
                + np.float32(self.offset)).astype(np.float32)

    def relative_to(self, base: IntensityStats) -> IntensityStats:
        """These stats expressed in ``base``'s model units: for ``u = base.normalise(x)``,
        ``self.normalise(x) == self.relative_to(base).normalise(u)``."""
        return IntensityStats((self.offset - base.offset) / base.scale, self.scale / base.scale)

    def as_array(self) -> np.ndarray:
        return np.array([self.offset, self.scale], dtype=np.float32)

    def to_dict(self) -> dict[str, float]:
        return {"offset": float(self.offset), "scale": float(self.scale)}


def intensity_stats(volume: np.ndarray, head_threshold: float = 0.1) -> IntensityStats:
    """Background level and head mean of a volume (any shape, any real dtype).

    Args:
        volume: voxel values; non-finite voxels are an error.
        head_threshold: fraction of the (p99 - background) range above the background that
            counts as head (``data.head_threshold``).

    Raises:
        ValueError: non-finite voxels, or no contrast above the background.
    """
    v = np.asarray(volume, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("empty volume")
    if not np.isfinite(v).all():
        raise ValueError("volume contains NaN or inf voxels")
    b, p99 = np.percentile(v, [BACKGROUND_PERCENTILE, 99.0])
    if not p99 > b:
        raise ValueError("volume has no contrast above its background level (empty image?)")
    head = v > b + head_threshold * (p99 - b)
    if head.sum() < 16:
        raise ValueError("volume is empty (fewer than 16 voxels above the head threshold)")
    s = float(v[head].mean() - b)
    if not s > 0:
        raise ValueError("volume has no contrast above its background level")
    return IntensityStats(float(b), s)
