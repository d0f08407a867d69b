"""A rapace endpoint inside an ASGI app (Starlette, FastAPI, anything under uvicorn).

Python web services already run an ASGI server: ``endpoint(on_session)`` lets them serve
rapace on one WebSocket route next to their HTTP routes, instead of a second server::

    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    import rapace.asgi

    app = Starlette(routes=[WebSocketRoute("/rapace", rapace.asgi.endpoint(on_session))])

The framing is the endpoint's (``framing=``, Rust by default) unless the client asks for
one by subprotocol (``rapace.transport.websocket.SUBPROTOCOLS``); the codec is the one the
picows transport uses. This module needs no third-party package: the ASGI server brings
the WebSocket; Starlette and uvicorn are only the extra ``rapace[asgi]`` for the example.

Bad input closes that one connection with a clear code and reason: a text message 1003,
a message that is not rapace 1002, an unknown subprotocol 1008 before accepting (the
ASGI server answers the handshake 403), a plain HTTP request 426 Upgrade Required.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from rapace import _impl
from rapace.connection import OnSession, _Options
from rapace.errors import FrameError
from rapace.keepalive import DEFAULT_FRAME_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEPALIVE
from rapace.peer import Peer, printable_address
from rapace.session import DEFAULT_MAX_REQUEST_BYTES, RpcSession
from rapace.stats import SessionGroup, TrafficStats
from rapace.transport.base import FrameSink, TransportClosed
from rapace.transport.websocket import (
    DEFAULT_FRAMING,
    CloseCode,
    Framing,
    MessageCodec,
    UnknownSubprotocol,
    choose_framing,
)

if TYPE_CHECKING:
    from rapace._frame_py import Frame

__all__ = ["AsgiWebSocketTransport", "RapaceEndpoint", "endpoint"]

logger = logging.getLogger("rapace.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_HIGH_WATER = 1024 * 1024
"""Bytes queued for the ASGI server's ``send`` above which senders wait (a client that
does not read stops its session's senders here, not in unbounded memory)."""


