"""Wire types for postcard payloads (``docs/protocol.md`` §9), and the codec's error.

Integer widths and ``f32`` are ``typing.Annotated`` aliases, so type checkers see plain
``int`` / ``float`` while ``rapace.postcard`` reads the marker::

    @dataclass
    class Point:
        x: rapace.i32
        y: rapace.i32
        label: str

Plain ``int`` is ``i64`` and plain ``float`` is ``f64``.

Rust enums that carry data are declared with :class:`DataEnum`: the enum is a direct
subclass of ``DataEnum`` and each variant is a dataclass that directly subclasses the
enum. The variant index on the wire is the order in which the variants are defined::

    class Shape(rapace.DataEnum):        # enum Shape {
        pass

    @dataclass
    class Circle(Shape):                 #     Circle { radius: f64 },   // index 0
        radius: float

    @dataclass
    class Rect(Shape):                   #     Rect(f64, f64),           // index 1
        w: float
        h: float

    @dataclass
    class Empty(Shape):                  #     Empty,                    // index 2
        pass                             # }

Struct, tuple and newtype variants have the same bytes (the index, then the fields in
order), so one dataclass shape covers all of them. The variant list is fixed once a codec
uses the enum: defining a variant after that is a ``TypeError``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Final, TypeAlias

__all__ = [
    "DataEnum",
    "FloatWidth",
    "IntWidth",
    "PostcardError",
    "f32",
    "i8",
    "i16",
    "i32",
    "i64",
    "u8",
    "u16",
    "u32",
    "u64",
]


class IntWidth:
    """The marker in ``Annotated[int, ...]`` that gives an integer its wire width."""

    __slots__ = ("bits", "max", "min", "name", "signed")

    def __init__(self, name: str, bits: int, signed: bool) -> None:
        self.name: Final = name
        self.bits: Final = bits
        self.signed: Final = signed
        self.min: Final = -(1 << (bits - 1)) if signed else 0
        self.max: Final = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1

    def __repr__(self) -> str:
        return f"rapace.{self.name}"


class FloatWidth:
    """The marker in ``Annotated[float, ...]`` that makes a float 4 bytes (``f32``)."""

    __slots__ = ("bits", "name")

    def __init__(self, name: str, bits: int) -> None:
        self.name: Final = name
        self.bits: Final = bits

    def __repr__(self) -> str:
        return f"rapace.{self.name}"


U8: Final = IntWidth("u8", 8, signed=False)
U16: Final = IntWidth("u16", 16, signed=False)
U32: Final = IntWidth("u32", 32, signed=False)
U64: Final = IntWidth("u64", 64, signed=False)
I8: Final = IntWidth("i8", 8, signed=True)
I16: Final = IntWidth("i16", 16, signed=True)
I32: Final = IntWidth("i32", 32, signed=True)
I64: Final = IntWidth("i64", 64, signed=True)
F32: Final = FloatWidth("f32", 32)

u8: TypeAlias = Annotated[int, U8]
u16: TypeAlias = Annotated[int, U16]
u32: TypeAlias = Annotated[int, U32]
u64: TypeAlias = Annotated[int, U64]
i8: TypeAlias = Annotated[int, I8]
i16: TypeAlias = Annotated[int, I16]
i32: TypeAlias = Annotated[int, I32]
i64: TypeAlias = Annotated[int, I64]
f32: TypeAlias = Annotated[float, F32]


class DataEnum:
    """Base of a Rust-style enum with data (see the module docstring).

    ``class E(DataEnum)`` declares the enum; ``@dataclass class V(E)`` declares its next
    variant. Variants cannot be subclassed, and no variant may be added once a codec has
    been built for the enum.
    """

    __rapace_enum__: ClassVar[type[DataEnum] | None] = None
    __rapace_variants__: ClassVar[list[type[DataEnum]]]
    __rapace_sealed__: ClassVar[bool]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if DataEnum in cls.__bases__:
            if len([b for b in cls.__bases__ if issubclass(b, DataEnum)]) != 1:
                raise TypeError(f"{cls.__qualname__}: an enum derives from DataEnum only once")
            cls.__rapace_enum__ = None
            cls.__rapace_variants__ = []
            cls.__rapace_sealed__ = False
            return
        parents = [b for b in cls.__bases__ if issubclass(b, DataEnum)]
        if len(parents) != 1 or parents[0].__rapace_enum__ is not None:
            raise TypeError(
                f"{cls.__qualname__}: a DataEnum variant must directly subclass exactly one "
                "enum (variants cannot be subclassed)"
            )
        enum_cls = parents[0]
        variants = enum_cls.__rapace_variants__
        for i, old in enumerate(variants):
            if old.__name__ == cls.__name__ and old.__module__ == cls.__module__:
                # The same variant again: @dataclass(slots=True) recreates the class
                # (its __qualname__ is only restored after this hook has run).
                if enum_cls.__rapace_sealed__ and old is not cls:
                    raise TypeError(
                        f"{cls.__qualname__}: the variants of {enum_cls.__qualname__} are "
                        "fixed once a codec uses it"
                    )
                variants[i] = cls
                break
        else:
            if enum_cls.__rapace_sealed__:
                raise TypeError(
                    f"{cls.__qualname__}: the variants of {enum_cls.__qualname__} are fixed "
                    "once a codec uses it"
                )
            variants.append(cls)
        cls.__rapace_enum__ = enum_cls


def _fmt_int(value: int) -> str:
    return str(value) if value.bit_length() <= 256 else f"a {value.bit_length()}-bit integer"


class PostcardError(ValueError):
    """A value that cannot be encoded, or bytes that are not a valid encoding.

    ``type_name`` is the type being encoded or decoded where it failed, ``offset`` the
    byte offset where that value starts (in the input when decoding, in the output when
    encoding), ``path`` where it sits inside the top-level value (``Outer.items[3].x``),
    ``reason`` what is wrong. ``PostcardError(message)`` alone (no type, no offset) is
    for code above the codec that refuses a payload for its own reasons.
    """

    def __init__(
        self,
        reason: str,
        type_name: str | None = None,
        offset: int | None = None,
        decoding: bool = True,
    ) -> None:
        self.reason = reason
        self.type_name = type_name
        self.offset = offset
        self.decoding = decoding
        self.path = ""
        super().__init__(self._message())

    def _message(self) -> str:
        if self.type_name is None:  # raised by hand, e.g. by the service layer
            return self.reason
        verb = "decode" if self.decoding else "encode"
        where = f" (at {self.path})" if self.path else ""
        return f"cannot {verb} {self.type_name}{where} at offset {self.offset}: {self.reason}"

    def _prepend(self, segment: str) -> None:
        """Add one level of the path (``.field``, ``[index]``, ``::Variant``)."""
        self.path = segment + self.path
        self.args = (self._message(),)

    def _root(self, name: str) -> None:
        """Name the top-level type in front of a non-empty path."""
        if self.path:
            self._prepend(name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.reason, self.type_name, self.offset, self.decoding),
            {"path": self.path, "args": self.args},
        )

    def __setstate__(self, state: dict[str, Any] | None) -> None:
        if state:
            self.path = state["path"]
            self.args = state["args"]
