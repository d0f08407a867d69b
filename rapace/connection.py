"""Real connections: ``connect()`` a client session, ``serve()`` sessions to many clients.

Addresses are ``"unix:/path/to/socket"``, ``"tcp://host:port"``, ``"tls://host:port"``
(TCP with TLS: ``ssl=``, see ``rapace.security``), a WebSocket URL
``"ws://host:port/path"`` / ``"wss://..."`` (``rapace.transport.websocket``; ``[::1]`` for
IPv6; port 0 picks a free port, see ``Server.address``) or a shared-memory segment file
``"shm:/path"`` (``rapace.transport.shm``: the server creates it and serves the one peer
that opens it). A connected stream socket (a socketpair end, an inherited fd) works too.
Clients use odd channel ids, accepted connections even. Every session knows its ``peer``
(``rapace.Peer``); ``serve(authorize=...)`` sees it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import inspect
import logging
import os
import socket
import ssl as _ssl
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal

from rapace import _impl
from rapace.errors import ConnectionFailed, Unimplemented
from rapace.keepalive import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_KEEPALIVE,
    check_options,
)
from rapace.peer import Peer
from rapace.security import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_SOCKET_MODE,
    Authorize,
    TlsAccepting,
    bind_unix_socket,
    check_authorize,
    client_tls,
    log_refusal,
    server_tls,
    tls_handshake,
    tls_hint,
    warn_if_exposed,
)
from rapace.service import register_services
from rapace.session import DEFAULT_MAX_REQUEST_BYTES, RpcSession
from rapace.stats import SessionGroup
from rapace.transport import shm as _shm
from rapace.transport import websocket as _ws
from rapace.transport.stream import StreamTransport

__all__ = ["Address", "Server", "connect", "parse_address", "serve"]

logger = logging.getLogger("rapace.server")

OnSession = Callable[[RpcSession], object]
"""Called with each session before it routes its first request: set its dispatcher here.

