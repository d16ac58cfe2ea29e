"""Data: IXI ingest, degradation, synthetic cohort, prepared-shard readers."""

from pgasr.data.degradation import bicubic_resize, degrade, slice_rng

__all__ = ["bicubic_resize", "degrade", "slice_rng"]
