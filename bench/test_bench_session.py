"""Session round trips over ``mem_pair()``: the compiled core, the pure core and two floors.

    pytest bench/test_bench_session.py --benchmark-group-by=group \\
        --benchmark-columns=median,ops,rounds

A client ``RpcSession`` (odd channels) calls a server ``RpcSession`` (even channels) whose
dispatcher echoes the payload, both in one event loop over the in-memory transport. Each
round makes ``extra_info["calls"]`` calls, so calls/s = calls / median. Two shapes:

- *sequential*: one call at a time (latency: every hop of the round trip is paid in full);
- *64 in flight*: 64 callers at once, the mem transport's window (throughput: frames
  travel and are routed in batches).

Two floors, with no rapace at all:

- ``floor``: a caller puts ``(future, payload)`` on an ``asyncio.Queue``, one server task
  echoes by resolving the future (the least asyncio can do for a round trip);
- ``skeleton``: the asyncio shape of a session round trip, nothing else: a future per
  call, a ``Task`` per request (eager on 3.12+, as the session's), each direction's
  messages handed over in one loop callback per batch. What asyncio itself costs per
  call, paid alike by both twins; the gap from it to a core is the session's own cost.

The *paired* groups run the compiled and the pure pair back to back in every round and
report each twin's median and the median of the per-round ratios (with its 10th and 90th
percentiles). Separate benchmarks run seconds apart, and this shared machine's speed
drifts by up to 1.7x over seconds; a ratio taken within each round does not.

Every call checks its response (each call sends a distinct payload), so a broken core
fails instead of timing nothing. A compiled core that does not import is an error, never
a skip. Each runs on asyncio's own loop and on uvloop (what ``rapace.run()`` uses when it
is installed); ``RAPACE_BENCH_LOOPS=asyncio`` (or ``uvloop``) keeps one.

The ``demux`` groups time the routing switch alone (no loop, no session): the part of a
round trip the compiled twin replaces.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

import rapace
from rapace import _impl

METHOD_ID = 0x3E895C50  # Echo.echo
IN_FLIGHT = 64
SEQUENTIAL_CALLS = 2_000
CONCURRENT_CALLS = IN_FLIGHT * 40
ROUNDS = 15
PAIRED_ROUNDS = 40
PAIRED_WARMUP = 3
PAYLOAD_SIZES = {"16 B": 16, "1 KiB": 1024}
LOOPS = [
    name.strip()
    for name in os.environ.get("RAPACE_BENCH_LOOPS", "asyncio,uvloop").split(",")
    if name.strip()
]

Batch = Callable[[], Awaitable[int]]


def payloads(count: int, size: int) -> list[bytes]:
    """``count`` distinct payloads of ``size`` bytes (a misrouted response shows)."""
    return [(i.to_bytes(4, "little") * (size // 4 + 1))[:size] for i in range(count)]


def new_loop(kind: str = "asyncio") -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")  # a loop, not a twin: skipping is fine
        return uvloop.new_event_loop()  # type: ignore[no-any-return]
    return asyncio.new_event_loop()


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    loop = new_loop(request.param)
    try:
        yield loop
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# -- what is measured ----------------------------------------------------------------------


class SessionPair:
    """Client and server sessions of one core over ``mem_pair()``, running."""

    def __init__(self, core_name: str) -> None:
        self.twin = _impl.load_twin(core_name)  # type: ignore[arg-type]  # ImportError fails
        a, b = rapace.mem_pair()
        with _impl.using(self.twin):
            self.client = rapace.RpcSession(a, 1)
            self.server = rapace.RpcSession(b, 2)

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

    def batches(self, calls: list[bytes], callers: int) -> Batch:
        client = self.client
        call = client.call
        next_channel_id = client.next_channel_id
        per_caller = len(calls) // callers

        async def caller(mine: list[bytes]) -> int:
            for payload in mine:
                response = await call(next_channel_id(), METHOD_ID, payload)
                if response.payload != payload:
                    raise AssertionError("a response carried another call's payload")
            return len(mine)

        return _fan_out(caller, calls, callers, per_caller)


class Floor:
    """No rapace: a queue to a server task that answers by resolving the caller's future."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[tuple[asyncio.Future[bytes], bytes]] | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        requests: asyncio.Queue[tuple[asyncio.Future[bytes], bytes]] = asyncio.Queue()
        self.requests = requests

        async def serve() -> None:
            get = requests.get
            while True:
                waiter, payload = await get()
                if not waiter.done():
                    waiter.set_result(payload)

        self.task = asyncio.get_running_loop().create_task(serve())
        await asyncio.sleep(0)

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def batches(self, calls: list[bytes], callers: int) -> Batch:
        assert self.requests is not None
        put = self.requests.put_nowait
        create_future = asyncio.get_running_loop().create_future
        per_caller = len(calls) // callers

        async def caller(mine: list[bytes]) -> int:
            for payload in mine:
                waiter = create_future()
                put((waiter, payload))
                if await waiter != payload:
                    raise AssertionError("a response carried another call's payload")
            return len(mine)

        return _fan_out(caller, calls, callers, per_caller)


