"""Differential tests: the compiled twin against the pure reference, same input, same output.

Every test takes ``both_twins`` = (compiled, pure), so ``--no-c-extensions`` deselects them.
Outcomes are compared as plain data: descriptor fields, payload bytes, ``buffered``,
``skipping`` and the skipped frames, and for failures the exception type and message.
"""

from __future__ import annotations

import array
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wire_helpers import (
    GOLDEN_INLINE_ONLY,
    GOLDEN_RUST,
    HYPOTHESIS,
    INLINE_SLOT,
    INT_FIELDS,
    OVERSIZED_MAXIMA,
    U64_MAX,
    chunks,
    desc_fields,
    fields_of,
    frame_view,
    payloads,
    raw_desc,
    raw_frame,
    split_points,
    streams_with_oversized,
)

from rapace.errors import FrameError

Twins = tuple[Any, Any]


def outcome(call: Callable[[], Any], convert: Callable[[Any], Any] = lambda x: x) -> Any:
    """("ok", converted result) or ("error", exception type, message)."""
    try:
        result = call()
    except Exception as exc:
        return ("error", type(exc), str(exc))
    return ("ok", convert(result))


def make_desc(twin: Any, fields: dict[str, Any]) -> Any:
    return twin.frame.MsgDescHot(**fields)


def test_twins_are_different_modules(both_twins: Twins) -> None:
    compiled, pure = both_twins
    assert compiled.frame is not pure.frame
    assert compiled.frame.__name__ == "rapace._frame"
    assert pure.frame.__name__ == "rapace._frame_py"
    # A compiled twin is an extension module, not a copy of the Python source.
    assert not compiled.frame.__file__.endswith(".py")


def test_same_public_names(both_twins: Twins) -> None:
    compiled, pure = both_twins
    for name in pure.frame.__all__:
        assert hasattr(compiled.frame, name), name
    assert compiled.frame.DEFAULT_MAX_PAYLOAD_SIZE == pure.frame.DEFAULT_MAX_PAYLOAD_SIZE


def test_golden_vectors_decode_the_same(both_twins: Twins) -> None:
    results = []
    for twin in both_twins:
        frames = twin.frame.FrameDecoder().feed(GOLDEN_INLINE_ONLY + GOLDEN_RUST)
        results.append([frame_view(f) for f in frames])
    assert results[0] == results[1]
    assert len(results[0]) == 2


def test_same_repr(both_twins: Twins) -> None:
    compiled, pure = both_twins
    fields = {"msg_id": 7, "flags": 0x10005, "inline_payload": b"\x00'\"\\x"}
    assert repr(make_desc(compiled, fields)) == repr(make_desc(pure, fields))
    frames = [t.frame.Frame.with_payload(make_desc(t, fields), b"abc\xff") for t in both_twins]
    assert repr(frames[0]) == repr(frames[1])


def test_same_default_bytes(both_twins: Twins) -> None:
    compiled, pure = both_twins
    assert compiled.frame.MsgDescHot().pack() == pure.frame.MsgDescHot().pack() == raw_desc()


# ---------------------------------------------------------------------------------------
# Hypothesis: valid input


@HYPOTHESIS
@given(fields=desc_fields())
def test_pack_unpack_repr_agree(both_twins: Twins, fields: dict[str, Any]) -> None:
    compiled, pure = both_twins
    c, p = make_desc(compiled, fields), make_desc(pure, fields)
    assert c.pack() == p.pack() == raw_desc(**fields)
    assert fields_of(c) == fields_of(p)
    assert repr(c) == repr(p)
    packed = p.pack()
    assert fields_of(compiled.frame.MsgDescHot.unpack(packed)) == fields_of(p)
    assert fields_of(pure.frame.MsgDescHot.unpack(c.pack())) == fields_of(c)
    assert fields_of(c.copy()) == fields_of(p.copy())


@HYPOTHESIS
@given(fields=desc_fields(), max_payload_size=st.sampled_from([0, 16, 100, 1 << 20]))
def test_validate_agrees(both_twins: Twins, fields: dict[str, Any], max_payload_size: int) -> None:
    results = [
        outcome(lambda t=t: t.frame.validate_descriptor(make_desc(t, fields), max_payload_size))
        for t in both_twins
    ]
    assert results[0] == results[1]


