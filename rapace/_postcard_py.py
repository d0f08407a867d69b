"""The postcard codec nodes in pure Python: the reference twin of ``rapace/_postcard.pyx``.

``rapace.postcard`` compiles a type hint into a tree of these nodes once; a ``Codec``
wrapping the root node then encodes and decodes values (``docs/protocol.md`` §9). The compiled
twin has the same classes, constructors, bytes, values and exceptions.

Every node has ``name`` (the type as error messages spell it) and ``min_size`` (the fewest
bytes one encoded value takes: a sequence count is checked against it before anything is
allocated). ``Struct`` and ``DataEnum`` are built empty and completed with
``set_fields`` / ``set_variants``, so recursive types can refer to themselves.

Nesting costs little Python stack. A node knows its height (how many nodes deep its type
goes; a recursive type has no bound): a node at most ``_FLAT_HEIGHT`` tall encodes and
decodes by plain recursion (``encode`` / ``decode``), the fast path of every ordinary
message type. A recursive type recurses too, but only through its first
``_RECURSIVE_STRUCTS`` nested structs (shallow trees, the usual case, stay as fast); below
that, and for any other tall type, it runs on an explicit stack (``_encode_deep`` /
``_decode_deep``) of suspended container generators (``encode_steps`` /
``decode_steps``). So a value nested ``MAX_DEPTH`` structs deep takes about as many
Python frames as one nested ``_RECURSIVE_STRUCTS`` deep, and the pure twin accepts and
refuses exactly the depths the compiled one does, however deep its caller's stack is.
"""

from __future__ import annotations

import struct
from collections.abc import Generator
from typing import Any, Final, TypeAlias

from rapace._checks import (
    bad_varint_width,
    field_count_mismatch,
    nested_too_deep,
    not_bytes_like,
    too_many_zero_size_items,
)
from rapace.types import PostcardError, _fmt_int

__all__ = [
    "F32",
    "F64",
    "I8",
    "MAX_DEPTH",
    "MAX_ZERO_SIZE_ITEMS_PER_MESSAGE",
    "U8",
    "Bool",
    "Bytes",
    "Codec",
    "DataEnum",
    "Map",
    "Node",
    "Option",
    "Seq",
    "Str",
    "Struct",
    "Tuple",
    "Unit",
    "UnitEnum",
    "Varint",
]

MAX_DEPTH: Final = 128
"""Structs nested deeper than this (through recursive types) are refused."""

MAX_ZERO_SIZE_ITEMS_PER_MESSAGE: Final = 1 << 20
"""The most zero-size items (``None``, ``tuple[()]``, a dataclass without fields) all the
sequences and maps of one decoded message may claim together. Every other item takes at
least one input byte, so the input length bounds those; these alone it does not, and
nested sequences would multiply a per-sequence cap (``list[list[None]]``). 1 << 20 is as
many items as the largest default payload (1 MiB) of one-byte items holds: zero-size
items let a message hold no more items than a legitimate full-size ``list[u8]`` does."""

_FLAT_HEIGHT: Final = 16
"""Nodes at most this tall recurse (one or two Python frames a level); taller ones, and
recursive types, run on the explicit stack."""

_RECURSIVE_STRUCTS: Final = 8
"""Struct nesting a recursive type decodes and encodes by recursion before the explicit
stack takes over: a few Python frames a level (the nodes between two structs)."""

_UNBOUNDED: Final = 1 << 30
"""The height of a node whose nesting has no static bound: a recursive type, or a struct
or enum whose fields are not set yet."""

DecodeSteps: TypeAlias = Generator["Node", Any, Any]
"""A container decoding: yields each child node that is not flat, is sent its value."""

EncodeSteps: TypeAlias = Generator[tuple["Node", Any], None, None]
"""A container encoding: yields (child node, child value) for each child not flat."""

_U64_MAX: Final = (1 << 64) - 1
_F32: Final = struct.Struct("<f")
_F64: Final = struct.Struct("<d")
_setattr: Final = object.__setattr__


class Writer(bytearray):
    """The output buffer, and how many structs deep the encoder is."""

    __slots__ = ("depth",)

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0


