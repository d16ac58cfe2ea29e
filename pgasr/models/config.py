"""Model and training-stage configs (owned by the model code; re-exported by pgasr.config).

Field names follow the paper's vocabulary (``beta``, ``alpha1``, ``alpha2``, ``acg``, ``scab``,
``align_s``, ``align_d``, ``tau``). Design choices the paper leaves open are explained in
``docs/model.md``; the defaults here are a *modest* CPU-friendly preset (``configs/paper.yaml``
widens the network for GPUs).
"""

from __future__ import annotations

from pydantic import Field

from pgasr.configbase import Section


class ModelConfig(Section):
    """Architecture of Ê/E, Z, G, D and SCAB (paper Sec. 2, Sec. 3 "Implementation Detail")."""

    # f: HR pixels per latent position along each axis (1, 2, 4, 8). Stage 2 decodes with the
    # frozen G, so the stage-1 reconstruction at this f is a hard ceiling on SR quality. 2 is
    # the CPU default; the latent sweep in docs/model.md recommends 1 for the paper preset.
    latent_factor: int = 2
    channels: list[int] = Field(default_factory=lambda: [32, 32, 48, 48])  # the 4 encoder levels
    n_z: int = 32  # code dimension
    codebook_size: int = 256  # N (paper: 256 for all experiments)
    codebook_init: str = "data"  # data (first batch's encoder outputs) | uniform (taming)
    window_size: int = 8  # DAT spatial window (inputs are padded to a multiple and cropped back)
    num_heads: int = 4
    mlp_ratio: float = 2.0  # SGFN hidden width / dim
    dat_depth: int = 2  # transformer blocks per DAT stage, alternating spatial / channel
    decoder_channels: int = 48
    disc_channels: int = 32
    disc_layers: int = 3
    # Border padding of the generator's 3x3 convs: zeros | replicate | reflect. zeros learned
    # best at the CPU budget (docs/model.md, "Padding"); the border frame it leaves in the
    # background is removed by inference.background.
    padding: str = "zeros"
    acg: bool = True  # prior channel in the input (Table 2 "ACG")
    scab: bool = True  # spatial cross-attention block in stage 2 (Table 2 "SCAB")
    # "concat": SCAB keys/values are the tokens of both neighbours (t-1 and t+1);
    # "literal": keys from t-1, values from t+1 (a literal reading of Sec. 2.2).
    scab_mode: str = "concat"


class Stage1Config(Section):
    """Stage 1: anatomical-conditioned codebook generation (Eq. 3)."""

    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-4
    lr_halve_every: int = 10  # epochs
    beta: float = 0.25  # weight of the commitment term (Eq. 3)
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual: str = "auto"  # auto | lpips | fallback | none
    lpips_net: str = "alex"  # alex | vgg (backbone of LPIPS when available)
    adv_weight: float = 0.1  # disc weight multiplying taming's adaptive weight
    adaptive_weight_max: float = 1e4  # clamp of the adaptive weight (taming)
    disc_start: int = 2000  # step at which the adversarial term switches on
    max_steps: int = 0  # 0 = no cap
    # Train on random crop x crop windows (HR pixels) of the slices; 0 = whole slices. The
    # generator has no spatial statistics (ChannelNorm), so crops train what whole slices use.
    crop: int = 0
    dead_code_restart: bool = False
    dead_code_after: int = 200  # steps without use before a code counts as dead
    # Optimisation: Adam betas (taming's (0.5, 0.9) suit the GAN; (0.9, 0.99) while it is off),
    # linear learning-rate warm-up over the first steps, gradient-norm clipping (0 = off).
    adam_betas: list[float] = Field(default_factory=lambda: [0.5, 0.9])
    warmup_steps: int = 0
    grad_clip: float = 0.0
    log_every: int = 50
    val_every: int = 1  # epochs
    bf16: bool = False
    compile: bool = False


class Stage2Config(Section):
    """Stage 2: prior matching alignment (Eq. 4, 5)."""

    epochs: int = 40
    batch_size: int = 8
    lr: float = 3e-4
    lr_halve_every: int = 10
    alpha1: float = 0.1  # weight of L_align_s
    alpha2: float = 0.1  # weight of L_align_d
    # Temperature of a = softmax(-d / tau) over the squared code distances d of Eq. 1
    # (Sec. 2.2). 1 = the plain softmax over negative distances; docs/model.md measures how
    # peaked that is on a trained codebook.
    tau: float = 1.0
    align_s: bool = True
    align_d: bool = True
    # paper: KL(a^t || a_HR) as written in Sec. 2.2; forward: KL(a_HR || a^t) (mass-covering)
    align_d_direction: str = "paper"
    # E's initial weights: "scratch" (the paper: a fresh encoder) or "stage1" (a copy of the
    # trained Ê, as CodeFormer's stage II does). LR inputs look like blurred HR, so the copy
    # starts near bicubic quality instead of from noise; at CPU budgets this is the difference
    # between a gain and a loss over bicubic (docs/model.md, "Stage-2 encoder init").
    encoder_init: str = "scratch"
    commit_weight: float = 0.0  # optional ||sg[z_q] - E(x)||^2 term; 0 = Eq. 5 exactly
    # Beyond the paper (CodeFormer's L_feat): weight of ||z^t - sg[Ê(HR)]||^2, a dense target
    # for E's features from the frozen Ê (computed anyway for L_align_d). 0 = Eq. 5 exactly.
    feature_weight: float = 0.0
    # Beyond the paper (CodeFormer's controllable feature transformation, pgasr.models.fidelity):
    # w of the fusion of E's full-resolution features into G's last features, trained in stage 2
    # with G frozen; 0 = off (the paper's G(Z(E(.))) exactly). fidelity_blocks: its ResBlocks.
    fidelity: float = 0.0
    fidelity_blocks: int = 2
    # Beyond the paper: an image residual added to G's output by a small CNN (fidelity_blocks
    # ResBlocks, zero-initialised output conv: training starts at the paper's model), a path
    # around the codebook. "off" | "features" (input: E's full-resolution features) |
    # "refine" (E's features, G's output and the centre LR slice, so it can correct what G
    # gets wrong at the LR's own frequencies). docs/model.md, "Residual head".
    residual_head: str = "off"
    residual_channels: int = 0  # width of the residual head's ResBlocks; 0 = model.channels[0]
    scale: int = 2
    # Scales the pipeline trains a stage 2 for, on one shared stage 1 (paper: [2, 4]); empty =
    # [scale]. The x2 model is exported as RUN_DIR/stage2, any other as RUN_DIR/stage2_x{s}.
    scales: list[int] = Field(default_factory=list)
    stage1_checkpoint: str = ""
    max_steps: int = 0
    crop: int = 0  # random crop side in HR pixels (multiple of scale); 0 = whole slices
    adam_betas: list[float] = Field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    grad_clip: float = 0.0
    log_every: int = 50
    val_every: int = 1
    bf16: bool = False
    compile: bool = False
