"""Definition time: what a ``@service`` class's methods are on the wire.

Method ids follow ``docs/protocol.md`` §8 (``"Service.method"``, the service name being the
class name unless given); payloads are postcard (section 9): no argument is an empty
payload, one is that value, several are their tuple. Everything a call needs (ids,
codecs) is computed when the class is decorated, so an id collision, an id of 0 or a type
the codec cannot encode fails there, not at the first call.

A method declared ``-> rapace.Tunnel`` (no parameters) is a named tunnel (``rapace.named``):
opened by ``"Service.method"`` with ``OpenChannel``, never called by its method id.
"""

from __future__ import annotations

import collections.abc
import inspect
import typing
from dataclasses import dataclass
from typing import Any

from rapace import postcard
from rapace.method_id import compute_method_id
from rapace.tunnel import TunnelStream

__all__ = ["MethodInfo", "ServiceInfo", "define_service", "service_info"]

_STREAM_ORIGINS = (
    collections.abc.AsyncIterator,
    collections.abc.AsyncIterable,
    collections.abc.AsyncGenerator,
)


@dataclass(frozen=True)
class MethodInfo:
    """One method of a service: its id, codecs and shape, fixed at definition time."""

    name: str
    full_name: str
    """``Service.method``: how errors and logs name it."""
    method_id: int
    param_names: tuple[str, ...]
    args_codec: Any  # a postcard codec for the argument tuple, value, or None (no args)
    result_codec: Any  # the result's (or a stream item's) codec
    streaming: bool
    signature: inspect.Signature
    tunnel: bool = False
    """Declared ``-> rapace.Tunnel``: a named tunnel, opened by ``full_name``."""
    arg_types: tuple[Any, ...] = ()
    """The parameters' resolved type hints, in order (``python -m rapace call`` reads them)."""
    result_type: Any = None
    """The result's (or a stream item's) resolved type hint."""

    def encode_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        if kwargs or len(args) != len(self.param_names):
            bound = self.signature.bind(None, *args, **kwargs)  # None stands for self
            bound.apply_defaults()  # a parameter's default is sent: the server needs a value
            args = tuple(bound.arguments[name] for name in self.param_names)
        if self.args_codec is None:
            return b""
        value = args[0] if len(args) == 1 else args
        return self.args_codec.dumps(value)  # type: ignore[no-any-return]

    def decode_args(self, payload: bytes) -> tuple[Any, ...]:
        if self.args_codec is None:
            if payload:
                raise postcard.PostcardError(
                    f"{self.name}() takes no arguments, got {len(payload)} payload bytes"
                )
            return ()
        value = self.args_codec.loads(payload)
        return (value,) if len(self.param_names) == 1 else tuple(value)


@dataclass(frozen=True)
class ServiceInfo:
    """A service: its name and methods (``@service`` stores it as ``__rapace_service__``)."""

    name: str
    methods: dict[str, MethodInfo]
    by_id: dict[int, MethodInfo]


def define_service(cls: type, service_name: str) -> ServiceInfo:
    """The ``ServiceInfo`` of a class's ``async def`` methods, checked."""
    methods: dict[str, MethodInfo] = {}
    by_id: dict[int, MethodInfo] = {}
    for attr, func in vars(cls).items():
        if attr.startswith("_") or not callable(func):
            continue
        if (
            not inspect.iscoroutinefunction(func)
            and not inspect.isasyncgenfunction(func)
            and not _declares_stream(func)
        ):
            raise TypeError(
                f"{service_name}.{attr} must be declared with 'async def' "
                "(or 'def ... -> AsyncIterator[T]' for a streaming method)"
            )
        method = _define_method(cls, service_name, attr, func)
        clash = by_id.get(method.method_id)
        if clash is not None:
            raise TypeError(
                f"{service_name}.{attr} and {service_name}.{clash.name} have the same "
                f"method id {method.method_id:#010x}; rename one of them"
            )
        methods[attr] = method
        by_id[method.method_id] = method
    if not methods:
        raise TypeError(f"service {service_name} declares no 'async def' methods")
    return ServiceInfo(service_name, methods, by_id)