class Reader:
    """The input, the read offset, how many structs deep the decoder is, and how many more
    zero-size items this message may claim."""

    __slots__ = ("data", "depth", "end", "pos", "zero_size_left")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.depth = 0
        self.zero_size_left = MAX_ZERO_SIZE_ITEMS_PER_MESSAGE


def _enc_error(reason: str, node: Node, out: Writer) -> PostcardError:
    return PostcardError(reason, node.name, len(out), False)


def _dec_error(reason: str, node: Node, offset: int) -> PostcardError:
    return PostcardError(reason, node.name, offset, True)


def _wrong_type(node: Node, out: Writer, expected: str, value: object) -> PostcardError:
    return _enc_error(f"expected {expected}, got {type(value).__name__}", node, out)


def _truncated(node: Node, r: Reader, need: int) -> PostcardError:
    return _dec_error(f"truncated: needs {need} bytes, {r.end - r.pos} left", node, r.pos)


def _write_varint(out: Writer, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _read_varint(r: Reader, node: Node, maxbytes: int, lastmax: int, width: str) -> int:
    """A LEB128 varint of at most ``maxbytes`` bytes whose last byte is <= ``lastmax``."""
    data = r.data
    pos = start = r.pos
    end = r.end
    if pos < end:
        b = data[pos]
        if b < 0x80:
            r.pos = pos + 1
            return b
    result = 0
    shift = 0
    for i in range(maxbytes):
        if pos >= end:
            raise _dec_error("truncated varint", node, start)
        b = data[pos]
        pos += 1
        if i == maxbytes - 1 and b > lastmax:
            if b & 0x80:
                raise _dec_error(f"varint longer than {maxbytes} bytes", node, start)
            raise _dec_error(f"varint overflows {width}", node, start)
        result |= (b & 0x7F) << shift
        if b < 0x80:
            r.pos = pos
            return result
        shift += 7
    raise AssertionError("unreachable")  # pragma: no cover


def _read_usize(r: Reader, node: Node) -> int:
    return _read_varint(r, node, 10, 0x01, "u64")


def _read_count(r: Reader, node: Node, min_size: int) -> int:
    """A sequence or map count, refused before anything is allocated when the items cannot
    fit the input left, or when zero-size items would overrun the message's budget (they
    are charged here, all at once, so the check costs the same for any count)."""
    start = r.pos
    count = _read_usize(r, node)
    if min_size > 0:
        left = r.end - r.pos
        if count > left // min_size:
            raise _dec_error(
                f"truncated: {count} items of at least {min_size} bytes, {left} left",
                node,
                start,
            )
    elif count > r.zero_size_left:
        raise too_many_zero_size_items(
            node.name,
            start,
            count,
            MAX_ZERO_SIZE_ITEMS_PER_MESSAGE - r.zero_size_left,
            MAX_ZERO_SIZE_ITEMS_PER_MESSAGE,
        )
    else:
        r.zero_size_left -= count
    return count


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Node:
    """One type of the compiled tree."""

    __slots__ = ("_flat", "_height", "min_size", "name")

    def __init__(self, name: str, min_size: int, height: int = 1) -> None:
        self.name = name
        self.min_size = min_size
        self._set_height(height)

    def _set_height(self, height: int) -> None:
        self._height = min(height, _UNBOUNDED)
        self._flat = self._height <= _FLAT_HEIGHT

    def encode(self, out: Writer, value: Any) -> None:
        raise NotImplementedError

    def decode(self, r: Reader) -> Any:
        raise NotImplementedError

    def encode_steps(self, out: Writer, value: Any) -> EncodeSteps:
        """The explicit-stack encoding; only containers (the only nodes that can be tall)
        have one."""
        raise NotImplementedError

    def decode_steps(self, r: Reader) -> DecodeSteps:
        """The explicit-stack decoding; only containers have one."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class Unit(Node):
    """``None``, the unit type: no bytes."""

    __slots__ = ()

    def __init__(self, name: str) -> None:
        super().__init__(name, 0)

    def encode(self, out: Writer, value: Any) -> None:
        if value is not None:
            raise _wrong_type(self, out, "None", value)

    def decode(self, r: Reader) -> Any:
        return None


class Bool(Node):
    """``bool``: one byte, 0 or 1."""

    __slots__ = ()

    def __init__(self, name: str) -> None:
        super().__init__(name, 1)

    def encode(self, out: Writer, value: Any) -> None:
        if value is True:
            out.append(1)
        elif value is False:
            out.append(0)
        else:
            raise _wrong_type(self, out, "bool", value)

    def decode(self, r: Reader) -> Any:
        pos = r.pos
        if pos >= r.end:
            raise _truncated(self, r, 1)
        b = r.data[pos]
        if b > 1:
            raise _dec_error(f"invalid bool byte 0x{b:02x}", self, pos)
        r.pos = pos + 1
        return b == 1


class U8(Node):
    """``u8``: one byte."""

    __slots__ = ()

    def __init__(self, name: str) -> None:
        super().__init__(name, 1)

    def encode(self, out: Writer, value: Any) -> None:
        if not _is_int(value):
            raise _wrong_type(self, out, "int", value)
        if not 0 <= value <= 0xFF:
            raise _enc_error(f"{_fmt_int(value)} is out of range [0, 255]", self, out)
        out.append(value)

    def decode(self, r: Reader) -> Any:
        pos = r.pos
        if pos >= r.end:
            raise _truncated(self, r, 1)
        r.pos = pos + 1
        return r.data[pos]


class I8(Node):
    """``i8``: one byte, two's complement."""

    __slots__ = ()

    def __init__(self, name: str) -> None:
        super().__init__(name, 1)

    def encode(self, out: Writer, value: Any) -> None:
        if not _is_int(value):
            raise _wrong_type(self, out, "int", value)
        if not -0x80 <= value <= 0x7F:
            raise _enc_error(f"{_fmt_int(value)} is out of range [-128, 127]", self, out)
        out.append(value & 0xFF)

    def decode(self, r: Reader) -> Any:
        pos = r.pos
        if pos >= r.end:
            raise _truncated(self, r, 1)
        r.pos = pos + 1
        b = r.data[pos]
        return b - 0x100 if b >= 0x80 else b


class Varint(Node):
    """``u16``..``u64`` as LEB128; ``i16``..``i64`` zigzagged first."""

    __slots__ = ("bits", "hi", "lastmax", "lo", "maxbytes", "signed", "width")

    def __init__(self, name: str, bits: int, signed: bool) -> None:
        if bits not in (16, 32, 64):
            raise bad_varint_width(bits)
        super().__init__(name, 1)
        self.bits = bits
        self.signed = signed
        self.lo = -(1 << (bits - 1)) if signed else 0
        self.hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        self.maxbytes = (bits + 6) // 7
        self.lastmax = (1 << (bits - 7 * (self.maxbytes - 1))) - 1
        self.width = f"{'i' if signed else 'u'}{bits}"

    def encode(self, out: Writer, value: Any) -> None:
        if not _is_int(value):
            raise _wrong_type(self, out, "int", value)
        if not self.lo <= value <= self.hi:
            raise _enc_error(f"{_fmt_int(value)} is out of range [{self.lo}, {self.hi}]", self, out)
        n = int(value)
        if self.signed:
            n = (n << 1) if n >= 0 else ((-n) << 1) - 1
        while n >= 0x80:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)

    def decode(self, r: Reader) -> Any:
        n = _read_varint(r, self, self.maxbytes, self.lastmax, self.width)
        if self.signed:
            return -((n + 1) >> 1) if n & 1 else n >> 1
        return n


