"""The cost of the typed layer: ``await calc.add(a, b)`` next to raw ``session.call``.

    pytest bench/test_bench_service.py --benchmark-group-by=group \\
        --benchmark-columns=median,ops,rounds

Both make the same ``Calculator.add`` round trip over ``mem_pair()`` in one event loop,
64 calls in flight, on the process's selected core (``rapace.IMPLEMENTATION``; the typed
layer compiles its codecs with it). The raw call sends the postcard bytes of ``(a, b)``
by hand to a dispatcher that decodes and encodes them by hand too, so the difference
between the rows is what ``@rapace.service`` and ``rapace.client`` add per call. More
rows price the call context's features on the typed call: one no-op interceptor on the
server, one on the client, metadata (``{"k": "v"}``, one more control frame per call), and
OpenTelemetry spans (``rapace.tracing`` on both sides: an SDK ``TracerProvider`` whose
exporter drops every span, so the rows price making the spans, not shipping them).

``test_interceptor_costs_paired`` runs the typed call without interceptors, with a no-op
interceptor on each side, and with tracing on each side, back to back in every round (in
a rotating order), and reports (``extra_info["interceptors"]``, in ``--benchmark-json``) each
variant's calls/s and the median of its per-round time ratios to the plain call, with
the 10th and 90th percentiles: ratios taken within one round survive this machine's drift.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
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


def _tracing() -> tuple[rapace.Interceptor, rapace.Interceptor]:
    """``rapace.tracing``'s (server, client) interceptors on an SDK tracer provider whose
    exporter drops every span."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from rapace.tracing import client_tracing, server_tracing  # noqa: PLC0415

    class Discard(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Discard()))
    return server_tracing(tracer_provider=provider), client_tracing(tracer_provider=provider)


def _no_ops() -> tuple[rapace.Interceptor, rapace.Interceptor]:
    return _noop, _noop


Options = tuple[dict[str, Any], dict[str, Any]]
"""``register_services`` keywords, ``client`` keywords."""


def _both(make: Callable[[], tuple[rapace.Interceptor, rapace.Interceptor]]) -> Options:
    serving, calling = make()
    return {"interceptors": [serving]}, {"interceptors": [calling]}


TYPED: dict[str, Callable[[], Options]] = {
    "typed client": lambda: ({}, {}),
    "typed, a no-op server interceptor": lambda: ({"interceptors": [_noop]}, {}),
    "typed, a no-op client interceptor": lambda: ({}, {"interceptors": [_noop]}),
    "typed, metadata": lambda: ({}, {"metadata": {"k": "v"}}),
    "typed, OpenTelemetry server span": lambda: ({"interceptors": [_tracing()[0]]}, {}),
    "typed, OpenTelemetry client span": lambda: ({}, {"interceptors": [_tracing()[1]]}),
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
        caller = _typed_caller(client, server, TYPED[layer]())
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


def _typed_caller(client: rapace.RpcSession, server: rapace.RpcSession, options: Options) -> Any:
    """Serve ``Calculator`` on ``server``; a caller making ``count`` calls on ``client``."""
    serving, calling = options
    rapace.register_services(server, CalculatorImpl(), **serving)
    calc = rapace.client(Calculator, client, **calling)

    async def caller(start: int, count: int) -> int:
        add = calc.add
        for i in range(start, start + count):
            if await add(i, 1) != i + 1:
                raise AssertionError("wrong sum")
        return count

    return caller


PAIRED: dict[str, Callable[[], Options]] = {
    "plain": lambda: ({}, {}),
    "no-op interceptor on each side": lambda: _both(_no_ops),
    "OpenTelemetry spans on each side": lambda: _both(_tracing),
}
PAIRED_ROUNDS = 20


def test_interceptor_costs_paired(benchmark: Any) -> None:
    benchmark.group = (
        f"interceptors paired: Calculator.add over mem_pair, {IN_FLIGHT} in flight "
        f"({rapace.IMPLEMENTATION})"
    )
    loop = asyncio.new_event_loop()
    sessions: list[rapace.RpcSession] = []
    callers = {}
    for name, options in PAIRED.items():
        a, b = rapace.mem_pair()
        client, server = rapace.RpcSession(a, 1), rapace.RpcSession(b, 2)
        sessions += (client, server)
        callers[name] = _typed_caller(client, server, options())

    async def start() -> None:
        for session in sessions:
            session.start()

    loop.run_until_complete(start())
    times: dict[str, list[float]] = {name: [] for name in callers}
    order = list(callers)

    def one_round() -> None:
        order.append(order.pop(0))  # rotate: no variant always runs first
        for name in order:
            started = time.perf_counter()
            assert _run_batches(loop, callers[name]) == CALLS
            times[name].append(time.perf_counter() - started)

    try:
        benchmark.pedantic(one_round, rounds=PAIRED_ROUNDS, warmup_rounds=2)
    finally:
        for session in sessions:
            loop.run_until_complete(session.aclose())
        loop.close()
    plain = times["plain"][-PAIRED_ROUNDS:]
    report: dict[str, Any] = {"plain": CALLS / statistics.median(plain)}
    for name in list(PAIRED)[1:]:
        mine = times[name][-PAIRED_ROUNDS:]
        ratios = sorted(t / t_plain for t, t_plain in zip(mine, plain, strict=True))
        report[name] = {
            "calls_per_s": CALLS / statistics.median(mine),
            "time_ratio": statistics.median(ratios),
            "p10": ratios[len(ratios) // 10],
            "p90": ratios[-1 - len(ratios) // 10],
        }
    benchmark.extra_info["interceptors"] = report
