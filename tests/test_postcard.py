"""``rapace.postcard`` (docs/protocol.md §9), run against each twin.

``pc`` is the twin module under test (``rapace._postcard`` or ``rapace._postcard_py``);
codecs are built from it with ``codec_for(tp)``. Expected bytes are written out
by hand (the docs/protocol.md §9 vectors, and what serde/postcard produces for the same Rust types),
never produced by the codec itself. ``both_twins`` tests compare the compiled twin with
the pure reference: same bytes, same values, same exception type and message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, NewType, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapace import _impl, postcard
from rapace.postcard import PostcardError
from rapace.types import (
    DataEnum,
    f32,
    i8,
    i16,
    i32,
    i64,
    u8,
    u16,
    u32,
    u64,
)

Twins = tuple[Any, Any]

HYPOTHESIS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture
def pc(twin: Any) -> ModuleType:
    module: ModuleType = twin.postcard
    return module


def modules(both_twins: Twins) -> tuple[ModuleType, ModuleType]:
    compiled, pure = both_twins
    return compiled.postcard, pure.postcard


def on(module: ModuleType, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` with its codecs built on ``module``'s twin (the one twin seam)."""
    with _impl.using("cython" if module.__name__ == "rapace._postcard" else "python"):
        return function(*args)


# --------------------------------------------------------------------------- test types


@dataclass
class Point:
    x: i32
    y: i32


@dataclass
class Inner:
    id: u64
    tag: str | None


@dataclass
class Mixed:
    a: u8
    b: i16
    c: u32
    d: i64
    name: str
    flag: bool
    ratio: float
    values: list[u32]
    inner: Inner | None
    blob: bytes


@dataclass(frozen=True)
class Frozen:
    key: str
    n: i8


@dataclass(slots=True)
class Slotted:
    a: u16
    b: f32


@dataclass
class Validated:
    n: u32

    def __post_init__(self) -> None:
        if self.n == 13:
            raise ValueError("unlucky")


@dataclass
class Derived:
    a: u8
    b: u8 = field(init=False, default=0)


@dataclass
class Unit:
    pass


class Color(enum.Enum):
    RED = "r"
    GREEN = "g"
    BLUE = "b"


class Level(enum.IntEnum):
    LOW = 10
    HIGH = 20


class Shape(DataEnum):
    pass


@dataclass
class Circle(Shape):
    radius: float


@dataclass
class Rect(Shape):
    w: u32
    h: u32


@dataclass
class Empty(Shape):
    pass


@dataclass
class Group(Shape):
    items: list[Shape]


@dataclass
class Tree:
    value: i32
    children: list[Tree]


@dataclass
class Chain:
    value: u8
    next: Chain | None


@dataclass
class Knot:
    """Recursion through a list, a map, a tuple and an option: five nodes a level."""

    kids: list[dict[u8, tuple[Knot | None, u8]]]


@dataclass
class Heavy:
    """Eight nodes a level: deep values of it exhausted the pure twin's Python stack."""

    kids: list[tuple[list[dict[u8, tuple[list[Heavy | None]]]]]]


@dataclass
class Drawing:
    title: str
    shapes: list[Shape]
    colors: dict[str, Color]
    level: Level
    origin: tuple[i32, i32]


UserId = NewType("UserId", u64)


def codec(pc: ModuleType, tp: Any) -> Any:
    return postcard.codec_for(tp)


def enc(pc: ModuleType, value: Any, tp: Any) -> str:
    return postcard.dumps(value, tp).hex(" ")


def dec(pc: ModuleType, hexdata: str, tp: Any) -> Any:
    return postcard.loads(bytes.fromhex(hexdata), tp)


# --------------------------------------------------------------------------- vectors

WIRE_VECTORS: list[tuple[Any, Any, str]] = [
    (300, u32, "ac 02"),
    (-300, i32, "d7 04"),
    (-(2**63), i64, "ff ff ff ff ff ff ff ff ff 01"),
    (1.5, f32, "00 00 c0 3f"),
    ("héllo", str, "06 68 c3 a9 6c 6c 6f"),
    ((2, 3), tuple[i32, i32], "04 06"),
]

# What serde + postcard 1.x produce for the matching Rust types.
MORE_VECTORS: list[tuple[Any, Any, str]] = [
    (False, bool, "00"),
    (True, bool, "01"),
    (0, u8, "00"),
    (255, u8, "ff"),
    (-1, i8, "ff"),
    (-128, i8, "80"),
    (127, i8, "7f"),
    (127, u16, "7f"),
    (128, u16, "80 01"),
    (65535, u16, "ff ff 03"),
    (-1, i16, "01"),
    (1, i16, "02"),
    (-32768, i16, "ff ff 03"),
    (2**32 - 1, u32, "ff ff ff ff 0f"),
    (-(2**31), i32, "ff ff ff ff 0f"),
    (2**64 - 1, u64, "ff ff ff ff ff ff ff ff ff 01"),
    (2**63 - 1, i64, "fe ff ff ff ff ff ff ff ff 01"),
    (-1, int, "01"),
    (1.5, float, "00 00 00 00 00 00 f8 3f"),
    (-0.0, f32, "00 00 00 80"),
    (math.inf, f32, "00 00 80 7f"),
    ("", str, "00"),
    (b"\x00\xff", bytes, "02 00 ff"),
    (None, type(None), ""),
    (None, None, ""),
    (None, u8 | None, "00"),
    (7, Optional[u8], "01 07"),  # noqa: UP045 (the spelling under test)
    ([], list[u32], "00"),
    ([1, 300], list[u32], "02 01 ac 02"),
    ((1, 2, 3), tuple[u8, ...], "03 01 02 03"),
    ((), tuple[()], ""),
    ({"a": 1}, dict[str, u8], "01 01 61 01"),
    (Point(2, 3), Point, "04 06"),
    (Inner(1, None), Inner, "01 00"),
    (Inner(2, "x"), Inner, "02 01 01 78"),
    (Unit(), Unit, ""),
    (Color.RED, Color, "00"),
    (Color.BLUE, Color, "02"),
    (Level.HIGH, Level, "01"),
    (Circle(1.5), Shape, "00 00 00 00 00 00 00 f8 3f"),
    (Rect(1, 300), Shape, "01 01 ac 02"),
    (Empty(), Shape, "02"),
    (Group([Empty(), Rect(1, 2)]), Shape, "03 02 02 01 01 02"),
    (Rect(1, 2), Rect, "01 02"),
    (Chain(1, Chain(2, None)), Chain, "01 01 02 00"),
    (Tree(1, [Tree(-1, [])]), Tree, "02 01 01 00"),
    (5, UserId, "05"),
    (9, Annotated[u16, "doc"], "09"),
    (Frozen("k", -2), Frozen, "01 6b fe"),
    (Slotted(1, 0.5), Slotted, "01 00 00 00 3f"),
]


