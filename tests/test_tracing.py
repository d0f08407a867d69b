"""OpenTelemetry spans per call (``rapace.tracing``, issue 13 item 5), over real Unix
sockets on both twins, collected by the SDK's in-memory exporter.

A client calls a front server whose handler calls a back server: the four spans form one
trace with the right parents (the trace context travels in the call metadata); errors
and streams end their spans with the right status; tracing on one side only still
answers; and a program that does not use tracing never imports OpenTelemetry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from net_helpers import run, run_program, short_tmpdir, wait_for, wait_until
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

import rapace
from rapace.tracing import STATUS_CODE, client_tracing, server_tracing

NOT_FOUND = int(rapace.ErrorCode.NotFound)
INTERNAL = int(rapace.ErrorCode.Internal)
CANCELLED = int(rapace.ErrorCode.Cancelled)


@rapace.service
class Back:
    async def lookup(self, key: str) -> str: ...

    async def countdown(self, start: rapace.u32) -> AsyncIterator[rapace.u32]: ...


@rapace.service
class Front:
    async def relay(self, key: str) -> str: ...


class BackImpl(Back):
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen: list[str] = []  # the traceparent each call arrived with
        self.baggage: list[str] = []  # and its baggage

    async def lookup(self, key: str) -> str:
        metadata = rapace.current_call().metadata
        self.seen.append(str(metadata.get("traceparent", "")))
        self.baggage.append(str(metadata.get("baggage", "")))
        if key == "missing":
            raise rapace.NotFound(f"no {key}")
        if key == "bug":
            raise ZeroDivisionError("a bug in the handler")
        return key.upper()

    async def countdown(self, start: int) -> AsyncIterator[int]:
        yield start
        await self.release.wait()
        for n in range(start - 1, 0, -1):
            yield n
        if start == 5:
            raise rapace.NotFound("the end of a failed stream")


class FrontImpl(Front):
    """Its handler calls the back server: the nested call of the trace."""

    def __init__(self, back: Back) -> None:
        self.back = back
        self.current: list[trace.SpanContext] = []

    async def relay(self, key: str) -> str:
        self.current.append(trace.get_current_span().get_span_context())
        return await self.back.lookup(key)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    yield spans
    spans.shutdown()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return tracer_provider


def by_name(exporter: InMemorySpanExporter) -> dict[tuple[str, SpanKind], ReadableSpan]:
    spans = exporter.get_finished_spans()
    named = {(span.name, span.kind): span for span in spans}
    assert len(named) == len(spans), spans
    return named


def serving(impl: object, interceptors: list[rapace.Interceptor]) -> Callable[..., None]:
    def on_session(session: rapace.RpcSession) -> None:
        rapace.register_services(session, impl, interceptors=interceptors)

    return on_session


@contextlib.asynccontextmanager
async def serving_pair(
    impl: object, interceptors: list[rapace.Interceptor]
) -> AsyncIterator[rapace.RpcSession]:
    """A server on a Unix socket serving ``impl`` behind ``interceptors``, and a client
    session connected to it."""
    with short_tmpdir() as directory:
        address = f"unix:{directory}/s.sock"
        async with (
            rapace.serve(serving(impl, interceptors), address, keepalive=None) as server,
            rapace.connect(str(server.address), keepalive=None) as session,
        ):
            yield session


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_client_server_and_a_nested_call_form_one_trace(
    twin: Any, exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    back_impl = BackImpl()

    async def main() -> None:
        with short_tmpdir() as directory:
            async with (
                rapace.serve(
                    serving(back_impl, [server_tracing(tracer_provider=provider)]),
                    f"unix:{directory}/back.sock",
                    keepalive=None,
                ) as back_server,
                rapace.connect(str(back_server.address), keepalive=None) as to_back,
            ):
                back = rapace.client(
                    Back, to_back, interceptors=[client_tracing(tracer_provider=provider)]
                )
                front_impl = FrontImpl(back)
                async with (
                    rapace.serve(
                        serving(front_impl, [server_tracing(tracer_provider=provider)]),
                        f"unix:{directory}/front.sock",
                        keepalive=None,
                    ) as front_server,
                    rapace.connect(str(front_server.address), keepalive=None) as to_front,
                ):
                    front = rapace.client(
                        Front, to_front, interceptors=[client_tracing(tracer_provider=provider)]
                    )
                    assert await front.relay("k") == "K"
                    await wait_until(
                        lambda: len(exporter.get_finished_spans()) == 4, "the four spans"
                    )
                    spans = by_name(exporter)
                    caller = spans["Front/relay", SpanKind.CLIENT]
                    served = spans["Front/relay", SpanKind.SERVER]
                    nested = spans["Back/lookup", SpanKind.CLIENT]
                    backend = spans["Back/lookup", SpanKind.SERVER]
                    trace_ids = {s.context.trace_id for s in (caller, served, nested, backend)}
                    assert trace_ids == {caller.context.trace_id}
                    assert caller.parent is None
                    assert parent_of(served) == caller.context.span_id
                    assert served.parent is not None and served.parent.is_remote
                    assert parent_of(nested) == served.context.span_id
                    assert parent_of(backend) == nested.context.span_id
                    # The handler ran inside its server span; the wire carried W3C context.
                    assert front_impl.current == [served.context]
                    (traceparent,) = back_impl.seen
                    assert traceparent.startswith(  # (then the trace flags)
                        f"00-{nested.context.trace_id:032x}-{nested.context.span_id:016x}-"
                    )
                    assert dict(caller.attributes or {}) == {
                        "rpc.system": "rapace",
                        "rpc.service": "Front",
                        "rpc.method": "relay",
                        STATUS_CODE: 0,
                    }
                    for span in (caller, served, nested, backend):
                        assert span.status.status_code is StatusCode.UNSET
                        assert (span.attributes or {})[STATUS_CODE] == 0

    run(main())


def test_a_failed_call_marks_both_spans_as_errors(
    twin: Any, exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    impl = BackImpl()

    async def main() -> None:
        async with serving_pair(impl, [server_tracing(tracer_provider=provider)]) as session:
            back = rapace.client(
                Back, session, interceptors=[client_tracing(tracer_provider=provider)]
            )
            for key, error, code in (
                ("missing", rapace.NotFound, NOT_FOUND),
                ("bug", rapace.Internal, INTERNAL),
            ):
                exporter.clear()
                with pytest.raises(error):
                    await back.lookup(key)
                await wait_until(lambda: len(exporter.get_finished_spans()) == 2, "spans")
                spans = by_name(exporter)
                for kind in (SpanKind.CLIENT, SpanKind.SERVER):
                    span = spans["Back/lookup", kind]
                    assert span.status.status_code is StatusCode.ERROR, kind
                    assert (span.attributes or {})[STATUS_CODE] == code
                    assert (span.attributes or {})["error.type"] == error.__name__
                    (event,) = span.events
                    assert event.name == "exception"
                served = spans["Back/lookup", SpanKind.SERVER].events[0].attributes or {}
                made = spans["Back/lookup", SpanKind.CLIENT].events[0].attributes or {}
                # The server records the handler's own exception; the client what it got.
                expected = "NotFound" if key == "missing" else "ZeroDivisionError"
                assert served["exception.type"].endswith(expected)  # type: ignore[union-attr]
                assert made["exception.type"].endswith(error.__name__)  # type: ignore[union-attr]

    run(main())


def test_a_streaming_call_span_covers_the_whole_stream(
    twin: Any, exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    impl = BackImpl()

    async def main() -> None:
        async with serving_pair(impl, [server_tracing(tracer_provider=provider)]) as session:
            back = rapace.client(
                Back, session, interceptors=[client_tracing(tracer_provider=provider)]
            )
            # A complete stream: no span ends before its last item.
            stream = await back.countdown(3)
            assert await stream.__anext__() == 3
            assert exporter.get_finished_spans() == ()
            impl.release.set()
            assert [n async for n in stream] == [2, 1]
            await wait_until(lambda: len(exporter.get_finished_spans()) == 2, "spans")
            spans = by_name(exporter)
            served = spans["Back/countdown", SpanKind.SERVER]
            made = spans["Back/countdown", SpanKind.CLIENT]
            assert parent_of(served) == made.context.span_id
            for span in (served, made):
                assert span.status.status_code is StatusCode.UNSET
                assert (span.attributes or {})[STATUS_CODE] == 0

            # A stream that ends with an error item: both spans are errors.
            exporter.clear()
            items: list[int] = []
            with pytest.raises(rapace.NotFound):
                async for n in back.countdown(5):
                    items.append(n)
            assert items == [5, 4, 3, 2, 1]
            await wait_until(lambda: len(exporter.get_finished_spans()) == 2, "spans")
            for span in by_name(exporter).values():
                assert span.status.status_code is StatusCode.ERROR
                assert (span.attributes or {})[STATUS_CODE] == NOT_FOUND
                assert [event.name for event in span.events] == ["exception"]

            # A stream the caller stops early: Cancelled, on both sides.
            exporter.clear()
            impl.release.clear()
            stream = await back.countdown(4)
            assert await stream.__anext__() == 4
            await stream.aclose()
            await wait_until(lambda: len(exporter.get_finished_spans()) == 2, "spans")
            for span in by_name(exporter).values():
                assert (span.attributes or {})[STATUS_CODE] == CANCELLED
                assert (span.attributes or {})["error.type"] == "Cancelled"

    run(main())


@pytest.mark.parametrize("traced", ["client", "server"])
def test_tracing_on_one_side_only_still_answers(
    twin: Any, exporter: InMemorySpanExporter, provider: TracerProvider, traced: str
) -> None:
    impl = BackImpl()
    impl.release.set()
    on_server = [server_tracing(tracer_provider=provider)] if traced == "server" else []
    on_client = [client_tracing(tracer_provider=provider)] if traced == "client" else []

    async def main() -> None:
        async with serving_pair(impl, on_server) as session:
            back = rapace.client(Back, session, interceptors=on_client)
            assert await back.lookup("k") == "K"
            assert [n async for n in back.countdown(1)] == [1]
            await wait_until(lambda: len(exporter.get_finished_spans()) == 2, "spans")
            spans = by_name(exporter)
            kind = SpanKind.CLIENT if traced == "client" else SpanKind.SERVER
            assert set(spans) == {("Back/lookup", kind), ("Back/countdown", kind)}
            for span in spans.values():
                assert span.parent is None  # a root span on the server: no context came
            assert bool(impl.seen[0]) is (traced == "client")

    run(main())


def test_a_handler_past_its_deadline_ends_its_span_deadline_exceeded(
    twin: Any, exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    started = asyncio.Event()

    @rapace.service
    class Slow:
        async def wait(self) -> None: ...

    class SlowImpl(Slow):
        async def wait(self) -> None:
            started.set()
            await asyncio.get_running_loop().create_future()

    async def main() -> None:
        async with serving_pair(SlowImpl(), [server_tracing(tracer_provider=provider)]) as session:
            slow = rapace.client(Slow, session, timeout=0.05)
            with pytest.raises(rapace.DeadlineExceeded):
                await slow.wait()
            await wait_for(started, "the handler to start")
            await wait_until(lambda: len(exporter.get_finished_spans()) == 1, "the span")
            (span,) = exporter.get_finished_spans()
            assert (span.attributes or {})["error.type"] == "DeadlineExceeded"

    run(main())


def test_rapace_never_imports_opentelemetry(tmp_path: Path) -> None:
    """A server and a typed call without tracing do not load OpenTelemetry at all."""
    program = """