class F32(Node):
    """``f32``: IEEE 754 single precision, little-endian."""

    __slots__ = ()

    def __init__(self, name: str) -> None:
        super().__init__(name, 4)

    def encode(self, out: Writer, value: Any) -> None:
        x = _as_float(self, out, value)
        try:
            out += _F32.pack(x)
        except OverflowError:
            raise _enc_error(f"{x!r} is out of range for f32", self, out) from None

    def decode(self, r: Reader) -> Any:
        pos = r.pos
        if r.end - pos < 4:
            raise _truncated(self, r, 4)
        r.pos = pos + 4
        return _F32.unpack_from(r.data, pos)[0]


class F64(Node):
    """``f64`` (``float``): IEEE 754 double precision, little-endian."""

    __slots__ = ()

    def __init__(self, name: str) -> None:
        super().__init__(name, 8)

    def encode(self, out: Writer, value: Any) -> None:
        out += _F64.pack(_as_float(self, out, value))

    def decode(self, r: Reader) -> Any:
        pos = r.pos
        if r.end - pos < 8:
            raise _truncated(self, r, 8)
        r.pos = pos + 8
        return _F64.unpack_from(r.data, pos)[0]


def _as_float(node: Node, out: Writer, value: object) -> float:
    if isinstance(value, float):
        return value
    if not _is_int(value):
        raise _wrong_type(node, out, "float", value)
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise _enc_error(
            f"{_fmt_int(value)} is out of range for f64",  # type: ignore[arg-type]
            node,
            out,
        ) from None


