"""The two PGASR models and their builders.

Stage 1 (anatomical-conditioned codebook generation, Sec. 2.1)::

    [hr | prior_hr] --Ê--> z (B,n_z,H/f,W/f) --Z--> z_q --G--> recon (B,1,H,W)

Stage 2 (prior matching alignment, Sec. 2.2), for a triplet t-1, t, t+1::

    [lr_up | prior_lr]^{t-1,t,t+1} --E--> z^{t-1,t,t+1} --SCAB--> z'^{t-1,t,t+1}
        --d to Z--> a = softmax(-d/tau)      (L_align_s on a^{t-1}, a^t, a^{t+1})
    z'^t --Z (frozen)--> z_q^t --G (frozen)--> sr (B,1,H,W)
    [hr | prior_hr]^t --Ê (frozen)--> a_HR^t        (L_align_d)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgasr.models.blocks import ResBlock, pad_to_multiple, set_padding
from pgasr.models.config import ModelConfig
from pgasr.models.decoder import Decoder
from pgasr.models.discriminator import Discriminator
from pgasr.models.encoder import Encoder
from pgasr.models.fidelity import FidelityFusion
from pgasr.models.quantizer import Quantizer, QuantizerOutput
from pgasr.models.scab import SCAB


def unwrap(m: nn.Module) -> nn.Module:
    """The module inside a DDP / compile wrapper (``m`` itself otherwise)."""
    m = getattr(m, "module", m)
    return getattr(m, "_orig_mod", m)


def freeze_(module: nn.Module) -> nn.Module:
    """Freeze in place: ``requires_grad_(False)`` and eval mode. Call BEFORE DDP wrapping, so
    DDP never registers (and never all-reduces) the frozen parameters."""
    module.requires_grad_(False)
    module.eval()
    return module


def _input(image: torch.Tensor, prior: torch.Tensor | None, acg: bool) -> torch.Tensor:
    """Encoder input: (B,1,H,W) image [+ (B,1,H,W) prior] -> (B, 1 or 2, H, W)."""
    if not acg:
        return image
    if prior is None:
        raise ValueError("model.acg=true needs the anatomical prior; pass it or set model.acg=false")
    if prior.shape != image.shape:
        raise ValueError(f"prior shape {tuple(prior.shape)} != image shape {tuple(image.shape)}")
    return torch.cat([image, prior.to(image.dtype)], dim=1)


def build_encoder(cfg: ModelConfig) -> Encoder:
    """Ê / E from the model config (1 input channel without ACG, 2 with)."""
    return Encoder(
        in_channels=2 if cfg.acg else 1,
        channels=list(cfg.channels),
        n_z=cfg.n_z,
        latent_factor=cfg.latent_factor,
        num_heads=cfg.num_heads,
        window_size=cfg.window_size,
        dat_depth=cfg.dat_depth,
        mlp_ratio=cfg.mlp_ratio,
    )


# ============================================================================ stage 1


@dataclass
class Stage1Output:
    """Attributes:
    recon: (B, 1, H, W) G(z_q), cropped to the input size.
    quant: the quantizer's output on Ê's features (B, n_z, ceil(H/f), ceil(W/f)).
    """

    recon: torch.Tensor
    quant: QuantizerOutput


class Stage1Model(nn.Module):
    """Ê + Z + G (the anatomical-conditioned VQGAN without its discriminator).

    Inputs of any size are padded (replicate) to a multiple of ``latent_factor`` and the
    reconstruction cropped back.
    """

    def __init__(self, cfg: ModelConfig, dead_code_restart: bool = False, dead_after: int = 200):
        super().__init__()
        self.acg = cfg.acg
        self.latent_factor = cfg.latent_factor
        self.encoder_hat = build_encoder(cfg)
        self.quantizer = Quantizer(
            cfg.codebook_size, cfg.n_z, cfg.codebook_init, dead_code_restart, dead_after
        )
        self.decoder = Decoder(
            cfg.n_z,
            cfg.decoder_channels,
            cfg.latent_factor,
            cfg.num_heads,
            cfg.window_size,
            cfg.dat_depth,
            cfg.mlp_ratio,
        )

    @property
    def codebook(self) -> nn.Embedding:
        """Z, (N, n_z) weights."""
        return self.quantizer.codebook

    def encode(self, hr: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Ê features. (B,1,H,W) [+ prior] -> (B, n_z, ceil(H/f), ceil(W/f))."""
        x = pad_to_multiple(_input(hr, prior, self.acg), self.latent_factor)
        return self.encoder_hat(x)

    def decode(self, z_q: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """G. (B, n_z, h, w) -> (B, 1, h*f, w*f), cropped to ``size`` if given."""
        out = self.decoder(z_q)
        return out if size is None else out[..., : size[0], : size[1]]

    def forward(self, hr: torch.Tensor, prior: torch.Tensor | None = None) -> Stage1Output:
        """Reconstruct HR slices (Eq. 1-2).

        Args:
            hr: (B, 1, H, W) z-scored HR slices.
            prior: (B, 1, H, W) anatomical prior S_HR in [0, 1] (required when ACG is on).
        """
        quant = self.quantizer(self.encode(hr, prior))
        return Stage1Output(self.decode(quant.z_q, hr.shape[-2:]), quant)


def build_stage1(cfg) -> tuple[Stage1Model, Discriminator]:
    """Stage-1 model (Ê, Z, G) and discriminator D from a RunConfig."""
    model = Stage1Model(cfg.model, cfg.stage1.dead_code_restart, cfg.stage1.dead_code_after)
    set_padding(model, cfg.model.padding)
    disc = Discriminator(1, cfg.model.disc_channels, cfg.model.disc_layers)
    return model, disc


# ============================================================================ stage 2


@dataclass
class Stage2Output:
    """Everything a stage-2 training step needs.

    Attributes:
        sr: (B, 1, H, W) SR centre slice G(Z(SCAB(E(.)))).
        member_log_probs: K tensors (B, N, h, w), log a over the N codes of the triplet
            members that were computed: K = 3 (t-1, t, t+1) with ``neighbours=True``, else
            K = 1 (t only). Kept apart (not stacked) so the losses' gradients never
            materialise a zero-filled (B, K, N, h, w) tensor per member.
        indices: (B, h, w) selected codes of the centre slice.
        z: (B, n_z, h, w) refined centre features (before quantization).
        z_q: (B, n_z, h, w) quantized centre features (straight-through).
        log_probs_hr: (B, N, h, w) log a_HR^t from the frozen Ê, or None.
        indices_hr: (B, h, w) HR codes of the centre slice, or None.
        z_hr: (B, n_z, h, w) the frozen Ê's features of the HR centre slice, or None.
    """

    sr: torch.Tensor
    member_log_probs: tuple[torch.Tensor, ...]
    indices: torch.Tensor
    z: torch.Tensor
    z_q: torch.Tensor
    log_probs_hr: torch.Tensor | None = None
    indices_hr: torch.Tensor | None = None
    z_hr: torch.Tensor | None = None

    @property
    def centre_log_probs(self) -> torch.Tensor:
        """(B, N, h, w) log a^t."""
        return self.member_log_probs[len(self.member_log_probs) // 2]

    @property
    def log_probs(self) -> torch.Tensor:
        """(B, K, N, h, w): the members' log a stacked (a copy; the losses use the members)."""
        return torch.stack(self.member_log_probs, 1)


@dataclass
class CodeOutput:
    """Codes of a batch of slices (Table 3 / Fig. 1).

    Attributes:
        indices: (B, h, w) argmin code per latent position.
        probs: (B, N, h, w) a = softmax(-d / tau).
    """

    indices: torch.Tensor
    probs: torch.Tensor


def code_log_probs(distances: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """log a = log softmax(-d / tau) over the code axis (Sec. 2.2).

    ``d`` are the raw squared distances of Eq. 1, so ``tau = 1`` is the plain softmax over
    negative distances; see docs/model.md for how peaked that is on a trained codebook.

    Args:
        distances: (B, N, h, w) squared distances to the codes.
        tau: temperature (> 0).

    Returns:
        (B, N, h, w) float32 log-probabilities.
    """
    if tau <= 0:
        raise ValueError(f"stage2.tau must be > 0, got {tau}")
    return F.log_softmax(distances.float() * (-1.0 / tau), dim=1)


RESIDUAL_HEADS = ("off", "features", "refine")


class Stage2Model(nn.Module):
    """E + SCAB (trained) with the frozen Z, G and Ê of stage 1.

    Args:
        cfg: model config (must match the stage-1 model's architecture).
        quantizer, decoder, encoder_hat: stage-1 modules; they are frozen here.
        tau: temperature of the code probabilities.
        fidelity: w of the fidelity fusion (beyond the paper, :mod:`pgasr.models.fidelity`);
            0 = no fusion module, the paper's G(Z(SCAB(E(.)))).
        fidelity_blocks: ResBlocks of the fusion's predictor (and of the residual head).
        residual_head: ``"off"``, or an image residual added to G's output (beyond the paper;
            zero-initialised, so training starts at the paper's model) computed from E's
            full-resolution features (``"features"``) or from those, G's output and the centre
            LR slice (``"refine"``).
        residual_channels: width of the residual head (0 = ``cfg.channels[0]``).
    """

    FROZEN = ("quantizer", "decoder", "encoder_hat")

    def __init__(
        self,
        cfg: ModelConfig,
        quantizer: Quantizer,
        decoder: Decoder,
        encoder_hat: Encoder,
        tau: float = 1.0,
        fidelity: float = 0.0,
        fidelity_blocks: int = 2,
        residual_head: str = "off",
        residual_channels: int = 0,
    ):
        super().__init__()
        if fidelity < 0:
            raise ValueError(f"stage2.fidelity must be >= 0, got {fidelity}")
        if residual_head not in RESIDUAL_HEADS:
            raise ValueError(f"stage2.residual_head must be one of {', '.join(RESIDUAL_HEADS)}, "
                             f"got {residual_head!r}")
        self.acg = cfg.acg
        self.latent_factor = cfg.latent_factor
        self.n_z = cfg.n_z
        self.tau = tau
        self.encoder = build_encoder(cfg)
        self.scab = (
            SCAB(cfg.n_z, cfg.num_heads, cfg.window_size, cfg.mlp_ratio, cfg.scab_mode)
            if cfg.scab
            else None
        )
        self.fidelity = (
            FidelityFusion(cfg.channels[0], decoder.out_channels, fidelity_blocks, fidelity)
            if fidelity > 0
            else None
        )
        # beyond the paper (stage2.residual_head): a small CNN adding an image residual to G's
        # output; "refine" also sees G's output and the centre LR slice (2 more channels)
        self.residual_inputs = residual_head
        c0, ch = cfg.channels[0], residual_channels or cfg.channels[0]
        extra = 2 if residual_head == "refine" else 0
        self.residual_head = (
            nn.Sequential(ResBlock(c0 + extra, ch),
                          *[ResBlock(ch, ch) for _ in range(max(fidelity_blocks, 1) - 1)],
                          nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))
            if residual_head != "off" else None
        )
        if self.residual_head is not None:
            nn.init.zeros_(self.residual_head[-1].weight)
            nn.init.zeros_(self.residual_head[-1].bias)
        self.quantizer = freeze_(quantizer)
        self.decoder = freeze_(decoder)
        self.encoder_hat = freeze_(encoder_hat)
        if encoder_hat.in_channels != self.encoder.in_channels:
            raise ValueError("stage-1 Ê and the stage-2 config disagree on model.acg")

    def train(self, mode: bool = True) -> Stage2Model:
        """Train mode for E and SCAB only; Z, G and Ê always stay in eval mode."""
        super().train(mode)
        for name in self.FROZEN:
            getattr(self, name).eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ pieces
    def encode_slices(self, imgs: torch.Tensor, priors: torch.Tensor | None = None,
                      skip: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """E on independent slices (each slice is encoded on its own; a volume's slices can
        be encoded once and shared by the three triplets they belong to).

        Args:
            imgs: (N, 1, H, W) upsampled LR slices; priors: (N, 1, H, W) (with ACG).
            skip: also return E's full-resolution features (fidelity fusion, residual head).

        Returns:
            z (N, n_z, h, w), and (N, channels[0], H', W') at the padded size, or None.
        """
        x = pad_to_multiple(_input(imgs, priors, self.acg), self.latent_factor)
        if not skip:
            return self.encoder(x), None
        return self.encoder(x, return_skip=True)

    @property
    def needs_skip(self) -> bool:
        """Whether :meth:`render` needs E's full-resolution features of the centre."""
        return self.fidelity is not None or self.residual_head is not None

    def _encode_members(self, lr_up, prior_lr, members: list[int]):
        """E on the chosen triplet members.

        Returns:
            z (B, len(members), n_z, h, w), and E's full-resolution features of the centre
            member (B, channels[0], H, W) when the fidelity fusion is on (else None).
        """
        b = lr_up.shape[0]
        imgs = lr_up[:, members].reshape(-1, 1, *lr_up.shape[-2:])  # (B*K, 1, H, W)
        pri = None if prior_lr is None else prior_lr[:, members].reshape(imgs.shape)
        z, skip = self.encode_slices(imgs, pri, skip=self.needs_skip)  # (B*K, n_z, h, w)
        if skip is not None:  # (B*K, c0, H, W) -> the centre's
            skip = skip.reshape(b, len(members), *skip.shape[1:])[:, members.index(1)]
        return z.reshape(b, len(members), *z.shape[1:]), skip

    def features(
        self, lr_up: torch.Tensor, prior_lr: torch.Tensor | None = None, neighbours: bool = False
    ) -> torch.Tensor:
        """Refined features z' of the centre (and, with ``neighbours``, of t-1 and t+1).

        Each member attends to its neighbours inside the triplet: the centre to (t-1, t+1),
        an edge member to its only neighbour t (passed twice, see :class:`SCAB`).

        Args:
            lr_up: (B, 3, H, W) bicubic-upsampled LR triplet (channel 1 = centre t).
            prior_lr: (B, 3, H, W) priors of ``lr_up`` (required with ACG).
            neighbours: also return the refined t-1 and t+1 features.

        Returns:
            (B, 3, n_z, h, w) with neighbours, else (B, 1, n_z, h, w).
        """
        return self._features(lr_up, prior_lr, neighbours)[0]

    def _features(self, lr_up, prior_lr, neighbours: bool):
        """:meth:`features` and the centre's full-resolution E features (fidelity fusion)."""
        if lr_up.ndim != 4 or lr_up.shape[1] != 3:
            raise ValueError(f"stage 2 expects a (B, 3, H, W) slice triplet, got {tuple(lr_up.shape)}")
        if self.scab is None:
            members = [0, 1, 2] if neighbours else [1]
            return self._encode_members(lr_up, prior_lr, members)
        z, skip = self._encode_members(lr_up, prior_lr, [0, 1, 2])  # (B, 3, n_z, h, w)
        return self.refine(z, neighbours), skip

    def refine(self, z: torch.Tensor, neighbours: bool = False) -> torch.Tensor:
        """SCAB over E's features of triplets: (B, 3, n_z, h, w) -> the refined centre
        (B, 1, n_z, h, w), or all three members with ``neighbours``. Without SCAB, the centre
        (or the triplet) unchanged."""
        if self.scab is None:
            return z if neighbours else z[:, 1:2]
        if not neighbours:
            return self.scab(z[:, 1], z[:, 0::2])[:, None]  # (B, 1, n_z, h, w)
        b = z.shape[0]
        queries = z.transpose(0, 1).reshape(3 * b, *z.shape[2:])  # (3B, n_z, h, w): t-1, t, t+1
        ctx = torch.cat(
            [
                torch.stack([z[:, 1], z[:, 1]], 1),  # t-1: only neighbour is t
                z[:, 0::2],  # t: (t-1, t+1)
                torch.stack([z[:, 1], z[:, 1]], 1),  # t+1: only neighbour is t
            ]
        )  # (3B, 2, n_z, h, w)
        out = self.scab(queries, ctx)  # (3B, n_z, h, w)
        return out.reshape(3, b, *out.shape[1:]).transpose(0, 1)  # (B, 3, n_z, h, w)

    @torch.no_grad()
    def hr_codes(self, hr: torch.Tensor, prior_hr: torch.Tensor | None = None) -> CodeOutput:
        """Codes of HR slices through the frozen Ê (a_HR, Table 3).

        Args:
            hr: (B, 1, H, W); prior_hr: (B, 1, H, W) with ACG.
        """
        x = pad_to_multiple(_input(hr, prior_hr, self.acg), self.latent_factor)
        d = self.quantizer.distances(self.encoder_hat(x))
        return CodeOutput(d.argmin(1), code_log_probs(d, self.tau).exp())

    @torch.no_grad()
    def codes(self, lr_up: torch.Tensor, prior_lr: torch.Tensor | None = None) -> CodeOutput:
        """Codes of the centre LR slice through E + SCAB (Table 3, LR side).

        Args:
            lr_up: (B, 3, H, W); prior_lr: (B, 3, H, W) with ACG.
        """
        z = self.features(lr_up, prior_lr)[:, 0]
        d = self.quantizer.distances(z)
        return CodeOutput(d.argmin(1), code_log_probs(d, self.tau).exp())

    # ------------------------------------------------------------------ forward
    def _render(self, z_t: torch.Tensor, skip: torch.Tensor | None, centre: torch.Tensor):
        """Z, G (with the fidelity fusion) and the residual head on the refined centre
        features z_t (B, n_z, h, w); ``centre`` (B, 1, H, W) the upsampled LR centre slice.
        Returns the SR centre (B, 1, H, W) and the quantizer's output."""
        size = centre.shape[-2:]
        quant = self.quantizer(z_t)
        fuse = None if self.fidelity is None else (lambda f_d: self.fidelity(f_d, skip))
        sr = self.decoder(quant.z_q, fuse)  # (B, 1, H', W') padded
        if self.residual_head is not None:
            head_in = skip
            if self.residual_inputs == "refine":
                head_in = torch.cat([skip, sr, pad_to_multiple(centre, self.latent_factor)], 1)
            sr = sr + self.residual_head(head_in)
        return sr[..., : size[0], : size[1]], quant  # (B, 1, H, W)

    def render(self, z: torch.Tensor, skip: torch.Tensor | None,
               centre: torch.Tensor) -> torch.Tensor:
        """SR of triplet centres from E's features of the members (:meth:`encode_slices`):
        the second half of :meth:`forward`, for callers that encode each slice once.

        Args:
            z: (B, 3, n_z, h, w) E's features of t-1, t, t+1.
            skip: (B, channels[0], H', W') E's full-resolution features of t, or None
                (needed when :attr:`needs_skip`).
            centre: (B, 1, H, W) the upsampled LR centre slices.

        Returns:
            (B, 1, H, W) SR centre slices, equal to :meth:`forward` on the same triplets.
        """
        if self.needs_skip and skip is None:
            raise ValueError("render: this model fuses E's full-resolution features; pass skip")
        return self._render(self.refine(z)[:, 0], skip, centre)[0]

    def forward(
        self,
        lr_up: torch.Tensor,
        prior_lr: torch.Tensor | None = None,
        *,
        hr: torch.Tensor | None = None,
        prior_hr: torch.Tensor | None = None,
        neighbours: bool = False,
        return_all: bool = False,
    ) -> torch.Tensor | Stage2Output:
        """Super-resolve the centre slice of LR triplets.

        Args:
            lr_up: (B, 3, H, W) bicubic-upsampled LR triplet, channel 1 = centre t.
            prior_lr: (B, 3, H, W) priors computed on ``lr_up`` (required with ACG).
            hr: (B, 1, H, W) HR centre slice; when given (with ``return_all``), a_HR^t is
                computed by the frozen Ê for L_align_d.
            prior_hr: (B, 1, H, W) prior of ``hr`` (required with ACG when ``hr`` is given).
            neighbours: compute a^{t-1}, a^{t+1} too (for L_align_s).
            return_all: return a :class:`Stage2Output` instead of the SR tensor (training goes
                through here so DDP sees a single forward).

        Returns:
            (B, 1, H, W) SR centre slice, or :class:`Stage2Output`.
        """
        z, skip = self._features(lr_up, prior_lr, neighbours and return_all)  # (B, K, n_z, h, w)
        k = z.shape[1]
        z_t = z[:, k // 2]  # (B, n_z, h, w)
        sr, quant = self._render(z_t, skip, lr_up[:, 1:2])
        if not return_all:
            return sr
        members = tuple(
            code_log_probs(quant.distances if i == k // 2 else self.quantizer.distances(z[:, i]),
                           self.tau)
            for i in range(k)
        )  # K x (B, N, h, w); the centre reuses the quantizer's distances
        out = Stage2Output(sr, members, quant.indices, z_t, quant.z_q)
        if hr is not None:
            with torch.no_grad():
                x = pad_to_multiple(_input(hr, prior_hr, self.acg), self.latent_factor)
                out.z_hr = self.encoder_hat(x)
                d_hr = self.quantizer.distances(out.z_hr)
            out.log_probs_hr = code_log_probs(d_hr, self.tau)
            out.indices_hr = d_hr.argmin(1)
        return out


def build_stage2(cfg, stage1_model: nn.Module) -> Stage2Model:
    """Stage-2 model from a RunConfig and a trained stage-1 model (possibly DDP-wrapped).

    Z, G and Ê are deep-copied from ``stage1_model`` and frozen (``requires_grad_(False)``,
    eval) before anything can wrap the result in DDP; SCAB is freshly initialised, and E too
    unless ``stage2.encoder_init == "stage1"`` (then E starts as a trainable copy of Ê).
    """
    s1 = unwrap(stage1_model)
    if not isinstance(s1, Stage1Model):
        raise TypeError(f"build_stage2 needs a Stage1Model, got {type(s1).__name__}")
    if s1.acg != cfg.model.acg or s1.latent_factor != cfg.model.latent_factor:
        raise ValueError(
            "stage-1 model and config disagree: "
            f"acg {s1.acg} vs {cfg.model.acg}, latent_factor {s1.latent_factor} vs "
            f"{cfg.model.latent_factor}"
        )
    init = cfg.stage2.encoder_init
    if init not in ("scratch", "stage1"):
        raise ValueError(f"stage2.encoder_init must be 'scratch' or 'stage1', got {init!r}")
    model = Stage2Model(
        cfg.model,
        copy.deepcopy(s1.quantizer),
        copy.deepcopy(s1.decoder),
        copy.deepcopy(s1.encoder_hat),
        tau=cfg.stage2.tau,
        fidelity=cfg.stage2.fidelity,
        fidelity_blocks=cfg.stage2.fidelity_blocks,
        residual_head=cfg.stage2.residual_head,
        residual_channels=cfg.stage2.residual_channels,
    )
    if init == "stage1":  # E starts as a trainable copy of Ê (Ê itself stays frozen)
        model.encoder.load_state_dict(s1.encoder_hat.state_dict())
    return set_padding(model, cfg.model.padding)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
