"""Credits: per-channel flow control on named tunnels (``rapace.named``).

The announcement (``GrantCredits`` on channel 0 before the first open), the per-channel
agreement in the acknowledgement, senders limited to the granted bytes, grants as the
reader consumes, an overrunning peer, u32 sums, peers without credits, and the point of
it all: one stalled tunnel no longer delays calls and other tunnels on the connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Any

import pytest
from session_helpers import (
    CONTROL,
    DATA,
    ECHO,
    REQUEST,
    echo_dispatcher,
    pull,
    raw_peer,
    run,
    session_pair,
    settle,
    until,
    wait_for,
)

from rapace import SessionClosed, TunnelAborted, TunnelStream
from rapace.control import (
    CloseChannel,
    CloseError,
    CloseNormal,
    ControlCodec,
    GrantCredits,
    OpenChannel,
)
from rapace.named import CREDIT_BUDGET, DEFAULT_TUNNEL_CREDIT_WINDOW

U32_MAX = 0xFFFFFFFF


async def send_control(raw: Any, message: Any) -> None:
    verb, payload = ControlCodec().encode(message)
    await raw.send(0, verb, CONTROL, payload)


async def recv_control(raw: Any) -> Any:
    frame = await raw.recv()
    assert (frame.desc.channel_id, frame.desc.flags) == (0, CONTROL), frame
    message, problem = ControlCodec().decode(frame.desc.method_id, frame.payload)
    assert message is not None, problem
    return message


async def recv_chunk(raw: Any, channel_id: int) -> bytes:
    frame = await raw.recv()
    assert (frame.desc.channel_id, frame.desc.flags) == (channel_id, DATA), frame
    return bytes(frame.payload)


def nothing_more_arrived(raw: Any) -> bool:
    return not pull(raw.transport)._frames


async def open_against_raw(s: Any, granted: int) -> TunnelStream:
    """The session opens "Svc.t"; the raw end (speaking credits) acknowledges with
    ``granted`` bytes of credit."""
    opening = asyncio.create_task(s.session.open_tunnel("Svc.t"))
    message = await recv_control(s.raw)
    if isinstance(message, GrantCredits):  # the announcement, before the first open
        assert message.channel_id == 0
        message = await recv_control(s.raw)
    assert isinstance(message, OpenChannel)
    await send_control(s.raw, GrantCredits(message.channel_id, granted))
    stream: TunnelStream = await wait_for(opening, "the open")
    return stream


# -- the wire ------------------------------------------------------------------------------


def test_announcement_then_only_granted_bytes_are_sent(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, session_kwargs={"tunnel_credit_window": 4096}) as s:
            opening = asyncio.create_task(s.session.open_tunnel("Svc.t"))
            frame = await s.raw.recv()  # GrantCredits{0, 4096}: "I speak credits"
            assert (frame.desc.channel_id, frame.desc.method_id, frame.desc.flags) == (0, 4, 2)
            assert frame.payload == b"\x00\x80\x20"
            assert await recv_control(s.raw) == OpenChannel(1, "Svc", "t", [])
            await send_control(s.raw, GrantCredits(1, 100))  # accepted, with 100 bytes
            stream = await wait_for(opening, "the open")
            assert stream.send_credit == 100
            assert stream.receiver.credit_window == 4096

            stream.write(b"a" * 250)
            draining = asyncio.create_task(stream.drain())
            assert await recv_chunk(s.raw, 1) == b"a" * 100
            await settle(20)
            assert nothing_more_arrived(s.raw) and not draining.done()  # waits for credit
            await send_control(s.raw, GrantCredits(1, 60))
            assert await recv_chunk(s.raw, 1) == b"a" * 60  # a piece: just what was granted
            await send_control(s.raw, GrantCredits(1, 1000))
            assert await recv_chunk(s.raw, 1) == b"a" * 90
            await wait_for(draining, "the drain")
            assert stream.send_credit == 910
            # a second open is not announced again
            opening = asyncio.create_task(s.session.open_tunnel("Svc.t"))
            assert isinstance(await recv_control(s.raw), OpenChannel)
            opening.cancel()

    run(main())


def test_acceptor_agrees_and_grants_as_its_reader_consumes(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, session_kwargs={"tunnel_credit_window": 100}) as s:
            read_gate = asyncio.Event()
            reads: list[bytes] = []

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                stream.write(b"w" * 1500)  # the raw opener announced 1000
                await read_gate.wait()
                reads.append(await stream.readexactly(50))
                await asyncio.Event().wait()

            s.session.set_tunnel_handler("Svc.t", handler)
            await send_control(s.raw, GrantCredits(0, 1000))  # the raw end speaks credits
            await send_control(s.raw, OpenChannel(2, "Svc", "t", []))
            assert await recv_control(s.raw) == GrantCredits(2, 100)  # agreed: its window
            got = b""
            while len(got) < 1000:
                got += await recv_chunk(s.raw, 2)
            assert got == b"w" * 1000
            await settle(20)
            assert nothing_more_arrived(s.raw)  # 1000 granted, 1000 sent
            await send_control(s.raw, GrantCredits(2, 500))
            assert await recv_chunk(s.raw, 2) == b"w" * 500

            for _ in range(4):
                await s.raw.send(2, 0, DATA, b"r" * 25)  # all its credit: 100 bytes
            await settle(20)
            assert nothing_more_arrived(s.raw)  # nothing read yet: nothing granted
            read_gate.set()
            assert await recv_control(s.raw) == GrantCredits(2, 50)  # half a window read
            assert reads == [b"r" * 50]

    run(main())


def test_a_peer_sending_past_its_credit_loses_only_that_tunnel(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(
            twin, dispatcher=echo_dispatcher, session_kwargs={"tunnel_credit_window": 100}
        ) as s:
            failure: asyncio.Future[BaseException] = asyncio.Future()

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                await until(lambda: stream.receiver.buffered_bytes >= 80, "the chunks")
                try:
                    await stream.read(-1)
                except TunnelAborted as exc:
                    failure.set_result(exc)

            s.session.set_tunnel_handler("Svc.t", handler)
            await send_control(s.raw, GrantCredits(0, 1000))
            await send_control(s.raw, OpenChannel(2, "Svc", "t", []))
            assert await recv_control(s.raw) == GrantCredits(2, 100)
            await s.raw.send(2, 0, DATA, b"x" * 80)
            await s.raw.send(2, 0, DATA, b"y" * 80)  # 60 bytes past the credit
            message = await recv_control(s.raw)
            assert isinstance(message, CloseChannel) and message.channel_id == 2
            assert isinstance(message.reason, CloseError)
            assert "credit exceeded" in message.reason.message
            error = await wait_for(failure, "the handler's read")
            assert "credit exceeded" in str(error)
            assert s.session.tunnel_channel_ids() == []
            await s.raw.send(4, ECHO, REQUEST, b"still here")  # the connection goes on
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.payload) == (4, b"still here")

    run(main())


@pytest.mark.parametrize("acceptor_credits", [True, False], ids=["credits", "no-credits"])
def test_bytes_before_the_acknowledgement_count_once_it_is_known(
    twin: Any, acceptor_credits: bool
) -> None:
    """The acceptor may send before its answer arrives: against a credit acceptor those
    bytes count against this side's window; against one without credits, nothing does."""

    async def main() -> None:
        async with raw_peer(twin, session_kwargs={"tunnel_credit_window": 100}) as s:
            opening = asyncio.create_task(s.session.open_tunnel("Svc.t"))
            assert await recv_control(s.raw) == GrantCredits(0, 100)
            assert isinstance(await recv_control(s.raw), OpenChannel)
            await s.raw.send(1, 0, DATA, b"e" * 60)  # ahead of the acknowledgement
            await send_control(s.raw, GrantCredits(1, 500 if acceptor_credits else 0))
            stream = await wait_for(opening, "the open")
            await s.raw.send(1, 0, DATA, b"f" * 40)  # the rest of the window
            await s.raw.send(1, 0, DATA, b"g")  # one byte past it
            receiver = stream.receiver
            await until(
                lambda: receiver.aborted is not None or receiver.buffered_bytes == 101,
                "the three chunks",
            )
            assert await stream.readexactly(100) == b"e" * 60 + b"f" * 40
            if acceptor_credits:
                message = await recv_control(s.raw)
                assert isinstance(message, CloseChannel) and message.channel_id == 1
                with pytest.raises(TunnelAborted, match="credit exceeded"):
                    await stream.read(1)
            else:
                assert await stream.read(1) == b"g"

    run(main())


