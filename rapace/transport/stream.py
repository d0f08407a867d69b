"""Stream transport: rapace frames over TCP, Unix sockets or any connected stream socket.

Built on ``asyncio.Protocol`` rather than streams, so bytes go straight from
``data_received`` through the frame decoder to the session, with no ``await`` and no
queue per frame. Frames sent during one loop iteration leave in one ``writelines`` call;
``send_frame`` awaits only while the socket's write buffer is over its high-water mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
from typing import TYPE_CHECKING, Any

from rapace import _impl
from rapace.errors import FrameError
from rapace.peer import Peer, peer_of
from rapace.ratelimit import RateLimitedLog
from rapace.stats import TrafficStats
from rapace.transport.base import FrameSink, TransportClosed

if TYPE_CHECKING:
    from rapace._frame_py import Frame, MsgDescHot

__all__ = ["StreamTransport"]

logger = logging.getLogger("rapace.transport")

_closing_log = RateLimitedLog(logger=logger)
"""Closing a connection for a protocol error is logged at most once a second for the
whole process (with a count of the rest): many bad connections must not flood the log."""

HANGUP_CHECK_INTERVAL = 1.0
"""Seconds between two looks at a socket whose reading the session paused: a peer that
closes meanwhile is noticed (its end of stream waits behind the unread bytes)."""

_HANGUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)

_TLS_RECORD_START = 0x0316
"""The first two bytes of a TLS handshake record (0x16 0x03) as the low half of a
little-endian length prefix: what a TLS client's first bytes look like here."""

_FLUSH_AT = 256 * 1024
"""Bytes queued within one loop iteration that make ``send_frame`` write at once."""


