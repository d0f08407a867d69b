"""Typed services: declare a service once with type hints, get a client and a server router.

```python
@rapace.service
class Calculator:
    async def add(self, a: rapace.i32, b: rapace.i32) -> rapace.i32: ...
    async def countdown(self, start: rapace.u32) -> AsyncIterator[rapace.u32]: ...

class CalculatorImpl(Calculator):          # server side
    async def add(self, a, b): return a + b
    async def countdown(self, start):
        for i in range(start, 0, -1):
            yield i

rapace.register_services(server_session, CalculatorImpl())
calc = rapace.client(Calculator, client_session)   # typed as Calculator
assert await calc.add(2, 3) == 5
async for n in await calc.countdown(3): ...
```

Method ids follow WIRE.md section 8 (``"Service.method"``, the service name being the class
name unless given); payloads are postcard (section 9): no argument is an empty payload,
one is that value, several are their tuple. Everything a call needs (ids, codecs) is
computed when the class is decorated, so an id collision, an id of 0 or a type the codec
cannot encode fails there, not at the first call.

Server streaming (a method annotated ``-> AsyncIterator[T]``): items go out as ``DATA``
frames on the call's channel, the end as an ``EOS`` frame without payload, a failure as
one ``ERROR|EOS`` frame. **Extension:** a client that stops iterating early sends a
``CANCEL`` frame on the channel, and the server stops the generator (a Rust server
ignores it and finishes the stream, whose remaining items the client drops).
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import inspect
import logging
import typing
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

from rapace import postcard
from rapace.errors import (
    DeadlineExceeded,
    InvalidArgument,
    RpcError,
    Unimplemented,
    encode_error_payload,
    parse_error_payload,
)
from rapace.flags import FrameFlags
from rapace.method_id import compute_method_id
from rapace.session import error_status

if TYPE_CHECKING:
    from rapace._frame_py import Frame
    from rapace.session import RpcSession
    from rapace.tunnel import TunnelReceiver

__all__ = ["MethodInfo", "ServiceInfo", "ServiceRouter", "client", "register_services", "service"]

logger = logging.getLogger("rapace")

T = TypeVar("T")
C = TypeVar("C", bound=type)

_STREAM_ORIGINS = (
    collections.abc.AsyncIterator,
    collections.abc.AsyncIterable,
    collections.abc.AsyncGenerator,
)
_EOS = int(FrameFlags.EOS)
_ERROR = int(FrameFlags.ERROR)
_CANCEL = int(FrameFlags.CANCEL)


@dataclass(frozen=True)
class MethodInfo:
    """One method of a service: its id, codecs and shape, fixed at definition time."""

    name: str
    method_id: int
    param_names: tuple[str, ...]
    args_codec: Any  # a postcard codec for the argument tuple, value, or None (no args)
    result_codec: Any  # the result's (or a stream item's) codec
    streaming: bool
    signature: inspect.Signature

    def encode_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        if kwargs or len(args) != len(self.param_names):
            bound = self.signature.bind(None, *args, **kwargs)  # None stands for self
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


@overload
def service(cls: C, /) -> C: ...
@overload
def service(*, name: str | None = None) -> Callable[[C], C]: ...
def service(cls: C | None = None, /, *, name: str | None = None) -> C | Callable[[C], C]:
    """Declare a service: every ``async def`` of the class (not starting with ``_``) is a method.

    The declared bodies are replaced by stubs raising ``Unimplemented``; implement the
    service by subclassing it.
    """

    def decorate(cls: C) -> C:
        info = _define(cls, name or cls.__name__)
        cls.__rapace_service__ = info  # type: ignore[attr-defined]
        for method in info.methods.values():
            setattr(cls, method.name, _unimplemented_stub(info.name, method))
        return cls

    return decorate(cls) if cls is not None else decorate


def _define(cls: type, service_name: str) -> ServiceInfo:
    methods: dict[str, MethodInfo] = {}
    by_id: dict[int, MethodInfo] = {}
    for attr, func in vars(cls).items():
        if attr.startswith("_") or not callable(func):
            continue
        if not inspect.iscoroutinefunction(func) and not inspect.isasyncgenfunction(func):
            raise TypeError(f"{service_name}.{attr} must be declared with 'async def'")
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
    return MethodInfo(
        name=name,
        method_id=method_id,
        param_names=tuple(p.name for p in params),
        args_codec=args_codec,
        result_codec=result_codec,
        streaming=streaming,
        signature=signature,
    )


def _unimplemented_stub(service_name: str, method: MethodInfo) -> Any:
    message = f"{service_name}.{method.name} is not implemented"
    if method.streaming:

        async def stream_stub(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            raise Unimplemented(message)
            yield  # an async generator, like the implementations it stands for

        return stream_stub

    async def stub(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise Unimplemented(message)

    return stub


def service_info(obj: object) -> list[ServiceInfo]:
    """The services a class or instance declares or implements (its ``@service`` bases)."""
    cls = obj if isinstance(obj, type) else type(obj)
    found: list[ServiceInfo] = []
    for base in cls.__mro__:
        info = vars(base).get("__rapace_service__")
        if isinstance(info, ServiceInfo) and info not in found:
            found.append(info)
    return found


# -- server side ---------------------------------------------------------------------------


class ServiceRouter:
    """A session dispatcher that routes requests to service implementations by method id."""

    def __init__(self, session: RpcSession) -> None:
        self._session = session
        self._routes: dict[int, tuple[MethodInfo, Any]] = {}
        self._cancel_listeners: dict[int, TunnelReceiver] = {}

    def add(self, implementation: object) -> None:
        """Serve every service ``implementation`` subclasses; an id served twice is refused."""
        infos = service_info(implementation)
        if not infos:
            raise TypeError(f"{type(implementation).__name__} implements no @rapace.service class")
        for info in infos:
            for method in info.methods.values():
                if method.method_id in self._routes:
                    raise ValueError(
                        f"method id {method.method_id:#010x} ({info.name}.{method.name}) "
                        "is already served on this session"
                    )
                self._routes[method.method_id] = (method, getattr(implementation, method.name))

    def prepare(self, request: Frame) -> None:
        """Called by the session as the request is routed, before its handler task starts:
        a streaming call starts listening for the client's CANCEL here, so a CANCEL routed
        in the same batch as the request is not lost."""
        desc = request.desc
        route = self._routes.get(desc.method_id)
        channel_id = desc.channel_id
        if route is None or not route[0].streaming or not channel_id:
            return
        with contextlib.suppress(ValueError):  # the channel is taken: no CANCEL listening
            self._cancel_listeners[channel_id] = self._session.register_tunnel(channel_id)

    async def __call__(self, request: Frame) -> Frame | bytes:
        desc = request.desc
        route = self._routes.get(desc.method_id)
        if route is None:
            raise Unimplemented(f"unknown method_id: {desc.method_id}")
        method, handler = route
        if not method.streaming:
            try:
                args = method.decode_args(request.payload)
            except postcard.PostcardError as exc:
                raise InvalidArgument(f"{method.name}: {exc}") from exc
            result = await handler(*args)
            return method.result_codec.dumps(result)  # type: ignore[no-any-return]
        cancels = self._cancel_listeners.pop(desc.channel_id, None)
        try:
            try:
                args = method.decode_args(request.payload)
            except postcard.PostcardError as exc:
                raise InvalidArgument(f"{method.name}: {exc}") from exc
            await self._stream(desc.channel_id, method, handler(*args), cancels)
        finally:
            if cancels is not None:
                cancels.close()
        return b""  # the request is NO_REPLY: the session sends nothing more

    async def _stream(
        self, channel_id: int, method: MethodInfo, items: Any, cancels: TunnelReceiver | None
    ) -> None:
        session = self._session
        producer = asyncio.current_task()
        watcher = (
            asyncio.get_running_loop().create_task(_watch_cancel(cancels, producer))
            if cancels is not None and producer is not None
            else None
        )
        try:
            if inspect.isawaitable(items):  # an `async def` returning an iterator
                items = await items
            async with contextlib.aclosing(items):
                async for item in items:
                    await session.send_chunk(channel_id, method.result_codec.dumps(item))
            await session.send_response(_end_frame(session, channel_id))
        except asyncio.CancelledError:
            if producer is None or not _cancelled_by_client(watcher):
                raise
            producer.uncancel()
            logger.debug("stream on channel %d cancelled by the client", channel_id)
        except Exception as exc:
            if session.is_closed:
                return
            if not isinstance(exc, RpcError):
                logger.error("stream handler %s failed", method.name, exc_info=exc)
            code, message = error_status(exc)
            with contextlib.suppress(RpcError, ConnectionError):
                await session.send_response(_stream_error_frame(session, channel_id, code, message))
        finally:
            if watcher is not None:
                watcher.cancel()


async def _watch_cancel(cancels: TunnelReceiver, producer: asyncio.Task[Any]) -> bool:
    """Cancel ``producer`` when the client's CANCEL arrives; True if it did."""
    async for chunk in cancels:
        if chunk.frame.desc.flags & _CANCEL:
            producer.cancel()
            return True
    return False


