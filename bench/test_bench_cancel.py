"""Cancellation propagation: calls/s when 10% of the calls are cancelled, per twin.

    pytest bench/test_bench_cancel.py --benchmark-group-by=group

64 callers over one ``mem_pair`` (client and server on the same twin, uvloop). Every
tenth call goes to a handler that never answers; the caller cancels it once its next
call (an echo) has come back, so the cancelled request has reached the server, whose
handler is then cancelled by the ``CancelChannel`` it receives. The rate counts every
call, answered or cancelled; the 0% rows are the same loop without cancellations, so
the difference is what a cancellation costs end to end. After every round the server
must have nothing left running.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

import rapace
from rapace import _impl
from rapace.runner import uvloop_factory

ECHO = rapace.wire.compute_method_id("Cancel", "echo")
HANG = rapace.wire.compute_method_id("Cancel", "hang")
CALLERS = 64
CALLS_PER_CALLER = 40
ROUNDS = 15


async def _handler(frame: Any) -> bytes:
    if frame.desc.method_id == HANG:
        await asyncio.get_running_loop().create_future()
    return bytes(frame.payload)


async def _caller(client: rapace.RpcSession, cancel_every: int) -> int:
    call, next_channel_id = client.call, client.next_channel_id
    hanging: asyncio.Task[Any] | None = None
    for i in range(CALLS_PER_CALLER):
        if cancel_every and i % cancel_every == 0:
            hanging = asyncio.ensure_future(call(next_channel_id(), HANG, b"h"))
            continue
        await call(next_channel_id(), ECHO, b"x" * 16)
        if hanging is not None:  # the echo came back: the hanging request is being served
            hanging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hanging
            hanging = None
    return CALLS_PER_CALLER


@pytest.mark.parametrize("cancelled", ["0%", "10%"])
@pytest.mark.parametrize("twin", ["cython", "python"])
def test_calls_with_cancellations(benchmark: Any, twin: str, cancelled: str) -> None:
    benchmark.group = f"cancellation: {CALLERS} callers, {cancelled} of calls cancelled, uvloop"
    benchmark.extra_info["calls"] = CALLERS * CALLS_PER_CALLER
    cancel_every = 10 if cancelled == "10%" else 0
    factory = uvloop_factory()
    if factory is None:
        pytest.skip("uvloop is not installed")  # a loop, not a twin: skipping is fine
    with asyncio.Runner(loop_factory=factory) as runner:
        a, b = rapace.mem_pair()
        with _impl.using(twin):
            client, server = rapace.RpcSession(a, 1), rapace.RpcSession(b, 2)
        server.set_dispatcher(_handler)

        async def start() -> None:
            client.start()
            server.start()

        rounds = 0

        async def round_() -> int:
            nonlocal rounds
            rounds += 1
            done = await asyncio.gather(*(_caller(client, cancel_every) for _ in range(CALLERS)))
            for _ in range(100_000):  # the last cancels may still be on their way
                if not server.busy:
                    return sum(done)
                await asyncio.sleep(0)
            raise AssertionError("cancelled handlers still run on the server")

        runner.run(start())
        try:
            done = benchmark.pedantic(lambda: runner.run(round_()), rounds=ROUNDS, warmup_rounds=2)
            assert done == CALLERS * CALLS_PER_CALLER
            assert not server.busy and client.pending_channel_ids() == []
            per_round = CALLERS * (CALLS_PER_CALLER // 10) if cancel_every else 0
            assert server.stats.requests_cancelled == rounds * per_round
        finally:
            runner.run(client.aclose())
            runner.run(server.aclose())
