"""The transport interface the session relies on: push delivery to one ``FrameSink``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from rapace._frame_py import Frame, MsgDescHot

__all__ = ["FrameSink", "NowaitSender", "Transport", "TransportClosed"]


class TransportClosed(ConnectionError):
    """The transport is closed: nothing more can be sent, or nothing more will arrive."""


class FrameSink(Protocol):
    """What a push transport calls: the session implements it."""

    def frames_received(self, frames: list[Frame], /) -> None:
        """Frames arrived, in order; called from the event loop, never concurrently."""

    def connection_lost(self, exc: BaseException | None, /) -> None:
        """No more frames will arrive: ``None`` for a clean close, else the reason."""

    def frames_skipped(self, skipped: list[tuple[MsgDescHot, int]], /) -> None:
        """Frames over the maximum payload size went by unread: their descriptors and
        payload sizes, in order (the connection goes on)."""


@runtime_checkable
class Transport(Protocol):
    """A connection that carries frames. ``mem_pair()`` and the stream transport implement it."""

    async def send_frame(self, frame: Frame) -> None:
        """Queue ``frame`` for the peer; waits only while the peer applies backpressure."""

    def close(self) -> None:
        """Close both directions; idempotent."""

    @property
    def is_closed(self) -> bool: ...

    def attach(self, sink: FrameSink) -> None:
        """Start receiving: every frame from now on goes to ``sink``, in batches, from the
        event loop's own callbacks (no ``await`` per frame). Nothing is delivered before;
        a second sink is a ``RuntimeError``."""

    def pause_reading(self) -> None:
        """Stop delivering frames until ``resume_reading`` (consumer backpressure)."""

    def resume_reading(self) -> None: ...


class NowaitSender(Protocol):
    """Optional fast path a transport may add (both in-tree transports do): the session
    sends calls, responses and tunnel chunks with it, without a task or an ``await``."""

    def try_send_frame(self, frame: Frame) -> bool:
        """Queue ``frame`` now if that needs no waiting (True); else do nothing (False)
        and let the caller ``await send_frame``, which waits or raises as it must."""