@pytest.mark.parametrize(("value", "tp", "hexdata"), WIRE_VECTORS + MORE_VECTORS)
def test_vectors(pc: ModuleType, value: Any, tp: Any, hexdata: str) -> None:
    assert enc(pc, value, tp) == hexdata
    decoded = dec(pc, hexdata, tp)
    assert decoded == value
    assert type(decoded) is type(value) or isinstance(value, tuple)


def test_wire_vectors_by_name(pc: ModuleType) -> None:
    """The six vectors of docs/protocol.md §9, spelled out."""
    assert postcard.dumps(300, u32) == b"\xac\x02"
    assert postcard.dumps(-300, i32) == b"\xd7\x04"
    assert postcard.dumps(-(2**63), i64) == b"\xff" * 9 + b"\x01"
    assert postcard.dumps(1.5, f32) == b"\x00\x00\xc0\x3f"
    assert postcard.dumps("héllo", str) == b"\x06h\xc3\xa9llo"
    assert postcard.dumps((2, 3), tuple[i32, i32]) == b"\x04\x06"


def test_decoded_types(pc: ModuleType) -> None:
    assert type(dec(pc, "03 01 02 03", tuple[u8, ...])) is tuple
    assert type(dec(pc, "01 02", list[u8])) is list
    assert type(dec(pc, "02 61 62", bytes)) is bytes
    assert dec(pc, "01", bool) is True
    assert dec(pc, "00", Color) is Color.RED
    assert dec(pc, "01", Level) is Level.HIGH
    assert type(dec(pc, "01", i8)) is int
    assert type(dec(pc, "00 00 c0 3f", f32)) is float


def test_long_values_grow_the_buffer(pc: ModuleType) -> None:
    text = "ü" * 5000
    data = postcard.dumps(text, str)
    assert data[:2] == bytes([0x90, 0x4E])  # 10000 as a varint
    assert postcard.loads(data, str) == text
    values = list(range(0, 2**32, 2**20))
    assert postcard.loads(postcard.dumps(values, list[u32]), list[u32]) == values


def test_bytes_like_inputs(pc: ModuleType) -> None:
    c = codec(pc, bytes)
    for value in (b"ab", bytearray(b"ab"), memoryview(b"xaby")[1:3]):
        assert c.dumps(value) == b"\x02ab"
    data = bytes.fromhex("02 61 62")
    for buf in (data, bytearray(data), memoryview(b"\x00" + data)[1:]):
        assert c.loads(buf) == b"ab"
    with pytest.raises(TypeError, match="bytes-like"):
        c.loads("0261")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes-like"):
        c.loads(3)  # type: ignore[arg-type]


def test_int_subclasses_and_floats(pc: ModuleType) -> None:
    assert enc(pc, Level.HIGH, u8) == "14"
    assert enc(pc, 2, float) == "00 00 00 00 00 00 00 40"
    assert dec(pc, "00 00 00 00 00 00 00 40", float) == 2.0
    assert enc(pc, 0.1, f32) == "cd cc cc 3d"  # rounded to the nearest f32
    nan = postcard.dumps(math.nan, float)
    assert math.isnan(postcard.loads(nan, float))


def test_frozen_slotted_and_post_init(pc: ModuleType) -> None:
    assert dec(pc, "01 6b fe", Frozen) == Frozen("k", -2)
    assert dec(pc, "02 00 00 80 3f", Slotted) == Slotted(2, 1.0)
    assert dec(pc, "05", Validated) == Validated(5)
    derived = dec(pc, "01 07", Derived)
    assert (derived.a, derived.b) == (1, 7)


def test_codec_object(pc: ModuleType) -> None:
    c = postcard.codec_for(list[Point])
    assert c is postcard.codec_for(list[Point])
    assert c.name == "list[Point]"
    assert c.loads(c.dumps([Point(1, 2)])) == [Point(1, 2)]
    assert "list[Point]" in repr(c)


def test_type_names(pc: ModuleType) -> None:
    names = {
        u8: "u8",
        i64: "i64",
        int: "i64",
        float: "f64",
        f32: "f32",
        dict[str, list[u16 | None]]: "dict[str, list[u16 | None]]",
        tuple[u8, ...]: "tuple[u8, ...]",
        tuple[u8, str]: "tuple[u8, str]",
        tuple[()]: "tuple[()]",
        Shape: "Shape",
        None: "None",
    }
    for tp, name in names.items():
        assert codec(pc, tp).name == name


# --------------------------------------------------------------------------- errors


def encode_error(pc: ModuleType, value: Any, tp: Any) -> PostcardError:
    with pytest.raises(PostcardError) as info:
        postcard.dumps(value, tp)
    assert isinstance(info.value, ValueError)
    assert not info.value.decoding
    return info.value


def decode_error(pc: ModuleType, hexdata: str, tp: Any) -> PostcardError:
    with pytest.raises(PostcardError) as info:
        postcard.loads(bytes.fromhex(hexdata), tp)
    assert info.value.decoding
    return info.value


