"""Where ``pgasr prepare`` finds a cohort's volumes: IXI, any NIfTI folder, a file list, BIDS.

``data.source`` names one of (``data.source_format: auto`` tells them apart):

- ``ixi``: a directory or ``.tar`` of IXI files (``IXI002-Guys-0828-T2.nii.gz``); the
  contrast (``data.contrast``: T1, T2, PD) picks the files, the subject is ``IXI002``.
- ``bids``: a BIDS dataset (``dataset_description.json`` or ``sub-*/`` folders):
  ``sub-*/[ses-*/]anat/sub-*[_ses-*]_*<suffix>.nii[.gz]`` with the suffix from
  ``data.bids_suffix`` (default: the contrast + ``w``, e.g. ``T2w``). One volume per session;
  all sessions of a subject land in the same split.
- ``list``: a ``.csv``/``.tsv`` file with a ``path`` column (relative to the list's folder)
  and a ``subject`` column (optional: the subject is then read from the file name).
- ``glob``: a pattern such as ``scans/*/t2.nii.gz`` (relative to the working directory).
- ``nifti``: any other directory: every ``.nii``/``.nii.gz`` below it.

Outside IXI and BIDS, the subject is the BIDS ``sub-`` entity when the file name has one,
else the file name without its extension. Nothing is read here but names: a volume's bytes
are read when it is ingested (:meth:`VolumeSource.read_bytes`).
"""

from __future__ import annotations

import csv
import glob as globlib
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FORMATS", "VolumeSource", "bids_entities", "bids_suffix_for", "detect_format",
           "iter_sources", "nifti_files",
           "list_sources", "nifti_stem"]

FORMATS = ("auto", "ixi", "bids", "list", "glob", "nifti")
_IXI = re.compile(r"^(IXI\d+)-([A-Za-z]+)-(\d+)-(T1|T2|PD|MRA|DTI)\.nii(\.gz)?$")
_ENTITY = re.compile(r"(?:^|_)(sub|ses)-([A-Za-z0-9]+)")
_NIFTI = (".nii", ".nii.gz")
_GLOB_CHARS = set("*?[")


@dataclass
class VolumeSource:
    """One volume found in the input: who it belongs to and a way to read its bytes.

    ``subject`` decides the split (all of a subject's volumes share one); ``volume`` names the
    rows and exported files (the subject, plus ``_ses-X`` for a BIDS session).
    """

    subject: str
    name: str  # file name (or tar member name)
    origin: str  # directory / tar / list / pattern it came from
    volume: str = ""
    contrast: str = ""
    _data: bytes | None = None
    _path: Path | None = None

    def __post_init__(self):
        self.volume = self.volume or self.subject

    def read_bytes(self) -> bytes:
        if self._data is not None:
            return self._data
        assert self._path is not None
        return self._path.read_bytes()


def nifti_stem(name: str) -> str:
    """``sub-01_T2w`` for ``sub-01_T2w.nii.gz``; the name unchanged when it is not NIfTI."""
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def bids_entities(name: str) -> dict[str, str]:
    """``{"sub": "01", "ses": "2"}`` from ``sub-01_ses-2_T2w.nii.gz`` (absent entities left out)."""
    return {k: v for k, v in _ENTITY.findall(Path(name).name)}


def _is_nifti(p: Path) -> bool:
    return p.is_file() and p.name.endswith(_NIFTI) and not p.name.startswith(".")


def nifti_files(root: str | Path) -> list[Path]:
    """Every ``.nii``/``.nii.gz`` file below ``root`` (recursively), sorted; hidden files
    (``.name``, e.g. macOS ``._`` forks) are left out."""
    return sorted(q for q in Path(root).rglob("*.nii*") if _is_nifti(q))


def bids_suffix_for(contrast: str, bids_suffix: str = "") -> str:
    """The BIDS suffix to ingest: ``bids_suffix`` when given, else the contrast + ``w``
    (``T2`` -> ``T2w``; ``FLAIR`` stays ``FLAIR``)."""
    if bids_suffix:
        return bids_suffix
    return contrast if contrast.upper() == "FLAIR" else f"{contrast}w"


def detect_format(source: str | Path) -> str:
    """The :data:`FORMATS` entry that reads ``source`` (never ``auto``).

    Raises:
        FileNotFoundError: ``source`` is neither an existing path nor a glob pattern.
        ValueError: ``source`` is a file of another kind.
    """
    s = str(source)
    p = Path(s)
    if not p.exists():
        if _GLOB_CHARS & set(s):
            return "glob"
        raise FileNotFoundError(f"data source not found: {p}")
    if p.is_dir():
        if (p / "dataset_description.json").is_file() or any(
            q.is_dir() and q.name.startswith("sub-") for q in p.iterdir()
        ):
            return "bids"
        if any(_IXI.match(q.name) for q in p.rglob("IXI*")):
            return "ixi"
        return "nifti"
    if p.suffix.lower() in (".csv", ".tsv"):
        return "list"
    if tarfile.is_tarfile(p):
        return "ixi"
    raise ValueError(
        f"data source {p} is a file but not a .tar archive or a .csv/.tsv file list; give a "
        "directory (IXI, BIDS or any NIfTI folder), a tar of IXI files, a file list or a glob")


def _subject_of(path: Path) -> tuple[str, str]:
    """(subject, volume) for a file outside IXI/BIDS layouts."""
    ent = bids_entities(path.name)
    if "sub" in ent:
        sub = f"sub-{ent['sub']}"
        return sub, f"{sub}_ses-{ent['ses']}" if "ses" in ent else sub
    stem = nifti_stem(path.name)
    return stem, stem


