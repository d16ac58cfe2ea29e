"""``pgasr sr`` over files, folders and BIDS datasets: what to write where, and the sidecars.

- a file in, the ``--output`` file out (``.nii``/``.nii.gz``);
- a folder holding one DICOM series in (:mod:`pgasr.dicom`), the ``--output`` file out;
- a BIDS dataset in: ``<root>/derivatives/pgasr/sub-X/[ses-Y/]anat/sub-X_[ses-Y_]..._desc-sr2_T2w.nii.gz``
  (or under ``--output``), with the derivative's ``dataset_description.json``;
- any other folder in: every ``.nii``/``.nii.gz`` below it, written under ``--output`` with the
  same relative path and ``_sr2`` before the extension.

Each output gets a JSON sidecar (same name, ``.json``): the model, the checkpoint's hash, the
scale, the prior backend, the software version, the input's hash and what was done to bring
it to the model's grid. Existing outputs are never replaced without ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from pgasr import __version__
from pgasr.dicom import is_dicom_dir, read_dicom_series, series_digest
from pgasr.data.sources import (
    bids_suffix_for, detect_format, iter_sources, nifti_files, nifti_stem,
)
from pgasr.provenance import atomic_write_text, sha256_file

__all__ = ["SRJob", "checkpoint_digest", "derivative_name", "input_digest", "model_record",
           "plan_jobs", "read_input", "run_sr_job", "sidecar", "write_dataset_description"]

_NIFTI = (".nii", ".nii.gz")


@dataclass(frozen=True)
class SRJob:
    input: Path
    output: Path

    @property
    def sidecar(self) -> Path:
        return self.output.with_name(nifti_stem(self.output.name) + ".json")


def derivative_name(name: str, scale: int) -> str:
    """``sub-01_ses-2_T2w.nii.gz`` -> ``sub-01_ses-2_desc-sr2_T2w.nii.gz`` (BIDS derivative:
    ``desc`` before the suffix; an existing ``desc-`` entity is replaced)."""
    stem = nifti_stem(name)
    ext = name[len(stem):] or ".nii.gz"
    parts = stem.split("_")
    entities = [p for p in parts[:-1] if not p.startswith("desc-")]
    return "_".join([*entities, f"desc-sr{scale}", parts[-1]]) + ext


def _plain_name(name: str, scale: int) -> str:
    stem = nifti_stem(name)
    return f"{stem}_sr{scale}{name[len(stem):]}"


def plan_jobs(inp: str | Path, output: str | Path | None, scale: int, *,
              contrast: str = "T2", bids_suffix: str = "",
              overwrite: bool = False) -> tuple[list[SRJob], Path | None]:
    """The (input, output) pairs of one ``pgasr sr`` call, and the BIDS derivative root
    (None for other inputs).

    Raises:
        FileNotFoundError: the input does not exist.
        ValueError: bad combination (a folder to a file, no NIfTI found, output inside the
            input's own files) or outputs that exist while ``overwrite`` is off.
    """
    src = Path(inp)
    if not src.exists():
        raise FileNotFoundError(f"--input not found: {src}")
    deriv = None
    if src.is_file():
        if not src.name.endswith(_NIFTI):
            raise ValueError(f"--input must be a .nii/.nii.gz file, a folder or a BIDS dataset: {src}")
        if output is None:
            raise ValueError("--output is needed for a single input file (a .nii/.nii.gz path)")
        out = Path(output)
        if not out.name.endswith(_NIFTI):
            raise ValueError(f"--output must end in .nii or .nii.gz for a file input: {out}")
        jobs = [SRJob(src, out)]
    elif is_dicom_dir(src):
        if output is None or not Path(output).name.endswith(_NIFTI):
            raise ValueError(f"{src} holds a DICOM series: --output must be a .nii/.nii.gz file")
        jobs = [SRJob(src, Path(output))]
    elif detect_format(src) == "bids":
        deriv = Path(output) if output else src / "derivatives" / "pgasr"
        suffix = bids_suffix_for(contrast, bids_suffix)
        jobs = []
        for s in iter_sources(src, "bids", contrast, bids_suffix, read=False):
            rel = s._path.relative_to(src).parent  # sub-X/[ses-Y/]anat
            jobs.append(SRJob(s._path, deriv / rel / derivative_name(s.name, scale)))
        if not jobs:
            raise ValueError(f"no BIDS anat files with suffix '{suffix}' in {src} "
                             "(choose another with --contrast or --bids-suffix)")
    else:
        if output is None:
            raise ValueError("--output (a folder) is needed for a folder input")
        out = Path(output)
        if out.name.endswith(_NIFTI):
            raise ValueError(f"--output must be a folder for a folder input, got {out}")
        files = [p for p in nifti_files(src) if out.resolve() not in p.resolve().parents]
        if not files:
            raise ValueError(f"no .nii/.nii.gz files in {src}")
        jobs = [SRJob(p, out / p.relative_to(src).parent / _plain_name(p.name, scale))
                for p in files]
    for j in jobs:
        if j.output.resolve() == j.input.resolve():
            raise ValueError(f"--output would replace the input {j.input}")
    existing = [j.output for j in jobs if j.output.exists() or j.sidecar.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise ValueError(f"{len(existing)} output(s) exist: "
                         f"{', '.join(str(p) for p in existing[:3])}{more}; nothing was written. "
                         "Pass --overwrite to replace them.")
    return jobs, deriv


def read_input(path: Path) -> nib.Nifti1Image:
    """A job's input as an image: a NIfTI file, or the DICOM series in a folder."""
    from pgasr.data.ixi import read_nifti_file

    return read_dicom_series(path) if path.is_dir() else read_nifti_file(path)


def input_digest(path: Path) -> str:
    return series_digest(path) if path.is_dir() else sha256_file(path)


def checkpoint_digest(ckpt_dir: str | Path, meta: dict) -> str:
    """SHA-256 over the checkpoint's recorded file hashes (the same for the same weights and
    config wherever the directory lives); hashes the files when meta has none."""
    hashes = meta.get("sha256") or {
        f.name: sha256_file(f) for f in sorted(Path(ckpt_dir).iterdir()) if f.is_file()}
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def sidecar(job: SRJob, scale: int, model: dict, grid: dict) -> dict:
    """The JSON written beside an SR output (BIDS derivative sidecar fields + provenance)."""
    return {
        "Description": f"PGASR super-resolution x{scale}",
        "Sources": [str(job.input)],
        "SoftwareName": "pgasr",
        "SoftwareVersion": __version__,
        "Scale": scale,
        "Model": model,
        "InputSHA256": input_digest(job.input),
        "Grid": grid,
    }


def write_dataset_description(root: Path, source: Path) -> None:
    """The derivative dataset's ``dataset_description.json`` (BIDS 1.8 ``GeneratedBy``); an
    existing one is left as it is."""
    p = root / "dataset_description.json"
    if p.exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps({
        "Name": "PGASR super-resolution", "BIDSVersion": "1.8.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "pgasr", "Version": __version__}],
        "SourceDatasets": [{"URL": source.resolve().as_uri()}],
    }, indent=1) + "\n")