def _cancelled_by_client(watcher: asyncio.Task[bool] | None) -> bool:
    """True only if the watcher saw the client's CANCEL (not a session shutting down)."""
    return (
        watcher is not None
        and watcher.done()
        and not watcher.cancelled()
        and watcher.exception() is None
        and watcher.result()
    )


def _end_frame(session: RpcSession, channel_id: int) -> Frame:
    return session._build_frame(session.next_msg_id(), channel_id, 0, _EOS, b"")


def _stream_error_frame(session: RpcSession, channel_id: int, code: int, message: str) -> Frame:
    return session._build_frame(
        session.next_msg_id(), channel_id, 0, _ERROR | _EOS, encode_error_payload(code, message)
    )


def register_services(session: RpcSession, *implementations: object) -> ServiceRouter:
    """Serve ``implementations`` on ``session`` (several services on one session)."""
    router = ServiceRouter(session)
    for implementation in implementations:
        router.add(implementation)
    session.set_dispatcher(router)
    return router


# -- client side ---------------------------------------------------------------------------


def client(service_cls: type[T], session: RpcSession, *, timeout: float | None = None) -> T:
    """A client for ``service_cls`` on ``session``, typed as the service class itself.

    Unary methods: ``await calc.add(2, 3)``. Streaming methods: ``await calc.countdown(3)``
    gives an async iterator of items that raises the server's error if the stream fails.
    Each method also takes ``timeout=`` (seconds) at run time; ``timeout`` here sets the
    default for every call.
    """
    info = vars(service_cls).get("__rapace_service__")
    if not isinstance(info, ServiceInfo):
        raise TypeError(f"{service_cls.__name__} is not a @rapace.service class")
    namespace: dict[str, Any] = {"__slots__": ("_session", "_timeout")}
    for method in info.methods.values():
        namespace[method.name] = (
            _stream_method(method) if method.streaming else _unary_method(method)
        )
    client_cls = type(f"{service_cls.__name__}Client", (service_cls,), namespace)
    instance: Any = object.__new__(client_cls)
    instance._session = session
    instance._timeout = timeout
    return instance  # type: ignore[no-any-return]


