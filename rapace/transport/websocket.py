"""WebSocket transport: rapace frames in binary WebSocket messages (``ws://``, ``wss://``).

Two framings are in use by real peers, and one message cannot always tell them apart,
so each connection has one, chosen by the endpoint (``framing=``, Rust by default) or by
the client through a subprotocol (``SUBPROTOCOLS``):

- ``"rust"`` (subprotocol ``rapace.rust``): one message per frame, the 64-byte
  descriptor then the payload, no length prefix (the Rust implementation's framing).
- ``"stream"`` (subprotocol ``rapace.stream``): each message holds stream-framed bytes
  as on TCP (``[u32 LE length][descriptor][payload]``); message boundaries mean nothing
  (rapace's TypeScript client). Frames sent in one loop iteration share one message.

``MessageCodec`` is the framing, shared by this module's picows transport and by
``rapace.asgi``. The library is picows (Cython): on this project's 2-core VM its echo
round trip was ~5x shorter and its throughput ~3x higher than websockets' asyncio
implementation (see the README). WebSocket pings are not sent (the control channel's
keepalive watches liveness, as on TCP); pings from the peer are answered.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

from rapace import _impl
from rapace.errors import FrameError
from rapace.flags import DESC_SIZE
from rapace.peer import Peer, peer_of
from rapace.ratelimit import RateLimitedLog
from rapace.stats import TrafficStats
from rapace.transport.base import FrameSink, TransportClosed

if TYPE_CHECKING:
    from rapace._frame_py import Frame, MsgDescHot

__all__ = [
    "DEFAULT_FRAMING",
    "SUBPROTOCOLS",
    "CloseCode",
    "Framing",
    "ListenerBase",
    "MessageCodec",
    "UnknownSubprotocol",
    "WebSocketTransport",
    "choose_framing",
    "subprotocol_for",
]

logger = logging.getLogger("rapace.transport")

_closing_log = RateLimitedLog(logger=logger)
"""Closing a connection for bad input is logged at most once a second process-wide."""

Framing = Literal["rust", "stream"]

DEFAULT_FRAMING: Final[Framing] = "rust"

SUBPROTOCOLS: Final[dict[str, Framing]] = {"rapace.rust": "rust", "rapace.stream": "stream"}
"""Subprotocol names a client may ask for, and the framing each selects. A client that
asks for none gets the endpoint's default framing."""

_FLUSH_AT = 256 * 1024
"""Bytes queued within one loop iteration that make ``send_frame`` send at once."""

_LEN = struct.Struct("<I")

MESSAGE_SLACK: Final = 64 * 1024
"""Bytes over the frame limit a message may have before the WebSocket layer refuses it."""


class CloseCode:
    """The WebSocket close codes this transport sends (RFC 6455 section 7.4.1)."""

    NORMAL: Final = 1000
    GOING_AWAY: Final = 1001
    PROTOCOL_ERROR: Final = 1002  # not rapace: short message, bad descriptor, bad prefix
    UNSUPPORTED_DATA: Final = 1003  # a text message
    POLICY_VIOLATION: Final = 1008  # an unknown subprotocol (ASGI: refused before accept)
    MESSAGE_TOO_BIG: Final = 1009


class UnknownSubprotocol(ValueError):
    """The client asked only for subprotocols this endpoint does not speak."""


def choose_framing(offered: Sequence[str], default: Framing) -> tuple[Framing, str | None]:
    """The framing for a client that offered ``offered`` subprotocols, and the name to
    answer with (``None``: answer none). The first known name wins; offering only
    unknown names is refused: that client expects something we cannot speak."""
    for name in offered:
        framing = SUBPROTOCOLS.get(name.strip())
        if framing is not None:
            return framing, name.strip()
    if offered:
        raise UnknownSubprotocol(
            f"unsupported subprotocol {', '.join(offered)!s}: this endpoint speaks "
            f"{' or '.join(SUBPROTOCOLS)} (or none for its default, {default!r})"
        )
    return default, None


