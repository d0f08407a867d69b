"""The frame codec in pure Python: the reference twin of ``rapace/_frame.pyx``.

Sans-I/O: bytes in, ``Frame`` objects out, and back (``docs/protocol.md`` §1-4). The compiled
twin must give the same bytes, the same frames and the same exceptions for every input;
``tests/`` runs both against each other. Nothing here knows about asyncio or sockets.
"""

from __future__ import annotations

import struct
from typing import Any, Final, final

from rapace._checks import (
    DEFAULT_MAX_PAYLOAD_SIZE,
    DESC_FIELDS,
    MAX_PAYLOAD_LEN,
    U32_MAX,
    U64_MAX,
    as_bytes,
    bad_inline_location,
    byte_view,
    check_inline,
    check_int,
    check_offset,
    decoder_failed,
    decoder_state,
    decoder_state_parts,
    desc_repr,
    frame_too_short,
    inline_len_too_long,
    inline_payload_too_long,
    message_too_short,
    missing_payload,
    not_a_desc,
    not_a_frame,
    over_max_payload,
    payload_too_long,
)
from rapace.errors import FrameError
from rapace.flags import DESC_SIZE, INLINE_PAYLOAD_SIZE, INLINE_PAYLOAD_SLOT, NO_DEADLINE

__all__ = [
    "DEFAULT_MAX_PAYLOAD_SIZE",
    "Frame",
    "FrameDecoder",
    "MsgDescHot",
    "build_frame",
    "encode_frame",
    "encode_message",
    "reply_frame",
    "validate_descriptor",
]

_ZERO_INLINE: Final = bytes(INLINE_PAYLOAD_SIZE)

# msg_id, channel_id, method_id, payload_slot, payload_generation, payload_offset,
# payload_len, flags, credit_grant, deadline_ns, inline_payload
_DESC: Final = struct.Struct("<QIIIIIIIIQ16s")
_LEN: Final = struct.Struct("<I")


def _u32_property(name: str, doc: str) -> property:
    attr = "_" + name

    def get(self: MsgDescHot) -> int:
        return getattr(self, attr)  # type: ignore[no-any-return]

    def set_(self: MsgDescHot, value: int) -> None:
        setattr(self, attr, check_int(name, value, U32_MAX))

    return property(get, set_, doc=doc)


def _u64_property(name: str, doc: str) -> property:
    attr = "_" + name

    def get(self: MsgDescHot) -> int:
        return getattr(self, attr)  # type: ignore[no-any-return]

    def set_(self: MsgDescHot, value: int) -> None:
        setattr(self, attr, check_int(name, value, U64_MAX))

    return property(get, set_, doc=doc)


