"""Admission under overload: requests past the handler limit wait their turn, reading
pauses when too many wait (only where that cannot deadlock), and what still overflows is
refused or dropped loudly, never silently. Both twins, through the fixture."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from session_helpers import (
    ECHO,
    ERROR,
    NOTIFY,
    REQUEST,
    SLOW,
    raw_peer,
    run,
    session_pair,
    settle,
    until,
    wait_for,
)

from rapace import ErrorCode, ResourceExhausted
from rapace.wire import FrameFlags, parse_error_payload

CONTROL = int(FrameFlags.CONTROL)


class Gate:
    """A dispatcher whose handlers wait for one event, counting what they handled."""

    def __init__(self, expected: int) -> None:
        self.open = asyncio.Event()
        self.handled = 0
        self.expected = expected
        self.all_handled = asyncio.Event()

    async def __call__(self, frame: Any) -> bytes:
        await self.open.wait()
        self.handled += 1
        if self.handled == self.expected:
            self.all_handled.set()
        return bytes(frame.payload)


def test_10000_notifications_to_a_slow_handler_are_all_handled(twin: Any) -> None:
    """Past the 8192 handlers, notifications wait their turn instead of being refused."""
    count = 10_000

    async def main() -> None:
        gate = Gate(count)
        async with session_pair(twin, server_dispatcher=gate) as p:
            for i in range(count):
                await p.client.notify(ECHO, i.to_bytes(4, "little"))
            await until(lambda: p.server.stats.requests_queued == count - 8192, "the queue")
            stats = p.server.stats
            assert len(p.server._handlers) == 8192
            gate.open.set()
            await wait_for(gate.all_handled, "every notification handled", 20)
            assert gate.handled == count
            assert stats.requests_admitted == count
            assert stats.requests_queued == count - 8192
            assert stats.requests_refused == 0
            assert stats.notifications_dropped == 0

    run(main(), timeout=40)


def test_requests_past_the_limit_wait_in_arrival_order(twin: Any) -> None:
    order: list[bytes] = []
    release = asyncio.Event()

    async def handler(frame: Any) -> bytes:
        if frame.payload == b"first":
            await release.wait()
        order.append(bytes(frame.payload))
        return bytes(frame.payload)

    async def main() -> None:
        async with session_pair(
            twin, server_dispatcher=handler, server_kwargs={"max_pending": 1}
        ) as p:
            calls = [
                asyncio.create_task(p.client.call(p.client.next_channel_id(), ECHO, payload))
                for payload in (b"first", b"second", b"third")
            ]
            await until(lambda: p.server.stats.requests_queued == 2, "two waiting")
            assert order == []
            release.set()
            results = await asyncio.gather(*calls)
            assert [r.payload for r in results] == [b"first", b"second", b"third"]
            assert order == [b"first", b"second", b"third"]
            assert p.server.stats.requests_refused == 0

    run(main())


def test_reading_pauses_while_too_many_wait_and_resumes_after(twin: Any) -> None:
    """No call of the server's own is in flight: stopping to read is safe, so it does."""
    count = 200

    async def main() -> None:
        gate = Gate(count)
        async with session_pair(
            twin, server_dispatcher=gate, server_kwargs={"max_pending": 4}
        ) as p:
            sending = asyncio.create_task(_notify_all(p.client, count))
            await until(lambda: p.server._overloaded, "the server to stop reading")
            await settle()
            assert not sending.done()  # the client feels it: its sends wait
            # Bounded: 4 running, 4 waiting, plus what the batch being routed still held.
            assert 4 <= len(p.server._waiting) < 4 + 64
            assert p.server_transport._paused
            gate.open.set()
            await wait_for(sending, "every notification sent", 20)
            await wait_for(gate.all_handled, "every notification handled", 20)
            assert not p.server._overloaded and not p.server_transport._paused
            assert p.server.stats.notifications_dropped == 0
            assert p.server.stats.requests_admitted == count

    run(main())


async def _notify_all(session: Any, count: int) -> None:
    for i in range(count):
        await session.notify(ECHO, i.to_bytes(4, "little"))


def test_reading_goes_on_while_a_call_of_our_own_waits(twin: Any, caplog: Any) -> None:
    """The server waits for an answer of its own: pausing could deadlock, so it reads on.
    Past twice the bound a request is refused and a notification dropped, each loudly:
    an error response, a logged error, a counter and a control frame to the peer."""
    caplog.set_level(logging.ERROR, logger="rapace")

    async def main() -> None:
        gate = Gate(0)
        async with raw_peer(
            twin, start_channel_id=2, dispatcher=gate, session_kwargs={"max_pending": 2}
        ) as s:
            own_call = asyncio.create_task(s.session.call(2, SLOW, b"?"))
            assert (await s.raw.recv()).desc.method_id == SLOW
            for channel in (1, 3, 5, 7, 9, 11):  # 2 running, 4 waiting: twice the bound
                await s.raw.send(channel, ECHO, REQUEST, b"x")
            await s.raw.send(13, ECHO, REQUEST, b"too many")
            await s.raw.send(0, ECHO, NOTIFY, b"too many")
            refusal = await s.raw.recv()
            assert refusal.desc.channel_id == 13 and refusal.desc.flags & ERROR
            error = parse_error_payload(refusal.payload)
            assert isinstance(error, ResourceExhausted) and "overloaded" in error.message
            notice = await s.raw.recv()
            assert (notice.desc.channel_id, notice.desc.flags) == (0, CONTROL)
            assert (notice.desc.method_id, notice.payload) == (3, b"\x00\x02")
            stats = s.session.stats
            assert (stats.requests_refused, stats.notifications_dropped) == (1, 1)
            assert not s.session._overloaded
            gate.open.set()
            answers = sorted([(await s.raw.recv()).desc.channel_id for _ in range(6)])
            assert answers == [1, 3, 5, 7, 9, 11]
            await s.raw.send(2, 0, REQUEST, b"!")
            assert (await own_call).payload == b"!"

    run(main())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "dropping a notification" in errors[0], errors