def subprotocol_for(framing: Framing) -> str:
    """The subprotocol name that asks for ``framing``."""
    for name, value in SUBPROTOCOLS.items():
        if value == framing:
            return name
    raise ValueError(f"unknown framing {framing!r}: use 'rust' or 'stream'")


def check_framing(framing: object) -> Framing:
    """``framing`` if it names a framing, else a ``ValueError`` that lists them."""
    if framing == "rust":
        return "rust"
    if framing == "stream":
        return "stream"
    raise ValueError(f"unknown framing {framing!r}: use 'rust' or 'stream'")


class MessageCodec:
    """One connection's framing: binary messages in, frames out, and back (sans-I/O).

    ``decode`` returns the frames a message completes and the oversized frames it
    skipped (``(descriptor, payload size)``, as ``FrameDecoder.take_skipped``); it raises
    ``FrameError`` for a message that is not rapace. ``encode`` turns the frames of one
    loop iteration into messages: one per frame (Rust), or one for all (stream).
    """

    def __init__(self, framing: Framing, max_payload_size: int | None = None) -> None:
        twin = _impl.current()
        self.framing: Framing = check_framing(framing)
        self._decoder = (
            twin.FrameDecoder() if max_payload_size is None else twin.FrameDecoder(max_payload_size)
        )
        self.max_payload_size: int = self._decoder.max_payload_size
        self.decode_message = self._decoder.decode_message
        """One Rust-framing message: its frame, or ``None`` when it was skipped (then
        listed by ``take_skipped``); the transports' per-message hot path."""
        self.take_skipped = self._decoder.take_skipped
        self._encode = twin.encode_frame
        self.encode_message = twin.encode_message
        """One frame as one Rust-framing message."""

    @property
    def max_message_size(self) -> int:
        """The largest message a peer may send: one whole frame (plus its length prefix
        in the stream framing)."""
        return self.max_payload_size + DESC_SIZE + (4 if self.framing == "stream" else 0)

    @property
    def message_limit(self) -> int:
        """What the WebSocket layer accepts before it refuses a message (1009): one
        frame plus ``MESSAGE_SLACK``, so that a frame a little over the limit is skipped
        and fails its one call, as on a stream, while memory stays bounded."""
        return self.max_message_size + MESSAGE_SLACK

    @property
    def partial_frame_bytes(self) -> int:
        """Bytes of a frame split across messages still held (stream framing)."""
        return int(self._decoder.buffered + self._decoder.skipping)

    def decode(
        self, message: bytes | bytearray | memoryview
    ) -> tuple[list[Frame], list[tuple[MsgDescHot, int]]]:
        if self.framing == "stream":
            return self._decode_stream(message)
        return self.decode_rust(message)

    def _decode_stream(
        self, message: bytes | bytearray | memoryview
    ) -> tuple[list[Frame], list[tuple[MsgDescHot, int]]]:
        decoder = self._decoder
        frames = decoder.feed(message)
        if not decoder.has_skipped:
            return frames, []
        skipped = decoder.take_skipped()
        for desc, size in skipped:
            if desc.payload_len != size:
                error = FrameError(
                    f"a length prefix of {size + 64} bytes with a descriptor that says "
                    f"{desc.payload_len}: not the rapace stream framing"
                )
                error.frames = frames
                raise error
        return frames, skipped

    def decode_rust(
        self, message: bytes | bytearray | memoryview
    ) -> tuple[list[Frame], list[tuple[MsgDescHot, int]]]:
        """``decode`` for the Rust framing (the bytes after the descriptor are
        authoritative, as on a stream: ``docs/protocol.md`` §4)."""
        frame = self.decode_message(message)
        if frame is None:
            return [], self.take_skipped()
        return [frame], []

    def encode(self, frames: list[Frame]) -> list[bytes]:
        if self.framing == "stream":
            encode = self._encode
            if len(frames) == 1:
                return [encode(frames[0])]
            return [b"".join([encode(frame) for frame in frames])]
        encode_message = self.encode_message
        return [encode_message(frame) for frame in frames]


_SMALL_HEADERS: Final = tuple(bytes((0x82, size)) for size in range(126))


