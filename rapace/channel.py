"""``ChannelPort``: what tunnels and streams need of the session that carries their channel.

Tunnel receivers, ``TunnelStream`` and server-streaming calls depend on this small
interface, not on ``RpcSession``: the session imports them, never the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rapace._frame_py import Frame
    from rapace.frames import FrameShapes
    from rapace.tunnel import TunnelReceiver

__all__ = ["ChannelPort"]


class ChannelPort(Protocol):
    """The session, as seen from one of its channels."""

    @property
    def frames(self) -> FrameShapes:
        """Builds the frames this session sends (tunnel chunks, stream items, ends, cancels)."""

    @property
    def is_closed(self) -> bool: ...

    def register_tunnel(self, channel_id: int) -> TunnelReceiver:
        """Route every frame on ``channel_id`` to a new receiver (until EOS)."""

    def accept_tunnel(self, channel_id: int) -> TunnelReceiver:
        """``register_tunnel`` for a tunnel the peer opened: it does not make an
        overloaded session read again (its own tunnels and calls do)."""

    def discard_tunnel(self, receiver: TunnelReceiver) -> None:
        """Stop routing to ``receiver``, if it is still the one on its channel."""

    def take_tunnel(self, channel_id: int) -> TunnelReceiver | None:
        """Unregister the receiver on ``channel_id`` and return it (None: none there, or
        not a ``TunnelReceiver``), so the peer's ``CloseChannel`` can end it."""

    def try_send(self, frame: Frame) -> bool:
        """Hand ``frame`` to the transport if that needs no waiting; False otherwise."""

    async def send(self, frame: Frame) -> None:
        """Send ``frame``, waiting while the transport applies backpressure."""

    def send_soon(self, frame: Frame) -> None:
        """Send ``frame`` from a place that cannot await (a finalizer); failures are moot."""

    def reader_blocked(self) -> None:
        """A receiver's buffer is full: pause reading the transport (counted)."""

    def reader_unblocked(self) -> None:
        """A receiver drained: resume reading once no receiver is blocked."""
