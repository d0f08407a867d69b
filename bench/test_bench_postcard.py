"""Postcard codec benchmarks: the compiled twin, the pure twin and msgspec, side by side.

    pytest bench/test_bench_postcard.py --benchmark-group-by=group \\
        --benchmark-columns=median,ops,rounds

The value is a dataclass of ten mixed fields (integers of four widths, a str, a bool, an
f64, a list of 16 u32 and an optional nested struct). ``msgspec.msgpack`` encodes and
decodes the same dataclass in the same group: the reference to beat (its bytes are
msgpack, a map keyed by field name, not postcard). Each group also has a batch of 64
such values (``list[Record]``), and two more groups time a recursive type (a tree of
364 nodes, six levels deep, and a chain 128 structs deep: the pure twin's explicit stack
past its first few levels) and the refusal of a hostile 193-byte ``list[list[None]]``
(64 counts of a full zero-size budget each).

Every benchmark checks its result: encodings against bytes built here by hand (no twin
involved), decodings against the value. A compiled twin that does not import is an
error, never a skip.
"""

from __future__ import annotations

import importlib
import struct
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from rapace import _impl, postcard
from rapace.types import i32, i64, u8, u32, u64

TWINS = {"cython": "rapace._postcard", "python": "rapace._postcard_py"}
CODECS = [*TWINS, "msgspec"]
BATCH = 64


@dataclass
class Nested:
    id: u32
    label: str


@dataclass
class Record:
    id: u64
    seq: u32
    delta: i32
    kind: u8
    offset: i64
    name: str
    active: bool
    score: float
    samples: list[u32]
    parent: Nested | None


def make_record(i: int) -> Record:
    return Record(
        id=0x0123456789AB + i,
        seq=70_000 + i,
        delta=-1234 - i,
        kind=7,
        offset=-(2**40) + i,
        name=f"sensor-{i:04d}/north",
        active=i % 2 == 0,
        score=3.25 * i,
        samples=[(i * 7919 + k * 104729) % 2**32 for k in range(16)],
        parent=Nested(i, "rack-12") if i % 4 else None,
    )


RECORD = make_record(1)
RECORDS = [make_record(i) for i in range(BATCH)]


@dataclass
class Tree:
    id: u32
    kids: list[Tree]


def make_tree(depth: int, fanout: int) -> Tree:
    return Tree(depth, [make_tree(depth - 1, fanout) for _ in range(fanout)] if depth else [])


TREE = make_tree(5, 3)
CHAIN = make_tree(127, 1)


# --------------------------------------------------------------------------- reference bytes


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def zigzag(n: int) -> int:
    return n * 2 if n >= 0 else -n * 2 - 1


def text(s: str) -> bytes:
    data = s.encode()
    return varint(len(data)) + data


def reference(r: Record) -> bytes:
    """The postcard bytes of ``r``, written out field by field (WIRE.md section 9)."""
    out = varint(r.id) + varint(r.seq) + varint(zigzag(r.delta)) + bytes([r.kind])
    out += varint(zigzag(r.offset)) + text(r.name) + bytes([r.active])
    out += struct.pack("<d", r.score) + varint(len(r.samples))
    out += b"".join(varint(s) for s in r.samples)
    if r.parent is None:
        return out + b"\x00"
    return out + b"\x01" + varint(r.parent.id) + text(r.parent.label)


def tree_reference(t: Tree) -> bytes:
    return varint(t.id) + varint(len(t.kids)) + b"".join(tree_reference(k) for k in t.kids)


RECORD_BYTES = reference(RECORD)
RECORDS_BYTES = varint(BATCH) + b"".join(reference(r) for r in RECORDS)
TREE_BYTES = tree_reference(TREE)
CHAIN_BYTES = tree_reference(CHAIN)
HOSTILE_BYTES = varint(64) + varint(1 << 20) * 64


# --------------------------------------------------------------------------- fixtures


class Msgspec:
    """msgspec.msgpack with the same ``dumps``/``loads`` shape as a postcard codec."""

    def __init__(self, tp: Any) -> None:
        self.dumps = msgspec.msgpack.Encoder().encode
        self.loads = msgspec.msgpack.Decoder(tp).decode


@pytest.fixture(params=CODECS)
def which(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def codec_for(which: str, tp: Any) -> Any:
    if which == "msgspec":
        return Msgspec(tp)
    importlib.import_module(TWINS[which])  # ImportError fails
    with _impl.using(which):  # type: ignore[arg-type]
        return postcard.codec_for(tp)


def expected_bytes(which: str, value: Any, postcard_bytes: bytes) -> bytes:
    return msgspec.msgpack.encode(value) if which == "msgspec" else postcard_bytes


# --------------------------------------------------------------------------- benchmarks


@pytest.mark.benchmark(group="postcard encode: Record (10 fields)")
def test_encode_record(benchmark: Any, which: str) -> None:
    codec = codec_for(which, Record)
    data = benchmark(codec.dumps, RECORD)
    assert data == expected_bytes(which, RECORD, RECORD_BYTES)


@pytest.mark.benchmark(group="postcard decode: Record (10 fields)")
def test_decode_record(benchmark: Any, which: str) -> None:
    codec = codec_for(which, Record)
    data = expected_bytes(which, RECORD, RECORD_BYTES)
    assert benchmark(codec.loads, data) == RECORD


@pytest.mark.benchmark(group=f"postcard encode: list of {BATCH} Records")
def test_encode_batch(benchmark: Any, which: str) -> None:
    codec = codec_for(which, list[Record])
    data = benchmark(codec.dumps, RECORDS)
    assert data == expected_bytes(which, RECORDS, RECORDS_BYTES)


@pytest.mark.benchmark(group=f"postcard decode: list of {BATCH} Records")
def test_decode_batch(benchmark: Any, which: str) -> None:
    codec = codec_for(which, list[Record])
    data = expected_bytes(which, RECORDS, RECORDS_BYTES)
    assert benchmark(codec.loads, data) == RECORDS


TREES = {"tree": (TREE, TREE_BYTES), "chain128": (CHAIN, CHAIN_BYTES)}


@pytest.mark.parametrize("shape", TREES)
@pytest.mark.benchmark(group="postcard encode: recursive Tree")
def test_encode_tree(benchmark: Any, which: str, shape: str) -> None:
    value, postcard_bytes = TREES[shape]
    codec = codec_for(which, Tree)
    data = benchmark(codec.dumps, value)
    assert data == expected_bytes(which, value, postcard_bytes)


@pytest.mark.parametrize("shape", TREES)
@pytest.mark.benchmark(group="postcard decode: recursive Tree")
def test_decode_tree(benchmark: Any, which: str, shape: str) -> None:
    value, postcard_bytes = TREES[shape]
    codec = codec_for(which, Tree)
    data = expected_bytes(which, value, postcard_bytes)
    assert codec.dumps(benchmark(codec.loads, data)) == codec.dumps(value)


@pytest.mark.parametrize("impl", TWINS)
@pytest.mark.benchmark(group="postcard decode: hostile list[list[None]] (refused)")
def test_refuse_zero_size_amplification(benchmark: Any, impl: str) -> None:
    codec = codec_for(impl, list[list[None]])

    def refuse() -> str:
        try:
            codec.loads(HOSTILE_BYTES)
        except postcard.PostcardError as exc:
            return exc.reason
        return "accepted"

    assert "MAX_ZERO_SIZE_ITEMS_PER_MESSAGE" in benchmark(refuse)