def _unary_method(method: MethodInfo) -> Any:
    method_id = method.method_id
    decode = method.result_codec.loads

    async def call(self: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        session = self._session
        payload = method.encode_args(args, kwargs)
        response = await session.call(
            session.next_channel_id(),
            method_id,
            payload,
            timeout=timeout if timeout is not None else self._timeout,
        )
        return decode(response.payload)

    call.__name__ = call.__qualname__ = method.name
    return call


def _stream_method(method: MethodInfo) -> Any:
    async def start(
        self: Any, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> ItemStream:
        session = self._session
        receiver = await session.start_streaming_call(
            method.method_id, method.encode_args(args, kwargs)
        )
        return ItemStream(
            session, receiver, method, timeout if timeout is not None else self._timeout
        )

    start.__name__ = start.__qualname__ = method.name
    return start


class ItemStream:
    """The items of a server-streaming call, decoded.

    ``timeout`` (seconds) bounds each wait for the next item, not the whole stream: a
    live stream may run for as long as it keeps producing. ``aclose()`` (or leaving an
    ``async with``, or dropping the stream) stops it early and tells the server.
    """

    def __init__(
        self,
        session: RpcSession,
        receiver: TunnelReceiver,
        method: MethodInfo,
        timeout: float | None = None,
    ) -> None:
        self._session = session
        self._receiver = receiver
        self._method = method
        self._decode = method.result_codec.loads
        self._timeout = timeout
        self._done = False

    def __aiter__(self) -> ItemStream:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        if self._timeout is None:
            chunk = await self._receiver.recv()
        else:
            try:
                async with asyncio.timeout(self._timeout):
                    chunk = await self._receiver.recv()
            except TimeoutError:
                self._stop()
                raise DeadlineExceeded(
                    f"{self._method.name}: no stream item within {self._timeout:g} s"
                ) from None
        if chunk is None:
            self._done = True
            raise StopAsyncIteration
        if chunk.is_error:
            self._done = True
            raise parse_error_payload(chunk.payload)
        if chunk.payload or not chunk.is_eos:
            if chunk.is_eos:
                self._done = True  # a DATA|EOS frame with a payload is the last item
            return self._decode(chunk.payload)
        self._done = True
        raise StopAsyncIteration

    def _stop(self) -> None:
        """Stop receiving and send the server a CANCEL, without awaiting."""
        if self._done:
            return
        self._done = True
        self._receiver.close()
        session = self._session
        session._send_soon(
            session._build_frame(
                session.next_msg_id(), self._receiver.channel_id, 0, _CANCEL | _EOS, b""
            )
        )

    async def aclose(self) -> None:
        """Stop early: stop receiving and tell the server (CANCEL)."""
        self._stop()

    async def __aenter__(self) -> ItemStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped mid-stream (e.g. `break` out of `async for`): unread items must not
        # fill the receiver and stall the connection.
        if not getattr(self, "_done", True):
            try:
                self._stop()
            except Exception:  # interpreter shutdown or a loop already gone
                logger.debug("stream dropped during shutdown", exc_info=True)