@HYPOTHESIS
@given(fields=desc_fields(), payload=payloads, inline=st.booleans())
def test_frame_constructors_agree(
    both_twins: Twins, fields: dict[str, Any], payload: bytes, inline: bool
) -> None:
    def build(twin: Any) -> Any:
        desc = make_desc(twin, fields)
        if inline:
            return outcome(lambda: twin.frame.Frame.with_inline_payload(desc, payload), frame_view)
        return outcome(lambda: twin.frame.Frame.with_payload(desc, payload), frame_view)

    compiled, pure = both_twins
    assert build(compiled) == build(pure)


@HYPOTHESIS
@given(
    ids=st.tuples(
        st.integers(0, U64_MAX),
        st.integers(0, 0xFFFFFFFF),
        st.integers(0, 0xFFFFFFFF),
        st.integers(0, 0xFFFFFFFF),
    ),
    payload=payloads,
)
def test_build_frame_and_encode_agree(
    both_twins: Twins, ids: tuple[int, int, int, int], payload: bytes
) -> None:
    compiled, pure = both_twins
    c = compiled.frame.build_frame(*ids, payload)
    p = pure.frame.build_frame(*ids, payload)
    assert frame_view(c) == frame_view(p)
    assert compiled.frame.encode_frame(c) == pure.frame.encode_frame(p)


@HYPOTHESIS
@given(
    ids=st.tuples(st.integers(0, U64_MAX), st.integers(0, 0xFFFFFFFF)),
    flags=st.integers(0, 0xFFFFFFFF),
    payload=payloads,
    other_twin=st.booleans(),
)
def test_reply_frame_agrees(
    both_twins: Twins, ids: tuple[int, int], flags: int, payload: bytes, other_twin: bool
) -> None:
    """The same reply from both twins, to a request of either twin's codec."""
    compiled, pure = both_twins
    msg_id, channel_id = ids
    make = (pure if other_twin else compiled).frame.build_frame
    request = make(msg_id, channel_id, 7, 1, b"request")
    c = compiled.frame.reply_frame(request, flags, payload)
    p = pure.frame.reply_frame(request, flags, payload)
    assert frame_view(c) == frame_view(p)
    assert compiled.frame.encode_frame(c) == pure.frame.encode_frame(p)


