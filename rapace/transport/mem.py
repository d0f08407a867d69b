"""In-memory transport: two connected ends in one event loop, for tests and in-process peers.

Each direction holds at most ``max_in_flight`` frames (64, as the Rust mem transport);
a sender waits while the peer's inbox is full, which it stays until a sink is attached
and reading is not paused. Frames sent during one loop iteration are delivered together
in the next one, as a socket would, so the session routes them in one batch without an
``await`` per frame.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from rapace.stats import TrafficStats
from rapace.transport.base import FrameSink, TransportClosed

if TYPE_CHECKING:
    from rapace._frame_py import Frame

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "MemTransport", "mem_pair"]

DEFAULT_MAX_IN_FLIGHT = 64


class MemTransport:
    """One end of an in-memory connection; create pairs with ``mem_pair()``."""

    def __init__(self, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._max_in_flight = max_in_flight
        self._loop: asyncio.AbstractEventLoop | None = None
        self._peer: MemTransport | None = None
        self._inbox: collections.deque[Frame] = collections.deque()
        self._sink: FrameSink | None = None
        self._delivery_scheduled = False
        self._paused = False
        self._closed = False
        self._eof = False  # the peer closed: deliver what is queued, then end
        self._lost_reported = False
        self._space_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.traffic = TrafficStats()
        """Frames delivered (counted per batch; no bytes: frames travel as objects)."""

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        """The loop, looked up once (``get_running_loop`` costs a syscall on 3.11)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    # -- sending -------------------------------------------------------------------------

    def try_send_frame(self, frame: Frame) -> bool:
        """Queue ``frame`` for the peer if its inbox has room and nobody waits before us."""
        peer = self._peer
        if (
            self._closed
            or peer is None
            or peer._closed
            or len(peer._inbox) >= peer._max_in_flight
            or peer._space_waiters  # senders already waiting go first
        ):
            return False
        peer._inbox.append(frame)
        if not peer._delivery_scheduled:  # else: a delivery is due
            peer._wake_receiver()
        return True

    async def send_frame(self, frame: Frame) -> None:
        peer = self._peer
        if self._closed or peer is None or peer._closed:
            raise TransportClosed("mem transport is closed")
        queued_before = False
        while len(peer._inbox) >= peer._max_in_flight:
            waiter = self._get_loop().create_future()
            # A sender woken but beaten to the space keeps its place at the front, so a
            # fast producer cannot starve the others.
            if queued_before:
                peer._space_waiters.appendleft(waiter)
            else:
                peer._space_waiters.append(waiter)
            queued_before = True
            await waiter
            if self._closed or peer._closed:
                raise TransportClosed("mem transport is closed")
        peer._inbox.append(frame)
        peer._wake_receiver()

    # -- receiving -----------------------------------------------------------------------

    def attach(self, sink: FrameSink) -> None:
        if self._sink is not None:
            raise RuntimeError("a sink is already attached to this transport")
        self._sink = sink
        if self._closed:
            self._report_lost(None)
        else:
            self._wake_receiver()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._wake_receiver()

    def _wake_receiver(self) -> None:
        if self._sink is not None and not self._delivery_scheduled:
            self._delivery_scheduled = True
            self._get_loop().call_soon(self._deliver)

    def _deliver(self) -> None:
        self._delivery_scheduled = False
        sink = self._sink
        if sink is None or self._closed:
            return
        if not self._paused and self._inbox:
            frames = list(self._inbox)
            self._inbox.clear()
            self._release_space()
            self.traffic.frames_received += len(frames)
            if self._peer is not None:
                self._peer.traffic.frames_sent += len(frames)
            sink.frames_received(frames)
        if self._eof and not self._inbox:
            self._report_lost(None)

    def _release_space(self) -> None:
        """Wake as many blocked senders as there are free slots, first come first served."""
        waiters = self._space_waiters
        free = self._max_in_flight - len(self._inbox)
        while waiters and free > 0:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Close this end; the peer delivers what it already has, then sees the end."""
        if self._closed:
            return
        self._closed = True
        self._inbox.clear()
        self._fail_waiters()
        self._report_lost(None)
        peer = self._peer
        if peer is not None and not peer._closed:
            peer._eof = True
            peer._fail_waiters()
            peer._wake_receiver()

    def _fail_waiters(self) -> None:
        while self._space_waiters:
            waiter = self._space_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the sender re-checks and raises TransportClosed

    def _report_lost(self, exc: BaseException | None) -> None:
        if self._sink is not None and not self._lost_reported:
            self._lost_reported = True
            self._sink.connection_lost(exc)


def mem_pair(max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> tuple[MemTransport, MemTransport]:
    """Two connected in-memory transports (``a`` sends to ``b`` and back)."""
    a = MemTransport(max_in_flight)
    b = MemTransport(max_in_flight)
    a._peer = b
    b._peer = a
    return a, b
