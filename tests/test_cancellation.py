"""Cancellation and deadlines reach the server: a call the client gave up on stops there.

A cancelled or timed-out call sends ``CancelChannel`` (control channel, verb 3) and the
server cancels the handler task (``CancelledError`` inside it, ``finally`` runs) without
answering; every request carries its remaining budget in ``deadline_ns``, which the
server enforces (``DeadlineExceeded``), refuses when already spent, and hands down to the
calls the handler makes (``rapace.current_deadline``). Both twins, over ``mem_pair``;
the cross-process cases over Unix and TCP are at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from net_helpers import ECHO as ECHO_NET
from net_helpers import (
    HANG,
    HANG_CANCELLED,
    KINDS,
    listen_address,
    raw_frame,
    read_raw_frame,
    short_tmpdir,
    spawn,
)
from session_helpers import (
    CLIENT_CANCEL,
    CONTROL,
    DEADLINE_EXCEEDED,
    ECHO,
    EOS,
    ERROR,
    NO_REPLY,
    REQUEST,
    SLOW,
    STREAM,
    raw_peer,
    run,
    session_pair,
    until,
    wait_for,
)

import rapace
from rapace import DeadlineExceeded, RpcSession, mem_pair
from rapace.connection import parse_address
from rapace.deadline import stopped_by_deadline
from rapace.errors import parse_error_payload
from rapace.wire import FrameFlags, compute_method_id

SWALLOW = compute_method_id("Cancel", "swallow")
GATED = compute_method_id("Cancel", "gated")
DEADLINE = compute_method_id("Cancel", "deadline")
NESTED = compute_method_id("Cancel", "nested")
NESTED_GATHER = compute_method_id("Cancel", "nested_gather")
CANCEL = int(FrameFlags.CANCEL)
CANCEL_CHANNEL = 3


@dataclass
class Handlers:
    """A dispatcher whose handlers report, through events, what happened to them."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    runs: int = 0
    cancels: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    deadlines: list[float | None] = field(default_factory=list)
    downstream: RpcSession | None = None
    stream_closed: asyncio.Event = field(default_factory=asyncio.Event)
    by_deadline: list[bool] = field(default_factory=list)
    """For each cancelled SLOW handler: did its deadline stop it (``stopped_by_deadline``)?"""

    async def __call__(self, frame: Any) -> bytes | None:
        method_id = frame.desc.method_id
        self.runs += 1
        self.deadlines.append(rapace.current_deadline())
        if method_id == ECHO:
            return bytes(frame.payload)
        if method_id == SLOW:
            self.started.set()
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError as exc:
                self.cancels += 1
                self.by_deadline.append(stopped_by_deadline(exc))
                self.cancelled.set()
                raise
            finally:
                self.finished.set()
        if method_id == GATED:  # answers once the test opens the gate
            await self.gate.wait()
            return b"gated"
        if method_id == SWALLOW:  # ignores its cancellation and answers anyway
            self.started.set()
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                self.cancelled.set()
            return b"swallowed"
        if method_id == DEADLINE:
            return b""
        if method_id in (NESTED, NESTED_GATHER):
            assert self.downstream is not None
            downstream = self.downstream
            self.started.set()

            async def hop() -> bytes:
                return bytes((await downstream.call(downstream.next_channel_id(), SLOW)).payload)

            if method_id == NESTED_GATHER:  # a subtask inherits the deadline too
                (result,) = await asyncio.gather(hop())
                return result
            return await hop()
        if method_id == STREAM:
            return await self._stream(frame)
        raise rapace.Unimplemented(f"unknown method {method_id:#x}")

    async def _stream(self, frame: Any) -> None:
        """A server stream written by hand: items until cancelled."""
        self.started.set()
        try:
            while True:
                await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            self.stream_closed.set()


def clean(session: RpcSession) -> bool:
    """Nothing of the peer's calls is left behind in ``session``."""
    return (
        not session._handlers
        and not session._cancelling
        and not session._waiting
        and not session._waiting_by_channel
        and not session._reused
        and session._running_bytes == 0
        and session._waiting_bytes == 0
        and not session._handler_deadlines.by_key
    )