@final
class MsgDescHot:
    """The 64-byte message descriptor (``docs/protocol.md`` §1), field names as in Rust.

    Mutable, like the Rust struct; every setter checks its field's range so a bad value
    fails where it is assigned, not later when the descriptor is packed.
    """

    __slots__ = tuple("_" + f for f in DESC_FIELDS)
    __hash__ = None  # type: ignore[assignment]  # mutable

    _msg_id: int
    _channel_id: int
    _method_id: int
    _payload_slot: int
    _payload_generation: int
    _payload_offset: int
    _payload_len: int
    _flags: int
    _credit_grant: int
    _deadline_ns: int
    _inline_payload: bytes

    def __init__(
        self,
        *,
        msg_id: int = 0,
        channel_id: int = 0,
        method_id: int = 0,
        payload_slot: int = INLINE_PAYLOAD_SLOT,
        payload_generation: int = 0,
        payload_offset: int = 0,
        payload_len: int = 0,
        flags: int = 0,
        credit_grant: int = 0,
        deadline_ns: int = NO_DEADLINE,
        inline_payload: bytes | bytearray | memoryview = _ZERO_INLINE,
    ) -> None:
        self._msg_id = check_int("msg_id", msg_id, U64_MAX)
        self._channel_id = check_int("channel_id", channel_id, U32_MAX)
        self._method_id = check_int("method_id", method_id, U32_MAX)
        self._payload_slot = check_int("payload_slot", payload_slot, U32_MAX)
        self._payload_generation = check_int("payload_generation", payload_generation, U32_MAX)
        self._payload_offset = check_int("payload_offset", payload_offset, U32_MAX)
        self._payload_len = check_int("payload_len", payload_len, U32_MAX)
        self._flags = check_int("flags", flags, U32_MAX)
        self._credit_grant = check_int("credit_grant", credit_grant, U32_MAX)
        self._deadline_ns = check_int("deadline_ns", deadline_ns, U64_MAX)
        self._inline_payload = check_inline(inline_payload)

    msg_id = _u64_property("msg_id", "Sender's message number, from 1 upward.")
    channel_id = _u32_property("channel_id", "Logical channel; 0 is notifications and control.")
    method_id = _u32_property("method_id", "FNV-1a method id; 0 for responses and tunnel data.")
    payload_slot = _u32_property("payload_slot", "0xFFFFFFFF when the payload is inline.")
    payload_generation = _u32_property("payload_generation", "Shared-memory slot generation.")
    payload_offset = _u32_property("payload_offset", "Offset of the payload in its slot.")
    payload_len = _u32_property("payload_len", "Payload length in bytes.")
    flags = _u32_property("flags", "FrameFlags bits, as a plain int.")
    credit_grant = _u32_property("credit_grant", "Flow-control credits granted.")
    deadline_ns = _u64_property(
        "deadline_ns", "The call's deadline (on byte streams its budget in ns); 2**64-1: none."
    )

    @property
    def inline_payload(self) -> bytes:
        """The 16 inline payload bytes (zero padded)."""
        return self._inline_payload

    @inline_payload.setter
    def inline_payload(self, value: bytes | bytearray | memoryview) -> None:
        self._inline_payload = check_inline(value)

    def pack(self) -> bytes:
        """The descriptor's 64 wire bytes."""
        return _DESC.pack(
            self._msg_id,
            self._channel_id,
            self._method_id,
            self._payload_slot,
            self._payload_generation,
            self._payload_offset,
            self._payload_len,
            self._flags,
            self._credit_grant,
            self._deadline_ns,
            self._inline_payload,
        )

    @classmethod
    def unpack(cls, buffer: bytes | bytearray | memoryview, offset: int = 0) -> MsgDescHot:
        """Read a descriptor from 64 bytes of ``buffer`` starting at ``offset``."""
        view = byte_view(buffer)
        check_offset(offset, len(view))
        desc = cls.__new__(cls)
        _set_fields(desc, _DESC.unpack_from(view, offset))
        return desc

    def copy(self) -> MsgDescHot:
        """An independent copy (the Rust descriptor is ``Copy``)."""
        desc = MsgDescHot.__new__(MsgDescHot)
        for slot in MsgDescHot.__slots__:
            setattr(desc, slot, getattr(self, slot))
        return desc

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MsgDescHot):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in MsgDescHot.__slots__)

    def __repr__(self) -> str:
        return desc_repr(self)


def _set_fields(desc: MsgDescHot, fields: tuple[int | bytes, ...]) -> None:
    (
        desc._msg_id,
        desc._channel_id,
        desc._method_id,
        desc._payload_slot,
        desc._payload_generation,
        desc._payload_offset,
        desc._payload_len,
        desc._flags,
        desc._credit_grant,
        desc._deadline_ns,
        desc._inline_payload,
    ) = fields  # type: ignore[assignment]


