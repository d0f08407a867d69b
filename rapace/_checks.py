"""Argument checks and error messages shared by both twins of each family (frame codec,
demux, postcard nodes).

Each message is written once, here, so the twins cannot drift apart. The pure twins call
these checks directly; the compiled twins keep a C fast path for the values they accept
and call here only for the rest, to raise exactly what the pure twin raises. The error
builders at the end return the exception for the caller to raise, so a traceback ends
where the error was found. The twins import this module, never each other: either twin
builds and runs without the other.
"""

from __future__ import annotations

from typing import Any, Final

from rapace.errors import FrameError
from rapace.flags import DESC_SIZE, INLINE_PAYLOAD_SIZE, FrameFlags
from rapace.types import PostcardError

__all__ = [
    "DEFAULT_MAX_PAYLOAD_SIZE",
    "DESC_FIELDS",
    "MAX_PAYLOAD_LEN",
    "U32_MAX",
    "U64_MAX",
    "as_bytes",
    "bad_inline_location",
    "bad_varint_width",
    "byte_view",
    "call_pending",
    "check_inline",
    "check_int",
    "check_number",
    "check_offset",
    "clock_not_callable",
    "decoder_failed",
    "decoder_state",
    "decoder_state_parts",
    "desc_repr",
    "field_count_mismatch",
    "flags_text",
    "frame_too_long",
    "frame_too_short",
    "inline_len_too_long",
    "inline_payload_too_long",
    "missing_payload",
    "nested_too_deep",
    "not_a_desc",
    "not_a_frame",
    "not_bytes_like",
    "on_control_not_callable",
    "on_request_not_callable",
    "over_max_payload",
    "payload_too_long",
    "reserved_method",
    "too_many_zero_size_items",
    "tunnel_registered",
]

DEFAULT_MAX_PAYLOAD_SIZE: Final = 1 << 20
"""The Rust implementation's default maximum payload: 1 MiB."""

U32_MAX: Final = 0xFFFFFFFF
U64_MAX: Final = 0xFFFFFFFFFFFFFFFF

MAX_PAYLOAD_LEN: Final = U32_MAX - DESC_SIZE
"""The largest payload a frame can carry: the u32 length prefix covers the descriptor too."""

DESC_FIELDS: Final = (
    "msg_id",
    "channel_id",
    "method_id",
    "payload_slot",
    "payload_generation",
    "payload_offset",
    "payload_len",
    "flags",
    "credit_grant",
    "deadline_ns",
    "inline_payload",
)
"""The descriptor's fields in wire order (``docs/protocol.md`` §1)."""

_ZERO_INLINE: Final = bytes(INLINE_PAYLOAD_SIZE)
_KNOWN_FLAGS: Final = sum(f.value for f in FrameFlags)


def check_int(name: str, value: object, maximum: int) -> int:
    """``value`` as a plain int when it is an int in 0..maximum; raise otherwise."""
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ValueError(f"{name} must be in 0..{maximum}, got {value}")
    return int(value)


def check_number(name: str, value: object) -> None:
    """A deadline or a clock reading: an int or a float."""
    if not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")


def check_inline(value: object) -> bytes:
    """``inline_payload`` as its 16 zero-padded bytes."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"inline_payload must be bytes-like, not {type(value).__name__}")
    data = bytes(value)
    if len(data) > INLINE_PAYLOAD_SIZE:
        raise ValueError(
            f"inline_payload holds at most {INLINE_PAYLOAD_SIZE} bytes, got {len(data)}"
        )
    return data + _ZERO_INLINE[len(data) :]


def check_offset(offset: object, size: int) -> None:
    """A whole descriptor must follow ``offset`` in a ``size``-byte buffer."""
    if not isinstance(offset, int):
        raise TypeError(f"offset must be an int, not {type(offset).__name__}")
    if offset < 0:
        raise ValueError(f"offset must not be negative, got {offset}")
    if size - offset < DESC_SIZE:
        raise FrameError(
            f"a descriptor needs {DESC_SIZE} bytes, but only {max(size - offset, 0)} "
            f"remain at offset {offset} of a {size}-byte buffer"
        )


def as_bytes(data: object) -> bytes:
    """A payload as bytes: bytes kept as they are, other bytes-likes copied."""
    if type(data) is bytes:
        return data
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"a payload must be bytes-like, not {type(data).__name__}")


def byte_view(buffer: object) -> memoryview:
    """A flat, contiguous byte view of any buffer (a strided one is copied compact)."""
    if not isinstance(buffer, bytes | bytearray | memoryview):
        try:
            view = memoryview(buffer)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"expected a bytes-like object, not {type(buffer).__name__}") from None
    else:
        view = memoryview(buffer)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def decoder_state(
    held: bytes, error: str | None, skipping: int, skipped: list[Any] | None
) -> tuple[bytes, str | None, int, list[Any]]:
    """A ``FrameDecoder``'s pickled state, the same tuple in both twins: the bytes held of
    an incomplete frame, the error that stopped it, the body bytes still to skip and the
    skipped frames not yet taken."""
    return (held, error, skipping, [] if skipped is None else list(skipped))


def decoder_state_parts(state: object) -> tuple[bytes, str | None, int, list[Any] | None]:
    """The parts of a ``decoder_state`` tuple, checked; ``skipped`` is None when empty."""
    if not (isinstance(state, tuple) and len(state) == 4):
        raise TypeError(
            "FrameDecoder state must be a (held, error, skipping, skipped) tuple, "
            f"not {type(state).__name__}"
            + (f" of {len(state)} items" if isinstance(state, tuple) else "")
        )
    held, error, skipping, skipped = state
    if type(held) is not bytes:
        raise TypeError(f"FrameDecoder state: held must be bytes, not {type(held).__name__}")
    if error is not None and not isinstance(error, str):
        raise TypeError(
            f"FrameDecoder state: error must be None or a str, not {type(error).__name__}"
        )
    skipping = check_int("skipping", skipping, MAX_PAYLOAD_LEN)
    if skipping and held:
        raise ValueError("FrameDecoder state: a decoder holds no bytes while it skips a frame")
    if not isinstance(skipped, list):
        raise TypeError(f"FrameDecoder state: skipped must be a list, not {type(skipped).__name__}")
    return held, error, skipping, list(skipped) or None


def desc_repr(desc: object) -> str:
    """Both twins' ``MsgDescHot.__repr__``, so they read the same."""
    parts = []
    for name in DESC_FIELDS:
        value = getattr(desc, name)
        if name == "flags":
            parts.append(f"flags={flags_text(value)}")
        elif name in ("payload_slot", "deadline_ns"):
            parts.append(f"{name}={value:#x}")
        else:
            parts.append(f"{name}={value!r}")
    return f"MsgDescHot({', '.join(parts)})"