# -- the client gives up: the handler is cancelled, nothing is answered ------------------


def test_a_cancelled_call_cancels_its_handler(twin: Any) -> None:
    handlers = Handlers()

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=handlers) as p:
            call = asyncio.create_task(p.client.call(p.client.next_channel_id(), SLOW))
            await wait_for(handlers.started.wait(), "the handler to start")
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await wait_for(handlers.finished.wait(), "the handler's finally block")
            assert handlers.cancelled.is_set()
            await until(lambda: clean(p.server), "the server to forget the call")
            assert p.server.stats.requests_cancelled == 1
            # the session serves on, and the cancelled call was answered with nothing
            reply = await p.client.call(p.client.next_channel_id(), ECHO, b"still")
            assert reply.payload == b"still"

    run(main())


def test_a_timed_out_call_cancels_its_handler(twin: Any) -> None:
    handlers = Handlers()

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=handlers) as p:
            with pytest.raises(DeadlineExceeded):
                await p.client.call(p.client.next_channel_id(), SLOW, timeout=0.05)
            await wait_for(handlers.finished.wait(), "the handler's finally block")
            assert handlers.cancelled.is_set()
            await until(lambda: clean(p.server), "the server to forget the call")
            # either the client's CancelChannel or the server's own deadline stopped it
            stats = p.server.stats
            assert stats.requests_cancelled + stats.requests_expired == 1

    run(main())


def test_the_session_default_timeout_cancels_the_handler_too(twin: Any) -> None:
    handlers = Handlers()

    async def main() -> None:
        async with session_pair(
            twin, server_dispatcher=handlers, client_kwargs={"call_timeout": 0.05}
        ) as p:
            with pytest.raises(DeadlineExceeded):
                await p.client.call(p.client.next_channel_id(), SLOW)
            await wait_for(handlers.finished.wait(), "the handler's finally block")
            assert handlers.cancelled.is_set()

    run(main())


def test_the_client_sends_cancel_channel_with_the_reason(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            session = s.session
            timed = asyncio.create_task(session.call(1, SLOW, timeout=0.05))
            request = await s.raw.recv()
            assert request.desc.channel_id == 1
            await s.raw.recv_cancel(1, DEADLINE_EXCEEDED)
            with pytest.raises(DeadlineExceeded):
                await timed
            cancelled = asyncio.create_task(session.call(3, SLOW))
            await s.raw.recv()
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            await s.raw.recv_cancel(3, CLIENT_CANCEL)
            # an answered call sends no cancel: the next frame is the next request
            answered = asyncio.create_task(session.call(5, ECHO, b"x"))
            request = await s.raw.recv()
            await s.raw.send(5, 0, REQUEST, b"x", msg_id=request.desc.msg_id)
            await answered
            follow = asyncio.create_task(session.call(7, ECHO, b"y"))
            request = await s.raw.recv()
            assert request.desc.channel_id == 7
            await s.raw.send(7, 0, REQUEST, b"y", msg_id=request.desc.msg_id)
            await follow

    run(main())


def test_a_handler_that_swallows_the_cancel_still_answers_nothing(twin: Any) -> None:
    handlers = Handlers()

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2, dispatcher=handlers) as s:
            await s.raw.send(1, SWALLOW, REQUEST, b"")
            await wait_for(handlers.started.wait(), "the handler to start")
            await s.raw.send(0, CANCEL_CHANNEL, CONTROL, bytes([1, CLIENT_CANCEL]))
            await wait_for(handlers.cancelled.wait(), "the cancel to reach the handler")
            await until(lambda: clean(s.session), "the server to forget the call")
            # the next frame is the answer to a fresh call, not "swallowed"
            await s.raw.send(3, ECHO, REQUEST, b"next")
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.payload) == (3, b"next")

    run(main())


