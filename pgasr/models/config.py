"""Model and training-stage configs (owned by the model code; re-exported by pgasr.config)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Architecture of Ê/E, Z, G, D and SCAB (paper Sec. 2, Sec. 3 "Implementation Detail")."""

    latent_factor: int = 2  # f: HR pixels per latent position along each axis (1, 2, 4, 8)
    channels: list[int] = field(default_factory=lambda: [64, 64, 96, 96])  # the 4 encoder levels
    n_z: int = 64  # code dimension
    codebook_size: int = 256  # N (paper: 256 for all experiments)
    window_size: int = 8  # DAT spatial window
    num_heads: int = 4
    mlp_ratio: float = 2.0
    decoder_channels: int = 96
    disc_channels: int = 64
    disc_layers: int = 3
    acg: bool = True  # prior channel in the input (Table 2 "ACG")
    scab: bool = True  # spatial cross-attention block in stage 2 (Table 2 "SCAB")


@dataclass
class Stage1Config:
    """Stage 1: anatomical-conditioned codebook generation (Eq. 3)."""

    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-4
    lr_halve_every: int = 10  # epochs
    beta: float = 0.25
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual: str = "auto"  # auto | lpips | fallback | none
    adv_weight: float = 0.1
    disc_start: int = 2000  # step at which the adversarial term switches on
    max_steps: int = 0  # 0 = no cap
    dead_code_restart: bool = False
    log_every: int = 50
    val_every: int = 1  # epochs
    bf16: bool = False
    compile: bool = False


@dataclass
class Stage2Config:
    """Stage 2: prior matching alignment (Eq. 4, 5)."""

    epochs: int = 40
    batch_size: int = 8
    lr: float = 3e-4
    lr_halve_every: int = 10
    alpha1: float = 0.1  # weight of L_align_s
    alpha2: float = 0.1  # weight of L_align_d
    tau: float = 1.0  # temperature of softmax(-d / tau) over code distances
    align_s: bool = True
    align_d: bool = True
    scale: int = 2
    stage1_checkpoint: str = ""
    max_steps: int = 0
    log_every: int = 50
    val_every: int = 1
    bf16: bool = False
    compile: bool = False
