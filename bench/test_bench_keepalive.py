"""Keepalive's steady-state cost: session round trips with keepalive off and on, paired.

    pytest bench/test_bench_keepalive.py --benchmark-json=keepalive.json

A client and a server ``RpcSession`` over ``mem_pair()``, 64 calls in flight, 16-byte
echo, as ``test_bench_session.py``'s paired groups. Three variants run back to back in
every round, in a rotating order: keepalive off, on at the ``connect``/``serve`` default
(10 s: one batch counter bumped per received batch, a timer every 2.5 s), and on at
0.05 s (a timer every 12.5 ms: far more often than anyone would set it). What is
reported (``extra_info["keepalive"]``) is each variant's calls/s and the median of the
per-round ratios of its time to the time with keepalive off, with the 10th and 90th
percentiles: a ratio taken within one round is immune to this machine's drift, which
separate benchmarks seconds apart are not. Within noise means a ratio near 1.00 whose
p10..p90 spans it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_bench_session import IN_FLIGHT, LOOPS, METHOD_ID, _fan_out, new_loop, payloads

import rapace
from rapace import _impl

CALLS = IN_FLIGHT * 40
ROUNDS = 30
WARMUP = 3
VARIANTS: dict[str, float | None] = {"off": None, "10 s": 10.0, "0.05 s": 0.05}


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    loop = new_loop(request.param)
    try:
        yield loop
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class KeepalivePair:
    """Client and server sessions of one twin over ``mem_pair()``, with one keepalive."""

    def __init__(self, core_name: str, keepalive: float | None) -> None:
        self.twin = _impl.load_twin(core_name)  # type: ignore[arg-type]  # ImportError fails
        a, b = rapace.mem_pair()
        with _impl.using(self.twin):
            self.client = rapace.RpcSession(a, 1, keepalive=keepalive)
            self.server = rapace.RpcSession(b, 2, keepalive=keepalive, keepalive_probe=False)

        async def echo(frame: Any) -> bytes:
            return frame.payload  # type: ignore[no-any-return]

        self.server.set_dispatcher(echo)

    async def start(self) -> None:
        self.client.start()
        self.server.start()
        await asyncio.sleep(0)

    async def stop(self) -> None:
        await self.client.aclose()
        await self.server.aclose()

    def batch(self, calls: list[bytes]) -> Any:
        call = self.client.call
        next_channel_id = self.client.next_channel_id

        async def caller(mine: list[bytes]) -> int:
            for payload in mine:
                response = await call(next_channel_id(), METHOD_ID, payload)
                if response.payload != payload:
                    raise AssertionError("a response carried another call's payload")
            return len(mine)

        return _fan_out(caller, calls, IN_FLIGHT, len(calls) // IN_FLIGHT)


@pytest.mark.parametrize("impl", ["cython", "python"])
def test_keepalive_paired(benchmark: Any, loop: asyncio.AbstractEventLoop, impl: str) -> None:
    loop_name = "uvloop" if "uvloop" in type(loop).__module__ else "asyncio"
    benchmark.group = f"keepalive paired: {impl}, 16 B, {IN_FLIGHT} in flight, {loop_name} loop"
    calls = payloads(CALLS, 16)
    pairs = {name: KeepalivePair(impl, seconds) for name, seconds in VARIANTS.items()}
    batches = {}
    for name, pair in pairs.items():
        loop.run_until_complete(pair.start())
        batches[name] = loop.run_until_complete(_make(pair, calls))
    times: dict[str, list[float]] = {name: [] for name in pairs}
    order = list(pairs)

    def one_round() -> None:
        order.append(order.pop(0))  # rotate: no variant always runs first
        for name in order:
            started = time.perf_counter()
            done = loop.run_until_complete(batches[name]())
            times[name].append(time.perf_counter() - started)
            assert done == CALLS

    try:
        benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=WARMUP)
        for pair in pairs.values():
            assert not pair.client.is_closed and pair.client.pending_channel_ids() == []
    finally:
        for pair in pairs.values():
            loop.run_until_complete(pair.stop())
    off = times["off"][-ROUNDS:]
    report: dict[str, Any] = {"calls": CALLS, "off": CALLS / statistics.median(off)}
    for name in ("10 s", "0.05 s"):
        on = times[name][-ROUNDS:]
        ratios = sorted(t_on / t_off for t_on, t_off in zip(on, off, strict=True))
        report[name] = {
            "calls_per_s": CALLS / statistics.median(on),
            "time_ratio": statistics.median(ratios),
            "p10": ratios[len(ratios) // 10],
            "p90": ratios[-1 - len(ratios) // 10],
        }
    benchmark.extra_info["keepalive"] = report


async def _make(pair: KeepalivePair, calls: list[bytes]) -> Any:
    return pair.batch(calls)
