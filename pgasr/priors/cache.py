"""On-disk prior cache keyed by slice content, backend and parameters.

Layout::

    <cache_dir>/<backend>-<params hash[:16]>/identity.json       # what the namespace holds
    <cache_dir>/<backend>-<params hash[:16]>/<key[:2]>/<key>.npy # (H, W) float16 prior

``key`` is the SHA-256 of the slice's shape and float32 bytes (:func:`slice_key`), so a
slice shared by neighbouring triplet rows, or seen again in a rerun, is computed once, and
any change of backend or of a parameter that affects the output (``prior.identity()``)
lands in a new namespace and recomputes.

Writers are safe to run concurrently (several Ray actors, several nodes on a shared
filesystem): every file is written to a unique temporary name in the target directory and
``os.replace``-d into place, which is atomic on POSIX, so a reader sees either no file or a
complete one. Two writers of the same key write identical bytes; the last rename wins. A
file that cannot be read (e.g. a disk filled up mid-write of an older version) counts as a
miss and is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pgasr.priors.base import PRIOR_DTYPE, Prior, check_slices

log = logging.getLogger("pgasr.priors")


def slice_key(slice_: np.ndarray) -> str:
    """Content hash of one slice: SHA-256 of ``"HxW"`` and its float32 C-order bytes."""
    a = np.ascontiguousarray(slice_, dtype=np.float32)
    h = hashlib.sha256(f"{a.shape[0]}x{a.shape[1]}:".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def namespace(identity: dict[str, Any]) -> str:
    """Directory name for a prior identity: ``<backend>-<sha256(params json)[:16]>``."""
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return f"{identity.get('backend', 'prior')}-{hashlib.sha256(blob).hexdigest()[:16]}"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PriorCache:
    """Directory of cached priors for one prior identity.

    Args:
        cache_dir: root directory (created on first write).
        identity: ``prior.identity()`` -- backend and output-affecting parameters.
    """

    def __init__(self, cache_dir: str | Path, identity: dict[str, Any]):
        self.root = Path(cache_dir).expanduser()
        self.identity = identity
        self.dir = self.root / namespace(identity)
        self._identity_written = False

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    def get(self, key: str, shape: tuple[int, int] | None = None) -> np.ndarray | None:
        """The cached (H, W) float16 prior, or None (missing, unreadable or wrong shape)."""
        p = self.path(key)
        try:
            arr = np.load(p, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as e:
            log.warning("prior cache: unreadable %s (%s); recomputing", p, e)
            return None
        if arr.dtype != PRIOR_DTYPE or arr.ndim != 2 or (shape and arr.shape != tuple(shape)):
            log.warning("prior cache: unexpected %s %s in %s; recomputing", arr.dtype, arr.shape, p)
            return None
        return arr

    def put(self, key: str, prior: np.ndarray) -> None:
        """Store one (H, W) prior atomically (as float16)."""
        if not self._identity_written:
            ident = self.dir / "identity.json"
            if not ident.exists():
                _atomic_write(ident, lambda f: f.write(
                    json.dumps(self.identity, indent=2, sort_keys=True).encode()))
            self._identity_written = True
        arr = np.ascontiguousarray(prior, dtype=PRIOR_DTYPE)
        _atomic_write(self.path(key), lambda f: np.save(f, arr, allow_pickle=False))

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("??/*.npy")) if self.dir.is_dir() else 0


@dataclass
class CacheStats:
    """Counters of a :class:`CachedPrior` (slices, not batches)."""

    requested: int = 0  # slices asked for
    unique: int = 0  # distinct slices among them (per call)
    hits: int = 0  # distinct slices found in the cache
    computed: int = 0  # distinct slices run through the backend

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class CachedPrior:
    """A prior backend behind a :class:`PriorCache`; same call contract as the backend.

    Within one call, identical slices are computed once; across calls and processes the
    disk cache is consulted first. ``describe()`` / ``identity()`` delegate to the backend.

    Args:
        prior: the backend.
        cache_dir: cache root; ``None`` disables the disk cache (in-call dedup remains).
    """

    def __init__(self, prior: Prior, cache_dir: str | Path | None):
        self.prior = prior
        self.cache = PriorCache(cache_dir, prior.identity()) if cache_dir else None
        self.stats = CacheStats()

    @property
    def name(self) -> str:
        return self.prior.name

    def identity(self) -> dict[str, Any]:
        return self.prior.identity()

    def describe(self) -> dict[str, Any]:
        d = self.prior.describe()
        d["runtime"] = {**d.get("runtime", {}),
                        "cache_dir": str(self.cache.root) if self.cache is not None else None}
        return d

    def __call__(self, slices: np.ndarray) -> np.ndarray:
        """(B, H, W) float -> (B, H, W) float16 priors, computing only unseen slices."""
        arr = check_slices(slices)
        b, h, w = arr.shape
        keys = [slice_key(s) for s in arr]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        found: dict[str, np.ndarray] = {}
        if self.cache is not None:
            for k in first:
                hit = self.cache.get(k, (h, w))
                if hit is not None:
                    found[k] = hit
        todo = [k for k in first if k not in found]
        if todo:
            computed = self.prior(arr[[first[k] for k in todo]])  # (n, H, W) float16
            for k, p in zip(todo, computed):
                found[k] = p
                if self.cache is not None:
                    self.cache.put(k, p)
        self.stats.requested += b
        self.stats.unique += len(first)
        self.stats.hits += len(first) - len(todo)
        self.stats.computed += len(todo)
        out = np.empty((b, h, w), dtype=PRIOR_DTYPE)
        for i, k in enumerate(keys):
            out[i] = found[k]
        return out