class Str(Node):
    """``str``: varint length, then UTF-8."""

    __slots__ = ()

    def __init__(self, name: str) -> None:
        super().__init__(name, 1)

    def encode(self, out: Writer, value: Any) -> None:
        if not isinstance(value, str):
            raise _wrong_type(self, out, "str", value)
        try:
            data = value.encode()
        except UnicodeEncodeError as exc:
            raise _enc_error(f"not encodable as UTF-8: {exc.reason}", self, out) from None
        _write_varint(out, len(data))
        out += data

    def decode(self, r: Reader) -> Any:
        start = r.pos
        n = _read_usize(r, self)
        pos = r.pos
        if n > r.end - pos:
            raise _dec_error(
                f"truncated: needs {n} bytes of UTF-8, {r.end - pos} left", self, start
            )
        r.pos = pos + n
        try:
            return str(r.data[pos : pos + n], "utf-8")
        except UnicodeDecodeError as exc:
            raise _dec_error(
                f"invalid UTF-8 ({exc.reason}) at byte {exc.start} of the string", self, start
            ) from None


class Bytes(Node):
    """``bytes``: varint length, then the bytes (``bytearray``/``memoryview`` encode too)."""

    __slots__ = ()

    def __init__(self, name: str) -> None:
        super().__init__(name, 1)

    def encode(self, out: Writer, value: Any) -> None:
        if not isinstance(value, bytes | bytearray):
            if not isinstance(value, memoryview):
                raise _wrong_type(self, out, "bytes", value)
            value = bytes(value)
        _write_varint(out, len(value))
        out += value

    def decode(self, r: Reader) -> Any:
        start = r.pos
        n = _read_usize(r, self)
        pos = r.pos
        if n > r.end - pos:
            raise _dec_error(f"truncated: needs {n} bytes, {r.end - pos} left", self, start)
        r.pos = pos + n
        return r.data[pos : pos + n]


class Option(Node):
    """``T | None``: ``00``, or ``01`` then the value."""

    __slots__ = ("inner",)

    def __init__(self, name: str, inner: Node) -> None:
        super().__init__(name, 1, inner._height + 1)
        self.inner = inner

    def encode(self, out: Writer, value: Any) -> None:
        if value is None:
            out.append(0)
        else:
            out.append(1)
            self.inner.encode(out, value)

    def decode(self, r: Reader) -> Any:
        pos = r.pos
        if pos >= r.end:
            raise _truncated(self, r, 1)
        tag = r.data[pos]
        if tag == 0:
            r.pos = pos + 1
            return None
        if tag == 1:
            r.pos = pos + 1
            return self.inner.decode(r)
        raise _dec_error(f"invalid Option tag 0x{tag:02x}", self, pos)

    def encode_steps(self, out: Writer, value: Any) -> EncodeSteps:
        if value is None:
            out.append(0)
            return
        out.append(1)
        inner = self.inner
        if inner._flat:
            inner.encode(out, value)
        else:
            yield inner, value

    def decode_steps(self, r: Reader) -> DecodeSteps:
        pos = r.pos
        if pos >= r.end:
            raise _truncated(self, r, 1)
        tag = r.data[pos]
        if tag == 0:
            r.pos = pos + 1
            return None
        if tag == 1:
            r.pos = pos + 1
            inner = self.inner
            return inner.decode(r) if inner._flat else (yield inner)
        raise _dec_error(f"invalid Option tag 0x{tag:02x}", self, pos)


