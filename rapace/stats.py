"""Counters of sessions and servers: plain objects, always on where that costs nothing.

``SessionStats`` is what one session did, live: the work its peer sent it (admitted,
queued, refused, cancelled, expired, dropped), its transport's traffic
(``TrafficStats``: counted once per read and per write, not per frame) and, while the
session's ``count_calls`` is on, its calls in both directions by method and status
(``CallCounts``: one dict update as a call ends, keyed by method id so that nothing is
formatted on the way; that is a few per cent of a small call, hence opt-in).
``MetricsSnapshot`` is the named, summable copy that ``RpcSession.metrics()`` and
``Server.metrics()`` return and exporters read (``rapace.metrics`` for Prometheus).
``notifications_dropped`` stays 0 unless a peer overruns every bound while this side
cannot stop reading (it has calls of its own waiting for answers).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from rapace.errors import ErrorCode, RpcError
from rapace.flags import FrameFlags

if TYPE_CHECKING:
    from rapace._frame_py import Frame

__all__ = [
    "CallCounts",
    "CountedSession",
    "Measured",
    "MetricsSnapshot",
    "SessionGroup",
    "SessionStats",
    "TrafficStats",
    "status_name",
]

_ERROR = int(FrameFlags.ERROR)
CANCELLED = int(ErrorCode.Cancelled)


@dataclass(slots=True)
class TrafficStats:
    """Frames and bytes through one transport, both ways.

    Bytes are the rapace framing's (descriptor, payload and, on a byte stream, the length
    prefix), not TLS's or WebSocket's. The in-memory transport moves frames, not bytes:
    its byte counts stay 0, and a frame counts as sent once the peer's end delivered it.
    """

    frames_received: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0


class CallCounts:
    """Calls of one direction that ended, by method id and status code (live).

    ``ok`` and ``failed`` are split so that a call that succeeds costs one dict update
    with an int key; ``named()`` gives the readable form.
    """

    __slots__ = ("failed", "ok")

    def __init__(self) -> None:
        self.ok: dict[int, int] = {}
        """Calls that succeeded, by method id."""
        self.failed: dict[tuple[int, int], int] = {}
        """Calls that failed, by ``(method id, status code)``."""

    def add(self, method_id: int, code: int) -> None:
        """Count one call of ``method_id`` that ended with ``code`` (0: it succeeded)."""
        if code:
            failed = self.failed
            key = (method_id, code)
            failed[key] = failed.get(key, 0) + 1
        else:
            ok = self.ok
            ok[method_id] = ok.get(method_id, 0) + 1

    def total(self) -> int:
        """Every call counted, whatever its status."""
        return sum(self.ok.values()) + sum(self.failed.values())

    def named(self, names: Mapping[int, str]) -> dict[tuple[str, str], int]:
        """``{("Service.method", "Ok"): count, ...}``: methods named where ``names`` knows
        them (else their id in hex), statuses by ``ErrorCode`` name."""
        counts: dict[tuple[str, str], int] = {}
        for method_id, count in self.ok.items():
            key = (method_name(method_id, names), "Ok")
            counts[key] = counts.get(key, 0) + count
        for (method_id, code), count in self.failed.items():
            key = (method_name(method_id, names), status_name(code))
            counts[key] = counts.get(key, 0) + count
        return counts


def method_name(method_id: int, names: Mapping[int, str]) -> str:
    """``"Service.method"`` where known, else the id as ``0x542faed4`` (a stable label)."""
    return names.get(method_id) or f"{method_id:#010x}"


def failure_status(exc: BaseException) -> int:
    """The status a call that raised ``exc`` ends with: an ``RpcError``'s code,
    ``Cancelled`` for a cancelled caller, ``SessionClosed`` for a closed connection."""
    if isinstance(exc, RpcError):
        return int(exc.code)
    if isinstance(exc, asyncio.CancelledError):
        return CANCELLED
    if isinstance(exc, ConnectionError):
        return int(ErrorCode.SessionClosed)
    return int(ErrorCode.Internal)


def reply_status(response: Frame) -> int:
    """The status an answer carries: 0, or the code of its error payload."""
    if not response.desc.flags & _ERROR:
        return 0
    code = bytes(response.payload[:4])
    return int.from_bytes(code, "little") if len(code) == 4 else int(ErrorCode.Internal)


def status_name(code: int) -> str:
    """``"Ok"``, ``"DeadlineExceeded"``, ...: the ``ErrorCode`` name, else the number."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


@dataclass(slots=True)
class SessionStats:
    """Counters of one session (requests include notifications)."""

    requests_admitted: int = 0
    """Requests whose handler started (at once or after waiting their turn)."""
    requests_queued: int = 0
    """Requests that waited for a free handler slot before they started."""
    requests_refused: int = 0
    """Requests answered with an error without running (overload, shutdown, no dispatcher)."""
    requests_cancelled: int = 0
    """Requests the peer cancelled (``CancelChannel``) while they ran or waited to run."""
    requests_expired: int = 0
    """Requests whose deadline passed before or while they ran (answered ``DeadlineExceeded``)."""
    notifications_dropped: int = 0
    """Notifications that could be neither run nor queued (never silently: logged)."""
    frames_skipped_oversized: int = 0
    """Incoming frames over the maximum payload size, skipped without being buffered."""
    pings_dropped: int = 0
    """Pings of the peer left unanswered: too many pongs already waited for it to read."""
    traffic: TrafficStats = field(default_factory=TrafficStats)
    """The transport's frames and bytes (its own object: every rapace transport counts)."""
    calls_served: CallCounts = field(default_factory=CallCounts)
    """The peer's requests this side answered or refused, and notifications it ran, by
    method and status, while ``RpcSession.count_calls`` is on (a handler the peer
    cancelled, or one stopped because the session closed, ends ``Cancelled``)."""
    calls_made: CallCounts = field(default_factory=CallCounts)
    """Calls this side made, by method and status, while ``count_calls`` is on
    (``Cancelled``: the caller gave up; ``SessionClosed``: the connection ended first):
    unary calls as their answer comes, a typed client's streaming calls as their stream
    ends (``Ok`` after the last item, the error of an error item, ``Cancelled`` when the
    caller stopped it early)."""


