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

What the methods are on the wire is fixed at definition time (``rapace.methods``); a
method annotated ``-> AsyncIterator[T]`` is a server-streaming call (``rapace.streaming``).

A method annotated ``-> rapace.Tunnel`` is a named tunnel (``rapace.named``): the client's
``stream = await svc.shell(metadata=...)`` opens it and returns a ``TunnelStream``; the
implementation takes that stream instead (the override's signature differs on purpose,
hence the ``type: ignore``), and the tunnel is closed when it returns::

    @rapace.service
    class Shell:
        async def shell(self) -> rapace.Tunnel: ...

    class ShellImpl(Shell):
        async def shell(self, tunnel: rapace.Tunnel) -> None:  # type: ignore[override]
            async for data in tunnel:
                tunnel.write(data)
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

from rapace import postcard
from rapace.context import CallContext, CallKind, current_call, current_deadline
from rapace.errors import DeadlineExceeded, InvalidArgument, Unimplemented
from rapace.interceptors import Interceptor, check_interceptors, run_intercepted
from rapace.metadata import MetadataValue, PreparedMetadata, merge_metadata
from rapace.methods import MethodInfo, ServiceInfo, define_service, service_info
from rapace.named import Metadata, TunnelHandler
from rapace.streaming import ItemStream, StreamCall, send_items

if TYPE_CHECKING:
    from rapace._frame_py import Frame
    from rapace.session import RpcSession
    from rapace.tunnel import TunnelReceiver, TunnelStream

__all__ = [
    "ServiceRouter",
    "client",
    "register_services",
    "service",
    "with_metadata",
    "with_timeout",
]

T = TypeVar("T")

SHARED_DEADLINE_SLACK = 0.001
"""Seconds a client's interceptors may take before its call is sent for the call to keep
the session's default deadline (one shared timer for all such calls, instead of a timer
of its own): that deadline then falls at most this much after ``CallContext.deadline``."""
C = TypeVar("C", bound=type)


@overload
def service(cls: C, /) -> C: ...
@overload
def service(*, name: str | None = None) -> Callable[[C], C]: ...
def service(cls: C | None = None, /, *, name: str | None = None) -> C | Callable[[C], C]:
    """Declare a service: every ``async def`` of the class (not starting with ``_``) is a
    method, and so is a plain ``def`` returning ``AsyncIterator[T]`` (a streaming one).

    The declared bodies are replaced by stubs raising ``Unimplemented``; implement the
    service by subclassing it. Declare it as a ``typing.Protocol`` for ``mypy --strict``
    (``...`` bodies are allowed there), streaming methods as plain ``def ... ->
    AsyncIterator[T]`` (an ``async def`` with ``yield`` implements them, and the client's
    ``async for n in calc.countdown(3)`` matches): see ``docs/guide/services.md``.
    """

    def decorate(cls: C) -> C:
        info = define_service(cls, name or cls.__name__)
        cls.__rapace_service__ = info  # type: ignore[attr-defined]
        for method in info.methods.values():
            setattr(cls, method.name, _unimplemented_stub(info.name, method))
        return cls

    return decorate(cls) if cls is not None else decorate


