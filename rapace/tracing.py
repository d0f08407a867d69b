"""OpenTelemetry spans per call, as interceptors (``pip install 'rapace[otel]'``).

::

    from rapace.tracing import client_tracing, server_tracing

    rapace.register_services(session, CalculatorImpl(), interceptors=[server_tracing()])
    calc = rapace.client(Calculator, session, interceptors=[client_tracing()])

``client_tracing()`` gives each call of a client a ``CLIENT`` span named
``Service/method`` and puts its trace context in the call's metadata through
OpenTelemetry's propagator API (W3C ``traceparent``/``tracestate``, and ``baggage``,
with the default propagators); ``server_tracing()`` gives each call served a ``SERVER``
span that continues the trace found in the request's metadata, current while the handler
runs, so that what the handler logs and the calls it makes belong to it. A streaming
call's span lasts until its stream ends. A call that does not end ``Ok`` marks its span
as an error (``error.type``: the status name), with the exception recorded as an event.

Both take ``tracer_provider`` (default: the global one, looked up as each span starts,
so one set later is used) and ``propagator`` (default: the global text-map propagator).
Put the tracing interceptor first in the list, so that its span covers the others (an
authentication interceptor refusing the call shows as the span's error).

Nothing here runs unless installed: ``import rapace`` never imports this module nor
OpenTelemetry, and a session without these interceptors pays nothing for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Final

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.propagators.textmap import Getter, Setter, TextMapPropagator
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
    from opentelemetry.util.types import AttributeValue
except ImportError as exc:
    raise ImportError("rapace.tracing needs opentelemetry-api: pip install 'rapace[otel]'") from exc

from rapace import __version__
from rapace.context import CallContext
from rapace.deadline import stopped_by_deadline
from rapace.errors import ErrorCode
from rapace.interceptors import CallNext, Interceptor
from rapace.metadata import MetadataValue
from rapace.stats import failure_status, status_name
from rapace.streaming import ItemStream

__all__ = ["STATUS_CODE", "client_tracing", "server_tracing"]

STATUS_CODE: Final = "rpc.rapace.status_code"
"""The span attribute holding the call's status code (0: ``Ok``; ``rapace.ErrorCode``)."""

_DEADLINE_EXCEEDED: Final = int(ErrorCode.DeadlineExceeded)


class _MetadataSetter(Setter[dict[str, MetadataValue]]):
    """Writes a propagator's fields into call metadata, whose keys are lowercase."""

    def set(self, carrier: dict[str, MetadataValue], key: str, value: str) -> None:
        carrier[key.lower()] = value


class _MetadataGetter(Getter[Mapping[str, MetadataValue]]):
    """Reads a propagator's fields from call metadata (text values only)."""

    def get(self, carrier: Mapping[str, MetadataValue], key: str) -> list[str] | None:
        value = carrier.get(key.lower())
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, MetadataValue]) -> list[str]:
        return list(carrier)


_SETTER: Final = _MetadataSetter()
_GETTER: Final = _MetadataGetter()


class _Spans:
    """What both interceptors share: the tracer, the propagator, and each method's span
    name and attributes, worked out once per method id."""

    def __init__(
        self, tracer_provider: TracerProvider | None, propagator: TextMapPropagator | None
    ) -> None:
        self.tracer: Tracer = trace.get_tracer(
            "rapace", __version__, tracer_provider=tracer_provider
        )
        self.propagator = propagator
        self._methods: dict[int, tuple[str, dict[str, AttributeValue]]] = {}

    def describe(self, call: CallContext) -> tuple[str, dict[str, AttributeValue]]:
        """``("Service/method", {"rpc.system": "rapace", ...})`` of ``call``'s method."""
        known = self._methods.get(call.method_id)
        if known is None:
            if call.method is not None:
                service, _, method = call.method.rpartition(".")
            else:  # (a method no typed service names: its id stands in)
                service, method = "", f"{call.method_id:#010x}"
            attributes: dict[str, AttributeValue] = {
                "rpc.system": "rapace",
                "rpc.service": service,
                "rpc.method": method,
            }
            known = self._methods[call.method_id] = (f"{service}/{method}", attributes)
        return known

    def inject(self, metadata: dict[str, MetadataValue], context: otel_context.Context) -> None:
        if self.propagator is None:
            propagate.inject(metadata, context, _SETTER)
        else:
            self.propagator.inject(metadata, context, _SETTER)

    def extract(self, metadata: Mapping[str, MetadataValue]) -> otel_context.Context:
        if self.propagator is None:
            return propagate.extract(metadata, getter=_GETTER)
        return self.propagator.extract(metadata, getter=_GETTER)