_COUNTERS = (
    "requests_admitted",
    "requests_queued",
    "requests_refused",
    "requests_cancelled",
    "requests_expired",
    "notifications_dropped",
    "frames_skipped_oversized",
    "pings_dropped",
)
_TRAFFIC = ("frames_received", "bytes_received", "frames_sent", "bytes_sent")


@dataclass(slots=True)
class MetricsSnapshot:
    """What one session, or every session of a server, counted so far: a plain copy
    with methods named, that adds up (``+=``) and that exporters read.

    Counters only grow; ``requests_running``, ``requests_waiting``, ``calls_pending``
    and ``sessions_open`` are gauges (now). A session's own snapshot counts itself in
    ``sessions`` (1) and ``sessions_open`` (1 until it closed).
    """

    frames_received: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    requests_admitted: int = 0
    requests_queued: int = 0
    requests_refused: int = 0
    requests_cancelled: int = 0
    requests_expired: int = 0
    notifications_dropped: int = 0
    frames_skipped_oversized: int = 0
    pings_dropped: int = 0
    calls_served: dict[tuple[str, str], int] = field(default_factory=dict)
    """``{("Service.method", "Ok"): count}`` of the peer's requests (``SessionStats``)."""
    calls_made: dict[tuple[str, str], int] = field(default_factory=dict)
    """``{("Service.method", "Ok"): count}`` of this side's calls (``SessionStats``)."""
    requests_running: int = 0
    """Handlers of the peer's requests running now (one that never suspended is not)."""
    requests_waiting: int = 0
    """The peer's requests waiting for a handler slot now."""
    calls_pending: int = 0
    """This side's calls waiting for their answer now."""
    sessions: int = 0
    """Sessions counted in (a server's: every one it accepted, closed ones included)."""
    sessions_open: int = 0
    """Of those, the ones still open."""

    @classmethod
    def of(
        cls,
        stats: SessionStats,
        names: Mapping[int, str],
        *,
        running: int,
        waiting: int,
        pending: int,
        is_open: bool,
    ) -> MetricsSnapshot:
        """The snapshot of one session's ``stats`` (``names``: its method names)."""
        snapshot = cls(
            calls_served=stats.calls_served.named(names),
            calls_made=stats.calls_made.named(names),
            requests_running=running,
            requests_waiting=waiting,
            calls_pending=pending,
            sessions=1,
            sessions_open=int(is_open),
        )
        for name in _COUNTERS:
            setattr(snapshot, name, getattr(stats, name))
        for name in _TRAFFIC:
            setattr(snapshot, name, getattr(stats.traffic, name))
        return snapshot

    def __iadd__(self, other: MetricsSnapshot) -> MetricsSnapshot:
        for item in dataclasses.fields(self):
            name = item.name
            mine, theirs = getattr(self, name), getattr(other, name)
            if isinstance(mine, dict):
                for key, count in theirs.items():
                    mine[key] = mine.get(key, 0) + count
            else:
                setattr(self, name, mine + theirs)
        return self

    def copy(self) -> MetricsSnapshot:
        """An independent copy (the dicts too)."""
        duplicate = dataclasses.replace(self)
        duplicate.calls_served = dict(self.calls_served)
        duplicate.calls_made = dict(self.calls_made)
        return duplicate


class Measured(Protocol):
    """Anything with a ``metrics()``: a session, a server, an ASGI endpoint."""

    def metrics(self) -> MetricsSnapshot: ...


class CountedSession(Measured, Protocol):
    """A session as a group counts it (``RpcSession``)."""

    count_calls: bool


S = TypeVar("S", bound=CountedSession)


class SessionGroup(Generic[S]):
    """What a server and an ASGI endpoint count over the sessions they accept: the open
    ones as they are now, the closed ones as they ended (folded in then, so a server's
    totals outlive its sessions), and whether they count calls by method.

    ``open_sessions`` is the owner's own set of open sessions; ``session_started`` and
    ``session_ended`` keep it and the totals.
    """

    def __init__(self, open_sessions: set[S]) -> None:
        self._open_sessions = open_sessions
        self._closed_sessions = MetricsSnapshot()
        self._count_calls = False

    @property
    def count_calls(self) -> bool:
        """Whether the sessions count calls by method and status (``RpcSession.count_calls``:
        off by default; ``rapace.metrics.PrometheusCollector`` turns it on). Set, it
        applies to the open sessions and the ones accepted from then on."""
        return self._count_calls

    @count_calls.setter
    def count_calls(self, on: bool) -> None:
        self._count_calls = on
        for session in self._open_sessions:
            session.count_calls = on

    def metrics(self) -> MetricsSnapshot:
        """What every session accepted counted, added up: the open ones as they are now,
        the closed ones as they ended (``sessions``: how many were accepted,
        ``sessions_open``: how many are open). Call it on the sessions' loop;
        ``rapace.metrics.PrometheusCollector`` exports it from any thread."""
        total = self._closed_sessions.copy()
        for session in self._open_sessions:
            total += session.metrics()
        return total

    def session_started(self, session: S) -> None:
        self._open_sessions.add(session)
        session.count_calls = self._count_calls

    def session_ended(self, session: S) -> None:
        if session in self._open_sessions:
            self._open_sessions.discard(session)
            self._closed_sessions += session.metrics()