@final
class Frame:
    """A descriptor and its payload bytes.

    The descriptor passed to a constructor is adopted, not copied: its location fields
    (``payload_slot``, ``payload_generation``, ``payload_offset``, ``payload_len`` and
    ``inline_payload``) are set to match the payload, as ``docs/protocol.md`` §3 says.
    """

    __slots__ = ("_desc", "_payload")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, desc: MsgDescHot, payload: bytes | bytearray | memoryview = b"") -> None:
        if not isinstance(desc, MsgDescHot):
            raise not_a_desc(desc)
        data = as_bytes(payload)
        _place(desc, data)
        self._desc = desc
        self._payload = data

    @classmethod
    def with_inline_payload(cls, desc: MsgDescHot, data: bytes | bytearray | memoryview) -> Frame:
        """A frame whose payload travels inside the descriptor; more than 16 bytes raises."""
        payload = as_bytes(data)
        if len(payload) > INLINE_PAYLOAD_SIZE:
            raise inline_payload_too_long(len(payload))
        return cls(desc, payload)

    @classmethod
    def with_payload(cls, desc: MsgDescHot, data: bytes | bytearray | memoryview) -> Frame:
        """A frame placed by size: inline up to 16 bytes, out of line beyond."""
        return cls(desc, data)

    @property
    def desc(self) -> MsgDescHot:
        return self._desc

    @property
    def payload(self) -> bytes:
        """The payload bytes, wherever they travel."""
        return self._payload

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return self._payload == other.payload and self._desc == other.desc

    def __repr__(self) -> str:
        return f"Frame(desc={self._desc!r}, payload={self._payload!r})"


def _place(desc: MsgDescHot, payload: bytes) -> None:
    n = len(payload)
    if n > MAX_PAYLOAD_LEN:  # the stream's u32 length prefix covers the descriptor too
        raise payload_too_long(n)
    desc._payload_generation = 0
    desc._payload_offset = 0
    desc._payload_len = n
    if n <= INLINE_PAYLOAD_SIZE:
        desc._payload_slot = INLINE_PAYLOAD_SLOT
        desc._inline_payload = payload + _ZERO_INLINE[n:]
    else:
        desc._payload_slot = 0
        desc._inline_payload = _ZERO_INLINE


def build_frame(
    msg_id: int, channel_id: int, method_id: int, flags: int, payload: bytes = b""
) -> Frame:
    """A new frame in one call: the session's hot path for outgoing frames."""
    desc = MsgDescHot.__new__(MsgDescHot)
    desc._msg_id = check_int("msg_id", msg_id, U64_MAX)
    desc._channel_id = check_int("channel_id", channel_id, U32_MAX)
    desc._method_id = check_int("method_id", method_id, U32_MAX)
    desc._flags = check_int("flags", flags, U32_MAX)
    desc._credit_grant = 0
    desc._deadline_ns = NO_DEADLINE
    data = as_bytes(payload)
    _place(desc, data)
    frame = Frame.__new__(Frame)
    frame._desc = desc
    frame._payload = data
    return frame


def reply_frame(request: Frame, flags: int, payload: bytes = b"") -> Frame:
    """A frame answering ``request``: on its channel, echoing its ``msg_id``, method id 0.

    The session answers every request with one (``docs/protocol.md`` §6; the ``msg_id`` echo is
    this project's extension).
    """
    desc = request.desc
    return build_frame(desc.msg_id, desc.channel_id, 0, flags, payload)


def encode_frame(frame: Frame) -> bytes:
    """``[frame_len u32][descriptor][payload]``, as the Rust sender writes it.

    The payload follows the descriptor even when it is also inline (``docs/protocol.md`` §4).
    """
    if not isinstance(frame, Frame):
        raise not_a_frame(frame)
    payload = frame.payload
    return _LEN.pack(DESC_SIZE + len(payload)) + frame.desc.pack() + payload


def encode_message(frame: Frame) -> bytes:
    """``[descriptor][payload]``: ``encode_frame`` without the length prefix, for a
    transport whose messages carry their own length (WebSocket, Rust framing)."""
    if not isinstance(frame, Frame):
        raise not_a_frame(frame)
    payload = frame.payload  # read first, as encode_frame does: the same error for a bare Frame
    return frame.desc.pack() + payload