ENCODE_ERRORS: list[tuple[Any, Any, str, str]] = [
    # value, type, type named in the error, words of the reason
    (256, u8, "u8", "256 is out of range [0, 255]"),
    (-1, u8, "u8", "-1 is out of range [0, 255]"),
    (128, i8, "i8", "128 is out of range [-128, 127]"),
    (-129, i8, "i8", "out of range"),
    (65536, u16, "u16", "65536 is out of range [0, 65535]"),
    (-32769, i16, "i16", "out of range"),
    (2**32, u32, "u32", "4294967296 is out of range [0, 4294967295]"),
    (-1, u32, "u32", "out of range"),
    (2**31, i32, "i32", "2147483648 is out of range [-2147483648, 2147483647]"),
    (-(2**31) - 1, i32, "i32", "out of range"),
    (2**64, u64, "u64", "out of range"),
    (-1, u64, "u64", "out of range"),
    (2**63, i64, "i64", "out of range"),
    (2**63, int, "i64", "out of range"),
    (-(2**63) - 1, int, "i64", "out of range"),
    (2**1000, u8, "u8", "a 1001-bit integer is out of range"),
    (2**1000, u64, "u64", "a 1001-bit integer is out of range"),
    (True, u8, "u8", "expected int, got bool"),
    (False, int, "i64", "expected int, got bool"),
    (1.0, u32, "u32", "expected int, got float"),
    ("1", i16, "i16", "expected int, got str"),
    (None, u64, "u64", "expected int, got NoneType"),
    (1, bool, "bool", "expected bool, got int"),
    (None, bool, "bool", "expected bool, got NoneType"),
    ("1.5", float, "f64", "expected float, got str"),
    (True, float, "f64", "expected float, got bool"),
    (10**400, float, "f64", "out of range for f64"),
    (1e39, f32, "f32", "1e+39 is out of range for f32"),
    (-1e300, f32, "f32", "out of range for f32"),
    (b"x", str, "str", "expected str, got bytes"),
    ("\ud800", str, "str", "not encodable as UTF-8: surrogates not allowed"),
    ("x", bytes, "bytes", "expected bytes, got str"),
    (1, type(None), "None", "expected None, got int"),
    ({1}, list[u8], "list[u8]", "expected list or tuple, got set"),
    ("ab", list[str], "list[str]", "expected list or tuple, got str"),
    ([1], dict[u8, u8], "dict[u8, u8]", "expected dict, got list"),
    ((1,), tuple[u8, u8], "tuple[u8, u8]", "expected 2 items, got 1"),
    ((1, 2, 3), tuple[u8, u8], "tuple[u8, u8]", "expected 2 items, got 3"),
    (1, tuple[u8, u8], "tuple[u8, u8]", "expected tuple, got int"),
    ((1, 2), tuple[()], "tuple[()]", "expected 0 items, got 2"),
    ((2, 3), Point, "Point", "expected Point, got tuple"),
    (Inner(1, None), Point, "Point", "expected Point, got Inner"),
    ("r", Color, "Color", "expected a Color member, got str"),
    (10, Level, "Level", "expected a Level member, got int"),
    (Point(1, 2), Shape, "Shape", "expected a Shape variant, got Point"),
    (Shape(), Shape, "Shape", "expected a Shape variant, got Shape"),
]


@pytest.mark.parametrize(("value", "tp", "type_name", "reason"), ENCODE_ERRORS)
def test_encode_errors(pc: ModuleType, value: Any, tp: Any, type_name: str, reason: str) -> None:
    err = encode_error(pc, value, tp)
    assert err.type_name == type_name
    assert err.offset == 0
    assert reason in err.reason
    message = str(err)
    assert message.startswith(f"cannot encode {type_name} at offset 0: ")
    assert reason in message


def test_encode_error_paths_and_offsets(pc: ModuleType) -> None:
    err = encode_error(pc, Mixed(1, 2, 3, 4, "n", True, 0.5, [1, 2**32], None, b""), Mixed)
    assert err.type_name == "u32"
    assert err.path == "Mixed.values[1]"
    # a(1) b(1) c(1) d(1) name(2) flag(1) ratio(8) count(1) values[0](1)
    assert err.offset == 17
    assert str(err) == (
        "cannot encode u32 (at Mixed.values[1]) at offset 17: "
        "4294967296 is out of range [0, 4294967295]"
    )
    err = encode_error(pc, Drawing("t", [Group([Rect(1, -5)])], {}, Level.LOW, (0, 0)), Drawing)
    assert err.path == "Drawing.shapes[0]::Group.items[0]::Rect.h"
    assert err.type_name == "u32"
    err = encode_error(pc, [(1, "a"), (2, 3)], list[tuple[u8, str]])
    assert err.path == "list[tuple[u8, str]][1][1]"
    assert "expected str, got int" in str(err)
    err = encode_error(pc, Inner(1, 5), Inner)  # type: ignore[arg-type]
    assert (err.path, err.type_name) == ("Inner.tag", "str")


def test_encode_refuses_values_nested_too_deep(pc: ModuleType) -> None:
    chain = None
    for _ in range(postcard.MAX_DEPTH):
        chain = Chain(1, chain)
    data = postcard.dumps(chain, Chain)
    assert postcard.loads(data, Chain) == chain
    err = encode_error(pc, Chain(1, chain), Chain)
    assert f"nested deeper than {postcard.MAX_DEPTH} structs" in str(err)
    err = decode_error(pc, ("01 01 " * (postcard.MAX_DEPTH + 1)) + "01 00", Chain)
    assert f"nested deeper than {postcard.MAX_DEPTH} structs" in str(err)
    assert err.offset == 2 * postcard.MAX_DEPTH


