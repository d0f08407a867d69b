"""``RpcSession``: calls, handler tasks and lifecycle of one multiplexed connection.

One transport carries many concurrent unary calls, server-streaming calls, notifications
and tunnels in both directions. The session is the transport's only receiver: frames are
routed synchronously by the demux (compiled, or its pure twin) as they arrive: a response
resolves its caller's future, a tunnel chunk lands in its receiver's buffer, a request
starts a handler task. There is no per-frame ``await`` or queue hop. What the frames look
like is ``rapace.frames``'s business; deadlines are ``rapace.deadline``'s; this module
manages futures, tasks and timers.

Where the Rust session leaves callers to their 30 s timeout, this one fails every pending
call with ``SessionClosed`` as soon as the transport closes or fails, answers requests it
has no dispatcher for with ``Unimplemented``, and echoes the request's ``msg_id`` in
responses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import inspect
import logging
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from rapace import _impl
from rapace.context import serving_call
from rapace.control import (
    CALL_METADATA,
    CallMetadata,
    CancelChannel,
    CancelReason,
    CloseChannel,
    CloseNormal,
    ControlMessage,
    GrantCredits,
    OpenChannel,
    Ping,
    Pong,
    Settings,
)
from rapace.deadline import (
    DEADLINE_PASSED,
    CallDeadline,
    HandlerDeadlines,
    SessionDeadlines,
    budget_ns,
    method_label,
)
from rapace.errors import (
    DeadlineExceeded,
    ErrorCode,
    InvalidArgument,
    ResourceExhausted,
    RpcError,
    SessionClosed,
    Unavailable,
    parse_error_payload,
)
from rapace.frames import (
    CANCEL,
    DATA,
    ERROR,
    NO_REPLY,
    REQUEST,
    ChannelIds,
    FrameShapes,
    answered,
)
from rapace.keepalive import Liveness, PeerUnresponsive
from rapace.metadata import (
    DEFAULT_MAX_METADATA_SIZE,
    MetadataValue,
    PreparedMetadata,
    check_metadata_size,
    decode_pairs,
    metadata_body,
)
from rapace.named import DEFAULT_TUNNEL_CREDIT_WINDOW, Metadata, NamedTunnels, TunnelHandler
from rapace.peer import Peer
from rapace.ratelimit import RateLimitedLog
from rapace.stats import (
    CANCELLED,
    MetricsSnapshot,
    SessionStats,
    TrafficStats,
    failure_status,
    reply_status,
)
from rapace.transport.base import Transport, TransportClosed
from rapace.tunnel import TunnelReceiver, TunnelStream

if TYPE_CHECKING:
    from rapace._frame_py import Frame, MsgDescHot
    from rapace.channel import ChannelPort

__all__ = ["DEFAULT_CALL_TIMEOUT", "DEFAULT_MAX_PENDING", "Dispatcher", "RpcSession"]

logger = logging.getLogger("rapace.session")

DEFAULT_MAX_PENDING: Final = 8192
"""Pending calls a session accepts before refusing with ``ResourceExhausted`` (as in Rust)."""

DEFAULT_CALL_TIMEOUT: Final = 30.0
"""Seconds a call waits for its response (as in Rust)."""

DEFAULT_MAX_REQUEST_BYTES: Final = 64 << 20
"""Payload bytes of the peer's requests a session holds at once, running and queued."""

MIN_PEER_MAX_PAYLOAD: Final = 16
"""The smallest maximum payload a peer's ``Settings`` may lower the sending limit to: an
inline payload, which travels in the descriptor itself."""

METADATA_HELD_BYTES: Final = 4 << 20
"""Bytes of call metadata a session holds for requests that have not arrived yet (a
well-behaved peer sends each request right after its metadata; one that does not, or a
flood of calls held back by the transport, must not make this side hold more)."""

MAX_FRAME_PAYLOAD: Final = 0xFFFFFFFF - 64
"""The largest payload a stream frame can hold (its u32 length prefix covers the descriptor)."""