def test_a_cancel_in_the_same_batch_as_its_request_runs_nothing(twin: Any) -> None:
    """The handler task has not taken its first step when the cancel is routed (on 3.11;
    on 3.12 it started eagerly and is cancelled at its first suspension)."""
    handlers = Handlers()

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2, dispatcher=handlers) as s:
            request = s.raw.frame(1, SLOW, REQUEST, b"payload")
            cancel = s.raw.frame(0, CANCEL_CHANNEL, CONTROL, bytes([1, CLIENT_CANCEL]))
            s.session.frames_received([request, cancel])
            await until(lambda: clean(s.session), "the server to forget the call")
            if sys.version_info < (3, 12):
                assert handlers.runs == 0
            else:
                assert handlers.cancelled.is_set()
            assert s.session.stats.requests_cancelled == 1
            await s.raw.send(3, ECHO, REQUEST, b"next")
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.payload) == (3, b"next")

    run(main())


@pytest.mark.parametrize(
    "payload",
    [
        bytes([9, CLIENT_CANCEL]),  # a channel with no call
        bytes([0, CLIENT_CANCEL]),  # channel 0
        bytes([2, CLIENT_CANCEL]),  # a channel of the server's own parity
        bytes([1, 7]),  # an unknown reason
        bytes([1]),  # truncated
        bytes([1, CLIENT_CANCEL, 0]),  # trailing bytes
        b"\xff\xff\xff\xff\xff\xff",  # an overlong varint
    ],
)
def test_cancels_that_match_nothing_change_nothing(twin: Any, payload: bytes) -> None:
    handlers = Handlers()

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2, dispatcher=handlers) as s:
            await s.raw.send(1, SLOW, REQUEST, b"")
            await wait_for(handlers.started.wait(), "the handler to start")
            await s.raw.send(0, CANCEL_CHANNEL, CONTROL, payload)
            await s.raw.send(3, ECHO, REQUEST, b"after")
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.payload) == (3, b"after")
            assert not handlers.cancelled.is_set()
            assert list(s.session._handlers) == [1]
            # a real cancel still works afterwards, and a second one is a no-op
            for _ in range(2):
                await s.raw.send(0, CANCEL_CHANNEL, CONTROL, bytes([1, CLIENT_CANCEL]))
            await wait_for(handlers.finished.wait(), "the handler's finally block")
            await until(lambda: clean(s.session), "the server to forget the call")
            assert s.session.stats.requests_cancelled == 1
            assert handlers.by_deadline == [False]  # the client cancelled: not its deadline

    run(main())


def test_a_waiting_request_cancelled_never_runs(twin: Any) -> None:
    handlers = Handlers()

    async def main() -> None:
        # Two slots (at one, the queue's first request would pause reading: the cancel
        # would be read only once the queue drains).
        async with raw_peer(
            twin, start_channel_id=2, dispatcher=handlers, session_kwargs={"max_pending": 2}
        ) as s:
            server = s.session
            await s.raw.send(1, SLOW, REQUEST, b"")
            await s.raw.send(5, SWALLOW, REQUEST, b"")
            await until(lambda: handlers.runs == 2, "both slots to be taken")
            await s.raw.send(3, ECHO, REQUEST, b"queued")
            await until(lambda: len(server._waiting) == 1, "the second request to wait")
            assert server._waiting_bytes == len(b"queued")
            await s.raw.send(0, CANCEL_CHANNEL, CONTROL, bytes([3, CLIENT_CANCEL]))
            await until(lambda: server._waiting_bytes == 0, "its bytes to be released")
            await s.raw.send(0, CANCEL_CHANNEL, CONTROL, bytes([1, CLIENT_CANCEL]))
            await wait_for(handlers.finished.wait(), "the first handler's finally block")
            await until(lambda: not server._waiting, "the queue to be skipped past")
            assert handlers.runs == 2  # the queued echo never ran
            assert server.stats.requests_cancelled == 2
            await s.raw.send(0, CANCEL_CHANNEL, CONTROL, bytes([5, CLIENT_CANCEL]))
            await until(lambda: clean(server), "the server to forget all three")
            await s.raw.send(7, ECHO, REQUEST, b"next")
            frame = await s.raw.recv()  # nothing was answered before this
            assert (frame.desc.channel_id, frame.payload) == (7, b"next")

    run(main())


