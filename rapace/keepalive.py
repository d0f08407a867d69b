"""Liveness of one session: ``Ping``/``Pong``, round trips, and peers that went silent.

A peer can stop without closing its connection: its process is stopped or wedged, its
host lost power, a firewall drops its packets. The socket stays open, and without this
module every call to it waits for its own timeout (forever without one), and a server
keeps the session and its handlers of a client that is gone. ``Liveness`` notices:

- **Keepalive** (``interval``, ``timeout``): every ``interval`` seconds this side sends
  the peer a ``Ping`` (a heartbeat, whatever else flows); a peer that speaks the control
  channel does the same and answers pings, so from a live one something arrives at least
  every ``interval``. When nothing at all arrives for ``interval + timeout`` seconds (any
  frame is a sign of life, as is progress on a frame being received), the peer is dead:
  the session closes and every pending call fails at once with ``SessionClosed`` naming
  keepalive. The heartbeat goes both ways, so a ping of this side's stuck behind
  megabytes in its own send buffer cannot make a live peer look dead: the peer's own
  heartbeats come the other way.
- **Idle timeout** (``idle_timeout``, a server's guard): a peer that completes no frame
  for that long, while this side does nothing for it (no handler running, no tunnel
  open), is closed, whatever bytes it trickles.
- **Frame timeout** (``frame_timeout``): a frame whose first bytes arrived must be
  complete within that long (a slowloris peer holds a connection with a frame it never
  finishes).

Cost: the session bumps one counter per batch of frames it receives (not per frame, no
clock read); a loop timer every ``tick`` seconds compares it with what it saw last time.
The per-call path is untouched.

A peer that does not speak the control channel (the Rust implementation ignores control
frames, ``docs/protocol.md`` §5 and §10) never answers a ``Ping``, so silence after a ``Ping``
proves nothing about it: a live but idle Rust peer would be killed. Hence: the peer
*proves* that it speaks the control channel by sending a ``Pong`` or a ``Ping``. A
connecting side probes with one ``Ping`` at its first tick (``probe``), so a rapace
server is proven within a round trip of that, and the server is proven to the client
too by that ping; an accepting side does not probe (a raw client sees no frame it did
not ask for) but pings after silence like any side, and an answer proves the client.
Only a proven peer is ever declared dead by keepalive; an unproven one is pinged again
after each timeout, never judged, and left to call timeouts and, on a server, to
``idle_timeout``.

Keepalive makes no judgement while this side has paused reading (its own backpressure:
the peer's frames wait in the kernel, not the peer), and skips a heartbeat while the
transport refuses a no-wait send (the peer is not reading what this side writes), so it
never kills a slow consumer for being slow. A peer with keepalive off sends no
heartbeats: it is judged by its answers to this side's pings alone, which can queue
behind a long upload.

``Ping`` is always answered (keepalive on or off) with a ``Pong`` carrying its bytes:
at once when the transport takes it, else by one of at most ``MAX_PONGS_WAITING`` sends
that wait for the peer to read; pings beyond that are dropped with a rate-limited
warning, so a peer that floods pings and reads nothing costs bounded memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from rapace.control import ControlMessage, Ping, Pong
from rapace.errors import DeadlineExceeded, RpcError
from rapace.ratelimit import RateLimitedLog

if TYPE_CHECKING:
    from rapace._frame_py import Frame
    from rapace.channel import ChannelPort
    from rapace.stats import SessionStats

__all__ = [
    "DEFAULT_FRAME_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_KEEPALIVE",
    "MAX_PONGS_WAITING",
    "Liveness",
    "PeerUnresponsive",
    "check_options",
]

logger = logging.getLogger("rapace.session")

DEFAULT_KEEPALIVE: Final = 10.0
"""Seconds between two heartbeats of ``connect``/``serve`` sessions (the timeout defaults
to the same): a dead peer is noticed within about ``2 * 10 s + a tick`` (22.5 s), before
the default 30 s call timeout would fire; a live one costs one 64-byte frame each way
per 10 s."""

DEFAULT_IDLE_TIMEOUT: Final = 120.0
"""Seconds a ``serve`` connection may complete no frame before it is closed. A rapace
peer is never idle that long (keepalive pings it, it answers); one that ignores control
frames and sends nothing for two minutes is closed, which frees what it holds."""

DEFAULT_FRAME_TIMEOUT: Final = 30.0
"""Seconds a frame may take to arrive once its first byte has (``connect`` and
``serve``): a 1 MiB frame needs only 35 KB/s; a slowloris peer is cut off at 30 s."""

MAX_PONGS_WAITING: Final = 16
"""Pongs that may wait for the peer to read before further pings are dropped."""

_PAYLOAD: Final = struct.Struct("<Q")

# Closing reasons are logged at most once a second for the whole process (with a count of
# those skipped): a network partition, or a slowloris attack, must not flood the log
# with one line per connection. Every caller still gets the reason in its error.
_dead_log = RateLimitedLog(logging.WARNING, logger=logger)
_idle_log = RateLimitedLog(logging.INFO, logger=logger)
_slow_log = RateLimitedLog(logging.WARNING, logger=logger)


class PeerUnresponsive(ConnectionError):
    """The peer showed no sign of life (keepalive), or completed no frame (idle, frame
    timeout), for too long: the session closed the connection."""


class Liveness:
    """Answers pings, measures round trips and watches one session's peer.

    ``received()`` is the session's count of frame batches received; ``partial()`` the
    bytes of a frame being received (the transport's, 0 where there is no such thing);
    ``reading_paused()`` whether this side stopped reading; ``busy()`` whether it works
    for the peer (then it is not idle); ``probe`` whether to ping at the first tick;
    ``stats`` counts the pings dropped; ``peer()`` who the peer is (for log lines);
    ``on_dead(error)`` closes the session. Timeouts are seconds, ``None`` to disable.
    """

    __slots__ = (
        "_busy",
        "_flood_log",
        "_frame_timeout",
        "_handle",
        "_heartbeat_at",
        "_idle_timeout",
        "_interval",
        "_last_frame",
        "_last_sign",
        "_loop",
        "_next_payload",
        "_on_dead",
        "_partial",
        "_partial_at",
        "_partial_since",
        "_peer",
        "_pings",
        "_pongs",
        "_port",
        "_probed",
        "_reading_paused",
        "_received",
        "_seen",
        "_stats",
        "_timeout",
        "closed",
        "proven",
        "tick",
    )

    def __init__(
        self,
        port: ChannelPort,
        received: Callable[[], int],
        on_dead: Callable[[PeerUnresponsive], None],
        *,
        interval: float | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
        frame_timeout: float | None = None,
        partial: Callable[[], int] | None = None,
        reading_paused: Callable[[], bool] | None = None,
        peer: Callable[[], object] | None = None,
        probe: bool = True,
        stats: SessionStats | None = None,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        (
            self._interval,
            self._timeout,
            self._idle_timeout,
            self._frame_timeout,
        ) = check_options(interval, timeout, idle_timeout, frame_timeout)
        bounds = [
            b
            for b in (self._interval, self._timeout, self._idle_timeout, self._frame_timeout)
            if b is not None
        ]
        self.tick: float | None = min(bounds) / 4 if bounds else None
        """Seconds between two looks at the peer (``None``: nothing is watched)."""
        self._port = port
        self._received = received
        self._on_dead = on_dead
        self._partial = partial or _nothing
        self._reading_paused = reading_paused or _never
        self._peer = peer or _nothing
        self._busy = busy or _never
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._seen = 0
        self._partial_at = 0
        self._last_frame = self._last_sign = 0.0
        self._heartbeat_at = -math.inf  # when this side's last heartbeat left
        self._partial_since: float | None = None
        self._probed = not probe
        self.proven = False
        """Whether the peer speaks the control channel (it sent a Ping or a Pong)."""
        self.closed = False
        self._next_payload = itertools.count(1)
        self._pings: dict[bytes, tuple[asyncio.Future[float], float]] = {}
        self._pongs: set[asyncio.Task[None]] = set()
        self._flood_log = RateLimitedLog(logger=logger)
        self._stats = stats

    # -- the control verbs ---------------------------------------------------------------

    def on_ping(self, message: ControlMessage) -> None:
        """Answer a ``Ping`` with a ``Pong`` of its bytes, within the bound."""
        assert isinstance(message, Ping)
        self.proven = True
        if self.closed:
            return
        port = self._port
        pong = port.frames.control(Pong(message.payload))
        if port.try_send(pong):
            return
        if len(self._pongs) >= MAX_PONGS_WAITING:
            if self._stats is not None:
                self._stats.pings_dropped += 1
            self._flood_log(
                "dropping a ping from %s: %d pongs already wait for it to read",
                self._peer(),
                len(self._pongs),
            )
            return
        task = asyncio.get_running_loop().create_task(self._send_pong(pong))
        self._pongs.add(task)
        task.add_done_callback(self._pongs.discard)

    async def _send_pong(self, pong: Frame) -> None:
        try:
            await self._port.send(pong)
        except (RpcError, ConnectionError):
            logger.debug("could not send a pong to %s", self._peer())

    def on_pong(self, message: ControlMessage) -> None:
        """A ``Pong``: the peer is alive and speaks the control channel; if it answers a
        ``ping()``, that call has its round trip."""
        assert isinstance(message, Pong)
        self.proven = True
        waiting = self._pings.pop(message.payload, None)
        if waiting is None:
            return  # a keepalive probe's, or one whose ping() gave up
        waiter, sent_at = waiting
        if not waiter.done():
            waiter.set_result(time.perf_counter() - sent_at)

    async def ping(self, timeout: float) -> float:
        """Send a ``Ping`` and return the seconds until its ``Pong`` arrived.

        ``DeadlineExceeded`` when none arrives within ``timeout`` seconds (a peer that
        does not speak the control channel never answers); the session's closed error
        if it closes meanwhile.
        """
        loop = asyncio.get_running_loop()
        payload = _PAYLOAD.pack(next(self._next_payload))
        waiter: asyncio.Future[float] = loop.create_future()
        self._pings[payload] = (waiter, time.perf_counter())  # (uvloop's clock: ms)
        try:
            async with asyncio.timeout(timeout):
                frame = self._port.frames.control(Ping(payload))
                if not self._port.try_send(frame):
                    await self._port.send(frame)
                return await waiter
        except TimeoutError:
            raise DeadlineExceeded(f"ping: no pong from the peer within {timeout:g} s") from None
        finally:
            self._pings.pop(payload, None)

    # -- watching the peer ---------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching (the session's ``run()`` does, once the transport is attached)."""
        if self.tick is None or self.closed or self._handle is not None:
            return
        self._loop = loop
        now = loop.time()
        self._seen = self._received()
        self._partial_at = self._partial()
        # The first heartbeat goes one interval from now (a connecting side's probe at
        # its first look): an accepting side sends nothing unasked before that.
        self._last_frame = self._last_sign = self._heartbeat_at = now
        self._handle = loop.call_at(now + self.tick, self._look)

    def close(self, error: BaseException) -> None:
        """The session closed: stop watching; ``ping()`` calls fail with ``error``."""
        self.closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        pings, self._pings = self._pings, {}
        for waiter, _ in pings.values():
            if not waiter.done():
                waiter.set_exception(error)
        for task in list(self._pongs):
            task.cancel()

    def _look(self) -> None:
        """One look at the peer, every ``tick`` seconds."""
        loop = self._loop
        assert loop is not None and self.tick is not None
        self._handle = None
        if self.closed:
            return
        now = loop.time()
        seen = self._received()
        partial = self._partial()
        if self._reading_paused():
            # This side is not reading: silence is its own doing. Judge nothing.
            self._last_frame = self._last_sign = now
            self._partial_since = None
        elif seen != self._seen:
            self._last_frame = self._last_sign = now
            self._partial_since = now if partial else None  # a new frame, if any
        elif partial != self._partial_at:
            self._last_sign = now  # bytes arrive: a frame is on its way
            if self._partial_since is None:
                self._partial_since = now
        if self._idle_timeout is not None and self._busy():
            self._last_frame = now  # working for the peer: not idle
        self._seen, self._partial_at = seen, partial
        error = self._verdict(now, partial)
        if error is not None:
            self._on_dead(error)
            return
        self._handle = loop.call_at(now + self.tick, self._look)

    def _verdict(self, now: float, partial: int) -> PeerUnresponsive | None:
        """Why the peer counts as dead now, or ``None`` (sending a ping if it is due)."""
        idle = self._idle_timeout
        if idle is not None and now - self._last_frame >= idle:
            _idle_log(
                "closing rapace connection from %s: idle: no frame for %g s", self._peer(), idle
            )
            return PeerUnresponsive(f"idle: no frame from the peer for {idle:g} s")
        frame_timeout = self._frame_timeout
        since = self._partial_since
        if (
            frame_timeout is not None
            and partial
            and since is not None
            and now - since >= frame_timeout
        ):
            _slow_log(
                "closing rapace connection from %s: a frame took over %g s to arrive",
                self._peer(),
                frame_timeout,
            )
            return PeerUnresponsive(
                f"frame timeout: a frame from the peer took over {frame_timeout:g} s"
            )
        interval, timeout = self._interval, self._timeout
        if interval is None or timeout is None:
            return None
        silence = interval + timeout
        if self.proven and now - self._last_sign >= silence:
            _dead_log(
                "closing rapace connection to %s: keepalive: no frame from the peer for %g s",
                self._peer(),
                silence,
            )
            return PeerUnresponsive(f"keepalive: no frame from the peer for {silence:g} s")
        # The first look probes (a rapace peer proves itself by its pong); then a
        # heartbeat every interval. One the transport cannot take now waits a tick.
        due = not self._probed or now - self._heartbeat_at >= interval
        if due and self._port.try_send(self._port.frames.control(Ping(self._payload()))):
            self._probed = True
            self._heartbeat_at = now
        return None

    def _payload(self) -> bytes:
        return _PAYLOAD.pack(next(self._next_payload))


def _nothing() -> int:
    return 0


def _never() -> bool:
    return False


def check_options(
    keepalive: float | None,
    keepalive_timeout: float | None,
    idle_timeout: float | None,
    frame_timeout: float | None,
) -> tuple[float | None, float | None, float | None, float | None]:
    """The four bounds as floats, the keepalive timeout defaulting to the interval;
    ``TypeError``/``ValueError`` for a bad one (``connect``/``serve`` check before they
    open anything)."""
    interval = _check("keepalive", keepalive)
    timeout = _check("keepalive_timeout", keepalive_timeout)
    if timeout is not None and interval is None:
        raise ValueError("keepalive_timeout needs keepalive (the ping interval)")
    if interval is not None and timeout is None:
        timeout = interval
    return (
        interval,
        timeout,
        _check("idle_timeout", idle_timeout),
        _check("frame_timeout", frame_timeout),
    )


def _check(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return float(value)