class Seq(Node):
    """``list[T]`` (or ``tuple[T, ...]`` with ``as_tuple``): varint count, then the items."""

    __slots__ = ("as_tuple", "item")

    def __init__(self, name: str, item: Node, as_tuple: bool = False) -> None:
        super().__init__(name, 1, item._height + 1)
        self.item = item
        self.as_tuple = as_tuple

    def encode(self, out: Writer, value: Any) -> None:
        if not isinstance(value, list | tuple):
            raise _wrong_type(self, out, "list or tuple", value)
        _write_varint(out, len(value))
        encode = self.item.encode
        i = 0
        try:
            for i, x in enumerate(value):  # noqa: B007 (i names the failing item)
                encode(out, x)
        except PostcardError as exc:
            exc._prepend(f"[{i}]")
            raise

    def decode(self, r: Reader) -> Any:
        count = _read_count(r, self, self.item.min_size)
        decode = self.item.decode
        items = []
        i = 0
        try:
            for i in range(count):  # noqa: B007 (i names the failing item)
                items.append(decode(r))
        except PostcardError as exc:
            exc._prepend(f"[{i}]")
            raise
        return tuple(items) if self.as_tuple else items

    def encode_steps(self, out: Writer, value: Any) -> EncodeSteps:
        if not isinstance(value, list | tuple):
            raise _wrong_type(self, out, "list or tuple", value)
        _write_varint(out, len(value))
        item = self.item
        i = 0
        try:
            if item._flat:
                encode = item.encode
                for i, x in enumerate(value):  # noqa: B007 (i names the failing item)
                    encode(out, x)
            else:
                for i, x in enumerate(value):  # noqa: B007 (i names the failing item)
                    yield item, x
        except PostcardError as exc:
            exc._prepend(f"[{i}]")
            raise

    def decode_steps(self, r: Reader) -> DecodeSteps:
        count = _read_count(r, self, self.item.min_size)
        item = self.item
        items = []
        i = 0
        try:
            if item._flat:
                decode = item.decode
                for i in range(count):  # noqa: B007 (i names the failing item)
                    items.append(decode(r))
            else:
                for i in range(count):  # noqa: B007 (i names the failing item)
                    items.append((yield item))
        except PostcardError as exc:
            exc._prepend(f"[{i}]")
            raise
        return tuple(items) if self.as_tuple else items


class Tuple(Node):
    """``tuple[A, B, ...]``: the items in order, no count."""

    __slots__ = ("items",)

    def __init__(self, name: str, items: tuple[Node, ...]) -> None:
        items = tuple(items)
        height = 1 + max((n._height for n in items), default=0)
        super().__init__(name, sum(n.min_size for n in items), height)
        self.items = items

    def encode(self, out: Writer, value: Any) -> None:
        if not isinstance(value, tuple | list):
            raise _wrong_type(self, out, "tuple", value)
        if len(value) != len(self.items):
            raise _enc_error(f"expected {len(self.items)} items, got {len(value)}", self, out)
        i = 0
        try:
            for i, node in enumerate(self.items):
                node.encode(out, value[i])
        except PostcardError as exc:
            exc._prepend(f"[{i}]")
            raise

    def decode(self, r: Reader) -> Any:
        values = []
        i = 0
        try:
            for i, node in enumerate(self.items):  # noqa: B007 (i names the failing item)
                values.append(node.decode(r))
        except PostcardError as exc:
            exc._prepend(f"[{i}]")
            raise
        return tuple(values)

    def encode_steps(self, out: Writer, value: Any) -> EncodeSteps:
        if not isinstance(value, tuple | list):
            raise _wrong_type(self, out, "tuple", value)
        if len(value) != len(self.items):
            raise _enc_error(f"expected {len(self.items)} items, got {len(value)}", self, out)
        i = 0
        try:
            for i, node in enumerate(self.items):
                if node._flat:
                    node.encode(out, value[i])
                else:
                    yield node, value[i]
        except PostcardError as exc:
            exc._prepend(f"[{i}]")
            raise

    def decode_steps(self, r: Reader) -> DecodeSteps:
        values = []
        i = 0
        try:
            for i, node in enumerate(self.items):  # noqa: B007 (i names the failing item)
                values.append(node.decode(r) if node._flat else (yield node))
        except PostcardError as exc:
            exc._prepend(f"[{i}]")
            raise
        return tuple(values)


