"""RpcSession (the seed's session, docs/protocol.md §5-7, DESIGN.md "Behaviour that must
hold everywhere"), run against both twins through the ``twin`` fixture.

Ordering is by events and futures only; ``settle()`` (a few ``sleep(0)``) is used just to
show that something does *not* happen, and every such check is backed by an ordering
argument (a later frame on the same in-order transport) where the protocol allows one.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from typing import Any

import pytest
from session_helpers import (
    CLIENT_CANCEL,
    CONTROL,
    DATA,
    DEADLINE_EXCEEDED,
    ECHO,
    EOS,
    ERROR,
    FAIL,
    NO_REPLY,
    NOTIFY,
    PING,
    REQUEST,
    SLOW,
    STREAM,
    echo_dispatcher,
    pull,
    raw_peer,
    run,
    session_pair,
    settle,
    wait_for,
)

import rapace
from rapace import (
    DeadlineExceeded,
    ErrorCode,
    Internal,
    NotFound,
    ResourceExhausted,
    RpcError,
    RpcSession,
    SessionClosed,
    Unimplemented,
    mem_pair,
)
from rapace.wire import encode_error_payload, parse_error_payload

# -- unary calls ---------------------------------------------------------------------------


def test_bidirectional_rpc_over_one_transport(twin: Any) -> None:
    seen: dict[str, list[Any]] = {"client": [], "server": []}

    def dispatcher(side: str) -> Any:
        async def handle(frame: Any) -> bytes:
            seen[side].append(frame.desc)
            return side.encode() + b":" + bytes(frame.payload)

        return handle

    async def main() -> None:
        async with session_pair(
            twin,
            client_dispatcher=dispatcher("client"),
            server_dispatcher=dispatcher("server"),
        ) as p:
            c1, c2 = p.client.next_channel_id(), p.client.next_channel_id()
            s1, s2 = p.server.next_channel_id(), p.server.next_channel_id()
            assert (c1, c2, s1, s2) == (1, 3, 2, 4)
            results = await asyncio.gather(
                p.client.call(c1, ECHO, b"a"),
                p.server.call(s1, ECHO, b"b"),
                p.client.call(c2, ECHO, b"c" * 40),  # out of line
                p.server.call(s2, ECHO, b""),
            )
            assert [r.payload for r in results] == [
                b"server:a",
                b"client:b",
                b"server:" + b"c" * 40,
                b"client:",
            ]
            for response, channel in zip(results, (c1, s1, c2, s2), strict=True):
                assert response.desc.channel_id == channel
                assert response.desc.method_id == 0
                assert response.desc.flags == REQUEST  # DATA|EOS
            # the server saw the client's odd channels, the client the server's even ones
            assert sorted(d.channel_id for d in seen["server"]) == [1, 3]
            assert sorted(d.channel_id for d in seen["client"]) == [2, 4]
            for desc in seen["server"] + seen["client"]:
                assert desc.method_id == ECHO
                assert desc.flags == REQUEST
            assert p.client.pending_channel_ids() == [] == p.server.pending_channel_ids()

    run(main())


def test_call_returns_a_frame_of_the_twin(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin, server_dispatcher=echo_dispatcher) as p:
            response = await p.client.call(p.client.next_channel_id(), ECHO, b"x")
            assert isinstance(response, twin.frame.Frame)

    run(main())


def test_1000_concurrent_calls_answered_out_of_order(twin: Any) -> None:
    n = 1000
    gates: dict[int, asyncio.Future[None]] = {}
    request_msg_ids: dict[int, int] = {}
    all_arrived = asyncio.Event()

    async def handler(frame: Any) -> bytes:
        index = int.from_bytes(frame.payload, "little")
        request_msg_ids[index] = frame.desc.msg_id
        gate = asyncio.get_running_loop().create_future()
        gates[index] = gate
        if len(gates) == n:
            all_arrived.set()
        await gate
        return b"result-%d" % index

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=handler) as p:
            channels = [p.client.next_channel_id() for _ in range(n)]
            calls = [
                asyncio.create_task(p.client.call(ch, ECHO, i.to_bytes(4, "little")))
                for i, ch in enumerate(channels)
            ]
            await wait_for(all_arrived, "all 1000 requests to reach the server")
            assert p.client.pending_channel_ids() == sorted(channels)
            order = list(range(n))
            random.Random(1234).shuffle(order)
            for index in order:
                gates[index].set_result(None)
            responses = await asyncio.gather(*calls)
            for i, (ch, response) in enumerate(zip(channels, responses, strict=True)):
                assert response.payload == b"result-%d" % i
                assert response.desc.channel_id == ch
                assert response.desc.msg_id == request_msg_ids[i]  # the echoed request msg_id
            assert len(set(request_msg_ids.values())) == n
            assert p.client.pending_channel_ids() == []

    run(main(), timeout=30)


def test_response_echoes_request_msg_id_and_channel(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, dispatcher=echo_dispatcher) as s:
            await s.raw.send(7, ECHO, REQUEST, b"hi", msg_id=4242)
            response = await s.raw.recv()
            assert response.desc.msg_id == 4242
            assert response.desc.channel_id == 7
            assert response.desc.method_id == 0
            assert response.desc.flags == REQUEST
            assert response.payload == b"hi"
            # errors echo too
            await s.raw.send(9, FAIL, REQUEST, b"", msg_id=4343)
            error = await s.raw.recv()
            assert (error.desc.msg_id, error.desc.channel_id, error.desc.method_id) == (4343, 9, 0)
            assert error.desc.flags == ERROR | EOS

    run(main())


def test_request_without_eos_is_dispatched(twin: Any) -> None:
    """docs/protocol.md §5: requests must not be required to carry EOS."""

    async def main() -> None:
        async with raw_peer(twin, dispatcher=echo_dispatcher) as s:
            await s.raw.send(5, ECHO, DATA, b"data-only")
            response = await s.raw.recv()
            assert (response.desc.channel_id, response.payload) == (5, b"data-only")

    run(main())


def test_handler_returning_a_frame(twin: Any) -> None:
    async def handler(frame: Any) -> Any:
        # msg_id/channel/method are filled in by the session; the flags are kept
        return twin.frame.build_frame(0, 0, 0, REQUEST, b"built")

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=handler) as p:
            response = await p.client.call(p.client.next_channel_id(), ECHO)
            assert response.payload == b"built"

    run(main())


def test_nested_call_back_into_the_caller(twin: Any) -> None:
    """A handler calls its caller over the same transport before answering."""
    holder: dict[str, RpcSession] = {}

    async def server_handler(frame: Any) -> bytes:
        server = holder["server"]
        inner = await server.call(server.next_channel_id(), PING, b"")
        deeper = await server.call(server.next_channel_id(), ECHO, b"again")
        return bytes(frame.payload) + b"|" + bytes(inner.payload) + b"|" + bytes(deeper.payload)

    async def client_handler(frame: Any) -> bytes:
        if frame.desc.method_id == ECHO:
            # one more level: the client's handler calls the server again
            client = holder["client"]
            r = await client.call(client.next_channel_id(), PING, b"")
            return bytes(frame.payload) + b"+" + bytes(r.payload)
        return await echo_dispatcher(frame)

    async def server_dispatch(frame: Any) -> bytes:
        if frame.desc.method_id == PING:
            return b"server-pong"
        return await server_handler(frame)

    async def main() -> None:
        async with session_pair(
            twin, client_dispatcher=client_handler, server_dispatcher=server_dispatch
        ) as p:
            holder["server"], holder["client"] = p.server, p.client
            response = await p.client.call(p.client.next_channel_id(), ECHO, b"outer")
            assert response.payload == b"outer|pong|again+server-pong"
            assert p.client.pending_channel_ids() == [] == p.server.pending_channel_ids()

    run(main())


def test_handlers_calling_back_do_not_deadlock_at_the_handler_limit(twin: Any) -> None:
    """``max_pending`` concurrent requests whose handlers each call back into the caller
    (so the server has ``max_pending`` handlers and ``max_pending`` pending calls, both
    within the limit): the handlers need the callback responses to finish, so the session
    must keep routing responses while its handlers are busy."""
    holder: dict[str, RpcSession] = {}
    n = 4

    async def server_dispatch(frame: Any) -> bytes:
        server = holder["server"]
        inner = await server.call(server.next_channel_id(), PING, b"")
        return bytes(frame.payload) + bytes(inner.payload)

    async def main() -> None:
        async with session_pair(
            twin,
            client_dispatcher=echo_dispatcher,
            server_dispatcher=server_dispatch,
            server_kwargs={"max_pending": 4, "call_timeout": 60.0},
            client_kwargs={"call_timeout": 60.0},
        ) as p:
            holder["server"] = p.server
            calls = [p.client.call(p.client.next_channel_id(), ECHO, b"%d" % i) for i in range(n)]
            results = await wait_for(
                asyncio.gather(*calls), "nested calls at the handler limit", timeout=2.0
            )
            assert [r.payload for r in results] == [b"%dpong" % i for i in range(n)]

    run(main(), timeout=8)


# -- timeouts, cancellation, limits -----------------------------------------------------


def test_timeout_raises_deadline_exceeded_and_leaves_no_entry(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            session = s.session
            with pytest.raises(DeadlineExceeded) as info:
                await session.call(3, SLOW, b"", timeout=0.02)
            assert isinstance(info.value, TimeoutError)
            assert isinstance(info.value, RpcError)
            assert info.value.code == ErrorCode.DeadlineExceeded
            assert session.pending_channel_ids() == []
            request = await s.raw.recv()  # the request did go out
            assert (request.desc.channel_id, request.desc.method_id) == (3, SLOW)

    run(main())


def test_late_response_after_timeout_is_dropped(
    twin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            session = s.session
            ch = session.next_channel_id()
            with pytest.raises(DeadlineExceeded):
                await session.call(ch, SLOW, b"", timeout=0.02)
            request = await s.raw.recv()
            await s.raw.recv_cancel(ch, DEADLINE_EXCEEDED)  # the server may stop working on it
            # the late answer, then an answer to a fresh call: the transport keeps order,
            # so once the fresh call returns the late frame has been routed (and dropped)
            await s.raw.send(ch, 0, REQUEST, b"late", msg_id=request.desc.msg_id)
            ch2 = session.next_channel_id()
            fresh = asyncio.create_task(session.call(ch2, ECHO, b"x"))
            request2 = await s.raw.recv()
            await s.raw.send(ch2, 0, REQUEST, b"fresh", msg_id=request2.desc.msg_id)
            assert (await fresh).payload == b"fresh"
            assert session.pending_channel_ids() == []
            assert not session.is_closed

    run(main())


def test_timeout_zero_or_negative_is_refused_without_leaking_an_entry(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            for bad in (0, -1.0):
                with pytest.raises(ValueError):
                    await s.session.call(5, SLOW, b"", timeout=bad)
                assert s.session.pending_channel_ids() == []
            with pytest.raises(TypeError):
                await s.session.call(5, SLOW, b"", timeout="1")  # type: ignore[arg-type]
            assert s.session.pending_channel_ids() == []

    run(main())


def test_timeout_covers_a_send_blocked_by_backpressure(twin: Any) -> None:
    """The deadline bounds the whole call, not only the wait after the send."""

    async def main() -> None:
        async with raw_peer(twin, max_in_flight=1) as s:
            # the raw peer never reads: once its 1-frame inbox is full, sends block
            filler = s.raw.frame(99, 0, DATA, b"filler")
            await s.session_transport.send_frame(filler)  # the raw end's only inbox slot
            with pytest.raises(DeadlineExceeded):
                await asyncio.wait_for(s.session.call(3, SLOW, b"", timeout=0.05), timeout=1.0)
            assert s.session.pending_channel_ids() == []

    run(main())


def test_session_call_timeout(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, session_kwargs={"call_timeout": 0.02}) as s:
            assert s.session.call_timeout == 0.02
            with pytest.raises(DeadlineExceeded):
                await s.session.call(1, SLOW, b"")
            assert s.session.pending_channel_ids() == []
            # a per-call timeout overrides the session's
            call = asyncio.create_task(s.session.call(3, SLOW, b"", timeout=30))
            request = await s.raw.recv()  # the timed-out call's, then its cancel
            assert request.desc.channel_id == 1
            assert request.desc.deadline_ns == 20_000_000  # its budget travels with it
            await s.raw.recv_cancel(1, DEADLINE_EXCEEDED)
            request = await s.raw.recv()
            assert request.desc.channel_id == 3
            assert request.desc.deadline_ns == 30_000_000_000
            await s.raw.send(3, 0, REQUEST, b"ok")
            assert (await call).payload == b"ok"

    run(main())


def test_env_call_timeout_and_max_pending(twin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAPACE_CALL_TIMEOUT_MS", "20")
    monkeypatch.setenv("RAPACE_MAX_PENDING", "2")

    async def main() -> None:
        async with raw_peer(twin) as s:
            session = s.session
            assert session.call_timeout == pytest.approx(0.02)
            assert session.max_pending == 2
            with pytest.raises(DeadlineExceeded):
                await session.call(1, SLOW, b"")
            first = asyncio.create_task(session.call(3, SLOW, b"", timeout=30))
            second = asyncio.create_task(session.call(5, SLOW, b"", timeout=30))
            await settle()
            assert session.pending_channel_ids() == [3, 5]
            with pytest.raises(ResourceExhausted):
                await session.call(7, SLOW, b"", timeout=30)
            first.cancel()
            second.cancel()
            await asyncio.gather(first, second, return_exceptions=True)
            assert session.pending_channel_ids() == []

    run(main())


def test_explicit_arguments_override_the_environment(
    twin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAPACE_CALL_TIMEOUT_MS", "20")
    monkeypatch.setenv("RAPACE_MAX_PENDING", "2")
    a, _b = mem_pair()
    session = RpcSession(a, call_timeout=5.0, max_pending=10)
    assert (session.call_timeout, session.max_pending) == (5.0, 10)


@pytest.mark.parametrize("value", ["", "0", "-5", "abc"])
def test_bad_environment_values_fall_back_to_defaults(
    twin: Any, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("RAPACE_CALL_TIMEOUT_MS", value)
    monkeypatch.setenv("RAPACE_MAX_PENDING", value)
    a, _b = mem_pair()
    session = RpcSession(a)
    assert session.call_timeout == rapace.DEFAULT_CALL_TIMEOUT == 30.0
    assert session.max_pending == rapace.DEFAULT_MAX_PENDING == 8192


def test_defaults_without_environment(twin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAPACE_CALL_TIMEOUT_MS", raising=False)
    monkeypatch.delenv("RAPACE_MAX_PENDING", raising=False)
    a, _b = mem_pair()
    session = RpcSession(a)
    assert (session.call_timeout, session.max_pending) == (30.0, 8192)


def test_cancelling_the_caller_propagates_and_leaves_no_entry(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            session = s.session
            ch = session.next_channel_id()
            call = asyncio.create_task(session.call(ch, SLOW, b""))
            request = await s.raw.recv()
            assert session.pending_channel_ids() == [ch]
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert session.pending_channel_ids() == []
            await s.raw.recv_cancel(ch, CLIENT_CANCEL)  # the server may stop working on it
            # the late answer is dropped; the session still serves
            await s.raw.send(ch, 0, REQUEST, b"late", msg_id=request.desc.msg_id)
            again = asyncio.create_task(session.call(session.next_channel_id(), ECHO, b""))
            request2 = await s.raw.recv()
            await s.raw.send(request2.desc.channel_id, 0, REQUEST, b"ok")
            assert (await again).payload == b"ok"

    run(main())


def test_cancelling_a_call_blocked_in_send_leaves_no_entry(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, max_in_flight=1) as s:
            filler = s.raw.frame(99, 0, DATA, b"filler")
            await s.session_transport.send_frame(filler)  # the raw end's only inbox slot
            call = asyncio.create_task(s.session.call(3, SLOW, b""))
            await settle()
            assert not call.done()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert s.session.pending_channel_ids() == []

    run(main())


def test_max_pending_refusal(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, session_kwargs={"max_pending": 3}) as s:
            session = s.session
            calls = [asyncio.create_task(session.call(ch, SLOW, b"")) for ch in (1, 3, 5)]
            sent_ids = [(await s.raw.recv()).desc.msg_id for _ in calls]
            with pytest.raises(ResourceExhausted) as info:
                await session.call(7, SLOW, b"")
            assert info.value.code == ErrorCode.ResourceExhausted
            assert info.value.message == "too many pending RPC calls"
            assert session.pending_channel_ids() == [1, 3, 5]  # the refused call left nothing
            # one answer frees a slot
            await s.raw.send(3, 0, REQUEST, b"three")
            assert (await calls[1]).payload == b"three"
            accepted = asyncio.create_task(session.call(7, SLOW, b""))
            request = await s.raw.recv()
            assert request.desc.channel_id == 7
            assert request.desc.msg_id == max(sent_ids) + 1  # the refusal spent no msg_id
            await s.raw.send(7, 0, REQUEST, b"seven")
            assert (await accepted).payload == b"seven"
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)

    run(main())


def test_default_deadlines_run_on_the_loop_s_own_clock(twin: Any) -> None:
    """A loop whose clock is not time.monotonic (here one that can jump ahead, as a test's
    virtual clock does): the session reads deadlines on that clock, not beside it."""
    jump = [0.0]

    def jumping_loop() -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        loop.time = lambda: time.monotonic() + jump[0]  # type: ignore[method-assign]
        return loop

    async def main() -> None:
        async with raw_peer(twin, session_kwargs={"call_timeout": 5.0}) as s:
            call = asyncio.create_task(s.session.call(1, SLOW, b""))
            await s.raw.recv()
            await settle()
            assert not call.done()
            jump[0] += 6.0  # the loop's clock passes the deadline; the real one does not
            done, _ = await asyncio.wait([call], timeout=1.0)
            assert done, "the deadline did not fire on the loop's clock"
            assert isinstance(call.exception(), DeadlineExceeded)
            assert s.session.pending_channel_ids() == []

    run(main(), loop_factory=jumping_loop)


def test_max_pending_must_be_positive(twin: Any) -> None:
    a, _b = mem_pair()
    with pytest.raises(ValueError):
        RpcSession(a, max_pending=0)


def test_a_second_call_on_a_busy_channel_is_refused(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            first = asyncio.create_task(s.session.call(1, SLOW, b""))
            await s.raw.recv()
            with pytest.raises(ValueError):
                await s.session.call(1, SLOW, b"")
            assert s.session.pending_channel_ids() == [1]  # the first call is untouched
            await s.raw.send(1, 0, REQUEST, b"first")
            assert (await first).payload == b"first"

    run(main())


def test_call_with_method_id_zero_is_refused(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            with pytest.raises(ValueError):
                await s.session.call(1, 0, b"")
            with pytest.raises(ValueError):
                await s.session.notify(0, b"")
            with pytest.raises(ValueError):
                await s.session.start_streaming_call(0, b"")
            assert s.session.pending_channel_ids() == [] == s.session.tunnel_channel_ids()

    run(main())


# -- dispatcher failures ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "expected_type", "expected_message"),
    [
        (ValueError("bad value 42"), Internal, None),
        (NotFound("x"), NotFound, "x"),
        (rapace.PermissionDenied("nope"), rapace.PermissionDenied, "nope"),
        (RpcError(ErrorCode.Unavailable, "later"), rapace.Unavailable, "later"),
        (asyncio.CancelledError(), rapace.Cancelled, "cancelled"),
        (TimeoutError(), Internal, "handler raised TimeoutError"),
        (TimeoutError("the cache"), Internal, "handler raised TimeoutError: the cache"),
        (ConnectionResetError("gone"), Internal, "transport error"),
    ],
)
def test_dispatcher_failures_become_error_responses(
    twin: Any, raised: BaseException, expected_type: type[RpcError], expected_message: str | None
) -> None:
    async def handler(frame: Any) -> bytes:
        if frame.desc.method_id == FAIL:
            raise raised
        return await echo_dispatcher(frame)

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=handler) as p:
            with pytest.raises(expected_type) as info:
                await p.client.call(p.client.next_channel_id(), FAIL, b"")
            assert type(info.value) is expected_type
            assert info.value.code == expected_type.code
            if expected_message is None:  # a crash: the message names the exception
                assert "ValueError" in info.value.message
                assert "bad value 42" in info.value.message
            else:
                assert info.value.message == expected_message
            # the session keeps serving
            response = await p.client.call(p.client.next_channel_id(), ECHO, b"still here")
            assert response.payload == b"still here"
            assert p.client.pending_channel_ids() == []

    run(main())


def test_handler_returning_a_wrong_type_is_internal(twin: Any) -> None:
    async def handler(frame: Any) -> Any:
        return 42

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=handler) as p:
            with pytest.raises(Internal):
                await p.client.call(p.client.next_channel_id(), ECHO, b"")

    run(main())


def test_unknown_method_via_dispatcher_is_not_found_with_its_message(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin, server_dispatcher=echo_dispatcher) as p:
            with pytest.raises(NotFound, match="unknown method_id: 7"):
                await p.client.call(1, 7, b"")

    run(main())


def test_handler_can_use_current_task_and_timeouts(twin: Any) -> None:
    async def handler(frame: Any) -> bytes:
        assert asyncio.current_task() is not None
        async with asyncio.timeout(5):
            await asyncio.sleep(0)
        return b"ok"

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=handler) as p:
            assert (await p.client.call(1, ECHO, b"")).payload == b"ok"

    run(main())


# -- NO_REPLY, notifications, no dispatcher ---------------------------------------------


@pytest.mark.parametrize(("channel", "outcome"), [(0, "returns"), (0, "raises"), (5, "returns")])
def test_no_reply_request_gets_no_response_frame(twin: Any, channel: int, outcome: str) -> None:
    handled: list[Any] = []

    async def handler(frame: Any) -> bytes:
        handled.append(frame.desc)
        if frame.desc.method_id == FAIL:
            raise ValueError("no one will hear this")
        return b"answer"

    async def main() -> None:
        async with raw_peer(twin, dispatcher=handler) as s:
            method = ECHO if outcome == "returns" else FAIL
            await s.raw.send(channel, method, NOTIFY, b"quiet")
            # a normal request afterwards: its response must be the first frame back
            await s.raw.send(7, ECHO, REQUEST, b"loud")
            first = await s.raw.recv()
            assert first.desc.channel_id == 7
            assert first.payload == b"answer"
            assert [d.channel_id for d in handled] == [channel, 7]  # the NO_REPLY one ran
            # and nothing else is on its way
            await settle()
            assert len(s.raw.transport._inbox) == 0

    run(main())


def test_failed_no_reply_request_on_a_channel_gets_its_error_frame(twin: Any) -> None:
    """Extension (session.py ``_reply``): a NO_REPLY request on a channel other than 0 is a
    streaming call; if its handler fails, the error ends the stream instead of leaving the
    client waiting forever."""

    async def handler(frame: Any) -> bytes:
        raise NotFound("no such stream")

    async def main() -> None:
        async with raw_peer(twin, dispatcher=handler) as s:
            await s.raw.send(5, STREAM, NOTIFY, b"", msg_id=321)
            error = await s.raw.recv()
            assert (error.desc.channel_id, error.desc.msg_id, error.desc.method_id) == (5, 321, 0)
            assert error.desc.flags == ERROR | EOS
            parsed = parse_error_payload(error.payload)
            assert isinstance(parsed, NotFound) and parsed.message == "no such stream"
            await settle()
            assert len(s.raw.transport._inbox) == 0

    run(main())


def test_notify_sends_data_eos_no_reply_on_channel_zero(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            await s.session.notify(PING, b"event")
            await s.session.notify(ECHO, b"x" * 100)
            frames = [await s.raw.recv(), await s.raw.recv()]
            for f, method in zip(frames, (PING, ECHO), strict=True):
                assert f.desc.channel_id == 0
                assert f.desc.method_id == method
                assert f.desc.flags == DATA | EOS | NO_REPLY
            assert frames[0].payload == b"event"
            assert frames[1].payload == b"x" * 100
            assert frames[1].desc.msg_id == frames[0].desc.msg_id + 1
            assert s.session.pending_channel_ids() == []

    run(main())


def test_notify_is_dispatched_and_never_answered(twin: Any) -> None:
    got: list[Any] = []
    arrived = asyncio.Event()

    async def handler(frame: Any) -> bytes:
        got.append((frame.desc.channel_id, frame.desc.flags, bytes(frame.payload)))
        arrived.set()
        return b"ignored"

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=handler) as p:
            await p.client.notify(PING, b"hello")
            await wait_for(arrived, "the notification")
            assert got == [(0, DATA | EOS | NO_REPLY, b"hello")]
        # and on the wire: a raw client sees no answer to a notification
        async with raw_peer(twin, dispatcher=handler) as s:
            await s.raw.send(0, PING, NOTIFY, b"n")
            await s.raw.send(1, PING, REQUEST, b"r")
            first = await s.raw.recv()
            assert first.desc.channel_id == 1

    run(main())


def test_no_dispatcher_answers_unimplemented(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            with pytest.raises(Unimplemented):
                await p.client.call(p.client.next_channel_id(), ECHO, b"")
            # and the session keeps working once a dispatcher is set
            p.server.set_dispatcher(echo_dispatcher)
            assert (await p.client.call(p.client.next_channel_id(), ECHO, b"ok")).payload == b"ok"
            p.server.set_dispatcher(None)
            with pytest.raises(Unimplemented):
                await p.client.call(p.client.next_channel_id(), ECHO, b"")

    run(main())


def test_no_dispatcher_stays_quiet_for_notifications(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            await s.raw.send(0, PING, NOTIFY, b"")
            await s.raw.send(0, PING, DATA | NO_REPLY, b"")
            await s.raw.send(5, PING, REQUEST, b"", msg_id=555)
            error = await s.raw.recv()
            assert error.desc.channel_id == 5
            assert error.desc.msg_id == 555
            assert error.desc.flags == ERROR | EOS
            assert isinstance(parse_error_payload(error.payload), Unimplemented)
            await settle()
            assert len(s.raw.transport._inbox) == 0

    run(main())


def test_streaming_call_to_a_session_without_dispatcher_ends_with_unimplemented(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            receiver = await p.client.start_streaming_call(STREAM, b"")
            chunk = await wait_for(receiver.recv(), "the stream's error chunk")
            assert chunk is not None and chunk.is_error and chunk.is_eos
            assert isinstance(parse_error_payload(chunk.payload), Unimplemented)
            assert await receiver.recv() is None
            assert p.client.tunnel_channel_ids() == []

    run(main())


def test_set_dispatcher_refuses_a_non_callable(twin: Any) -> None:
    a, _b = mem_pair()
    session = RpcSession(a)
    with pytest.raises(TypeError):
        session.set_dispatcher(42)  # type: ignore[arg-type]


def test_non_data_request_frames_are_ignored(twin: Any) -> None:
    handled: list[Any] = []

    async def handler(frame: Any) -> bytes:
        handled.append(frame.desc.channel_id)
        return b""

    async def main() -> None:
        async with raw_peer(twin, dispatcher=handler) as s:
            await s.raw.send(0, 5, CONTROL, b"ping")  # a control frame: not a request
            await s.raw.send(3, ECHO, EOS, b"")  # no DATA
            await s.raw.send(5, ECHO, REQUEST, b"")
            assert (await s.raw.recv()).desc.channel_id == 5
            assert handled == [5]

    run(main())


# -- server-streaming calls -------------------------------------------------------------


def stream_server(
    twin: Any, holder: dict[str, RpcSession], items: list[bytes], error: RpcError | None = None
) -> Any:
    """A dispatcher that answers STREAM by sending ``items`` as chunks, then EOS/ERROR."""
    requests: list[Any] = []

    async def handler(frame: Any) -> bytes:
        requests.append(frame.desc)
        server = holder["server"]
        ch = frame.desc.channel_id
        for item in items:
            await server.send_chunk(ch, item)
        if error is None:
            end = twin.frame.build_frame(server.next_msg_id(), ch, 0, EOS, b"")
        else:
            end = twin.frame.build_frame(
                server.next_msg_id(),
                ch,
                0,
                ERROR | EOS,
                encode_error_payload(error.code, error.message),
            )
        await server.send_response(end)
        return b"must not be sent: the request is NO_REPLY"

    handler.requests = requests  # type: ignore[attr-defined]
    return handler


@pytest.mark.parametrize("count", [0, 1, 500])
def test_streaming_call(twin: Any, count: int) -> None:
    holder: dict[str, RpcSession] = {}
    items = [b"item-%d" % i + b"." * (i % 40) for i in range(count)]
    handler = stream_server(twin, holder, items)

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=handler) as p:
            holder["server"] = p.server
            receiver = await p.client.start_streaming_call(STREAM, b"args")
            ch = receiver.channel_id
            assert ch % 2 == 1
            assert ch in p.client.tunnel_channel_ids()
            got: list[bytes] = []
            end = None
            while True:
                chunk = await receiver.recv()
                assert chunk is not None, "the stream ended without its EOS chunk"
                assert not chunk.is_error
                if chunk.is_eos:
                    end = chunk
                    break
                got.append(chunk.payload)
            assert got == items
            assert end.payload == b""
            assert await receiver.recv() is None  # ended
            assert p.client.tunnel_channel_ids() == []  # EOS unregistered the channel
            assert p.client.pending_channel_ids() == []
            (request,) = handler.requests
            assert request.flags == DATA | EOS | NO_REPLY
            assert request.channel_id == ch
            assert request.method_id == STREAM
            # no unary response followed the stream: a call on the same session still works
            p.server.set_dispatcher(echo_dispatcher)
            assert (await p.client.call(p.client.next_channel_id(), ECHO, b"k")).payload == b"k"

    run(main(), timeout=20)


def test_streaming_call_error_mid_stream(twin: Any) -> None:
    holder: dict[str, RpcSession] = {}
    handler = stream_server(twin, holder, [b"one", b"two"], error=NotFound("the rest is gone"))

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=handler) as p:
            holder["server"] = p.server
            receiver = await p.client.start_streaming_call(STREAM, b"")
            chunks = [chunk async for chunk in receiver]
            assert [c.payload for c in chunks[:2]] == [b"one", b"two"]
            last = chunks[-1]
            assert len(chunks) == 3
            assert last.is_error and last.is_eos
            error = parse_error_payload(last.payload)
            assert isinstance(error, NotFound)
            assert error.message == "the rest is gone"
            assert p.client.tunnel_channel_ids() == []

    run(main())


def test_streaming_handler_raising_mid_stream_ends_the_stream_with_its_error(twin: Any) -> None:
    holder: dict[str, RpcSession] = {}

    async def handler(frame: Any) -> bytes:
        server = holder["server"]
        await server.send_chunk(frame.desc.channel_id, b"one")
        raise rapace.Unavailable("backend went away")

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=handler) as p:
            holder["server"] = p.server
            receiver = await p.client.start_streaming_call(STREAM, b"")
            chunks = await wait_for(asyncio.ensure_future(_collect(receiver)), "the stream to end")
            assert [c.payload for c in chunks[:-1]] == [b"one"]
            assert chunks[-1].is_error and chunks[-1].is_eos
            error = parse_error_payload(chunks[-1].payload)
            assert isinstance(error, rapace.Unavailable)
            assert error.message == "backend went away"
            assert p.client.tunnel_channel_ids() == []

    run(main())


async def _collect(receiver: Any) -> list[Any]:
    return [chunk async for chunk in receiver]


def test_streaming_request_on_the_wire_and_last_item_with_payload(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            receiver = await s.session.start_streaming_call(STREAM, b"q")
            request = await s.raw.recv()
            assert request.desc.flags == DATA | EOS | NO_REPLY
            assert request.desc.method_id == STREAM
            assert request.desc.channel_id == receiver.channel_id == 1
            assert request.payload == b"q"
            ch = receiver.channel_id
            await s.raw.send(ch, 0, DATA, b"a")
            # a DATA|EOS frame with a payload is a last item
            await s.raw.send(ch, 0, DATA | EOS, b"last")
            first, last = await receiver.recv(), await receiver.recv()
            assert (first.payload, first.is_eos) == (b"a", False)
            assert (last.payload, last.is_eos, last.is_error) == (b"last", True, False)
            assert await receiver.recv() is None
            assert s.session.tunnel_channel_ids() == []

    run(main())


def test_cancelled_streaming_call_unregisters_its_channel(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, max_in_flight=1) as s:
            filler = s.raw.frame(99, 0, DATA, b"filler")
            await s.session_transport.send_frame(filler)  # the raw end's only inbox slot
            starting = asyncio.create_task(s.session.start_streaming_call(STREAM, b""))
            await settle()
            assert not starting.done()
            assert s.session.tunnel_channel_ids() == [1]  # registered before the send
            starting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await starting
            assert s.session.tunnel_channel_ids() == []

    run(main())


def test_streaming_call_on_a_closed_session(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, check_clean=False) as s:
            s.session.close()
            with pytest.raises(SessionClosed):
                await s.session.start_streaming_call(STREAM, b"")
            assert s.session.tunnel_channel_ids() == []

    run(main())


# -- unroutable frames ------------------------------------------------------------------


def test_unroutable_response_is_dropped_with_a_warning(
    twin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="rapace")

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2, dispatcher=echo_dispatcher) as s:
            await s.raw.send(41, 0, REQUEST, b"nobody asked", msg_id=77)
            await s.raw.send(0, 0, DATA, b"")  # a "response" on channel 0
            # an even channel the session never allocated
            await s.raw.send(100, 0, ERROR | EOS, encode_error_payload(12, "x"))
            await s.raw.send(3, ECHO, REQUEST, b"still works")
            response = await s.raw.recv()
            assert (response.desc.channel_id, response.payload) == (3, b"still works")
            assert not s.session.is_closed

    run(main())
    warnings = [
        r for r in caplog.records if r.name == "rapace.session" and r.levelno == logging.WARNING
    ]
    # One warning per second at most: the other two are counted, not logged.
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "channel 41" in warnings[0].getMessage()


def test_unroutable_warnings_are_rate_limited_and_count_what_they_skipped(
    twin: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("rapace.ratelimit._clock", lambda: clock[0])
    caplog.set_level(logging.WARNING, logger="rapace")

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2, dispatcher=echo_dispatcher) as s:
            for channel_id in range(101, 601, 2):  # 250 responses nobody waits for
                await s.raw.send(channel_id, 0, REQUEST, b"x")
            await s.raw.send(3, ECHO, REQUEST, b"sync")
            await s.raw.recv()  # all 250 were routed before this answer
            clock[0] += 1.5
            await s.raw.send(901, 0, REQUEST, b"x")
            await s.raw.send(5, ECHO, REQUEST, b"sync")
            await s.raw.recv()

    run(main())
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2, messages
    assert "channel 101" in messages[0]
    assert "channel 901" in messages[1] and "(249 more since the last warning)" in messages[1]


# -- closing ----------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["own transport", "peer transport", "own session", "peer session"])
def test_closing_fails_pending_calls_at_once(twin: Any, who: str) -> None:
    arrived = asyncio.Event()
    handler_cancelled = asyncio.Event()

    async def handler(frame: Any) -> bytes:
        arrived.set()
        try:
            await asyncio.get_running_loop().create_future()  # never answers
        except asyncio.CancelledError:
            handler_cancelled.set()
            raise
        return b""

    async def main() -> None:
        async with session_pair(
            twin,
            server_dispatcher=handler,
            client_kwargs={"call_timeout": 60.0},
        ) as p:
            call = asyncio.create_task(p.client.call(p.client.next_channel_id(), SLOW, b""))
            receiver = p.client.register_tunnel(p.client.next_channel_id())
            await wait_for(arrived, "the request")
            {
                "own transport": p.client_transport.close,
                "peer transport": p.server_transport.close,
                "own session": p.client.close,
                "peer session": p.server.close,
            }[who]()
            with pytest.raises(SessionClosed):
                await wait_for(call, "the pending call to fail", timeout=3.0)
            with pytest.raises(SessionClosed):
                await wait_for(receiver.recv(), "the tunnel receiver to end", timeout=3.0)
            assert p.client.pending_channel_ids() == []
            assert p.client.tunnel_channel_ids() == []
            assert await wait_for(p.client_run, "client run() to return", timeout=3.0) is None
            assert await wait_for(p.server_run, "server run() to return", timeout=3.0) is None
            await wait_for(handler_cancelled, "the server's handler to be cancelled", timeout=3.0)
            assert p.client.is_closed and p.server.is_closed
            # after the close: everything refuses at once
            with pytest.raises(SessionClosed):
                await p.client.call(p.client.next_channel_id(), ECHO, b"")
            with pytest.raises(SessionClosed):
                await p.client.notify(PING, b"")
            with pytest.raises(SessionClosed):
                await p.client.send_chunk(99, b"")
            with pytest.raises(SessionClosed):
                p.client.register_tunnel(101)

    run(main(), timeout=8)


def test_close_fails_a_call_blocked_in_send(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, max_in_flight=1, session_kwargs={"call_timeout": 60.0}) as s:
            filler = s.raw.frame(99, 0, DATA, b"filler")
            await s.session_transport.send_frame(filler)  # the raw end's only inbox slot
            call = asyncio.create_task(s.session.call(3, SLOW, b""))
            await settle()
            assert not call.done()
            s.raw.transport.close()
            with pytest.raises(SessionClosed):
                await wait_for(call, "the blocked call to fail")
            assert s.session.pending_channel_ids() == []

    run(main(), timeout=5)


def test_tunnel_with_eos_before_close_ends_normally(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            receiver = s.session.register_tunnel(5)
            await s.raw.send(5, 0, DATA, b"data")
            await s.raw.send(5, 0, DATA | EOS, b"")
            # a sentinel call proves both frames were routed before the close
            call = asyncio.create_task(s.session.call(7, ECHO, b""))
            await s.raw.recv()
            await s.raw.send(7, 0, REQUEST, b"")
            await call
            s.raw.transport.close()
            await wait_for(s.session_run, "run() to return")
            chunks = [c async for c in receiver]
            assert [(c.payload, c.is_eos) for c in chunks] == [(b"data", False), (b"", True)]

    run(main())


def test_tunnel_cut_short_returns_buffered_chunks_then_raises(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            receiver = s.session.register_tunnel(5)
            await s.raw.send(5, 0, DATA, b"partial")
            s.raw.transport.close()
            await wait_for(s.session_run, "run() to return")
            chunk = await receiver.recv()
            assert chunk is not None and chunk.payload == b"partial"
            with pytest.raises(SessionClosed):
                await receiver.recv()

    run(main())


def test_transport_failure_makes_run_raise_and_fails_calls(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, check_clean=False, session_kwargs={"call_timeout": 60.0}) as s:
            call = asyncio.create_task(s.session.call(1, SLOW, b""))
            await s.raw.recv()
            s.session.connection_lost(OSError("wire cut"))  # what a failing transport reports
            with pytest.raises(SessionClosed, match="wire cut"):
                await wait_for(call, "the call to fail")
            with pytest.raises(OSError, match="wire cut"):
                await wait_for(s.session_run, "run() to raise")

    run(main())


def test_cancelling_run_fails_pending_calls(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, check_clean=False, session_kwargs={"call_timeout": 60.0}) as s:
            call = asyncio.create_task(s.session.call(1, SLOW, b""))
            await s.raw.recv()
            s.session_run.cancel()
            with pytest.raises(SessionClosed):
                await wait_for(call, "the call to fail")
            with pytest.raises(asyncio.CancelledError):
                await s.session_run
            assert s.session.is_closed

    run(main())


def test_run_twice_is_refused_and_run_after_close_returns(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            with pytest.raises(RuntimeError):
                await s.session.run()
        a, _b = mem_pair()
        session = RpcSession(a)
        session.close()
        assert session.is_closed
        await wait_for(asyncio.create_task(session.run()), "run() on a closed session")

    run(main())


# -- diagnostics and ids ----------------------------------------------------------------


def test_pending_and_tunnel_ids_are_sorted(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            session = s.session
            calls = [asyncio.create_task(session.call(ch, SLOW, b"")) for ch in (9, 3, 7, 1)]
            for _ in calls:
                await s.raw.recv()
            assert session.pending_channel_ids() == [1, 3, 7, 9]
            for ch in (10, 4, 6, 2**32 - 1):
                session.register_tunnel(ch)
            assert session.tunnel_channel_ids() == [4, 6, 10, 2**32 - 1]
            await s.raw.send(7, 0, REQUEST, b"")
            await calls[2]
            assert session.pending_channel_ids() == [1, 3, 9]
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            assert session.pending_channel_ids() == []

    run(main())


def test_diagnostic_lists_are_fresh_and_stable(twin: Any) -> None:
    """Large (non-cached) ids, read many times: each list is new, correct and owned by the
    caller (a reference-counting slip in a compiled table shows up here, not as a random
    crash elsewhere)."""

    async def main() -> None:
        async with raw_peer(twin) as s:
            session = s.session
            channels = [100_001, 2**31 + 1, 2**32 - 1]
            calls = [asyncio.create_task(session.call(ch, SLOW, b"")) for ch in channels]
            for _ in calls:
                await s.raw.recv()
            for ch in (200_000, 2**31, 2**32 - 2):
                session.register_tunnel(ch)
            for _ in range(200):
                pending = session.pending_channel_ids()
                tunnels = session.tunnel_channel_ids()
                assert pending == [100_001, 2**31 + 1, 2**32 - 1]
                assert tunnels == [200_000, 2**31, 2**32 - 2]
                pending.append(0)  # the caller's own list: mutating it changes nothing
                tunnels.clear()
            gc.collect()
            assert session.pending_channel_ids() == [100_001, 2**31 + 1, 2**32 - 1]
            assert [str(x) for x in session.tunnel_channel_ids()] == [
                "200000",
                str(2**31),
                str(2**32 - 2),
            ]
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)

    run(main())


def test_channel_and_message_ids(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        odd = RpcSession(a)
        even = RpcSession(b, 2)
        assert [odd.next_channel_id() for _ in range(3)] == [1, 3, 5]
        assert [even.next_channel_id() for _ in range(3)] == [2, 4, 6]
        assert [odd.next_msg_id() for _ in range(3)] == [1, 2, 3]
        # the counter is shared with the frames the session sends
        await even.notify(PING, b"")
        assert (await pull(a).recv_frame()).desc.msg_id == 1
        assert even.next_msg_id() == 2
        await odd.notify(PING, b"")
        assert (await pull(b).recv_frame()).desc.msg_id == 4
        # channel ids wrap around without ever giving 0 and keep their parity
        high_odd = RpcSession(a, 2**32 - 3)
        assert [high_odd.next_channel_id() for _ in range(3)] == [2**32 - 3, 2**32 - 1, 1]
        high_even = RpcSession(a, 2**32 - 2)
        assert [high_even.next_channel_id() for _ in range(2)] == [2**32 - 2, 2]
        for bad in (0, -1, 2**32):
            with pytest.raises(ValueError):
                RpcSession(a, bad)

    run(main())


def test_session_as_async_context_manager(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        server = RpcSession(b, 2)
        server.set_dispatcher(echo_dispatcher)
        async with RpcSession(a) as client, server:
            response = await client.call(client.next_channel_id(), ECHO, b"cm")
            assert response.payload == b"cm"
        assert client.is_closed and server.is_closed
        await wait_for(asyncio.ensure_future(client.wait_closed()), "wait_closed")

    run(main())


def test_session_exposes_its_transport(twin: Any) -> None:
    a, _b = mem_pair()
    session = RpcSession(a)
    assert session.transport is a
    assert not session.is_closed
    session.close()
    assert session.is_closed and a.is_closed
    session.close()  # idempotent
