"""The protocol's rules for outgoing frames, in one place (``docs/protocol.md`` §5-7).

What a request, a notification, a reply, an error, a tunnel chunk, a stream item or end
and a cancel look like; which requests get an answer (``NO_REPLY``); how a handler's
failure is answered; which channel ids a peer may open (parity). The session manages
futures, tasks and timers; it asks this module what to send.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING, Final

from rapace import _impl
from rapace.control import (
    CALL_METADATA,
    CancelChannel,
    CancelReason,
    CloseChannel,
    CloseNormal,
    ControlCodec,
    ControlMessage,
)
from rapace.errors import ErrorCode, ResourceExhausted, RpcError, encode_error_payload
from rapace.flags import FrameFlags
from rapace.metadata import check_metadata_size

if TYPE_CHECKING:
    from rapace._frame_py import Frame, MsgDescHot
    from rapace._impl import Twin

__all__ = ["ChannelIds", "FrameShapes", "answered", "error_status"]

DATA: Final = int(FrameFlags.DATA)
EOS: Final = int(FrameFlags.EOS)
ERROR: Final = int(FrameFlags.ERROR)
CANCEL: Final = int(FrameFlags.CANCEL)
NO_REPLY: Final = int(FrameFlags.NO_REPLY)
CONTROL: Final = int(FrameFlags.CONTROL)

REQUEST: Final = DATA | EOS
"""A unary request, a unary response, and a tunnel's half-close (with no payload)."""
NO_REPLY_REQUEST: Final = DATA | EOS | NO_REPLY
"""A notification (channel 0) or a server-streaming call (its own channel)."""
ERROR_RESPONSE: Final = ERROR | EOS
"""A failed call, or the last frame of a failed stream."""

_U32_MAX: Final = 0xFFFFFFFF
_BYTES_LIKE: Final = (bytes, bytearray, memoryview)


def error_status(exc: BaseException) -> tuple[int, str]:
    """The (code, message) a handler failure is answered with (``docs/protocol.md`` §6)."""
    if isinstance(exc, RpcError):
        return int(exc.code), exc.message
    if isinstance(exc, asyncio.CancelledError):
        return int(ErrorCode.Cancelled), "cancelled"
    if isinstance(exc, ConnectionError):
        return int(ErrorCode.Internal), "transport error"
    # A TimeoutError of the handler's own (an asyncio.timeout in its code) lands here too:
    # only the caller's deadline is DeadlineExceeded, which the caller raises itself.
    detail = f": {exc}" if str(exc) else ""
    return int(ErrorCode.Internal), f"handler raised {type(exc).__name__}{detail}"


def answered(request: Frame, response_flags: int) -> bool:
    """Whether a response with ``response_flags`` goes back for ``request``.

    A ``NO_REPLY`` request gets no response, except that a failed streaming call
    (``NO_REPLY`` on a channel other than 0) gets its error frame, so its client does not
    hang waiting for items.
    """
    desc = request.desc
    if not desc.flags & NO_REPLY:
        return True
    return bool(desc.channel_id and response_flags & ERROR)