def _declares_stream(func: Any) -> bool:
    """A plain ``def`` annotated ``-> AsyncIterator[T]``: a streaming method declared the
    way both its client (``async for``) and an ``async def ... yield`` implementation
    type-check."""
    try:
        hints = typing.get_type_hints(func)
    except Exception:
        return False
    return typing.get_origin(hints.get("return")) in _STREAM_ORIGINS


def _define_method(cls: type, service_name: str, name: str, func: Any) -> MethodInfo:
    where = f"{service_name}.{name}"
    method_id = compute_method_id(service_name, name)
    if method_id == 0:
        raise TypeError(f"{where} hashes to method id 0, which is reserved; rename it")
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception as exc:
        raise TypeError(f"{where}: cannot resolve its type hints: {exc}") from exc
    signature = inspect.signature(func)
    params = list(signature.parameters.values())[1:]  # drop self
    for param in params:
        if param.name == "timeout":
            raise TypeError(
                f"{where}: a parameter named 'timeout' would clash with the client's "
                "per-call timeout= keyword; rename it"
            )
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"{where}: parameter {param.name!r} must be a plain positional one")
        if param.name not in hints:
            raise TypeError(f"{where}: parameter {param.name!r} needs a type annotation")
    if "return" not in hints:
        raise TypeError(f"{where} needs a return annotation (-> None for no result)")
    arg_types = [hints[p.name] for p in params]
    result_type = hints["return"]
    if result_type is TunnelStream:
        if params:
            raise TypeError(
                f"{where}: a tunnel method takes no parameters (send metadata when opening)"
            )
        return MethodInfo(
            name=name,
            full_name=where,
            method_id=method_id,
            param_names=(),
            args_codec=None,
            result_codec=None,
            streaming=False,
            signature=signature,
            tunnel=True,
        )
    streaming = typing.get_origin(result_type) in _STREAM_ORIGINS
    if streaming:
        item_args = typing.get_args(result_type)  # AsyncGenerator[T, None] has two
        result_type = item_args[0] if item_args else None
        if result_type is None:
            raise TypeError(f"{where}: a streaming method needs an item type: AsyncIterator[T]")
    try:
        if not arg_types:
            args_codec = None
        elif len(arg_types) == 1:
            args_codec = postcard.codec_for(arg_types[0])
        else:
            args_codec = postcard.codec_for(tuple[tuple(arg_types)])  # type: ignore[misc]
        result_codec = postcard.codec_for(result_type)
    except TypeError as exc:
        raise TypeError(f"{where}: {exc}") from exc
    for param, arg_type in zip(params, arg_types, strict=True):
        if param.default is param.empty:
            continue
        try:  # a default the codec cannot encode would fail at the first call that omits it
            postcard.codec_for(arg_type).dumps(param.default)
        except Exception as exc:
            raise TypeError(
                f"{where}: the default of {param.name!r} ({param.default!r}) cannot be "
                f"encoded as its type: {exc}"
            ) from exc
    return MethodInfo(
        name=name,
        full_name=where,
        method_id=method_id,
        param_names=tuple(p.name for p in params),
        args_codec=args_codec,
        result_codec=result_codec,
        streaming=streaming,
        signature=signature,
        arg_types=tuple(arg_types),
        result_type=result_type,
    )


def service_info(obj: object) -> list[ServiceInfo]:
    """The services a class or instance declares or implements (its ``@service`` bases)."""
    cls = obj if isinstance(obj, type) else type(obj)
    found: list[ServiceInfo] = []
    for base in cls.__mro__:
        info = vars(base).get("__rapace_service__")
        if isinstance(info, ServiceInfo) and info not in found:
            found.append(info)
    return found
