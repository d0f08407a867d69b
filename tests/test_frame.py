"""The frame codec (docs/protocol.md §1-4), run against each twin through ``twin``.

Expected bytes are built with ``struct`` in ``wire_helpers``, never with the codec itself.
"""

from __future__ import annotations

import copy
import gc
import importlib
import pickle
import struct
import subprocess
import sys
import tracemalloc
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wire_helpers import (
    DEFAULTS,
    GOLDEN_INLINE_ONLY,
    GOLDEN_RUST,
    HYPOTHESIS,
    INLINE_SLOT,
    INT_FIELDS,
    LAYOUT,
    NO_DEADLINE,
    OVERSIZED_MAXIMA,
    U32_FIELDS,
    U32_MAX,
    U64_FIELDS,
    U64_MAX,
    assert_names,
    chunks,
    desc_fields,
    field_max,
    fields_of,
    payloads,
    raw_desc,
    raw_frame,
    split_points,
    streams_with_oversized,
)

from rapace.errors import FrameError
from rapace.flags import FrameFlags

DEFAULT_BYTES = raw_desc()


def golden_frame_fields() -> dict[str, Any]:
    return {
        **DEFAULTS,
        "msg_id": 7,
        "channel_id": 3,
        "method_id": 0x193FA158,
        "payload_len": 2,
        "flags": int(FrameFlags.DATA),
        "inline_payload": b"\x04\x06" + bytes(14),
    }


# ---------------------------------------------------------------------------------------
# MsgDescHot: defaults, layout, unpack


def test_module_constants(twin: Any) -> None:
    assert twin.frame.DEFAULT_MAX_PAYLOAD_SIZE == 1 << 20