def test_grants_summing_past_u32_are_capped(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            stream = await open_against_raw(s, U32_MAX)
            await send_control(s.raw, GrantCredits(1, U32_MAX))
            await send_control(s.raw, GrantCredits(1, U32_MAX))
            await s.raw.send(1, 0, DATA, b"sync")  # read after the grants: they were taken
            assert await stream.read(10) == b"sync"
            assert stream.send_credit == U32_MAX
            stream.write(b"fine")
            assert await recv_chunk(s.raw, 1) == b"fine"
            assert stream.send_credit == U32_MAX - 4

    run(main())


def test_windows_promised_to_one_peer_are_bounded(twin: Any) -> None:
    """A peer opening many tunnels: past the budget, new ones get no credits (bounded as
    any tunnel); once a credited one ends, credits are given again."""
    window = CREDIT_BUDGET // 2

    async def main() -> None:
        async with raw_peer(twin, session_kwargs={"tunnel_credit_window": window}) as s:
            release: dict[int, asyncio.Event] = {}

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                release[stream.channel_id] = asyncio.Event()
                await release[stream.channel_id].wait()

            s.session.set_tunnel_handler("Svc.t", handler)
            await send_control(s.raw, GrantCredits(0, 1000))
            for channel_id in (2, 4, 6):
                await send_control(s.raw, OpenChannel(channel_id, "Svc", "t", []))
            assert await recv_control(s.raw) == GrantCredits(2, window)
            assert await recv_control(s.raw) == GrantCredits(4, window)
            assert await recv_control(s.raw) == GrantCredits(6, 0)  # over the budget
            await until(lambda: 2 in release, "the first handler")
            release[2].set()
            frame = await s.raw.recv()  # its EOS
            assert (frame.desc.channel_id, frame.desc.flags) == (2, REQUEST)
            assert await recv_control(s.raw) == CloseChannel(2, CloseNormal())  # unread
            await send_control(s.raw, OpenChannel(8, "Svc", "t", []))
            assert await recv_control(s.raw) == GrantCredits(8, window)

    run(main())


# -- peers without credits --------------------------------------------------------------


def test_an_acceptor_without_credits_leaves_the_channel_as_today(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, session_kwargs={"tunnel_credit_window": 10}) as s:
            stream = await open_against_raw(s, 0)  # acknowledged with 0: no credits
            assert stream.send_credit is None and stream.receiver.credit_window is None
            stream.write(b"z" * 100)  # more than any window: sent without grants
            assert await recv_chunk(s.raw, 1) == b"z" * 100
            for _ in range(3):
                await s.raw.send(1, 0, DATA, b"q" * 50)  # more than this side's window
            assert await stream.read(150) == b"q" * 50  # no abort, as any tunnel
            assert await stream.readexactly(100) == b"q" * 100

    run(main())


def test_an_opener_without_announcement_gets_no_credits(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, session_kwargs={"tunnel_credit_window": 10}) as s:
            got: asyncio.Future[bytes] = asyncio.Future()

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                assert stream.send_credit is None
                got.set_result(await stream.read(-1))

            s.session.set_tunnel_handler("Svc.t", handler)
            await send_control(s.raw, OpenChannel(2, "Svc", "t", []))  # no announcement
            assert await recv_control(s.raw) == GrantCredits(2, 0)
            await s.raw.send(2, 0, DATA, b"p" * 100)
            await s.raw.send(2, 0, REQUEST, b"")
            assert await wait_for(got, "the handler") == b"p" * 100

    run(main())


# -- writers waiting for credit -------------------------------------------------------------


def test_a_writer_waiting_for_credit_ends_with_the_channel(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            stream = await open_against_raw(s, 10)
            stream.write(b"m" * 100)
            assert await recv_chunk(s.raw, 1) == b"m" * 10
            draining = asyncio.create_task(stream.drain())
            await settle(20)
            assert not draining.done()
            await send_control(s.raw, CloseChannel(1, CloseError("reader gone")))
            with pytest.raises(TunnelAborted, match="reader gone"):
                await wait_for(draining, "the drain")

            stream = await open_against_raw(s, 10)
            stream.write(b"n" * 100)
            assert await recv_chunk(s.raw, 3) == b"n" * 10
            draining = asyncio.create_task(stream.drain())
            await settle(20)
            s.session.close()
            with pytest.raises(SessionClosed):
                await wait_for(draining, "the drain")

    run(main())


def test_a_writer_to_a_tunnel_closed_unread_stops_instead_of_hanging(twin: Any) -> None:
    """The acceptor's handler returns without reading: no credit will ever come back, so
    its stream, closing, says so (CloseChannel(Normal) after its EOS), and the opener's
    drain fails instead of waiting forever."""
    window = 64 * 1024

    async def main() -> None:
        kwargs = {"tunnel_credit_window": window}
        async with session_pair(twin, client_kwargs=kwargs, server_kwargs=kwargs) as p:

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                stream.write(b"bye")

            p.server.set_tunnel_handler("Svc.rude", handler)
            stream = await p.client.open_tunnel("Svc.rude")
            stream.write(b"x" * (4 * window))
            with pytest.raises(BrokenPipeError):
                await wait_for(asyncio.ensure_future(stream.drain()), "the drain to fail")
            assert await stream.read(-1) == b"bye"  # what it sent is read, then a clean end
            assert p.client.tunnel_channel_ids() == [] == p.server.tunnel_channel_ids()

    run(main())


def test_closing_while_waiting_for_credit_sends_the_rest_then_eos(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            stream = await open_against_raw(s, 10)
            stream.write(b"k" * 30)
            stream.close()
            assert await recv_chunk(s.raw, 1) == b"k" * 10
            await send_control(s.raw, GrantCredits(1, 20))
            assert await recv_chunk(s.raw, 1) == b"k" * 20
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.desc.flags, frame.payload) == (1, REQUEST, b"")

    run(main())


# -- head-of-line blocking -----------------------------------------------------------------


@pytest.mark.parametrize("credits", [True, False], ids=["credits", "no-credits"])
def test_a_stalled_tunnel_no_longer_delays_calls_and_other_tunnels(
    twin: Any, credits: bool
) -> None:
    """A tunnel whose reader stalls, fed more than any buffer holds. With credits, only
    its writer waits: calls and another tunnel on the same connection go on. Without
    (the control case), the stalled reader pauses the whole connection, as before."""
    window = DEFAULT_TUNNEL_CREDIT_WINDOW if credits else None
    kwargs = {"tunnel_credit_window": window}
    size = 8 * 1024 * 1024
    data = random.Random(3).randbytes(size)

    async def main() -> None:
        async with session_pair(
            twin,
            server_dispatcher=echo_dispatcher,
            client_kwargs=kwargs,
            server_kwargs=kwargs,
        ) as p:
            gate = asyncio.Event()
            stalled_read: asyncio.Future[str] = asyncio.Future()
            stalled_streams: list[TunnelStream] = []

            async def stall(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                stalled_streams.append(stream)
                await gate.wait()
                stalled_read.set_result(hashlib.sha256(await stream.read(-1)).hexdigest())

            async def echo(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                async for chunk in stream:
                    stream.write(chunk)
                await stream.drain()

            p.server.set_tunnel_handler("Svc.stall", stall)
            p.server.set_tunnel_handler("Svc.echo", echo)
            echo_stream = await p.client.open_tunnel("Svc.echo")  # opened before the stall
            stalled = await p.client.open_tunnel("Svc.stall")

            async def feed() -> None:
                stalled.write(data)
                stalled.write_eof()
                await stalled.drain()

            feeder = asyncio.create_task(feed())
            if credits:
                await until(lambda: stalled.send_credit == 0, "the stalled tunnel's credit used up")
                receiver = stalled_streams[0].receiver
                assert receiver.buffered_bytes <= DEFAULT_TUNNEL_CREDIT_WINDOW
            else:
                await until(lambda: p.server._blocked_readers > 0, "the server to pause reading")
            assert not feeder.done()

            async def other_traffic() -> None:
                for i in range(20):
                    reply = await p.client.call(p.client.next_channel_id(), ECHO, b"%d" % i)
                    assert reply.payload == b"%d" % i
                payload = random.Random(4).randbytes(3 * 1024 * 1024)  # past any window
                echo_stream.write(payload)
                echo_stream.write_eof()
                assert await echo_stream.read(-1) == payload

            others = asyncio.create_task(other_traffic())
            if credits:
                await wait_for(others, "calls and the other tunnel, beside the stalled one")
                assert not feeder.done() and not stalled_read.done()  # still stalled
            else:
                await settle(200)
                assert not others.done()  # head-of-line blocked by the stalled reader
            gate.set()
            assert await wait_for(stalled_read, "the stalled read") == (
                hashlib.sha256(data).hexdigest()
            )
            await wait_for(feeder, "the feeder")
            await wait_for(others, "the other traffic")

    run(main(), timeout=30)