class Skeleton:
    """A session round trip's asyncio shape with nothing of rapace (see the module doc)."""

    def __init__(self) -> None:
        self.waiters: dict[int, asyncio.Future[bytes]] = {}
        self.to_server: collections.deque[tuple[int, bytes]] = collections.deque()
        self.to_client: collections.deque[tuple[int, bytes]] = collections.deque()
        self.server_due = self.client_due = False
        self.next_channel = 1

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        assert not self.waiters

    def deliver_to_server(self) -> None:
        self.server_due = False
        requests = list(self.to_server)
        self.to_server.clear()
        for channel, payload in requests:
            if sys.version_info >= (3, 12):
                asyncio.Task(self.serve(channel, payload), loop=self.loop, eager_start=True)
            else:
                asyncio.Task(self.serve(channel, payload), loop=self.loop)

    def deliver_to_client(self) -> None:
        self.client_due = False
        responses = list(self.to_client)
        self.to_client.clear()
        for channel, payload in responses:
            self.waiters.pop(channel).set_result(payload)

    async def serve(self, channel: int, payload: bytes) -> None:
        result = await self.handler(payload)
        self.to_client.append((channel, result))
        if not self.client_due:
            self.client_due = True
            self.loop.call_soon(self.deliver_to_client)

    async def handler(self, payload: bytes) -> bytes:
        return payload

    async def call(self, payload: bytes) -> bytes:
        channel = self.next_channel
        self.next_channel += 2
        waiter = self.waiters[channel] = self.loop.create_future()
        self.to_server.append((channel, payload))
        if not self.server_due:
            self.server_due = True
            self.loop.call_soon(self.deliver_to_server)
        return await waiter

    def batches(self, calls: list[bytes], callers: int) -> Batch:
        call = self.call
        per_caller = len(calls) // callers

        async def caller(mine: list[bytes]) -> int:
            for payload in mine:
                if await call(payload) != payload:
                    raise AssertionError("a response carried another call's payload")
            return len(mine)

        return _fan_out(caller, calls, callers, per_caller)


def _fan_out(
    caller: Callable[[list[bytes]], Awaitable[int]],
    calls: list[bytes],
    callers: int,
    per_caller: int,
) -> Batch:
    if callers == 1:

        async def batch() -> int:
            return await caller(calls)

    else:
        shares = [calls[i * per_caller : (i + 1) * per_caller] for i in range(callers)]

        async def batch() -> int:
            return sum(await asyncio.gather(*(caller(share) for share in shares)))

    return batch


# -- the benchmarks ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["cython", "python", "skeleton", "floor"])
@pytest.mark.parametrize("size_name", list(PAYLOAD_SIZES))
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(("sequential", 1, SEQUENTIAL_CALLS), id="sequential"),
        pytest.param((f"{IN_FLIGHT} in flight", IN_FLIGHT, CONCURRENT_CALLS), id="inflight64"),
    ],
)
def test_round_trips(
    benchmark: Any, loop: asyncio.AbstractEventLoop, impl: str, size_name: str, shape: Any
) -> None:
    shape_name, callers, count = shape
    loop_name = "uvloop" if "uvloop" in type(loop).__module__ else "asyncio"
    benchmark.group = f"mem round trips: {size_name} payload, {shape_name}, {loop_name} loop"
    benchmark.extra_info["calls"] = count
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["loop"] = loop_name
    calls = payloads(count, PAYLOAD_SIZES[size_name])
    subject: SessionPair | Floor | Skeleton = (
        Floor() if impl == "floor" else Skeleton() if impl == "skeleton" else SessionPair(impl)
    )
    if isinstance(subject, SessionPair):
        assert subject.twin.name == impl
        if impl == "cython":  # the compiled twins, not a pure fallback under their names
            assert subject.twin.Demux.__module__ == "rapace._demux"
            assert subject.twin.Frame.__module__ == "rapace._frame"
            assert isinstance(subject.client._demux, subject.twin.Demux)
    loop.run_until_complete(subject.start())
    batch = loop.run_until_complete(_make_batch(subject, calls, callers))
    try:
        done = benchmark.pedantic(
            lambda: loop.run_until_complete(batch()), rounds=ROUNDS, warmup_rounds=3
        )
        assert done == count
        if isinstance(subject, SessionPair):  # nothing left behind in any table
            assert subject.client.pending_channel_ids() == []
            assert not subject.client.is_closed and not subject.server.is_closed
    finally:
        loop.run_until_complete(subject.stop())


