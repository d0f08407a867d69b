"""Postcard payloads (``docs/protocol.md`` §9) driven by type hints, serde/postcard compatible.

::

    from dataclasses import dataclass
    import rapace
    from rapace import postcard

    @dataclass
    class Point:
        x: rapace.i32
        y: rapace.i32

    data = postcard.dumps(Point(2, 3), Point)      # b"\\x04\\x06"
    point = postcard.loads(data, Point)

    codec = postcard.codec_for(list[Point])        # compile once, use many times
    codec.loads(codec.dumps([Point(1, 2)]))

``codec_for(tp)`` compiles a type hint into a tree of codec nodes once (cached) and
raises ``TypeError`` right there for a type it cannot encode, so a service refuses a bad
signature when it is defined, not at its first call.

Types and their bytes:

========================================  ===============================================
``bool``                                  one byte, 0 or 1 (anything else: error)
``rapace.u8`` / ``rapace.i8``             one byte (two's complement)
``rapace.u16`` / ``u32`` / ``u64``        LEB128 varint (too long or overflowing: error)
``rapace.i16`` / ``i32`` / ``i64``,       zigzag, then varint
``int`` (= ``i64``)
``rapace.f32``, ``float`` (= ``f64``)     IEEE 754, little-endian
``str``                                   varint length, then UTF-8 (must be valid)
``bytes``                                 varint length, then the bytes
``list[T]``, ``tuple[T, ...]``            varint count, then the items
``tuple[A, B, ...]``                      the items in order, no count
``dict[K, V]``                            varint count, then key, value, key, value ...
``T | None`` / ``Optional[T]``            ``00``, or ``01`` then the value
``None``                                  unit: no bytes
a dataclass                               a struct: the fields in order
an ``enum.Enum`` / ``enum.IntEnum``       a unit-only enum: the varint index of the
                                          member in declaration order (not its value)
a ``rapace.DataEnum``                     a Rust enum with data: the varint index of the
                                          variant in declaration order, then its fields
========================================  ===============================================

Rust enums with data are declared with ``rapace.DataEnum`` (see ``rapace.types``)::

    class Shape(rapace.DataEnum): ...      # the enum

    @dataclass
    class Circle(Shape):                   # variant 0
        radius: float

    @dataclass
    class Empty(Shape):                    # variant 1 (a unit variant)
        pass

A value of the enum is an instance of one of its variants: ``dumps(Circle(1.0), Shape)``
gives ``00`` then the f64. Decoding an index past the last variant is an error.

Dataclass annotations may be strings (``from __future__ import annotations``): they are
resolved with ``typing.get_type_hints``. Recursive types work (``children: list[Node]``,
``next: Node | None``), up to ``MAX_DEPTH`` nested structs. Decoding a dataclass sets its
fields directly (bypassing ``__init__``, so frozen and slotted dataclasses work) and then
calls ``__post_init__`` if there is one.

Encoding accepts ``int`` (not ``bool``) for integer types, ``float`` or ``int`` for float
types, ``bytes``/``bytearray``/``memoryview`` for ``bytes``, a ``list`` or ``tuple`` for
sequences and tuples, a ``dict`` for maps, and instances of the declared class for
structs and enums.

Every failure raises :class:`PostcardError` (a ``ValueError``) naming the type, the byte
offset where the failing value starts and, for nested values, the path to it
(``Order.lines[2].qty``): a value out of its range or of the wrong type when encoding;
truncated data, a varint too long or overflowing its width, a bool byte other than
0/1, an Option tag other than 0/1, invalid UTF-8, an unknown enum index, values nested
deeper than ``MAX_DEPTH`` structs or trailing bytes after the value when decoding.

Decoding work is bounded by the input: a sequence or map count is checked against the
bytes left before anything is allocated, and the items that take no bytes at all
(``list[None]``) may number at most ``MAX_ZERO_SIZE_ITEMS_PER_MESSAGE`` in one message,
however the sequences holding them nest.

The hot loops run in ``rapace._postcard`` (compiled) or ``rapace._postcard_py`` (its pure
twin), the one ``rapace._impl`` selected with the rest of the core, or the one a
``rapace._impl.using`` block picks (tests and benchmarks compare both in one process).
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import types
import typing
from types import ModuleType
from typing import Annotated, Any, Protocol, TypeVar, get_args, get_origin, overload

from rapace import _impl
from rapace.types import DataEnum, FloatWidth, IntWidth, PostcardError

__all__ = [
    "MAX_DEPTH",
    "MAX_ZERO_SIZE_ITEMS_PER_MESSAGE",
    "Codec",
    "DataEnum",
    "PostcardError",
    "codec_for",
    "default_impl",
    "dumps",
    "loads",
]

T = TypeVar("T")

MAX_DEPTH: int = _impl.current().postcard.MAX_DEPTH
"""Values nested deeper than this many structs are refused (both ways)."""

MAX_ZERO_SIZE_ITEMS_PER_MESSAGE: int = _impl.current().postcard.MAX_ZERO_SIZE_ITEMS_PER_MESSAGE
"""Decoding refuses a message whose sequences and maps claim more zero-size items (``None``,
``tuple[()]``, field-less dataclasses) than this, all together: a few bytes of counts
must not make the decoder build millions of them."""


class Codec(Protocol[T]):
    """A compiled type: ``dumps(value) -> bytes`` and ``loads(data) -> value``."""

    @property
    def name(self) -> str:
        """The type as error messages name it (``u32``, ``list[Point]``, ...)."""
        ...

    def dumps(self, value: T, /) -> bytes:
        """Encode ``value``; ``PostcardError`` if it does not fit the type."""
        ...

    def loads(self, data: bytes | bytearray | memoryview, /) -> T:
        """Decode exactly one value from ``data``; ``PostcardError`` if it is not valid."""
        ...


def default_impl() -> ModuleType:
    """The twin module codecs are built on here (``rapace._impl.current()``'s)."""
    return _impl.current().postcard


_lock = threading.RLock()
_codecs: dict[tuple[ModuleType, Any], Any] = {}
_nodes: dict[ModuleType, dict[Any, Any]] = {}


@overload
def codec_for(tp: type[T]) -> Codec[T]: ...
@overload
def codec_for(tp: Any) -> Codec[Any]: ...
def codec_for(tp: Any) -> Codec[Any]:
    """The (cached) codec for type hint ``tp``; ``TypeError`` if it cannot be encoded.

    Built on the current twin (``rapace._impl.current()``: the selected one, unless a
    ``rapace._impl.using`` block picks the other).
    """
    module = _impl.current().postcard
    key = (module, tp)
    try:
        return typing.cast("Codec[Any]", _codecs[key])
    except KeyError:
        pass
    except TypeError:  # an unhashable hint: compile it every time
        return typing.cast("Codec[Any]", module.Codec(_compile(tp, module)))
    with _lock:
        codec = _codecs.get(key)
        if codec is None:
            codec = module.Codec(_compile(tp, module))
            _codecs[key] = codec
    return typing.cast("Codec[Any]", codec)


def dumps(value: Any, tp: Any) -> bytes:
    """Encode ``value`` as type ``tp`` (see the module docstring for the rules)."""
    return codec_for(tp).dumps(value)


@overload
def loads(data: bytes | bytearray | memoryview, tp: type[T]) -> T: ...
@overload
def loads(data: bytes | bytearray | memoryview, tp: Any) -> Any: ...
def loads(data: bytes | bytearray | memoryview, tp: Any) -> Any:
    """Decode one value of type ``tp`` from ``data``; trailing bytes are an error."""
    return codec_for(tp).loads(data)


# --------------------------------------------------------------------------- compiling


def _show(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__qualname__
    return repr(tp).replace("typing.", "")


def _compile(tp: Any, impl: ModuleType) -> Any:
    with _lock:
        cache = _nodes.setdefault(impl, {})
        compiler = _Compiler(impl, cache)
        try:
            node = compiler.node(tp)
        except TypeError as exc:
            raise TypeError(f"rapace.postcard cannot encode {_show(tp)}: {exc}") from None
        for enum_cls in compiler.enums:
            enum_cls.__rapace_sealed__ = True
        for key, value in compiler.local.items():
            cache.setdefault(key, value)
        return node


def _hashable_key(tp: Any) -> bool:
    try:
        hash(tp)
    except TypeError:
        return False
    return True


class _Compiler:
    """One ``codec_for`` compilation: new nodes stay local until all of it succeeds."""

    def __init__(self, impl: ModuleType, cache: dict[Any, Any]) -> None:
        self.impl = impl
        self.cache = cache
        self.local: dict[Any, Any] = {}
        self.enums: list[type[DataEnum]] = []
        self.aliases: set[int] = set()

    def node(self, tp: Any) -> Any:
        hashable = _hashable_key(tp)
        if hashable:
            found = self.local.get(tp)
            if found is None:
                found = self.cache.get(tp)
            if found is not None:
                return found
        node = self.build(tp)
        if hashable:
            self.local[tp] = node
        return node

    def build(self, tp: Any) -> Any:
        impl = self.impl
        if tp is None or tp is type(None):
            return impl.Unit("None")
        if tp is bool:
            return impl.Bool("bool")
        if tp is int:
            return impl.Varint("i64", 64, True)
        if tp is float:
            return impl.F64("f64")
        if tp is str:
            return impl.Str("str")
        if tp is bytes:
            return impl.Bytes("bytes")
        if isinstance(tp, str | typing.ForwardRef):
            raise TypeError(f"unresolved forward reference {tp!r}: pass the type itself")
        if isinstance(tp, typing.NewType):
            return self.node(tp.__supertype__)
        if type(tp).__name__ == "TypeAliasType" and hasattr(tp, "__value__"):
            if id(tp) in self.aliases:
                raise TypeError(f"recursive type alias {tp!r}: use a dataclass")
            self.aliases.add(id(tp))
            try:
                return self.node(tp.__value__)
            finally:
                self.aliases.discard(id(tp))
        origin = get_origin(tp)
        args = get_args(tp)
        if origin is Annotated:
            return self.annotated(tp)
        if origin is typing.Union or origin is types.UnionType:
            return self.union(tp, args)
        if origin is list:
            if len(args) != 1:
                raise TypeError(f"{_show(tp)}: list needs one item type")
            item = self.node(args[0])
            return impl.Seq(f"list[{item.name}]", item, False)
        if origin is tuple:
            return self.tuple(tp, args)
        if origin is dict:
            if len(args) != 2:
                raise TypeError(f"{_show(tp)}: dict needs a key and a value type")
            key = self.node(args[0])
            if not self.hashable(key):
                raise TypeError(f"{_show(args[0])} cannot be a dict key (not hashable)")
            value = self.node(args[1])
            return impl.Map(f"dict[{key.name}, {value.name}]", key, value)
        if origin is not None:
            raise TypeError(f"unsupported type {_show(tp)}")
        if tp in (list, tuple, dict):
            raise TypeError(f"{tp.__name__} needs its item types ({tp.__name__}[...])")
        if isinstance(tp, type):
            if issubclass(tp, DataEnum) and DataEnum in tp.__bases__:
                return self.data_enum(tp)
            if issubclass(tp, enum.Enum):
                return self.unit_enum(tp)
            if dataclasses.is_dataclass(tp):
                return self.struct(tp)
        raise TypeError(f"unsupported type {_show(tp)}")

    def annotated(self, tp: Any) -> Any:
        base = tp.__origin__
        markers = [m for m in tp.__metadata__ if isinstance(m, IntWidth | FloatWidth)]
        if not markers:
            return self.node(base)
        if len(markers) > 1:
            raise TypeError(f"{_show(tp)}: more than one width marker")
        marker = markers[0]
        impl = self.impl
        if isinstance(marker, IntWidth):
            if base is not int:
                raise TypeError(f"{_show(tp)}: {marker.name} annotates int, not {_show(base)}")
            if marker.bits == 8:
                return impl.I8(marker.name) if marker.signed else impl.U8(marker.name)
            return impl.Varint(marker.name, marker.bits, marker.signed)
        if base is not float:
            raise TypeError(f"{_show(tp)}: {marker.name} annotates float, not {_show(base)}")
        return impl.F32(marker.name)

    def union(self, tp: Any, args: tuple[Any, ...]) -> Any:
        others = [a for a in args if a is not type(None)]
        if len(others) != 1 or len(args) != 2:
            raise TypeError(
                f"{_show(tp)}: the only union postcard encodes is T | None "
                "(declare Rust-style enums with rapace.DataEnum)"
            )
        inner = self.node(others[0])
        return self.impl.Option(f"{inner.name} | None", inner)

    def tuple(self, tp: Any, args: tuple[Any, ...]) -> Any:
        if args in ((), ((),)):
            return self.impl.Tuple("tuple[()]", ())
        if len(args) == 2 and args[1] is Ellipsis:
            item = self.node(args[0])
            return self.impl.Seq(f"tuple[{item.name}, ...]", item, True)
        if Ellipsis in args:
            raise TypeError(f"{_show(tp)}: ... only as tuple[T, ...]")
        items = tuple(self.node(a) for a in args)
        return self.impl.Tuple(f"tuple[{', '.join(n.name for n in items)}]", items)

    def struct(self, cls: type) -> Any:
        name = cls.__name__
        if cls.__dict__.get("__parameters__"):
            raise TypeError(f"{name}: generic dataclasses are not supported")
        try:
            hints = typing.get_type_hints(cls, include_extras=True)
        except Exception as exc:
            raise TypeError(f"cannot resolve the annotations of {name}: {exc!r}") from None
        for hint in hints.values():
            if isinstance(hint, dataclasses.InitVar) or hint is dataclasses.InitVar:
                raise TypeError(f"{name}: dataclasses with InitVar fields are not supported")
        fields = dataclasses.fields(cls)
        names = tuple(f.name for f in fields)
        node = self.impl.Struct(name, cls, names, getattr(cls, "__post_init__", None))
        self.local[cls] = node  # before the fields: they may refer back to cls
        nodes: list[Any] = []
        for f in fields:
            try:
                nodes.append(self.node(hints[f.name]))
            except TypeError as exc:
                raise TypeError(f"{name}.{f.name}: {exc}") from None
        node.set_fields(tuple(nodes))
        return node

    def unit_enum(self, cls: type[enum.Enum]) -> Any:
        if issubclass(cls, enum.Flag):
            raise TypeError(f"{cls.__name__}: enum.Flag is a bit set, not a Rust enum")
        members = tuple(cls)
        if not members:
            raise TypeError(f"{cls.__name__}: an enum without members")
        return self.impl.UnitEnum(cls.__name__, cls, members)

    def data_enum(self, cls: type[DataEnum]) -> Any:
        name = cls.__name__
        variants = list(cls.__rapace_variants__)
        if not variants:
            raise TypeError(f"{name}: a DataEnum without variants")
        node = self.impl.DataEnum(name, cls)
        self.local[cls] = node  # before the variants: they may refer back to cls
        nodes: list[Any] = []
        for variant in variants:
            if not dataclasses.is_dataclass(variant):
                raise TypeError(f"{name}: variant {variant.__name__} is not a dataclass")
            nodes.append(self.node(variant))
        node.set_variants(tuple(nodes))
        self.enums.append(cls)
        return node

    def hashable(self, node: Any) -> bool:
        impl = self.impl
        if isinstance(node, impl.Seq):
            return bool(node.as_tuple) and self.hashable(node.item)
        if isinstance(node, impl.Map):
            return False
        if isinstance(node, impl.Tuple):
            return all(self.hashable(n) for n in node.items)
        if isinstance(node, impl.Option):
            return self.hashable(node.inner)
        if isinstance(node, impl.Struct):
            return node.cls.__hash__ is not None
        if isinstance(node, impl.DataEnum):
            return all(v.cls.__hash__ is not None for v in node.variants) or not node.variants
        return True