class FrameShapes:
    """Builds every frame one session sends, on one twin, numbering them from one counter."""

    __slots__ = ("_build", "_frame_type", "_reply", "control_codec", "max_payload", "msg_ids")

    def __init__(self, twin: Twin, max_payload: int) -> None:
        with _impl.using(twin):
            self.control_codec = ControlCodec()
            """Reads and writes control payloads (on the same twin)."""
        self._build = twin.build_frame
        self._reply = twin.reply_frame
        self._frame_type: type[Frame] = twin.Frame
        self.max_payload = max_payload
        """The most payload bytes the peer takes in one frame (it skips larger frames)."""
        self.msg_ids = itertools.count(1)
        """The session's message ids (1, 2, 3, ...); ``start_call`` draws from it too."""

    def check_size(self, payload: bytes | bytearray | memoryview, what: str = "a payload") -> None:
        """Refuse, before anything is written, a payload the peer would not take: one
        oversized message fails its own call, not the connection."""
        if not isinstance(payload, _BYTES_LIKE):
            return  # not a payload at all: the frame codec says so
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        if size > self.max_payload:
            raise ResourceExhausted(
                f"{what} of {size} bytes exceeds the peer's maximum of {self.max_payload} bytes"
            )

    def notification(self, method_id: int, payload: bytes) -> Frame:
        if method_id == 0:
            raise ValueError("method_id 0 is reserved for responses")
        self.check_size(payload)
        return self._build(next(self.msg_ids), 0, method_id, NO_REPLY_REQUEST, payload)

    def stream_request(self, channel_id: int, method_id: int, payload: bytes) -> Frame:
        if method_id == 0:
            raise ValueError("method_id 0 is reserved for responses")
        self.check_size(payload)
        return self._build(next(self.msg_ids), channel_id, method_id, NO_REPLY_REQUEST, payload)

    def chunk(self, channel_id: int, payload: bytes) -> Frame:
        """One tunnel chunk, or one item of a server stream."""
        self.check_size(payload)
        return self._build(next(self.msg_ids), channel_id, 0, DATA, payload)

    def half_close(self, channel_id: int) -> Frame:
        """A tunnel's end of writing: ``DATA|EOS`` with no payload."""
        return self._build(next(self.msg_ids), channel_id, 0, REQUEST, b"")

    def stream_end(self, channel_id: int) -> Frame:
        """The end of a server stream: ``EOS`` with no payload."""
        return self._build(next(self.msg_ids), channel_id, 0, EOS, b"")

    def control(self, message: ControlMessage) -> Frame:
        """A control frame: channel 0, ``CONTROL``, the verb as ``method_id`` (a peer that
        does not speak the control channel ignores it, as every non-``DATA`` frame nobody
        waits for)."""
        verb, payload = self.control_codec.encode(message)
        return self._build(next(self.msg_ids), 0, verb, CONTROL, payload)

    def call_metadata(self, channel_id: int, body: bytes, limit: int) -> Frame:
        """The ``CallMetadata`` control frame sent just before the request on
        ``channel_id``, from the encoded pairs (``rapace.metadata.metadata_body``): a
        postcard struct is its fields in order, so the payload is the channel id's
        varint, then ``body``. ``ResourceExhausted`` if that is over ``limit`` bytes."""
        payload = _varint(channel_id) + body
        check_metadata_size(len(payload), limit, "this session's")
        return self._build(next(self.msg_ids), 0, CALL_METADATA, CONTROL, payload)

    def cancel(self, channel_id: int, reason: CancelReason) -> Frame:
        """Asks the peer to stop the call it serves on ``channel_id``, unanswered."""
        return self.control(CancelChannel(channel_id, reason))

    def overload_notice(self) -> Frame:
        """Tells the peer that work it sent was dropped for overload: ``CancelChannel``
        of channel 0, reason ``ResourceExhausted``."""
        return self.cancel(0, CancelReason.RESOURCE_EXHAUSTED)

    def going_away(self) -> Frame:
        """Tells the peer that this side serves no new calls (a graceful shutdown):
        ``CloseChannel`` of channel 0, reason ``Normal``; a peer that ignores it sees
        its new calls refused with ``Unavailable``."""
        return self.control(CloseChannel(0, CloseNormal()))

    def oversized(self, desc: MsgDescHot, size: int, limit: int) -> Frame:
        """What stands for a frame skipped as too large: an ``ERROR|EOS`` frame on its
        channel, echoing its ``msg_id``. For a request it is the answer the peer gets;
        for anything else it is routed here, so the call, stream or tunnel waiting for
        that frame fails with this error instead of waiting."""
        message = f"a frame of {size} payload bytes exceeds the maximum of {limit} bytes"
        payload = encode_error_payload(int(ErrorCode.ResourceExhausted), message)
        return self._build(desc.msg_id, desc.channel_id, 0, ERROR_RESPONSE, payload)

    def error_reply(self, request: Frame, code: int, message: str) -> Frame:
        return self._reply(request, ERROR_RESPONSE, encode_error_payload(code, message))

    def failure_reply(self, request: Frame, exc: BaseException) -> Frame:
        """The answer to a request whose handler raised ``exc``."""
        return self._reply(request, ERROR_RESPONSE, encode_error_payload(*error_status(exc)))

    def result_reply(self, request: Frame, result: object) -> Frame:
        """The answer to ``request`` from what a dispatcher returned.

        ``bytes`` (or bytes-like) is the payload, ``None`` an empty one, a ``Frame`` is
        sent as it is but moved onto the request's channel and ``msg_id``. A result larger
        than the peer takes is answered ``ResourceExhausted`` instead.
        """
        if isinstance(result, _BYTES_LIKE):
            try:
                self.check_size(result, "the response")
            except ResourceExhausted as exc:
                return self.failure_reply(request, exc)
        if type(result) is bytes:
            return self._reply(request, REQUEST, result)
        if result is None:  # e.g. a notification handler: an empty response
            return self._reply(request, REQUEST, b"")
        if isinstance(result, self._frame_type):
            req, desc = request.desc, result.desc
            desc.channel_id = req.channel_id
            desc.msg_id = req.msg_id
            desc.method_id = 0
            return result
        if isinstance(result, _BYTES_LIKE):
            return self._reply(request, REQUEST, bytes(result))
        raise TypeError(
            f"the dispatcher returned {type(result).__name__}, not a Frame, bytes or None"
        )


def _varint(value: int) -> bytes:
    """The postcard (LEB128) varint of a u32."""
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"a channel id is a u32, got {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class ChannelIds:
    """The channel ids one peer opens: stepping by 2 from its start, so the two peers
    (odd and even) never collide; 0 (the control channel) is skipped on wrap-around."""

    __slots__ = ("_next", "_start")

    def __init__(self, start: int) -> None:
        if not isinstance(start, int) or not 1 <= start <= _U32_MAX:
            raise ValueError(f"start_channel_id must be in 1..{_U32_MAX}, got {start}")
        self._start = start
        self._next = start

    def next(self) -> int:
        channel_id = self._next
        self._next = ((channel_id + 2) & _U32_MAX) or 2
        return channel_id

    def opened_here(self, channel_id: int) -> bool:
        """Whether this peer has already opened ``channel_id`` (a late reply is expected)."""
        start = self._start
        return channel_id % 2 == start % 2 and start <= channel_id < self._next
