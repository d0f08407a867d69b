"""JSON values to and from the Python values a service's type hints describe: what
``python -m rapace call`` sends and prints, so that a method can be called from a shell.

The mapping follows serde_json's for the same Rust types, so the JSON a Rust or
TypeScript peer would log reads the same here:

=========================  ==============================================================
type hint                  JSON
=========================  ==============================================================
``bool``, ``str``           themselves
``int``, ``rapace.u32``…    a number (the width is checked when the payload is encoded)
``float``, ``rapace.f32``   a number (an integer is accepted)
``bytes``                   an array of byte values ``[1, 2]``, or ``{"base64": "AQI="}``
``T | None``                ``null`` or the value
``list[T]``, ``tuple``      an array
``dict[K, V]``              an object (keys are strings in JSON: converted to ``K``)
a dataclass                 an object of its fields
an ``enum.Enum``            the member's name: ``"Red"``
a ``rapace.DataEnum``       ``{"Variant": {fields}}``; a variant without fields: ``"Variant"``
=========================  ==============================================================
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import types
import typing
from typing import Annotated, Any, get_args, get_origin

from rapace.types import DataEnum

__all__ = ["from_json", "to_json"]


def from_json(value: Any, tp: Any, where: str = "value") -> Any:
    """The Python value of type ``tp`` for the decoded JSON ``value``; ``ValueError``
    naming ``where`` (a path such as ``args.point.x``) when it does not fit."""
    if isinstance(tp, typing.NewType):
        return from_json(value, tp.__supertype__, where)
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Annotated:
        return from_json(value, tp.__origin__, where)
    if tp is None or tp is type(None):
        if value is not None:
            raise ValueError(f"{where}: expected null, got {value!r}")
        return None
    if origin is typing.Union or origin is types.UnionType:
        inner = next(a for a in args if a is not type(None))
        return None if value is None else from_json(value, inner, where)
    if tp is bool:
        return _expect(value, bool, where)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        return _expect(value, str, where)
    if tp is bytes:
        if isinstance(value, dict) and set(value) == {"base64"}:
            return base64.b64decode(_expect(value["base64"], str, f"{where}.base64"))
        items = _expect(value, list, where)
        try:
            return bytes(items)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: expected byte values 0..255: {exc}") from None
    if origin is list:
        return [from_json(v, args[0], f"{where}[{i}]") for i, v in enumerate(_list(value, where))]
    if origin is tuple:
        items = _list(value, where)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_json(v, args[0], f"{where}[{i}]") for i, v in enumerate(items))
        if args == ((),):
            args = ()
        if len(items) != len(args):
            raise ValueError(f"{where}: expected {len(args)} items, got {len(items)}")
        return tuple(
            from_json(v, t, f"{where}[{i}]")
            for i, (v, t) in enumerate(zip(items, args, strict=True))
        )
    if origin is dict:
        obj = _expect(value, dict, where)
        key_type, value_type = args
        return {
            _key(k, key_type, where): from_json(v, value_type, f"{where}.{k}")
            for k, v in obj.items()
        }
    if isinstance(tp, type) and issubclass(tp, DataEnum) and DataEnum in tp.__bases__:
        variants = {v.__name__: v for v in tp.__rapace_variants__}
        fields: Any
        if isinstance(value, str):
            name, fields = value, {}
        elif isinstance(value, dict) and len(value) == 1:
            ((name, fields),) = value.items()
        else:
            raise ValueError(f'{where}: expected {{"Variant": {{...}}}} for {tp.__name__}')
        if name not in variants:
            raise ValueError(
                f"{where}: {tp.__name__} has no variant {name!r} ({', '.join(variants)})"
            )
        return _struct(fields, variants[name], f"{where}.{name}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        name = _expect(value, str, where)
        try:
            return tp[name]
        except KeyError:
            names = ", ".join(m.name for m in tp)
            raise ValueError(f"{where}: {tp.__name__} has no member {name!r} ({names})") from None
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _struct(value, tp, where)
    raise ValueError(f"{where}: cannot convert JSON to {tp!r}")


def _struct(value: Any, cls: type, where: str) -> Any:
    if isinstance(value, list):  # a tuple variant / tuple struct, as serde writes them
        fields = dataclasses.fields(cls)
        if len(value) != len(fields):
            raise ValueError(f"{where}: expected {len(fields)} fields, got {len(value)}")
        value = {f.name: v for f, v in zip(fields, value, strict=True)}
    obj = _expect(value, dict, where)
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = set(obj) - set(names)
    if unknown:
        raise ValueError(f"{where}: {cls.__name__} has no field {sorted(unknown)[0]!r}")
    missing = [n for n in names if n not in obj]
    if missing:
        raise ValueError(f"{where}: {cls.__name__} needs {', '.join(map(repr, missing))}")
    return cls(**{n: from_json(obj[n], hints[n], f"{where}.{n}") for n in names})


def _key(text: str, tp: Any, where: str) -> Any:
    base = tp.__origin__ if get_origin(tp) is Annotated else tp
    if base is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{where}: key {text!r} is not an integer") from None
    return from_json(text, tp, f"{where} key")


def _list(value: Any, where: str) -> list[Any]:
    return _expect(value, list, where)  # type: ignore[no-any-return]


def _expect(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = {bool: "true or false", str: "a string", list: "an array", dict: "an object"}
        raise ValueError(f"{where}: expected {names.get(kind, kind.__name__)}, got {value!r}")
    return value


def to_json(value: Any) -> Any:
    """A decoded value as JSON-ready data (the inverse of ``from_json``)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return list(bytes(value))
    if isinstance(value, DataEnum) and dataclasses.is_dataclass(value):
        fields = {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {type(value).__name__: fields} if fields else type(value).__name__
    if isinstance(value, enum.Enum):
        return value.name
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(to_json(k)): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    raise TypeError(f"cannot show {type(value).__name__} as JSON")
