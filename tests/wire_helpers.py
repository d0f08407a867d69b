"""Test helpers shared by the wire-core tests: raw byte builders written independently of
the codec under test (plain ``struct``), the docs/protocol.md §4 golden vector, Hypothesis
settings and strategies.
"""

from __future__ import annotations

import re
import struct
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF
INLINE_SLOT = 0xFFFFFFFF
NO_DEADLINE = U64_MAX

# (name, offset, size) exactly as the docs/protocol.md §1 table.
LAYOUT: tuple[tuple[str, int, int], ...] = (
    ("msg_id", 0, 8),
    ("channel_id", 8, 4),
    ("method_id", 12, 4),
    ("payload_slot", 16, 4),
    ("payload_generation", 20, 4),
    ("payload_offset", 24, 4),
    ("payload_len", 28, 4),
    ("flags", 32, 4),
    ("credit_grant", 36, 4),
    ("deadline_ns", 40, 8),
    ("inline_payload", 48, 16),
)
FIELDS = tuple(name for name, _, _ in LAYOUT)
INT_FIELDS = FIELDS[:-1]
U64_FIELDS = ("msg_id", "deadline_ns")
U32_FIELDS = tuple(f for f in INT_FIELDS if f not in U64_FIELDS)

DEFAULTS: dict[str, Any] = {
    "msg_id": 0,
    "channel_id": 0,
    "method_id": 0,
    "payload_slot": INLINE_SLOT,
    "payload_generation": 0,
    "payload_offset": 0,
    "payload_len": 0,
    "flags": 0,
    "credit_grant": 0,
    "deadline_ns": NO_DEADLINE,
    "inline_payload": bytes(16),
}


def field_max(name: str) -> int:
    return U64_MAX if name in U64_FIELDS else U32_MAX


def raw_desc(**fields: Any) -> bytes:
    """64 descriptor bytes built field by field with ``struct``, not with the codec."""
    values = {**DEFAULTS, **fields}
    out = bytearray(64)
    for name, offset, size in LAYOUT:
        value = values[name]
        if name == "inline_payload":
            out[offset : offset + size] = bytes(value).ljust(16, b"\0")
        else:
            out[offset : offset + size] = value.to_bytes(size, "little")
    return bytes(out)


def raw_frame(desc: bytes, trailing: bytes = b"", frame_len: int | None = None) -> bytes:
    """``[frame_len u32 LE][desc][trailing]``; ``frame_len`` defaults to the honest one."""
    if frame_len is None:
        frame_len = len(desc) + len(trailing)
    return struct.pack("<I", frame_len) + desc + trailing


def fields_of(desc: Any) -> dict[str, Any]:
    return {name: getattr(desc, name) for name in FIELDS}


def frame_view(frame: Any) -> tuple[dict[str, Any], bytes]:
    """A frame as plain data, comparable across twins."""
    return fields_of(frame.desc), frame.payload


def assert_names(message: object, *numbers: int) -> None:
    """The error message mentions every one of ``numbers`` (as a whole number)."""
    text = str(message)
    for number in numbers:
        assert re.search(rf"(?<![0-9]){number}(?![0-9])", text), (
            f"message {text!r} does not mention {number}"
        )


# docs/protocol.md §4 example: msg_id 7, channel 3, method 0x193fa158, flags DATA, payload
# 04 06, inline-only convention (frame_len == 64).
GOLDEN_INLINE_ONLY = bytes.fromhex(
    "40000000 0700000000000000 03000000 58a13f19 ffffffff 00000000 00000000"
    " 02000000 01000000 00000000 ffffffffffffffff 0406000000000000 0000000000000000"
)
# The same request as the Rust sender writes it: the payload also after the descriptor.
GOLDEN_RUST = bytes.fromhex("42000000") + GOLDEN_INLINE_ONLY[4:] + bytes.fromhex("0406")

# Deterministic and modest: the whole suite stays fast.
HYPOTHESIS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)

u32s = st.integers(0, U32_MAX)
u64s = st.integers(0, U64_MAX)


@st.composite
def desc_fields(draw: st.DrawFn) -> dict[str, Any]:
    """Any valid field values, biased toward the interesting edges."""
    out: dict[str, Any] = {}
    for name in INT_FIELDS:
        top = field_max(name)
        out[name] = draw(st.one_of(st.sampled_from([0, 1, 16, 17, top]), st.integers(0, top)))
    out["inline_payload"] = draw(st.binary(max_size=16))
    return out


payloads = st.one_of(st.binary(max_size=40), st.binary(min_size=15, max_size=18))


def split_points(data_len: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, data_len), max_size=12).map(sorted)


def chunks(data: bytes, points: list[int]) -> list[bytes]:
    out, start = [], 0
    for point in [*points, len(data)]:
        out.append(data[start:point])
        start = point
    return out


# A stream of normal frames with oversized ones between them, for the skipping tests.
OVERSIZED_MAXIMA = (0, 16, 40, 100)


@st.composite
def streams_with_oversized(
    draw: st.DrawFn, max_payload_size: int
) -> tuple[bytes, list[tuple[int, bytes]], list[tuple[bytes, int]]]:
    """(stream, the normal frames' (msg_id, payload), the oversized frames' (descriptor
    bytes, payload length)), in order. An oversized frame's descriptor is any 64 bytes (a
    skipped descriptor is never checked) and its body random bytes (never parsed)."""
    rng = draw(st.randoms(use_true_random=False))
    parts, normal, skipped = [], [], []
    for i in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            n = max_payload_size + draw(st.one_of(st.just(1), st.integers(1, 300)))
            desc = draw(st.binary(min_size=64, max_size=64))
            parts.append(raw_frame(desc, rng.randbytes(n)))
            skipped.append((desc, n))
            continue
        payload = draw(st.binary(max_size=min(max_payload_size, 40)))
        inline = len(payload) <= 16
        desc = raw_desc(
            msg_id=i + 1,
            channel_id=2 * i + 1,
            payload_slot=INLINE_SLOT if inline else 0,
            payload_len=len(payload),
            inline_payload=payload if inline else b"",
        )
        # Small payloads: the Rust convention (bytes also after the descriptor) or the
        # inline-only one of other clients.
        trailing = b"" if inline and draw(st.booleans()) else payload
        parts.append(raw_frame(desc, trailing))
        normal.append((i + 1, payload))
    return b"".join(parts), normal, skipped
