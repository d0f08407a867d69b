"""What the floor and the rapace children share: message shapes, measurement loops, reports.

Both sides run the very same loops over an ``echo(payload) -> bytes`` coroutine and a bulk
``send(total_bytes) -> confirmed_bytes`` coroutine, so the only difference between a floor
figure and a rapace figure is the protocol stack under those two callables. Every echo is
compared with what was sent and every bulk transfer with the receiver's count: a broken
path raises ``BenchError`` instead of reporting a number.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import rapace

__all__ = [
    "CHUNK_SIZE",
    "CONCURRENCY",
    "PAYLOAD_SIZE",
    "BenchError",
    "BulkSend",
    "EchoCall",
    "Workload",
    "bulk_chunk",
    "child_info",
    "emit",
    "measure_bulk",
    "measure_inflight",
    "measure_sequential",
]

PAYLOAD_SIZE: Final = 16
"""Bytes per echo payload: small enough to travel inline in a rapace descriptor."""

CONCURRENCY: Final = 64
"""Calls (or raw messages) in flight at once in the throughput measurement."""

CHUNK_SIZE: Final = 64 * 1024
"""Bytes per tunnel chunk and per raw bulk message."""

_ECHO_PAYLOAD: Final = struct.Struct("<Q8s")
_PAYLOAD_TAG: Final = b"rapace:)"

EchoCall = Callable[[bytes], Awaitable[bytes]]
"""Send one payload, return the peer's echo of it."""

BulkSend = Callable[[int], Awaitable[int]]
"""Send that many bytes in ``CHUNK_SIZE`` pieces; return how many the peer says it received."""


class BenchError(RuntimeError):
    """A measurement could not be trusted (wrong echo, lost bytes) or a child failed."""


@dataclass(frozen=True)
class Workload:
    """How much each measurement does; ``--quick`` and the full run differ only here."""

    calls: int
    inflight_calls: int
    tunnel_mib: int

    @property
    def warmup_calls(self) -> int:
        """Calls before the sequential samples, so imports, caches and the allocator settle."""
        return min(1000, max(20, self.calls // 4))

    @property
    def tunnel_bytes(self) -> int:
        return self.tunnel_mib * 1024 * 1024

    def to_args(self) -> list[str]:
        """The same workload as ``bench-client`` options."""
        return [
            f"--calls={self.calls}",
            f"--inflight-calls={self.inflight_calls}",
            f"--tunnel-mib={self.tunnel_mib}",
        ]


def _payload(index: int) -> bytes:
    """Each call's own payload, so a reply delivered to the wrong caller is caught."""
    return _ECHO_PAYLOAD.pack(index, _PAYLOAD_TAG)


def bulk_chunk() -> bytes:
    """One ``CHUNK_SIZE`` chunk of varied bytes (no all-zero page a layer could special-case)."""
    return bytes(range(256)) * (CHUNK_SIZE // 256)


def _percentile(sorted_ns: list[int], percent: float) -> float:
    """Nearest-rank percentile of sorted nanosecond samples, in microseconds."""
    rank = max(1, math.ceil(percent / 100 * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1000


async def measure_sequential(echo: EchoCall, workload: Workload) -> dict[str, float]:
    """One call at a time: the latency of a round trip, p50 and p99."""
    for index in range(workload.warmup_calls):
        payload = _payload(index)
        if await echo(payload) != payload:
            raise BenchError("warm-up echo came back different from what was sent")
    clock = time.perf_counter_ns
    samples = [0] * workload.calls
    for index in range(workload.calls):
        payload = _payload(index)
        started = clock()
        reply = await echo(payload)
        samples[index] = clock() - started
        if reply != payload:
            raise BenchError(f"sequential echo {index} came back different from what was sent")
    samples.sort()
    return {
        "calls": workload.calls,
        "p50_us": _percentile(samples, 50),
        "p99_us": _percentile(samples, 99),
        "mean_us": sum(samples) / len(samples) / 1000,
    }


async def measure_inflight(echo: EchoCall, workload: Workload) -> dict[str, float]:
    """``CONCURRENCY`` callers, each issuing its next call as soon as its last one returns."""

    async def caller(first: int, count: int) -> None:
        for index in range(first, first + count):
            payload = _payload(index)
            if await echo(payload) != payload:
                raise BenchError(f"echo {index} (of {CONCURRENCY} in flight) came back wrong")

    total = workload.inflight_calls
    share, extra = divmod(total, CONCURRENCY)
    counts = [share + (1 if i < extra else 0) for i in range(CONCURRENCY)]
    firsts = [sum(counts[:i]) for i in range(CONCURRENCY)]
    started = time.perf_counter()
    await asyncio.gather(*(caller(f, c) for f, c in zip(firsts, counts, strict=True) if c))
    elapsed = time.perf_counter() - started
    return {
        "calls": total,
        "concurrency": CONCURRENCY,
        "elapsed_s": elapsed,
        "calls_per_s": total / elapsed,
    }


async def measure_bulk(send: BulkSend, workload: Workload) -> dict[str, float]:
    """Bytes/s from the first chunk sent until the receiver confirms it has every byte."""
    total = workload.tunnel_bytes
    started = time.perf_counter()
    confirmed = await send(total)
    elapsed = time.perf_counter() - started
    if confirmed != total:
        raise BenchError(f"sent {total} bytes but the receiver counted {confirmed}")
    return {
        "bytes": total,
        "chunk_size": CHUNK_SIZE,
        "elapsed_s": elapsed,
        "bytes_per_s": total / elapsed,
    }


def child_info() -> dict[str, Any]:
    """What a child reports about itself: its rapace core, its loop and its pid."""
    loop = asyncio.get_running_loop()
    return {
        "implementation": rapace.IMPLEMENTATION,
        "loop": type(loop).__module__.partition(".")[0],
        "pid": os.getpid(),
    }


def emit(report: dict[str, Any]) -> None:
    """Hand a report to the driver: one JSON line on stdout, which carries nothing else."""
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