class Map(Node):
    """``dict[K, V]``: varint count, then key, value, key, value ..."""

    __slots__ = ("key", "value")

    def __init__(self, name: str, key: Node, value: Node) -> None:
        super().__init__(name, 1, max(key._height, value._height) + 1)
        self.key = key
        self.value = value

    def encode(self, out: Writer, value: Any) -> None:
        if not isinstance(value, dict):
            raise _wrong_type(self, out, "dict", value)
        _write_varint(out, len(value))
        kenc = self.key.encode
        venc = self.value.encode
        for k, v in value.items():
            kenc(out, k)
            venc(out, v)

    def decode(self, r: Reader) -> Any:
        count = _read_count(r, self, self.key.min_size + self.value.min_size)
        kdec = self.key.decode
        vdec = self.value.decode
        result = {}
        for _ in range(count):
            k = kdec(r)
            result[k] = vdec(r)
        return result

    def encode_steps(self, out: Writer, value: Any) -> EncodeSteps:
        if not isinstance(value, dict):
            raise _wrong_type(self, out, "dict", value)
        _write_varint(out, len(value))
        knode = self.key
        vnode = self.value
        for k, v in value.items():
            if knode._flat:
                knode.encode(out, k)
            else:
                yield knode, k
            if vnode._flat:
                vnode.encode(out, v)
            else:
                yield vnode, v

    def decode_steps(self, r: Reader) -> DecodeSteps:
        knode = self.key
        vnode = self.value
        count = _read_count(r, self, knode.min_size + vnode.min_size)
        result = {}
        for _ in range(count):
            k = knode.decode(r) if knode._flat else (yield knode)
            result[k] = vnode.decode(r) if vnode._flat else (yield vnode)
        return result