Dispatcher = Callable[["Frame"], Awaitable["Frame | bytes | None"]]
"""Handles one request frame; returns the response frame, or just its payload (None: empty)."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        parsed = int(value) if value is not None else None
    except ValueError:
        logger.warning("ignoring %s=%r: not an integer", name, value)
        return None
    return parsed if parsed is not None and parsed > 0 else None


def _retrieve(waiter: asyncio.Future[Any]) -> None:
    """Mark a waiter's exception as seen: the call failed another way first (e.g. while
    sending), and asyncio must not report it as never retrieved."""
    if waiter.done() and not waiter.cancelled():
        waiter.exception()


class RpcSession:
    """A multiplexed RPC session over one transport (the Rust ``RpcSession``, on asyncio).

    ``start_channel_id`` picks this side's channel parity: 1 (odd ids, the default) for
    one peer, 2 (even ids) for the other. ``max_pending`` and ``call_timeout`` (seconds)
    default to ``RAPACE_MAX_PENDING`` and ``RAPACE_CALL_TIMEOUT_MS`` from the environment,
    else 8192 and 30 s. Start the demux with ``await session.run()`` (usually in a task).

    Admission: ``max_pending`` also bounds the handlers running at once. A request that
    arrives while they are all busy (or while the requests held exceed
    ``max_request_bytes``) waits its turn in arrival order, never refused: up to
    ``max_pending`` requests wait. Past that the session stops reading from the peer
    until half of them have started, which cannot deadlock anyone: it does so only while
    no call or tunnel of its own needs the connection. When it cannot stop reading, a
    request past twice the bound is refused (``ResourceExhausted``); a notification past
    it is dropped, logged, counted in ``stats`` and announced to the peer on the control
    channel.

    Named tunnels (``open_tunnel``, ``set_tunnel_handler``) are flow-controlled per
    channel with credits when both peers speak them (``tunnel_credit_window`` bytes per
    tunnel, ``None``: off; ``rapace.named`` has the wire): a slow tunnel reader then
    stalls only its own tunnel, not the connection.

    Liveness (``rapace.keepalive``; all off here, on by default in ``connect``/``serve``):
    ``keepalive`` pings the peer after that many seconds of silence and closes the
    session when a peer that speaks the control channel then sends nothing within
    ``keepalive_timeout`` (default: ``keepalive``); every pending call fails at once with
    ``SessionClosed`` naming keepalive. ``idle_timeout`` closes a peer that completes no
    frame for that long, ``frame_timeout`` one whose frame takes longer than that to
    arrive. Only a peer that sent a ``Ping`` or ``Pong`` is ever declared dead (one that
    ignores control frames never answers); ``keepalive_probe`` pings once at the start
    to find out (``serve()`` leaves that to its clients). ``Ping`` is always answered;
    ``await ping()`` measures a round trip.

    Call metadata (``rapace.metadata``, ``docs/protocol.md`` §10.6): at most
    ``max_metadata_size`` encoded bytes per call, sent or received; a handler reads what
    came with its call in ``rapace.current_call()`` (``rapace.context``).
    """

    def __init__(
        self,
        transport: Transport,
        start_channel_id: int = 1,
        *,
        max_pending: int | None = None,
        call_timeout: float | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        tunnel_credit_window: int | None = DEFAULT_TUNNEL_CREDIT_WINDOW,
        keepalive: float | None = None,
        keepalive_timeout: float | None = None,
        idle_timeout: float | None = None,
        frame_timeout: float | None = None,
        keepalive_probe: bool = True,
        max_metadata_size: int = DEFAULT_MAX_METADATA_SIZE,
        peer: Peer | None = None,
    ) -> None:
        self._peer = peer
        self._channels = ChannelIds(start_channel_id)
        self.next_channel_id: Callable[[], int] = self._channels.next
        """``next_channel_id()``: a fresh channel id, stepping by 2 so the two peers never
        collide (0 is skipped). (Bound once: every call takes one.)"""
        if max_metadata_size < 1:
            raise ValueError(f"max_metadata_size must be at least 1, got {max_metadata_size}")
        self._max_metadata_size = max_metadata_size
        # The metadata of the peer's requests still to arrive, by channel, with its size
        # (or the error its request is to be refused with), oldest first.
        self._call_metadata: dict[int, tuple[dict[str, MetadataValue] | RpcError, int]] = {}
        self._call_metadata_bytes = 0
        self._metadata_log = RateLimitedLog()
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be at least 1, got {max_request_bytes}")
        if max_pending is None:
            max_pending = _env_int("RAPACE_MAX_PENDING") or DEFAULT_MAX_PENDING
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        if call_timeout is None:
            timeout_ms = _env_int("RAPACE_CALL_TIMEOUT_MS")
            call_timeout = timeout_ms / 1000 if timeout_ms else DEFAULT_CALL_TIMEOUT
        _check_timeout(call_timeout)
        twin = _impl.current()
        # What this side takes in one frame (its transport's setting, 1 MiB by default as
        # in the Rust implementation), announced to the peer as the session starts; what
        # the peer takes, assumed the same until it announces its own (Settings).
        max_payload = getattr(transport, "max_payload_size", twin.DEFAULT_MAX_PAYLOAD_SIZE)
        self._receive_max = max_payload
        self._frames = FrameShapes(twin, max_payload)
        self._max_payload = max_payload
        # The usual answer (bytes, on the request's channel, echoing its msg_id), built by
        # the twin directly: a FrameShapes method here would cost a call per request.
        self._reply_frame = twin.reply_frame
        self._transport = transport
        # The transport's no-wait send (NowaitSender), or one that always declines.
        self._try_send: Callable[[Frame], bool] = getattr(transport, "try_send_frame", _never_sent)
        self._msg_ids = self._frames.msg_ids
        self._max_pending = max_pending
        self._call_timeout = float(call_timeout)
        self._budget_ns = budget_ns(self._call_timeout)  # on the wire, for the default
        self._dispatcher: Dispatcher | None = None
        # Requests come with their deadline, read on the session's clock (``_bind_loop``
        # sets the loop's if it is another than time.monotonic).
        self._demux = twin.Demux(self._on_request, max_pending, self._on_control, time.monotonic)
        self._method_names: dict[int, str] = {}  # "Service.method", for errors and logs
        self._deadlines = SessionDeadlines(self._demux, self._call_timeout, self._method_names)
        self._port: ChannelPort = _SessionPort(self)
        self._start_call = self._demux.start_call
        self._route_many = self._demux.route_many
        # Request handlers still running, by a key of their own: the request's channel
        # (so the peer's CancelChannel finds it), or a negative number for notifications
        # and a channel the peer reuses while its call runs. Closing cancels them, and
        # their number is the limit that refuses requests.
        self._handlers: dict[int, asyncio.Task[None]] = {}
        # Handlers being stopped (by the peer, past their deadline, at shutdown), and why.
        self._cancelling: dict[int, _Stop] = {}
        # The key of the newest handler of a channel whose key is not the channel (the
        # peer sent a request on it while the previous one still ran): its cancels go there.
        self._reused: dict[int, int] = {}
        self._handler_deadlines = HandlerDeadlines(self._deadline_passed)
        self._deadline_of = self._handler_deadlines.by_key  # key -> deadline, while running
        # The keys of handlers serving notifications: work the peer handed over and will
        # not ask about again, so they run to the end even if the peer closes meanwhile.
        self._notifications: set[int] = set()
        self._background: set[asyncio.Task[None]] = set()  # refusals and quiet sends
        # Admission: requests waiting for a handler slot, in arrival order with their
        # deadlines, and the payload bytes of the requests held (running and waiting).
        # The peer may cancel a waiting request: found by channel, it is withdrawn (its
        # frame and bytes let go at once; the queue skips its empty entry).
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._waiting_by_channel: dict[int, _Waiting] = {}
        self._waiting_bytes = 0
        self._running_bytes = 0
        self._max_request_bytes = max_request_bytes
        self._admit_scheduled = False
        self._overloaded = False  # reading paused because too many requests wait
        self._ask_again_at = 0  # waiting requests at which to ask again if reading may stop
        self._blocked_readers = 0
        self.stats = SessionStats()
        """What this session did with the work its peer sent, its traffic and its calls
        (live counters; ``metrics()`` for a named copy)."""
        traffic = getattr(transport, "traffic", None)
        if isinstance(traffic, TrafficStats):  # (a transport of another library's: zeros)
            self.stats.traffic = traffic
        # The dicts that count calls by method, bound while ``count_calls`` is on (None:
        # off, and then a call pays one test).
        self._served_ok: dict[int, int] | None = None
        self._made_ok: dict[int, int] | None = None
        # One flag for call()'s rare paths (closed, the peer going away, reading paused
        # for overload), so the usual call tests one attribute.
        self._calls_guarded = False
        self._unroutable_log = RateLimitedLog(logger=logger)
        self._overload_log = RateLimitedLog(logging.ERROR, logger=logger)
        self._no_dispatcher_log = RateLimitedLog(logger=logger)
        self._overloaded_log = RateLimitedLog(logger=logger)
        self._peer_overloaded_log = RateLimitedLog(logger=logger)
        self._oversized_log = RateLimitedLog(logger=logger)
        self._draining = False  # this side takes no new calls (shutdown)
        self._peer_going_away = False  # the peer takes no new calls
        self._idle: asyncio.Future[None] | None = None  # resolved when nothing runs
        self._closed = False
        self._failure: BaseException | None = None
        self._running = False
        self._done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._time: Callable[[], float] = time.monotonic  # the loop's clock, once bound
        self._run_task: asyncio.Task[None] | None = None
        self._settings_sent = False
        self._batches_received = 0  # frame batches: keepalive's sign of life
        self._liveness = self._watch_liveness(
            keepalive, keepalive_timeout, idle_timeout, frame_timeout, keepalive_probe
        )
        self._control_handlers: dict[type, Callable[[Any], None]] = {
            CancelChannel: self._on_cancel_channel,
            CloseChannel: self._on_close_channel,
            Settings: self._on_settings,
            Ping: self._liveness.on_ping,
            Pong: self._liveness.on_pong,
        }
        self._own_parity = start_channel_id & 1
        self._named = NamedTunnels(
            self._port,
            next_channel_id=self.next_channel_id,
            refusal=self._open_refusal,
            send_control=self._send_control_soon,
            closed_error=self._closed_error,
            served=self._check_idle,
            open_timeout=self._call_timeout,
            max_accepted=max_pending,
            credit_window=tunnel_credit_window,
        )
        self._control_handlers[OpenChannel] = self._named.on_open_channel
        self._control_handlers[GrantCredits] = self._named.on_grant_credits

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        """Remember the running loop once (``get_running_loop`` costs a syscall on 3.11)."""
        if self._loop is None:
            loop = self._loop = asyncio.get_running_loop()
            # asyncio's own loops read time.monotonic() in a Python method: call it direct
            # (unless this loop's clock is another, e.g. a test's virtual one).
            if getattr(loop.time, "__func__", None) is not asyncio.BaseEventLoop.time:
                self._time = self._demux.clock = loop.time
        return self._loop

    # -- properties and ids ----------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        return self._transport

    @property
    def peer(self) -> Peer | None:
        """Who is on the other end (address, Unix credentials, verified TLS
        certificate), as ``connect``/``serve`` found it; None for a session built on a
        transport directly (``mem_pair``)."""
        return self._peer

    @property
    def max_pending(self) -> int:
        return self._max_pending

    @property
    def call_timeout(self) -> float:
        return self._call_timeout

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def port(self) -> ChannelPort:
        """This session as its tunnels and streams see it."""
        return self._port

    @property
    def frames(self) -> FrameShapes:
        """Builds the frames this session sends, numbered from its message ids."""
        return self._frames

    def next_msg_id(self) -> int:
        """The next outgoing message id (1, 2, 3, ...)."""
        return next(self._msg_ids)

    def pending_channel_ids(self) -> list[int]:
        """Channels with a call waiting for its response, sorted (diagnostics)."""
        return self._demux.waiter_ids()

    def tunnel_channel_ids(self) -> list[int]:
        """Channels with a registered tunnel, sorted (diagnostics)."""
        return self._demux.tunnel_ids()

    def name_methods(self, names: Mapping[int, str]) -> None:
        """Name method ids (``{id: "Service.method"}``) in this session's errors and logs;
        typed clients and service routers do it for their methods."""
        self._method_names.update(names)

    def _label(self, method_id: int) -> str:
        return method_label(method_id, self._method_names)

    @property
    def count_calls(self) -> bool:
        """Whether ``stats.calls_served`` and ``stats.calls_made`` count calls by method
        and status. Off by default: that is a dict update as each call ends, a few per
        cent of a small call's time; every other counter is always on and costs nothing
        measurable. ``rapace.metrics.PrometheusCollector`` turns it on."""
        return self._served_ok is not None

    @count_calls.setter
    def count_calls(self, on: bool) -> None:
        self._served_ok = self.stats.calls_served.ok if on else None
        self._made_ok = self.stats.calls_made.ok if on else None

    def metrics(self) -> MetricsSnapshot:
        """A copy of ``stats`` with methods named and what runs now (gauges): what
        ``Server.metrics()`` adds up and exporters read. Call it on the session's loop."""
        return MetricsSnapshot.of(
            self.stats,
            self._method_names,
            running=len(self._handlers),
            waiting=sum(entry.frame is not None for entry in self._waiting),
            pending=len(self._demux.waiter_ids()),
            is_open=not self._closed,
        )

    @property
    def dispatcher(self) -> Dispatcher | None:
        """The dispatcher handling incoming requests (``None`` until one is set): what
        ``register_services`` looks at to add to, not replace, the services served."""
        return self._dispatcher

    def set_dispatcher(self, dispatcher: Dispatcher | None) -> None:
        """Handle incoming requests with ``dispatcher`` (``None`` removes it)."""
        if dispatcher is not None and not callable(dispatcher):
            raise TypeError("the dispatcher must be an async callable taking a Frame")
        self._dispatcher = dispatcher

    # -- unary calls ---------------------------------------------------------------------

    async def call(
        self,
        channel_id: int,
        method_id: int,
        payload: bytes = b"",
        *,
        timeout: float | None = None,
        metadata: Mapping[str, MetadataValue] | PreparedMetadata | None = None,
    ) -> Frame:
        """Send a request on ``channel_id`` and return its response frame.

        An error response raises its ``RpcError``; no response within ``timeout`` seconds
        (default: the session's ``call_timeout``; no later than the deadline of the call
        this task serves, if any) raises ``DeadlineExceeded``; a session that closes
        meanwhile raises ``SessionClosed``. The request carries the budget, so the peer
        stops the handler when it runs out. Cancelling the awaiting task (or its timeout
        firing) removes the pending entry and tells the peer to cancel the handler. This
        is the low-level path: prefer typed clients.

        ``metadata`` (``str`` keys of ``0-9 a-z _ . -``; ``str`` values, ``bytes`` under
        keys ending in ``-bin``) goes in a ``CallMetadata`` control frame just before the
        request (``docs/protocol.md`` §10.6): the handler reads it from
        ``rapace.current_call().metadata``; a peer that does not speak it answers the
        call without it. Over ``max_metadata_size`` encoded bytes: ``ResourceExhausted``.
        """
        if self._calls_guarded:
            if self._closed or self._peer_going_away:
                raise self._closed_error()
            if self._overloaded:  # this call's answer must be able to arrive
                self._set_overloaded(False)
        delay = self._call_timeout if timeout is None else _check_timeout(timeout)
        loop = self._loop or self._bind_loop()
        served = _serving_get()
        if served is not None:
            inherited = served[0] if type(served) is tuple else served.deadline  # type: ignore[union-attr]
            if inherited is not None and inherited - self._time() < delay:
                delay = timeout = self._inherit(inherited, channel_id, method_id)
        waiter: asyncio.Future[Frame] = loop.create_future()
        # With the session's one delay, deadlines expire in call order: the demux keeps
        # them in a FIFO behind a single timer, and an ended call needs no disarming.
        shared = timeout is None and delay != math.inf
        when = self._time() + delay if shared else None
        if type(payload) is not bytes or len(payload) > self._max_payload:
            self._frames.check_size(payload)
        ahead = None if metadata is None else self._metadata_frame(channel_id, metadata)
        frame = self._start_call(
            channel_id,
            method_id,
            payload,
            self._msg_ids,
            waiter,
            when,
            self._budget_ns if shared else budget_ns(delay),
        )
        if frame is None:
            logger.warning(
                "too many pending RPC calls (%d); refusing a new call to %s",
                self._max_pending,
                self._label(method_id),
            )
            raise ResourceExhausted("too many pending RPC calls")
        deadline = timer = None
        if when is not None:
            if self._deadlines.timer is None:
                self._deadlines.start(loop, when, self._time)
        elif delay != math.inf:
            deadline = CallDeadline(waiter, channel_id, method_id, delay, self._method_names)
            timer = loop.call_at(self._time() + delay, deadline.expire)
        try:
            if ahead is not None and not self._try_send(ahead):
                await self._deadlines.send_held(self._transport, ahead, waiter, deadline, loop)
            if not self._try_send(frame):
                await self._deadlines.send_held(self._transport, frame, waiter, deadline, loop)
            response = await waiter
        except BaseException as exc:
            if self._made_ok is not None:
                self.stats.calls_made.add(method_id, failure_status(exc))
            # A response unregisters its waiter as it resolves it; any other end does here.
            unanswered = self._demux.discard_waiter(channel_id, waiter)
            _retrieve(waiter)
            if isinstance(exc, TransportClosed):
                raise self._closed_error() from exc
            if unanswered and not self._closed:  # the peer may still be working on it
                reason = (
                    CancelReason.DEADLINE_EXCEEDED
                    if isinstance(exc, DeadlineExceeded)
                    else CancelReason.CLIENT_CANCEL
                )
                self._send_now_or_soon(self._frames.cancel(channel_id, reason))
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if response.desc.flags & ERROR:
            error = parse_error_payload(response.payload)
            if self._made_ok is not None:
                self.stats.calls_made.add(method_id, int(error.code))
            raise error
        made = self._made_ok
        if made is not None:
            made[method_id] = made.get(method_id, 0) + 1
        return response

    def _metadata_frame(
        self, channel_id: int, metadata: Mapping[str, MetadataValue] | PreparedMetadata
    ) -> Frame:
        """The ``CallMetadata`` frame to send just before the request on ``channel_id``."""
        body = metadata.body if isinstance(metadata, PreparedMetadata) else metadata_body(metadata)
        return self._frames.call_metadata(channel_id, body, self._max_metadata_size)

    def _inherit(self, deadline: float, channel_id: int, method_id: int) -> float:
        """The delay left of the deadline this task serves under (it ends sooner than the
        call's own); ``DeadlineExceeded`` at once if nothing is left."""
        left = deadline - self._time()
        if left <= 0:
            raise DeadlineExceeded(
                f"{self._label(method_id)}: not sent on channel {channel_id}: the deadline "
                "of the call being served has passed"
            )
        return left

    async def notify(self, method_id: int, payload: bytes = b"") -> None:
        """Fire and forget: a ``NO_REPLY`` request on channel 0."""
        await self._send(self._frames.notification(method_id, payload))

    async def send_response(self, frame: Frame) -> None:
        """Send a frame as it is (a response built by hand, a stream item, ...)."""
        await self._send(frame)

    # -- streaming calls and tunnels -----------------------------------------------------

    async def start_streaming_call(
        self,
        method_id: int,
        payload: bytes = b"",
        *,
        metadata: Mapping[str, MetadataValue] | PreparedMetadata | None = None,
        channel_id: int | None = None,
    ) -> TunnelReceiver:
        """Start a server-streaming call; its items arrive as chunks on the returned receiver.

        Each chunk's payload is one item; a chunk with ``is_error`` carries an error payload
        (``parse_error_payload``); the stream ends with a chunk carrying EOS. ``metadata``
        travels as in ``call``; ``channel_id`` (default: a fresh one) is the stream's.
        """
        if self._peer_going_away:
            raise self._closed_error()
        if channel_id is None:
            channel_id = self.next_channel_id()
        request = self._frames.stream_request(channel_id, method_id, payload)
        ahead = None if metadata is None else self._metadata_frame(channel_id, metadata)
        receiver = self.register_tunnel(channel_id)
        try:
            if ahead is not None:
                await self._send(ahead)
            await self._send(request)
        except BaseException:
            self.unregister_tunnel(channel_id)
            raise
        return receiver

    def register_tunnel(self, channel_id: int) -> TunnelReceiver:
        """Route every frame on ``channel_id`` to the returned receiver (until EOS)."""
        if self._overloaded:  # this tunnel's chunks must be able to arrive
            self._set_overloaded(False)
        return self._add_tunnel(channel_id)

    def _add_tunnel(self, channel_id: int) -> TunnelReceiver:
        if self._closed:
            raise self._closed_error()
        receiver = TunnelReceiver(self._port, channel_id)
        self._demux.add_tunnel(channel_id, receiver)
        return receiver

    def unregister_tunnel(self, channel_id: int) -> None:
        """Stop routing ``channel_id`` to its tunnel, without sending EOS."""
        receiver = self._demux.remove_tunnel(channel_id)
        if receiver is not None:
            receiver.finish(None)

    async def send_chunk(self, channel_id: int, payload: bytes) -> None:
        """Send one ``DATA`` chunk on a tunnel."""
        await self._send(self._frames.chunk(channel_id, payload))

    async def close_tunnel(self, channel_id: int) -> None:
        """Half-close: send ``DATA|EOS`` with no payload; receiving goes on until the peer's EOS."""
        await self._send(self._frames.half_close(channel_id))

    def open_tunnel_stream(self) -> TunnelStream:
        """A ``TunnelStream`` on a fresh channel id."""
        return TunnelStream(self._port, self.next_channel_id())

    def tunnel_stream(self, channel_id: int) -> TunnelStream:
        """A ``TunnelStream`` on ``channel_id`` (e.g. the peer told us which)."""
        return TunnelStream(self._port, channel_id)

    # -- named tunnels (rapace.named has the wire and the logic) ---------------------------

    def set_tunnel_handler(self, name: str, handler: TunnelHandler | None) -> None:
        """Serve the named tunnels the peer opens as ``"Service.method"``: for each,
        ``await handler(stream, metadata)`` runs in its own task with a ``TunnelStream``
        (closed when the handler returns, aborted if it raises) and the opener's
        ``(key, value)`` metadata pairs. ``None`` removes the handler; opens of a name
        without a handler are refused (the opener sees ``Unimplemented``)."""
        self._named.set_handler(name, handler)

    async def open_tunnel(
        self, name: str, metadata: Metadata | None = None, *, timeout: float | None = None
    ) -> TunnelStream:
        """Open the peer's named tunnel ``"Service.method"`` (``OpenChannel`` with
        ``metadata``) and return its stream once the peer accepted it.

        A peer without a handler for ``name`` refuses: ``Unimplemented``. No answer
        within ``timeout`` seconds (default: the session's ``call_timeout``), as from a
        peer that ignores the control channel: ``DeadlineExceeded``.
        """
        if self._peer_going_away or self._closed:
            raise self._closed_error()
        if timeout is not None:
            _check_timeout(timeout)
        return await self._named.open(name, metadata, timeout)

    def _open_refusal(self, channel_id: int) -> str | None:
        """Why the peer may not open ``channel_id`` (None: it may)."""
        if channel_id & 1 == self._own_parity:
            return f"channel {channel_id} is not of the opener's parity"
        if channel_id in self._handlers or channel_id in self._waiting_by_channel:
            return f"channel {channel_id} is already in use by a call"
        if self._draining:
            return "the server is shutting down: it takes no new tunnels"
        return None

    def _send_control_soon(self, frame: Frame) -> None:
        """Send an answer to the peer's control frame without awaiting; the ones that
        must wait are bounded as refusals are (reading pauses past ``max_pending``)."""
        if self._closed:
            return
        if self._try_send(frame):
            return
        loop = self._loop or self._bind_loop()
        self._track(loop.create_task(self._send_quietly(frame)))
        if len(self._background) >= self._max_pending and not self._overloaded:
            self._set_overloaded(True)

    def _send_now_or_soon(self, frame: Frame) -> None:
        """Send ``frame`` without awaiting: at once if the transport takes it, else soon."""
        if self._closed or not self._try_send(frame):
            self._send_soon(frame)

    def _send_soon(self, frame: Frame) -> None:
        """Send ``frame`` from a place that cannot await (a finalizer); failures are moot."""
        if self._closed or self._loop is None or self._loop.is_closed():
            return
        self._track(self._loop.create_task(self._send_quietly(frame)))

    async def _send_quietly(self, frame: Frame) -> None:
        try:
            await self._send(frame)
        except (RpcError, ConnectionError):
            logger.debug("could not send on channel %d", frame.desc.channel_id)

    async def _send(self, frame: Frame) -> None:
        if self._closed:
            raise self._closed_error()
        try:
            await self._transport.send_frame(frame)
        except TransportClosed as exc:
            raise self._closed_error() from exc

    # -- the demux loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Receive and route frames until the transport closes.

        Returns when the transport closes cleanly; raises the transport's error when it
        fails. Either way every pending call has failed with ``SessionClosed`` and every
        tunnel receiver has ended by then.
        """
        if self._running:
            raise RuntimeError("run() is already running on this session")
        self._running = True
        loop = self._bind_loop()
        self._done = loop.create_future()
        try:
            if self._closed:
                return
            self._transport.attach(self)
            if self._receive_max != _impl.current().DEFAULT_MAX_PAYLOAD_SIZE:
                self._announce_settings()
            self._liveness.start(loop)
            await asyncio.shield(self._done)
        finally:
            self._running = False
            if not self._closed:  # run() itself was cancelled
                self._shutdown(None)
        if self._failure is not None:
            raise self._failure

    def frames_received(self, frames: list[Frame]) -> None:
        """``FrameSink``: route a batch of frames, synchronously."""
        self._batches_received += 1
        if not self._closed:
            self._route_many(frames, self._on_unroutable)

    def frames_skipped(self, skipped: list[tuple[MsgDescHot, int]]) -> None:
        """``FrameSink``: frames over the maximum went by unread. A request is answered
        with an error on its channel; a response, stream item or tunnel chunk fails what
        waits for it; a notification is dropped, logged and counted."""
        limit = self._receive_max
        self._batches_received += 1  # (a sign of life too)
        for desc, size in skipped:
            self.stats.frames_skipped_oversized += 1
            self._oversized_log(
                "skipped a frame of %d payload bytes on channel %d (%s): over the maximum "
                "of %d bytes",
                size,
                desc.channel_id,
                self._label(desc.method_id) if desc.method_id else "not a request",
                limit,
            )
            if self._closed:
                continue
            stand_in = self._frames.oversized(desc, size, limit)
            flags = desc.flags
            if desc.method_id and flags & DATA and desc.channel_id not in self._demux.tunnel_ids():
                if flags & NO_REPLY and not desc.channel_id:
                    self.stats.notifications_dropped += 1
                else:
                    self.stats.requests_refused += 1
                    if self._served_ok is not None:
                        self.stats.calls_served.add(desc.method_id, reply_status(stand_in))
                    self._respond_soon(stand_in, stand_in)
            else:
                self._route_many([stand_in], self._on_unroutable)

    def connection_lost(self, exc: BaseException | None) -> None:
        """``FrameSink``: the transport ended; fail everything still waiting."""
        if exc is not None:
            logger.debug("rapace session transport failed: %r", exc)  # the transport logs it
            self._failure = exc
        self._shutdown(exc, by_peer=True)

    def _on_unroutable(self, frame: Frame) -> None:
        desc = frame.desc
        channel_id = desc.channel_id
        if self._channels.opened_here(channel_id):
            logger.debug("late response on channel %d dropped (its call ended)", channel_id)
            return
        if desc.flags & CANCEL:
            # How earlier versions of this library stopped a server stream (CANCEL|EOS on
            # its channel): still understood, as CancelChannel(ClientCancel).
            self._cancel_request(channel_id, CancelReason.CLIENT_CANCEL)
            return
        self._unroutable_log(
            "unroutable response frame on channel %d (msg_id %d, flags %#x, %d bytes): "
            "no pending call; dropped",
            channel_id,
            desc.msg_id,
            desc.flags,
            len(frame.payload),
        )

    def _on_request(self, frame: Frame, when: float | None) -> None:
        """A request, and its deadline (None: it has none; -inf: its budget is spent)."""
        dispatcher = self._dispatcher
        desc = frame.desc
        metadata: dict[str, MetadataValue] | None = None
        if self._call_metadata:  # (the metadata sent just before, if any)
            held = self._take_metadata(desc.channel_id)
            if isinstance(held, RpcError):
                self._refuse(
                    frame, int(held.code), f"{self._label(desc.method_id)}: {held.message}"
                )
                return
            metadata = held
        if dispatcher is None:
            self._no_dispatcher_log(
                "request for %s on channel %d, but no dispatcher is set",
                self._label(desc.method_id),
                desc.channel_id,
            )
            self._refuse(
                frame,
                int(ErrorCode.Unimplemented),
                f"no dispatcher registered for method_id: {desc.method_id}",
            )
            return
        if self._draining and not (desc.flags & NO_REPLY and not desc.channel_id):
            # (Notifications still run.)
            self._refuse(
                frame,
                int(ErrorCode.Unavailable),
                "the server is shutting down: it takes no new calls",
            )
            return
        if when is not None and when == _SPENT:
            self._expired(frame, "its deadline had passed when it arrived")
            return
        size = len(frame.payload)
        handlers = self._handlers
        running = self._running_bytes + size
        if (
            len(handlers) >= self._max_pending
            or self._waiting
            or (running > self._max_request_bytes and handlers)
        ):
            self._wait_for_admission(frame, size, when, metadata)
            return
        # _start_handler, inline: this is every request's path.
        self._running_bytes = running
        stats = self.stats
        admitted = stats.requests_admitted = stats.requests_admitted + 1
        key = desc.channel_id
        if not key or key in handlers:
            key = self._other_key(key, admitted)
        elif self._reused:
            self._reused.pop(key, None)
        coro = self._serve(dispatcher, frame, key, size, when, metadata)
        if sys.version_info >= (3, 12):  # eager: a handler that never suspends is never scheduled
            task = asyncio.Task(coro, loop=self._loop, eager_start=True)
        else:
            task = asyncio.Task(coro, loop=self._loop)
        if not task.done():  # it removes itself when it ends (cheaper than a done callback)
            handlers[key] = task
            if when is not None:
                self._deadline_of[key] = when
                if when < self._handler_deadlines.wake_at:
                    self._handler_deadlines.arm(when, task.get_loop(), self._time)

    def _start_handler(
        self,
        dispatcher: Dispatcher,
        frame: Frame,
        size: int,
        when: float | None,
        metadata: dict[str, MetadataValue] | None,
    ) -> None:
        """Start ``frame``'s handler (``_on_request`` does the same inline)."""
        self._running_bytes += size
        # A plain Task (eager on 3.12+), not the loop's task factory: the cheapest start.
        stats = self.stats
        admitted = stats.requests_admitted = stats.requests_admitted + 1
        key = frame.desc.channel_id
        if not key or key in self._handlers:
            key = self._other_key(key, admitted)
        elif self._reused:
            self._reused.pop(key, None)
        coro = self._serve(dispatcher, frame, key, size, when, metadata)
        loop = self._loop or self._bind_loop()
        if sys.version_info >= (3, 12):
            task = asyncio.Task(coro, loop=loop, eager_start=True)
        else:
            task = asyncio.Task(coro, loop=loop)
        if not task.done():
            self._handlers[key] = task
            if when is not None:
                deadlines = self._handler_deadlines
                deadlines.by_key[key] = when
                if when < deadlines.wake_at:
                    deadlines.arm(when, loop, self._time)

    def _other_key(self, channel_id: int, admitted: int) -> int:
        """The key of a handler that cannot be its channel: a notification's (channel 0),
        or a channel whose previous handler still runs (then remembered for cancels)."""
        key = -admitted  # unique: it only grows
        if channel_id:
            self._reused[channel_id] = key
        return key

    def _expired(self, request: Frame, why: str) -> None:
        """Answer ``request`` ``DeadlineExceeded`` without running it (again)."""
        self.stats.requests_expired += 1
        if self._served_ok is not None:
            self.stats.calls_served.add(request.desc.method_id, int(ErrorCode.DeadlineExceeded))
        message = f"{self._label(request.desc.method_id)}: {why}"
        self._respond_soon(
            request, self._frames.error_reply(request, int(ErrorCode.DeadlineExceeded), message)
        )

    def _wait_for_admission(
        self,
        frame: Frame,
        size: int,
        when: float | None,
        metadata: dict[str, MetadataValue] | None,
    ) -> None:
        """Queue a request no handler slot is free for; stop reading if too many wait."""
        waiting = self._waiting
        bound = self._max_pending
        if not self._overloaded and (
            len(waiting) >= 2 * bound or self._waiting_bytes >= 2 * self._max_request_bytes
        ):
            # Reading goes on because it cannot stop (else the rest of the batch being
            # routed when it stopped waits too: at most one read more).
            self._overflow(frame)
            return
        entry = _Waiting(frame, when, metadata)
        waiting.append(entry)
        channel_id = frame.desc.channel_id
        if channel_id:
            self._waiting_by_channel[channel_id] = entry  # (the newest, as for handlers)
        self._waiting_bytes += size
        self.stats.requests_queued += 1
        # Past the bound, ask whether reading may stop; while it may not, ask again every
        # 16 requests (the question lists this side's open channels).
        if (
            not self._overloaded
            and (len(waiting) >= bound or self._waiting_bytes >= self._max_request_bytes)
            and len(waiting) >= self._ask_again_at
        ):
            if self._may_stop_reading():
                self._set_overloaded(True)
            else:
                self._ask_again_at = len(waiting) + 16

    def _may_stop_reading(self) -> bool:
        """Whether pausing reading is safe: no call or tunnel of ours awaits the peer."""
        return not self._demux.waiter_ids() and not self._demux.tunnel_ids()

    def _overflow(self, frame: Frame) -> None:
        """A request past every bound: refused (or, a notification, dropped), never silently."""
        desc = frame.desc
        if desc.flags & NO_REPLY and not desc.channel_id:
            self.stats.notifications_dropped += 1
            if self._overload_log(
                "overloaded: %d requests wait and reading cannot pause (calls of this side "
                "are in flight); dropping a notification for %s",
                len(self._waiting),
                self._label(desc.method_id),
            ):
                self._send_soon(self._frames.overload_notice())  # at the same pace
            return
        self._refuse(frame, int(ErrorCode.ResourceExhausted), "server overloaded: try again later")

    def _admit_waiting(self) -> None:
        """Start waiting requests while handler slots and the byte budget allow."""
        self._admit_scheduled = False
        dispatcher = self._dispatcher
        waiting = self._waiting
        now = self._time()
        # (After the peer closed, only notifications are left waiting: they still run.)
        while waiting and len(self._handlers) < self._max_pending:
            entry = waiting[0]
            frame, when = entry.frame, entry.when
            if frame is None:  # withdrawn by the peer
                waiting.popleft()
                continue
            size = len(frame.payload)
            if self._running_bytes + size > self._max_request_bytes and self._handlers:
                break  # over the budget: the next one waits for more to finish
            waiting.popleft()
            self._dequeued(entry, frame)
            self._waiting_bytes -= size
            if when is not None and when <= now:
                self._expired(frame, "its deadline passed while it waited to run")
            elif dispatcher is None:
                self._refuse(frame, int(ErrorCode.Unavailable), "no dispatcher registered")
            else:
                self._start_handler(dispatcher, frame, size, when, entry.metadata)
        if not waiting:
            self._ask_again_at = 0
        if self._overloaded:
            self._end_overload()
        if self._idle is not None:
            self._check_idle()

    def _dequeued(self, entry: _Waiting, frame: Frame) -> None:
        """Forget a request leaving the queue (it can no longer be withdrawn)."""
        channel_id = frame.desc.channel_id
        if channel_id and self._waiting_by_channel.get(channel_id) is entry:
            del self._waiting_by_channel[channel_id]

    def _end_overload(self) -> None:
        """Read again once half of what made this side stop reading is gone."""
        half = self._max_pending // 2
        if (
            len(self._waiting) <= half
            and self._waiting_bytes <= self._max_request_bytes // 2
            and len(self._background) <= half
        ):
            self._set_overloaded(False)

    def _guard_calls(self) -> None:
        self._calls_guarded = self._closed or self._peer_going_away or self._overloaded

    def _set_overloaded(self, overloaded: bool) -> None:
        self._overloaded = overloaded
        self._guard_calls()
        if overloaded:
            self._overloaded_log(
                "overloaded (%d requests waiting to start, %d answers to send): reading "
                "from the peer pauses until half are done",
                len(self._waiting),
                len(self._background),
            )
        self._update_reading()

    def _refuse(self, request: Frame, code: int, message: str) -> None:
        """Answer ``request`` with an error, without running it."""
        self.stats.requests_refused += 1
        if self._served_ok is not None:
            self.stats.calls_served.add(request.desc.method_id, code)
        self._respond_soon(request, self._frames.error_reply(request, code, message))

    def _respond_soon(self, request: Frame, response: Frame) -> None:
        if not answered(request, response.desc.flags):
            return
        if not self._closed and self._try_send(response):
            return
        loop = self._loop or self._bind_loop()
        self._track(loop.create_task(self._reply(request, response)))
        if len(self._background) >= self._max_pending and not self._overloaded:
            # The peer sends requests and does not read the answers: stop reading from it
            # until half of them are out (that cannot deadlock it: it is not reading).
            self._set_overloaded(True)

    def _track(self, task: asyncio.Task[None]) -> None:
        """Keep a background task until it ends, so closing the session can cancel it."""
        if not task.done():
            self._background.add(task)
            task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if self._overloaded:
            self._end_overload()
        if self._idle is not None:
            self._check_idle()

    # -- liveness (rapace.keepalive) -----------------------------------------------------

    def _watch_liveness(
        self,
        interval: float | None,
        timeout: float | None,
        idle_timeout: float | None,
        frame_timeout: float | None,
        probe: bool,
    ) -> Liveness:
        transport: Any = self._transport
        partial = hasattr(type(transport), "partial_frame_bytes")  # a byte stream's
        return Liveness(
            self._port,
            lambda: self._batches_received,
            self._peer_unresponsive,
            interval=interval,
            timeout=timeout,
            idle_timeout=idle_timeout,
            frame_timeout=frame_timeout,
            partial=(lambda: int(transport.partial_frame_bytes)) if partial else None,
            reading_paused=lambda: bool(self._blocked_readers or self._overloaded),
            peer=lambda: getattr(transport, "peer", None),
            probe=probe,
            stats=self.stats,
            busy=lambda: self.busy or bool(self._demux.tunnel_ids()),
        )

    async def ping(self, timeout: float | None = None) -> float:
        """Measure a round trip: send a ``Ping``, return the seconds until its ``Pong``.

        Works whether keepalive is on or not. ``DeadlineExceeded`` if no ``Pong``
        arrives within ``timeout`` seconds (default: the session's ``call_timeout``; a
        peer that does not speak the control channel never answers), ``SessionClosed``
        if the session is or becomes closed.
        """
        if self._closed:
            raise self._closed_error()
        delay = self._call_timeout if timeout is None else _check_timeout(timeout)
        return await self._liveness.ping(delay)

    @property
    def peer_speaks_control(self) -> bool:
        """Whether the peer sent a ``Ping`` or ``Pong``: only then can keepalive tell
        a dead peer from an idle one (a peer that ignores control frames never answers)."""
        return self._liveness.proven

    def _peer_unresponsive(self, error: PeerUnresponsive) -> None:
        """The peer showed no sign of life (the reason is logged): close at once, not
        waiting to flush to a peer that reads nothing; pending calls fail naming why."""
        if self._closed:
            return
        self._failure = error
        self._shutdown(error)
        abort = getattr(self._transport, "abort", None)
        if abort is not None:
            abort()

    # -- the control channel -------------------------------------------------------------

    def _on_control(self, frame: Frame) -> None:
        """A control frame (channel 0, method id = verb): decoded and handed to the
        handler of its verb; what does not decode, or has no handler, is ignored."""
        verb = frame.desc.method_id
        if verb == CALL_METADATA:
            self._on_call_metadata(frame)  # (its size is checked before it is decoded)
            return
        message, problem = self._frames.control_codec.decode(verb, frame.payload)
        handler = self._control_handlers.get(type(message))
        if handler is None:
            logger.debug(
                "control frame ignored (verb %d, %d payload bytes): %s",
                verb,
                len(frame.payload),
                problem or "not handled here",
            )
            return
        handler(message)

    def _on_call_metadata(self, frame: Frame) -> None:
        """The metadata of the peer's next request on a channel: held until it arrives.
        Too large, or not valid metadata: that request is refused, saying why; a frame
        that does not even name a channel of the peer's is ignored."""
        payload = frame.payload
        size = len(payload)
        entry: dict[str, MetadataValue] | RpcError
        if size > self._max_metadata_size:
            channel_id = _leading_u32(payload)
            try:
                check_metadata_size(size, self._max_metadata_size, "the server's")
            except ResourceExhausted as exc:
                entry = exc
            size = 0  # (nothing of it is held)
        else:
            message, problem = self._frames.control_codec.decode(CALL_METADATA, payload)
            if not isinstance(message, CallMetadata):
                logger.debug("CallMetadata frame ignored: %s", problem)
                return
            channel_id = message.channel_id
            try:
                entry = decode_pairs(message.metadata)
            except InvalidArgument as exc:
                entry = exc
        if not channel_id or channel_id & 1 == self._own_parity:
            logger.debug("CallMetadata for channel %s ignored: not the peer's", channel_id)
            return
        held = self._call_metadata
        previous = held.pop(channel_id, None)
        if previous is not None:
            self._call_metadata_bytes -= previous[1]
        held[channel_id] = (entry, size)
        self._call_metadata_bytes += size
        while len(held) > self._max_pending or self._call_metadata_bytes > METADATA_HELD_BYTES:
            oldest = next(iter(held))
            self._call_metadata_bytes -= held.pop(oldest)[1]
            self._metadata_log(
                "dropped the metadata held for channel %d: too much metadata waits for "
                "requests that have not arrived (its request runs without it)",
                oldest,
            )

    def _take_metadata(self, channel_id: int) -> dict[str, MetadataValue] | RpcError | None:
        """The metadata held for the request arriving on ``channel_id`` (None: none)."""
        held = self._call_metadata.pop(channel_id, None)
        if held is None:
            return None
        self._call_metadata_bytes -= held[1]
        return held[0]

    def _on_cancel_channel(self, message: ControlMessage) -> None:
        assert isinstance(message, CancelChannel)
        channel_id, reason = message.channel_id, message.reason
        if channel_id and self._named.on_cancel_channel(message):
            return  # the answer to one of this side's tunnel opens
        if channel_id:
            self._cancel_request(channel_id, reason)
        elif reason == CancelReason.RESOURCE_EXHAUSTED:
            self._peer_overloaded_log("the peer is overloaded and dropped work this side sent it")

    def _on_close_channel(self, message: ControlMessage) -> None:
        assert isinstance(message, CloseChannel)
        if message.channel_id:
            self._named.on_close_channel(message)  # a tunnel's end or abort, or a refusal
            return
        going_away = message.channel_id == 0 and isinstance(message.reason, CloseNormal)
        if going_away and not self._peer_going_away:
            self._peer_going_away = True
            self._guard_calls()
            logger.info("the peer is shutting down: new calls to it fail with Unavailable")

    def _announce_settings(self) -> None:
        """Tell the peer this side's maximum payload (once)."""
        if not self._settings_sent and not self._closed:
            self._settings_sent = True
            self._send_now_or_soon(self._frames.control(Settings(self._receive_max)))

    def _on_settings(self, message: ControlMessage) -> None:
        """The peer's own maximum payload: what this side sends it from now on (clamped to
        what a frame can hold, and to no less than ``MIN_PEER_MAX_PAYLOAD``). A session
        with the default maximum announces nothing at first; it answers with its own."""
        assert isinstance(message, Settings)
        limit = min(max(message.max_payload, MIN_PEER_MAX_PAYLOAD), MAX_FRAME_PAYLOAD)
        if limit != message.max_payload:
            logger.debug(
                "the peer announced a maximum payload of %d bytes; clamped to %d",
                message.max_payload,
                limit,
            )
        self._max_payload = self._frames.max_payload = limit
        self._announce_settings()

    def _cancel_request(self, channel_id: int, reason: CancelReason) -> None:
        """The peer gave up on its call on ``channel_id`` (whatever its reason): stop its
        newest handler, which then answers nothing, or withdraw it from the queue.
        Unknown or ended calls: nothing."""
        if self._channels.opened_here(channel_id):
            return  # a channel of this side's: no call of the peer's
        entry = self._waiting_by_channel.pop(channel_id, None)
        if entry is not None and entry.frame is not None:  # the newest is still queued
            self._waiting_bytes -= len(entry.frame.payload)
            entry.frame = None  # (its payload is let go now, not when its turn comes)
            self.stats.requests_cancelled += 1
            if self._overloaded:
                self._end_overload()
            return
        key = self._reused.get(channel_id, channel_id) if self._reused else channel_id
        why = _Stop.PEER_EXPIRED if reason == CancelReason.DEADLINE_EXCEEDED else _Stop.PEER
        if self._stop_handler(key, why):
            self.stats.requests_cancelled += 1

    def _deadline_passed(self, key: int) -> None:
        if self._stop_handler(key, _Stop.EXPIRED):
            self.stats.requests_expired += 1

    def _stop_handler(self, key: int, why: _Stop) -> bool:
        """Stop the running handler ``key`` for ``why``; ``_serve`` answers (or not) as
        ``why`` says. False if it ended or is being stopped already (closing overrides)."""
        task = self._handlers.get(key)
        if task is None or (key in self._cancelling and why is not _Stop.CLOSED):
            return False
        self._cancelling[key] = why
        # A task that has not taken its first step would skip _serve's cleanup if
        # cancelled: _serve sees the mark as it starts instead.
        if inspect.getcoroutinestate(task.get_coro()) != inspect.CORO_CREATED:  # type: ignore[arg-type]
            # (the message tells the handler's interceptors that its deadline stopped it)
            task.cancel(DEADLINE_PASSED if why in _DEADLINE_STOPS else None)
        return True

    # -- graceful shutdown ---------------------------------------------------------------

    def drain(self) -> None:
        """Take no new calls: tell the peer (a control frame; a peer that ignores it sees
        refusals), answer new requests with ``Unavailable``; what was received runs on."""
        if self._draining or self._closed:
            return
        self._draining = True
        self._send_soon(self._frames.going_away())

    @property
    def busy(self) -> bool:
        """Whether requests of the peer run, wait to run, or have answers still to send,
        or handlers serve tunnels it opened."""
        return bool(self._handlers or self._waiting or self._background or self._named.serving)

    async def shutdown(self, grace: float = 30.0) -> None:
        """Close gracefully: ``drain()``, let what runs finish for up to ``grace`` seconds,
        then answer what still runs with ``Unavailable``, cancel it and close."""
        _check_timeout(grace)
        self.drain()
        try:
            async with asyncio.timeout(grace):
                await self._wait_idle()
        except TimeoutError:
            self._abandon()
            with contextlib.suppress(TimeoutError):  # the answers need a moment to leave
                async with asyncio.timeout(1.0):
                    await self._wait_idle()
        await self.aclose()

    def _abandon(self) -> None:
        """The grace is over: what still runs is cancelled and answered ``Unavailable``."""
        while self._waiting:
            entry = self._waiting.popleft()
            frame = entry.frame
            if frame is None:
                continue
            self._dequeued(entry, frame)
            self._waiting_bytes -= len(frame.payload)
            self._refuse(
                frame, int(ErrorCode.Unavailable), "the server shut down before this call ran"
            )
        for key in list(self._handlers):
            if key not in self._cancelling:  # (the peer's own cancels and expiries stand)
                self._stop_handler(key, _Stop.ABANDONED)
        self._named.abandon()

    async def _wait_idle(self) -> None:
        if self._closed or not self.busy:
            return
        if self._idle is None or self._idle.done():
            self._idle = (self._loop or self._bind_loop()).create_future()
        await asyncio.shield(self._idle)

    def _check_idle(self) -> None:
        idle = self._idle
        if idle is not None and not idle.done() and (self._closed or not self.busy):
            idle.set_result(None)

    async def _serve(  # noqa: PLR0917  (every request's task: positional is cheapest)
        self,
        dispatcher: Dispatcher,
        request: Frame,
        key: int,
        size: int,
        when: float | None,
        metadata: dict[str, MetadataValue] | None,
    ) -> None:
        req = request.desc
        no_reply = req.flags & NO_REPLY
        if no_reply and not req.channel_id:
            self._notifications.add(key)
        # The call context (rapace.context), in this task's context only: its calls inherit
        # the deadline; a plain tuple, made a CallContext only if someone asks.
        _serving_set((when, self, request, metadata))
        cancelling = self._cancelling  # (the dict itself: read once, it is every request's)
        status = CANCELLED  # what the call ends with, unless an answer says otherwise
        try:
            try:
                if cancelling and key in cancelling:
                    raise asyncio.CancelledError  # cancelled before its first step
                result = await dispatcher(request)
                if cancelling and key in cancelling:
                    raise asyncio.CancelledError  # it ignored the cancel: still cancelled
                if type(result) is bytes and not no_reply and len(result) <= self._max_payload:
                    # The usual case: answer on the request's channel at once, echoing its
                    # msg_id (extension), and hand it over without awaiting.
                    response = self._reply_frame(request, REQUEST, result)
                    if not self._closed and self._try_send(response):
                        status = 0
                        return
                else:
                    response = self._frames.result_reply(request, result)
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                why = cancelling.pop(key, None)
                if why is not None and task is not None and task.cancelling() and task.uncancel():
                    raise  # cancelled for another reason too
                if self._closed or why is _Stop.CLOSED:
                    raise  # the session is closing: nobody to answer
                if why is _Stop.PEER:
                    return  # the peer waits for no answer
                if why is _Stop.PEER_EXPIRED:
                    status = _DEADLINE_EXCEEDED
                    return  # nor does a peer whose deadline passed
                if why is _Stop.EXPIRED:
                    response = self._frames.error_reply(
                        request,
                        int(ErrorCode.DeadlineExceeded),
                        f"{self._label(req.method_id)}: its deadline passed before it finished",
                    )
                elif why is _Stop.ABANDONED:
                    response = self._frames.error_reply(
                        request,
                        int(ErrorCode.Unavailable),
                        "the server shut down before this call finished",
                    )
                elif task is not None and task.cancelling():
                    raise  # cancelled from outside (run() itself): nobody to answer
                else:
                    response = self._frames.failure_reply(request, exc)
            except Exception as exc:
                if not isinstance(exc, RpcError):
                    logger.error("handler for %s failed", self._label(req.method_id), exc_info=exc)
                response = self._frames.failure_reply(request, exc)
            status = reply_status(response)
            await self._reply(request, response)
        finally:
            served = self._served_ok
            if served is not None:
                method_id = req.method_id
                if status:
                    self.stats.calls_served.add(method_id, status)
                else:
                    served[method_id] = served.get(method_id, 0) + 1
            self._handlers.pop(key, None)
            if cancelling:  # (a cancel that came while the answer was being sent)
                cancelling.pop(key, None)
            if when is not None:
                self._deadline_of.pop(key, None)
            if self._reused and self._reused.get(req.channel_id) == key:
                del self._reused[req.channel_id]
            if no_reply:
                self._notifications.discard(key)
            self._running_bytes -= size
            if self._waiting:
                if not self._admit_scheduled and self._loop is not None:
                    self._admit_scheduled = True
                    self._loop.call_soon(self._admit_waiting)
            elif self._idle is not None:
                self._check_idle()

    async def _reply(self, request: Frame, response: Frame) -> None:
        """Send ``response`` (already addressed to ``request``), if the request wants one."""
        flags = response.desc.flags
        if not answered(request, flags):
            if flags & ERROR:
                logger.debug(
                    "no-reply request for %s failed: %s",
                    self._label(request.desc.method_id),
                    parse_error_payload(response.payload),
                )
            return
        try:
            await self._send(response)
        except (RpcError, ConnectionError) as exc:
            logger.debug(
                "could not send the response on channel %d: %s", request.desc.channel_id, exc
            )

    # -- backpressure from tunnel readers --------------------------------------------------

    def _reader_blocked(self) -> None:
        self._blocked_readers += 1
        if self._blocked_readers == 1:
            self._update_reading()

    def _reader_unblocked(self) -> None:
        self._blocked_readers -= 1
        if self._blocked_readers == 0:
            self._update_reading()

    def _update_reading(self) -> None:
        """Read from the peer unless a tunnel reader is full or too many requests wait."""
        if self._closed:
            return
        if self._blocked_readers or self._overloaded:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Run the demux in a background task (what ``connect()`` and ``serve()`` do)."""
        if self._run_task is None:
            self._run_task = self._bind_loop().create_task(self._run_quietly())
        return self._run_task

    async def _run_quietly(self) -> None:
        # The failure was logged and reported to every caller; a background task
        # must not also raise it into "exception was never retrieved".
        with contextlib.suppress(Exception):
            await self.run()

    async def wait_closed(self) -> None:
        """Wait until the session is closed and its demux task (if any) has ended."""
        if self._run_task is not None:
            await asyncio.shield(self._run_task)

    async def aclose(self) -> None:
        """``close()`` and wait for the demux task to end."""
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> RpcSession:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def close(self) -> None:
        """Close the transport; pending calls fail, tunnels end and handlers are cancelled
        at once (those of notifications the peer sent before it closed, too)."""
        if not self._closed:
            self._shutdown(None)
        else:  # the peer closed first: what it sent before stops now too
            self._drop_waiting(keep_notifications=False)
            for key in list(self._handlers):
                self._stop_handler(key, _Stop.CLOSED)
        self._transport.close()

    def _drop_waiting(self, *, keep_notifications: bool) -> None:
        """Forget the requests waiting to start (all, or all but notifications)."""
        waiting = self._waiting
        for _ in range(len(waiting)):
            entry = waiting.popleft()
            frame = entry.frame
            if frame is None:
                continue
            desc = frame.desc
            if keep_notifications and desc.flags & NO_REPLY and not desc.channel_id:
                waiting.append(entry)
            else:
                self._dequeued(entry, frame)
                self._waiting_bytes -= len(frame.payload)

    def _closed_error(self) -> RpcError:
        if self._peer_going_away and not self._closed:
            return Unavailable("the peer is shutting down: it takes no new calls")
        if isinstance(self._failure, PeerUnresponsive):
            return SessionClosed(f"session closed: {self._failure}")
        if self._failure is not None:
            return SessionClosed(f"session closed: transport failed: {self._failure}")
        return SessionClosed("session closed")

    def _shutdown(self, exc: BaseException | None, *, by_peer: bool = False) -> None:
        """Fail what waits on the connection. When the peer ended it (``by_peer``), the
        notifications it sent before still run; everything else is cancelled."""
        if self._closed:
            return
        self._closed = True
        self._guard_calls()
        self._deadlines.close()
        self._handler_deadlines.close()
        error = self._closed_error()
        self._liveness.close(error)
        waiters, tunnels = self._demux.take_all()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)
        for tunnel in tunnels:
            tunnel.finish(exc or error)
        self._named.close()
        self._call_metadata.clear()
        self._call_metadata_bytes = 0
        keep = self._notifications if by_peer else set()
        self._drop_waiting(keep_notifications=by_peer)
        for key in list(self._handlers):
            if key not in keep:
                self._stop_handler(key, _Stop.CLOSED)
        for task in list(self._background):
            task.cancel()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        self._check_idle()
        self._transport.close()


_SPENT: Final = -math.inf
"""The deadline the demux gives a request whose budget is spent (``deadline_ns`` 0)."""

_serving_get = serving_call.get  # (bound once: every call asks)
_serving_set = serving_call.set  # (and every request sets it)


class _Stop(enum.Enum):
    """Why a handler is being stopped, and so what ``_serve`` answers for it."""

    PEER = "the peer cancelled the call: no answer"
    PEER_EXPIRED = "the peer gave up as its deadline passed: no answer"
    EXPIRED = "its deadline passed: DeadlineExceeded"
    ABANDONED = "the shutdown's grace is over: Unavailable"
    CLOSED = "the session is closing: nobody to answer"


_DEADLINE_STOPS: Final = frozenset({_Stop.EXPIRED, _Stop.PEER_EXPIRED})
_DEADLINE_EXCEEDED: Final = int(ErrorCode.DeadlineExceeded)


class _Waiting:
    """A request waiting for a handler slot; ``frame`` is None once the peer withdrew it."""

    __slots__ = ("frame", "metadata", "when")

    def __init__(
        self, frame: Frame, when: float | None, metadata: dict[str, MetadataValue] | None
    ) -> None:
        self.frame: Frame | None = frame
        self.when = when
        self.metadata = metadata


def _leading_u32(payload: bytes) -> int | None:
    """The u32 varint a payload starts with (a control message's channel id), or None."""
    value = 0
    for index, byte in enumerate(payload[:5]):
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value if value <= 0xFFFFFFFF else None
    return None


def _never_sent(frame: Frame) -> bool:
    """The no-wait send of a transport that has none: every send awaits."""
    return False


def _check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"a timeout must be a number of seconds, not {type(timeout).__name__}")
    if not timeout > 0:
        raise ValueError(f"a timeout must be positive, got {timeout}")
    return float(timeout)