def test_cancel_channel_stops_a_server_stream(twin: Any) -> None:
    handlers = Handlers()

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2, dispatcher=handlers) as s:
            await s.raw.send(1, STREAM, REQUEST | NO_REPLY, b"")
            await wait_for(handlers.started.wait(), "the stream to start")
            await s.raw.send(0, CANCEL_CHANNEL, CONTROL, bytes([1, CLIENT_CANCEL]))
            await wait_for(handlers.stream_closed.wait(), "the stream's finally block")
            await until(lambda: clean(s.session), "the server to forget the stream")
            await s.raw.send(3, ECHO, REQUEST, b"next")
            frame = await s.raw.recv()  # no error frame for the cancelled stream
            assert (frame.desc.channel_id, frame.payload) == (3, b"next")

    run(main())


def test_the_old_cancel_flag_still_stops_a_server_stream(twin: Any) -> None:
    """Earlier versions of this library sent CANCEL|EOS on the stream's channel."""
    handlers = Handlers()

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2, dispatcher=handlers) as s:
            await s.raw.send(1, STREAM, REQUEST | NO_REPLY, b"")
            await wait_for(handlers.started.wait(), "the stream to start")
            await s.raw.send(1, 0, CANCEL | EOS, b"")
            await wait_for(handlers.stream_closed.wait(), "the stream's finally block")
            assert handlers.cancelled.is_set()

    run(main())


def test_a_typed_stream_closed_early_cancels_the_generator(twin: Any) -> None:
    closed = asyncio.Event()

    @rapace.service
    class Ticker:
        async def ticks(self) -> AsyncIterator[rapace.u32]: ...

    class TickerImpl(Ticker):
        async def ticks(self) -> AsyncIterator[int]:  # type: ignore[override]
            try:
                n = 0
                while True:
                    yield n
                    n += 1
            finally:
                closed.set()

    async def main() -> None:
        async with session_pair(twin) as p:
            rapace.register_services(p.server, TickerImpl())
            ticker = rapace.client(Ticker, p.client)
            async with await ticker.ticks() as items:
                async for n in items:
                    if n == 3:
                        break
            await wait_for(closed.wait(), "the generator's finally block")
            await until(lambda: clean(p.server), "the server to forget the stream")

    run(main())


# -- deadlines on the wire ------------------------------------------------------------------


def test_the_request_carries_its_remaining_budget(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, session_kwargs={"call_timeout": 7.0}) as s:
            default = asyncio.create_task(s.session.call(1, ECHO, b""))
            own = asyncio.create_task(s.session.call(3, ECHO, b"", timeout=0.25))
            forever = asyncio.create_task(s.session.call(5, ECHO, b"", timeout=math.inf))
            budgets = {}
            for _ in range(3):
                request = await s.raw.recv()
                budgets[request.desc.channel_id] = request.desc.deadline_ns
                await s.raw.send(request.desc.channel_id, 0, REQUEST, b"", request.desc.msg_id)
            await asyncio.gather(default, own, forever)
            assert budgets == {1: 7_000_000_000, 3: 250_000_000, 5: 0xFFFFFFFFFFFFFFFF}

    run(main())


def test_the_server_enforces_the_budget(twin: Any) -> None:
    """A caller that never cancels (a peer without the control channel) still gets its
    DeadlineExceeded from the server, whose handler was cancelled."""
    handlers = Handlers()

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2, dispatcher=handlers) as s:
            s.session.name_methods({SLOW: "Test.slow"})
            request = s.raw.frame(1, SLOW, REQUEST, b"")
            request.desc.deadline_ns = 50_000_000
            sent = time.monotonic()
            await s.raw.transport.send_frame(request)
            answer = await s.raw.recv()
            elapsed = time.monotonic() - sent
            assert answer.desc.flags & ERROR and answer.desc.channel_id == 1
            error = parse_error_payload(answer.payload)
            assert isinstance(error, DeadlineExceeded)
            assert "Test.slow" in str(error) and "deadline" in str(error)
            assert elapsed >= 0.05
            assert handlers.cancelled.is_set() and handlers.finished.is_set()
            assert handlers.by_deadline == [True]  # (what an interceptor reports)
            assert s.session.stats.requests_expired == 1
            await until(lambda: clean(s.session), "the server to forget the call")

    run(main())