@pytest.mark.c_extensions
def test_compiled_twins_stand_alone() -> None:
    """Importing the compiled twins loads none of the pure ones: each twin stands alone."""
    code = (
        "import sys, rapace._frame, rapace._demux, rapace._postcard\n"
        "print(sorted(m for m in sys.modules if m.startswith('rapace.') and m.endswith('_py')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.c_extensions
@pytest.mark.parametrize(
    ("module", "name"),
    [("rapace._frame", "Frame"), ("rapace._frame", "MsgDescHot"), ("rapace._demux", "Demux")],
)
def test_compiled_classes_are_final(module: str, name: str) -> None:
    """Final, so the C code reading their fields never meets an override."""
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(TypeError, match="is not an acceptable base type"):
        type("Sub", (cls,), {})


def test_deleting_a_field_is_refused(twin: Any) -> None:
    desc = twin.frame.MsgDescHot(msg_id=5)
    for name in (*INT_FIELDS, "inline_payload"):
        with pytest.raises(AttributeError) as info:
            delattr(desc, name)
        assert str(info.value) == f"property {name!r} of 'MsgDescHot' object has no deleter"
    assert desc.msg_id == 5


def test_defaults_match_the_wire_table(twin: Any) -> None:
    desc = twin.frame.MsgDescHot()
    assert fields_of(desc) == DEFAULTS
    assert type(desc.inline_payload) is bytes
    for name in INT_FIELDS:
        assert type(getattr(desc, name)) is int, name


def test_default_descriptor_packs_to_the_default_bytes(twin: Any) -> None:
    packed = twin.frame.MsgDescHot().pack()
    assert type(packed) is bytes
    assert len(packed) == 64
    assert packed == DEFAULT_BYTES
    assert packed == bytes(16) + b"\xff" * 4 + bytes(20) + b"\xff" * 8 + bytes(16)


@pytest.mark.parametrize(("name", "offset", "size"), LAYOUT)
def test_pack_puts_each_field_at_its_offset(twin: Any, name: str, offset: int, size: int) -> None:
    if name == "inline_payload":
        value: Any = bytes(range(1, 17))
        expected = value
    else:
        # Distinct bytes so a swapped or misaligned field cannot go unnoticed.
        value = int.from_bytes(bytes(range(0x11, 0x11 + size)), "little")
        expected = bytes(range(0x11, 0x11 + size))
    packed = twin.frame.MsgDescHot(**{name: value}).pack()
    assert packed[offset : offset + size] == expected
    assert packed[:offset] == DEFAULT_BYTES[:offset]
    assert packed[offset + size :] == DEFAULT_BYTES[offset + size :]


def test_pack_all_fields_little_endian(twin: Any) -> None:
    fields = {
        "msg_id": 0x0102030405060708,
        "channel_id": 0x11121314,
        "method_id": 0x21222324,
        "payload_slot": 0x31323334,
        "payload_generation": 0x41424344,
        "payload_offset": 0x51525354,
        "payload_len": 0x61626364,
        "flags": 0x71727374,
        "credit_grant": 0x81828384,
        "deadline_ns": 0x9192939495969798,
        "inline_payload": b"0123456789abcdef",
    }
    packed = twin.frame.MsgDescHot(**fields).pack()
    assert packed == raw_desc(**fields)
    assert packed == struct.pack("<QIIIIIIIIQ16s", *fields.values())


def test_max_values_pack(twin: Any) -> None:
    fields = {name: field_max(name) for name in INT_FIELDS}
    desc = twin.frame.MsgDescHot(**fields, inline_payload=b"\xff" * 16)
    assert desc.pack() == b"\xff" * 64
    assert fields_of(twin.frame.MsgDescHot.unpack(b"\xff" * 64)) == fields_of(desc)


def test_short_inline_payload_is_zero_padded(twin: Any) -> None:
    desc = twin.frame.MsgDescHot(inline_payload=b"ab")
    assert desc.inline_payload == b"ab" + bytes(14)
    desc.inline_payload = bytearray(b"xyz")
    assert desc.inline_payload == b"xyz" + bytes(13)
    assert type(desc.inline_payload) is bytes
    desc.inline_payload = memoryview(b"q" * 16)
    assert desc.inline_payload == b"q" * 16


def test_inline_payload_is_copied_not_viewed(twin: Any) -> None:
    source = bytearray(b"abcd")
    desc = twin.frame.MsgDescHot(inline_payload=source)
    source[:] = b"ZZZZ"
    assert desc.inline_payload == b"abcd" + bytes(12)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_unpack_from_bytes_like(twin: Any, kind: type) -> None:
    fields = golden_frame_fields()
    desc = twin.frame.MsgDescHot.unpack(kind(raw_desc(**fields)))
    assert fields_of(desc) == fields
    assert type(desc.inline_payload) is bytes


def test_unpack_at_an_offset(twin: Any) -> None:
    fields = golden_frame_fields()
    buffer = b"\xaa" * 13 + raw_desc(**fields) + b"\xbb" * 5
    assert fields_of(twin.frame.MsgDescHot.unpack(buffer, 13)) == fields
    assert fields_of(twin.frame.MsgDescHot.unpack(bytearray(buffer), offset=13)) == fields
    assert fields_of(twin.frame.MsgDescHot.unpack(memoryview(buffer)[13:77])) == fields


def test_unpack_exactly_at_the_end(twin: Any) -> None:
    buffer = bytes(10) + raw_desc(msg_id=99)
    assert twin.frame.MsgDescHot.unpack(buffer, 10).msg_id == 99


def test_unpack_does_not_keep_a_view_of_the_buffer(twin: Any) -> None:
    buffer = bytearray(raw_desc(msg_id=5, inline_payload=b"hello"))
    desc = twin.frame.MsgDescHot.unpack(buffer)
    buffer[:] = bytes(64)
    assert desc.msg_id == 5
    assert desc.inline_payload == b"hello" + bytes(11)


def test_pack_unpack_round_trip(twin: Any) -> None:
    fields = {name: i * 7 + 1 for i, name in enumerate(INT_FIELDS)}
    desc = twin.frame.MsgDescHot(**fields, inline_payload=b"rt")
    again = twin.frame.MsgDescHot.unpack(desc.pack())
    assert again == desc
    assert again.pack() == desc.pack()


# ---------------------------------------------------------------------------------------
# equality, copy, repr, hashing


def test_equality(twin: Any) -> None:
    MsgDescHot = twin.frame.MsgDescHot
    assert MsgDescHot() == MsgDescHot()
    assert MsgDescHot(msg_id=1) == MsgDescHot(msg_id=1)
    for name in INT_FIELDS:
        changed = MsgDescHot(**{name: 1 if DEFAULTS[name] == 0 else 0})
        assert changed != MsgDescHot(), name
        assert not changed == MsgDescHot(), name  # noqa: SIM201
    assert MsgDescHot(inline_payload=b"a") != MsgDescHot()
    assert MsgDescHot() != 0
    assert MsgDescHot() != DEFAULT_BYTES
    assert not MsgDescHot() == None  # noqa: E711, SIM201


def test_descriptors_are_mutable_and_unhashable(twin: Any) -> None:
    desc = twin.frame.MsgDescHot()
    with pytest.raises(TypeError):
        hash(desc)
    desc.msg_id = 12
    desc.deadline_ns = 34
    assert (desc.msg_id, desc.deadline_ns) == (12, 34)
    assert desc.pack()[0:8] == (12).to_bytes(8, "little")


def test_copy_is_independent(twin: Any) -> None:
    desc = twin.frame.MsgDescHot(msg_id=1, inline_payload=b"x")
    dup = desc.copy()
    assert type(dup) is type(desc)
    assert dup == desc
    assert dup is not desc
    dup.msg_id = 2
    dup.inline_payload = b"y"
    assert desc.msg_id == 1
    assert desc.inline_payload == b"x" + bytes(15)


def test_repr_names_the_fields(twin: Any) -> None:
    desc = twin.frame.MsgDescHot(
        msg_id=7, channel_id=3, method_id=0x193FA158, flags=FrameFlags.DATA | FrameFlags.EOS
    )
    text = repr(desc)
    assert text.startswith("MsgDescHot(")
    for needle in (
        "msg_id=7",
        "channel_id=3",
        "method_id=423600472",
        "payload_slot=0xffffffff",
        "flags=DATA|EOS",
        "deadline_ns=0xffffffffffffffff",
    ):
        assert needle in text, (needle, text)


def test_repr_shows_unknown_flag_bits(twin: Any) -> None:
    assert "flags=DATA|0x10000" in repr(twin.frame.MsgDescHot(flags=0x10001))
    assert "flags=0," in repr(twin.frame.MsgDescHot())


def test_flag_enum_values_are_accepted_and_read_back_as_ints(twin: Any) -> None:
    desc = twin.frame.MsgDescHot(flags=FrameFlags.DATA | FrameFlags.EOS)
    assert desc.flags == 5
    desc.flags = FrameFlags.ERROR
    assert desc.flags == 0x10
    assert desc.pack()[32:36] == b"\x10\0\0\0"


def test_constructor_is_keyword_only(twin: Any) -> None:
    with pytest.raises(TypeError):
        twin.frame.MsgDescHot(1)


def test_constructor_rejects_unknown_fields(twin: Any) -> None:
    with pytest.raises(TypeError):
        twin.frame.MsgDescHot(msg_idd=1)


# ---------------------------------------------------------------------------------------
# field range checks


def _bad_range_values(name: str) -> list[int]:
    top = field_max(name)
    values = [-1, top + 1, -(2**64), 2**64, 2**100]
    if name in U32_FIELDS:
        values.append(2**32)
    return values


@pytest.mark.parametrize("name", INT_FIELDS)
def test_out_of_range_field_raises_value_error(twin: Any, name: str) -> None:
    for value in _bad_range_values(name):
        with pytest.raises(ValueError) as info:
            twin.frame.MsgDescHot(**{name: value})
        assert type(info.value) is ValueError, (name, value, info.value)
        assert name in str(info.value)
        assert_names(info.value, abs(value))
        desc = twin.frame.MsgDescHot()
        with pytest.raises(ValueError) as info:
            setattr(desc, name, value)
        assert type(info.value) is ValueError, (name, value, info.value)
        assert name in str(info.value)
        assert_names(info.value, abs(value))
        assert fields_of(desc) == DEFAULTS  # a failed set changes nothing


@pytest.mark.parametrize("name", INT_FIELDS)
def test_field_edges_are_accepted(twin: Any, name: str) -> None:
    top = field_max(name)
    for value in (0, top):
        desc = twin.frame.MsgDescHot(**{name: value})
        assert getattr(desc, name) == value
        setattr(desc, name, value)
        assert getattr(desc, name) == value


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("value", ["1", 1.0, None, b"\x01", [1]])
def test_non_int_field_raises_type_error(twin: Any, name: str, value: object) -> None:
    with pytest.raises(TypeError) as info:
        twin.frame.MsgDescHot(**{name: value})
    assert name in str(info.value)
    desc = twin.frame.MsgDescHot()
    with pytest.raises(TypeError):
        setattr(desc, name, value)
    assert fields_of(desc) == DEFAULTS


def test_u32_fields_and_u64_fields_are_the_wire_table(twin: Any) -> None:
    for name in U64_FIELDS:
        assert getattr(twin.frame.MsgDescHot(**{name: U64_MAX}), name) == U64_MAX
    for name in U32_FIELDS:
        with pytest.raises(ValueError):
            twin.frame.MsgDescHot(**{name: U32_MAX + 1})


def test_inline_payload_over_16_bytes_raises(twin: Any) -> None:
    for value in (bytes(17), bytearray(100), memoryview(bytes(17))):
        with pytest.raises(ValueError) as info:
            twin.frame.MsgDescHot(inline_payload=value)
        assert_names(info.value, 16, len(value))
    desc = twin.frame.MsgDescHot(inline_payload=b"keep")
    with pytest.raises(ValueError):
        desc.inline_payload = bytes(17)
    assert desc.inline_payload == b"keep" + bytes(12)


@pytest.mark.parametrize("value", ["abc", 5, None, [1, 2]])
def test_inline_payload_must_be_bytes_like(twin: Any, value: object) -> None:
    with pytest.raises(TypeError):
        twin.frame.MsgDescHot(inline_payload=value)
    desc = twin.frame.MsgDescHot()
    with pytest.raises(TypeError):
        desc.inline_payload = value


# ---------------------------------------------------------------------------------------
# Frame construction and payload placement (docs/protocol.md §3)


def _dirty_desc(twin: Any) -> Any:
    """A descriptor whose location fields are all wrong, to see them reset."""
    return twin.frame.MsgDescHot(
        msg_id=9,
        channel_id=5,
        method_id=77,
        payload_slot=3,
        payload_generation=4,
        payload_offset=5,
        payload_len=999,
        flags=1,
        credit_grant=8,
        deadline_ns=123,
        inline_payload=b"stale bytes here",
    )


def _assert_identity_fields_kept(desc: Any) -> None:
    assert (desc.msg_id, desc.channel_id, desc.method_id) == (9, 5, 77)
    assert (desc.flags, desc.credit_grant, desc.deadline_ns) == (1, 8, 123)


@pytest.mark.parametrize("size", [0, 1, 2, 15, 16])
@pytest.mark.parametrize("constructor", ["with_payload", "with_inline_payload", "init"])
def test_small_payload_goes_inline(twin: Any, size: int, constructor: str) -> None:
    data = bytes(range(100, 100 + size))
    desc = _dirty_desc(twin)
    if constructor == "init":
        frame = twin.frame.Frame(desc, data)
    else:
        frame = getattr(twin.frame.Frame, constructor)(desc, data)
    d = frame.desc
    assert d.payload_slot == INLINE_SLOT
    assert d.payload_generation == 0
    assert d.payload_offset == 0
    assert d.payload_len == size
    assert d.inline_payload == data + bytes(16 - size)
    assert frame.payload == data
    assert type(frame.payload) is bytes
    _assert_identity_fields_kept(d)


@pytest.mark.parametrize("size", [17, 18, 64, 4096])
@pytest.mark.parametrize("constructor", ["with_payload", "init"])
def test_large_payload_goes_out_of_line(twin: Any, size: int, constructor: str) -> None:
    data = bytes(i & 0xFF for i in range(size))
    desc = _dirty_desc(twin)
    if constructor == "init":
        frame = twin.frame.Frame(desc, data)
    else:
        frame = twin.frame.Frame.with_payload(desc, data)
    d = frame.desc
    assert d.payload_slot == 0
    assert d.payload_generation == 0
    assert d.payload_offset == 0
    assert d.payload_len == size
    assert frame.payload == data
    _assert_identity_fields_kept(d)


@pytest.mark.parametrize("size", [17, 100])
def test_with_inline_payload_refuses_more_than_16_bytes(twin: Any, size: int) -> None:
    desc = twin.frame.MsgDescHot(msg_id=4)
    with pytest.raises(ValueError) as info:
        twin.frame.Frame.with_inline_payload(desc, bytes(size))
    assert_names(info.value, 16, size)
    assert fields_of(desc) == {**DEFAULTS, "msg_id": 4}  # untouched by the failure


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_frame_payload_is_copied_bytes(twin: Any, kind: type) -> None:
    for size in (3, 40):
        source = bytearray(range(size))
        frame = twin.frame.Frame.with_payload(twin.frame.MsgDescHot(), kind(source))
        source[:] = bytes(size)
        assert frame.payload == bytes(range(size))
        assert type(frame.payload) is bytes


def test_frame_type_errors(twin: Any) -> None:
    Frame = twin.frame.Frame
    with pytest.raises(TypeError):
        Frame(object(), b"")
    with pytest.raises(TypeError):
        Frame.with_payload(twin.frame.MsgDescHot(), "text")
    with pytest.raises(TypeError):
        Frame.with_inline_payload(twin.frame.MsgDescHot(), 5)
    with pytest.raises(TypeError):
        twin.frame.encode_frame(twin.frame.MsgDescHot())
    with pytest.raises(TypeError):
        twin.frame.encode_frame(b"\0" * 68)


def test_frame_equality_and_repr(twin: Any) -> None:
    Frame, MsgDescHot = twin.frame.Frame, twin.frame.MsgDescHot
    a = Frame.with_payload(MsgDescHot(msg_id=1), b"abc")
    b = Frame.with_payload(MsgDescHot(msg_id=1), b"abc")
    assert a == b
    assert a != Frame.with_payload(MsgDescHot(msg_id=2), b"abc")
    assert a != Frame.with_payload(MsgDescHot(msg_id=1), b"abd")
    assert a != b"abc"
    with pytest.raises(TypeError):
        hash(a)
    text = repr(a)
    assert text.startswith("Frame(")
    assert "msg_id=1" in text
    assert "b'abc'" in text


def test_build_frame(twin: Any) -> None:
    frame = twin.frame.build_frame(7, 3, 0x193FA158, int(FrameFlags.DATA), b"\x04\x06")
    assert fields_of(frame.desc) == golden_frame_fields()
    assert frame.payload == b"\x04\x06"
    big = twin.frame.build_frame(1, 2, 3, 4, bytes(17))
    assert (big.desc.payload_slot, big.desc.payload_len) == (0, 17)
    assert big.desc.credit_grant == 0
    assert big.desc.deadline_ns == NO_DEADLINE
    assert twin.frame.build_frame(1, 2, 3, 4).payload == b""
    with pytest.raises(ValueError):
        twin.frame.build_frame(1, -1, 3, 4)
    with pytest.raises(ValueError):
        twin.frame.build_frame(1, 2, 3, 2**32)
    with pytest.raises(TypeError):
        twin.frame.build_frame(1, 2, 3, 4, "text")


def test_reply_frame_answers_on_the_request_channel_echoing_its_msg_id(twin: Any) -> None:
    request = twin.frame.build_frame(41, 7, 0x193FA158, int(FrameFlags.DATA), b"\x04\x06")
    data_eos = int(FrameFlags.DATA | FrameFlags.EOS)
    reply = twin.frame.reply_frame(request, data_eos, b"\x0a")
    assert type(reply) is twin.frame.Frame
    assert (reply.desc.msg_id, reply.desc.channel_id, reply.desc.method_id) == (41, 7, 0)
    assert (reply.desc.flags, reply.payload) == (data_eos, b"\x0a")
    assert reply.desc.payload_slot == INLINE_SLOT and reply.desc.payload_len == 1
    big = twin.frame.reply_frame(request, int(FrameFlags.ERROR), bytearray(100))
    assert (big.desc.payload_slot, big.desc.payload_len, big.payload) == (0, 100, bytes(100))
    assert twin.frame.reply_frame(request, 0).payload == b""
    assert request.desc.method_id == 0x193FA158  # the request is left as it was


def test_reply_frame_reads_any_frame_like_request(twin: Any) -> None:
    class Desc:
        msg_id, channel_id = 2**64 - 1, 0xFFFFFFFF

    class Request:
        desc = Desc()

    reply = twin.frame.reply_frame(Request(), 5, b"x")
    assert (reply.desc.msg_id, reply.desc.channel_id, reply.desc.flags) == (
        2**64 - 1,
        0xFFFFFFFF,
        5,
    )


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ((None, 5, b""), AttributeError, "'NoneType' object has no attribute 'desc'"),
        (("frame", 2**32, b""), ValueError, "flags must be in 0..4294967295, got 4294967296"),
        (("frame", "5", b""), TypeError, "flags must be an int, not str"),
        (("frame", 5, "text"), TypeError, "a payload must be bytes-like, not str"),
    ],
)
def test_reply_frame_refuses_bad_input_with_the_pure_twin_s_messages(
    twin: Any, case: tuple[Any, Any, Any], error: type[Exception], message: str
) -> None:
    request_, flags, payload = case
    request = twin.frame.build_frame(1, 3, 9, 1) if request_ == "frame" else request_
    with pytest.raises(error) as info:
        twin.frame.reply_frame(request, flags, payload)
    assert str(info.value) == message