Plain or async; what a plain one returns is ignored (so ``lambda s:
rapace.register_services(s, Impl())`` will do), an awaitable result is awaited."""

DEFAULT_BACKLOG: Final = 1024
"""Connections the kernel queues before ``accept`` (asyncio's own default is 100)."""

DEFAULT_SHUTDOWN_GRACE: Final = 30.0
"""Seconds ``Server.shutdown()`` lets calls in flight finish before cancelling them."""

_live_servers: weakref.WeakSet[Server] = weakref.WeakSet()
"""Servers listening in this process (``rapace.run`` drains them on SIGTERM/SIGINT)."""


@dataclass(frozen=True)
class Address:
    """A parsed address: ``kind`` is ``"unix"``, ``"tcp"``, ``"tls"`` (TCP with TLS),
    ``"ws"``, ``"wss"`` (whose ``path`` is the URL path) or ``"shm"``."""

    kind: Literal["unix", "tcp", "tls", "ws", "wss", "shm"]
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind in ("unix", "shm"):
            return f"{self.kind}:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.kind in ("ws", "wss"):
            return f"{self.kind}://{host}:{self.port}{self.path}"
        return f"{self.kind}://{host}:{self.port}"


def parse_address(address: str) -> Address:
    """Parse ``"unix:/path"``, ``"shm:/path"``, ``"tcp://host:port"``,
    ``"tls://host:port"`` or a ``ws://``/``wss://`` URL; anything else is a ``ValueError``."""
    if not isinstance(address, str):
        raise TypeError(f"an address must be a str, not {type(address).__name__}")
    for kind in ("unix", "shm"):
        if address.startswith(f"{kind}:"):
            path = address[len(kind) + 1 :]
            if path.startswith("//"):
                path = path[2:]
            if not path:
                raise ValueError(f"{kind} address {address!r} has no path")
            return Address(kind, path=path)
    for scheme in ("ws", "wss"):
        if address.startswith(f"{scheme}://"):
            rest = address[len(scheme) + 3 :]
            authority, slash, path = rest.partition("/")
            host, port = _host_port(authority, address, f"{scheme}://host:port/path")
            return Address(scheme, path=slash + path or "/", host=host, port=port)
    for scheme in ("tcp", "tls"):
        if address.startswith(f"{scheme}://"):
            rest = address[len(scheme) + 3 :]
            host, port = _host_port(rest, address, f"{scheme}://host:port")
            return Address(scheme, host=host, port=port)  # type: ignore[arg-type]
    raise ValueError(
        f"unsupported address {address!r}: use 'unix:/path', 'tcp://host:port', "
        "'tls://host:port', 'ws://host:port/path' or 'shm:/path'"
    )


def _host_port(rest: str, address: str, form: str) -> tuple[str, int]:
    kind = form.split(":", 1)[0]
    host, sep, port_text = rest.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{kind} address {address!r} needs a port: {form}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not host or port > 65535:
        raise ValueError(f"{kind} address {address!r} needs a host and a port in 0..65535")
    return host, port


@dataclass(frozen=True)
class _Options:
    """What every connection of one ``connect``/``serve`` is built with, in one place."""

    max_payload_size: int | None
    max_pending: int | None
    call_timeout: float | None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    keepalive: float | None = None
    keepalive_timeout: float | None = None
    idle_timeout: float | None = None
    frame_timeout: float | None = None
    twin: _impl.Twin = dataclasses.field(default_factory=_impl.current)
    """The twin where ``connect``/``serve`` was called (not where a connection is made)."""
    framing: _ws.Framing = _ws.DEFAULT_FRAMING
    """WebSocket addresses only: the framing (a server's default for clients that ask
    for no subprotocol)."""
    ssl: _ssl.SSLContext | None = None
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    """Seconds a TLS handshake may take (and, on a server, ``authorize``)."""

    def __post_init__(self) -> None:
        check_options(self.keepalive, self.keepalive_timeout, self.idle_timeout, self.frame_timeout)
        _ws.check_framing(self.framing)
        timeout = self.handshake_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"handshake_timeout must be a positive number, got {timeout!r}")

    def ws_codec(self, framing: _ws.Framing) -> _ws.MessageCodec:
        with _impl.using(self.twin):
            return _ws.MessageCodec(framing, self.max_payload_size)

    def shm_config(self) -> _shm.ShmConfig:
        """The segment a ``shm:`` server creates: the default, or slots of
        ``max_payload_size`` bytes when one is given."""
        if self.max_payload_size is None:
            return _shm.DEFAULT_SHM_CONFIG
        return _shm.ShmConfig(slot_size=self.max_payload_size)

    def transport(self) -> StreamTransport:
        with _impl.using(self.twin):
            return StreamTransport(max_payload_size=self.max_payload_size)

    def session(
        self,
        transport: StreamTransport | _ws.WebSocketTransport | _shm.ShmTransport,
        start_channel_id: int,
        *,
        probe: bool,
        peer: Peer | None,
    ) -> RpcSession:
        """A session on ``transport``; ``probe``: whether it pings the peer at once to
        learn if it speaks the control channel (the connecting side does; the accepting
        side learns it from its clients' probes, and sends nothing unasked)."""
        with _impl.using(self.twin):
            return RpcSession(
                transport,
                start_channel_id,
                max_pending=self.max_pending,
                call_timeout=self.call_timeout,
                max_request_bytes=self.max_request_bytes,
                keepalive=self.keepalive,
                keepalive_timeout=self.keepalive_timeout,
                idle_timeout=self.idle_timeout,
                frame_timeout=self.frame_timeout,
                keepalive_probe=probe,
                peer=peer,
            )


class _Connecting:
    """What ``connect()`` returns: await it for the session, or use it with ``async with``."""

    def __init__(self, opening: Awaitable[RpcSession]) -> None:
        self._opening = opening
        self._session: RpcSession | None = None

    def __await__(self) -> Generator[Any, None, RpcSession]:
        return self._opening.__await__()

    async def __aenter__(self) -> RpcSession:
        self._session = await self._opening
        return self._session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.aclose()