def test_a_spent_budget_is_refused_without_running(twin: Any) -> None:
    handlers = Handlers()

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2, dispatcher=handlers) as s:
            request = s.raw.frame(1, ECHO, REQUEST, b"x")
            request.desc.deadline_ns = 0
            await s.raw.transport.send_frame(request)
            answer = await s.raw.recv()
            assert answer.desc.flags & ERROR and answer.desc.msg_id == request.desc.msg_id
            assert isinstance(parse_error_payload(answer.payload), DeadlineExceeded)
            assert handlers.runs == 0
            assert s.session.stats.requests_expired == 1

    run(main())


def test_a_request_that_expires_while_it_waits_is_refused_without_running(twin: Any) -> None:
    handlers = Handlers()

    async def main() -> None:
        async with raw_peer(
            twin, start_channel_id=2, dispatcher=handlers, session_kwargs={"max_pending": 2}
        ) as s:
            await s.raw.send(1, SLOW, REQUEST, b"")
            await s.raw.send(5, SLOW, REQUEST | NO_REPLY, b"")  # (answers nothing when cancelled)
            await until(lambda: handlers.runs == 2, "both slots to be taken")
            queued = s.raw.frame(3, ECHO, REQUEST, b"")
            queued.desc.deadline_ns = 1_000_000  # 1 ms: gone long before a slot frees
            await s.raw.transport.send_frame(queued)
            await until(lambda: len(s.session._waiting) == 1, "the request to wait")
            expired_at = time.monotonic() + 0.002
            await until(lambda: time.monotonic() > expired_at, "its deadline to pass")
            await s.raw.send(0, CANCEL_CHANNEL, CONTROL, bytes([1, CLIENT_CANCEL]))
            answer = await s.raw.recv()
            assert answer.desc.channel_id == 3 and answer.desc.flags & ERROR
            assert isinstance(parse_error_payload(answer.payload), DeadlineExceeded)
            assert handlers.runs == 2
            assert s.session.stats.requests_expired == 1
            await s.raw.send(0, CANCEL_CHANNEL, CONTROL, bytes([5, CLIENT_CANCEL]))
            await until(lambda: clean(s.session), "the server to forget all three")

    run(main())


def test_a_handler_reads_its_deadline(twin: Any) -> None:
    handlers = Handlers()

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=handlers) as p:
            before = time.monotonic()
            await p.client.call(p.client.next_channel_id(), DEADLINE, timeout=5.0)
            after = time.monotonic()
            await p.client.call(p.client.next_channel_id(), DEADLINE, timeout=math.inf)
            first, second = handlers.deadlines
            assert first is not None and before + 5.0 <= first + 0.01 <= after + 5.0 + 0.01
            assert second is None
            assert rapace.current_deadline() is None  # outside any handler

    run(main())


@pytest.mark.parametrize("method", [NESTED, NESTED_GATHER], ids=["direct", "in-a-subtask"])
def test_calls_made_while_serving_inherit_the_deadline(twin: Any, method: int) -> None:
    """Client -> middle -> back end: the middle's call to the back end (no timeout of its
    own, a 30 s session default) carries what is left of the client's 0.2 s and fails
    with DeadlineExceeded when it runs out; the back end's handler is cancelled."""
    middle, back = Handlers(), Handlers()

    async def main() -> None:
        async with (
            session_pair(twin, server_dispatcher=middle) as front,
            session_pair(twin, server_dispatcher=back) as rear,
        ):
            middle.downstream = rear.client
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await front.client.call(front.client.next_channel_id(), method, timeout=0.2)
            await wait_for(back.finished.wait(), "the back end's handler to end")
            assert back.cancelled.is_set()
            (inherited,) = back.deadlines
            assert inherited is not None and inherited <= started + 0.2 + 0.05
            await wait_for(until(lambda: clean(rear.server), "the back end to forget"), "it")

    run(main())


def test_a_call_from_a_handler_past_its_deadline_is_not_sent(twin: Any) -> None:
    async def main() -> None:
        a, _b = mem_pair()
        session = RpcSession(a, 1)
        token = rapace.context.serving_call.set((time.monotonic() - 1.0, None, None, None))
        try:
            with pytest.raises(DeadlineExceeded, match="has passed"):
                await session.call(1, ECHO, b"")
            assert session.pending_channel_ids() == []
        finally:
            rapace.context.serving_call.reset(token)
            session.close()

    run(main())