def flags_text(flags: int) -> str:
    """``DATA|EOS`` style text for a flags value; unknown bits as hex, no bits as ``0``."""
    names = [f.name for f in FrameFlags if flags & f.value and f.name]
    unknown = flags & ~_KNOWN_FLAGS
    if unknown:
        names.append(f"{unknown:#x}")
    return "|".join(names) or "0"


# -- errors both twins raise ---------------------------------------------------------------


def not_a_desc(value: object) -> TypeError:
    return TypeError(f"desc must be a MsgDescHot, not {type(value).__name__}")


def not_a_frame(value: object) -> TypeError:
    return TypeError(f"expected a Frame, not {type(value).__name__}")


def payload_too_long(n: int) -> ValueError:
    return ValueError(f"a payload holds at most {MAX_PAYLOAD_LEN} bytes, got {n}")


def inline_payload_too_long(n: int) -> ValueError:
    return ValueError(f"an inline payload holds at most {INLINE_PAYLOAD_SIZE} bytes, got {n}")


def inline_len_too_long(n: int) -> FrameError:
    return FrameError(
        f"inline descriptor claims payload_len {n}, "
        f"more than the {INLINE_PAYLOAD_SIZE} inline bytes"
    )


def bad_inline_location(generation: int, offset: int) -> FrameError:
    return FrameError(
        f"inline descriptor has payload_generation {generation} and "
        f"payload_offset {offset}; both must be 0"
    )


def over_max_payload(n: int, max_payload_size: int) -> FrameError:
    return FrameError(f"payload_len {n} exceeds the maximum payload size {max_payload_size}")


def decoder_failed(error: str) -> FrameError:
    return FrameError(f"decoder failed earlier ({error}); it accepts no more input")


def frame_too_short(frame_len: int) -> FrameError:
    return FrameError(f"frame length {frame_len} is shorter than the {DESC_SIZE}-byte descriptor")


def frame_too_long(frame_len: int, max_payload_size: int) -> FrameError:
    """What a receiver reports for a frame over its maximum (the decoder skips such a frame
    and lists it in ``take_skipped()``; it no longer raises this itself)."""
    return FrameError(
        f"frame length {frame_len} exceeds the maximum of {max_payload_size + DESC_SIZE} "
        f"({max_payload_size} payload bytes + {DESC_SIZE}-byte descriptor)"
    )


def message_too_short(size: int) -> FrameError:
    return FrameError(f"a message of {size} bytes is shorter than the {DESC_SIZE}-byte descriptor")


def missing_payload(n: int) -> FrameError:
    return FrameError(f"descriptor claims {n} out-of-line payload bytes but the frame carries none")


def on_request_not_callable() -> TypeError:
    return TypeError("on_request must be callable")


def on_control_not_callable() -> TypeError:
    return TypeError("on_control must be callable or None")


def clock_not_callable() -> TypeError:
    return TypeError("clock must be callable or None")


def reserved_method() -> ValueError:
    return ValueError("method_id 0 is reserved for responses; a request needs a method id")


def call_pending(channel_id: int) -> ValueError:
    return ValueError(f"channel {channel_id} already has a pending call")


def tunnel_registered(channel_id: int) -> ValueError:
    return ValueError(f"tunnel already registered on channel {channel_id}")


def bad_varint_width(bits: int) -> ValueError:
    return ValueError(f"varint width must be 16, 32 or 64, not {bits}")


def field_count_mismatch(name: str, fields: int, nodes: int) -> ValueError:
    return ValueError(f"{name}: {fields} fields, {nodes} nodes")


def not_bytes_like(data: object) -> TypeError:
    """What ``Codec.loads`` raises for anything but bytes, bytearray or memoryview."""
    return TypeError(f"expected a bytes-like object, got {type(data).__name__}")


# -- postcard limits both twins enforce ----------------------------------------------------


def too_many_zero_size_items(
    type_name: str, offset: int, count: int, claimed: int, limit: int
) -> PostcardError:
    """A sequence or map of items that take no input bytes (``list[None]``) claims more of
    them than one message may hold: such counts are the only thing input length does not
    bound, and nested sequences would multiply them."""
    return PostcardError(
        f"{count} zero-size items, after {claimed} earlier in this message, exceed the limit "
        f"of {limit} per message (MAX_ZERO_SIZE_ITEMS_PER_MESSAGE)",
        type_name,
        offset,
        True,
    )


def nested_too_deep(type_name: str, offset: int, decoding: bool, max_depth: int) -> PostcardError:
    """A value nests more structs than either twin follows (``MAX_DEPTH``): both refuse it
    at the same struct, so a peer's deep value gets the same answer from either."""
    return PostcardError(f"nested deeper than {max_depth} structs", type_name, offset, decoding)
