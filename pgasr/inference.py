"""Inference: a trained stage-2 checkpoint applied to LR slices and whole NIfTI volumes.

:class:`Predictor` is the single implementation behind ``pgasr sr``, ``pgasr evaluate`` and
the Serve deployment. A volume is processed slice-wise with 3-slice windows (edge slices
replicate themselves), in chunks so memory stays bounded. Intensities follow the contract of
:mod:`pgasr.intensity`: model units come from the LR volume's own statistics, exactly as
``pgasr prepare`` computes them for training, and the output is mapped back to the input's
units. Outside the head the output keeps the input's (bicubic) background
(:mod:`pgasr.background`, ``inference.background``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from pgasr import steps
from pgasr.background import keep_background
from pgasr.consistency import back_project
from pgasr.intensity import intensity_stats
from pgasr.models import build_stage1, build_stage2
from pgasr.checkpoint import Checkpoint, load_checkpoint
from pgasr.config import PriorConfig, RunConfig
from pgasr.priors import build_prior, check_backend_match
from pgasr.volume import (
    check_volume, inplane_grid, inplane_voxel_size, resample_inplane, rescale_affine,
    volume_image,
)

log = logging.getLogger(__name__)

__all__ = ["Predictor", "PredictorSet", "VolumeResult", "normalise_volume"]


def normalise_volume(vol: np.ndarray, head_threshold: float) -> tuple[np.ndarray, float, float]:
    """An LR volume in model units (:func:`pgasr.intensity.intensity_stats`).

    Returns ``(units, offset, scale)``; ``units * scale + offset`` maps back.
    """
    st = intensity_stats(vol, head_threshold)
    return st.normalise(vol), st.offset, st.scale


@dataclass
class VolumeResult:
    sr: np.ndarray  # (X * s, Y * s, Z) float32, input units
    affine: np.ndarray


class Predictor:
    """A stage-2 model + its prior backend, ready to super-resolve.

    Build with :meth:`from_checkpoint`; nothing outside the checkpoint directory is read
    (SAM weights excepted, when the checkpoint was trained with SAM priors: they are located
    through the checkpoint's prior config or ``PGASR_SAM_CHECKPOINT``).
    """

    def __init__(self, ckpt: Checkpoint, device: str | torch.device = "auto",
                 bf16: bool = False, batch_size: int = 8,
                 prior_cfg: PriorConfig | None = None):
        if ckpt.stage != 2:
            raise ValueError(
                f"{ckpt.path} is a stage-{ckpt.stage} checkpoint; inference needs stage 2")
        self.ckpt = ckpt
        self.cfg: RunConfig = ckpt.cfg
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.bf16 = bool(bf16 and self.device.type == "cuda")
        self.batch_size = int(batch_size)
        stage1_model, _ = build_stage1(self.cfg)
        self.model = build_stage2(self.cfg, stage1_model)
        self.model.load_state_dict(ckpt.state_dicts["model"])
        self.model.to(self.device).eval().requires_grad_(False)
        self.acg = bool(self.cfg.model.acg)
        self.prior = build_prior(prior_cfg or self.cfg.prior) if self.acg else None
        trained = ckpt.meta.get("prior")
        if trained and self.prior is not None:
            check_backend_match(trained, self.prior.describe())
        self.scales = [int(s) for s in ckpt.meta.get("scales", [self.cfg.stage2.scale])]

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kw) -> Predictor:
        """A predictor for checkpoint directory ``path`` (verified, weights-only load)."""
        return cls(load_checkpoint(path), **kw)

    from_pretrained = from_checkpoint  # the name diffusers/transformers users reach for

    def describe(self) -> dict:
        """Metadata for ``GET /v1/model`` and reports."""
        m = self.ckpt.meta
        return {
            "checkpoint": str(self.ckpt.path),
            "scales": self.scales,
            "prior": self.prior.describe() if self.prior is not None else {"backend": None},
            "trained_prior": m.get("prior"),
            "perceptual": m.get("perceptual"),
            "metrics": m.get("metrics"),
            "git_sha": m.get("git_sha"),
            "created": m.get("created"),
            "contrast": m.get("contrast"),
            "device": str(self.device),
        }

    def contrast_warning(self, contrast: str, scale: int | None = None) -> str | None:
        """A warning when ``contrast`` (T1, T2w, FLAIR, ...) is not one this model was trained
        on (``meta.json``'s ``contrast``); None when it is, or when the checkpoint predates
        the record. ``scale`` is accepted for :class:`PredictorSet`'s signature."""
        trained = self.ckpt.meta.get("contrast")
        if not trained:
            return None
        if isinstance(trained, str):
            trained = [trained]
        norm = {c.upper().removesuffix("W") for c in trained}
        if contrast.upper().removesuffix("W") in norm:
            return None
        return (f"this model was trained on {', '.join(trained)} images; the input is "
                f"{contrast}: expect intensities and detail typical of the training contrast")

    def _check_scale(self, scale: int) -> None:
        if scale not in self.scales:
            raise ValueError(f"scale {scale} not supported by this checkpoint (trained for "
                             f"{self.scales})")

    # ------------------------------------------------------------------ slices

    @torch.inference_mode()
    def predict_triplets(self, lr: np.ndarray | torch.Tensor, scale: int,
                         prior_lr: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        """SR of the centre slice of each LR triplet.

        Args:
            lr: (B, 3, h, w) LR triplets (t-1, t, t+1) in model units (the LR volume's
                statistics, :mod:`pgasr.intensity`).
            scale: 2 or 4 (must be one the checkpoint was trained for).
            prior_lr: (B, 3, h*s, w*s) priors of the upsampled LR; computed when None.

        Returns:
            (B, h*s, w*s) float32 SR centre slices.
        """
        self._check_scale(scale)
        lr_t = torch.as_tensor(np.asarray(lr, dtype=np.float32))
        if lr_t.ndim != 4 or lr_t.shape[1] != 3:
            raise ValueError(f"expected LR triplets (B, 3, h, w), got {tuple(lr_t.shape)}")
        b, _, h, w = lr_t.shape
        H, W = h * scale, w * scale
        lr_up = steps.upsample_lr(lr_t, (H, W))  # (B, 3, H, W)
        if not self.acg:
            prior_t = None
        elif prior_lr is None:
            pri = self.prior(lr_up.reshape(b * 3, H, W).numpy()).astype(np.float32)
            prior_t = torch.from_numpy(pri).reshape(b, 3, H, W)
        else:
            prior_t = torch.as_tensor(np.asarray(prior_lr, dtype=np.float32))
        return self._forward(lr_up, prior_t, lr_t[:, 1])

    def _forward(self, lr_up: torch.Tensor, prior: torch.Tensor | None,
                 lr: torch.Tensor) -> np.ndarray:
        """Network -> back-projection onto the LR centre slices -> input's background.

        Args:
            lr_up: (B, 3, H, W) upsampled triplets; prior: their priors or None;
            lr: (B, h, w) the LR centre slices.
        """
        # The model pads any H, W to its latent factor / window and crops back.
        outs = []
        for i in range(0, len(lr_up), self.batch_size):
            sl = slice(i, i + self.batch_size)
            x = lr_up[sl].to(self.device)
            p = None if prior is None else prior[sl].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                sr = self.model(x, p)
            outs.append(self._finish(sr, lr[sl], lr_up[sl, 1]))
        return torch.cat(outs).numpy()

    def _finish(self, sr: torch.Tensor, lr: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        """The network's (B, 1, H', W') output -> (B, H, W) float32 on the CPU, back-projected
        onto the LR centre slices ``lr`` (B, h, w) and given the input's background where
        ``centre`` (B, H, W), the upsampled LR centre, is background."""
        inf = self.cfg.inference
        H, W = centre.shape[-2:]
        sr = sr.float()[:, 0, :H, :W].cpu()
        sr = back_project(sr, lr, inf.back_projection_steps, inf.back_projection_weight)
        return keep_background(sr, centre, inf)

    def _forward_slices(self, lr_up: torch.Tensor, prior: torch.Tensor | None,
                        lr: torch.Tensor) -> np.ndarray:
        """:meth:`_forward` for the k triplets of k + 2 consecutive slices, each slice
        through E once (:meth:`Stage2Model.encode_slices`) instead of once per triplet.

        Args:
            lr_up: (k+2, 1, H, W) upsampled slices t-1 .. t+k; prior: their priors or None;
            lr: (k, h, w) the LR centre slices.
        """
        m = self.model
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            x = lr_up.to(self.device)
            z, skip = m.encode_slices(x, None if prior is None else prior.to(self.device),
                                      skip=m.needs_skip)  # (k+2, n_z, h', w')
            k = len(lr)
            trip = torch.stack([z[:k], z[1 : k + 1], z[2:]], 1)  # (k, 3, n_z, h', w')
            sr = m.render(trip, None if skip is None else skip[1 : k + 1], x[1 : k + 1])
        return self._finish(sr, lr, lr_up[1 : k + 1, 0]).numpy()

    # ------------------------------------------------------------------ volumes

    @torch.inference_mode()  # no autograd bookkeeping at all (1.2x over no_grad on CPU)
    def predict_volume(self, lr_volume: np.ndarray, affine: np.ndarray, scale: int,
                       progress=None) -> VolumeResult:
        """Super-resolve an LR volume (axial slices in the third axis).

        In-plane axes are brought to the training orientation (R, A) when the slice axis is
        superior-inferior, processed, and put back, so the output array has the input's
        layout. Returns the SR volume in the input's intensity units and the affine whose
        in-plane voxel size is divided by ``scale`` with the field of view unchanged.
        """
        self._check_scale(scale)
        vol = check_volume(lr_volume, "input")
        affine = np.asarray(affine, dtype=np.float64)
        to_std, from_std = _inplane_orientation(affine)
        work = nib.orientations.apply_orientation(vol, to_std) if to_std is not None else vol
        st = intensity_stats(work, self.cfg.data.head_threshold)
        z = st.normalise(work)
        n = z.shape[2]
        H, W = z.shape[0] * scale, z.shape[1] * scale
        out = np.empty((H, W, n), dtype=np.float32)
        # Each upsampled slice's prior and E features are computed once, then shared by the
        # 3 triplets (t-1, t, t+1) the slice belongs to.
        chunk = max(self.batch_size, 1)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            idx = np.arange(start - 1, stop + 1).clip(0, n - 1)
            lr = torch.from_numpy(np.moveaxis(z[:, :, idx], 2, 0).copy())  # (k+2, h, w)
            lr_up = steps.upsample_lr(lr[:, None], (H, W))  # (k+2, 1, H, W)
            pri = None
            if self.acg:
                pri = torch.from_numpy(self.prior(lr_up[:, 0].numpy()).astype(np.float32))[:, None]
            sr = self._forward_slices(lr_up, pri, lr[1 : stop - start + 1])  # (k, H, W)
            out[:, :, start:stop] = np.moveaxis(sr, 0, 2)
            if progress is not None:
                progress(stop, n)
        out = st.denormalise(out)
        if not np.isfinite(out).all():
            raise FloatingPointError("the model produced non-finite voxels for this volume")
        if from_std is not None:
            out = nib.orientations.apply_orientation(out, from_std)
        return VolumeResult(np.ascontiguousarray(out, dtype=np.float32),
                            rescale_affine(affine, 1.0 / scale))

    def check_spacing(self, img: nib.Nifti1Image, scale: int) -> str | None:
        """A warning when the input's in-plane voxel size is far (> 25 %) from the LR voxel
        size the model was trained on (its HR voxel size x ``scale``); None otherwise."""
        want = self.lr_voxel_size(scale)
        if want is None:
            return None
        got = float(np.mean(inplane_voxel_size(img.affine)))
        if not np.isfinite(got) or abs(got / want - 1) <= 0.25:
            return None
        return (f"input in-plane voxel size {got:.2f} mm differs from the {want:.2f} mm LR voxels "
                f"this model was trained on (HR {want / scale:.2f} mm x{scale}): anatomy appears "
                f"at another scale than in training; resample the volume to {want:.2f} mm for "
                "the intended result")

    def lr_voxel_size(self, scale: int) -> float | None:
        """In-plane voxel size (mm) of the LR inputs this model was trained on at ``scale``
        (its HR voxel size x ``scale``); None when the checkpoint does not record it."""
        hr = self.ckpt.meta.get("voxel_size")
        return float(hr[0]) * scale if hr else None

    def to_model_grid(self, img: nib.Nifti1Image, scale: int) -> tuple[nib.Nifti1Image, dict]:
        """The input as the model expects it: axial (a sagittal or coronal acquisition is
        reoriented to RAS+) and, when the checkpoint records its voxel size, resampled in-plane
        to the model's LR voxel size. Returns the image and what was done (for sidecars)."""
        info: dict = {"input_shape": [int(n) for n in img.shape[:3]],
                      "input_voxel_size": [round(float(z), 4) for z in
                                           np.linalg.norm(img.affine[:3, :3], axis=0)],
                      "reoriented": False, "resampled": False}
        if int(nib.orientations.io_orientation(img.affine)[2, 0]) != 2:
            img = nib.as_closest_canonical(img)
            info["reoriented"] = True
            log.info("slices are not axial: reoriented to RAS+ (output is written in RAS+)")
        want = self.lr_voxel_size(scale)
        if want is None:
            return img, info
        if inplane_grid(img.shape, img.affine, want) is None:  # already on the LR grid
            return img, info
        got = inplane_voxel_size(img.affine)
        if max(got) < want * 0.8:
            log.warning("input in-plane voxels (%.2f x %.2f mm) are finer than the %.2f mm LR "
                        "voxels of this model at x%d: resampling to them discards detail; the "
                        "output has the model's %.2f mm voxels", *got, want, scale, want / scale)
        vol = check_volume(img.dataobj, "input")
        data, affine = resample_inplane(vol, img.affine, want)
        info.update(resampled=True, resampled_to=[want, want])
        log.info("resampled the input in-plane from %.2f x %.2f mm to the model's %.2f mm LR "
                 "grid", *got, want)
        return volume_image(data, affine, img), info

    def model_grid_shape(self, img: nib.Nifti1Image, scale: int) -> tuple[int, int, int]:
        """The shape :meth:`to_model_grid` gives ``img``, from its shape and affine alone
        (nothing is resampled): what a service checks against its voxel caps first."""
        shape, affine = tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, float)
        ornt = nib.orientations.io_orientation(affine)
        if int(ornt[2, 0]) != 2:  # as_closest_canonical: array axis j becomes axis ornt[j, 0]
            order = np.argsort(ornt[:, 0])
            shape = tuple(shape[j] for j in order)
            affine = np.c_[affine[:3, :3][:, order], affine[:3, 3]]
        want = self.lr_voxel_size(scale)
        grid = None if want is None else inplane_grid(shape, affine, want)
        return shape if grid is None else (*grid, shape[2])

    def predict_image(self, img: nib.Nifti1Image, scale: int, progress=None,
                      resample: bool = False) -> nib.Nifti1Image:
        """NIfTI in, NIfTI out: header kept, shape/affine/zooms updated.

        ``resample``: bring the input to the model's grid first (:meth:`to_model_grid`; the
        output's affine then describes that grid at ``scale`` times finer voxels); otherwise
        the volume is processed on its own grid, with a warning when its spacing is far from
        the training spacing."""
        if resample:
            img, _ = self.to_model_grid(img, scale)
        else:
            msg = self.check_spacing(img, scale)
            if msg:
                log.warning(msg)
        res = self.predict_volume(np.asanyarray(img.dataobj), img.affine, scale, progress)
        return volume_image(res.sr, res.affine, img)


class PredictorSet:
    """Several stage-2 checkpoints of one run (e.g. ``stage2`` at x2 and ``stage2_x4`` at x4)
    behind :class:`Predictor`'s interface: every call goes to the model trained for its scale.

    Raises:
        ValueError: two checkpoints claim the same scale.
    """

    def __init__(self, predictors: list[Predictor]):
        if not predictors:
            raise ValueError("PredictorSet needs at least one predictor")
        self.by_scale: dict[int, Predictor] = {}
        for p in predictors:
            for s in p.scales:
                if s in self.by_scale:
                    raise ValueError(f"x{s} is served by both {self.by_scale[s].ckpt.path} and "
                                     f"{p.ckpt.path}; give one checkpoint per scale")
                self.by_scale[s] = p
        self.scales = sorted(self.by_scale)
        self.device = predictors[0].device

    @classmethod
    def from_checkpoints(cls, paths: list[str | Path], **kw) -> PredictorSet:
        return cls([Predictor.from_checkpoint(p, **kw) for p in paths])

    def _for(self, scale: int) -> Predictor:
        if scale not in self.by_scale:
            raise ValueError(f"scale {scale} not supported by these checkpoints (trained for "
                             f"{self.scales})")
        return self.by_scale[scale]

    def describe(self) -> dict:
        first = self.by_scale[self.scales[0]].describe()
        return {**first, "scales": self.scales,
                "checkpoints": {str(s): self.by_scale[s].describe() for s in self.scales}}

    def contrast_warning(self, contrast: str, scale: int | None = None) -> str | None:
        """:meth:`Predictor.contrast_warning` of the x``scale`` model (default: the first)."""
        return self._for(self.scales[0] if scale is None else scale).contrast_warning(contrast)

    def predict_triplets(self, lr, scale: int, prior_lr=None) -> np.ndarray:
        return self._for(scale).predict_triplets(lr, scale, prior_lr)

    def predict_image(self, img: nib.Nifti1Image, scale: int, progress=None,
                      resample: bool = False) -> nib.Nifti1Image:
        return self._for(scale).predict_image(img, scale, progress, resample)

    def model_grid_shape(self, img: nib.Nifti1Image, scale: int) -> tuple[int, int, int]:
        return self._for(scale).model_grid_shape(img, scale)

    def to_model_grid(self, img: nib.Nifti1Image, scale: int) -> tuple[nib.Nifti1Image, dict]:
        return self._for(scale).to_model_grid(img, scale)


def _inplane_orientation(affine: np.ndarray):
    """Orientation transforms that put the in-plane axes in (R, A) order when the third
    array axis is the slice (S/I) axis; (None, None) when it already is, or when the
    volume is not axial (then it is processed as given, with a warning)."""
    ornt = nib.orientations.io_orientation(affine)
    if int(ornt[2, 0]) != 2:
        log.warning("third array axis is not superior-inferior: slices are not axial; "
                    "processing the volume as given (the model was trained on axial slices)")
        return None, None
    target = np.array([[0, 1], [1, 1], [2, ornt[2, 1]]])
    to_std = nib.orientations.ornt_transform(ornt, target)
    if np.array_equal(to_std, np.array([[0, 1], [1, 1], [2, 1]])):
        return None, None
    return to_std, nib.orientations.ornt_transform(target, ornt)