class _SessionPort:
    """The ``ChannelPort`` of a session: what its tunnels and streams may ask of it."""

    __slots__ = ("_session",)

    def __init__(self, session: RpcSession) -> None:
        self._session = session

    @property
    def frames(self) -> FrameShapes:
        return self._session._frames

    @property
    def is_closed(self) -> bool:
        return self._session._closed

    def register_tunnel(self, channel_id: int) -> TunnelReceiver:
        return self._session.register_tunnel(channel_id)

    def accept_tunnel(self, channel_id: int) -> TunnelReceiver:
        return self._session._add_tunnel(channel_id)

    def discard_tunnel(self, receiver: TunnelReceiver) -> None:
        self._session._demux.discard_tunnel(receiver.channel_id, receiver)

    def take_tunnel(self, channel_id: int) -> TunnelReceiver | None:
        demux = self._session._demux
        receiver = demux.remove_tunnel(channel_id)
        if receiver is None or isinstance(receiver, TunnelReceiver):
            return receiver
        demux.add_tunnel(channel_id, receiver)  # someone else's kind of tunnel: keep it
        return None

    def try_send(self, frame: Frame) -> bool:
        session = self._session
        return not session._closed and session._try_send(frame)

    async def send(self, frame: Frame) -> None:
        await self._session._send(frame)

    def send_soon(self, frame: Frame) -> None:
        self._session._send_soon(frame)

    def reader_blocked(self) -> None:
        self._session._reader_blocked()

    def reader_unblocked(self) -> None:
        self._session._reader_unblocked()