def _finish(span: Span, status: int, error: BaseException | None) -> None:
    """Record how the call ended on ``span``: its status code and, unless ``Ok``, the
    error status and the exception (a cancellation has none to record)."""
    span.set_attribute(STATUS_CODE, status)
    if status:
        name = status_name(status)
        span.set_attribute("error.type", name)
        if error is not None and not isinstance(error, asyncio.CancelledError):
            span.record_exception(error)
            detail = str(error)
            span.set_status(Status(StatusCode.ERROR, f"{name}: {detail}" if detail else name))
        else:
            span.set_status(Status(StatusCode.ERROR, name))


def client_tracing(
    *,
    tracer_provider: TracerProvider | None = None,
    propagator: TextMapPropagator | None = None,
) -> Interceptor:
    """A client interceptor giving each call a ``CLIENT`` span (``Service/method``,
    ``rpc.system="rapace"``, ``rpc.service``, ``rpc.method``, ``rpc.rapace.status_code``)
    and carrying its trace context to the server in the call's metadata.

    The span is a child of the span current where the call is made (in a handler under
    ``server_tracing``, the served call's), and is current while the interceptors after
    this one run. A streaming call's span ends as its stream does: after the last item,
    with the stream's error, or ``Cancelled`` when the caller stops it early.
    """
    spans = _Spans(tracer_provider, propagator)

    async def trace_call(call: CallContext, call_next: CallNext) -> Any:
        name, attributes = spans.describe(call)
        span = spans.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        context = trace.set_span_in_context(span)
        spans.inject(call.metadata, context)
        token = otel_context.attach(context)
        try:
            result = await call_next()
        except BaseException as exc:
            _finish(span, failure_status(exc), exc)
            span.end()
            raise
        finally:
            otel_context.detach(token)
        if isinstance(result, ItemStream):

            def stream_ended(status: int, error: BaseException | None) -> None:
                _finish(span, status, error)
                span.end()

            result.add_done_callback(stream_ended)
        else:
            _finish(span, 0, None)
            span.end()
        return result

    return trace_call


def server_tracing(
    *,
    tracer_provider: TracerProvider | None = None,
    propagator: TextMapPropagator | None = None,
) -> Interceptor:
    """A server interceptor giving each call served a ``SERVER`` span (named and
    attributed as ``client_tracing``'s) that continues the caller's trace from the
    request's metadata (a root span when the caller sent none).

    The span is current while the rest of the chain and the handler run (and in the
    tasks they start), so the calls the handler makes are its children. It ends as the
    handler does: for a streaming call, once every item is sent or the stream failed; a
    handler stopped by its deadline ends ``DeadlineExceeded``, one the client cancelled
    ``Cancelled``.
    """
    spans = _Spans(tracer_provider, propagator)

    async def trace_served(call: CallContext, call_next: CallNext) -> Any:
        name, attributes = spans.describe(call)
        parent = spans.extract(call.metadata)
        span = spans.tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            result = await call_next()
        except BaseException as exc:
            status = _DEADLINE_EXCEEDED if stopped_by_deadline(exc) else failure_status(exc)
            _finish(span, status, exc)
            raise
        else:
            _finish(span, 0, None)
        finally:
            otel_context.detach(token)
            span.end()
        return result

    return trace_served
