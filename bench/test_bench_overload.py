"""Overload: 64 clients flooding a server at twice its capacity, compiled server vs pure.

    pytest bench/test_bench_overload.py -s

The server (a child process, on the twin under test, uvloop) answers each call after
about 0.3 ms of CPU work, so its capacity is bounded by one core. First the capacity is
measured closed-loop (64 clients, 4 calls in flight each, for a second); then 64 clients
send calls open-loop at twice that rate for three seconds, each call with a 2 s deadline.
The table: capacity, offered and served calls/s, the p50/p99 latency of served calls, and
refused and timed-out calls/s. Every call sent is accounted for (served, refused with an
error, or timed out): none vanishes. The clients run in this process on the selected
twin, the same for both rows, so the rows compare servers.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import pytest

import rapace
from rapace.runner import uvloop_factory

CLIENTS = 64
WORK = rapace.wire.compute_method_id("Overload", "work")

SERVER = """
import asyncio, sys
import rapace

WORK = rapace.wire.compute_method_id("Overload", "work")

def spin(n):
    total = 0
    for i in range(n):
        total += i
    return total

async def handler(frame):
    spin(6000)  # about 0.3 ms of CPU: the server's capacity is one core's worth of these
    return bytes(frame.payload)

async def main(address):
    def on_session(session):
        session.set_dispatcher(handler)

    async with rapace.serve(on_session, address) as server:
        print(rapace.IMPLEMENTATION, flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the benchmark closes stdin

rapace.run(main(sys.argv[1]))
"""


class Outcomes:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.refused = 0
        self.timed_out = 0
        self.sent = 0


async def _call(session: rapace.RpcSession, outcomes: Outcomes, timeout: float) -> None:
    started = time.perf_counter()
    try:
        await session.call(session.next_channel_id(), WORK, b"x" * 32, timeout=timeout)
    except rapace.DeadlineExceeded:
        outcomes.timed_out += 1
    except (rapace.ResourceExhausted, rapace.Unavailable):
        outcomes.refused += 1
    else:
        outcomes.latencies.append(time.perf_counter() - started)


async def _capacity(sessions: list[rapace.RpcSession], seconds: float) -> float:
    """Closed loop: calls/s with every client keeping 4 calls in flight."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(session: rapace.RpcSession) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await session.call(session.next_channel_id(), WORK, b"x" * 32, timeout=10)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(s) for s in sessions for _ in range(4)))
    return done / (time.perf_counter() - started)


async def _flood(sessions: list[rapace.RpcSession], rate: float, seconds: float) -> Outcomes:
    """Open loop: calls started on schedule at ``rate``, whatever the server does."""
    outcomes = Outcomes()
    tasks: list[asyncio.Task[None]] = []
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        due = int(elapsed * rate)
        while outcomes.sent < due:
            session = sessions[outcomes.sent % len(sessions)]
            tasks.append(asyncio.ensure_future(_call(session, outcomes, timeout=2.0)))
            outcomes.sent += 1
        await asyncio.sleep(0.001)
    await asyncio.gather(*tasks)
    return outcomes


def _measure(address: str, seconds: float) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        sessions = [await rapace.connect(address, call_timeout=10) for _ in range(CLIENTS)]
        try:
            capacity = await _capacity(sessions, min(1.0, seconds))
            outcomes = await _flood(sessions, 2 * capacity, seconds)
        finally:
            for session in sessions:
                await session.aclose()
        served = sorted(outcomes.latencies)
        return {
            "capacity": capacity,
            "offered": outcomes.sent / seconds,
            "served": len(served) / seconds,
            "p50_ms": statistics.median(served) * 1e3 if served else float("nan"),
            "p99_ms": served[int(len(served) * 0.99)] * 1e3 if served else float("nan"),
            "refused": outcomes.refused / seconds,
            "timed_out": outcomes.timed_out / seconds,
            "accounted": len(served) + outcomes.refused + outcomes.timed_out == outcomes.sent,
        }

    with asyncio.Runner(loop_factory=uvloop_factory()) as runner:
        return runner.run(main())


ROWS: dict[str, dict[str, Any]] = {}


@pytest.mark.parametrize("twin", ["cython", "python"])
def test_flood_at_twice_capacity(twin: str, request: pytest.FixtureRequest, tmp_path: Any) -> None:
    seconds = 0.5 if request.config.getoption("benchmark_disable") else 3.0
    env = dict(os.environ)
    env.pop("RAPACE_NO_EXTENSIONS", None)
    if twin == "python":
        env["RAPACE_NO_EXTENSIONS"] = "1"
    address = f"unix:{tmp_path}/overload.sock"
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().decode().strip() == twin  # the server's own core
        row = _measure(address, seconds)
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)
    assert row["accounted"], row  # every call sent was served, refused or timed out
    assert row["served"] > 0, row
    ROWS[twin] = row
    if len(ROWS) == 2:
        _print_table()


def _print_table() -> None:
    print(f"\noverload: {CLIENTS} clients at 2x capacity, server on each twin (uvloop)")
    header = "twin     capacity/s  offered/s  served/s  p50 ms  p99 ms  refused/s  timed out/s"
    print(header)
    for twin, r in ROWS.items():
        print(
            f"{twin:<8} {r['capacity']:>10,.0f} {r['offered']:>10,.0f} {r['served']:>9,.0f} "
            f"{r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['refused']:>10,.0f} "
            f"{r['timed_out']:>12,.0f}"
        )
