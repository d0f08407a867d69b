"""Helpers for the session, tunnel and mem transport tests.

- ``run(coro)``: ``asyncio.run`` with a test-level timeout, so a hang fails fast and says
  so (a ``DeadlineExceeded`` escaping the test is *not* mistaken for the hang), and with
  a loop exception handler that fails the test on "Task exception was never retrieved"
  and friends.
- ``session_pair(twin)``: a client session (odd channels) and a server session (even
  channels) over one ``mem_pair``, their ``run()`` tasks started, and on exit both closed
  and both ``run()`` tasks checked to have returned.
- ``raw_peer(twin)``: one session against a bare ``MemTransport`` end (``RawPeer``), to
  send hand-made frames and observe exactly which frames the session writes.
- ``pull(transport)``: a ``FrameQueue`` attached to a bare transport end, to read the
  frames it receives one at a time (``await pull(b).recv_frame()``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from rapace import NotFound, RpcSession, mem_pair
from rapace.transport import MemTransport, TransportClosed
from rapace.wire import FrameFlags, compute_method_id

T = TypeVar("T")

DATA = int(FrameFlags.DATA)
CONTROL = int(FrameFlags.CONTROL)
EOS = int(FrameFlags.EOS)
ERROR = int(FrameFlags.ERROR)
NO_REPLY = int(FrameFlags.NO_REPLY)
REQUEST = DATA | EOS
CANCEL_CHANNEL = 3  # the control verb
CLIENT_CANCEL, DEADLINE_EXCEEDED = 0, 1  # its reasons
NOTIFY = DATA | EOS | NO_REPLY

ECHO = compute_method_id("Test", "echo")
SLOW = compute_method_id("Test", "slow")
FAIL = compute_method_id("Test", "fail")
PING = compute_method_id("Test", "ping")
STREAM = compute_method_id("Test", "stream")

TEST_TIMEOUT = 10.0
"""Seconds any one test may run before it counts as a hang."""


def run(
    coro: Coroutine[Any, Any, T],
    timeout: float = TEST_TIMEOUT,
    *,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> T:
    """Run ``coro`` in a fresh loop (asyncio's, or ``loop_factory``'s); fail (not hang)
    after ``timeout`` seconds, and fail on errors the loop reports (e.g. an exception
    never retrieved)."""
    loop_errors: list[dict[str, Any]] = []

    async def guarded() -> T:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: loop_errors.append(context)
        )
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await coro
        except TimeoutError:
            if deadline.expired():
                pytest.fail(f"the test hung: still running after {timeout} s")
            raise

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(guarded())
    if loop_errors:
        described = [f"{c.get('message')}: {c.get('exception')!r}" for c in loop_errors]
        pytest.fail(f"the event loop reported errors: {described}")
    return result


async def wait_for(
    event: asyncio.Event | asyncio.Future[Any], what: str, timeout: float = 5.0
) -> Any:
    """Await an event/future with a clear failure message instead of a bare hang."""
    try:
        async with asyncio.timeout(timeout):
            if isinstance(event, asyncio.Event):
                await event.wait()
                return None
            return await event
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def settle(iterations: int = 10) -> None:
    """Let the loop run a few iterations (to show something does NOT happen)."""
    for _ in range(iterations):
        await asyncio.sleep(0)


async def until(predicate: Callable[[], bool], what: str, iterations: int = 100_000) -> None:
    """Let the loop run until ``predicate`` holds (a state no event reports), failing
    after ``iterations`` loop passes; no wall-clock sleep."""
    for _ in range(iterations):
        if predicate():
            return
        await asyncio.sleep(0)
    pytest.fail(f"{what}: not reached after {iterations} loop iterations")


class FrameQueue:
    """Reads a transport one frame at a time (tests only; transports push to one sink).

    It holds at most one delivered batch: the transport is paused while the queue holds
    frames nobody has read, so a sender still meets the transport's own bound.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self._frames: collections.deque[Any] = collections.deque()
        self._lost = False
        self._failure: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._holding = False
        transport.attach(self)

    def frames_received(self, frames: list[Any]) -> None:
        self._frames.extend(frames)
        if not self._holding:
            self._holding = True
            self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._failure = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv_frame(self) -> Any:
        """The next frame; ``TransportClosed`` once the transport ended and all were read."""
        while not self._frames:
            if self._lost:
                raise TransportClosed("transport closed") from self._failure
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frame = self._frames.popleft()
        if not self._frames and self._holding:
            self._holding = False
            self.transport.resume_reading()
        return frame


_queues: weakref.WeakKeyDictionary[Any, FrameQueue] = weakref.WeakKeyDictionary()


def pull(transport: Any) -> FrameQueue:
    """The ``FrameQueue`` of ``transport``, attached on first use."""
    queue = _queues.get(transport)
    if queue is None:
        queue = _queues[transport] = FrameQueue(transport)
    return queue


@dataclass
class Pair:
    client: RpcSession
    server: RpcSession
    client_transport: MemTransport
    server_transport: MemTransport
    client_run: asyncio.Task[None]
    server_run: asyncio.Task[None]