def _server_frame_header(size: int) -> bytes:
    """An unmasked, final, binary WebSocket frame header (server to client)."""
    if size < 126:
        return _SMALL_HEADERS[size]
    if size < 0x10000:
        return struct.pack("!BBH", 0x82, 126, size)
    return struct.pack("!BBQ", 0x82, 127, size)


if TYPE_CHECKING:
    from picows import WSListener as ListenerBase
else:
    try:  # picows is the optional extra rapace[ws]; the codec above works without it
        from picows import WSListener as ListenerBase
    except ImportError:  # pragma: no cover - exercised only where picows is missing
        ListenerBase = object


def require_picows() -> Any:
    """The picows module, or an ``ImportError`` that says how to get it."""
    try:
        import picows  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - picows is installed in CI
        raise ImportError(
            "ws:// and wss:// addresses need picows: pip install 'rapace[ws]'"
        ) from exc
    return picows


class WebSocketTransport(ListenerBase):
    """One rapace connection over a WebSocket (a picows listener).

    Messages go from picows' parser through the codec to the session with no ``await``;
    the frames of one socket read reach the session in one batch. Frames sent in one
    loop iteration leave together: one message (stream framing) or, on the server side,
    all their messages in one write. ``send_frame`` waits only while the socket's write
    buffer is over its high-water mark; ``pause_reading`` stops reading the socket.
    """

    # Slots, not an instance dict: on a Python subclass of picows' Cython listener,
    # CPython 3.11 does not specialise dict attribute loads, and every ``self.x`` on the
    # per-message path cost about 2.4x a plain object's (four loads: 79 ns against 34).
    __slots__ = (
        "_batch",
        "_closed",
        "_connected",
        "_decode_one",
        "_drain_waiters",
        "_early",
        "_encode_one",
        "_failure",
        "_flush_scheduled",
        "_fragment_text",
        "_fragments",
        "_loop",
        "_lost",
        "_on_connected",
        "_out",
        "_out_bytes",
        "_raw",
        "_read_paused_by_session",
        "_rust",
        "_server_side",
        "_sink",
        "_write_paused",
        "_ws",
        "close_code",
        "codec",
        "peer",
        "subprotocol",
        "traffic",
    )

    def __init__(
        self,
        codec: MessageCodec,
        *,
        subprotocol: str | None = None,
        on_connected: Callable[[WebSocketTransport], None] | None = None,
    ) -> None:
        """``on_connected`` runs once the handshake is complete: a server starts the
        session there, so a request that never upgrades (plain HTTP, a bad handshake)
        leaves nothing behind."""
        super().__init__()
        self.codec = codec
        self._rust = codec.framing == "rust"
        self._decode_one = codec.decode_message
        self._encode_one = codec.encode_message
        self._on_connected = on_connected
        self.subprotocol = subprotocol
        self._ws: Any = None
        self._raw: Any = None  # the underlying asyncio transport
        self._server_side = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: FrameSink | None = None
        self._early: list[Frame] = []
        self._batch: list[Frame] = []
        self._fragments: bytearray | None = None
        self._fragment_text = False
        self._out: list[Frame] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._read_paused_by_session = False
        self._closed = False
        self._lost = False
        self._failure: BaseException | None = None
        self._connected = asyncio.Event()
        self.close_code: int | None = None
        """The close code the peer sent, once it did."""
        self.peer: Any = None
        self.traffic = TrafficStats()
        """Frames and message bytes received and sent (counted per message and per flush)."""

    # -- picows listener ---------------------------------------------------------------

    def on_ws_connected(self, transport: Any) -> None:
        self._ws = transport
        self._raw = transport.underlying_transport
        self._server_side = not transport.is_client_side
        self._loop = asyncio.get_running_loop()
        self.peer = self._raw.get_extra_info("peername")
        self._connected.set()
        if self._closed:
            transport.disconnect(graceful=False)
            return
        self._update_reading()
        if self._on_connected is not None:
            self._on_connected(self)

    def describe_peer(self) -> Peer:
        """Who is connected (address; the certificate a ``wss://`` handshake verified),
        from the connection under the WebSocket, once connected."""
        if self._raw is None:
            raise TransportClosed("not connected yet")
        tls = self._raw.get_extra_info("ssl_object") is not None
        return peer_of(self._raw, "wss" if tls else "ws")

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if self._closed:
            return
        msg_type = frame.msg_type
        if msg_type is _BINARY and frame.fin and self._fragments is None:
            message = frame.get_payload_as_memoryview()
            if self._rust:  # the hot path, inlined: one whole message, one frame
                self.traffic.bytes_received += len(message)
                try:
                    decoded = self._decode_one(message)
                except FrameError as exc:
                    self._broken(exc)
                    return
                if decoded is None:
                    self._skipped(self.codec.take_skipped())
                elif frame.last_in_buffer:
                    batch, self._batch = self._batch, []
                    batch.append(decoded)
                    self._deliver(batch)
                    return
                else:
                    self._batch.append(decoded)
            else:
                self._decode(message)
        elif msg_type is _BINARY or msg_type is _CONTINUATION:
            self._message_part(frame, msg_type is _BINARY)
        elif msg_type is _TEXT:
            if frame.fin:
                self._refuse_text()
            else:
                self._fragments = bytearray()
                self._fragment_text = True
        elif msg_type is _CLOSE:
            self._peer_closed(frame)
            return
        # PING is answered by picows; PONG needs nothing
        if frame.last_in_buffer and self._batch:
            frames, self._batch = self._batch, []
            self._deliver(frames)

    def _message_part(self, frame: Any, first: bool) -> None:
        fragments = self._fragments
        if fragments is None:
            if not first:
                self._fail(CloseCode.PROTOCOL_ERROR, "a continuation frame with no message")
                return
            fragments = self._fragments = bytearray()
            self._fragment_text = False
        fragments += frame.get_payload_as_memoryview()
        if len(fragments) > self.codec.message_limit:
            self._fail(
                CloseCode.MESSAGE_TOO_BIG,
                f"a message over {self.codec.message_limit} bytes (the frame limit)",
            )
            return
        if frame.fin:
            self._fragments = None
            if self._fragment_text:
                self._refuse_text()
            else:
                self._decode(fragments)

    def _decode(self, message: bytes | bytearray | memoryview) -> None:
        self.traffic.bytes_received += len(message)
        try:
            frames, skipped = self.codec.decode(message)
        except FrameError as exc:
            self._broken(exc)
            return
        if frames:
            self._batch.extend(frames)
        if skipped:
            self._skipped(skipped)

    def _broken(self, exc: FrameError) -> None:
        """Deliver the good frames before the bad bytes, then close with 1002."""
        self._batch.extend(getattr(exc, "frames", ()))
        batch, self._batch = self._batch, []
        self._deliver(batch)
        self._fail(CloseCode.PROTOCOL_ERROR, str(exc))

    def _skipped(self, skipped: list[tuple[MsgDescHot, int]]) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self._deliver(batch)
        if self._sink is not None:
            self._sink.frames_skipped(skipped)

    def _refuse_text(self) -> None:
        self._fail(CloseCode.UNSUPPORTED_DATA, "rapace takes binary messages only")

    def _peer_closed(self, frame: Any) -> None:
        code = frame.get_close_code().value
        reason = frame.get_close_reason()
        self.close_code = code
        if code not in (CloseCode.NORMAL, CloseCode.GOING_AWAY) and self._failure is None:
            self._failure = ConnectionResetError(
                f"the peer closed the WebSocket with {code}: {reason or 'no reason'}"
            )
        if self._batch:
            batch, self._batch = self._batch, []
            self._deliver(batch)
        self._closed = True
        self._release_writers()
        if not self._ws.is_close_frame_sent:
            self._ws.send_close(frame.get_close_code(), frame.get_close_message())
        self._ws.disconnect()

    def on_ws_disconnected(self, transport: Any) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self._deliver(batch)
        if not self._closed and self._failure is None and self.close_code is None:
            self._failure = ConnectionResetError("the WebSocket closed without a close frame")
        self._closed = True
        self._release_writers()
        self._report_lost()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._release_writers()

    # -- Transport interface -----------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def max_payload_size(self) -> int:
        return self.codec.max_payload_size

    @property
    def partial_frame_bytes(self) -> int:
        """Bytes of a frame on its way (split across messages or fragments)."""
        held = len(self._fragments) if self._fragments is not None else 0
        return held + self.codec.partial_frame_bytes

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def try_send_frame(self, frame: Frame) -> bool:
        if self._closed or self._loop is None or self._write_paused:
            return False
        self._queue(frame, self._loop)
        return True

    def _queue(self, frame: Frame, loop: asyncio.AbstractEventLoop) -> None:
        self._out.append(frame)
        self._out_bytes += len(frame.payload) + DESC_SIZE
        if self._out_bytes >= _FLUSH_AT:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    async def send_frame(self, frame: Frame) -> None:
        loop = self._loop
        if self._closed or loop is None:
            raise TransportClosed(self._closed_reason() if self._closed else "not connected yet")
        self._queue(frame, loop)
        while self._write_paused and not self._closed:
            waiter = loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self._closed:
            raise TransportClosed(self._closed_reason())

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        self._out_bytes = 0
        ws = self._ws
        if not out or ws is None or ws.is_close_frame_sent or self._raw.is_closing():
            return
        traffic = self.traffic
        traffic.frames_sent += len(out)
        if len(out) == 1 and self._rust:  # the common case, a call or a reply at a time
            message = self._encode_one(out[0])
            traffic.bytes_sent += len(message)
            if self._server_side:
                self._raw.write(_server_frame_header(len(message)) + message)
            else:
                ws.send(_BINARY, message)
            return
        messages = self.codec.encode(out)
        traffic.bytes_sent += sum(map(len, messages))
        if self._server_side:
            # Server frames are unmasked: build them here and write them all at once
            # (picows would make one write, one system call, per message).
            parts: list[bytes] = []
            for message in messages:
                parts.append(_server_frame_header(len(message)))
                parts.append(message)
            self._raw.write(b"".join(parts))
        else:
            for message in messages:
                ws.send(_BINARY, message)

    def attach(self, sink: FrameSink) -> None:
        if self._sink is not None:
            raise RuntimeError("a sink is already attached to this transport")
        self._sink = sink
        if self._early:
            frames, self._early = self._early, []
            sink.frames_received(frames)
        self._update_reading()
        if self._closed:
            self._report_lost()

    def pause_reading(self) -> None:
        self._read_paused_by_session = True
        self._update_reading()

    def resume_reading(self) -> None:
        self._read_paused_by_session = False
        self._update_reading()

    def close(self) -> None:
        """Send what was queued, then close with 1000; the peer sees a clean close."""
        if self._ws is not None and not self._ws.is_close_frame_sent:
            self._flush()
            self._ws.send_close(_close_code(CloseCode.NORMAL), b"")
            # A peer that stopped reading would keep a graceful close waiting forever.
            self._ws.disconnect(graceful=not self._write_paused)
        self._closed = True
        self._release_writers()

    def abort(self) -> None:
        """Drop the connection at once (no close frame)."""
        self._closed = True
        if self._ws is not None:
            self._ws.disconnect(graceful=False)
        self._release_writers()

    # -- internals -----------------------------------------------------------------------

    def _deliver(self, frames: list[Frame]) -> None:
        if not frames:
            return
        self.traffic.frames_received += len(frames)
        if self._sink is not None:
            self._sink.frames_received(frames)
        else:
            self._early.extend(frames)

    def _update_reading(self) -> None:
        raw = self._raw
        if raw is None or raw.is_closing():
            return
        if self._sink is None or self._read_paused_by_session:
            if raw.is_reading():
                raw.pause_reading()
        elif not raw.is_reading():
            raw.resume_reading()

    def _fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol: close this connection only, with a clear reason."""
        _closing_log("closing rapace WebSocket from %s: %s (%d)", self.peer, reason, code)
        self._failure = FrameError(reason)
        self._closed = True
        self._release_writers()
        ws = self._ws
        if ws is not None and not ws.is_close_frame_sent:
            ws.send_close(_close_code(code), _close_reason(reason))
            ws.disconnect()

    def _closed_reason(self) -> str:
        if self._failure is not None:
            return f"connection closed: {self._failure}"
        return "connection closed"

    def _release_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _report_lost(self) -> None:
        if self._sink is not None and not self._lost and self._closed:
            self._lost = True
            self._sink.connection_lost(self._failure)


def _close_reason(reason: str) -> bytes:
    """A close reason fits in 123 bytes (RFC 6455 section 5.5)."""
    data = reason.encode()
    return data if len(data) <= 123 else data[:120] + b"..."


def _close_code(code: int) -> Any:
    return require_picows().WSCloseCode(code)


_BINARY: Any = None
_CONTINUATION: Any = None
_TEXT: Any = None
_CLOSE: Any = None
try:
    from picows import WSMsgType as _WSMsgType

    _BINARY = _WSMsgType.BINARY
    _CONTINUATION = _WSMsgType.CONTINUATION
    _TEXT = _WSMsgType.TEXT
    _CLOSE = _WSMsgType.CLOSE
except ImportError:  # pragma: no cover
    pass


# -- client and server (used by rapace.connection) -------------------------------------


async def open_connection(
    url: str,
    codec: MessageCodec,
    *,
    ssl_context: ssl.SSLContext | None,
    ask_subprotocol: bool = True,
) -> WebSocketTransport:
    """Connect to ``url``, asking for ``codec``'s framing by its subprotocol name."""
    picows = require_picows()
    name = subprotocol_for(codec.framing) if ask_subprotocol else None
    headers = {"Sec-WebSocket-Protocol": name} if name else None
    ws, listener = await picows.ws_connect(
        lambda: WebSocketTransport(codec, subprotocol=name),
        url,
        ssl_context=ssl_context,
        enable_auto_ping=False,
        max_frame_size=codec.message_limit,
        extra_headers=headers,
    )
    assert isinstance(listener, WebSocketTransport)
    answered = ws.response.headers.get("Sec-WebSocket-Protocol") if ws.response else None
    if name and answered and answered != name:
        listener.abort()
        raise ConnectionError(f"the server answered subprotocol {answered!r}, not {name!r}")
    return listener