def _ixi_dir(root: Path, contrast: str) -> Iterator[VolumeSource]:
    for p in sorted(root.rglob("*")):
        m = _IXI.match(p.name)
        if m and m.group(4) == contrast and p.is_file():
            yield VolumeSource(m.group(1), p.name, str(root), contrast=contrast, _path=p)


def _ixi_tar(path: Path, contrast: str, read: bool) -> Iterator[VolumeSource]:
    if not read:  # names only: the member table, no data
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                hit = _IXI.match(Path(m.name).name)
                if m.isfile() and hit and hit.group(4) == contrast:
                    yield VolumeSource(hit.group(1), Path(m.name).name, str(path), contrast=contrast)
        return
    with tarfile.open(path, mode="r|*") as tf:  # streamed: one member in memory at a time
        for m in tf:
            hit = _IXI.match(Path(m.name).name)
            if not (m.isfile() and hit and hit.group(4) == contrast):
                continue
            f = tf.extractfile(m)
            if f is not None:
                yield VolumeSource(hit.group(1), Path(m.name).name, str(path),
                                   contrast=contrast, _data=f.read())


def _bids(root: Path, suffix: str, contrast: str) -> Iterator[VolumeSource]:
    files = sorted(root.glob(f"sub-*/anat/*_{suffix}.nii*")) + sorted(
        root.glob(f"sub-*/ses-*/anat/*_{suffix}.nii*"))
    for p in sorted(set(files)):
        if not _is_nifti(p) or nifti_stem(p.name).split("_")[-1] != suffix:
            continue
        ent = bids_entities(p.name)
        sub = f"sub-{ent.get('sub') or p.relative_to(root).parts[0][4:]}"
        volume = sub + (f"_ses-{ent['ses']}" if "ses" in ent else "")
        rest = [e for e in nifti_stem(p.name).split("_")[:-1]
                if not e.startswith(("sub-", "ses-"))]  # acq-, run-, rec-: kept apart
        volume += "".join(f"_{e}" for e in rest)
        yield VolumeSource(sub, p.name, str(root), volume=volume, contrast=suffix, _path=p)


def _list(path: Path, contrast: str) -> Iterator[VolumeSource]:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=delim))
    if not rows or "path" not in rows[0]:
        raise ValueError(f"{path}: a file list needs a header with a 'path' column (and "
                         "optionally 'subject'); found "
                         f"{list(rows[0]) if rows else 'no rows'}")
    for i, row in enumerate(rows, start=2):
        rel = (row.get("path") or "").strip()
        if not rel:
            raise ValueError(f"{path}, line {i}: empty path")
        p = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        if not p.name.endswith(_NIFTI):
            raise ValueError(f"{path}, line {i}: {rel} is not a .nii/.nii.gz file")
        sub, vol = _subject_of(p)
        given = (row.get("subject") or "").strip()
        if given:
            sub = vol = given
        yield VolumeSource(sub, p.name, str(path), volume=vol, contrast=contrast, _path=p)


def _files(paths: list[Path], origin: str, contrast: str) -> Iterator[VolumeSource]:
    for p in paths:
        sub, vol = _subject_of(p)
        yield VolumeSource(sub, p.name, origin, volume=vol, contrast=contrast, _path=p)


def iter_sources(source: str | Path, fmt: str = "auto", contrast: str = "T2",
                 bids_suffix: str = "", read: bool = True) -> Iterator[VolumeSource]:
    """Yield the volumes of ``source`` in a stable order (see the module docstring).

    Args:
        source: directory, tar, file list or glob pattern.
        fmt: one of :data:`FORMATS`; ``auto`` = :func:`detect_format`.
        contrast: IXI contrast (T1, T2, PD); also the default BIDS suffix (``T2`` -> ``T2w``).
        bids_suffix: BIDS suffix to ingest (overrides the one derived from ``contrast``).
        read: for a tar, stream members with their bytes (False: the member table only).

    Raises:
        FileNotFoundError / ValueError: the source is missing or of no known kind.
    """
    if fmt not in FORMATS:
        raise ValueError(f"data.source_format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    kind = detect_format(source) if fmt == "auto" else fmt
    p = Path(source)
    if kind != "glob" and not p.exists():
        raise FileNotFoundError(f"data source not found: {p}")
    if kind == "ixi":
        if p.is_dir():
            yield from _ixi_dir(p, contrast)
        elif tarfile.is_tarfile(p):
            yield from _ixi_tar(p, contrast, read)
        else:
            raise ValueError(f"IXI source must be a directory or a .tar archive: {p}")
    elif kind == "bids":
        suffix = bids_suffix_for(contrast, bids_suffix)
        yield from _bids(p, suffix, suffix)
    elif kind == "list":
        yield from _list(p, contrast)
    elif kind == "glob":
        hits = sorted(Path(h) for h in globlib.glob(str(source), recursive=True))
        yield from _files([h for h in hits if _is_nifti(h)], str(source), contrast)
    else:  # nifti
        if not p.is_dir():
            raise ValueError(f"a NIfTI source must be a directory: {p}")
        yield from _files(nifti_files(p), str(p), contrast)


def list_sources(source: str | Path, fmt: str = "auto", contrast: str = "T2",
                 bids_suffix: str = "") -> list[VolumeSource]:
    """:func:`iter_sources` without reading any volume (names and subjects only)."""
    return list(iter_sources(source, fmt, contrast, bids_suffix, read=False))
