"""Tunnels: the receiving end of a channel (``TunnelReceiver``) and ``TunnelStream``.

A ``TunnelReceiver`` is a bounded receiver of the chunks routed to one channel. It never
drops a chunk: when its buffer holds ``capacity`` chunks it asks its ``ChannelPort`` to
pause reading the transport, and resumes it once the reader has drained half of them, so
a slow reader holds memory bounded without stalling other tasks on the loop. Both classes
reach the session only through that port.

**Extension** (the control channel, ``rapace.named``): a peer may end a channel with
``CloseChannel``. ``Error(reason)`` aborts it: once the chunks already received are read,
reads raise ``TunnelAborted(reason)`` instead of ending cleanly, and writes raise it too.
``Normal`` is a full close: reads end cleanly, writing is over. ``TunnelStream.abort``
sends the former.

**Extension** (credits, negotiated per named tunnel by ``rapace.named``): on a
credit-controlled channel the receiver's buffer is bounded in bytes by its window instead
of pausing the whole transport; it grants the bytes back (``GrantCredits``) as its reader
consumes them, and the ``TunnelStream`` writer sends only the bytes it was granted (a
chunk larger than the credit goes out in pieces). A slow reader then stalls only its own
tunnel's writer, not the connection.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from rapace.control import CloseChannel, CloseError, CloseNormal
from rapace.errors import SessionClosed, TunnelAborted, parse_error_payload
from rapace.frames import CANCEL as _CANCEL
from rapace.frames import DATA as _DATA
from rapace.frames import EOS as _EOS
from rapace.frames import ERROR as _ERROR

if TYPE_CHECKING:
    from rapace._frame_py import Frame
    from rapace.channel import ChannelPort

__all__ = [
    "DEFAULT_TUNNEL_CAPACITY",
    "Tunnel",
    "TunnelChunk",
    "TunnelReceiver",
    "TunnelStream",
    "forward",
]

logger = logging.getLogger("rapace.session")

DEFAULT_TUNNEL_CAPACITY = 64
"""Chunks a tunnel buffers before reading pauses (as the Rust session's channel of 64)."""

DEFAULT_WRITE_CHUNK_SIZE = 64 * 1024
"""``TunnelStream.write`` splits data into frames of at most this many payload bytes."""

_U32_MAX = 0xFFFFFFFF
_CHUNKS_PER_WINDOW_KIB = 1024
"""On a credit-controlled channel the window bounds the bytes; the chunk count that still
pauses reading (a peer sending many tiny chunks) grows with it: one per KiB of window."""


class TunnelChunk:
    """One frame received on a tunnel: its payload and whether it ends or fails the stream."""

    __slots__ = ("frame",)

    def __init__(self, frame: Frame) -> None:
        self.frame = frame

    @property
    def payload(self) -> bytes:
        return self.frame.payload

    @property
    def is_eos(self) -> bool:
        return bool(self.frame.desc.flags & _EOS)

    @property
    def is_error(self) -> bool:
        return bool(self.frame.desc.flags & _ERROR)

    @property
    def is_cancel(self) -> bool:
        """The peer stopped the stream on this channel (a client leaving a server stream)."""
        return bool(self.frame.desc.flags & _CANCEL)

    def __repr__(self) -> str:
        return (
            f"TunnelChunk(channel_id={self.frame.desc.channel_id}, payload={self.payload!r}, "
            f"is_eos={self.is_eos}, is_error={self.is_error})"
        )


class TunnelReceiver:
    """Chunks arriving on one channel: ``await recv()`` or ``async for chunk in receiver``.

    ``recv()`` returns ``None`` once the stream has ended (after the chunk carrying EOS,
    or after ``close()``). If the session dies first, it raises ``SessionClosed``: a
    stream cut short is never mistaken for a complete one.
    """

    def __init__(
        self, port: ChannelPort, channel_id: int, capacity: int = DEFAULT_TUNNEL_CAPACITY
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._port = port
        self._channel_id = channel_id
        self._capacity = capacity
        self._resume_at = capacity // 2
        self._chunks: collections.deque[TunnelChunk] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._failure: BaseException | None = None
        self._blocking = False
        self._aborted: str | None = None  # the reason the peer (or this side) aborted
        self._closed_by_peer = False  # CloseChannel from the peer: writing is over too
        self._base_capacity = capacity
        # Credits (None: not credit-controlled): the window, the bytes the peer may still
        # send, the bytes read since the last grant, and how to grant / refuse.
        self._window: int | None = None
        self._credit_left = 0
        self._consumed = 0
        self._buffered_bytes = 0
        self._grant: Callable[[int], None] | None = None
        self._overrun: Callable[[str], None] | None = None

    @property
    def channel_id(self) -> int:
        return self._channel_id

    @property
    def closed_by_peer(self) -> bool:
        """The peer ended the channel with ``CloseChannel`` (it reads nothing more)."""
        return self._closed_by_peer

    @property
    def aborted(self) -> str | None:
        """Why the channel was aborted, or ``None`` (not aborted)."""
        return self._aborted

    @property
    def port(self) -> ChannelPort:
        """The session this receiver's channel belongs to."""
        return self._port

    @property
    def buffered(self) -> int:
        """Chunks received and not yet read."""
        return len(self._chunks)

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes received and not yet read."""
        return self._buffered_bytes

    @property
    def ended(self) -> bool:
        """No more chunks will be taken (EOS came, the channel was closed or aborted)."""
        return self._ended

    @property
    def holds_memory(self) -> bool:
        """Chunks may still arrive, or wait to be read."""
        return not self._ended or bool(self._chunks)

    @property
    def credit_window(self) -> int | None:
        """The bytes the peer may have outstanding on this channel (None: no credits)."""
        return self._window

    def use_credits(
        self, window: int, grant: Callable[[int], None], overrun: Callable[[str], None]
    ) -> None:
        """Make this channel credit-controlled: the peer may send ``window`` bytes; each
        time the reader has consumed half of it, ``grant(n)`` gives ``n`` back. A peer
        that sends past its credit is refused with ``overrun(reason)`` (memory stays
        bounded by the window)."""
        if not 1 <= window <= _U32_MAX:
            raise ValueError(f"a credit window is 1..{_U32_MAX} bytes, got {window}")
        self._window = window
        self._credit_left = window - self._buffered_bytes  # (what came before counts)
        self._consumed = 0
        self._grant = grant
        self._overrun = overrun
        self._capacity = max(self._base_capacity, window // _CHUNKS_PER_WINDOW_KIB)
        self._resume_at = self._capacity // 2
        if self._blocking and len(self._chunks) <= self._resume_at:
            self._unblock()
        if self._credit_left < 0:
            overrun(
                f"{self._buffered_bytes} bytes sent on channel {self._channel_id} "
                f"with a window of {window}"
            )

    def deliver(self, frame: Frame) -> None:
        """Take one routed frame (the demux has already unregistered us if it has EOS)."""
        if self._ended:
            return
        flags = frame.desc.flags
        if flags & _DATA:
            size = len(frame.payload)
            if self._window is not None and size:
                left = self._credit_left - size
                if left < 0:
                    assert self._overrun is not None
                    self._overrun(
                        f"{size} bytes sent on channel {self._channel_id} with "
                        f"{self._credit_left} bytes of credit left"
                    )
                    return
                self._credit_left = left
            self._buffered_bytes += size
        self._chunks.append(TunnelChunk(frame))
        if flags & _EOS:
            self._ended = True
        elif len(self._chunks) >= self._capacity and not self._blocking:
            self._blocking = True
            self._port.reader_blocked()
        self._wake()

    def finish(self, failure: BaseException | None) -> None:
        """No more chunks will come: the session closed (failure) or the tunnel was dropped."""
        if not self._ended:
            self._ended = True
            self._failure = failure
        self._unblock()
        self._wake()

    def abort(self, reason: str, *, by_peer: bool = True) -> None:
        """The channel was aborted: what is buffered can still be read, then every read
        raises ``TunnelAborted(reason)``. Unlike ``finish``, this is never a clean end,
        even after the peer's EOS: the peer says the whole exchange failed."""
        if by_peer:
            self._closed_by_peer = True
        self._ended = True
        if self._aborted is None:
            self._aborted = reason
        self._unblock()
        self._wake()

    def closed_by_peer_normally(self) -> None:
        """The peer's ``CloseChannel(Normal)``: a full close. Reads end cleanly once the
        buffer is read; the peer takes no more chunks."""
        self._closed_by_peer = True
        self.finish(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _unblock(self) -> None:
        if self._blocking:
            self._blocking = False
            self._port.reader_unblocked()

    # -- reading ---------------------------------------------------------------------------

    async def recv(self) -> TunnelChunk | None:
        """The next chunk, or ``None`` at the end of the stream."""
        chunks = self._chunks
        while not chunks:
            if self._ended:
                if self._aborted is not None:
                    raise TunnelAborted(self._aborted)
                if self._failure is not None:
                    raise SessionClosed(
                        f"session closed before tunnel {self._channel_id} ended"
                    ) from self._failure
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = chunks.popleft()
        if chunk.frame.desc.flags & _DATA:
            size = len(chunk.payload)
            self._buffered_bytes -= size
            window = self._window
            if window is not None and size and not self._ended:
                consumed = self._consumed = self._consumed + size
                if consumed >= (window + 1) // 2:
                    self._consumed = 0
                    self._credit_left += consumed
                    assert self._grant is not None
                    self._grant(consumed)
        if self._blocking and len(chunks) <= self._resume_at:
            self._unblock()
        return chunk

    def __aiter__(self) -> AsyncIterator[TunnelChunk]:
        return self

    async def __anext__(self) -> TunnelChunk:
        chunk = await self.recv()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    def close(self) -> None:
        """Stop receiving: unregister the channel and drop what is buffered."""
        self._port.discard_tunnel(self)
        self._chunks.clear()
        self.finish(None)


class TunnelStream:
    """A byte stream over one channel, shaped like an asyncio ``StreamReader``/``StreamWriter``.

    Reading: ``read(n)``, ``readexactly(n)``, ``readuntil(sep)``, ``readline()``,
    ``at_eof()`` and ``async for chunk in stream``. Writing: ``write(data)`` then
    ``await drain()``, ``write_eof()`` (half-close), ``close()`` and ``wait_closed()``.
    Frame boundaries are not message boundaries. Closing the stream, or dropping it,
    unregisters the channel and half-closes the write side if it was still open.
    ``abort(reason)`` ends it as failed instead (the peer's reads raise ``TunnelAborted``).

    ``receiver`` is the channel's receiver when it is already registered (a named tunnel
    the peer opened: its chunks were held there since the ``OpenChannel``); by default the
    stream registers one. ``metadata`` is what the opener sent with ``OpenChannel``.
    """

    def __init__(
        self,
        port: ChannelPort,
        channel_id: int,
        *,
        write_chunk_size: int = DEFAULT_WRITE_CHUNK_SIZE,
        receiver: TunnelReceiver | None = None,
        metadata: list[tuple[str, bytes]] | None = None,
    ) -> None:
        if write_chunk_size < 1:
            raise ValueError(f"write_chunk_size must be at least 1, got {write_chunk_size}")
        if receiver is not None and receiver.channel_id != channel_id:
            raise ValueError(f"the receiver is on channel {receiver.channel_id}, not {channel_id}")
        self._port = port
        self._channel_id = channel_id
        self._receiver = port.register_tunnel(channel_id) if receiver is None else receiver
        self._metadata: list[tuple[str, bytes]] = list(metadata) if metadata else []
        self._write_chunk_size = write_chunk_size
        self._read_buffer = bytearray()
        self._read_eof = False
        # Chunks waiting for the transport, in order: frames, or (credit-controlled) the
        # payloads, framed as the credit allows.
        self._unsent: collections.deque[Frame | bytes] = collections.deque()
        self._credit: int | None = None  # bytes the peer lets us send (None: no credits)
        self._credit_waiter: asyncio.Future[None] | None = None
        # Closed before the peer's EOS, on a credit-controlled channel: after our EOS,
        # tell the peer (CloseChannel(Normal)) that nobody reads, so its writer, waiting
        # for credit this side will never grant, stops instead of hanging.
        self._close_notice = False
        self._write_eof_pending = False
        self._write_closed = False
        self._flusher: asyncio.Task[None] | None = None
        self._write_error: BaseException | None = None
        self._closed = False

    @property
    def channel_id(self) -> int:
        return self._channel_id

    @property
    def receiver(self) -> TunnelReceiver:
        """The receiver of this stream's channel (its buffer, its credits)."""
        return self._receiver

    @property
    def metadata(self) -> list[tuple[str, bytes]]:
        """The ``(key, value)`` pairs the opener sent with ``OpenChannel`` (in order;
        empty for a tunnel that was not opened by name)."""
        return self._metadata

    # -- reading -------------------------------------------------------------------------

    async def _next_payload(self) -> bytes:
        """The next chunk's bytes (skipping empty ones); ``b""`` at EOF."""
        while not self._read_eof:
            chunk = await self._receiver.recv()
            if chunk is None:
                self._read_eof = True
                break
            if chunk.is_error:
                self._read_eof = True
                raise parse_error_payload(chunk.payload)
            if chunk.is_eos:
                self._read_eof = True
            if chunk.payload:
                return chunk.payload
        aborted = self._receiver.aborted
        if aborted is not None:  # (after the peer's EOS too: the exchange failed)
            raise TunnelAborted(aborted)
        return b""

    async def _fill(self) -> bool:
        """Append the next chunk's bytes to the read buffer; False at EOF."""
        payload = await self._next_payload()
        self._read_buffer += payload
        return bool(payload)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (at least one unless at EOF); ``n < 0`` reads to EOF."""
        if n == 0:
            return b""
        if n < 0:
            while await self._fill():
                pass
            data = bytes(self._read_buffer)
            self._read_buffer.clear()
            return data
        if not self._read_buffer:
            payload = await self._next_payload()
            if len(payload) <= n:
                return payload  # a whole chunk, handed over without a copy
            self._read_buffer += payload
        data = bytes(self._read_buffer[:n])
        del self._read_buffer[:n]
        return data

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; ``asyncio.IncompleteReadError`` if EOF comes first."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        while len(self._read_buffer) < n:
            if not await self._fill():
                partial = bytes(self._read_buffer)
                self._read_buffer.clear()
                raise asyncio.IncompleteReadError(partial, n)
        data = bytes(self._read_buffer[:n])
        del self._read_buffer[:n]
        return data

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Bytes up to and including ``separator``; ``IncompleteReadError`` at EOF."""
        if not separator:
            raise ValueError("separator should be at least one-byte string")
        start = 0
        while True:
            index = self._read_buffer.find(separator, start)
            if index >= 0:
                end = index + len(separator)
                data = bytes(self._read_buffer[:end])
                del self._read_buffer[:end]
                return data
            start = max(0, len(self._read_buffer) - len(separator) + 1)
            if not await self._fill():
                partial = bytes(self._read_buffer)
                self._read_buffer.clear()
                raise asyncio.IncompleteReadError(partial, None)

    async def readline(self) -> bytes:
        """A line ending in ``\\n``, or what is left at EOF."""
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial

    def at_eof(self) -> bool:
        return self._read_eof and not self._read_buffer

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        """The bytes of each chunk as it arrives (after anything already buffered)."""
        if self._read_buffer:
            data = bytes(self._read_buffer)
            self._read_buffer.clear()
            return data
        payload = await self._next_payload()
        if not payload:
            raise StopAsyncIteration
        return payload

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` (in chunks of at most ``write_chunk_size`` bytes).

        Chunks go to the transport at once while it accepts them; the rest wait in order
        and go out in the background. ``await drain()`` waits for them.
        """
        self._check_peer()
        if self._write_error is not None:
            raise self._write_error
        if self._write_closed or self._write_eof_pending:
            raise RuntimeError(f"tunnel {self._channel_id} is closed for writing")
        size = self._write_chunk_size
        if type(data) is bytes and len(data) <= size:
            if data:
                self._queue(data)
            return
        view = memoryview(data).cast("B")
        for start in range(0, len(view), size):
            self._queue(bytes(view[start : start + size]))

    def _check_peer(self) -> None:
        """Writing into a channel the peer ended fails: it would drop the bytes."""
        receiver = self._receiver
        if receiver.closed_by_peer and self._write_error is None:
            self._unsent.clear()
            reason = receiver.aborted
            if reason is not None:
                self._write_error = TunnelAborted(reason)
            else:
                self._write_closed = True
                self._write_error = BrokenPipeError(
                    f"tunnel {self._channel_id} was closed by the peer"
                )

    def _queue(self, chunk: bytes) -> None:
        port = self._port
        credit = self._credit
        if credit is not None:
            size = len(chunk)
            if (
                not self._unsent
                and credit >= size
                and port.try_send(port.frames.chunk(self._channel_id, chunk))
            ):
                self._credit = credit - size
                return
            self._unsent.append(chunk)
            self._start_flusher()
            return
        frame = port.frames.chunk(self._channel_id, chunk)
        if not self._unsent and port.try_send(frame):
            return
        self._unsent.append(frame)
        self._start_flusher()

    # -- credits ---------------------------------------------------------------------------

    @property
    def send_credit(self) -> int | None:
        """Bytes this side may still send (None: the channel is not credit-controlled)."""
        return self._credit

    def use_credits(self, credit: int) -> None:
        """Make writing credit-controlled: ``credit`` bytes may go out before the peer
        grants more (``add_credit``)."""
        self._credit = min(max(credit, 0), _U32_MAX)

    def add_credit(self, granted: int) -> None:
        """The peer granted ``granted`` more bytes (sums are capped at u32: a peer that
        overflows them gets no more than that, and nothing breaks)."""
        if self._credit is None:
            return
        self._credit = min(self._credit + granted, _U32_MAX)
        self.wake_writer()

    def wake_writer(self) -> None:
        """Let a writer waiting for credit look again (credit came, or the channel or
        session ended)."""
        waiter = self._credit_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _take_credit(self, wanted: int) -> int:
        """Up to ``wanted`` bytes of credit, waiting while there is none; 0 if the peer
        ended the channel meanwhile."""
        while not self._credit:
            if self._receiver.closed_by_peer:
                return 0
            if self._port.is_closed:
                raise SessionClosed(f"session closed before tunnel {self._channel_id} ended")
            self._credit_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._credit_waiter
            finally:
                self._credit_waiter = None
        taken = min(wanted, self._credit)
        self._credit -= taken
        return taken

    def writelines(self, data: list[bytes]) -> None:
        for item in data:
            self.write(item)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Half-close: after the queued data, send EOS; reading goes on."""
        if self._write_closed or self._write_eof_pending:
            return
        if self._receiver.closed_by_peer:  # the peer takes nothing more, EOS included
            self._write_closed = True
            return
        self._write_eof_pending = True
        self._start_flusher()

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        port, unsent = self._port, self._unsent
        try:
            while unsent:
                if self._receiver.closed_by_peer:
                    self._check_peer()
                    return
                item = unsent[0]
                if isinstance(item, bytes):  # credit-controlled: as much as granted
                    taken = await self._take_credit(len(item))
                    if not taken:
                        continue  # the peer ended the channel: the loop head says how
                    if taken == len(item):
                        unsent.popleft()
                    else:
                        unsent[0] = item[taken:]
                        item = item[:taken]
                    await port.send(port.frames.chunk(self._channel_id, item))
                    continue
                await port.send(item)
                unsent.popleft()
            if self._receiver.closed_by_peer:
                self._write_closed = True
                return
            if self._write_eof_pending and not self._write_closed:
                self._write_closed = True
                await port.send(port.frames.half_close(self._channel_id))
            if self._close_notice:
                self._close_notice = False
                await port.send(self._close_notice_frame())
        except Exception as exc:
            self._write_error = exc
            unsent.clear()

    async def drain(self) -> None:
        """Wait until everything written so far has been handed to the transport."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.wait((self._flusher,))
        if self._write_error is not None:
            raise self._write_error

    def is_closing(self) -> bool:
        return self._closed

    def forget(self) -> None:
        """Drop the stream without a word to the peer (no EOS, no ``CloseChannel``): the
        channel was never established (an open that failed). Reads and writes fail."""
        if self._closed:
            return
        self._closed = True
        self._write_closed = True
        self._unsent.clear()
        self._write_error = RuntimeError(f"tunnel {self._channel_id} was never opened")
        self._port.discard_tunnel(self._receiver)
        self._receiver.abort("the tunnel was never opened", by_peer=True)

    def abort(self, reason: str = "aborted") -> None:
        """End the tunnel as failed: tell the peer (``CloseChannel(Error(reason))``, its
        reads then raise ``TunnelAborted``), drop what is still queued, stop receiving.
        Reads and writes on this side raise ``TunnelAborted`` too. No EOS is sent: an
        aborted stream must never look complete. Nothing happens if already closed."""
        if self._closed:
            return
        self._closed = True
        self._write_closed = True
        self._unsent.clear()
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
        self._write_error = TunnelAborted(reason)
        receiver = self._receiver
        already_ended_by_peer = receiver.closed_by_peer
        self._port.discard_tunnel(receiver)
        receiver.abort(reason, by_peer=False)
        if already_ended_by_peer or self._port.is_closed:
            return
        port = self._port
        frame = port.frames.control(CloseChannel(self._channel_id, CloseError(reason)))
        if not port.try_send(frame):
            port.send_soon(frame)

    def close(self) -> None:
        """Half-close the write side if still open, and stop receiving on the channel."""
        if self._closed:
            return
        self._closed = True
        receiver = self._receiver
        notice = self._credit is not None and not receiver.ended and not receiver.closed_by_peer
        self.write_eof()
        receiver.close()
        if notice:
            self._close_notice = True
            self._start_flusher()

    def _close_notice_frame(self) -> Frame:
        return self._port.frames.control(CloseChannel(self._channel_id, CloseNormal()))

    async def wait_closed(self) -> None:
        """Wait until queued data and the EOS have been sent."""
        await self.drain()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "channel_id":
            return self._channel_id
        return default

    async def __aenter__(self) -> TunnelStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    def __del__(self) -> None:
        # Dropped without close(): unregister and half-close, without awaiting.
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            receiver = self._receiver
            notice = self._credit is not None and not receiver.ended
            receiver.close()
            if (
                not self._write_closed
                and not self._write_eof_pending
                and not receiver.closed_by_peer
            ):
                self._port.send_soon(self._port.frames.half_close(self._channel_id))
            if notice and not receiver.closed_by_peer:
                self._port.send_soon(self._close_notice_frame())
        except Exception:  # interpreter shutdown or a loop already gone
            logger.debug("tunnel %d dropped during shutdown", self._channel_id, exc_info=True)


Tunnel: TypeAlias = TunnelStream
"""The annotation of a tunnel method in a typed service (``async def shell(self) ->
rapace.Tunnel``): the client's call opens a named tunnel and returns its ``TunnelStream``."""


class _ByteReader(Protocol):
    async def read(self, n: int = -1, /) -> bytes: ...


class _ByteWriter(Protocol):
    def write(self, data: bytes, /) -> None: ...
    async def drain(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...


FORWARD_READ_SIZE = 64 * 1024
"""Bytes ``forward`` reads from the local connection at a time."""


async def forward(tunnel: TunnelStream, reader: _ByteReader, writer: _ByteWriter) -> None:
    """Pump bytes between ``tunnel`` and a local connection (an asyncio stream pair)
    until both directions have ended, half-closes included.

    A failure of the local connection (``OSError``, e.g. a reset) aborts the tunnel with
    the error as reason (``CloseChannel(Error)``): the peer's reads raise
    ``TunnelAborted`` instead of seeing a clean end it would take for a complete stream.
    The tunnel aborted by the peer closes the local connection. Either way this returns
    (the error is logged, not raised): the other side has been told.
    """

    async def outbound() -> None:
        while data := await reader.read(FORWARD_READ_SIZE):
            tunnel.write(data)
            await tunnel.drain()
        tunnel.write_eof()
        await tunnel.drain()

    async def inbound() -> None:
        async for data in tunnel:
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    tasks = [asyncio.ensure_future(outbound()), asyncio.ensure_future(inbound())]
    try:
        for next_done in asyncio.as_completed(tasks):
            await next_done
    except OSError as exc:
        logger.debug("forwarded connection on tunnel %d failed: %r", tunnel.channel_id, exc)
        tunnel.abort(f"forwarded connection failed: {type(exc).__name__}: {exc}")
        writer.close()
    except TunnelAborted as exc:
        logger.debug("tunnel %d aborted by the peer: %s", tunnel.channel_id, exc)
        tunnel.abort(exc.reason)  # (already unregistered: nothing more is sent)
        writer.close()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    tunnel.close()
