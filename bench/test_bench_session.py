"""Session round trips over ``mem_pair()``: the compiled core, the pure core and a raw floor.

    pytest bench/test_bench_session.py --benchmark-group-by=group \\
        --benchmark-columns=median,ops,rounds

A client ``RpcSession`` (odd channels) calls a server ``RpcSession`` (even channels) whose
dispatcher echoes the payload, both in one event loop over the in-memory transport. Each
round makes ``extra_info["calls"]`` calls, so calls/s = calls / median. Two shapes:

- *sequential*: one call at a time (latency: every hop of the round trip is paid in full);
- *64 in flight*: 64 callers at once, the mem transport's window (throughput: frames
  travel and are routed in batches).

``floor`` is the same round-trip pattern with no rapace at all: a caller puts
``(future, payload)`` on an ``asyncio.Queue``, a server task echoes by resolving the
future. The gap between it and a core is the cost of the session layer.

Every call checks its response (each call sends a distinct payload), so a broken core
fails instead of timing nothing. A compiled core that does not import is an error, never
a skip. ``RAPACE_BENCH_LOOP=uvloop`` runs the loop on uvloop instead of asyncio's.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

import rapace
from rapace._impl import load_core

METHOD_ID = 0x3E895C50  # Echo.echo
IN_FLIGHT = 64
SEQUENTIAL_CALLS = 2_000
CONCURRENT_CALLS = IN_FLIGHT * 40
ROUNDS = 15
PAYLOAD_SIZES = {"16 B": 16, "1 KiB": 1024}

Batch = Callable[[], Awaitable[int]]


def payloads(count: int, size: int) -> list[bytes]:
    """``count`` distinct payloads of ``size`` bytes (a misrouted response shows)."""
    return [(i.to_bytes(4, "little") * (size // 4 + 1))[:size] for i in range(count)]


def new_loop() -> asyncio.AbstractEventLoop:
    if os.environ.get("RAPACE_BENCH_LOOP") == "uvloop":
        import uvloop  # noqa: PLC0415

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = new_loop()
    try:
        yield loop
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# -- what is measured ----------------------------------------------------------------------


class SessionPair:
    """Client and server sessions of one core over ``mem_pair()``, running."""

    def __init__(self, core_name: str) -> None:
        self.core = load_core(core_name)  # type: ignore[arg-type]  # ImportError fails
        a, b = rapace.mem_pair()
        self.client = rapace.RpcSession(a, 1, _core=self.core)
        self.server = rapace.RpcSession(b, 2, _core=self.core)

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
        try:
            await self.task
        except asyncio.CancelledError:
            pass

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


@pytest.mark.parametrize("impl", ["cython", "python", "floor"])
@pytest.mark.parametrize("size_name", list(PAYLOAD_SIZES))
@pytest.mark.parametrize(
    ("shape", "callers", "count"),
    [("sequential", 1, SEQUENTIAL_CALLS), (f"{IN_FLIGHT} in flight", IN_FLIGHT, CONCURRENT_CALLS)],
)
def test_round_trips(
    benchmark: Any,
    loop: asyncio.AbstractEventLoop,
    impl: str,
    size_name: str,
    shape: str,
    callers: int,
    count: int,
) -> None:
    benchmark.group = f"mem round trips: {size_name} payload, {shape}"
    benchmark.extra_info["calls"] = count
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["loop"] = type(loop).__module__
    calls = payloads(count, PAYLOAD_SIZES[size_name])
    subject: SessionPair | Floor = Floor() if impl == "floor" else SessionPair(impl)
    if isinstance(subject, SessionPair):
        assert subject.core.name == impl
        if impl == "cython":  # the compiled twins, not a pure fallback under their names
            assert not subject.core.demux.__file__.endswith(".py")
            assert not subject.core.frame.__file__.endswith(".py")
    loop.run_until_complete(subject.start())
    batch = loop.run_until_complete(_make_batch(subject, calls, callers))
    try:
        done = benchmark.pedantic(
            lambda: loop.run_until_complete(batch()), rounds=ROUNDS, warmup_rounds=1
        )
        assert done == count
        if isinstance(subject, SessionPair):  # nothing left behind in any table
            assert subject.client.pending_channel_ids() == []
            assert not subject.client.is_closed and not subject.server.is_closed
    finally:
        loop.run_until_complete(subject.stop())


async def _make_batch(subject: SessionPair | Floor, calls: list[bytes], callers: int) -> Batch:
    return subject.batches(calls, callers)
