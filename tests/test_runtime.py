"""pgasr.runtime: the glibc allocator settings that keep large freed blocks in the heap."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from pgasr.runtime import tune_allocator
    state = tune_allocator()
    def step():  # three 64 MiB activations alive at once, then freed: a training step's shape
        a = torch.ones(16 << 20)
        b = torch.ones(16 << 20)
        c = a + b
        del a, b, c
    for _ in range(5):  # the heap grows to its working size
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(state["allocator"], faults)
""")


def _run(env_value: str) -> tuple[str, int]:
    import os

    env = {**os.environ, "PGASR_MALLOC_TUNING": env_value}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env=env, check=True, timeout=120).stdout.split()
    return out[-2], int(out[-1])


def test_tuned_allocator_reuses_large_blocks():
    """Tuned, re-allocated 64 MiB tensors reuse heap pages; default glibc maps them afresh on
    every allocation (16k page faults per 64 MiB of 4 KiB pages)."""
    state, faults = _run("1")
    if state != "glibc-tuned":  # not glibc (musl / macOS): nothing to tune, nothing to test
        assert state == "default"
        return
    state_off, faults_off = _run("0")
    assert state_off == "default"
    assert faults_off > 10 * 3 * 10_000, faults_off  # above glibc's 32 MiB dynamic cap: mapped afresh
    assert faults * 10 < faults_off, (faults, faults_off)