DECODE_ERRORS: list[tuple[str, Any, str, int, str]] = [
    # hex input, type, type named, offset, words of the reason
    ("", bool, "bool", 0, "truncated: needs 1 bytes, 0 left"),
    ("02", bool, "bool", 0, "invalid bool byte 0x02"),
    ("ff", bool, "bool", 0, "invalid bool byte 0xff"),
    ("", u8, "u8", 0, "truncated"),
    ("", i8, "i8", 0, "truncated"),
    ("", u32, "u32", 0, "truncated varint"),
    ("80", u16, "u16", 0, "truncated varint"),
    ("ff ff", u32, "u32", 0, "truncated varint"),
    ("80 80 80", u16, "u16", 0, "varint longer than 3 bytes"),
    ("ff ff 04", u16, "u16", 0, "varint overflows u16"),
    ("ff ff 03", u16, "u16", None, ""),  # 65535: fine
    ("80 80 80 80 80", u32, "u32", 0, "varint longer than 5 bytes"),
    ("ff ff ff ff 10", u32, "u32", 0, "varint overflows u32"),
    ("ff ff ff ff 10", i32, "i32", 0, "varint overflows i32"),
    ("ff ff ff ff ff ff ff ff ff 02", u64, "u64", 0, "varint overflows u64"),
    ("ff ff ff ff ff ff ff ff ff 81", i64, "i64", 0, "varint longer than 10 bytes"),
    ("80 80 80 80 80 80 80 80 80 80 00", u64, "u64", 0, "varint longer than 10 bytes"),
    ("00 00 c0", f32, "f32", 0, "truncated: needs 4 bytes, 3 left"),
    ("00 00 00 00 00 00 f8", float, "f64", 0, "truncated: needs 8 bytes, 7 left"),
    ("05 61 62", str, "str", 0, "truncated: needs 5 bytes of UTF-8, 2 left"),
    ("02 c3 28", str, "str", 0, "invalid UTF-8 (invalid continuation byte) at byte 0"),
    ("03 61 ed a0 80", str, "str", 0, "invalid UTF-8"),  # an encoded surrogate
    ("01 ff", str, "str", 0, "invalid UTF-8 (invalid start byte) at byte 0"),
    ("03 61 62", bytes, "bytes", 0, "truncated: needs 3 bytes, 2 left"),
    ("ff ff ff ff ff ff ff ff ff 02", bytes, "bytes", 0, "varint overflows u64"),
    ("02", u8 | None, "u8 | None", 0, "invalid Option tag 0x02"),
    ("01", u8 | None, "u8", 1, "truncated"),
    ("", u8 | None, "u8 | None", 0, "truncated"),
    ("03 01 02", list[u8], "list[u8]", 0, "truncated: 3 items of at least 1 bytes, 2 left"),
    ("02 00 00 00 00", list[f32], "list[f32]", 0, "2 items of at least 4 bytes, 4 left"),
    ("ff ff ff ff ff ff ff ff ff 01", list[u8], "list[u8]", 0, "truncated"),
    ("ff ff ff ff 0f", list[None], "list[None]", 0, "exceed the limit of 1048576 per message"),
    ("02 01 61", dict[u8, str], "dict[u8, str]", 0, "truncated: 2 items of at least 2 bytes"),
    ("03", Color, "Color", 0, "unknown variant index 3 (3 variants)"),
    ("ff ff ff ff 0f", Color, "Color", 0, "unknown variant index 4294967295"),
    ("ff ff ff ff 1f", Color, "Color", 0, "varint overflows u32"),
    ("04", Shape, "Shape", 0, "unknown variant index 4 (4 variants)"),
    ("03 01 09", Shape, "Shape", 2, "unknown variant index 9 (4 variants)"),
    ("01 01", Shape, "u32", 2, "truncated varint"),
    ("00 00", u8, "u8", 1, "1 trailing bytes after the value"),
    ("01 02 03", tuple[u8], "tuple[u8]", 1, "2 trailing bytes after the value"),
    ("04 06 00", Point, "Point", 2, "1 trailing bytes after the value"),
    ("", Point, "i32", 0, "truncated varint"),
    ("04", Point, "i32", 1, "truncated varint"),
    ("0d", Validated, "Validated", 0, "__post_init__ refused the value: unlucky"),
]


@pytest.mark.parametrize(("hexdata", "tp", "type_name", "offset", "reason"), DECODE_ERRORS)
def test_decode_errors(  # noqa: PLR0917
    pc: ModuleType, hexdata: str, tp: Any, type_name: str, offset: int | None, reason: str
) -> None:
    if offset is None:
        postcard.loads(bytes.fromhex(hexdata), tp)
        return
    err = decode_error(pc, hexdata, tp)
    assert (err.type_name, err.offset) == (type_name, offset)
    assert reason in err.reason
    assert f"cannot decode {type_name}" in str(err)
    assert f"at offset {offset}: " in str(err)


def test_decode_error_paths(pc: ModuleType) -> None:
    err = decode_error(pc, "01 02 03 04 01 6e 01 00 00 00 00 00 00 00 00 02 05 80", Mixed)
    assert (err.type_name, err.path, err.offset) == ("u32", "Mixed.values[1]", 17)
    assert str(err) == "cannot decode u32 (at Mixed.values[1]) at offset 17: truncated varint"
    err = decode_error(pc, "01 74 01 03 02 02 01 02", Drawing)
    assert err.path == "Drawing.shapes[0]::Group.items[1]::Rect.h"
    err = decode_error(pc, "02 00 01 02 c3", list[str | None])
    assert err.path == "list[str | None][1]"
    assert err.type_name == "str"
    assert err.offset == 3
    err = decode_error(pc, "0d", Validated)
    assert err.offset == 0 and err.path == ""
    assert isinstance(decode_error(pc, "0d", Validated).__cause__, ValueError)


def test_error_pickles(pc: ModuleType) -> None:
    err = decode_error(pc, "01 74 01 03 02 02 01 02", Drawing)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is PostcardError
    assert str(copy) == str(err)
    assert (copy.type_name, copy.offset, copy.path, copy.reason) == (
        err.type_name,
        err.offset,
        err.path,
        err.reason,
    )


# --------------------------------------------------------------------------- unsupported types


class Plain:
    x: int


class Perm(enum.Flag):
    R = 1
    W = 2


class Nothing(enum.Enum):
    pass


class NoVariants(DataEnum):
    pass


@dataclass
class HasSet:
    ok: u8
    bad: set[int]


@dataclass
class HasInitVar:
    a: u8
    b: dataclasses.InitVar[int]

    def __post_init__(self, b: int) -> None:
        pass


@dataclass
class Unresolved:
    a: NotDefinedAnywhere  # type: ignore[name-defined]  # noqa: F821


@pytest.mark.parametrize(
    ("tp", "words"),
    [
        (set[int], "unsupported type set[int]"),
        (frozenset[int], "unsupported"),
        (object, "unsupported type object"),
        (Any, "unsupported"),
        (Plain, "unsupported type"),
        (list, "list needs its item types"),
        (dict, "dict needs"),
        (int | str, "the only union postcard encodes is T | None"),
        (u8 | str | None, "the only union"),
        (Annotated[str, u8.__metadata__[0]], "u8 annotates int, not str"),  # type: ignore[attr-defined]
        (Annotated[int, f32.__metadata__[0]], "f32 annotates float, not int"),  # type: ignore[attr-defined]
        (dict[list[u8], u8], "cannot be a dict key"),
        (dict[Point, u8], "cannot be a dict key"),
        (Perm, "enum.Flag is a bit set"),
        (Nothing, "an enum without members"),
        (NoVariants, "a DataEnum without variants"),
        (HasSet, "HasSet.bad: unsupported type set[int]"),
        (list[HasSet], "HasSet.bad"),
        (HasInitVar, "InitVar"),
        (Unresolved, "cannot resolve the annotations of Unresolved"),
        ("Point", "forward reference"),
        (tuple[int, ..., int], "only as tuple[T, ...]"),
    ],
)
def test_unsupported_types_fail_at_codec_construction(pc: ModuleType, tp: Any, words: str) -> None:
    with pytest.raises(TypeError) as info:
        postcard.codec_for(tp)
    assert "rapace.postcard cannot encode" in str(info.value)
    assert words in str(info.value)