# -- across processes ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_reaches_a_server_in_another_process(twin: Any, kind: str) -> None:
    """The child server's HANG handler is cancelled by our cancel and by our timeout;
    HANG_CANCELLED waits (on the server) until it has seen that many and says so."""

    async def main(address: str) -> None:
        async with rapace.connect(address) as session:
            call = asyncio.create_task(session.call(session.next_channel_id(), HANG))
            # an echo round trip later, the HANG request is being served
            await session.call(session.next_channel_id(), ECHO_NET, b"")
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
            seen = await session.call(session.next_channel_id(), HANG_CANCELLED, b"\x01")
            assert seen.payload == b"1"
            with pytest.raises(DeadlineExceeded):
                await session.call(session.next_channel_id(), HANG, timeout=0.1)
            seen = await session.call(session.next_channel_id(), HANG_CANCELLED, b"\x02")
            assert seen.payload == b"2"

    with short_tmpdir() as tmp, spawn(twin.name, "serve", listen_address(kind, tmp)) as child:
        run(main(child.address))


# -- found in review: each once a defect ---------------------------------------------------


def test_a_peer_cancel_for_its_deadline_is_answered_nothing(twin: Any) -> None:
    """The peer's CancelChannel(DeadlineExceeded) is the peer giving up (its own timer):
    no DeadlineExceeded goes back on the channel, which the peer may use again."""
    handlers = Handlers()

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2, dispatcher=handlers) as s:
            await s.raw.send(1, SLOW, REQUEST, b"")
            await wait_for(handlers.started.wait(), "the handler to start")
            await s.raw.send(0, CANCEL_CHANNEL, CONTROL, bytes([1, DEADLINE_EXCEEDED]))
            await wait_for(handlers.finished.wait(), "the handler's finally block")
            await s.raw.send(1, ECHO, REQUEST, b"again")  # the same channel, reused
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.desc.flags, frame.payload) == (
                1,
                REQUEST,
                b"again",
            )
            assert s.session.stats.requests_cancelled == 1
            assert s.session.stats.requests_expired == 0
            assert handlers.by_deadline == [True]  # the peer gave up for its deadline

    run(main())


def test_a_queued_request_held_back_by_the_byte_budget_can_still_be_cancelled(
    twin: Any,
) -> None:
    handlers = Handlers()

    async def main() -> None:
        async with raw_peer(
            twin,
            start_channel_id=2,
            dispatcher=handlers,
            session_kwargs={"max_request_bytes": 10_000},
        ) as s:
            server = s.session
            await s.raw.send(1, SLOW, REQUEST, bytes(5000))  # A: runs until cancelled
            await s.raw.send(3, GATED, REQUEST, bytes(1000))  # C: runs until the gate opens
            await until(lambda: handlers.runs == 2, "A and C to run")
            await s.raw.send(5, ECHO, REQUEST, bytes(6000))  # B: over the budget, waits
            await until(lambda: len(server._waiting) == 1, "B to wait")
            handlers.gate.set()  # C ends; B still does not fit next to A
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.payload) == (3, b"gated")
            await until(lambda: not server._handlers.get(3), "C to be gone")
            assert len(server._waiting) == 1
            await s.raw.send(0, CANCEL_CHANNEL, CONTROL, bytes([5, CLIENT_CANCEL]))
            await until(lambda: server._waiting_bytes == 0, "B to be withdrawn")
            assert server._waiting[0].frame is None  # its payload is let go already
            await s.raw.send(0, CANCEL_CHANNEL, CONTROL, bytes([1, CLIENT_CANCEL]))
            await until(lambda: clean(server), "the server to forget all three")
            assert handlers.runs == 2  # B never ran
            await s.raw.send(7, ECHO, REQUEST, b"next")
            frame = await s.raw.recv()  # nothing was answered for A or B
            assert (frame.desc.channel_id, frame.payload) == (7, b"next")

    run(main())


