"""PGASR networks: Ê/E, codebook Z, decoder G, discriminator D, SCAB (pure PyTorch).

Attributes are imported lazily so that ``pgasr.config`` (which imports
``pgasr.models.config``) does not pull in torch.
"""

from __future__ import annotations

import importlib

from pgasr.models.config import ModelConfig, Stage1Config, Stage2Config

_LAZY = {
    "DATBlock": "dat",
    "DATStage": "dat",
    "Decoder": "decoder",
    "Discriminator": "discriminator",
    "Encoder": "encoder",
    "Quantizer": "quantizer",
    "QuantizerOutput": "quantizer",
    "SCAB": "scab",
    "CodeOutput": "pgasr",
    "Stage1Model": "pgasr",
    "Stage1Output": "pgasr",
    "Stage2Model": "pgasr",
    "Stage2Output": "pgasr",
    "build_encoder": "pgasr",
    "build_stage1": "pgasr",
    "build_stage2": "pgasr",
    "code_log_probs": "pgasr",
    "count_parameters": "pgasr",
    "freeze_": "pgasr",
    "unwrap": "pgasr",
}

__all__ = ["ModelConfig", "Stage1Config", "Stage2Config", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"pgasr.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pgasr.models' has no attribute {name!r}")
