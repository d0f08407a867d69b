"""Prometheus export of a server's or a session's counters (``pip install 'rapace[metrics]'``).

::

    server = await rapace.serve(on_session, "tcp://0.0.0.0:7000")
    rapace.metrics.PrometheusCollector(server)      # registers with prometheus_client's REGISTRY
    prometheus_client.start_http_server(9100)        # or any exposition of that registry

Nothing here runs until a scrape: the counters are the ones every session keeps anyway
(``rapace.SessionStats``), read through ``metrics()`` when Prometheus asks, so a program
that never imports this module pays nothing for it (and does not need prometheus-client).
A scrape from another thread (``start_http_server``'s) takes its reading on the event
loop that owns the counters, so it never sees them half-updated.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from typing import Final

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as exc:  # pragma: no cover - prometheus-client is a test dependency
    raise ImportError(
        "rapace.metrics needs prometheus-client: pip install 'rapace[metrics]'"
    ) from exc

from rapace.stats import Measured, MetricsSnapshot

__all__ = ["PrometheusCollector", "snapshot"]


_COUNTERS: Final = (
    ("frames_received", "rapace frames received"),
    ("frames_sent", "rapace frames sent"),
    ("bytes_received", "bytes of rapace frames received (framing included, TLS not)"),
    ("bytes_sent", "bytes of rapace frames sent (framing included, TLS not)"),
    ("requests_admitted", "requests of the peer whose handler started"),
    ("requests_queued", "requests of the peer that waited for a handler slot"),
    ("requests_refused", "requests of the peer answered with an error without running"),
    ("requests_cancelled", "requests the peer cancelled while they ran or waited"),
    ("requests_expired", "requests whose deadline passed before they finished"),
    ("notifications_dropped", "notifications neither run nor queued (overload)"),
    ("frames_skipped_oversized", "incoming frames over the maximum payload, skipped"),
    ("pings_dropped", "pings of the peer left unanswered"),
    ("sessions", "sessions accepted (a session's own collector: 1)"),
)
_GAUGES: Final = (
    ("requests_running", "handlers of the peer's requests running now"),
    ("requests_waiting", "requests of the peer waiting for a handler slot now"),
    ("calls_pending", "calls of this side waiting for their answer now"),
    ("sessions_open", "sessions open now"),
)
_CALLS: Final = (
    ("calls_served", "requests of the peer answered, refused or run, by method and status"),
    ("calls_made", "calls of this side that ended, by method and status"),
)


class PrometheusCollector:
    """A ``prometheus_client`` collector of ``source``'s ``metrics()``: a ``Server``
    (every session it accepted), an ``RpcSession``, or ``rapace.asgi``'s endpoint.

    Registers itself with ``registry`` (default: prometheus_client's global
    ``REGISTRY``; ``None``: not at all, call ``registry.register`` yourself). Metric
    names start with ``namespace`` (``rapace_calls_served_total{method, status}``,
    ``rapace_frames_received_total``, ..., gauges such as ``rapace_requests_running``):
    give each server its own namespace to export two from one registry. A scrape from
    another thread waits at most ``timeout`` seconds for the owning loop to answer.
    It turns the source's ``count_calls`` on: the ``calls_*`` families need it.
    """

    def __init__(
        self,
        source: Measured,
        *,
        registry: CollectorRegistry | None = REGISTRY,
        namespace: str = "rapace",
        timeout: float = 5.0,
    ) -> None:
        if not callable(getattr(source, "metrics", None)):
            raise TypeError(
                f"a PrometheusCollector reads something with metrics() (a Server, an "
                f"RpcSession), not {source!r}"
            )
        self._source = source
        if hasattr(source, "count_calls"):
            source.count_calls = True  # the calls_* families are what a dashboard wants
        self._prefix = f"{namespace}_" if namespace else ""
        self._timeout = timeout
        if registry is not None:
            registry.register(self)

    def describe(self) -> list[Metric]:
        """The metric families, without samples (what registering checks for clashes)."""
        return list(self._families(None))

    def collect(self) -> list[Metric]:
        """The metric families with their values now (what a scrape calls)."""
        return list(self._families(snapshot(self._source, self._timeout)))

    def _families(self, taken: MetricsSnapshot | None) -> Iterator[Metric]:
        prefix = self._prefix
        for name, help_text in _COUNTERS:
            counter = CounterMetricFamily(prefix + name, help_text)
            if taken is not None:
                counter.add_metric([], getattr(taken, name))
            yield counter
        for name, help_text in _GAUGES:
            gauge = GaugeMetricFamily(prefix + name, help_text)
            if taken is not None:
                gauge.add_metric([], getattr(taken, name))
            yield gauge
        for name, help_text in _CALLS:
            calls = CounterMetricFamily(prefix + name, help_text, labels=("method", "status"))
            if taken is not None:
                counts: dict[tuple[str, str], int] = getattr(taken, name)
                for (method, status), count in sorted(counts.items()):
                    calls.add_metric([method, status], count)
            yield calls


def snapshot(source: Measured, timeout: float = 5.0) -> MetricsSnapshot:
    """``source.metrics()``, taken on the loop that owns it when that loop runs in
    another thread (``TimeoutError`` if it does not answer within ``timeout`` s)."""
    owner: asyncio.AbstractEventLoop | None = getattr(source, "_loop", None)
    try:
        current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    if owner is None or owner is current or owner.is_closed() or not owner.is_running():
        return source.metrics()
    result: concurrent.futures.Future[MetricsSnapshot] = concurrent.futures.Future()

    def take() -> None:
        try:
            result.set_result(source.metrics())
        except Exception as exc:  # the scrape reports it
            result.set_exception(exc)

    owner.call_soon_threadsafe(take)
    return result.result(timeout)