def test_a_call_made_while_reading_is_paused_resumes_it(twin: Any) -> None:
    """A handler that calls back over the same connection while the server had stopped
    reading gets its answer: the call resumes reading."""

    async def main() -> None:
        server_side: dict[str, Any] = {}
        gate = Gate(0)

        async def handler(frame: Any) -> bytes:
            if frame.payload == b"call back":
                answer = await server_side["session"].call(
                    server_side["session"].next_channel_id(), ECHO, b"pong"
                )
                return bytes(answer.payload)
            return await gate(frame)

        async def client_echo(frame: Any) -> bytes:
            return bytes(frame.payload)

        async with session_pair(
            twin,
            server_dispatcher=handler,
            client_dispatcher=client_echo,
            server_kwargs={"max_pending": 2},
        ) as p:
            server_side["session"] = p.server
            sending = asyncio.create_task(_notify_all(p.client, 4))  # 2 run, 2 wait
            await until(lambda: p.server._overloaded, "the server to stop reading")
            await wait_for(sending, "the notifications")
            # One handler slot frees: the waiting ones take it; the call-back waits too.
            calling = asyncio.create_task(
                p.client.call(p.client.next_channel_id(), ECHO, b"call back")
            )
            gate.open.set()
            assert (await wait_for(calling, "the call-back's answer")).payload == b"pong"

    run(main())


def test_a_refusal_for_a_request_nobody_reads_is_never_dropped(twin: Any) -> None:
    """With no dispatcher, every request is answered Unimplemented: even past the bound
    of answers waiting to be sent, reading pauses rather than dropping one."""

    async def main() -> None:
        async with raw_peer(
            twin, start_channel_id=2, session_kwargs={"max_pending": 4}, max_in_flight=2
        ) as s:

            async def flood() -> None:  # 20 requests; the raw end reads none yet
                for channel in range(1, 41, 2):
                    await s.raw.send(channel, ECHO, REQUEST, b"")

            flooding = asyncio.create_task(flood())
            await until(lambda: s.session._overloaded, "reading to pause")
            assert not flooding.done()  # the flood is held back, not refused unheard
            answers = [await s.raw.recv() for _ in range(20)]
            await wait_for(flooding, "the flood to be taken in")
            assert sorted(a.desc.channel_id for a in answers) == list(range(1, 41, 2))
            codes = {parse_error_payload(a.payload).code for a in answers}
            assert codes == {ErrorCode.Unimplemented}
            assert s.session.stats.requests_refused == 20
            await until(lambda: not s.session._overloaded, "reading to resume")

    run(main())


def test_notifications_already_received_run_after_the_peer_closes(twin: Any) -> None:
    """The peer closed right after sending: what it handed over still runs; unary
    requests (nobody left to answer) are cancelled."""
    cancelled = asyncio.Event()

    async def main() -> None:
        gate = Gate(6)

        async def handler(frame: Any) -> bytes:
            if frame.desc.channel_id:
                try:
                    await asyncio.Event().wait()
                finally:
                    cancelled.set()
            return await gate(frame)

        async with raw_peer(
            twin, start_channel_id=2, dispatcher=handler, session_kwargs={"max_pending": 4}
        ) as s:
            await s.raw.send(1, ECHO, REQUEST, b"unary")
            for i in range(6):  # 3 run, 3 wait
                await s.raw.send(0, ECHO, NOTIFY, bytes([i]))
            await until(lambda: s.session.stats.requests_queued == 3, "three waiting")
            s.raw.transport.close()
            await wait_for(cancelled, "the unary handler to be cancelled")
            assert s.session.is_closed
            gate.open.set()
            await wait_for(gate.all_handled, "the notifications sent before the close")
            assert s.session.stats.notifications_dropped == 0

    run(main())


@pytest.mark.parametrize("flags", [REQUEST, NOTIFY])
def test_closing_the_session_itself_cancels_everything(twin: Any, flags: int) -> None:
    async def main() -> None:
        gate = Gate(0)
        async with raw_peer(
            twin, start_channel_id=2, dispatcher=gate, session_kwargs={"max_pending": 1}
        ) as s:
            for channel in (1, 3, 5) if flags == REQUEST else (0, 0, 0):
                await s.raw.send(channel, ECHO, flags, b"x")
            await until(lambda: s.session.stats.requests_queued == 2, "two waiting")
            s.raw.transport.close()  # the peer goes first ...
            await until(lambda: s.session.is_closed, "the session to close")
            s.session.close()  # ... then this side closes: nothing lingers
            await settle()
            assert not s.session._handlers and not s.session._waiting
            assert gate.handled == 0

    run(main())