def test_hashable_keys_are_fine(pc: ModuleType) -> None:
    tp = dict[tuple[Frozen, u8], Color]
    value = {(Frozen("a", 1), 2): Color.GREEN}
    assert postcard.loads(postcard.dumps(value, tp), tp) == value


def test_data_enum_declaration_rules() -> None:
    with pytest.raises(TypeError, match="cannot be subclassed"):

        class SubCircle(Circle):
            pass

    class Late(DataEnum):
        pass

    @dataclass
    class First(Late):
        a: u8

    postcard.codec_for(Late)
    with pytest.raises(TypeError, match="fixed once a codec uses it"):

        @dataclass
        class Second(Late):
            pass

    class Open(DataEnum):
        pass

    @dataclass(slots=True)
    class OnlyVariant(Open):  # slots=True recreates the class: still one variant
        a: u8

    assert Open.__rapace_variants__ == [OnlyVariant]
    assert postcard.dumps(OnlyVariant(3), Open) == b"\x00\x03"


class Pending(DataEnum):
    pass


@dataclass
class Good(Pending):
    a: u8


@dataclass
class Holder:
    p: Pending
    bad: set[int]


def test_failed_compilation_leaves_no_sealed_enum() -> None:
    with pytest.raises(TypeError):
        postcard.codec_for(Holder)
    assert not Pending.__rapace_sealed__


# --------------------------------------------------------------------------- Hypothesis


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo, hi)


FLOATS = st.floats(allow_nan=False)
F32S = st.floats(allow_nan=False, width=32)

SCALARS: list[tuple[Any, st.SearchStrategy[Any]]] = [
    (bool, st.booleans()),
    (u8, ints(0, 2**8 - 1)),
    (u16, ints(0, 2**16 - 1)),
    (u32, ints(0, 2**32 - 1)),
    (u64, ints(0, 2**64 - 1)),
    (i8, ints(-(2**7), 2**7 - 1)),
    (i16, ints(-(2**15), 2**15 - 1)),
    (i32, ints(-(2**31), 2**31 - 1)),
    (i64, ints(-(2**63), 2**63 - 1)),
    (int, ints(-(2**63), 2**63 - 1)),
    (f32, F32S),
    (float, FLOATS),
    (str, st.text()),
    (bytes, st.binary()),
    (type(None), st.none()),
    (Color, st.sampled_from(Color)),
    (Level, st.sampled_from(Level)),
]
SCALAR_TYPES = dict(SCALARS)


def inners() -> st.SearchStrategy[Inner]:
    return st.builds(Inner, ints(0, 2**64 - 1), st.none() | st.text())


def mixed() -> st.SearchStrategy[Mixed]:
    return st.builds(
        Mixed,
        SCALAR_TYPES[u8],
        SCALAR_TYPES[i16],
        SCALAR_TYPES[u32],
        SCALAR_TYPES[i64],
        st.text(),
        st.booleans(),
        FLOATS,
        st.lists(SCALAR_TYPES[u32], max_size=20),
        st.none() | inners(),
        st.binary(),
    )


def shapes() -> st.SearchStrategy[Shape]:
    leaves = st.one_of(
        st.builds(Circle, FLOATS),
        st.builds(Rect, SCALAR_TYPES[u32], SCALAR_TYPES[u32]),
        st.builds(Empty),
    )
    return st.recursive(
        leaves, lambda children: st.builds(Group, st.lists(children, max_size=4)), max_leaves=12
    )


def trees() -> st.SearchStrategy[Tree]:
    return st.recursive(
        st.builds(Tree, SCALAR_TYPES[i32], st.just([])),
        lambda children: st.builds(Tree, SCALAR_TYPES[i32], st.lists(children, max_size=3)),
        max_leaves=20,
    )


def drawings() -> st.SearchStrategy[Drawing]:
    return st.builds(
        Drawing,
        st.text(),
        st.lists(shapes(), max_size=4),
        st.dictionaries(st.text(), st.sampled_from(Color), max_size=4),
        st.sampled_from(Level),
        st.tuples(SCALAR_TYPES[i32], SCALAR_TYPES[i32]),
    )


COMPOSITES: list[tuple[Any, st.SearchStrategy[Any]]] = [
    (list[u32], st.lists(SCALAR_TYPES[u32])),
    (list[str], st.lists(st.text())),
    (list[list[i8]], st.lists(st.lists(SCALAR_TYPES[i8]))),
    (tuple[u8, str, float], st.tuples(SCALAR_TYPES[u8], st.text(), FLOATS)),
    (tuple[i64, ...], st.lists(SCALAR_TYPES[i64]).map(tuple)),
    (dict[str, i32], st.dictionaries(st.text(), SCALAR_TYPES[i32])),
    (dict[u64, list[bytes]], st.dictionaries(SCALAR_TYPES[u64], st.lists(st.binary()))),
    (u16 | None, st.none() | SCALAR_TYPES[u16]),
    (list[f32 | None], st.lists(st.none() | F32S)),
    (Point, st.builds(Point, SCALAR_TYPES[i32], SCALAR_TYPES[i32])),
    (Inner, inners()),
    (Mixed, mixed()),
    (list[Mixed], st.lists(mixed(), max_size=5)),
    (Frozen, st.builds(Frozen, st.text(), SCALAR_TYPES[i8])),
    (Slotted, st.builds(Slotted, SCALAR_TYPES[u16], F32S)),
    (Shape, shapes()),
    (Tree, trees()),
    (Drawing, drawings()),
    (dict[Color, Shape | None], st.dictionaries(st.sampled_from(Color), st.none() | shapes())),
]
ALL_TYPES = SCALARS + COMPOSITES


@pytest.mark.parametrize(("tp", "strategy"), ALL_TYPES, ids=lambda x: str(x)[:40])
def test_round_trip(pc: ModuleType, tp: Any, strategy: st.SearchStrategy[Any]) -> None:
    c = codec(pc, tp)

    @HYPOTHESIS
    @given(strategy)
    def check(value: Any) -> None:
        data = c.dumps(value)
        assert c.loads(data) == value
        assert c.dumps(c.loads(data)) == data

    check()