import asyncio, sys
import rapace

@rapace.service
class Echo:
    async def echo(self, text: str) -> str: ...

class EchoImpl(Echo):
    async def echo(self, text):
        return text

async def main():
    on_session = lambda s: rapace.register_services(s, EchoImpl())
    async with rapace.serve(on_session, "tcp://127.0.0.1:0") as server:
        async with rapace.connect(str(server.address)) as client:
            assert await rapace.client(Echo, client).echo("x") == "x"

asyncio.run(main())
print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
"""
    assert run_program(program, tmp_path) == "[]"


def test_without_opentelemetry_the_import_error_says_what_to_install(tmp_path: Path) -> None:
    program = """
import sys
sys.modules["opentelemetry"] = None  # as if it were not installed
import rapace
try:
    import rapace.tracing
except ImportError as exc:
    print(exc)
"""
    assert run_program(program, tmp_path) == (
        "rapace.tracing needs opentelemetry-api: pip install 'rapace[otel]'"
    )


def test_an_unsampled_caller_and_a_propagator_of_ones_own(
    twin: Any, exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    """A caller that samples nothing still sends its context (not sampled), which the
    server follows; ``propagator=`` replaces the global one (here: baggage only)."""
    impl = BackImpl()
    unsampled = TracerProvider(sampler=ALWAYS_OFF)

    async def main() -> None:
        async with serving_pair(impl, [server_tracing(tracer_provider=provider)]) as session:
            quiet = rapace.client(
                Back, session, interceptors=[client_tracing(tracer_provider=unsampled)]
            )
            assert await quiet.lookup("a") == "A"
            flags = int(impl.seen[-1].rpartition("-")[2], 16)
            assert impl.seen[-1] and not flags & 1  # sent, marked not sampled
            assert exporter.get_finished_spans() == ()  # and the server followed

            only_baggage = rapace.client(
                Back,
                session,
                interceptors=[
                    client_tracing(tracer_provider=provider, propagator=W3CBaggagePropagator())
                ],
            )
            token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
            try:
                assert await only_baggage.lookup("b") == "B"
            finally:
                otel_context.detach(token)
            assert impl.seen[-1] == ""  # no traceparent: the server's span is a root
            assert impl.baggage[-1] == "tenant=acme"
            await wait_until(lambda: len(exporter.get_finished_spans()) == 2, "spans")
            assert all(span.parent is None for span in exporter.get_finished_spans())

    run(main())