# ---------------------------------------------------------------------------------------
# encode_frame (docs/protocol.md §4)


def test_encode_golden_request_as_rust_writes_it(twin: Any) -> None:
    desc = twin.frame.MsgDescHot(msg_id=7, channel_id=3, method_id=0x193FA158, flags=1)
    frame = twin.frame.Frame.with_payload(desc, b"\x04\x06")
    encoded = twin.frame.encode_frame(frame)
    assert type(encoded) is bytes
    assert encoded == GOLDEN_RUST
    # The inline payload is also written after the descriptor.
    assert encoded[0:4] == (66).to_bytes(4, "little")
    assert encoded[4:68] == GOLDEN_INLINE_ONLY[4:]
    assert encoded[68:] == b"\x04\x06"


@pytest.mark.parametrize("size", [0, 1, 16, 17, 300])
def test_encode_layout(twin: Any, size: int) -> None:
    data = bytes((i * 7) & 0xFF for i in range(size))
    frame = twin.frame.Frame.with_payload(twin.frame.MsgDescHot(msg_id=42, flags=5), data)
    encoded = twin.frame.encode_frame(frame)
    assert len(encoded) == 4 + 64 + size
    assert struct.unpack_from("<I", encoded)[0] == 64 + size
    assert encoded[4:68] == frame.desc.pack()
    assert encoded[68:] == data
    inline = size <= 16
    expected_desc = raw_desc(
        msg_id=42,
        flags=5,
        payload_slot=INLINE_SLOT if inline else 0,
        payload_len=size,
        inline_payload=data if inline else b"",
    )
    assert encoded[4:68] == expected_desc


# ---------------------------------------------------------------------------------------
# FrameDecoder: good input


def _decode_all(twin: Any, data: bytes, **kwargs: Any) -> list[Any]:
    decoder = twin.frame.FrameDecoder(**kwargs)
    frames = decoder.feed(data)
    assert decoder.buffered == 0
    return frames


def test_decode_golden_vector_inline_only(twin: Any) -> None:
    frames = _decode_all(twin, GOLDEN_INLINE_ONLY)
    assert len(frames) == 1
    frame = frames[0]
    assert fields_of(frame.desc) == golden_frame_fields()
    assert frame.payload == b"\x04\x06"
    assert type(frame.payload) is bytes


def test_decode_golden_vector_rust_convention(twin: Any) -> None:
    frames = _decode_all(twin, GOLDEN_RUST)
    assert len(frames) == 1
    assert fields_of(frames[0].desc) == golden_frame_fields()
    assert frames[0].payload == b"\x04\x06"


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_feed_accepts_bytes_like(twin: Any, kind: type) -> None:
    decoder = twin.frame.FrameDecoder()
    frames = decoder.feed(kind(GOLDEN_RUST + GOLDEN_INLINE_ONLY))
    assert [f.payload for f in frames] == [b"\x04\x06", b"\x04\x06"]


def test_feed_type_error(twin: Any) -> None:
    with pytest.raises(TypeError):
        twin.frame.FrameDecoder().feed("not bytes")