@pytest.mark.parametrize(("tp", "strategy"), ALL_TYPES, ids=lambda x: str(x)[:40])
def test_truncations_are_errors(pc: ModuleType, tp: Any, strategy: st.SearchStrategy[Any]) -> None:
    """Every proper prefix of an encoding fails to decode, with a PostcardError only."""
    c = codec(pc, tp)

    @settings(HYPOTHESIS, max_examples=30)
    @given(strategy)
    def check(value: Any) -> None:
        data = c.dumps(value)
        for n in range(len(data)):
            with pytest.raises(PostcardError):
                c.loads(data[:n])
        with pytest.raises(PostcardError, match="trailing bytes"):
            c.loads(data + b"\x00")

    check()


GARBAGE_TYPES = [u8, u16, i64, f32, str, bytes, list[u32], Mixed, Shape, Tree, Drawing, Chain]


@pytest.mark.parametrize("tp", GARBAGE_TYPES, ids=str)
def test_garbage_raises_only_postcard_errors(pc: ModuleType, tp: Any) -> None:
    c = codec(pc, tp)

    @HYPOTHESIS
    @given(st.binary(max_size=64))
    def check(data: bytes) -> None:
        with contextlib.suppress(PostcardError):
            c.loads(data)

    check()


# --------------------------------------------------------------------------- hostile input

ZERO_SIZE_BUDGET = postcard.MAX_ZERO_SIZE_ITEMS_PER_MESSAGE
ONE_MIB = 1 << 20


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Each shape: a type and a few hundred bytes of counts whose items take no input bytes,
# 64 sequences of a full budget each (together 64 times the per-message budget).
FULL = varint(ZERO_SIZE_BUDGET)
AMPLIFIERS: list[tuple[Any, bytes, str]] = [
    (list[list[None]], varint(64) + FULL * 64, "list[None]"),
    (list[list[tuple[()]]], varint(64) + FULL * 64, "list[tuple[()]]"),
    (list[tuple[tuple[()], ...]], varint(64) + FULL * 64, "tuple[tuple[()], ...]"),
    (list[list[Unit]], varint(64) + FULL * 64, "list[Unit]"),
    (
        dict[u8, list[None]],
        varint(64) + b"".join(bytes([i]) + FULL for i in range(64)),
        "list[None]",
    ),
    (list[list[None] | None], varint(64) + (b"\x01" + FULL) * 64, "list[None]"),
    (list[list[dict[None, None]]], varint(64) + (b"\x01" + FULL) * 64, "dict[None, None]"),
    (list[list[list[None]]], varint(8) + (varint(8) + FULL * 8) * 8, "list[None]"),
]


@pytest.mark.parametrize(("tp", "data", "type_name"), AMPLIFIERS, ids=lambda x: str(x)[:30])
def test_nested_zero_size_items_share_one_budget(
    pc: ModuleType, tp: Any, data: bytes, type_name: str
) -> None:
    assert len(data) < 600
    with pytest.raises(PostcardError) as info:
        postcard.loads(data, tp)
    err = info.value
    assert err.type_name == type_name
    assert err.reason == (
        f"{ZERO_SIZE_BUDGET} zero-size items, after {ZERO_SIZE_BUDGET} earlier in this "
        f"message, exceed the limit of {ZERO_SIZE_BUDGET} per message "
        "(MAX_ZERO_SIZE_ITEMS_PER_MESSAGE)"
    )


def test_zero_size_budget_just_under_and_just_over(pc: ModuleType) -> None:
    half = ZERO_SIZE_BUDGET // 2
    under = varint(2) + varint(half) + varint(ZERO_SIZE_BUDGET - half)
    assert [len(x) for x in postcard.loads(under, list[list[None]])] == [
        half,
        ZERO_SIZE_BUDGET - half,
    ]
    over = varint(2) + varint(half) + varint(ZERO_SIZE_BUDGET - half + 1)
    err = decode_error(pc, over.hex(), list[list[None]])
    assert (err.type_name, err.path, err.offset) == ("list[None]", "list[list[None]][1]", 4)
    assert f"after {half} earlier in this message" in err.reason
    # A message starts with a full budget again.
    assert len(postcard.loads(varint(ZERO_SIZE_BUDGET), list[None])) == ZERO_SIZE_BUDGET
    err = decode_error(pc, varint(ZERO_SIZE_BUDGET + 1).hex(), list[None])
    assert "after 0 earlier in this message" in err.reason


def test_items_that_take_bytes_are_not_charged(pc: ModuleType) -> None:
    # A full-budget list[None] next to a 1 MiB list[u8] and a 1 MiB bytes: only the Nones
    # count against the budget, the rest is bounded by the input length.
    tp = tuple[list[None], list[u8], bytes]
    data = varint(ZERO_SIZE_BUDGET) + varint(ONE_MIB) + bytes(ONE_MIB)
    data += varint(ONE_MIB) + b"\xab" * ONE_MIB
    nones, small, blob = postcard.loads(data, tp)
    assert (len(nones), len(small), blob) == (ZERO_SIZE_BUDGET, ONE_MIB, b"\xab" * ONE_MIB)


