"""Process settings that make CPU training and inference steps fast.

glibc's ``malloc`` serves every block above ``M_MMAP_THRESHOLD`` (at most 32 MiB under its
dynamic rule) with a fresh ``mmap`` and unmaps it on ``free``. PyTorch's CPU allocator has no
cache of its own, so every large activation (stage 2's code distributions at f = 1 are
(B, N, H, W) float32 per triplet member: 19 MiB at 8 x 48^2, 57 MiB for a triplet) costs a page fault per 4 KiB page, every step,
in every op. :func:`tune_allocator` raises the mmap threshold and the trim threshold so freed
blocks stay in the heap and are reused: measured on the demo model at f = 1, a stage-2 step
goes from 3.6 s to 1.8 s (``benchmarks/step_efficiency.py``, docs/training.md). It is the
glibc counterpart of PyTorch's CPU performance advice to preload jemalloc / tcmalloc, without
an extra library.

The cost: a process keeps up to ``trim`` bytes of freed memory instead of returning it to the
OS. Training workers and ``pgasr sr`` call this; Serve replicas do not (their memory is
budgeted from the request caps). ``PGASR_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameter numbers (glibc malloc.h); mallopt takes a C int value
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_INT_MAX = 2**31 - 1

_STATE: dict[str, object] = {}


def tune_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = _INT_MAX,
                   top_pad: int = 64 << 20) -> dict[str, object]:
    """Keep large freed blocks in the heap (glibc only; idempotent).

    Returns a description for run metadata: ``{"allocator": "glibc-tuned" | "default",
    "reason": ...}``.
    """
    if not all(0 <= v <= _INT_MAX for v in (mmap_threshold, trim_threshold, top_pad)):
        raise ValueError("allocator thresholds must be in [0, 2**31 - 1] (mallopt takes an int)")
    if _STATE:
        return dict(_STATE)
    if os.environ.get("PGASR_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        _STATE.update(allocator="default", reason="PGASR_MALLOC_TUNING=0")
        return dict(_STATE)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:  # musl, macOS, Windows: nothing to tune
        _STATE.update(allocator="default", reason=f"no glibc mallopt ({e})")
        return dict(_STATE)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, mmap_threshold),
                                              (_M_TRIM_THRESHOLD, trim_threshold),
                                              (_M_TOP_PAD, top_pad)))
    if ok:
        _STATE.update(allocator="glibc-tuned", mmap_threshold=mmap_threshold,
                      trim_threshold=trim_threshold)
        log.debug("glibc malloc tuned: mmap threshold %d, trim threshold %d",
                  mmap_threshold, trim_threshold)
    else:
        _STATE.update(allocator="default", reason="mallopt refused the settings")
        log.info("glibc mallopt refused the allocator settings; using the defaults")
    return dict(_STATE)
