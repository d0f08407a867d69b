"""Benchmark session setup: a heap that stays put between rounds.

A decode round allocates about 1 MB of payloads and frees it all. glibc hands freed memory
at the top of the heap back to the kernel (beyond 128 KiB), so the next round page-faults
it in again: about 0.5 ms of kernel time per round, the same for both twins, that swamps
the compiled decoder's 0.1 ms and moves with heap layout from run to run. Raising the
trim threshold makes the benchmarks measure the codec, not the page faults.
"""

from __future__ import annotations

import ctypes
import sys

import pytest

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter number


def pytest_configure(config: pytest.Config) -> None:
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:  # glibc has it; not every libc does
        mallopt(M_TRIM_THRESHOLD, 1 << 30)