def test_feed_empty(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.buffered == 0


def test_trailing_bytes_are_authoritative_small(twin: Any) -> None:
    """payload_len := frame_len - 64; <= 16 bytes are copied inline, slot set inline."""
    desc = raw_desc(
        msg_id=1,
        payload_slot=5,
        payload_generation=6,
        payload_offset=7,
        payload_len=300,
        inline_payload=b"junk junk junk!!",
    )
    (frame,) = _decode_all(twin, raw_frame(desc, b"hello"))
    d = frame.desc
    assert frame.payload == b"hello"
    assert (d.payload_slot, d.payload_generation, d.payload_offset) == (INLINE_SLOT, 0, 0)
    assert d.payload_len == 5
    assert d.inline_payload == b"hello" + bytes(11)
    assert d.msg_id == 1


def test_trailing_bytes_are_authoritative_large(twin: Any) -> None:
    payload = bytes(range(40))
    desc = raw_desc(payload_slot=INLINE_SLOT, payload_len=3, inline_payload=b"abc")
    (frame,) = _decode_all(twin, raw_frame(desc, payload))
    d = frame.desc
    assert frame.payload == payload
    assert d.payload_len == 40
    assert d.payload_slot != INLINE_SLOT
    assert (d.payload_generation, d.payload_offset) == (0, 0)


def test_trailing_bytes_win_over_an_inline_claim_of_200(twin: Any) -> None:
    desc = raw_desc(payload_slot=INLINE_SLOT, payload_len=200)
    (frame,) = _decode_all(twin, raw_frame(desc, b"xy"))
    assert frame.payload == b"xy"
    assert frame.desc.payload_len == 2


def test_inline_only_payload_is_the_declared_prefix(twin: Any) -> None:
    desc = raw_desc(payload_len=3, inline_payload=b"abcdefgh")
    (frame,) = _decode_all(twin, raw_frame(desc))
    assert frame.payload == b"abc"
    assert frame.desc.payload_len == 3
    assert frame.desc.inline_payload == b"abc" + bytes(13)


def test_inline_only_full_16_bytes(twin: Any) -> None:
    desc = raw_desc(payload_len=16, inline_payload=b"0123456789abcdef")
    (frame,) = _decode_all(twin, raw_frame(desc))
    assert frame.payload == b"0123456789abcdef"


def test_empty_frames(twin: Any) -> None:
    inline_empty = raw_frame(raw_desc(flags=4))
    out_of_line_empty = raw_frame(raw_desc(payload_slot=0, payload_len=0, flags=4))
    frames = _decode_all(twin, inline_empty + out_of_line_empty)
    assert [f.payload for f in frames] == [b"", b""]
    for frame in frames:
        assert frame.desc.payload_len == 0
        assert frame.desc.flags == 4


def test_unknown_flag_bits_are_preserved(twin: Any) -> None:
    flags = 0xFFFF0001
    (frame,) = _decode_all(twin, raw_frame(raw_desc(flags=flags), b"p"))
    assert frame.desc.flags == flags
    assert twin.frame.encode_frame(frame)[36:40] == flags.to_bytes(4, "little")


def _mixed_stream(twin: Any) -> tuple[bytes, list[tuple[int, bytes]]]:
    parts, expected = [], []
    for i, size in enumerate([0, 2, 16, 17, 1000, 5, 0, 64]):
        payload = bytes((i + j) & 0xFF for j in range(size))
        frame = twin.frame.build_frame(i + 1, 2 * i + 1, 0, 1, payload)
        if size <= 16 and i % 2:
            # The inline-only convention from other clients.
            parts.append(raw_frame(frame.desc.pack()))
        else:
            parts.append(twin.frame.encode_frame(frame))
        expected.append((i + 1, payload))
    return b"".join(parts), expected


def test_many_frames_in_one_feed(twin: Any) -> None:
    data, expected = _mixed_stream(twin)
    frames = _decode_all(twin, data)
    assert [(f.desc.msg_id, f.payload) for f in frames] == expected


def test_byte_by_byte(twin: Any) -> None:
    data, expected = _mixed_stream(twin)
    decoder = twin.frame.FrameDecoder()
    got = []
    for i in range(len(data)):
        got.extend(decoder.feed(data[i : i + 1]))
    assert decoder.buffered == 0
    assert [(f.desc.msg_id, f.payload) for f in got] == expected


@pytest.mark.parametrize("chunk", [7, 4093, 65541, 1 << 20])
def test_large_frames_in_chunks(twin: Any, chunk: int) -> None:
    sizes = [100_000, 2, 70_000, 0, 65_536, 17]
    frames = [twin.frame.build_frame(i, 1, 0, 1, bytes([i]) * size) for i, size in enumerate(sizes)]
    data = b"".join(twin.frame.encode_frame(f) for f in frames)
    decoder = twin.frame.FrameDecoder()
    got = []
    for start in range(0, len(data), chunk):
        got.extend(decoder.feed(memoryview(data)[start : start + chunk]))
        assert decoder.buffered < 4 + 64 + max(sizes)
    assert decoder.buffered == 0
    assert [(f.desc.msg_id, f.payload) for f in got] == [(f.desc.msg_id, f.payload) for f in frames]


def test_buffered_counts_a_truncated_frame(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder()
    assert decoder.feed(GOLDEN_RUST[:3]) == []
    assert decoder.buffered == 3
    assert decoder.feed(GOLDEN_RUST[3:50]) == []
    assert decoder.buffered == 50
    frames = decoder.feed(GOLDEN_RUST[50:] + GOLDEN_RUST[:10])
    assert len(frames) == 1
    assert decoder.buffered == 10
    assert len(decoder.feed(GOLDEN_RUST[10:])) == 1
    assert decoder.buffered == 0


def test_decoded_frames_do_not_view_the_fed_buffer(twin: Any) -> None:
    payload = bytes(range(50))
    data = bytearray(twin.frame.encode_frame(twin.frame.build_frame(1, 1, 0, 1, payload)))
    data += GOLDEN_RUST
    decoder = twin.frame.FrameDecoder()
    frames = decoder.feed(data)
    data[:] = bytes(len(data))
    assert frames[0].payload == payload
    assert frames[1].payload == b"\x04\x06"
    assert frames[1].desc.msg_id == 7


def test_decoded_frame_re_encodes_as_rust(twin: Any) -> None:
    (frame,) = _decode_all(twin, GOLDEN_INLINE_ONLY)
    assert twin.frame.encode_frame(frame) == GOLDEN_RUST


def test_frame_exactly_at_the_maximum_is_accepted(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder(max_payload_size=100)
    assert decoder.max_payload_size == 100
    (frame,) = decoder.feed(raw_frame(raw_desc(payload_slot=0), bytes(100)))
    assert frame.desc.payload_len == 100
    zero = twin.frame.FrameDecoder(max_payload_size=0)
    assert len(zero.feed(GOLDEN_INLINE_ONLY[:4] + raw_desc())) == 1


def test_default_maximum_is_one_mib(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder()
    assert decoder.max_payload_size == 1 << 20
    prefix = struct.pack("<I", (1 << 20) + 64)
    assert decoder.feed(prefix + raw_desc(payload_slot=0)) == []
    assert decoder.buffered == 68  # what arrived, nothing more
    (frame,) = decoder.feed(bytes(1 << 20))
    assert len(frame.payload) == 1 << 20
    # One byte more is skipped, not buffered.
    over = twin.frame.FrameDecoder()
    assert over.feed(struct.pack("<I", (1 << 20) + 65) + raw_desc(msg_id=3)) == []
    assert (over.buffered, over.skipping) == (0, (1 << 20) + 1)
    assert [(d.msg_id, n) for d, n in over.take_skipped()] == [(3, (1 << 20) + 1)]


@pytest.mark.parametrize("value", [-1, 2**32 - 64, 2**32, 2**64])
def test_decoder_max_payload_size_range(twin: Any, value: int) -> None:
    with pytest.raises(ValueError) as info:
        twin.frame.FrameDecoder(max_payload_size=value)
    assert "max_payload_size" in str(info.value)
    assert_names(info.value, abs(value))


def test_decoder_max_payload_size_largest(twin: Any) -> None:
    top = 2**32 - 1 - 64
    decoder = twin.frame.FrameDecoder(max_payload_size=top)
    assert decoder.max_payload_size == top
    assert decoder.feed(b"\xff\xff\xff\xff") == []  # frame_len == top + 64 is allowed
    assert decoder.buffered == 4


@pytest.mark.parametrize("value", [1.5, "10", None])
def test_decoder_max_payload_size_type(twin: Any, value: object) -> None:
    with pytest.raises(TypeError):
        twin.frame.FrameDecoder(max_payload_size=value)


# ---------------------------------------------------------------------------------------
# bad input: every path, exception type and a message that names the numbers


def assert_limit(exc: BaseException, frame_len: int, max_payload_size: int) -> None:
    """The message names the offending length and the limit (as payload or frame size)."""
    assert_names(exc, frame_len)
    try:
        assert_names(exc, max_payload_size + 64)
    except AssertionError:
        assert_names(exc, max_payload_size)


@pytest.mark.parametrize("frame_len", [0, 1, 63])
def test_frame_len_below_64(twin: Any, frame_len: int) -> None:
    decoder = twin.frame.FrameDecoder()
    with pytest.raises(FrameError) as info:
        decoder.feed(struct.pack("<I", frame_len) + bytes(frame_len))
    assert_names(info.value, frame_len, 64)


def test_frame_len_below_64_is_refused_from_the_prefix_alone(twin: Any) -> None:
    with pytest.raises(FrameError) as info:
        twin.frame.FrameDecoder().feed(struct.pack("<I", 10))
    assert_names(info.value, 10, 64)


def test_oversized_prefix_is_skipped_without_allocating(twin: Any) -> None:
    """A 0xFFFFFFFF frame: its prefix and descriptor are held (68 bytes), then it is listed
    as skipped and its 4 GiB body counted down; nothing near its size is allocated."""
    decoder = twin.frame.FrameDecoder()
    desc = raw_desc(msg_id=11, channel_id=7, method_id=5, payload_slot=0, payload_len=99)
    tracemalloc.start()
    try:
        assert decoder.feed(b"\xff\xff\xff\xff") == []
        assert (decoder.buffered, decoder.skipping, decoder.has_skipped) == (4, 0, False)
        assert decoder.feed(desc) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"feeding 68 bytes allocated {peak} bytes"
    assert (decoder.buffered, decoder.skipping, decoder.has_skipped) == (0, 0xFFFFFFFF - 64, True)
    ((skipped, n),) = decoder.take_skipped()
    assert skipped.pack() == desc
    assert n == 0xFFFFFFFF - 64
    assert not decoder.has_skipped
    assert decoder.take_skipped() == []


ADDRESS_SPACE_PROBE = """
import resource, sys, importlib
frame = importlib.import_module(sys.argv[1])
decoder = frame.FrameDecoder()
small = frame.FrameDecoder(max_payload_size=100)
piece = bytes(1 << 20)
with open("/proc/self/status") as status:
    vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
# Room for 256 MiB more: a 4 GiB (or even 1 MiB-per-byte) allocation cannot happen.
resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), vm + (256 << 20)))
results = []
for dec, data in ((decoder, b"\\xff\\xff\\xff\\xff"), (small, b"\\x00\\x00\\x00\\x80")):
    try:
        dec.feed(data + bytes(64))
        for _ in range(8):  # 8 MiB of the body
            assert dec.feed(piece) == []
            assert dec.buffered == 0
        results.append(f"skipping:{dec.skipping}")
    except MemoryError:
        results.append("MemoryError")
print(",".join(results))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is Linux-only")
def test_oversized_prefix_allocates_nothing_even_outside_tracemalloc(twin: Any) -> None:
    """Under a tight address-space limit, so allocations tracemalloc cannot see count too."""
    result = subprocess.run(
        [sys.executable, "-c", ADDRESS_SPACE_PROBE, twin.frame.__name__],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    left = (0xFFFFFFFF - 64 - (8 << 20), 0x80000000 - 64 - (8 << 20))
    assert result.stdout.split() == [f"skipping:{left[0]},skipping:{left[1]}"]


PREFIX_RESERVATION_PROBE = """
import resource, sys, importlib
frame = importlib.import_module(sys.argv[1])
decoder = frame.FrameDecoder(max_payload_size=2**32 - 1 - 64)
with open("/proc/self/status") as status:
    vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), vm + (256 << 20)))
try:
    decoder.feed(b"\\x00\\x00\\x00\\x80" + bytes(60))  # a legal 2 GiB frame begins
except MemoryError:
    print("MemoryError")
else:
    print("buffered", decoder.buffered)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is Linux-only")
def test_a_length_prefix_alone_reserves_no_frame_sized_buffer(twin: Any) -> None:
    """Memory follows the bytes that arrived, not the length a peer claims: 64 bytes of a
    (legal, with this maximum) 2 GiB frame must not reserve 2 GiB. Otherwise four bytes
    per connection make the process reserve a maximum-size frame for each."""
    result = subprocess.run(
        [sys.executable, "-c", PREFIX_RESERVATION_PROBE, twin.frame.__name__],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["buffered", "64"]


TOP_LENGTH_PROBE = """
import sys, importlib
frame = importlib.import_module(sys.argv[1])
for frame_len in (0xFFFFFFFB, 0xFFFFFFFC, 0xFFFFFFFF):
    decoder = frame.FrameDecoder(max_payload_size=2**32 - 1 - 64)
    sizes = []
    for chunk in (frame_len.to_bytes(4, "little") + bytes(60), b"\\x00", bytes(1000)):
        assert decoder.feed(chunk) == []
        sizes.append(decoder.buffered)
    print(hex(frame_len), *sizes, flush=True)
"""


def test_largest_legal_lengths_are_buffered_safely(twin: Any) -> None:
    """With the largest allowed maximum, frame lengths near 2**32 are legal: 4 + frame_len
    must not wrap around in 32-bit arithmetic (in a subprocess: a crash is a failure)."""
    result = subprocess.run(
        [sys.executable, "-c", TOP_LENGTH_PROBE, twin.frame.__name__],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (
        f"exit status {result.returncode} after: {result.stdout!r} {result.stderr}"
    )
    assert result.stdout.splitlines() == [
        "0xfffffffb 64 65 1065",
        "0xfffffffc 64 65 1065",
        "0xffffffff 64 65 1065",
    ]


def test_oversized_prefix_fed_byte_by_byte(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder(max_payload_size=100)
    data = raw_frame(raw_desc(msg_id=5), bytes(0x1000 - 64)) + GOLDEN_RUST
    got = []
    for i, byte in enumerate(data):
        got += decoder.feed(bytes([byte]))
        if i < 67:  # the prefix and a partial descriptor are held
            assert (decoder.buffered, decoder.skipping) == (i + 1, 0)
            assert not decoder.has_skipped
        elif i < 0x1000 + 4:  # listed once the descriptor is complete, then counted down
            assert (decoder.buffered, decoder.skipping) == (0, 0x1000 + 3 - i)
            assert decoder.has_skipped
    assert [f.payload for f in got] == [b"\x04\x06"]
    assert [(d.msg_id, n) for d, n in decoder.take_skipped()] == [(5, 0x1000 - 64)]
    assert (decoder.buffered, decoder.skipping) == (0, 0)


def test_oversized_after_good_frames_in_one_feed(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder(max_payload_size=100)
    big = raw_frame(raw_desc(msg_id=2, channel_id=9), bytes(101))
    frames = decoder.feed(GOLDEN_RUST + big + GOLDEN_INLINE_ONLY + struct.pack("<I", 165))
    assert [f.desc.msg_id for f in frames] == [7, 7]
    assert (decoder.buffered, decoder.skipping) == (4, 0)
    assert [(d.channel_id, n) for d, n in decoder.take_skipped()] == [(9, 101)]
    assert decoder.feed(raw_desc(msg_id=3)) == []
    assert [(d.msg_id, n) for d, n in decoder.take_skipped()] == [(3, 101)]
    assert decoder.skipping == 101


def test_inline_only_claim_of_200_bytes(twin: Any) -> None:
    data = raw_frame(raw_desc(payload_slot=INLINE_SLOT, payload_len=200))
    with pytest.raises(FrameError) as info:
        twin.frame.FrameDecoder().feed(data)
    assert_names(info.value, 200, 16)


def test_inline_only_claim_of_17_bytes(twin: Any) -> None:
    data = raw_frame(raw_desc(payload_len=17))
    with pytest.raises(FrameError) as info:
        twin.frame.FrameDecoder().feed(data)
    assert_names(info.value, 17, 16)


def test_out_of_line_claim_without_trailing_bytes(twin: Any) -> None:
    data = raw_frame(raw_desc(payload_slot=0, payload_len=300))
    with pytest.raises(FrameError) as info:
        twin.frame.FrameDecoder().feed(data)
    assert_names(info.value, 300)


@pytest.mark.parametrize(("generation", "offset"), [(5, 0), (0, 7), (5, 7)])
def test_inline_only_with_generation_or_offset(twin: Any, generation: int, offset: int) -> None:
    data = raw_frame(raw_desc(payload_len=2, payload_generation=generation, payload_offset=offset))
    with pytest.raises(FrameError) as info:
        twin.frame.FrameDecoder().feed(data)
    assert_names(info.value, *(n for n in (generation, offset) if n))


def test_inline_only_payload_over_a_small_maximum(twin: Any) -> None:
    data = raw_frame(raw_desc(payload_len=10, inline_payload=b"0123456789"))
    with pytest.raises(FrameError) as info:
        twin.frame.FrameDecoder(max_payload_size=4).feed(data)
    assert_names(info.value, 10, 4)


@pytest.mark.parametrize("size", [0, 1, 63])
def test_unpack_short_buffer(twin: Any, size: int) -> None:
    for kind in (bytes, bytearray, memoryview):
        with pytest.raises(FrameError) as info:
            twin.frame.MsgDescHot.unpack(kind(bytes(size)))
        assert_names(info.value, 64, size)


def test_unpack_short_at_offset(twin: Any) -> None:
    with pytest.raises(FrameError) as info:
        twin.frame.MsgDescHot.unpack(bytes(100), 40)
    assert_names(info.value, 64, 60, 40)
    with pytest.raises(FrameError) as info:
        twin.frame.MsgDescHot.unpack(bytes(100), 1000)
    assert_names(info.value, 64, 1000)


@pytest.mark.parametrize("offset", [-1, -64, -(2**70)])
def test_unpack_negative_offset(twin: Any, offset: int) -> None:
    with pytest.raises(ValueError) as info:
        twin.frame.MsgDescHot.unpack(bytes(200), offset)
    assert type(info.value) is ValueError
    assert_names(info.value, abs(offset))


def test_unpack_bad_types(twin: Any) -> None:
    with pytest.raises(TypeError):
        twin.frame.MsgDescHot.unpack("x" * 64)
    with pytest.raises(TypeError):
        twin.frame.MsgDescHot.unpack(bytes(64), 1.0)


def test_decoder_refuses_everything_after_an_error(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder()
    with pytest.raises(FrameError) as first:
        decoder.feed(b"\x05\x00\x00\x00garbage")
    for data in (GOLDEN_RUST, GOLDEN_INLINE_ONLY, b"", b"\x00"):
        with pytest.raises(FrameError) as again:
            decoder.feed(data)
        # The refusal says why: the first error is repeated.
        assert str(first.value) in str(again.value)


def test_no_resync_after_garbage_prefix(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder()
    with pytest.raises(FrameError):
        decoder.feed(b"\x00\x00\x00\x00" + GOLDEN_RUST)
    with pytest.raises(FrameError):
        decoder.feed(GOLDEN_RUST)


# ---------------------------------------------------------------------------------------
# oversized frames: skipped, reported, the stream stays usable


def _oversized_mix(twin: Any) -> tuple[bytes, list[tuple[int, bytes]], list[tuple[bytes, int]]]:
    """Normal frames (max 100) with oversized ones between them, whose descriptors break
    the inline rules (a skipped descriptor is reported as it came, never checked)."""
    big = [
        (raw_desc(msg_id=100, channel_id=3, method_id=9, payload_slot=0, payload_len=101), 101),
        (raw_desc(msg_id=101, payload_len=200, payload_generation=5), 5000),
        (raw_desc(msg_id=102, channel_id=1, payload_slot=0, payload_len=0), 102),
    ]
    normal = [b"", b"ab", bytes(range(16)), bytes(range(17)), bytes(100), b"xyz"]
    parts = []
    for i, payload in enumerate(normal):
        parts.append(twin.frame.encode_frame(twin.frame.build_frame(i + 1, 1, 0, 1, payload)))
        if i % 2:
            desc, n = big[i // 2]
            parts.append(raw_frame(desc, bytes([i]) * n))
    expected = [(i + 1, payload) for i, payload in enumerate(normal)]
    return b"".join(parts), expected, big


def test_oversized_frames_are_skipped_whole(twin: Any) -> None:
    data, expected, big = _oversized_mix(twin)
    decoder = twin.frame.FrameDecoder(max_payload_size=100)
    frames = decoder.feed(data)
    assert [(f.desc.msg_id, f.payload) for f in frames] == expected
    assert (decoder.buffered, decoder.skipping) == (0, 0)
    assert decoder.has_skipped is True
    skipped = decoder.take_skipped()
    assert type(skipped) is list
    assert [(d.pack(), n) for d, n in skipped] == big
    assert all(type(d) is twin.frame.MsgDescHot and type(n) is int for d, n in skipped)
    assert decoder.has_skipped is False
    assert decoder.take_skipped() == []
    # The stream is still usable.
    assert [f.payload for f in decoder.feed(GOLDEN_RUST)] == [b"\x04\x06"]


def test_oversized_frames_are_skipped_byte_by_byte(twin: Any) -> None:
    data, expected, big = _oversized_mix(twin)
    decoder = twin.frame.FrameDecoder(max_payload_size=100)
    got, skipped = [], []
    for i in range(len(data)):
        got += decoder.feed(data[i : i + 1])
        assert decoder.buffered <= 4 + 64 + 100
        assert decoder.skipping == 0 or decoder.buffered == 0
        if decoder.has_skipped:
            # Listed as soon as its descriptor is complete: the whole body is still to come.
            ((desc, n),) = decoder.take_skipped()
            assert decoder.skipping == n
            skipped.append((desc.pack(), n))
    assert [(f.desc.msg_id, f.payload) for f in got] == expected
    assert skipped == big
    assert (decoder.buffered, decoder.skipping) == (0, 0)


@pytest.mark.parametrize("chunk", [3, 67, 68, 69, 1000, 5065])
def test_oversized_frames_are_skipped_in_chunks(twin: Any, chunk: int) -> None:
    data, expected, big = _oversized_mix(twin)
    decoder = twin.frame.FrameDecoder(max_payload_size=100)
    got = []
    for start in range(0, len(data), chunk):
        got += decoder.feed(data[start : start + chunk])
        assert decoder.buffered <= 4 + 64 + 100  # the largest normal frame, never a big one
    assert [(f.desc.msg_id, f.payload) for f in got] == expected
    assert [(d.pack(), n) for d, n in decoder.take_skipped()] == big


@HYPOTHESIS
@given(max_payload_size=st.sampled_from(OVERSIZED_MAXIMA), data=st.data())
def test_oversized_frames_are_skipped_in_random_splits(
    twin: Any, max_payload_size: int, data: st.DataObject
) -> None:
    stream, normal, skipped = data.draw(streams_with_oversized(max_payload_size))
    points = data.draw(split_points(len(stream)))
    decoder = twin.frame.FrameDecoder(max_payload_size=max_payload_size)
    got, listed = [], []
    for piece in chunks(stream, points):
        got += decoder.feed(piece)
        assert decoder.skipping == 0 or decoder.buffered == 0
        if data.draw(st.booleans()):  # take them now or later: the order is kept
            listed += decoder.take_skipped()
            assert not decoder.has_skipped
    listed += decoder.take_skipped()
    assert [(f.desc.msg_id, f.payload) for f in got] == normal
    for frame in got:
        _check_invariants(frame)
    assert [(d.pack(), n) for d, n in listed] == skipped
    assert (decoder.buffered, decoder.skipping) == (0, 0)


def test_skipped_frame_truncated_at_eof_shows_in_skipping(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder(max_payload_size=10)
    assert decoder.feed(raw_frame(raw_desc(msg_id=4), bytes(30))[:-5]) == []
    assert (decoder.buffered, decoder.skipping) == (0, 5)
    assert decoder.feed(bytes(5) + GOLDEN_RUST[:3]) == []
    assert (decoder.buffered, decoder.skipping) == (3, 0)


def test_skipped_descriptor_is_not_validated(twin: Any) -> None:
    """The same descriptor that kills a normal-sized frame is only reported when skipped."""
    bad = raw_desc(msg_id=8, payload_len=200, payload_generation=1, payload_offset=2)
    with pytest.raises(FrameError):
        twin.frame.FrameDecoder(max_payload_size=10).feed(raw_frame(bad))
    decoder = twin.frame.FrameDecoder(max_payload_size=10)
    assert decoder.feed(raw_frame(bad, bytes(11)) + GOLDEN_RUST)[0].desc.msg_id == 7
    ((desc, n),) = decoder.take_skipped()
    assert (desc.pack(), n) == (bad, 11)


def test_short_frame_after_a_skipped_one_is_still_fatal(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder(max_payload_size=10)
    big = raw_frame(raw_desc(msg_id=2), bytes(20))
    with pytest.raises(FrameError) as info:
        decoder.feed(GOLDEN_RUST + big + GOLDEN_INLINE_ONLY + struct.pack("<I", 63))
    assert_names(info.value, 63, 64)
    assert [f.desc.msg_id for f in info.value.frames] == [7, 7]  # type: ignore[attr-defined]
    # What was skipped before the bad bytes is still reported; nothing else is accepted.
    assert [(d.msg_id, n) for d, n in decoder.take_skipped()] == [(2, 20)]
    assert (decoder.buffered, decoder.skipping) == (0, 0)
    with pytest.raises(FrameError):
        decoder.feed(GOLDEN_RUST)


def test_bad_normal_frame_after_a_skipped_one_is_still_fatal(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder(max_payload_size=10)
    assert decoder.feed(raw_frame(raw_desc(msg_id=2), bytes(20))[:50]) == []
    with pytest.raises(FrameError) as info:
        decoder.feed(
            raw_frame(raw_desc(msg_id=2), bytes(20))[50:] + raw_frame(raw_desc(payload_len=17))
        )
    assert_names(info.value, 17, 16)
    assert decoder.take_skipped()[0][1] == 20


def test_skipping_at_the_largest_maximum_never_happens(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder(max_payload_size=2**32 - 1 - 64)
    assert decoder.feed(b"\xff\xff\xff\xff" + raw_desc()) == []
    assert (decoder.buffered, decoder.skipping, decoder.has_skipped) == (68, 0, False)


@pytest.mark.parametrize("cut", [0, 2, 4, 30, 73, 75, 100, 140, 141, 150, 211, 250])
def test_pickling_keeps_the_skipping_state(twin: Any, cut: int) -> None:
    """Cut anywhere (in a normal frame, in a skipped one's descriptor or body, after it
    with the skipped frame not yet taken): the copy goes on exactly as the original."""
    decoder = twin.frame.FrameDecoder(max_payload_size=10)
    stream = raw_frame(raw_desc(msg_id=1), bytes(5)) + raw_frame(raw_desc(msg_id=2), bytes(70))
    stream += GOLDEN_RUST
    head = decoder.feed(stream[:cut])
    for again in (
        pickle.loads(pickle.dumps(decoder)),
        copy.copy(decoder),
        copy.deepcopy(decoder),
    ):
        assert type(again) is type(decoder)
        state = (again.buffered, again.skipping, again.has_skipped, again.max_payload_size)
        assert state == (decoder.buffered, decoder.skipping, decoder.has_skipped, 10)
        frames = head + again.feed(stream[cut:])
        assert [(f.desc.msg_id, f.payload) for f in frames] == [(1, bytes(5)), (7, b"\x04\x06")]
        assert [(d.msg_id, n) for d, n in again.take_skipped()] == [(2, 70)]
        assert (again.buffered, again.skipping) == (0, 0)


def test_pickling_keeps_a_failed_decoder_failed(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder()
    with pytest.raises(FrameError) as first:
        decoder.feed(b"\x05\x00\x00\x00")
    again = pickle.loads(pickle.dumps(decoder))
    with pytest.raises(FrameError) as refused:
        again.feed(GOLDEN_RUST)
    assert str(first.value) in str(refused.value)


@pytest.mark.parametrize(
    ("state", "error"),
    [
        ((b"", None), TypeError),
        ([b"", None, 0, []], TypeError),
        (("x", None, 0, []), TypeError),
        ((b"", 5, 0, []), TypeError),
        ((b"", None, -1, []), ValueError),
        ((b"", None, 2**32, []), ValueError),
        ((b"", None, "1", []), TypeError),
        ((b"ab", None, 3, []), ValueError),
        ((b"", None, 0, ()), TypeError),
    ],
)
def test_setstate_refuses_a_bad_state_clearly(twin: Any, state: object, error: type) -> None:
    decoder = twin.frame.FrameDecoder()
    with pytest.raises(error, match=r"FrameDecoder state|skipping"):
        decoder.__setstate__(state)


def test_setstate_takes_the_other_twin_s_state(both_twins: Any) -> None:
    states = []
    for twin in both_twins:
        decoder = twin.frame.FrameDecoder(max_payload_size=10)
        decoder.feed(raw_frame(raw_desc(msg_id=2), bytes(70))[:100])
        states.append(decoder.__reduce__())
    (c_type, c_args, c_state), (p_type, p_args, p_state) = states
    assert c_args == p_args == (10,)
    assert c_state[:3] == p_state[:3] == (b"", None, 70 - 32)
    swapped = [c_type(*c_args), p_type(*p_args)]
    swapped[0].__setstate__((*p_state[:3], []))
    swapped[1].__setstate__((*c_state[:3], []))
    for decoder in swapped:
        assert decoder.skipping == 38
        assert [f.desc.msg_id for f in decoder.feed(bytes(38) + GOLDEN_RUST)] == [7]


def test_skipping_64_mib_in_64_kib_pieces_holds_one_piece_at_most(twin: Any) -> None:
    size, piece_size = 64 << 20, 64 << 10
    decoder = twin.frame.FrameDecoder()
    piece = bytes(piece_size)
    head = raw_frame(raw_desc(msg_id=3, payload_slot=0), piece[: piece_size - 68], size + 64)
    tail = piece[:68]  # the body's last bytes: 68 + (1024 - 1) * 64 KiB + ... = size + 68
    pieces = size // piece_size
    tracemalloc.start()
    try:
        assert decoder.feed(head) == []
        assert decoder.skipping == size - (piece_size - 68)
        for _ in range(pieces - 1):
            assert decoder.feed(piece) == []
            assert decoder.buffered == 0
        assert decoder.skipping == 68
        frames = decoder.feed(tail + GOLDEN_RUST)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [f.desc.msg_id for f in frames] == [7]
    assert [(d.msg_id, n) for d, n in decoder.take_skipped()] == [(3, size)]
    assert peak < piece_size + 64 * 1024, f"skipping 64 MiB allocated {peak} bytes"


def test_skipping_a_4_gib_prefix_with_a_few_mb_holds_nothing(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder()
    start = b"\xff\xff\xff\xff" + raw_desc(msg_id=12)
    piece = memoryview(bytes(1 << 20))
    tracemalloc.start()
    try:
        decoder.feed(start[:30])
        decoder.feed(start[30:])
        for _ in range(4):
            assert decoder.feed(piece) == []
            assert decoder.buffered == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.skipping == 0xFFFFFFFF - 64 - (4 << 20)
    assert peak < 256 * 1024, f"skipping 4 MiB allocated {peak} bytes"


def test_skipping_does_not_leak(twin: Any) -> None:
    data, _, _ = _oversized_mix(twin)

    def work() -> None:
        decoder = twin.frame.FrameDecoder(max_payload_size=100)
        for start in range(0, len(data), 997):
            decoder.feed(data[start : start + 997])
        assert len(decoder.take_skipped()) == 3

    assert _traced_growth(work, 300) < 64 * 1024


# ---------------------------------------------------------------------------------------
# validate_descriptor


def test_validate_accepts_well_formed(twin: Any) -> None:
    MsgDescHot, validate = twin.frame.MsgDescHot, twin.frame.validate_descriptor
    assert validate(MsgDescHot()) is None
    validate(MsgDescHot(payload_len=16))
    validate(MsgDescHot(payload_slot=0, payload_len=1 << 20))
    # Out of line, a shared-memory slot may carry a generation and offset.
    validate(MsgDescHot(payload_slot=3, payload_generation=9, payload_offset=128, payload_len=17))
    validate(MsgDescHot(payload_slot=0, payload_len=100), max_payload_size=100)
    validate(MsgDescHot(payload_slot=0, payload_len=100), 100)


def test_validate_inline_len_over_16(twin: Any) -> None:
    with pytest.raises(FrameError) as info:
        twin.frame.validate_descriptor(twin.frame.MsgDescHot(payload_len=17))
    assert_names(info.value, 17, 16)


@pytest.mark.parametrize(("generation", "offset"), [(1, 0), (0, 1), (2, 3)])
def test_validate_inline_generation_offset(twin: Any, generation: int, offset: int) -> None:
    desc = twin.frame.MsgDescHot(payload_generation=generation, payload_offset=offset)
    with pytest.raises(FrameError) as info:
        twin.frame.validate_descriptor(desc)
    assert_names(info.value, *(n for n in (generation, offset) if n))


def test_validate_size_limit(twin: Any) -> None:
    desc = twin.frame.MsgDescHot(payload_slot=0, payload_len=(1 << 20) + 1)
    with pytest.raises(FrameError) as info:
        twin.frame.validate_descriptor(desc)
    assert_names(info.value, (1 << 20) + 1, 1 << 20)
    desc = twin.frame.MsgDescHot(payload_slot=0, payload_len=101)
    with pytest.raises(FrameError) as info:
        twin.frame.validate_descriptor(desc, max_payload_size=100)
    assert_names(info.value, 101, 100)
    with pytest.raises(FrameError):
        twin.frame.validate_descriptor(twin.frame.MsgDescHot(payload_len=5), 4)


def test_validate_argument_errors(twin: Any) -> None:
    with pytest.raises(TypeError):
        twin.frame.validate_descriptor(object())
    with pytest.raises(ValueError):
        twin.frame.validate_descriptor(twin.frame.MsgDescHot(), -1)
    with pytest.raises(TypeError):
        twin.frame.validate_descriptor(twin.frame.MsgDescHot(), "1")


def test_frame_error_is_a_value_error() -> None:
    assert issubclass(FrameError, ValueError)


# ---------------------------------------------------------------------------------------
# Hypothesis: properties of one twin


@HYPOTHESIS
@given(st.data())
def test_round_trip_property(twin: Any, data: st.DataObject) -> None:
    fields = data.draw(desc_fields())
    desc = twin.frame.MsgDescHot(**fields)
    assert desc.pack() == raw_desc(**fields)
    assert fields_of(twin.frame.MsgDescHot.unpack(desc.pack())) == {
        **fields,
        "inline_payload": fields["inline_payload"].ljust(16, b"\0"),
    }
    payload = data.draw(payloads)
    frame = twin.frame.Frame.with_payload(desc, payload)
    encoded = twin.frame.encode_frame(frame)
    points = data.draw(split_points(len(encoded)))
    decoder = twin.frame.FrameDecoder()
    out = [f for chunk in chunks(encoded, points) for f in decoder.feed(chunk)]
    assert decoder.buffered == 0
    assert len(out) == 1
    assert out[0] == frame
    assert out[0].payload == payload


def _check_invariants(frame: Any) -> None:
    d, payload = frame.desc, frame.payload
    assert type(payload) is bytes
    assert d.payload_len == len(payload)
    assert d.payload_generation == 0
    assert d.payload_offset == 0
    if len(payload) <= 16:
        assert d.payload_slot == INLINE_SLOT
        assert d.inline_payload == payload + bytes(16 - len(payload))
    else:
        assert d.payload_slot != INLINE_SLOT


@st.composite
def garbage_streams(draw: st.DrawFn) -> bytes:
    """Random bytes, or plausible frames with random descriptors and lengths."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        body = draw(st.binary(min_size=64, max_size=64))
        if draw(st.booleans()):
            # Make the inline rules the interesting part.
            slot = draw(st.sampled_from([INLINE_SLOT, 0, 1]))
            body = body[:16] + slot.to_bytes(4, "little") + body[20:]
        trailing = draw(st.binary(max_size=40))
        frame_len = draw(st.one_of(st.just(64 + len(trailing)), st.integers(0, 200)))
        parts.append(raw_frame(body, trailing, frame_len))
    return b"".join(parts)


@HYPOTHESIS
@given(
    stream=garbage_streams(),
    max_payload_size=st.sampled_from([0, 16, 40, 1 << 20]),
    data=st.data(),
)
def test_garbage_raises_only_frame_error(
    twin: Any, stream: bytes, max_payload_size: int, data: st.DataObject
) -> None:
    decoder = twin.frame.FrameDecoder(max_payload_size=max_payload_size)
    points = data.draw(split_points(len(stream)))
    failed = False
    for chunk in chunks(stream, points):
        try:
            frames = decoder.feed(chunk)
        except FrameError:
            failed = True
            continue
        assert not failed, "a failed decoder accepted input"
        for frame in frames:
            _check_invariants(frame)
            assert frame.desc.payload_len <= max_payload_size
        assert 0 <= decoder.buffered <= len(stream)
    if failed:
        with pytest.raises(FrameError):
            decoder.feed(GOLDEN_RUST)


@HYPOTHESIS
@given(buffer=st.binary(max_size=140), offset=st.integers(-3, 150))
def test_unpack_any_buffer(twin: Any, buffer: bytes, offset: int) -> None:
    try:
        desc = twin.frame.MsgDescHot.unpack(buffer, offset)
    except FrameError:
        assert offset >= 0
        assert len(buffer) - offset < 64
    except ValueError:
        assert offset < 0
    else:
        assert desc.pack() == buffer[offset : offset + 64]


# ---------------------------------------------------------------------------------------
# memory: nothing is kept after frames are dropped (a compiled twin's refcounts)


def _traced_growth(work: Any, rounds: int) -> int:
    work()  # warm up caches and freelists
    tracemalloc.start()
    try:
        gc.collect()  # exceptions and their tracebacks form cycles: not leaks
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(rounds):
            work()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return after - before


def test_round_trips_do_not_leak(twin: Any) -> None:
    payloads = [b"", b"ab", bytes(16), bytes(17), bytes(300)]

    def work() -> None:
        decoder = twin.frame.FrameDecoder()
        for i, payload in enumerate(payloads):
            frame = twin.frame.build_frame(i, 1, 2, 1, payload)
            data = twin.frame.encode_frame(frame)
            (out,) = decoder.feed(data[:10]) + decoder.feed(data[10:])
            assert out.payload == payload
            twin.frame.MsgDescHot.unpack(out.desc.pack()).copy()

    assert _traced_growth(work, 300) < 64 * 1024


def test_errors_do_not_leak(twin: Any) -> None:
    bad = [
        raw_frame(raw_desc(payload_len=200)),
        raw_frame(raw_desc(payload_slot=0, payload_len=3)),
        b"\x01\x00\x00\x00",
        b"\x3f\x00\x00\x00",
    ]

    def work() -> None:
        for data in bad:
            decoder = twin.frame.FrameDecoder()
            with pytest.raises(FrameError):
                decoder.feed(GOLDEN_RUST + data)
            with pytest.raises(FrameError):
                decoder.feed(GOLDEN_RUST)
        with pytest.raises(ValueError):
            twin.frame.MsgDescHot(channel_id=-1)
        with pytest.raises(FrameError):
            twin.frame.MsgDescHot.unpack(bytes(10))

    assert _traced_growth(work, 300) < 64 * 1024


def test_feed_returns_a_list(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder()
    assert type(decoder.feed(b"")) is list
    assert type(decoder.feed(GOLDEN_RUST)) is list


def test_strided_views_are_read_like_compact_ones(twin: Any) -> None:
    stream = GOLDEN_RUST * 3
    doubled = bytes(b for byte in stream for b in (byte, 0))
    strided = memoryview(doubled)[::2]
    assert not strided.c_contiguous
    frames = twin.frame.FrameDecoder().feed(strided)
    assert frames == twin.frame.FrameDecoder().feed(stream)
    assert len(frames) == 3
    assert twin.frame.MsgDescHot.unpack(strided, 4) == twin.frame.MsgDescHot.unpack(stream, 4)


def test_max_payload_size_is_kept_as_a_plain_int(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder(True)
    assert type(decoder.max_payload_size) is int
    assert decoder.max_payload_size == 1
    assert decoder.feed(b"\x42\x00\x00\x00" + raw_desc() + b"xy") == []
    assert [n for _, n in decoder.take_skipped()] == [2]


# ---------------------------------------------------------------------------------------
# Whole messages without a length prefix (the WebSocket Rust framing)


@pytest.mark.parametrize("size", [0, 1, 16, 17, 300])
def test_encode_message_is_encode_frame_without_its_prefix(twin: Any, size: int) -> None:
    data = bytes((i * 7) & 0xFF for i in range(size))
    frame = twin.frame.Frame.with_payload(twin.frame.MsgDescHot(msg_id=42, flags=5), data)
    message = twin.frame.encode_message(frame)
    assert type(message) is bytes
    assert message == twin.frame.encode_frame(frame)[4:]
    assert message[:64] == frame.desc.pack()
    assert message[64:] == data  # the payload follows, inline or not, as Rust writes it


def test_encode_message_refuses_a_non_frame(twin: Any) -> None:
    with pytest.raises(TypeError, match="Frame"):
        twin.frame.encode_message(twin.frame.MsgDescHot())


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
@pytest.mark.parametrize("size", [0, 2, 16, 17, 300])
def test_decode_message_round_trips(twin: Any, kind: type, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert len(data) == size
    frame = twin.frame.Frame.with_payload(twin.frame.MsgDescHot(msg_id=9, channel_id=3), data)
    decoder = twin.frame.FrameDecoder()
    decoded = decoder.decode_message(kind(twin.frame.encode_message(frame)))
    assert decoded == frame
    assert type(decoded.payload) is bytes
    assert not decoder.has_skipped


def test_decode_message_takes_an_inline_payload_from_the_descriptor(twin: Any) -> None:
    decoded = twin.frame.FrameDecoder().decode_message(GOLDEN_INLINE_ONLY[4:])
    assert fields_of(decoded.desc) == golden_frame_fields()
    assert decoded.payload == b"\x04\x06"


def test_decode_message_trailing_bytes_are_authoritative(twin: Any) -> None:
    # The descriptor claims two inline bytes; the message carries five after it.
    decoded = twin.frame.FrameDecoder().decode_message(GOLDEN_INLINE_ONLY[4:] + b"hello")
    assert decoded.payload == b"hello"
    assert decoded.desc.payload_len == 5


@pytest.mark.parametrize("size", [0, 5, 63])
def test_decode_message_shorter_than_a_descriptor(twin: Any, size: int) -> None:
    with pytest.raises(FrameError, match=f"a message of {size} bytes is shorter than the 64-byte"):
        twin.frame.FrameDecoder().decode_message(bytes(size))


def test_decode_message_out_of_line_claim_without_bytes(twin: Any) -> None:
    with pytest.raises(FrameError) as info:
        twin.frame.FrameDecoder().decode_message(raw_desc(payload_slot=0, payload_len=300))
    assert_names(info.value, 300)


def test_decode_message_inline_claim_over_16_bytes(twin: Any) -> None:
    with pytest.raises(FrameError) as info:
        twin.frame.FrameDecoder().decode_message(raw_desc(payload_len=17))
    assert_names(info.value, 17, 16)


def test_decode_message_over_the_limit_is_skipped_and_listed(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder(max_payload_size=16)
    assert decoder.decode_message(raw_desc(msg_id=5, payload_slot=0) + bytes(17)) is None
    assert decoder.decode_message(raw_desc(msg_id=6) + bytes(16)) is not None
    ((desc, size),) = decoder.take_skipped()
    assert (desc.msg_id, size) == (5, 17)
    assert (decoder.buffered, decoder.skipping) == (0, 0)  # nothing held, nothing to discard


def test_decode_message_leaves_the_stream_state_alone(twin: Any) -> None:
    decoder = twin.frame.FrameDecoder()
    assert decoder.feed(GOLDEN_RUST[:30]) == []
    assert decoder.decode_message(GOLDEN_RUST[4:]).payload == b"\x04\x06"
    assert decoder.buffered == 30
    (frame,) = decoder.feed(GOLDEN_RUST[30:])
    assert frame.payload == b"\x04\x06"
    with pytest.raises(FrameError):
        decoder.decode_message(b"short")
    assert decoder.feed(GOLDEN_RUST) != []  # a bad message does not fail the stream


def test_decode_message_reads_a_strided_view_like_a_compact_one(twin: Any) -> None:
    message = GOLDEN_RUST[4:]
    doubled = bytes(b for byte in message for b in (byte, 0))
    strided = memoryview(doubled)[::2]
    decoder = twin.frame.FrameDecoder()
    assert decoder.decode_message(strided) == decoder.decode_message(message)