class StreamTransport(asyncio.Protocol):
    """One rapace connection over a byte stream (an ``asyncio.Protocol``)."""

    def __init__(self, *, max_payload_size: int | None = None) -> None:
        twin = _impl.current()
        self._decoder = (
            twin.FrameDecoder() if max_payload_size is None else twin.FrameDecoder(max_payload_size)
        )
        self._encode = twin.encode_frame
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: FrameSink | None = None  # reading waits for it (attach)
        self._early: list[Frame] = []  # decoded as reading paused, before the sink attached
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._gather_writes = False
        self._flush_scheduled = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._read_paused_by_session = False
        self._hangup_check: asyncio.TimerHandle | None = None
        self._closed = False
        self._lost = False
        self._failure: BaseException | None = None
        self._connected = asyncio.Event()
        self.peer: Any = None
        self.traffic = TrafficStats()
        """Frames and bytes read and written (counted per read and per write)."""

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._loop = asyncio.get_running_loop()
        self._connected.set()
        if self._closed:  # closed before the connection was made (e.g. a server closing)
            transport.close()
            return
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        # uvloop's writelines gathers buffers without copying. asyncio's own selector
        # transport (3.12, 3.13 before the gh-127655 fix) never pauses the protocol from
        # writelines, which would defeat write backpressure: it gets one joined write.
        # So does TLS, on either loop: each buffer written would be a TLS record of its
        # own (a frame's worth of bytes, each encrypted and sent apart).
        self._gather_writes = type(transport).__module__.startswith("uvloop") and (
            transport.get_extra_info("sslcontext") is None
        )
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # not every stream socket is TCP
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._update_reading()  # nothing is read until a sink is attached (where honoured)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        traffic = self.traffic
        traffic.bytes_received += len(data)
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            traffic.frames_received += len(exc.frames)
            self._deliver(exc.frames)  # the good frames before the bad bytes
            self._fail(exc)
            return
        traffic.frames_received += len(frames)
        self._deliver(frames)
        if self._decoder.has_skipped:
            self._skipped(self._decoder.take_skipped())
        if self._sink is None:  # some loops ignore a pause from connection_made
            self._update_reading()

    def _deliver(self, frames: list[Frame]) -> None:
        if not frames:
            return
        if self._sink is not None:
            self._sink.frames_received(frames)
        else:  # at most one read's worth: reading pauses until a sink attaches
            self._early.extend(frames)

    def _skipped(self, skipped: list[tuple[MsgDescHot, int]]) -> None:
        """Frames too large to take went by. An honest one says its own size in its
        descriptor; one that does not is garbage (lost sync): close, as for bad bytes."""
        for desc, size in skipped:
            if desc.payload_len != size:
                tls = (size + 64) & 0xFFFF == _TLS_RECORD_START
                self._fail(
                    FrameError(
                        f"a length prefix of {size + 64} bytes with a descriptor that says "
                        f"{desc.payload_len}: not a rapace stream"
                        + (" (it starts like a TLS handshake: a TLS client?)" if tls else "")
                    )
                )
                return
        if self._sink is not None:
            self._sink.frames_skipped(skipped)

    def eof_received(self) -> bool:
        held = self._decoder.buffered + self._decoder.skipping
        if held:
            self._fail(
                FrameError(f"connection closed in the middle of a frame ({held} bytes missing)")
            )
        return False  # let asyncio close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        closed_by_peer = not self._closed
        self._closed = True
        self._release_writers()
        if exc is not None and self._failure is None:
            self._failure = exc
        elif closed_by_peer and self._failure is None:
            self._failure = self._silent_tls_refusal()
        self._report_lost()

    def _silent_tls_refusal(self) -> ConnectionResetError | None:
        """Why a TLS server may have closed before sending a byte, else ``None``.

        Under TLS 1.3 a client's handshake ends before the server has checked the
        client's certificate; a server that then refuses it (or its absence) closes, and
        neither asyncio nor uvloop delivers its alert: the client sees a bare end of
        stream. A client whose server said nothing at all tells its caller what that
        usually means, rather than only "session closed".
        """
        transport = self._transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None or ssl_object.server_side or self.traffic.bytes_received:
            return None
        return ConnectionResetError(
            "the server closed the TLS connection before sending anything: a server that "
            "requires a client certificate does this when it gets none it trusts"
        )

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._release_writers()

    # -- Transport interface -----------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def max_payload_size(self) -> int:
        return self._decoder.max_payload_size

    @property
    def partial_frame_bytes(self) -> int:
        """Bytes of a frame being received (held, or still to skip): non-zero while a
        frame is on its way. Keepalive reads it to tell a slow frame from silence."""
        decoder = self._decoder
        return int(decoder.buffered + decoder.skipping)

    async def wait_connected(self) -> None:
        """Wait for ``connection_made`` (a server creates the protocol before it)."""
        await self._connected.wait()

    def describe_peer(self) -> Peer:
        """Who is connected (address, Unix credentials, TLS certificate): from the
        socket and the TLS layer, once connected."""
        if self._transport is None:
            raise TransportClosed("not connected yet")
        return peer_of(self._transport)

    def try_send_frame(self, frame: Frame) -> bool:
        """Queue ``frame`` if the socket is connected and not backpressured."""
        if self._closed or self._loop is None or self._write_paused:
            return False
        self._queue(frame, self._loop)
        return True

    def _queue(self, frame: Frame, loop: asyncio.AbstractEventLoop) -> None:
        data = self._encode(frame)
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= _FLUSH_AT:
            # A sender that never yields must still reach the socket and its backpressure.
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    async def send_frame(self, frame: Frame) -> None:
        loop = self._loop
        if self._closed or loop is None:
            raise TransportClosed(self._closed_reason() if self._closed else "not connected yet")
        self._queue(frame, loop)
        while self._write_paused and not self._closed:
            waiter = loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self._closed:
            raise TransportClosed(self._closed_reason())

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        size, self._out_bytes = self._out_bytes, 0
        if not out or self._transport is None or self._transport.is_closing():
            out.clear()
            return
        self._out = []
        traffic = self.traffic
        traffic.frames_sent += len(out)
        traffic.bytes_sent += size
        if len(out) == 1:
            self._transport.write(out[0])
        elif self._gather_writes:
            self._transport.writelines(out)
        else:
            self._transport.write(b"".join(out))

    def attach(self, sink: FrameSink) -> None:
        """Start reading: every frame from now on goes to ``sink``."""
        if self._sink is not None:
            raise RuntimeError("a sink is already attached to this transport")
        self._sink = sink
        if self._early:
            frames, self._early = self._early, []
            sink.frames_received(frames)
        self._update_reading()
        if self._closed:
            self._report_lost()

    def pause_reading(self) -> None:
        self._read_paused_by_session = True
        self._update_reading()
        if self._hangup_check is None and self._loop is not None and not self._closed:
            self._hangup_check = self._loop.call_later(HANGUP_CHECK_INTERVAL, self._look)

    def resume_reading(self) -> None:
        self._read_paused_by_session = False
        self._update_reading()
        if self._hangup_check is not None:
            self._hangup_check.cancel()
            self._hangup_check = None

    def _look(self) -> None:
        """Reading is paused: has the peer hung up (closed, or reset) meanwhile? Then the
        bytes still unread can never be answered: the connection ends now, not never."""
        self._hangup_check = None
        if self._closed or not self._read_paused_by_session or self._transport is None:
            return
        sock = self._transport.get_extra_info("socket")
        if sock is not None and _hung_up(sock.fileno()):
            logger.info(
                "rapace connection from %s: the peer hung up while reading was paused",
                self.peer,
            )
            self._failure = ConnectionResetError(
                "the peer hung up while reading from it was paused (its last frames unread)"
            )
            self._closed = True
            self._transport.abort()  # connection_lost follows from the loop
            return
        assert self._loop is not None
        self._hangup_check = self._loop.call_later(HANGUP_CHECK_INTERVAL, self._look)

    def close(self) -> None:
        """Flush what was sent, then close; the peer sees a clean end of stream."""
        if self._transport is not None and not self._transport.is_closing():
            self._flush()
            self._transport.close()
        self._closed = True
        self._release_writers()

    def abort(self) -> None:
        """Close at once, dropping unsent data."""
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
        self._release_writers()

    # -- internals ---------------------------------------------------------------------------

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._sink is None or self._read_paused_by_session:
            if transport.is_reading():
                transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()

    def _fail(self, exc: BaseException) -> None:
        """The peer broke the protocol: log it, close this connection only."""
        _closing_log("closing rapace connection from %s: %s", self.peer, exc)
        self._failure = exc
        self._closed = True
        if self._transport is not None:
            self._transport.abort()  # connection_lost follows from the loop

    def _closed_reason(self) -> str:
        if self._failure is not None:
            return f"connection closed: {self._failure}"
        return "connection closed"

    def _release_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _report_lost(self) -> None:
        if self._sink is not None and not self._lost and self._closed:
            self._lost = True
            self._sink.connection_lost(self._failure)


def _hung_up(fd: int) -> bool:
    """Whether the peer of socket ``fd`` closed or reset it (data may still be unread)."""
    poller = select.poll()
    poller.register(fd, _HANGUP)
    return any(events & _HANGUP for _, events in poller.poll(0))