def test_one_mib_payloads_decode(pc: ModuleType) -> None:
    values = bytes(range(256)) * (ONE_MIB // 256)
    assert postcard.loads(varint(ONE_MIB) + values, list[u8]) == list(values)
    assert postcard.loads(varint(ONE_MIB) + values, bytes) == values
    nested = varint(ONE_MIB // 2) + b"\x01\x07" * (ONE_MIB // 2)
    assert postcard.loads(nested, list[list[u8]]) == [[7]] * (ONE_MIB // 2)


def test_twins_same_outcome_for_zero_size_budget(both_twins: Twins) -> None:
    half = ZERO_SIZE_BUDGET // 2
    for extra in (0, 1, 1000):
        data = varint(3) + varint(half) + b"\x00" + varint(ZERO_SIZE_BUDGET - half + extra)
        results = [
            outcome(lambda m=m, data=data: len(on(m, postcard.loads, data, list[list[None]])))
            for m in modules(both_twins)
        ]
        assert results[0] == results[1]
        assert results[0][0] == ("ok" if extra == 0 else "error")


# Each recursive shape: (type, the bytes of `n` nested structs, one more level around a value).
DEEP_SHAPES: list[tuple[Any, Callable[[int], bytes], Callable[[Any], Any]]] = [
    (Chain, lambda n: bytes.fromhex("01 01" * (n - 1) + "01 00"), lambda v: Chain(1, v)),
    (
        Knot,
        lambda n: bytes.fromhex("01 01 00 01" * (n - 1) + "00" + " 00" * (n - 1)),
        lambda v: Knot([{0: (v, 0)}]),
    ),
    (
        Heavy,
        lambda n: bytes.fromhex("01 01 01 00 01 01" * (n - 1) + "00"),
        lambda v: Heavy([([{0: ([v],)}],)]),
    ),
    (Shape, lambda n: bytes.fromhex("03 01" * (n - 1) + "02"), lambda v: Group([v])),
]
DEEP_IDS = ["Chain", "Knot", "Heavy", "Shape"]
TOO_DEEP = f"nested deeper than {postcard.MAX_DEPTH} structs"


def frames_deep() -> int:
    frame, n = sys._getframe(1), 0
    while frame is not None:
        frame, n = frame.f_back, n + 1
    return n


def call_at_depth(frames: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` called from ``frames`` more Python frames down the stack."""
    if frames <= 0:
        return fn()
    return call_at_depth(frames - 1, fn)


def check_depth_limit(pc: ModuleType, tp: Any, nested: Callable[[int], bytes], wrap: Any) -> None:
    c = codec(pc, tp)
    data = nested(postcard.MAX_DEPTH)
    value = c.loads(data)
    assert c.dumps(value) == data
    with pytest.raises(PostcardError) as info:
        c.loads(nested(postcard.MAX_DEPTH + 1))
    assert info.value.reason == TOO_DEEP and info.value.decoding
    with pytest.raises(PostcardError) as info:
        c.dumps(wrap(value))
    assert info.value.reason == TOO_DEEP and not info.value.decoding


@pytest.mark.parametrize(("tp", "nested", "wrap"), DEEP_SHAPES, ids=DEEP_IDS)
def test_depth_limit_holds_for_every_shape(pc: ModuleType, tp: Any, nested: Any, wrap: Any) -> None:
    check_depth_limit(pc, tp, nested, wrap)


@pytest.mark.parametrize(("tp", "nested", "wrap"), DEEP_SHAPES, ids=DEEP_IDS)
def test_depth_limit_holds_deep_in_the_callers_stack(
    pc: ModuleType, tp: Any, nested: Any, wrap: Any
) -> None:
    call_at_depth(200, lambda: check_depth_limit(pc, tp, nested, wrap))


@pytest.mark.parametrize(("tp", "nested", "wrap"), DEEP_SHAPES, ids=DEEP_IDS)
def test_depth_limit_needs_few_python_frames(
    pc: ModuleType, tp: Any, nested: Any, wrap: Any
) -> None:
    # MAX_DEPTH structs, both ways, within 120 Python frames of the caller (the pure twin
    # recurses through a few struct levels, then keeps an explicit stack).
    c = codec(pc, tp)
    data = nested(postcard.MAX_DEPTH)
    value = c.loads(data)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(frames_deep() + 120)
    try:
        decoded = c.loads(data)
        assert c.dumps(value) == data
        with pytest.raises(PostcardError, match=TOO_DEEP):
            c.loads(nested(postcard.MAX_DEPTH + 1))
        with pytest.raises(PostcardError, match=TOO_DEEP):
            c.dumps(wrap(value))
    finally:
        sys.setrecursionlimit(limit)
    assert c.dumps(decoded) == data  # (== on the values would recurse in dataclass __eq__)


def test_tall_types_without_recursion(pc: ModuleType) -> None:
    # 40 nested lists: taller than the pure twin recurses through, no struct involved.
    tp: Any = u8
    for _ in range(40):
        tp = list[tp]
    data = bytes.fromhex("01" * 40 + "07")
    value = postcard.loads(data, tp)
    assert postcard.dumps(value, tp) == data
    err = decode_error(pc, "01" * 39 + "02 07", tp)
    assert (err.type_name, err.offset) == ("list[u8]", 39)
    assert err.path == codec(pc, tp).name + "[0]" * 39


# --------------------------------------------------------------------------- differential


def outcome(call: Callable[[], Any]) -> Any:
    try:
        result = call()
    except Exception as exc:
        return ("error", type(exc), str(exc))
    return ("ok", result)


def test_twins_are_different_modules(both_twins: Twins) -> None:
    compiled, pure = modules(both_twins)
    assert compiled.__name__ == "rapace._postcard"
    assert pure.__name__ == "rapace._postcard_py"
    assert not compiled.__file__.endswith(".py")
    assert set(compiled.__all__) == set(pure.__all__)
    for name in pure.__all__:
        assert hasattr(compiled, name), name
    assert compiled.MAX_DEPTH == pure.MAX_DEPTH
    assert compiled.MAX_ZERO_SIZE_ITEMS_PER_MESSAGE == pure.MAX_ZERO_SIZE_ITEMS_PER_MESSAGE
    assert postcard.MAX_ZERO_SIZE_ITEMS_PER_MESSAGE == pure.MAX_ZERO_SIZE_ITEMS_PER_MESSAGE


@pytest.mark.parametrize(("tp", "strategy"), ALL_TYPES, ids=lambda x: str(x)[:40])
def test_twins_same_bytes_and_values(
    both_twins: Twins, tp: Any, strategy: st.SearchStrategy[Any]
) -> None:
    compiled, pure = (codec(m, tp) for m in modules(both_twins))

    @HYPOTHESIS
    @given(strategy)
    def check(value: Any) -> None:
        data = pure.dumps(value)
        assert compiled.dumps(value) == data
        assert compiled.loads(data) == pure.loads(data) == value

    check()


@pytest.mark.parametrize("tp", GARBAGE_TYPES, ids=str)
def test_twins_same_outcome_for_garbage(both_twins: Twins, tp: Any) -> None:
    compiled, pure = (codec(m, tp) for m in modules(both_twins))

    @HYPOTHESIS
    @given(st.binary(max_size=80))
    def check(data: bytes) -> None:
        assert outcome(lambda: compiled.loads(data)) == outcome(lambda: pure.loads(data))

    check()


@pytest.mark.parametrize(
    ("tp", "strategy"),
    [(Mixed, mixed()), (Drawing, drawings()), (list[Shape], st.lists(shapes(), max_size=3))],
    ids=str,
)
def test_twins_same_outcome_for_corrupted_encodings(
    both_twins: Twins, tp: Any, strategy: st.SearchStrategy[Any]
) -> None:
    compiled, pure = (codec(m, tp) for m in modules(both_twins))

    @HYPOTHESIS
    @given(strategy, st.data())
    def check(value: Any, data: st.DataObject) -> None:
        raw = bytearray(pure.dumps(value))
        for _ in range(data.draw(st.integers(1, 3))):
            if not raw:
                break
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(raw)))
        for bad in (bytes(raw), bytes(raw[:cut]), bytes(raw) + b"\x01"):
            first = outcome(lambda bad=bad: compiled.loads(bad))
            second = outcome(lambda bad=bad: pure.loads(bad))
            if first[0] == "ok" and second[0] == "ok":
                assert pure.dumps(first[1]) == pure.dumps(second[1])
            else:
                assert first == second

    check()


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(),
    st.binary(),
    st.lists(st.integers(), max_size=3),
    st.tuples(st.integers(), st.text()),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sampled_from([Color.RED, Level.LOW, Point(1, 2), Empty(), Rect(1, 2**40)]),
)


@pytest.mark.parametrize(
    "tp",
    [
        bool,
        u8,
        i8,
        u16,
        i32,
        u64,
        int,
        f32,
        float,
        str,
        bytes,
        type(None),
        list[u8],
        tuple[u8, str],
        dict[str, i32],
        u8 | None,
        Point,
        Color,
        Level,
        Shape,
        Mixed,
    ],
    ids=str,
)
def test_twins_same_outcome_for_any_value(both_twins: Twins, tp: Any) -> None:
    compiled, pure = (codec(m, tp) for m in modules(both_twins))

    @HYPOTHESIS
    @given(ANY_VALUE)
    def check(value: Any) -> None:
        first = outcome(lambda: compiled.dumps(value))
        second = outcome(lambda: pure.dumps(value))
        assert first == second

    check()


def test_twins_same_nan_bytes(both_twins: Twins) -> None:
    compiled, pure = modules(both_twins)
    for tp, fmt in ((float, "<d"), (f32, "<f")):
        for bits in (0x7FF8000000000001, 0xFFF8000000000000, 0x7FF0000000000001):
            value = struct.unpack("<d", struct.pack("<Q", bits))[0]
            assert on(compiled, postcard.dumps, value, tp) == on(pure, postcard.dumps, value, tp)
        size = struct.calcsize(fmt)
        for raw in (struct.pack(fmt, math.nan), bytes.fromhex("01 00 80 ff 01 00 f0 7f")[:size]):
            decoded = [on(m, postcard.loads, raw, tp) for m in (compiled, pure)]
            assert struct.pack("<d", decoded[0]) == struct.pack("<d", decoded[1])


@pytest.mark.parametrize(("tp", "nested", "wrap"), DEEP_SHAPES, ids=DEEP_IDS)
def test_twins_same_outcome_at_and_past_the_depth_limit(
    both_twins: Twins, tp: Any, nested: Any, wrap: Any
) -> None:
    compiled, pure = (codec(m, tp) for m in modules(both_twins))
    value = pure.loads(nested(postcard.MAX_DEPTH))
    for n in (postcard.MAX_DEPTH - 1, postcard.MAX_DEPTH, postcard.MAX_DEPTH + 1, 300):
        data = nested(n)
        for cut in (len(data), len(data) - 1):
            first = outcome(lambda data=data, cut=cut: compiled.loads(data[:cut]))
            second = outcome(
                lambda data=data, cut=cut: call_at_depth(200, lambda: pure.loads(data[:cut]))
            )
            assert first[0] == second[0]
            if first[0] == "error":
                assert first == second
            else:
                assert pure.dumps(first[1]) == pure.dumps(second[1]) == data
    for deeper in (value, wrap(value), wrap(wrap(value))):
        assert outcome(lambda v=deeper: compiled.dumps(v)) == outcome(
            lambda v=deeper: call_at_depth(200, lambda: pure.dumps(v))
        )


@pytest.mark.parametrize(("tp", "nested", "wrap"), DEEP_SHAPES, ids=DEEP_IDS)
def test_twins_same_outcome_for_corrupted_deep_values(
    both_twins: Twins, tp: Any, nested: Any, wrap: Any
) -> None:
    # 30 levels: the pure twin's recursion hands over to its explicit stack on the way down,
    # so a byte changed anywhere fails (or not) the same way on both sides of the switch.
    compiled, pure = (codec(m, tp) for m in modules(both_twins))
    data = nested(30)
    for i in range(len(data)):
        for byte in (0x00, 0x01, 0x02, 0x03, 0x04, 0x80, 0xFF):
            bad = data[:i] + bytes([byte]) + data[i + 1 :]
            first = outcome(lambda bad=bad: compiled.loads(bad))
            second = outcome(lambda bad=bad: pure.loads(bad))
            if first[0] == "ok" and second[0] == "ok":
                assert pure.dumps(first[1]) == pure.dumps(second[1]) == bad
            else:
                assert first == second


def test_twins_same_errors_for_deep_nesting(both_twins: Twins) -> None:
    for data in (b"\x01\x01" * 300, b"\x01" * 300):
        results = [
            outcome(lambda m=m, data=data: on(m, postcard.loads, data, Chain))
            for m in modules(both_twins)
        ]
        assert results[0] == results[1]
        assert results[0][0] == "error"


# --------------------------------------------------------------------------- selection

PROBE = """
import json
from rapace import _impl, postcard
print(json.dumps({
    "implementation": _impl.IMPLEMENTATION,
    "postcard": postcard.default_impl().__name__,
    "core": _impl.current().postcard.__name__,
}))
"""


def probe(tmp_path: Path, no_extensions: str | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "RAPACE_NO_EXTENSIONS"}
    if no_extensions is not None:
        env["RAPACE_NO_EXTENSIONS"] = no_extensions
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    info: dict[str, Any] = json.loads(result.stdout)
    return info


@pytest.mark.c_extensions
def test_default_codec_is_compiled(tmp_path: Path) -> None:
    info = probe(tmp_path, None)
    assert info == {
        "implementation": "cython",
        "postcard": "rapace._postcard",
        "core": "rapace._postcard",
    }


def test_env_var_selects_pure_codec(tmp_path: Path) -> None:
    info = probe(tmp_path, "1")
    assert info == {
        "implementation": "python",
        "postcard": "rapace._postcard_py",
        "core": "rapace._postcard_py",
    }


def test_default_codec_follows_the_selector() -> None:
    from rapace import _impl  # noqa: PLC0415

    assert postcard.default_impl() is _impl.current().postcard
    assert postcard.codec_for(u8) is postcard.codec_for(u8)
    with _impl.using("python") as pure:
        assert postcard.default_impl() is pure.postcard
