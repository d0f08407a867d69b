"""Named tunnels: ``open_tunnel("Service.method")`` on one side, a handler on the other.

The wire (control channel, ``rapace.control``; every frame here is an **extension** a
peer that does not speak it ignores):

- The opener picks a channel id of its own parity, registers its receiver on it, then
  sends ``OpenChannel { channel_id, service_name, method_name, metadata }``. Nothing is
  sent on the channel before that frame, so the acceptor sees the open first.
- The acceptor answers with one control frame on that channel id:

  - accepted: ``GrantCredits { channel_id, bytes }``. Without credit flow control
    ``bytes`` is 0: "zero more bytes" changes nothing for a peer that counts credits and
    is ignored by one that does not, so the acknowledgement is invisible to both. (When
    both peers speak credits, ``bytes`` is the acceptor's window: see below. The same
    frame, never an extra one.)
  - refused: ``CloseChannel { channel_id, Error(message) }`` (no handler for that name;
    a channel id of the acceptor's own parity, or already in use; the acceptor going
    away), or ``CancelChannel { channel_id, ResourceExhausted }`` (too many tunnels open).
    The opener's ``open_tunnel`` raises ``Unimplemented(message)``, resp.
    ``ResourceExhausted``.

  A peer that ignores control frames never answers: ``open_tunnel`` raises
  ``DeadlineExceeded`` after its timeout (the session's call timeout by default) and
  tells the peer it gave up with ``CloseChannel(Error)``. Plain tunnels and calls to such
  a peer are unaffected.
- The acceptor registers the channel as it reads the ``OpenChannel`` (synchronously, in
  the demux's batch), before its handler task starts: chunks that follow the open are
  held in that receiver (bounded by its capacity, reading pausing past it as for any
  tunnel), never dropped as unroutable. The handler gets a ``TunnelStream`` on that
  receiver and the metadata; when it returns the stream is closed (EOS), when it fails
  or is cancelled the tunnel is aborted with the reason.
- ``CloseChannel { channel_id != 0, Error(reason) }`` aborts the channel's tunnel
  (``TunnelAborted`` for its reader); ``Normal`` closes it fully.

Credits (per-channel flow control, on named tunnels only; a session's
``tunnel_credit_window``, ``None`` to turn it off):

- Announcement: before its first ``OpenChannel``, a session that speaks credits sends
  ``GrantCredits { channel_id: 0, bytes: W }``: "I speak credits; the peer may send me
  ``W`` bytes on each named tunnel I open before I grant more". Sent ahead of the open on
  the same ordered connection, it is always read before it.
- Agreement, per channel, with no race: the acceptor makes a channel credit-controlled
  when it speaks credits and read the opener's announcement before the ``OpenChannel``;
  it then acknowledges with ``GrantCredits { channel_id, bytes: W' }``, ``W' > 0`` being
  its own window (what the opener may send; from then on it may send ``W`` itself). An
  acknowledgement of 0 (a peer without credits, or an opener that did not announce)
  leaves the channel as today: no credits, the receiver pausing the transport when its
  buffer is full. The opener counts what arrived before the acknowledgement against
  its window once it is known. The windows promised to tunnels one peer opened add up
  to at most ``CREDIT_BUDGET``; past it, new tunnels are acknowledged with 0.
- On a credit-controlled channel each side sends only the bytes granted (payload bytes
  of ``DATA`` frames; a chunk is split to fit), and grants ``GrantCredits { channel_id,
  n }`` back as its reader consumes ``n`` bytes (once half a window is read). A slow
  reader stalls only its own tunnel's writer; other calls and tunnels flow. Its buffer
  is bounded by its window: a peer sending past its credit gets the tunnel aborted
  (``CloseChannel(Error)``). Grants summing past u32 are capped there.

Everything a peer sends here is checked: an ``OpenChannel`` on channel 0 is ignored, one
of the wrong parity or in use is refused without touching the channel's current owner,
and accepted tunnels are bounded (the session's ``max_pending``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, TypeAlias

from rapace.control import (
    CancelChannel,
    CancelReason,
    CloseChannel,
    CloseError,
    ControlMessage,
    GrantCredits,
    OpenChannel,
)
from rapace.errors import (
    DeadlineExceeded,
    ResourceExhausted,
    RpcError,
    TunnelAborted,
    Unimplemented,
)
from rapace.ratelimit import RateLimitedLog
from rapace.tunnel import TunnelStream

if TYPE_CHECKING:
    from rapace._frame_py import Frame
    from rapace.channel import ChannelPort

__all__ = [
    "DEFAULT_TUNNEL_CREDIT_WINDOW",
    "Metadata",
    "NamedTunnels",
    "TunnelHandler",
    "split_name",
]

logger = logging.getLogger("rapace.session")

DEFAULT_TUNNEL_CREDIT_WINDOW = 1 << 20
"""Bytes a peer may send on one named tunnel before this side grants more (1 MiB): what a
stalled tunnel holds at most, instead of pausing the connection."""

CREDIT_BUDGET = 64 << 20
"""Bytes the windows of the credit-controlled tunnels a peer opened may add up to (a
peer opening many tunnels must not make this side promise it gigabytes): past it, new
tunnels are acknowledged without credits and bounded as any tunnel, by pausing reading."""

_U32_MAX = 0xFFFFFFFF

Metadata: TypeAlias = Mapping[str, bytes] | Iterable[tuple[str, bytes]]
"""What ``open_tunnel`` takes as metadata: a mapping, or ``(key, value)`` pairs."""

TunnelHandler: TypeAlias = Callable[[TunnelStream, list[tuple[str, bytes]]], Awaitable[None]]
"""Serves one named tunnel the peer opened: ``await handler(stream, metadata)``."""


def split_name(name: str) -> tuple[str, str]:
    """``"Service.method"`` -> ``("Service", "method")`` (split at the last dot)."""
    if not isinstance(name, str):
        raise TypeError(f"a tunnel name must be a str, not {type(name).__name__}")
    service, _, method = name.rpartition(".")
    if not service or not method:
        raise ValueError(f"a tunnel name is 'Service.method', got {name!r}")
    return service, method


def _pairs(metadata: Metadata | None) -> list[tuple[str, bytes]]:
    if metadata is None:
        return []
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    pairs = []
    for key, value in items:
        if not isinstance(key, str) or not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError("tunnel metadata is (str, bytes) pairs")
        pairs.append((key, bytes(value)))
    return pairs


class NamedTunnels:
    """One session's named tunnels: its handlers, its opens waiting for an answer, and
    the handler tasks of the tunnels its peer opened.

    It reaches the session through its ``ChannelPort`` and the few callables given here,
    so the session keeps one entry per control verb and this module holds the logic.
    """

    def __init__(
        self,
        port: ChannelPort,
        *,
        next_channel_id: Callable[[], int],
        refusal: Callable[[int], str | None],
        send_control: Callable[[Frame], None],
        closed_error: Callable[[], RpcError],
        served: Callable[[], None],
        open_timeout: float,
        max_accepted: int,
        credit_window: int | None = DEFAULT_TUNNEL_CREDIT_WINDOW,
    ) -> None:
        if credit_window is not None and not 1 <= credit_window <= _U32_MAX:
            raise ValueError(f"a credit window is 1..{_U32_MAX} bytes, got {credit_window}")
        self._port = port
        self._next_channel_id = next_channel_id
        self._refusal = refusal  # why the peer may not open a channel id, or None
        self._send_control = send_control  # no-wait, bounded (the session's refusals)
        self._closed_error = closed_error
        self._served = served  # a handler of the peer's tunnel ended (the session may be idle)
        self._open_timeout = open_timeout
        self._max_accepted = max_accepted
        self._handlers: dict[str, TunnelHandler] = {}
        # Opens of this side's waiting for the peer's answer: channel -> its future
        # (the granted bytes on acceptance).
        self._opening: dict[int, asyncio.Future[int]] = {}
        # Handler tasks serving tunnels the peer opened, by channel.
        self._accepted: dict[int, asyncio.Task[None]] = {}
        self._refused_log = RateLimitedLog(logger=logger)
        self._closed = False
        self._abandoned = False
        # Credits: this side's window (None: off), the announcement (sent once, before the
        # first open), the peer's window (None: it did not announce), and the streams of
        # the named tunnels, for the peer's grants and its CloseChannel (which may come
        # after its EOS unregistered the channel's receiver).
        self._credit_window = credit_window
        self._announcement: asyncio.Future[None] | None = None
        self._peer_window: int | None = None
        self._streams: weakref.WeakValueDictionary[int, TunnelStream] = (
            weakref.WeakValueDictionary()
        )

    # -- this side's handlers ------------------------------------------------------------

    def set_handler(self, name: str, handler: TunnelHandler | None) -> None:
        split_name(name)
        if handler is None:
            self._handlers.pop(name, None)
            return
        if not callable(handler):
            raise TypeError("a tunnel handler is an async callable (stream, metadata)")
        self._handlers[name] = handler

    @property
    def accepted_channel_ids(self) -> list[int]:
        """Channels of tunnels the peer opened whose handlers still run (diagnostics)."""
        return sorted(self._accepted)

    @property
    def opening_channel_ids(self) -> list[int]:
        """Channels of this side's opens still waiting for an answer (diagnostics)."""
        return sorted(self._opening)

    # -- opening -------------------------------------------------------------------------

    async def open(
        self, name: str, metadata: Metadata | None = None, timeout: float | None = None
    ) -> TunnelStream:
        service, method = split_name(name)
        pairs = _pairs(metadata)
        delay = self._open_timeout if timeout is None else timeout
        if self._closed or self._port.is_closed:
            raise self._closed_error()
        frames = self._port.frames
        window = self._credit_window
        if window is not None:
            if self._announcement is None:  # once, and ahead of every OpenChannel
                self._announcement = asyncio.ensure_future(
                    self._port.send(frames.control(GrantCredits(0, window)))
                )
            await asyncio.shield(self._announcement)
        channel_id = self._next_channel_id()
        open_frame = frames.control(OpenChannel(channel_id, service, method, pairs))
        stream = TunnelStream(self._port, channel_id)  # registered before the peer can answer
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._opening[channel_id] = answer
        deadline: asyncio.Timeout | None = None
        try:
            await self._port.send(open_frame)
            async with asyncio.timeout(None if delay == math.inf else delay) as deadline:
                granted = await answer
        except BaseException as exc:
            self._opening.pop(channel_id, None)
            refused = answer.done() and not answer.cancelled() and answer.exception() is not None
            stream.forget()
            if not refused and not self._port.is_closed:
                # The peer may accept it yet, or did already: tell it this side gave up.
                self._send_control(frames.control(CloseChannel(channel_id, CloseError("gave up"))))
            if isinstance(exc, TimeoutError) and deadline is not None and deadline.expired():
                raise DeadlineExceeded(
                    f"{name}: no answer to OpenChannel on channel {channel_id} within "
                    f"{delay} s (does the peer speak the control channel?)"
                ) from None
            raise
        self._streams[channel_id] = stream  # (for the peer's CloseChannel, even after EOS)
        if window is not None and granted:  # (0: the acceptor does not speak credits)
            # What it sent before this answer is still buffered (nobody could read it
            # yet): it counts against the window from the start.
            stream.use_credits(granted)
            self._credit_channel(stream, window)
            overrun = stream.receiver.aborted
            if overrun is not None:  # it sent more than the window before its answer
                raise TunnelAborted(overrun)
        return stream

    def _credit_channel(self, stream: TunnelStream, window: int) -> None:
        """Bound what ``stream``'s channel receives by ``window`` bytes, granted back as
        they are read; the peer's grants reach the stream from now on."""
        channel_id = stream.channel_id
        stream.receiver.use_credits(
            window,
            functools.partial(self._grant, channel_id),
            functools.partial(self._overrun, channel_id),
        )
        self._streams[channel_id] = stream

    def _credited_by_peer(self) -> int:
        """Credit-controlled tunnels the peer opened that still hold (or may receive)
        bytes: each may hold a whole window."""
        return sum(
            1
            for channel_id, stream in self._streams.items()
            if channel_id in self._accepted
            and stream.receiver.credit_window is not None
            and stream.receiver.holds_memory
        )

    def _grant(self, channel_id: int, granted: int) -> None:
        self._send_control(self._port.frames.control(GrantCredits(channel_id, granted)))

    def _overrun(self, channel_id: int, why: str) -> None:
        """The peer sent past its credit: abort the tunnel (memory stays bounded)."""
        reason = f"credit exceeded: {why}"
        self._refused_log("tunnel on channel %d aborted: %s", channel_id, reason)
        receiver = self._port.take_tunnel(channel_id)
        if receiver is not None:
            receiver.abort(reason)  # as if by the peer: this side sends nothing more on it
        stream = self._streams.pop(channel_id, None)
        if stream is not None:
            stream.wake_writer()
        self._send_control(self._port.frames.control(CloseChannel(channel_id, CloseError(reason))))

    # -- the peer's control frames ---------------------------------------------------------

    def on_open_channel(self, message: ControlMessage) -> None:
        assert isinstance(message, OpenChannel)
        channel_id = message.channel_id
        name = f"{message.service_name}.{message.method_name}"
        if channel_id == 0:
            self._refused_log("OpenChannel on channel 0 (%r) ignored", name)
            return
        if self._closed or self._port.is_closed:
            return
        why = self._refusal(channel_id)
        if why is None and channel_id in self._accepted:  # its handler still runs
            why = f"channel {channel_id} is already in use"
        if why is not None:
            self._refuse(channel_id, name, why)
            return
        handler = self._handlers.get(name)
        if handler is None:
            self._refuse(channel_id, name, f"no tunnel handler for {name!r}")
            return
        if len(self._accepted) >= self._max_accepted:
            self._refused_log(
                "OpenChannel for %r on channel %d refused: %d tunnels already open",
                name,
                channel_id,
                len(self._accepted),
            )
            frames = self._port.frames
            self._send_control(
                frames.control(CancelChannel(channel_id, CancelReason.RESOURCE_EXHAUSTED))
            )
            return
        try:
            receiver = self._port.accept_tunnel(channel_id)
        except ValueError:  # a tunnel of the peer's already there
            self._refuse(channel_id, name, f"channel {channel_id} is already in use")
            return
        stream = TunnelStream(self._port, channel_id, receiver=receiver, metadata=message.metadata)
        window, peer_window = self._credit_window, self._peer_window
        if (
            window is not None
            and peer_window is not None  # both speak credits
            and self._credited_by_peer() * window < CREDIT_BUDGET  # (else: as any tunnel)
        ):
            self._credit_channel(stream, window)
            stream.use_credits(peer_window)
        else:
            window = 0  # the acknowledgement: "zero more bytes" (see the module docstring)
            self._streams[channel_id] = stream  # (for the peer's CloseChannel, even after EOS)
        self._send_control(self._port.frames.control(GrantCredits(channel_id, window)))
        task = asyncio.get_running_loop().create_task(
            self._serve(handler, stream, name), name=f"rapace tunnel {name} ({channel_id})"
        )
        if not task.done():
            self._accepted[channel_id] = task

    def _refuse(self, channel_id: int, name: str, why: str) -> None:
        self._refused_log("OpenChannel for %r on channel %d refused: %s", name, channel_id, why)
        frame = self._port.frames.control(CloseChannel(channel_id, CloseError(why)))
        self._send_control(frame)

    def on_grant_credits(self, message: ControlMessage) -> None:
        assert isinstance(message, GrantCredits)
        channel_id, granted = message.channel_id, message.bytes
        if channel_id == 0:  # the peer's announcement: for the tunnels it opens from now on
            self._peer_window = granted or None
            return
        answer = self._opening.pop(channel_id, None)
        if answer is not None:
            if not answer.done():
                answer.set_result(granted)
            return
        stream = self._streams.get(channel_id)
        if stream is not None:
            stream.add_credit(granted)

    def on_close_channel(self, message: ControlMessage) -> None:
        """``CloseChannel`` of a channel other than 0: a refusal of this side's open, or
        the end (``Normal``) or abort (``Error``) of a tunnel."""
        assert isinstance(message, CloseChannel)
        channel_id, reason = message.channel_id, message.reason
        answer = self._opening.pop(channel_id, None)
        if answer is not None:
            text = reason.message if isinstance(reason, CloseError) else "closed by the peer"
            if not answer.done():
                answer.set_exception(Unimplemented(text))
            return
        receiver = self._port.take_tunnel(channel_id)
        stream = self._streams.pop(channel_id, None)
        if receiver is None and stream is not None:
            receiver = stream.receiver  # its reading ended (EOS), its writing goes on
        if receiver is None:
            logger.debug("CloseChannel for channel %d, which has no tunnel: ignored", channel_id)
            return
        if isinstance(reason, CloseError):
            receiver.abort(reason.message)
        else:
            receiver.closed_by_peer_normally()
        if stream is not None:
            stream.wake_writer()  # a writer waiting for credit learns it is over

    def on_cancel_channel(self, message: ControlMessage) -> bool:
        """A ``CancelChannel`` answering one of this side's opens: True if it was one."""
        assert isinstance(message, CancelChannel)
        answer = self._opening.pop(message.channel_id, None)
        if answer is None:
            return False
        if not answer.done():
            if message.reason == CancelReason.RESOURCE_EXHAUSTED:
                answer.set_exception(ResourceExhausted("the peer has too many tunnels open"))
            else:
                answer.set_exception(Unimplemented("the peer cancelled the tunnel"))
        return True

    # -- serving ---------------------------------------------------------------------------

    async def _serve(self, handler: TunnelHandler, stream: TunnelStream, name: str) -> None:
        channel_id = stream.channel_id
        try:
            try:
                await handler(stream, stream.metadata)
            except asyncio.CancelledError:
                if not self._closed:
                    why = "the server shut down first" if self._abandoned else "was cancelled"
                    stream.abort(f"{name}: the tunnel handler {why}")
                raise
            except Exception as exc:
                if not isinstance(exc, RpcError):
                    logger.error("tunnel handler %s failed", name, exc_info=exc)
                detail = f": {exc}" if str(exc) else ""
                stream.abort(f"{name}: the tunnel handler raised {type(exc).__name__}{detail}")
                return
            stream.close()
            with contextlib.suppress(RpcError, ConnectionError):
                await stream.wait_closed()
        finally:
            if self._accepted.get(channel_id) is asyncio.current_task():
                del self._accepted[channel_id]
                self._served()

    @property
    def serving(self) -> bool:
        """Whether handlers of tunnels the peer opened still run (work in progress: a
        graceful shutdown waits for them as for calls)."""
        return bool(self._accepted)

    def abandon(self) -> None:
        """A graceful shutdown's grace is over: cancel the handlers still running; each
        aborts its tunnel, so the peer learns why it ended."""
        self._abandoned = True
        for task in list(self._accepted.values()):
            task.cancel()

    def close(self) -> None:
        """The session closed: fail the opens waiting, cancel the handlers."""
        self._closed = True
        opening, self._opening = self._opening, {}
        for answer in opening.values():
            if not answer.done():
                answer.set_exception(self._closed_error())
        for task in list(self._accepted.values()):
            task.cancel()
        for stream in list(self._streams.values()):
            stream.wake_writer()  # it finds the session closed