async def create_server(
    make_transport: Callable[[Framing, str | None], WebSocketTransport],
    host: str,
    port: int,
    *,
    path: str,
    framing: Framing,
    max_message_size: int,
    ssl_context: ssl.SSLContext | None,
    backlog: int,
) -> asyncio.Server:
    """A picows server for ``path``: each upgrade request gets its framing (by
    subprotocol, else ``framing``) and a transport from ``make_transport``; another path
    is a 404, an unknown subprotocol a 400 that names the ones we speak."""
    picows = require_picows()

    def route(request: Any) -> Any:
        if request.path.split(b"?", 1)[0].decode("latin-1") != path:
            return picows.WSUpgradeResponseWithListener(
                picows.WSUpgradeResponse.create_error_response(
                    404, f"no rapace endpoint at this path (it is at {path})".encode()
                ),
                None,
            )
        offered_text = request.headers.get("Sec-WebSocket-Protocol", "")
        offered = [name.strip() for name in offered_text.split(",") if name.strip()]
        try:
            chosen, name = choose_framing(offered, framing)
        except UnknownSubprotocol as exc:
            _closing_log("refusing a WebSocket handshake: %s", exc)
            return picows.WSUpgradeResponseWithListener(
                picows.WSUpgradeResponse.create_error_response(400, str(exc).encode()), None
            )
        listener = make_transport(chosen, name)
        headers = {"Sec-WebSocket-Protocol": name} if name else None
        return picows.WSUpgradeResponseWithListener(
            picows.WSUpgradeResponse.create_101_response(extra_headers=headers), listener
        )

    server: asyncio.Server = await picows.ws_create_server(
        route,
        host,
        port,
        enable_auto_ping=False,
        max_frame_size=max_message_size,
        ssl=ssl_context,
        backlog=backlog,
    )
    return server
