"""The cost of the typed layer: ``await calc.add(a, b)`` next to raw ``session.call``.

    pytest bench/test_bench_service.py --benchmark-group-by=group \\
        --benchmark-columns=median,ops,rounds

Both make the same ``Calculator.add`` round trip over ``mem_pair()`` in one event loop,
64 calls in flight, on the process's selected core (``rapace.IMPLEMENTATION``; the typed
layer compiles its codecs with it). The raw call sends the postcard bytes of ``(a, b)``
by hand to a dispatcher that decodes and encodes them by hand too, so the difference
between the rows is what ``@rapace.service`` and ``rapace.client`` add per call. Three more
rows price the call context's features on the typed call: one no-op interceptor on the
server, one on the client, and metadata (``{"k": "v"}``, one more control frame per call).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import rapace
from rapace import postcard

IN_FLIGHT = 64
CALLS = IN_FLIGHT * 40
ROUNDS = 15


@rapace.service
class Calculator:
    async def add(self, a: rapace.i32, b: rapace.i32) -> rapace.i32: ...


class CalculatorImpl(Calculator):
    async def add(self, a: int, b: int) -> int:  # type: ignore[override]
        return a + b


ADD_ID = rapace.wire.compute_method_id("Calculator", "add")
ARGS = postcard.codec_for(tuple[rapace.i32, rapace.i32])
RESULT = postcard.codec_for(rapace.i32)


async def _raw_add(frame: Any) -> bytes:
    a, b = ARGS.loads(frame.payload)
    return RESULT.dumps(a + b)


def _run_batches(loop: asyncio.AbstractEventLoop, caller: Any) -> int:
    per_caller = CALLS // IN_FLIGHT

    async def batch() -> int:
        counts = await asyncio.gather(
            *(caller(i * per_caller, per_caller) for i in range(IN_FLIGHT))
        )
        return sum(counts)

    return loop.run_until_complete(batch())


async def _noop(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
    return await call_next()


TYPED = {
    "typed client": ({}, {}),
    "typed, a no-op server interceptor": ({"interceptors": [_noop]}, {}),
    "typed, a no-op client interceptor": ({}, {"interceptors": [_noop]}),
    "typed, metadata": ({}, {"metadata": {"k": "v"}}),
}


@pytest.mark.parametrize("layer", [*TYPED, "raw session.call"])
def test_add_calls(benchmark: Any, layer: str) -> None:
    benchmark.group = (
        f"Calculator.add over mem_pair, {IN_FLIGHT} in flight ({rapace.IMPLEMENTATION})"
    )
    benchmark.extra_info["calls"] = CALLS
    loop = asyncio.new_event_loop()
    a, b = rapace.mem_pair()
    client = rapace.RpcSession(a, 1)
    server = rapace.RpcSession(b, 2)
    if layer in TYPED:
        serving, calling = TYPED[layer]
        rapace.register_services(server, CalculatorImpl(), **serving)
        calc = rapace.client(Calculator, client, **calling)

        async def caller(start: int, count: int) -> int:
            add = calc.add
            for i in range(start, start + count):
                if await add(i, 1) != i + 1:
                    raise AssertionError("wrong sum")
            return count

    else:
        server.set_dispatcher(_raw_add)
        call, next_channel_id = client.call, client.next_channel_id
        dumps, loads = ARGS.dumps, RESULT.loads

        async def caller(start: int, count: int) -> int:
            for i in range(start, start + count):
                response = await call(next_channel_id(), ADD_ID, dumps((i, 1)))
                if loads(response.payload) != i + 1:
                    raise AssertionError("wrong sum")
            return count

    async def start() -> None:
        client.start()
        server.start()

    loop.run_until_complete(start())
    try:
        done = benchmark.pedantic(
            lambda: _run_batches(loop, caller), rounds=ROUNDS, warmup_rounds=2
        )
        assert done == CALLS
        assert client.pending_channel_ids() == []
    finally:
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(server.aclose())
        loop.close()