def test_a_handler_without_a_deadline_does_not_inherit_another_calls(twin: Any) -> None:
    """Over mem_pair a request is routed in the context of the task that sent it: a
    handler with a deadline that notifies another session must not hand it its deadline."""
    seen: list[float | None] = []
    got = asyncio.Event()

    async def back_end(frame: Any) -> bytes:
        seen.append(rapace.current_deadline())
        got.set()
        return b""

    async def main() -> None:
        async with (
            session_pair(twin, server_dispatcher=back_end) as rear,
        ):

            async def middle(frame: Any) -> bytes:
                assert rapace.current_deadline() is not None
                await rear.client.notify(ECHO, b"note")
                return b"ok"

            async with session_pair(twin, server_dispatcher=middle) as front:
                await front.client.call(front.client.next_channel_id(), ECHO, timeout=5.0)
                await wait_for(got.wait(), "the notification")
                assert seen == [None]

    run(main())


def test_a_handler_on_a_reused_channel_can_be_cancelled(twin: Any) -> None:
    """The peer cancels a call and retries on the same channel in one batch, while the
    first handler is still ending: its next cancel reaches the retry."""
    handlers = Handlers()

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2, dispatcher=handlers) as s:
            await s.raw.send(5, SLOW, REQUEST, b"one")
            await wait_for(handlers.started.wait(), "the first handler")
            s.session.frames_received(
                [
                    s.raw.frame(0, CANCEL_CHANNEL, CONTROL, bytes([5, CLIENT_CANCEL])),
                    s.raw.frame(5, SLOW, REQUEST, b"two"),
                ]
            )
            await until(lambda: handlers.runs == 2 and handlers.cancels == 1, "the retry")
            await s.raw.send(0, CANCEL_CHANNEL, CONTROL, bytes([5, CLIENT_CANCEL]))
            await until(lambda: handlers.cancels == 2, "the retry to be cancelled")
            await until(lambda: clean(s.session), "the server to forget both")
            assert s.session.stats.requests_cancelled == 2

    run(main())


def test_a_shutdown_answers_a_handler_that_had_not_started(twin: Any) -> None:
    """The grace ends in the loop pass that routed a request: on 3.11 its handler has
    not taken its first step; it is still answered Unavailable and forgotten."""
    handlers = Handlers()

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2, dispatcher=handlers) as s:
            request = s.raw.frame(1, SLOW, REQUEST, b"abc")
            s.session.frames_received([request])
            s.session._abandon()
            answer = await s.raw.recv()
            assert answer.desc.channel_id == 1 and answer.desc.flags & ERROR
            assert isinstance(parse_error_payload(answer.payload), rapace.Unavailable)
            await until(lambda: clean(s.session), "the server to forget it")
            assert not s.session.busy

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_a_server_in_another_process_enforces_budgets(twin: Any, kind: str) -> None:
    """A raw client (no control channel, never cancels) sends the child server a HANG
    with a 50 ms budget and an ECHO whose budget is spent: the first is answered
    DeadlineExceeded once its handler was cancelled, the second at once."""

    async def main(address: str) -> None:
        parsed = parse_address(address)
        if parsed.kind == "unix":
            reader, writer = await asyncio.open_unix_connection(parsed.path)
        else:
            reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
        try:
            writer.write(raw_frame(1, 1, HANG, REQUEST, b"", deadline_ns=50_000_000))
            writer.write(raw_frame(2, 3, ECHO_NET, REQUEST, b"late", deadline_ns=0))
            answers = {}
            for _ in range(2):
                frame = await wait_for(read_raw_frame(reader), "an answer", 5.0)
                answers[frame.channel_id] = frame
            for channel_id in (1, 3):
                assert answers[channel_id].flags & ERROR
                error = parse_error_payload(answers[channel_id].payload)
                assert isinstance(error, DeadlineExceeded), error
            # the HANG handler was cancelled on the server (a call to check it)
            writer.write(raw_frame(3, 5, HANG_CANCELLED, REQUEST, b"\x01"))
            frame = await wait_for(read_raw_frame(reader), "the count", 5.0)
            assert frame.payload == b"1"
        finally:
            writer.close()

    with short_tmpdir() as tmp, spawn(twin.name, "serve", listen_address(kind, tmp)) as child:
        run(main(child.address))