class Struct(Node):
    """A dataclass: its fields in order. Decoding bypasses ``__init__`` (fields are set
    with ``object.__setattr__``, so frozen and slotted dataclasses work), then calls
    ``__post_init__`` if the class has one; a ``ValueError``/``TypeError`` it raises
    becomes a ``PostcardError``."""

    __slots__ = ("cls", "fields", "names", "nodes", "post_init")

    def __init__(self, name: str, cls: type, names: tuple[str, ...], post_init: Any) -> None:
        super().__init__(name, 0, _UNBOUNDED)  # until set_fields: fields may refer back
        self.cls = cls
        self.names = tuple(names)
        self.post_init = post_init
        self.nodes: tuple[Node, ...] = ()
        self.fields: tuple[tuple[str, Node], ...] = ()

    def set_fields(self, nodes: tuple[Node, ...]) -> None:
        if len(nodes) != len(self.names):
            raise field_count_mismatch(self.name, len(self.names), len(nodes))
        self.nodes = tuple(nodes)
        self.fields = tuple(zip(self.names, self.nodes, strict=True))
        self.min_size = sum(n.min_size for n in nodes)
        self._set_height(1 + max((n._height for n in self.nodes), default=0))

    def encode(self, out: Writer, value: Any) -> None:
        if not isinstance(value, self.cls):
            raise _wrong_type(self, out, self.name, value)
        if out.depth >= _RECURSIVE_STRUCTS:
            if out.depth >= MAX_DEPTH:
                raise nested_too_deep(self.name, len(out), False, MAX_DEPTH)
            if not self._flat:
                _encode_deep(self, out, value)
                return
        out.depth += 1
        name = ""
        try:
            for name, node in self.fields:
                node.encode(out, getattr(value, name))
        except PostcardError as exc:
            exc._prepend(f".{name}")
            raise
        out.depth -= 1

    def decode(self, r: Reader) -> Any:
        start = r.pos
        if r.depth >= _RECURSIVE_STRUCTS:
            if r.depth >= MAX_DEPTH:
                raise nested_too_deep(self.name, start, True, MAX_DEPTH)
            if not self._flat:
                return _decode_deep(self, r)
        r.depth += 1
        cls: Any = self.cls
        obj = cls.__new__(cls)
        name = ""
        try:
            for name, node in self.fields:
                _setattr(obj, name, node.decode(r))
        except PostcardError as exc:
            exc._prepend(f".{name}")
            raise
        r.depth -= 1
        if self.post_init is not None:
            self._post_init(obj, start)
        return obj

    def _post_init(self, obj: Any, start: int) -> None:
        try:
            self.post_init(obj)
        except (ValueError, TypeError) as exc:
            raise _dec_error(f"__post_init__ refused the value: {exc}", self, start) from exc

    def encode_steps(self, out: Writer, value: Any) -> EncodeSteps:
        if not isinstance(value, self.cls):
            raise _wrong_type(self, out, self.name, value)
        if out.depth >= MAX_DEPTH:
            raise nested_too_deep(self.name, len(out), False, MAX_DEPTH)
        out.depth += 1
        name = ""
        try:
            for name, node in self.fields:
                field = getattr(value, name)
                if node._flat:
                    node.encode(out, field)
                else:
                    yield node, field
        except PostcardError as exc:
            exc._prepend(f".{name}")
            raise
        out.depth -= 1

    def decode_steps(self, r: Reader) -> DecodeSteps:
        start = r.pos
        if r.depth >= MAX_DEPTH:
            raise nested_too_deep(self.name, start, True, MAX_DEPTH)
        r.depth += 1
        cls: Any = self.cls
        obj = cls.__new__(cls)
        name = ""
        try:
            for name, node in self.fields:
                _setattr(obj, name, node.decode(r) if node._flat else (yield node))
        except PostcardError as exc:
            exc._prepend(f".{name}")
            raise
        r.depth -= 1
        if self.post_init is not None:
            self._post_init(obj, start)
        return obj


class UnitEnum(Node):
    """An ``enum.Enum``: the varint index of the member in declaration order."""

    __slots__ = ("cls", "index", "members")

    def __init__(self, name: str, cls: type, members: tuple[Any, ...]) -> None:
        super().__init__(name, 1)
        self.cls = cls
        self.members = tuple(members)
        self.index = {m: i for i, m in enumerate(self.members)}

    def encode(self, out: Writer, value: Any) -> None:
        if not isinstance(value, self.cls):
            raise _wrong_type(self, out, f"a {self.name} member", value)
        _write_varint(out, self.index[value])

    def decode(self, r: Reader) -> Any:
        start = r.pos
        i = _read_varint(r, self, 5, 0x0F, "u32")
        if i >= len(self.members):
            raise _dec_error(
                f"unknown variant index {i} ({len(self.members)} variants)", self, start
            )
        return self.members[i]


