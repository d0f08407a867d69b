"""Benchmark session setup: a heap that stays put between rounds, and a rate table.

A decode round allocates about 1 MB of payloads and frees it all. glibc hands freed memory
at the top of the heap back to the kernel (beyond 128 KiB), so the next round page-faults
it in again: about 0.5 ms of kernel time per round, the same for both twins, that swamps
the compiled decoder's 0.1 ms and moves with heap layout from run to run. Raising the
trim threshold makes the benchmarks measure the codec, not the page faults.

pytest-benchmark reports seconds per round. A benchmark that puts a count of work items
in ``extra_info`` (``"calls"``, ``"frames"``) also gets a line in a second table with that
count divided by the median: calls/s or frames/s, side by side per group, and each row's
speed relative to the slowest row of its group. A paired benchmark (``extra_info["paired"]``,
both twins timed in every round) gets a line in a third table: each twin's calls/s and the
median of the per-round ratios.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import pytest

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter number
RATE_UNITS = ("calls", "frames")


def pytest_configure(config: pytest.Config) -> None:
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:  # glibc has it; not every libc does
        mallopt(M_TRIM_THRESHOLD, 1 << 30)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    benchmarks = getattr(session, "benchmarks", None) or []
    groups: dict[str, list[tuple[str, float, float, str]]] = {}
    for bench in benchmarks:
        unit = next((u for u in RATE_UNITS if u in bench.extra_info), None)
        median = getattr(bench.stats, "median", None) if bench.stats else None
        if unit is None or not median:
            continue
        count = bench.extra_info[unit]
        groups.setdefault(bench.group or "", []).append((bench.name, median, count / median, unit))
    write = terminalreporter.write_line
    _paired_table(write, benchmarks)
    if not groups:
        return
    write("")
    write("rates (work items per second of the median round)", bold=True)
    for group, rows in sorted(groups.items()):
        slowest = min(rate for _, _, rate, _ in rows)
        write(f"-- {group}")
        for name, median, rate, unit in sorted(rows, key=lambda row: -row[2]):
            write(
                f"   {name:<60} {median * 1e3:10.3f} ms  {rate:>12,.0f} {unit}/s"
                f"  {rate / slowest:6.2f}x"
            )


def _paired_table(write: Any, benchmarks: list[Any]) -> None:
    """The paired benchmarks: each twin's calls/s and the median per-round ratio."""
    rows = [(b.group or "", b.extra_info["paired"]) for b in benchmarks if "paired" in b.extra_info]
    if not rows:
        return
    write("")
    write("paired twins (both in every round; ratio = compiled speed / pure speed)", bold=True)
    for group, paired in sorted(rows, key=lambda row: row[0]):
        write(
            f"   {group:<52} compiled {paired['cython']:>10,.0f} calls/s"
            f"  pure {paired['python']:>10,.0f} calls/s"
            f"  ratio {paired['ratio']:.2f}"
            f" [p10 {paired['ratio_p10']:.2f}, p90 {paired['ratio_p90']:.2f}]"
        )