def model_record(pred, checkpoint: str | Path) -> dict:
    """What a sidecar says about the model (``pred``: a :class:`pgasr.inference.Predictor`)."""
    return {"checkpoint": str(Path(checkpoint).resolve()),
            "checkpoint_sha256": checkpoint_digest(checkpoint, pred.ckpt.meta),
            "prior_backend": pred.describe()["prior"].get("backend"),  # None: model.acg=false
            "trained_contrast": pred.ckpt.meta.get("contrast"),
            "trained_voxel_size": pred.ckpt.meta.get("voxel_size"),
            "inference": {k: getattr(pred.cfg.inference, k) for k in
                          ("back_projection_steps", "back_projection_weight", "background")}}


def run_sr_job(pred, job: SRJob, scale: int, model: dict, *, resample: bool = True,
               progress=None) -> dict:
    """Super-resolve one input of a plan: read it, bring it to the model's grid (unless
    ``resample`` is False), predict, write the output and its sidecar atomically.

    Args:
        pred: a :class:`pgasr.inference.Predictor`.
        job: from :func:`plan_jobs`.
        model: :func:`model_record` of ``pred``.
        progress: ``callback(done_slices, total_slices)``.

    Returns:
        ``{"input", "output", "shape", "output_voxel_size"}``.
    """
    from pgasr.volume import write_nifti

    img = read_input(job.input)
    img, grid = pred.to_model_grid(img, scale) if resample else (img, {})
    sr = pred.predict_image(img, scale, progress=progress)
    write_nifti(sr, job.output)
    grid["output_voxel_size"] = [round(float(z), 4) for z in sr.header.get_zooms()[:3]]
    atomic_write_text(job.sidecar, json.dumps(sidecar(job, scale, model, grid), indent=1) + "\n")
    return {"input": str(job.input), "output": str(job.output), "shape": list(sr.shape),
            "output_voxel_size": grid["output_voxel_size"]}