def validate_descriptor(desc: MsgDescHot, max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE) -> None:
    """Raise ``FrameError`` if ``desc`` breaks the inline rules or the size limit."""
    if not isinstance(desc, MsgDescHot):
        raise not_a_desc(desc)
    _validate(desc, _check_max(max_payload_size))


def _check_max(max_payload_size: object) -> int:
    return check_int("max_payload_size", max_payload_size, MAX_PAYLOAD_LEN)


def _validate(desc: MsgDescHot, max_payload_size: int) -> None:
    n = desc._payload_len
    if desc._payload_slot == INLINE_PAYLOAD_SLOT:
        if n > INLINE_PAYLOAD_SIZE:
            raise inline_len_too_long(n)
        if desc._payload_generation or desc._payload_offset:
            raise bad_inline_location(desc._payload_generation, desc._payload_offset)
    if n > max_payload_size:
        raise over_max_payload(n, max_payload_size)


class FrameDecoder:
    """Incremental stream decoder: feed it bytes split anywhere, get whole frames back.

    The length prefix is checked as soon as its four bytes arrive. A frame whose payload
    would exceed ``max_payload_size`` is skipped, not buffered: the decoder collects its
    64-byte descriptor, reports it through ``take_skipped()`` (so the session can answer
    or fail the one call it belonged to) and then discards the rest of its body as it
    arrives, however many feeds that takes, holding none of it. One oversized message
    must fail one call, not the whole connection; a 4 GiB length prefix costs nothing
    but the time to read past it.

    A frame shorter than its descriptor, or a normal-sized frame whose descriptor breaks
    the inline rules, raises ``FrameError``; after that the decoder refuses all further
    input: a stream that lost sync cannot be trusted again.
    """

    __slots__ = (
        "_buffer",
        "_error",
        "_max_frame_len",
        "_max_payload_size",
        "_skip",
        "_skipped",
    )

    def __init__(self, max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE) -> None:
        self._max_payload_size = _check_max(max_payload_size)
        self._max_frame_len = max_payload_size + DESC_SIZE
        self._buffer = bytearray()
        self._error: str | None = None
        self._skip = 0
        self._skipped: list[tuple[MsgDescHot, int]] | None = None

    @property
    def max_payload_size(self) -> int:
        return self._max_payload_size

    def __reduce__(self) -> tuple[Any, ...]:
        held = bytes(self._buffer)
        return (
            type(self),
            (self._max_payload_size,),
            decoder_state(held, self._error, self._skip, self._skipped),
        )

    def __setstate__(self, state: object) -> None:
        held, self._error, self._skip, self._skipped = decoder_state_parts(state)
        self._buffer = bytearray(held)

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet complete (non-zero at EOF means a truncated frame).

        A partial descriptor of a frame to be skipped counts; its discarded body does not.
        """
        return len(self._buffer)

    @property
    def skipping(self) -> int:
        """Body bytes of an oversized frame still to discard (0 when none is being skipped;
        non-zero at EOF means a truncated frame too)."""
        return self._skip

    @property
    def has_skipped(self) -> bool:
        """Whether ``take_skipped()`` has anything: cheap enough to test after every feed."""
        return self._skipped is not None

    def take_skipped(self) -> list[tuple[MsgDescHot, int]]:
        """The oversized frames skipped since the last call, in arrival order, as
        ``(descriptor, payload_len)`` pairs; clears the list.

        Each descriptor is as it arrived (not checked against the inline rules) and
        ``payload_len`` is ``frame_len - 64``, the size of the body being discarded. A frame
        is listed as soon as its descriptor is complete, before its body has gone by.
        """
        skipped = self._skipped
        self._skipped = None
        return [] if skipped is None else skipped

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Consume ``data`` and return every frame it completes, in order (oversized frames
        are skipped and listed by ``take_skipped()`` instead)."""
        if self._error is not None:
            raise decoder_failed(self._error)
        view = byte_view(data)
        if self._skip:
            dropped = min(self._skip, len(view))
            self._skip -= dropped
            if self._skip:
                return []
            view = view[dropped:]
        buffer = self._buffer
        if buffer:
            buffer += view
            source: bytearray | memoryview = buffer
        else:
            source = view
        frames: list[Frame] = []
        end = len(source)
        pos = 0
        try:
            while end - pos >= 4:
                (frame_len,) = _LEN.unpack_from(source, pos)
                if frame_len < DESC_SIZE:
                    raise frame_too_short(frame_len)
                if frame_len > self._max_frame_len:
                    if end - pos - 4 < DESC_SIZE:
                        break  # its descriptor is incomplete: held below, like any frame's
                    self._skip_frame(source, pos + 4, frame_len)
                    pos += 4 + DESC_SIZE
                    dropped = min(self._skip, end - pos)
                    self._skip -= dropped
                    pos += dropped
                    continue
                if end - pos - 4 < frame_len:
                    break
                frames.append(self._decode_one(source, pos + 4, frame_len))
                pos += 4 + frame_len
        except FrameError as exc:
            self._error = str(exc)
            self._skip = 0
            self._buffer = bytearray()
            exc.frames = frames
            raise
        if source is buffer:
            if pos:
                del buffer[:pos]
        elif pos < end:
            self._buffer = bytearray(source[pos:])
        return frames

    def decode_message(self, message: bytes | bytearray | memoryview) -> Frame | None:
        """One frame that arrived whole, without its length prefix: the WebSocket Rust
        framing's message (the descriptor, then the payload). ``None`` when its payload is
        over ``max_payload_size``: the frame is then listed by ``take_skipped()``, as
        ``feed`` lists the frames it skips. A message cannot lose sync, so this neither
        reads nor changes what ``feed`` holds; a bad one raises ``FrameError``.
        """
        view = byte_view(message)
        size = len(view)
        if size < DESC_SIZE:
            raise message_too_short(size)
        if size - DESC_SIZE > self._max_payload_size:
            self._list_skipped(view, 0, size - DESC_SIZE)
            return None
        return self._decode_one(view, 0, size)

    def _skip_frame(self, source: bytearray | memoryview, start: int, frame_len: int) -> None:
        """Start skipping an oversized frame whose descriptor is at ``start``: report it."""
        self._list_skipped(source, start, frame_len - DESC_SIZE)
        self._skip = frame_len - DESC_SIZE

    def _list_skipped(self, source: bytearray | memoryview, start: int, size: int) -> None:
        """Report an oversized frame (its descriptor at ``start``) for ``take_skipped()``."""
        desc = MsgDescHot.__new__(MsgDescHot)
        _set_fields(desc, _DESC.unpack_from(source, start))
        if self._skipped is None:
            self._skipped = []
        self._skipped.append((desc, size))

    def _decode_one(self, source: bytearray | memoryview, start: int, frame_len: int) -> Frame:
        desc = MsgDescHot.__new__(MsgDescHot)
        _set_fields(desc, _DESC.unpack_from(source, start))
        n = frame_len - DESC_SIZE
        if n:
            # Trailing bytes are authoritative, whatever the descriptor said.
            payload = bytes(source[start + DESC_SIZE : start + frame_len])
            _place(desc, payload)
        elif desc._payload_slot == INLINE_PAYLOAD_SLOT:
            # Inline-only convention: the bytes live in the descriptor.
            _validate(desc, self._max_payload_size)
            payload = desc._inline_payload[: desc._payload_len]
            _place(desc, payload)
        elif desc._payload_len:
            raise missing_payload(desc._payload_len)
        else:
            payload = b""
            _place(desc, payload)
        frame = Frame.__new__(Frame)
        frame._desc = desc
        frame._payload = payload
        return frame