class DataEnum(Node):
    """A ``rapace.DataEnum``: varint variant index, then that variant's fields."""

    __slots__ = ("cls", "index", "labels", "variants")

    def __init__(self, name: str, cls: type) -> None:
        super().__init__(name, 1, _UNBOUNDED)  # until set_variants: they may refer back
        self.cls = cls
        self.variants: tuple[Struct, ...] = ()
        self.labels: tuple[str, ...] = ()
        self.index: dict[type, int] = {}

    def set_variants(self, variants: tuple[Struct, ...]) -> None:
        self.variants = tuple(variants)
        self.labels = tuple(f"::{v.cls.__name__}" for v in self.variants)
        self.index = {v.cls: i for i, v in enumerate(self.variants)}
        self._set_height(1 + max((v._height for v in self.variants), default=0))

    def encode(self, out: Writer, value: Any) -> None:
        i = self.index.get(type(value))
        if i is None:
            raise _wrong_type(self, out, f"a {self.name} variant", value)
        _write_varint(out, i)
        try:
            self.variants[i].encode(out, value)
        except PostcardError as exc:
            exc._prepend(self.labels[i])
            raise

    def decode(self, r: Reader) -> Any:
        start = r.pos
        i = _read_varint(r, self, 5, 0x0F, "u32")
        if i >= len(self.variants):
            raise _dec_error(
                f"unknown variant index {i} ({len(self.variants)} variants)", self, start
            )
        try:
            return self.variants[i].decode(r)
        except PostcardError as exc:
            exc._prepend(self.labels[i])
            raise

    def encode_steps(self, out: Writer, value: Any) -> EncodeSteps:
        i = self.index.get(type(value))
        if i is None:
            raise _wrong_type(self, out, f"a {self.name} variant", value)
        _write_varint(out, i)
        variant = self.variants[i]
        try:
            if variant._flat:
                variant.encode(out, value)
            else:
                yield variant, value
        except PostcardError as exc:
            exc._prepend(self.labels[i])
            raise

    def decode_steps(self, r: Reader) -> DecodeSteps:
        start = r.pos
        i = _read_varint(r, self, 5, 0x0F, "u32")
        if i >= len(self.variants):
            raise _dec_error(
                f"unknown variant index {i} ({len(self.variants)} variants)", self, start
            )
        variant = self.variants[i]
        try:
            return variant.decode(r) if variant._flat else (yield variant)
        except PostcardError as exc:
            exc._prepend(self.labels[i])
            raise


def _encode_deep(node: Node, out: Writer, value: Any) -> None:
    """Encode ``value`` as a tall ``node`` on an explicit stack instead of Python's: each
    container generator yields the children that are not flat, which are encoded in turn;
    an error is thrown back into each suspended parent so it adds its path segment exactly
    as the recursive ``encode`` does."""
    stack: list[EncodeSteps] = []
    steps = node.encode_steps(out, value)
    error: BaseException | None = None
    while True:
        try:
            child, child_value = steps.send(None) if error is None else steps.throw(error)
        except StopIteration:
            if not stack:
                return
            steps = stack.pop()
            error = None
            continue
        except BaseException as exc:
            if not stack:
                raise
            steps = stack.pop()
            error = exc
            continue
        stack.append(steps)
        steps = child.encode_steps(out, child_value)
        error = None


def _decode_deep(node: Node, r: Reader) -> Any:
    """Decode a tall ``node`` on an explicit stack: the decoding twin of ``_encode_deep``,
    each suspended container generator being sent the value of the child it yielded."""
    stack: list[DecodeSteps] = []
    steps = node.decode_steps(r)
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            child = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as done:
            if not stack:
                return done.value
            steps = stack.pop()
            value = done.value
            error = None
            continue
        except BaseException as exc:
            if not stack:
                raise
            steps = stack.pop()
            error = exc
            continue
        stack.append(steps)
        steps = child.decode_steps(r)
        value = None
        error = None


class Codec:
    """A compiled type: ``dumps(value) -> bytes`` and ``loads(data) -> value``."""

    __slots__ = ("node",)

    def __init__(self, node: Node) -> None:
        self.node = node

    @property
    def name(self) -> str:
        return self.node.name

    def dumps(self, value: Any) -> bytes:
        out = Writer()
        node = self.node
        try:
            if node._flat or node._height == _UNBOUNDED:  # recursive: Struct switches
                node.encode(out, value)
            else:
                _encode_deep(node, out, value)
        except PostcardError as exc:
            exc._root(self.node.name)
            raise
        return bytes(out)

    def loads(self, data: bytes | bytearray | memoryview) -> Any:
        if type(data) is not bytes:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise not_bytes_like(data)
            data = bytes(data)
        r = Reader(data)
        node = self.node
        try:
            if node._flat or node._height == _UNBOUNDED:  # recursive: Struct switches
                value = node.decode(r)
            else:
                value = _decode_deep(node, r)
        except PostcardError as exc:
            exc._root(self.node.name)
            raise
        if r.pos != r.end:
            raise _dec_error(f"{r.end - r.pos} trailing bytes after the value", self.node, r.pos)
        return value

    def __repr__(self) -> str:
        return f"<postcard.Codec {self.node.name}>"