@st.composite
def frame_lists(draw: st.DrawFn) -> list[tuple[dict[str, Any], bytes, bool]]:
    """Frames to send: fields, payload and whether to use the inline-only convention."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        fields = draw(desc_fields())
        payload = draw(payloads)
        inline_only = len(payload) <= 16 and draw(st.booleans())
        out.append((fields, payload, inline_only))
    return out


def encode_stream(twin: Any, frames: list[tuple[dict[str, Any], bytes, bool]]) -> bytes:
    parts = []
    for fields, payload, inline_only in frames:
        frame = twin.frame.Frame.with_payload(make_desc(twin, fields), payload)
        if inline_only:
            parts.append(struct.pack("<I", 64) + frame.desc.pack())
        else:
            parts.append(twin.frame.encode_frame(frame))
    return b"".join(parts)


def decoder_view(decoder: Any) -> tuple[int, int, bool, list[Any]]:
    """``buffered``, ``skipping``, ``has_skipped`` and the skipped frames taken, as data."""
    has_skipped = decoder.has_skipped
    skipped = [(fields_of(desc), n) for desc, n in decoder.take_skipped()]
    return decoder.buffered, decoder.skipping, has_skipped, skipped


def decode_in_chunks(twin: Any, data: bytes, points: list[int], **kwargs: Any) -> list[Any]:
    """Per chunk: the frames (as data) or the error, then the decoder's state after it
    (``buffered``, ``skipping``, the skipped frames)."""
    decoder = twin.frame.FrameDecoder(**kwargs)
    trace = []
    for chunk in chunks(data, points):
        result = outcome(lambda c=chunk: decoder.feed(c), lambda fs: [frame_view(f) for f in fs])
        trace.append((result, decoder.buffered, decoder_view(decoder)))
    return trace


@HYPOTHESIS
@given(frames=frame_lists(), data=st.data())
def test_compiled_encode_pure_decode_and_reverse(
    both_twins: Twins, frames: list[tuple[dict[str, Any], bytes, bool]], data: st.DataObject
) -> None:
    compiled, pure = both_twins
    stream_c = encode_stream(compiled, frames)
    stream_p = encode_stream(pure, frames)
    assert stream_c == stream_p
    points = data.draw(split_points(len(stream_c)))
    by_pure = decode_in_chunks(pure, stream_c, points)
    by_compiled = decode_in_chunks(compiled, stream_p, points)
    assert by_compiled == by_pure
    assert all(result[0] == "ok" for result, _, _ in by_pure)
    decoded = [view for result, _, _ in by_pure for view in result[1]]
    assert [payload for _, payload in decoded] == [payload for _, payload, _ in frames]
    assert by_pure[-1][1] == 0


@HYPOTHESIS
@given(frames=frame_lists(), data=st.data())
def test_random_splits_give_equal_frames(
    both_twins: Twins, frames: list[tuple[dict[str, Any], bytes, bool]], data: st.DataObject
) -> None:
    compiled, pure = both_twins
    stream = encode_stream(pure, frames)
    c_points = data.draw(split_points(len(stream)))
    p_points = data.draw(split_points(len(stream)))

    def flat(twin: Any, points: list[int]) -> list[Any]:
        decoder = twin.frame.FrameDecoder()
        out = [frame_view(f) for chunk in chunks(stream, points) for f in decoder.feed(chunk)]
        assert decoder.buffered == 0
        return out

    # Different splits, same frames, in both twins.
    assert flat(compiled, c_points) == flat(pure, p_points) == flat(pure, [])


# ---------------------------------------------------------------------------------------
# Hypothesis: bad input gives the same exception in both twins


@st.composite
def bad_streams(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "frames", "prefix"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "prefix":
        return struct.pack("<I", draw(st.integers(0, 0xFFFFFFFF))) + draw(st.binary(max_size=8))
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        fields = draw(desc_fields())
        fields["payload_slot"] = draw(st.sampled_from([INLINE_SLOT, 0, fields["payload_slot"]]))
        fields["payload_len"] = draw(st.sampled_from([0, 2, 16, 17, 200, fields["payload_len"]]))
        body = raw_desc(**fields)
        trailing = draw(st.binary(max_size=40))
        frame_len = draw(st.one_of(st.just(64 + len(trailing)), st.integers(0, 120)))
        parts.append(raw_frame(body, trailing, frame_len))
    return b"".join(parts)


@HYPOTHESIS
@given(
    stream=bad_streams(),
    max_payload_size=st.sampled_from([0, 8, 16, 40, 1 << 20]),
    data=st.data(),
)
def test_bad_streams_same_outcome(
    both_twins: Twins, stream: bytes, max_payload_size: int, data: st.DataObject
) -> None:
    compiled, pure = both_twins
    points = data.draw(split_points(len(stream)))
    # A valid frame afterwards shows that a failed decoder stays failed in both.
    stream_points = [*points, len(stream)]
    full = stream + GOLDEN_RUST
    c = decode_in_chunks(compiled, full, stream_points, max_payload_size=max_payload_size)
    p = decode_in_chunks(pure, full, stream_points, max_payload_size=max_payload_size)
    assert c == p
    for result, _, _ in p:
        if result[0] == "error":
            assert result[1] is FrameError


@HYPOTHESIS
@given(max_payload_size=st.sampled_from(OVERSIZED_MAXIMA), data=st.data())
def test_skipping_same_in_both_twins(
    both_twins: Twins, max_payload_size: int, data: st.DataObject
) -> None:
    """Oversized frames between normal ones, in random splits (different for each twin's
    second run): frames, ``buffered``, ``skipping`` and skipped lists agree after every
    feed, and the normal frames are those of the stream without the oversized ones."""
    compiled, pure = both_twins
    stream, normal, skipped = data.draw(streams_with_oversized(max_payload_size))
    points = data.draw(split_points(len(stream)))
    c = decode_in_chunks(compiled, stream, points, max_payload_size=max_payload_size)
    p = decode_in_chunks(pure, stream, points, max_payload_size=max_payload_size)
    assert c == p
    assert all(result[0] == "ok" for result, _, _ in p)
    frames = [view for result, _, _ in p for view in result[1]]
    assert [(fields["msg_id"], payload) for fields, payload in frames] == normal
    listed = [(n, fields) for _, _, (_, _, _, taken) in p for fields, n in taken]
    assert [n for n, _ in listed] == [n for _, n in skipped]
    assert [fields_of(pure.frame.MsgDescHot.unpack(desc)) for desc, _ in skipped] == [
        fields for _, fields in listed
    ]
    assert p[-1][2][:2] == (0, 0)
    # Without the oversized frames, the same normal frames (in one feed).
    only_normal = b"".join(
        raw_frame(raw_desc(msg_id=m, payload_slot=0, payload_len=len(b)), b) for m, b in normal
    )
    again = pure.frame.FrameDecoder(max_payload_size=max_payload_size).feed(only_normal)
    assert [f.payload for f in again] == [payload for _, payload in frames]


@HYPOTHESIS
@given(max_payload_size=st.sampled_from(OVERSIZED_MAXIMA), data=st.data())
def test_skipping_across_random_splits_matches_one_feed(
    both_twins: Twins, max_payload_size: int, data: st.DataObject
) -> None:
    compiled, pure = both_twins
    stream, _, _ = data.draw(streams_with_oversized(max_payload_size))

    def flat(twin: Any, points: list[int]) -> tuple[list[Any], list[Any]]:
        decoder = twin.frame.FrameDecoder(max_payload_size=max_payload_size)
        frames = [frame_view(f) for c in chunks(stream, points) for f in decoder.feed(c)]
        assert (decoder.buffered, decoder.skipping) == (0, 0)
        return frames, [(fields_of(d), n) for d, n in decoder.take_skipped()]

    c_points = data.draw(split_points(len(stream)))
    p_points = data.draw(split_points(len(stream)))
    assert flat(compiled, c_points) == flat(pure, p_points) == flat(compiled, [])


def test_skipping_byte_by_byte_same_in_both_twins(both_twins: Twins) -> None:
    big = raw_frame(raw_desc(msg_id=9, payload_len=300, payload_offset=4), bytes(120))
    stream = GOLDEN_RUST + big + GOLDEN_INLINE_ONLY + big + big + GOLDEN_RUST
    traces = [
        decode_in_chunks(t, stream, list(range(1, len(stream))), max_payload_size=16)
        for t in both_twins
    ]
    assert traces[0] == traces[1]
    assert sum(len(taken) for _, _, (_, _, _, taken) in traces[1]) == 3
    assert max(skipping for _, _, (_, skipping, _, _) in traces[1]) == 120


def test_pickled_state_same_in_both_twins(both_twins: Twins) -> None:
    big = raw_frame(raw_desc(msg_id=9), bytes(120))
    stream = GOLDEN_RUST + big + GOLDEN_RUST[:10]
    states = []
    for twin in both_twins:
        decoder = twin.frame.FrameDecoder(max_payload_size=16)
        for piece in chunks(stream, [70, 140, 210]):
            decoder.feed(piece)
            held, error, skipping, skipped = decoder.__reduce__()[2]
            states.append((held, error, skipping, [(fields_of(d), n) for d, n in skipped]))
    half = len(states) // 2
    assert states[:half] == states[half:]


@HYPOTHESIS
@given(
    buffer=st.binary(max_size=140),
    offset=st.one_of(st.integers(-70, 150), st.sampled_from([-(2**64), 2**64, 2**70])),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_unpack_same_outcome(both_twins: Twins, buffer: bytes, offset: int, kind: type) -> None:
    results = [
        outcome(lambda t=t: t.frame.MsgDescHot.unpack(kind(buffer), offset), fields_of)
        for t in both_twins
    ]
    assert results[0] == results[1]


field_values = st.one_of(
    st.integers(-(2**66), 2**66),
    st.sampled_from([-1, 2**32 - 1, 2**32, 2**64 - 1, 2**64, True]),
    st.sampled_from([None, "1", 1.0, 1.5, b"\x01", [1], object]),
)


@HYPOTHESIS
@given(name=st.sampled_from(INT_FIELDS), value=field_values)
def test_field_errors_same_outcome(both_twins: Twins, name: str, value: object) -> None:
    def construct(twin: Any) -> Any:
        return outcome(lambda: twin.frame.MsgDescHot(**{name: value}), fields_of)

    def assign(twin: Any) -> Any:
        desc = twin.frame.MsgDescHot()
        result = outcome(lambda: setattr(desc, name, value))
        return result, fields_of(desc)

    compiled, pure = both_twins
    assert construct(compiled) == construct(pure)
    assert assign(compiled) == assign(pure)


@HYPOTHESIS
@given(
    value=st.one_of(
        st.binary(max_size=20),
        st.sampled_from(["abc", None, 5, [1], bytearray(b"xy"), memoryview(b"z" * 17)]),
    )
)
def test_inline_payload_errors_same_outcome(both_twins: Twins, value: object) -> None:
    results = [
        outcome(lambda t=t: t.frame.MsgDescHot(inline_payload=value), fields_of) for t in both_twins
    ]
    assert results[0] == results[1]


@HYPOTHESIS
@given(
    value=st.one_of(
        st.integers(-(2**65), 2**65),
        st.sampled_from([0, 2**32 - 65, 2**32 - 64, None, 1.0, "1"]),
    )
)
def test_decoder_constructor_same_outcome(both_twins: Twins, value: object) -> None:
    results = [
        outcome(lambda t=t: t.frame.FrameDecoder(max_payload_size=value).max_payload_size)
        for t in both_twins
    ]
    assert results[0] == results[1]


API_ERRORS: list[tuple[str, Callable[[Any], Any]]] = [
    ("Frame(object())", lambda m: m.Frame(object(), b"")),
    ("with_payload(str)", lambda m: m.Frame.with_payload(m.MsgDescHot(), "text")),
    ("with_inline_payload(17)", lambda m: m.Frame.with_inline_payload(m.MsgDescHot(), bytes(17))),
    ("with_inline_payload(int)", lambda m: m.Frame.with_inline_payload(m.MsgDescHot(), 5)),
    ("encode_frame(desc)", lambda m: m.encode_frame(m.MsgDescHot())),
    ("encode_frame(None)", lambda m: m.encode_frame(None)),
    ("encode_message(desc)", lambda m: m.encode_message(m.MsgDescHot())),
    ("decode_message(int)", lambda m: m.FrameDecoder().decode_message(5)),
    ("decode_message(short)", lambda m: m.FrameDecoder().decode_message(b"short")),
    ("validate(object)", lambda m: m.validate_descriptor(object())),
    ("validate(max -1)", lambda m: m.validate_descriptor(m.MsgDescHot(), -1)),
    ("validate(max str)", lambda m: m.validate_descriptor(m.MsgDescHot(), "1")),
    ("validate(len 17)", lambda m: m.validate_descriptor(m.MsgDescHot(payload_len=17))),
    ("validate(gen 1)", lambda m: m.validate_descriptor(m.MsgDescHot(payload_generation=1))),
    (
        "validate(2 MiB)",
        lambda m: m.validate_descriptor(m.MsgDescHot(payload_slot=0, payload_len=2**21)),
    ),
    ("unpack(str)", lambda m: m.MsgDescHot.unpack("x" * 64)),
    ("unpack(offset float)", lambda m: m.MsgDescHot.unpack(bytes(64), 1.0)),
    ("unpack(63 bytes)", lambda m: m.MsgDescHot.unpack(bytes(63))),
    ("unpack(offset -1)", lambda m: m.MsgDescHot.unpack(bytes(64), -1)),
    ("feed(str)", lambda m: m.FrameDecoder().feed("text")),
    ("feed(None)", lambda m: m.FrameDecoder().feed(None)),
    ("build_frame(flags 2**32)", lambda m: m.build_frame(1, 2, 3, 2**32)),
    ("build_frame(msg_id -1)", lambda m: m.build_frame(-1, 2, 3, 4)),
    ("build_frame(str payload)", lambda m: m.build_frame(1, 2, 3, 4, "text")),
]


@pytest.mark.parametrize("call", [c for _, c in API_ERRORS], ids=[i for i, _ in API_ERRORS])
def test_api_errors_same_type_and_message(both_twins: Twins, call: Callable[[Any], Any]) -> None:
    compiled, pure = both_twins
    c, p = outcome(lambda: call(compiled.frame)), outcome(lambda: call(pure.frame))
    assert p[0] == "error"
    assert c == p


def test_positional_constructor_refused_by_both(both_twins: Twins) -> None:
    # The interpreter words a bad call signature its own way; only the type must match.
    for twin in both_twins:
        with pytest.raises(TypeError):
            twin.frame.MsgDescHot(1)


@pytest.mark.parametrize(
    "make",
    [
        lambda data: array.array("B", data),
        lambda data: memoryview(array.array("B", data)),
        lambda data: memoryview(data)[::2],  # not contiguous
        lambda data: array.array("H", data[: len(data) // 2 * 2]),
    ],
    ids=["array B", "memoryview of array", "strided memoryview", "array H"],
)
def test_other_buffers_same_outcome(both_twins: Twins, make: Callable[[bytes], Any]) -> None:
    data = GOLDEN_RUST + GOLDEN_INLINE_ONLY
    feed = [
        outcome(
            lambda t=t: t.frame.FrameDecoder().feed(make(data)),
            lambda fs: [frame_view(f) for f in fs],
        )
        for t in both_twins
    ]
    assert feed[0] == feed[1]
    desc = raw_desc(msg_id=3) * 2
    unpack = [
        outcome(lambda t=t: t.frame.MsgDescHot.unpack(make(desc)), fields_of) for t in both_twins
    ]
    assert unpack[0] == unpack[1]


def test_decoder_error_then_refusal_same_message(both_twins: Twins) -> None:
    traces = []
    for twin in both_twins:
        decoder = twin.frame.FrameDecoder()
        traces.append(
            [
                outcome(lambda d=decoder, x=x: d.feed(x), len)
                for x in (GOLDEN_RUST, b"\x05\0\0\0", GOLDEN_RUST, b"")
            ]
        )
    assert traces[0] == traces[1]
    assert traces[1][0] == ("ok", 1)
    assert all(r[0] == "error" for r in traces[1][1:])


def message_outcome(twin: Any, message: Any, max_payload_size: int) -> Any:
    """A message decoded: the frame or None, and the frames the decoder listed as skipped."""
    decoder = twin.frame.FrameDecoder(max_payload_size=max_payload_size)

    def decoded(frame: Any) -> Any:
        return None if frame is None else frame_view(frame)

    result = outcome(lambda: decoder.decode_message(message), decoded)
    return result, [(fields_of(desc), n) for desc, n in decoder.take_skipped()]


def strided(data: bytes) -> memoryview:
    """``data`` as a non-contiguous view (every other byte of a doubled copy)."""
    return memoryview(bytes(b for byte in data for b in (byte, 0)))[::2]


MESSAGE_KINDS: list[Callable[[bytes], Any]] = [bytes, bytearray, memoryview, strided]


@HYPOTHESIS
@given(
    message=st.one_of(
        st.binary(max_size=100),
        st.builds(lambda fields, tail: raw_desc(**fields) + tail, desc_fields(), payloads),
    ),
    kind=st.sampled_from(MESSAGE_KINDS),
    max_payload_size=st.sampled_from([0, 8, 16, 40, 1 << 20, 0xFFFFFFFF - 64]),
)
def test_decode_message_same_outcome(
    both_twins: Twins, message: bytes, kind: Callable[[bytes], Any], max_payload_size: int
) -> None:
    compiled, pure = both_twins
    c = message_outcome(compiled, kind(message), max_payload_size)
    p = message_outcome(pure, kind(message), max_payload_size)
    assert c == p
    assert p == message_outcome(pure, message, max_payload_size)  # whatever the buffer type
    if p[0][0] == "error":
        assert p[0][1] is FrameError
    # A message decodes as the same frame would from a stream, skipped or not.
    if len(message) >= 64:
        stream = pure.frame.FrameDecoder(max_payload_size=max_payload_size)
        from_stream = outcome(
            lambda: stream.feed(struct.pack("<I", len(message)) + message),
            lambda frames: [frame_view(f) for f in frames],
        )
        skipped = [(fields_of(desc), n) for desc, n in stream.take_skipped()]
        if p[0][0] == "ok":
            assert from_stream == ("ok", [] if p[0][1] is None else [p[0][1]])
            assert skipped == p[1]
        else:
            assert from_stream[:2] == p[0][:2]  # the same kind of error


@HYPOTHESIS
@given(fields=desc_fields(), payload=payloads)
def test_encode_message_same_bytes(
    both_twins: Twins, fields: dict[str, Any], payload: bytes
) -> None:
    compiled, pure = both_twins
    c = compiled.frame.encode_message(compiled.frame.Frame(make_desc(compiled, fields), payload))
    p = pure.frame.encode_message(pure.frame.Frame(make_desc(pure, fields), payload))
    assert c == p


@pytest.mark.parametrize("encode", ["encode_frame", "encode_message"])
def test_encoding_a_bare_frame_names_the_same_missing_field(both_twins: Twins, encode: str) -> None:
    """A ``Frame.__new__`` with nothing set: both twins raise ``AttributeError`` for its
    payload first (CPython 3.13 words a missing slot with the type's module, so the whole
    messages are not compared)."""
    for twin in both_twins:
        bare = twin.frame.Frame.__new__(twin.frame.Frame)
        with pytest.raises(AttributeError, match="has no attribute '_payload'"):
            getattr(twin.frame, encode)(bare)