async def _finish(tasks: list[asyncio.Task[None]], check_clean: bool) -> None:
    done, pending = await asyncio.wait(tasks, timeout=3.0)
    for task in pending:
        task.cancel()
    if pending:
        pytest.fail(f"run() did not return after the session closed: {pending}")
    if check_clean:
        for task in done:
            if task.cancelled():
                continue
            exc = task.exception()
            if exc is not None:
                raise AssertionError(f"run() raised {exc!r}") from exc


@contextlib.asynccontextmanager
async def session_pair(
    twin: Any,
    *,
    client_dispatcher: Callable[[Any], Awaitable[Any]] | None = None,
    server_dispatcher: Callable[[Any], Awaitable[Any]] | None = None,
    client_kwargs: dict[str, Any] | None = None,
    server_kwargs: dict[str, Any] | None = None,
    max_in_flight: int = 64,
    check_clean: bool = True,
) -> AsyncIterator[Pair]:
    """Client (start 1) and server (start 2) sessions over one mem pair, both running."""
    a, b = mem_pair(max_in_flight)
    client = RpcSession(a, 1, **(client_kwargs or {}))
    server = RpcSession(b, 2, **(server_kwargs or {}))
    if client_dispatcher is not None:
        client.set_dispatcher(client_dispatcher)
    if server_dispatcher is not None:
        server.set_dispatcher(server_dispatcher)
    client_run = asyncio.create_task(client.run(), name="client.run")
    server_run = asyncio.create_task(server.run(), name="server.run")
    await asyncio.sleep(0)  # both run() tasks attached / pulling
    ok = False
    try:
        yield Pair(client, server, a, b, client_run, server_run)
        ok = True
    finally:
        client.close()
        server.close()
        if ok:
            await _finish([client_run, server_run], check_clean)
        else:
            await asyncio.wait([client_run, server_run], timeout=3.0)


class RawPeer:
    """A bare mem transport end: send hand-made frames, read exactly what arrives."""

    def __init__(self, twin: Any, transport: MemTransport) -> None:
        self.twin = twin
        self.transport = transport
        self._msg_ids = iter(range(1000, 10**9))

    def frame(
        self,
        channel_id: int,
        method_id: int,
        flags: int,
        payload: bytes = b"",
        msg_id: int | None = None,
    ) -> Any:
        if msg_id is None:
            msg_id = next(self._msg_ids)
        return self.twin.frame.build_frame(msg_id, channel_id, method_id, flags, payload)

    async def send(
        self,
        channel_id: int,
        method_id: int,
        flags: int,
        payload: bytes = b"",
        msg_id: int | None = None,
    ) -> Any:
        frame = self.frame(channel_id, method_id, flags, payload, msg_id)
        await self.transport.send_frame(frame)
        return frame

    async def recv(self, timeout: float = 5.0) -> Any:
        try:
            async with asyncio.timeout(timeout):
                return await pull(self.transport).recv_frame()
        except TimeoutError:
            pytest.fail("timed out waiting for a frame on the raw peer")

    async def recv_cancel(self, channel_id: int, reason: int) -> None:
        """Assert the next frame is ``CancelChannel { channel_id, reason }`` (bytes built
        here by hand: a one-byte varint channel id, then the reason's index)."""
        assert channel_id < 0x80
        frame = await self.recv()
        assert (frame.desc.channel_id, frame.desc.flags, frame.desc.method_id) == (
            0,
            CONTROL,
            CANCEL_CHANNEL,
        ), frame
        assert frame.payload == bytes([channel_id, reason])

    async def recv_closed(self) -> None:
        """Assert the next thing the raw end sees is the end of the connection."""
        with pytest.raises(TransportClosed):
            await self.recv()


@dataclass
class RawSetup:
    raw: RawPeer
    session: RpcSession
    session_transport: MemTransport
    session_run: asyncio.Task[None]


@contextlib.asynccontextmanager
async def raw_peer(
    twin: Any,
    *,
    start_channel_id: int = 1,
    dispatcher: Callable[[Any], Awaitable[Any]] | None = None,
    session_kwargs: dict[str, Any] | None = None,
    max_in_flight: int = 64,
    check_clean: bool = True,
) -> AsyncIterator[RawSetup]:
    """A running session on one end of a mem pair; a ``RawPeer`` on the other."""
    a, b = mem_pair(max_in_flight)
    session = RpcSession(a, start_channel_id, **(session_kwargs or {}))
    if dispatcher is not None:
        session.set_dispatcher(dispatcher)
    session_run = asyncio.create_task(session.run(), name="session.run")
    await asyncio.sleep(0)
    ok = False
    try:
        yield RawSetup(RawPeer(twin, b), session, a, session_run)
        ok = True
    finally:
        session.close()
        b.close()
        if ok:
            await _finish([session_run], check_clean)
        else:
            await asyncio.wait([session_run], timeout=3.0)


async def echo_dispatcher(frame: Any) -> bytes:
    """Answers ECHO with its payload, PING with b"pong"; anything else is NotFound."""
    method_id = frame.desc.method_id
    if method_id == ECHO:
        return bytes(frame.payload)
    if method_id == PING:
        return b"pong"
    raise NotFound(f"unknown method_id: {method_id}")