def connect(
    address: str | Address | socket.socket,
    *,
    services: Iterable[object] = (),
    on_session: OnSession | None = None,
    max_payload_size: int | None = None,
    max_pending: int | None = None,
    call_timeout: float | None = None,
    start_channel_id: int = 1,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    keepalive: float | None = DEFAULT_KEEPALIVE,
    keepalive_timeout: float | None = None,
    frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT,
    framing: _ws.Framing = _ws.DEFAULT_FRAMING,
    ssl: _ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> _Connecting:
    """Connect to a rapace peer and start the session's demux.

    ``session = await connect(...)`` (close with ``await session.aclose()``), or
    ``async with connect(...) as session:``.

    ``keepalive`` (seconds, ``None`` for off; default 10 s): ping the server after that
    much silence; a server that speaks the control channel and then sends nothing within
    ``keepalive_timeout`` (default: ``keepalive``) is declared dead, and every pending
    call fails at once with ``SessionClosed`` naming keepalive, instead of waiting for
    its timeout (forever, without one). ``frame_timeout`` (default 30 s) bounds how long
    one frame may take to arrive. See ``rapace.keepalive``.

    ``address``: ``"unix:/path"``, ``"tcp://host:port"``, ``"tls://host:port"``,
    ``"shm:/path"`` (a shared-memory segment a server created: waits up to 5 s for it; a
    bad segment raises ``rapace.ShmError``), an ``Address`` (such as a ``Server.address``)
    or a connected socket. A peer that cannot be reached raises ``rapace.ConnectionFailed``
    naming the address, on every event loop; so does a failed TLS handshake (an untrusted
    certificate, a wrong hostname, a plain server), with the TLS layer's reason.

    TLS: ``tls://host:port``, or ``tcp://`` with ``ssl``. ``ssl`` is the client
    ``SSLContext`` (default for ``tls://``: ``ssl.create_default_context()``, the system's
    trust store; pass one with the server's CA, and with ``load_cert_chain`` for mutual
    TLS); ``server_hostname`` is the name the server's certificate must carry (default:
    the address's host); ``handshake_timeout`` (default 10 s) bounds the handshake.
    ``session.peer.certificate`` is then the server's verified certificate.

    The server may call this side as soon as the connection is up, so what this side
    serves is installed before the session reads its first frame: ``services`` (service
    implementations, as for ``register_services``) and/or ``on_session(session)``, as in
    ``serve()``. An async ``on_session`` may already call the peer; requests the peer
    sends meanwhile wait until it has returned.

    ``ws://`` and ``wss://`` URLs (``pip install 'rapace[ws]'``): ``framing`` is ``"rust"``
    (one message per frame, the default) or ``"stream"`` (length-prefixed frames, as
    rapace's TypeScript client sends), asked for by subprotocol; ``ssl`` is the
    ``SSLContext`` for ``wss://`` (default: the system's trust store).
    """

    options = _Options(
        max_payload_size,
        max_pending,
        call_timeout,
        max_request_bytes,
        keepalive=keepalive,
        keepalive_timeout=keepalive_timeout,
        frame_timeout=frame_timeout,
        framing=framing,
        ssl=ssl,
        handshake_timeout=handshake_timeout,
    )
    parsed = address if isinstance(address, Address | socket.socket) else parse_address(address)
    tls = client_tls(
        "socket" if isinstance(parsed, socket.socket) else parsed.kind, ssl, server_hostname
    )
    installs = tuple(services)

    async def opening() -> RpcSession:
        loop = asyncio.get_running_loop()
        factory = options.transport
        transport: StreamTransport | _ws.WebSocketTransport | _shm.ShmTransport
        if isinstance(parsed, socket.socket):
            _, transport = await loop.create_connection(factory, sock=parsed)
        else:
            try:
                if parsed.kind in ("ws", "wss"):
                    transport = await _ws.open_connection(
                        str(parsed), options.ws_codec(options.framing), ssl_context=options.ssl
                    )
                elif parsed.kind == "unix":
                    _, transport = await loop.create_unix_connection(factory, parsed.path)
                elif parsed.kind == "shm":
                    with _impl.using(options.twin):
                        transport = await _shm.open_shm(parsed.path)
                elif tls is not None:
                    _, transport = await loop.create_connection(
                        factory,
                        parsed.host,
                        parsed.port,
                        ssl=tls,
                        server_hostname=server_hostname,
                        ssl_handshake_timeout=options.handshake_timeout,
                    )
                else:
                    _, transport = await loop.create_connection(factory, parsed.host, parsed.port)
            except OSError as exc:
                raise ConnectionFailed(str(_as_tls(parsed, tls)), tls_hint(exc, tls)) from exc
        peer = transport.describe_peer()
        session = options.session(transport, start_channel_id, probe=True, peer=peer)
        try:
            if installs:
                register_services(session, *installs)
            result = on_session(session) if on_session is not None else None
            if inspect.isawaitable(result):
                await _install_while_running(session, result, session.start())
            else:
                session.start()
        except BaseException:
            session.close()
            raise
        return session

    return _Connecting(opening())


def _as_tls(address: Address, tls: _ssl.SSLContext | None) -> Address:
    """``address`` as it is spoken: ``tls://`` when TLS runs on it."""
    return dataclasses.replace(address, kind="tls") if tls is not None else address


class Server(SessionGroup[RpcSession]):
    """A listening rapace server; ``async with`` closes it and every session it accepted.

    ``await server.shutdown(grace)`` stops it gracefully (what ``rapace.run`` does on
    SIGTERM or SIGINT); ``await server.serve_forever()`` returns once it has stopped.
    """

    def __init__(
        self,
        on_session: OnSession,
        address: str | Address,
        options: _Options,
        backlog: int,
        *,
        authorize: Authorize | None = None,
        mode: int = DEFAULT_SOCKET_MODE,
    ) -> None:
        if backlog < 1:
            raise ValueError(f"backlog must be at least 1, got {backlog}")
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise ValueError(f"mode must be permission bits in 0o000..0o777, got {mode!r}")
        self._on_session = on_session
        self._requested = address if isinstance(address, Address) else parse_address(address)
        self._options = options
        self._backlog = backlog
        self._authorize = authorize
        self._mode = mode
        self._tls = server_tls(self._requested.kind, options.ssl)
        self._admitting: set[asyncio.Task[None]] = set()  # handshake, authorize
        self._stopped: asyncio.Future[None] | None = None
        self._shutting_down: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        self._sessions: set[RpcSession] = set()
        super().__init__(self._sessions)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: Address = self._requested
        self._socket_file: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket
        self._segment: _shm.ShmTransport | None = None  # a shm: server's one transport

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        requested = self._requested
        if requested.kind == "shm":
            with _impl.using(self._options.twin):
                transport = _shm.create_shm(
                    requested.path, self._options.shm_config(), mode=self._mode
                )
            self._segment = transport
            self._admit(transport, transport.wait_connected())
        elif requested.kind == "unix":
            _remove_stale_socket(requested.path)
            sock = bind_unix_socket(requested.path, self._mode)
            try:
                self._server = await loop.create_unix_server(
                    self._make_transport, sock=sock, backlog=self._backlog
                )
            except BaseException:
                sock.close()
                raise
            info = os.stat(requested.path)
            self._socket_file = (info.st_dev, info.st_ino)
        elif requested.kind in ("ws", "wss"):
            options = self._options
            if (requested.kind == "wss") != (options.ssl is not None):
                raise ValueError("a wss:// server needs ssl=SSLContext, and ws:// takes none")
            self._server = await _ws.create_server(
                self._make_ws_transport,
                requested.host,
                requested.port,
                path=requested.path,
                framing=options.framing,
                max_message_size=options.ws_codec("stream").message_limit,
                ssl_context=options.ssl,
                backlog=self._backlog,
            )
            bound = self._server.sockets[0].getsockname()
            self.address = dataclasses.replace(requested, port=bound[1])
        else:
            self._server = await loop.create_server(
                self._make_transport, requested.host, requested.port, backlog=self._backlog
            )
            bound = self._server.sockets[0].getsockname()
            self.address = Address(
                "tcp" if self._tls is None else "tls", host=requested.host, port=bound[1]
            )
        if self._server is not None and requested.kind != "unix":
            warn_if_exposed(
                self.address,
                (sock.getsockname() for sock in self._server.sockets),
                protected=self._authorize is not None or self._options.ssl is not None,
            )
        _live_servers.add(self)

    @property
    def sessions(self) -> frozenset[RpcSession]:
        """The sessions currently open (diagnostics)."""
        return frozenset(self._sessions)

    def _make_transport(self) -> asyncio.Protocol:
        if self._tls is not None:
            return TlsAccepting(self._start_tls)
        transport = self._options.transport()
        self._admit(transport, transport.wait_connected())
        return transport

    def _start_tls(self, sock: socket.socket) -> None:
        """A TCP connection to a TLS server: its handshake, then admission as usual."""
        tls_context = self._tls
        assert tls_context is not None
        transport = self._options.transport()
        started = False

        async def handshake() -> None:
            nonlocal started
            started = True  # from here on, the socket is the handshake's to close
            timeout = self._options.handshake_timeout
            if not await tls_handshake(sock, transport, tls_context, timeout):
                transport.abort()  # failed (logged): not admitted

        def never_started() -> None:
            if not started:
                sock.close()

        self._admit(transport, handshake(), on_cancelled=never_started)

    def _make_ws_transport(
        self, framing: _ws.Framing, subprotocol: str | None
    ) -> _ws.WebSocketTransport:
        codec = self._options.ws_codec(framing)
        return _ws.WebSocketTransport(
            codec, subprotocol=subprotocol, on_connected=lambda ws: self._admit(ws, None)
        )

    def _admit(
        self,
        transport: StreamTransport | _ws.WebSocketTransport | _shm.ShmTransport,
        connecting: Coroutine[Any, Any, None] | None,
        *,
        on_cancelled: Callable[[], None] | None = None,
    ) -> None:
        """Serve a new connection once ``connecting`` is done and it is admitted."""
        task = asyncio.get_running_loop().create_task(self._serve(transport, connecting))
        self._tasks.add(task)
        self._admitting.add(task)

        def ended(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._admitting.discard(task)
            if task.cancelled():  # by close(), perhaps before it ever ran: clean up here
                transport.abort()
                if connecting is not None:
                    connecting.close()  # unstarted, it must not warn "never awaited"
                if on_cancelled is not None:
                    on_cancelled()

        task.add_done_callback(ended)

    async def _serve(
        self,
        transport: StreamTransport | _ws.WebSocketTransport | _shm.ShmTransport,
        connecting: Coroutine[Any, Any, None] | None,
    ) -> None:
        try:
            peer = await self._admission(transport, connecting)
        except BaseException:  # cancelled by close(), or a bug: the connection goes
            transport.abort()
            raise
        finally:
            self._admitting.discard(asyncio.current_task())
        if peer is None:
            transport.abort()
            return
        await self._run_session(self._options.session(transport, 2, probe=False, peer=peer))

    async def _admission(
        self,
        transport: StreamTransport | _ws.WebSocketTransport | _shm.ShmTransport,
        connecting: Coroutine[Any, Any, None] | None,
    ) -> Peer | None:
        """Wait for the connection (a TLS handshake), then ask ``authorize``: the peer if
        admitted, else None (logged). The transport reads nothing meanwhile: it has no
        sink until a session runs on it."""
        if connecting is not None:
            await connecting
        if transport.is_closed:
            return None
        peer = transport.describe_peer()
        if self._authorize is not None:
            timeout = self._options.handshake_timeout
            reason = await check_authorize(self._authorize, peer, timeout)
            if reason is not None:
                log_refusal(peer, reason)
                return None
        return peer

    async def _run_session(self, session: RpcSession) -> None:
        self.session_started(session)
        try:
            result = self._on_session(session)
            if inspect.isawaitable(result):
                running = asyncio.get_running_loop().create_task(session.run())
                await _install_while_running(session, result, running)
                await running
            else:
                await session.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # on_session failed, or the session did (already logged)
            logger.debug("rapace session from %s ended: %r", session.peer, exc)
            if not session.is_closed:
                logger.warning("on_session failed for %s: %r", session.peer, exc)
        finally:
            session.close()
            self.session_ended(session)

    def close(self) -> None:
        """Stop listening and close every session (their pending calls fail at once)."""
        self._stop_listening()
        for task in list(self._admitting):
            task.cancel()
        for session in list(self._sessions):
            session.close()
        self._mark_stopped()

    def _stop_listening(self) -> None:
        _live_servers.discard(self)
        if self._server is not None:
            self._server.close()
        if self._socket_file is not None:
            _remove_own_socket(self._requested.path, self._socket_file)
            self._socket_file = None
        if self._segment is not None:
            if not self._segment.is_connected:  # nobody came: nothing else ends it
                self._segment.close()
            with contextlib.suppress(OSError):
                os.unlink(self._segment.path)
            self._segment = None

    def _mark_stopped(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    async def shutdown(self, grace: float = DEFAULT_SHUTDOWN_GRACE) -> None:
        """Stop gracefully: stop accepting connections (the Unix socket file goes), tell
        every peer that no new calls will be served, refuse new requests with
        ``Unavailable``, let calls in flight finish for up to ``grace`` seconds, then
        answer the rest ``Unavailable``, cancel them and close. Idempotent."""
        if self._shutting_down is None:
            self._shutting_down = asyncio.get_running_loop().create_task(self._shutdown(grace))
        await asyncio.shield(self._shutting_down)

    async def _shutdown(self, grace: float) -> None:
        self._stop_listening()
        sessions = list(self._sessions)
        logger.info("rapace server %s shutting down: %d sessions", self.address, len(sessions))
        await asyncio.gather(*(s.shutdown(grace) for s in sessions), return_exceptions=True)
        self.close()
        await self.wait_closed()

    async def serve_forever(self) -> None:
        """Wait until the server stops (``shutdown()`` or ``close()``)."""
        if self._stopped is None:
            self._stopped = asyncio.get_running_loop().create_future()
        serving = self._segment is not None or (
            self._server is not None and self._server.is_serving()
        )
        if not serving:
            self._mark_stopped()
        await asyncio.shield(self._stopped)

    async def wait_closed(self) -> None:
        """Wait until the listener and every session task have finished."""
        if self._server is not None:
            await self._server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


class _UntilInstalled:
    """The dispatcher while an async ``on_session`` runs (the session already reads, so
    that ``on_session`` can call the peer): a request that arrives meanwhile waits for
    it, then goes to the dispatcher it set. ``register_services`` replaces it."""

    placeholder = True

    def __init__(self, session: RpcSession, installed: asyncio.Future[None]) -> None:
        self._session = session
        self._installed = installed

    async def __call__(self, request: Any) -> Any:
        await asyncio.shield(self._installed)
        dispatcher = self._session.dispatcher
        if dispatcher is None or dispatcher is self:
            raise Unimplemented("no service is registered on this session")
        return await dispatcher(request)


async def _install_while_running(
    session: RpcSession, installing: Awaitable[object], running: asyncio.Task[None]
) -> None:
    """Await an async ``on_session`` while the session runs (``running``), holding the
    requests that arrive before it returns (``_UntilInstalled``)."""
    installed = asyncio.get_running_loop().create_future()
    if session.dispatcher is None:
        session.set_dispatcher(_UntilInstalled(session, installed))
    try:
        await installing
    except BaseException:
        running.cancel()
        raise
    finally:
        installed.set_result(None)


def _remove_own_socket(path: str, identity: tuple[int, int]) -> None:
    """Unlink our socket file, but not one a newer server has put at the same path."""
    with contextlib.suppress(OSError):
        info = os.stat(path)
        if (info.st_dev, info.st_ino) == identity:
            os.unlink(path)


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on (left by a crashed server).

    A live server's socket is refused with ``EADDRINUSE``: asyncio would otherwise unlink
    it and silently take over its address.
    """
    if not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
        except OSError:
            return  # not a socket, or no permission: let bind() report it
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running server")


class _Serving:
    """What ``serve()`` returns: await it for the server, or use it with ``async with``."""

    def __init__(self, server: Server) -> None:
        self._server = server

    def __await__(self) -> Generator[Any, None, Server]:
        return self._start().__await__()

    async def _start(self) -> Server:
        await self._server.start()
        return self._server

    async def __aenter__(self) -> Server:
        return await self._start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._server.__aexit__(*exc_info)


def serve(
    on_session: OnSession,
    address: str | Address,
    *,
    max_payload_size: int | None = None,
    max_pending: int | None = None,
    call_timeout: float | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    backlog: int = DEFAULT_BACKLOG,
    keepalive: float | None = DEFAULT_KEEPALIVE,
    keepalive_timeout: float | None = None,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT,
    framing: _ws.Framing = _ws.DEFAULT_FRAMING,
    ssl: _ssl.SSLContext | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    authorize: Authorize | None = None,
    mode: int = DEFAULT_SOCKET_MODE,
) -> _Serving:
    """Listen on ``address``; each accepted connection becomes a session (even channel ids).

    ``server = await serve(...)``, or ``async with serve(...) as server:``.
    ``on_session(session)`` (plain or async) runs before the session routes its first
    request, so the dispatcher it sets sees every request. An async one may call the
    client already (the session reads while it runs; requests that arrive meanwhile wait
    until it returns). ``address`` may be an ``Address``.

    Connections that stop showing signs of life are closed, so that a client that is
    gone does not keep its session and handlers here (``None`` turns each off):
    ``keepalive`` (default 10 s) and ``keepalive_timeout`` as in ``connect``;
    ``idle_timeout`` (default 120 s): a client that completes no frame for that long
    (a rapace client with keepalive never is: it answers pings); ``frame_timeout``
    (default 30 s): a frame that takes longer than that to arrive (slowloris).

    ``ws://host:port/path`` (``wss://`` with ``ssl``, a server ``SSLContext``) serves
    WebSocket clients at that path; ``framing`` is the default for clients that ask for
    no subprotocol (``rapace.rust`` / ``rapace.stream`` select one per connection).

    ``shm:/path`` creates a shared-memory segment there (replacing any file) and serves
    the one process that opens it (``rapace.transport.shm``); ``max_payload_size`` sets
    its slot size (default 64 KiB). Closing the server removes the file.

    TLS: ``tls://host:port`` (or ``tcp://`` with ``ssl``), ``ssl`` a server
    ``SSLContext`` with its certificate chain loaded; for mutual TLS, also
    ``verify_mode = ssl.CERT_REQUIRED`` and the clients' CA (``load_verify_locations``):
    a client without a trusted certificate is refused in the handshake. A handshake that
    fails or takes longer than ``handshake_timeout`` (default 10 s) closes the connection
    with a logged reason. ``Server.address`` is then ``tls://...``.

    Admission: ``authorize(peer)`` (plain or async) gets each connection's ``rapace.Peer``
    (its address; Unix socket credentials; the verified client certificate) after the
    handshake and before its session reads a single frame. Anything but ``True`` (False,
    raising, no answer within ``handshake_timeout``) closes the connection, logged with
    the reason; other connections are not affected. A server that listens beyond
    loopback with neither TLS nor ``authorize`` logs a warning when it starts.

    A Unix socket file is created with permissions ``mode`` (default ``0o600``: its
    owner's processes only), whatever the umask.
    """
    options = _Options(
        max_payload_size,
        max_pending,
        call_timeout,
        max_request_bytes,
        keepalive=keepalive,
        keepalive_timeout=keepalive_timeout,
        idle_timeout=idle_timeout,
        frame_timeout=frame_timeout,
        framing=framing,
        ssl=ssl,
        handshake_timeout=handshake_timeout,
    )
    server = Server(on_session, address, options, backlog, authorize=authorize, mode=mode)
    return _Serving(server)