class AsgiWebSocketTransport:
    """One rapace connection over an ASGI WebSocket (``receive``/``send`` callables).

    ASGI delivers messages by ``await receive()``: a reader task feeds each one through
    the codec straight into the session; frames sent within one loop iteration are
    encoded together by one writer task (one message in the stream framing). Writers
    wait while more than ``_HIGH_WATER`` bytes are queued; ``pause_reading`` stops
    calling ``receive()``, which pushes back through the ASGI server to the socket.
    """

    def __init__(self, codec: MessageCodec, receive: Receive, send: Send, peer: Any) -> None:
        self.codec = codec
        self._receive = receive
        self._send = send
        self.peer = peer
        self._sink: FrameSink | None = None
        self._out: list[Frame] = []
        self._out_bytes = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._reading = asyncio.Event()
        self._closed = False
        self._close_sent = False
        self._lost = False
        self._failure: BaseException | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.traffic = TrafficStats()
        """Frames and message bytes received and sent (counted per message)."""

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def max_payload_size(self) -> int:
        return self.codec.max_payload_size

    @property
    def partial_frame_bytes(self) -> int:
        return self.codec.partial_frame_bytes

    def try_send_frame(self, frame: Frame) -> bool:
        if self._closed or self._out_bytes >= _HIGH_WATER:
            return False
        self._queue(frame)
        return True

    def _queue(self, frame: Frame) -> None:
        self._out.append(frame)
        self._out_bytes += len(frame.payload) + 64
        if self._out_bytes >= _HIGH_WATER:
            self._drained.clear()
        self._wake.set()

    async def send_frame(self, frame: Frame) -> None:
        if self._closed:
            raise TransportClosed(self._closed_reason())
        self._queue(frame)
        while not self._drained.is_set() and not self._closed:
            await self._drained.wait()
        if self._closed:
            raise TransportClosed(self._closed_reason())

    def attach(self, sink: FrameSink) -> None:
        if self._sink is not None:
            raise RuntimeError("a sink is already attached to this transport")
        self._sink = sink
        self._reading.set()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._write())]
        if self._closed:
            self._report_lost()

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._wake.set()  # the writer flushes, then closes with 1000
            self._drained.set()
            if not self._tasks:
                self._report_lost()

    def abort(self) -> None:
        self.close()

    async def _read(self) -> None:
        sink = self._sink
        assert sink is not None
        try:
            while not self._closed:
                if not self._reading.is_set():
                    await self._reading.wait()
                    continue
                message = await self._receive()
                kind = message["type"]
                if kind == "websocket.disconnect":
                    code = message.get("code", 1000)
                    if code not in (1000, 1001, 1005) and self._failure is None:
                        self._failure = ConnectionResetError(
                            f"the peer closed the WebSocket with {code}: "
                            f"{message.get('reason') or 'no reason'}"
                        )
                    self._close_sent = True  # nothing more can be sent
                    break
                if kind != "websocket.receive":
                    continue
                data = message.get("bytes")
                if data is None:
                    self._fail(CloseCode.UNSUPPORTED_DATA, "rapace takes binary messages only")
                    break
                traffic = self.traffic
                traffic.bytes_received += len(data)
                try:
                    frames, skipped = self.codec.decode(data)
                except FrameError as exc:
                    good = getattr(exc, "frames", None)
                    if good:
                        traffic.frames_received += len(good)
                        sink.frames_received(good)
                    self._fail(CloseCode.PROTOCOL_ERROR, str(exc))
                    break
                if frames:
                    traffic.frames_received += len(frames)
                    sink.frames_received(frames)
                if skipped:
                    sink.frames_skipped(skipped)
        except (OSError, RuntimeError) as exc:  # the server's socket went away
            if self._failure is None:
                self._failure = ConnectionResetError(f"the WebSocket failed: {exc!r}")
            self._close_sent = True
        finally:
            self._closed = True
            self._wake.set()
            self._drained.set()

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                out, self._out = self._out, []
                self._out_bytes = 0
                if out and not self._close_sent:
                    self.traffic.frames_sent += len(out)
                    for message in self.codec.encode(out):
                        self.traffic.bytes_sent += len(message)
                        await self._send({"type": "websocket.send", "bytes": bytes(message)})
                if self._out_bytes < _HIGH_WATER:
                    self._drained.set()
                if self._closed and not self._out:
                    break
            if not self._close_sent:
                self._close_sent = True
                await self._send({"type": "websocket.close", "code": CloseCode.NORMAL})
        except (OSError, RuntimeError) as exc:
            if self._failure is None:
                self._failure = ConnectionResetError(f"the WebSocket failed: {exc!r}")
        finally:
            self._closed = True
            self._drained.set()
            self._report_lost()

    async def wait_closed(self) -> None:
        """Wait for the reader and the writer to end (the ASGI call returns after)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _fail(self, code: int, reason: str) -> None:
        logger.warning("closing rapace WebSocket from %s: %s (%d)", self.peer, reason, code)
        self._failure = FrameError(reason)
        self._closed = True
        self._out = []
        if not self._close_sent:
            self._close_sent = True
            closing = {"type": "websocket.close", "code": code, "reason": reason[:120]}
            self._tasks.append(asyncio.get_running_loop().create_task(self._send_close(closing)))

    async def _send_close(self, message: Message) -> None:
        with contextlib.suppress(OSError, RuntimeError):  # the socket went first
            await self._send(message)

    def _closed_reason(self) -> str:
        if self._failure is not None:
            return f"connection closed: {self._failure}"
        return "connection closed"

    def _report_lost(self) -> None:
        if self._sink is not None and not self._lost:
            self._lost = True
            self._sink.connection_lost(self._failure)


class RapaceEndpoint(SessionGroup[RpcSession]):
    """An ASGI application that serves one rapace session per WebSocket connection.

    A class instance (not a function), so Starlette's ``WebSocketRoute`` and ``Mount``
    call it as a plain ASGI app.
    """

    def __init__(self, on_session: OnSession, framing: Framing, options: _Options) -> None:
        self._on_session = on_session
        self.framing = framing
        self._options = options
        self.sessions: set[RpcSession] = set()
        super().__init__(self.sessions)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await _upgrade_required(send)
            return
        if scope["type"] != "websocket":
            return  # lifespan and others: nothing to do
        connect = await receive()
        if connect["type"] != "websocket.connect":
            return
        try:
            framing, subprotocol = choose_framing(scope.get("subprotocols") or [], self.framing)
        except UnknownSubprotocol as exc:
            logger.warning("refusing a rapace WebSocket from %s: %s", scope.get("client"), exc)
            await send(
                {"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION, "reason": str(exc)}
            )
            return
        accept: Message = {"type": "websocket.accept"}
        if subprotocol is not None:
            accept["subprotocol"] = subprotocol
        await send(accept)
        with _impl.using(self._options.twin):
            codec = MessageCodec(framing, self._options.max_payload_size)
        transport = AsgiWebSocketTransport(codec, receive, send, scope.get("client"))
        client = scope.get("client")
        peer = Peer(
            "wss" if scope.get("scheme") == "wss" else "ws",
            printable_address(tuple(client) if client else None),
        )
        session = self._options.session(transport, 2, probe=False, peer=peer)  # type: ignore[arg-type]
        self._loop = asyncio.get_running_loop()
        self.session_started(session)
        try:
            result = self._on_session(session)
            if inspect.isawaitable(result):
                await result
            with contextlib.suppress(Exception):  # the session logged it already
                await session.run()
        finally:
            session.close()
            self.session_ended(session)
            await transport.wait_closed()


async def _upgrade_required(send: Send) -> None:
    body = b"this is a rapace WebSocket endpoint: connect with a WebSocket client\n"
    await send(
        {
            "type": "http.response.start",
            "status": 426,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"upgrade", b"websocket"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def endpoint(
    on_session: OnSession,
    *,
    framing: Framing = DEFAULT_FRAMING,
    max_payload_size: int | None = None,
    max_pending: int | None = None,
    call_timeout: float | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    keepalive: float | None = DEFAULT_KEEPALIVE,
    keepalive_timeout: float | None = None,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT,
) -> RapaceEndpoint:
    """An ASGI app serving rapace sessions: mount it on a WebSocket route.

    ``on_session(session)`` (plain or async) runs before each session routes its first
    frame, as for ``rapace.serve``; the other options are ``serve``'s. ``framing`` is
    the default for clients that ask for no subprotocol (browsers running rapace's
    TypeScript client want ``"stream"``; Rust clients ``"rust"``).
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
    )
    return RapaceEndpoint(on_session, framing, options)