def _unimplemented_stub(service_name: str, method: MethodInfo) -> Any:
    message = f"{service_name}.{method.name} is not implemented"
    if method.streaming:

        async def stream_stub(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            raise Unimplemented(message)
            yield  # an async generator, like the implementations it stands for

        return stream_stub

    async def stub(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise Unimplemented(message)

    stub.__rapace_stub__ = True  # type: ignore[attr-defined]
    return stub


# -- server side ---------------------------------------------------------------------------


class ServiceRouter:
    """A session dispatcher that routes requests to service implementations by method id.

    ``interceptors`` run around every unary and streaming call it serves, the first
    outermost (``rapace.interceptors``); requests for unknown methods and named tunnels
    do not go through them.
    """

    def __init__(
        self, session: RpcSession, *, interceptors: Iterable[Interceptor] | None = None
    ) -> None:
        self._session = session
        self._routes: dict[int, tuple[MethodInfo, Any]] = {}
        self._interceptors = check_interceptors(interceptors)

    @property
    def interceptors(self) -> tuple[Interceptor, ...]:
        """The interceptors around every call served, outermost first."""
        return self._interceptors

    def add_interceptors(self, interceptors: Iterable[Interceptor]) -> None:
        """Add ``interceptors`` inside the ones already there (they run after them)."""
        self._interceptors += check_interceptors(interceptors)

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
                handler = getattr(implementation, method.name)
                self._routes[method.method_id] = (method, handler)
                if method.tunnel and not getattr(handler, "__rapace_stub__", False):
                    # (Not implemented: no handler, so opening it is refused: Unimplemented.)
                    self._session.set_tunnel_handler(method.full_name, _tunnel_handler(handler))
        self._session.name_methods(
            {m.method_id: m.full_name for info in infos for m in info.methods.values()}
        )

    async def __call__(self, request: Frame) -> Frame | bytes:
        desc = request.desc
        route = self._routes.get(desc.method_id)
        if route is None:
            raise Unimplemented(f"unknown method_id: {desc.method_id}")
        method, handler = route
        if method.tunnel:
            raise Unimplemented(f"{method.full_name} is a tunnel: it is opened by name")
        if self._interceptors:
            return await self._intercepted(request, method, handler)
        if not method.streaming:
            try:
                args = method.decode_args(request.payload)
            except postcard.PostcardError as exc:
                raise InvalidArgument(f"{method.full_name}: {exc}") from exc
            result = await handler(*args)
            return method.result_codec.dumps(result)  # type: ignore[no-any-return]
        try:
            args = method.decode_args(request.payload)
        except postcard.PostcardError as exc:
            raise InvalidArgument(f"{method.full_name}: {exc}") from exc
        port = self._session.port
        try:
            await send_items(
                port, desc.channel_id, encode=method.result_codec.dumps, items=handler(*args)
            )
        except Exception:
            if port.is_closed:
                return b""  # nobody to tell
            raise  # the session ends the stream with it, and counts it
        return b""  # the request is NO_REPLY: the session sends nothing more

    async def _intercepted(self, request: Frame, method: MethodInfo, handler: Any) -> bytes:
        """Serve ``request`` inside the interceptors. A streaming call's failure leaves
        here (the interceptors saw it) and the session ends the stream with it."""
        call = current_call()
        payload = request.payload
        if not method.streaming:

            async def unary() -> Any:
                return await handler(*_decode_args(method, payload))

            result = await run_intercepted(self._interceptors, call, unary, serving=True)
            return method.result_codec.dumps(result)  # type: ignore[no-any-return]
        port = self._session.port
        channel_id = request.desc.channel_id

        async def stream() -> None:
            items = handler(*_decode_args(method, payload))
            await send_items(port, channel_id, encode=method.result_codec.dumps, items=items)

        try:
            await run_intercepted(self._interceptors, call, stream, serving=True)
        except Exception:
            if port.is_closed:
                return b""  # nobody to tell
            raise
        return b""


def _decode_args(method: MethodInfo, payload: bytes) -> tuple[Any, ...]:
    try:
        return method.decode_args(payload)
    except postcard.PostcardError as exc:
        raise InvalidArgument(f"{method.full_name}: {exc}") from exc


def _tunnel_handler(implementation: Callable[[TunnelStream], Any]) -> TunnelHandler:
    async def serve(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
        await implementation(stream)  # the metadata is stream.metadata

    return serve


def register_services(
    session: RpcSession,
    *implementations: object,
    interceptors: Iterable[Interceptor] | None = None,
) -> ServiceRouter:
    """Serve ``implementations`` on ``session`` (several services on one session).

    ``interceptors`` run around every call the session's router serves (those of every
    service registered on it, before or after), inside any it already had.

    Called again on the same session, it adds to the services already served (a method
    served twice is a ``ValueError``), so that two parts of a program can each register
    theirs; a session whose dispatcher is not a ``ServiceRouter`` (``set_dispatcher``
    with your own) is refused with ``ValueError`` rather than silently replaced.
    """
    current = session.dispatcher
    if isinstance(current, ServiceRouter) and current._session is session:
        router = current
    elif current is None or getattr(current, "placeholder", False):
        router = ServiceRouter(session, interceptors=interceptors)
        interceptors = None
    else:
        raise ValueError(
            f"this session already has a dispatcher ({current!r}) that is not a "
            "ServiceRouter; register_services would replace it (set_dispatcher(None) first)"
        )
    for implementation in implementations:
        router.add(implementation)
    if interceptors is not None:
        router.add_interceptors(interceptors)
    if router is not current:
        session.set_dispatcher(router)
    return router


# -- client side ---------------------------------------------------------------------------


def client(
    service_cls: Callable[..., T],
    session: RpcSession,
    *,
    timeout: float | None = None,
    metadata: Mapping[str, MetadataValue] | None = None,
    interceptors: Iterable[Interceptor] | None = None,
) -> T:
    """A client for ``service_cls`` on ``session``, typed as the service class itself.

    Unary methods: ``await calc.add(2, 3)``. Streaming methods: ``async for n in
    calc.countdown(3)`` (or ``stream = await calc.countdown(3)``, to hold the stream and
    ``aclose()`` it) iterates the items and raises the server's error if the stream fails.

    ``timeout`` (seconds) is the default deadline of every call of this client. For one
    call, each method takes ``timeout=``: ``await calc.add(2, 3, timeout=1.0)``, which
    mypy accepts with the ``rapace.mypy_plugin`` plugin enabled (the declaration has no
    such parameter); without it, ``rapace.with_timeout(calc, 1.0).add(2, 3)`` type-checks.
    ``service_cls`` is typed as a callable so that a ``typing.Protocol`` declaration (the
    documented, ``mypy --strict``-clean form) is accepted.

    ``metadata`` goes with every unary and streaming call (``rapace.with_metadata(calc,
    {...})``, or ``calc.with_metadata({...})`` at run time, makes a client with more);
    ``interceptors`` run around each of them, the first outermost (``rapace.interceptors``).
    """
    info = vars(service_cls).get("__rapace_service__") if isinstance(service_cls, type) else None
    if not isinstance(info, ServiceInfo):
        raise TypeError(f"{service_cls!r} is not a @rapace.service class")
    assert isinstance(service_cls, type)
    namespace: dict[str, Any] = {"__slots__": ("_options", "_session", "_timeout")}
    for method in info.methods.values():
        if method.tunnel:
            namespace[method.name] = _tunnel_method(method)
        elif method.streaming:
            namespace[method.name] = _stream_method(method)
        else:
            namespace[method.name] = _unary_method(method)
    if "with_metadata" not in namespace:  # (a service's own method of that name wins)
        namespace["with_metadata"] = with_metadata
    client_cls = type(f"{service_cls.__name__}Client", (service_cls,), namespace)
    session.name_methods({m.method_id: m.full_name for m in info.methods.values()})
    instance: Any = object.__new__(client_cls)
    instance._session = session
    instance._timeout = timeout
    instance._options = _CallOptions.make(
        merge_metadata(None, metadata) if metadata is not None else None,
        check_interceptors(interceptors),
    )
    return instance  # type: ignore[no-any-return]


class _CallOptions:
    """What a client adds to its calls: metadata and interceptors (None when neither,
    so that a plain client's call tests one attribute)."""

    __slots__ = ("interceptors", "metadata", "prepared")

    def __init__(
        self, metadata: dict[str, MetadataValue] | None, interceptors: tuple[Interceptor, ...]
    ) -> None:
        self.metadata = metadata
        self.interceptors = interceptors
        # Checked and encoded once, for the calls no interceptor may change it for.
        self.prepared = PreparedMetadata(metadata) if metadata else None

    @classmethod
    def make(
        cls, metadata: dict[str, MetadataValue] | None, interceptors: tuple[Interceptor, ...]
    ) -> _CallOptions | None:
        return cls(metadata, interceptors) if metadata or interceptors else None

    def context(
        self,
        session: RpcSession,
        method: MethodInfo,
        kind: CallKind,
        timeout: float | None,
        now: float,
    ) -> CallContext:
        """The context of one call: its own copy of the metadata, and its deadline (no
        later than that of the call this task serves, as ``session.call`` makes it)."""
        deadline = None
        if kind != "stream":
            delay = session.call_timeout if timeout is None else timeout
            deadline = None if delay == math.inf else now + delay
            served = current_deadline()
            if served is not None and (deadline is None or served < deadline):
                deadline = served
        return CallContext(
            session=session,
            method_id=method.method_id,
            method=method.full_name,
            channel_id=session.next_channel_id(),
            kind=kind,
            deadline=deadline,
            metadata=dict(self.metadata) if self.metadata else {},
        )

    async def unary(
        self, session: RpcSession, method: MethodInfo, payload: bytes, timeout: float | None
    ) -> Any:
        if not self.interceptors:  # metadata alone: no context to build
            response = await session.call(
                session.next_channel_id(),
                method.method_id,
                payload,
                timeout=timeout,
                metadata=self.prepared,
            )
            return method.result_codec.loads(response.payload)
        now = session._time()
        call = self.context(session, method, "unary", timeout, now)
        default = now + session.call_timeout if timeout is None else None
        sent = False

        async def send() -> Any:
            nonlocal sent
            if sent:  # an interceptor tries again: on a channel of its own
                call.channel_id = session.next_channel_id()
            sent = True
            left = None
            if call.deadline is not None:
                at = session._time()
                left = call.deadline - at
                if left <= 0:
                    raise DeadlineExceeded(
                        f"{method.full_name}: its deadline passed before it was sent"
                    )
                if call.deadline == default and at - now < SHARED_DEADLINE_SLACK:
                    left = None  # the session's default, at once: its shared timer
            response = await session.call(
                call.channel_id,
                method.method_id,
                payload,
                timeout=left,
                metadata=call.metadata or None,
            )
            return method.result_codec.loads(response.payload)

        return await run_intercepted(self.interceptors, call, send, serving=False)

    async def stream(
        self, session: RpcSession, method: MethodInfo, payload: bytes, timeout: float | None
    ) -> ItemStream:
        if not self.interceptors:  # metadata alone
            receiver = await session.start_streaming_call(
                method.method_id, payload, metadata=self.prepared
            )
            return _item_stream(session, receiver, method, timeout)
        call = self.context(session, method, "stream", timeout, session._time())

        async def send() -> ItemStream:
            receiver = await session.start_streaming_call(
                method.method_id,
                payload,
                metadata=call.metadata or None,
                channel_id=call.channel_id,
            )
            return _item_stream(session, receiver, method, timeout)

        stream: ItemStream = await run_intercepted(self.interceptors, call, send, serving=False)
        return stream


def _unary_method(method: MethodInfo) -> Any:
    method_id = method.method_id
    decode = method.result_codec.loads

    async def call(self: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        session = self._session
        payload = method.encode_args(args, kwargs)
        wait = timeout if timeout is not None else self._timeout
        options: _CallOptions | None = self._options
        if options is not None:
            return await options.unary(session, method, payload, wait)
        response = await session.call(session.next_channel_id(), method_id, payload, timeout=wait)
        return decode(response.payload)

    call.__name__ = call.__qualname__ = method.name
    return call


def _item_stream(
    session: RpcSession, receiver: TunnelReceiver, method: MethodInfo, timeout: float | None
) -> ItemStream:
    """The items of a streaming call that started, counted in ``calls_made`` as the
    stream ends while the session's ``count_calls`` is on."""
    stream = ItemStream(receiver, method.full_name, method.result_codec.loads, timeout)
    if session.count_calls:
        made = session.stats.calls_made
        method_id = method.method_id
        stream.add_done_callback(lambda status, error: made.add(method_id, status))
    return stream


def _stream_method(method: MethodInfo) -> Any:
    async def opening(
        client: Any, session: RpcSession, payload: bytes, timeout: float | None
    ) -> ItemStream:
        options: _CallOptions | None = client._options
        if options is not None:
            return await options.stream(session, method, payload, timeout)
        receiver = await session.start_streaming_call(method.method_id, payload)
        return _item_stream(session, receiver, method, timeout)

    def start(self: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> StreamCall:
        payload = method.encode_args(args, kwargs)  # a bad argument fails here, at once
        wait = timeout if timeout is not None else self._timeout
        return StreamCall(lambda: opening(self, self._session, payload, wait))

    start.__name__ = start.__qualname__ = method.name
    return start


def _client_copy(client: Any, what: str) -> Any:
    """A new instance of ``client``'s class with the same fields, to change one of them."""
    client_cls = type(client)
    if not hasattr(client, "_session") or "__rapace_service__" in vars(client_cls):
        raise TypeError(f"{client_cls.__name__} is not a rapace.client(...) instance ({what})")
    copy: Any = object.__new__(client_cls)
    copy._session = client._session
    copy._timeout = client._timeout
    copy._options = client._options
    return copy


def with_timeout(client: T, timeout: float | None) -> T:
    """The same client with ``timeout`` (seconds; ``None``: the session's own) as the
    default deadline of its calls: ``await rapace.with_timeout(calc, 0.5).add(2, 3)``.

    Cheap (one small object, no new class), and typed as the client itself: the typed
    way to a per-call deadline where the ``rapace.mypy_plugin`` plugin is not enabled.
    """
    copy = _client_copy(client, "with_timeout")
    copy._timeout = timeout
    return copy  # type: ignore[no-any-return]


def with_metadata(client: T, metadata: Mapping[str, MetadataValue]) -> T:
    """The same client, its calls carrying ``metadata`` too (over what it had; a key
    given again takes the new value): ``rapace.with_metadata(calc, {"tenant": "a"})``.

    Keys are ``0-9 a-z _ . -``; values ``str``, or ``bytes`` under keys ending in
    ``-bin`` (``rapace.metadata``): a bad one is refused here. Typed as the client itself
    (``calc.with_metadata({...})`` does the same, untyped).
    """
    copy = _client_copy(client, "with_metadata")
    options: _CallOptions | None = copy._options
    copy._options = _CallOptions.make(
        merge_metadata(options.metadata if options else None, metadata),
        options.interceptors if options else (),
    )
    return copy  # type: ignore[no-any-return]


def _tunnel_method(method: MethodInfo) -> Any:
    name = method.full_name

    async def open_tunnel(
        self: Any, *, metadata: Metadata | None = None, timeout: float | None = None
    ) -> TunnelStream:
        session: RpcSession = self._session
        return await session.open_tunnel(
            name, metadata, timeout=timeout if timeout is not None else self._timeout
        )

    open_tunnel.__name__ = open_tunnel.__qualname__ = method.name
    return open_tunnel