async def _make_batch(
    subject: SessionPair | Floor | Skeleton, calls: list[bytes], callers: int
) -> Batch:
    return subject.batches(calls, callers)


@pytest.mark.parametrize("size_name", list(PAYLOAD_SIZES))
def test_twins_paired(benchmark: Any, loop: asyncio.AbstractEventLoop, size_name: str) -> None:
    """Both twins, 64 in flight, back to back in every round: the ratio within each round."""
    loop_name = "uvloop" if "uvloop" in type(loop).__module__ else "asyncio"
    benchmark.group = f"paired twins: {size_name} payload, {IN_FLIGHT} in flight, {loop_name} loop"
    calls = payloads(CONCURRENT_CALLS, PAYLOAD_SIZES[size_name])
    pairs = {impl: SessionPair(impl) for impl in ("cython", "python")}
    assert pairs["cython"].twin.Demux.__module__ == "rapace._demux"
    batches = {}
    for impl, pair in pairs.items():
        loop.run_until_complete(pair.start())
        batches[impl] = loop.run_until_complete(_make_batch(pair, calls, IN_FLIGHT))
    times: dict[str, list[float]] = {impl: [] for impl in pairs}

    def both_rounds() -> None:
        for impl, batch in batches.items():
            started = time.perf_counter()
            done = loop.run_until_complete(batch())
            times[impl].append(time.perf_counter() - started)
            assert done == CONCURRENT_CALLS

    try:
        benchmark.pedantic(both_rounds, rounds=PAIRED_ROUNDS, warmup_rounds=PAIRED_WARMUP)
        for pair in pairs.values():
            assert pair.client.pending_channel_ids() == []
    finally:
        for pair in pairs.values():
            loop.run_until_complete(pair.stop())
    # The timed rounds are the last ones (one alone with --benchmark-disable).
    compiled, pure = (times[impl][-PAIRED_ROUNDS:] for impl in ("cython", "python"))
    ratios = sorted(p / c for c, p in zip(compiled, pure, strict=True))
    benchmark.extra_info["paired"] = {
        "calls": CONCURRENT_CALLS,
        "cython": CONCURRENT_CALLS / statistics.median(compiled),
        "python": CONCURRENT_CALLS / statistics.median(pure),
        "ratio": statistics.median(ratios),
        "ratio_p10": ratios[len(ratios) // 10],
        "ratio_p90": ratios[-1 - len(ratios) // 10],
    }


# -- the routing switch alone ----------------------------------------------------------


@pytest.mark.parametrize("impl", ["cython", "python"])
@pytest.mark.parametrize("kind", ["responses", "requests"])
def test_demux_route_many(benchmark: Any, impl: str, kind: str) -> None:
    """``route_many`` of 64 frames: responses resolving futures, or requests to a callback."""
    benchmark.group = (
        f"demux: {IN_FLIGHT} calls started, route_many of their responses"
        if kind == "responses"
        else f"demux: route_many of {IN_FLIGHT} requests"
    )
    benchmark.extra_info["frames"] = IN_FLIGHT
    twin = _impl.load_twin(impl)  # type: ignore[arg-type]
    requests: list[Any] = []
    demux = twin.Demux(requests.append)
    route_many = demux.route_many
    start_call = demux.start_call
    msg_ids = itertools.count(1)
    loop = asyncio.new_event_loop()
    create_future = loop.create_future
    channels = range(1, 2 * IN_FLIGHT, 2)
    method_id = 0 if kind == "responses" else METHOD_ID
    frames = [twin.build_frame(1, c, method_id, 0x05, b"") for c in channels]
    dropped: list[Any] = []

    def route_responses() -> list[Any]:
        waiters = [create_future() for _ in channels]
        for channel_id, waiter in zip(channels, waiters, strict=True):
            start_call(channel_id, METHOD_ID, b"", msg_ids, waiter, None)
        route_many(frames, dropped.append)
        return waiters

    def route_requests() -> list[Any]:
        requests.clear()
        route_many(frames, dropped.append)
        return requests

    try:
        if kind == "responses":
            waiters = benchmark(route_responses)
            assert [w.result() for w in waiters] == frames
            assert demux.waiter_ids() == []
        else:
            assert benchmark(route_requests) == frames
        assert dropped == []
    finally:
        loop.close()
