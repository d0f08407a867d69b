"""Named tunnels (``open_tunnel``/``set_tunnel_handler``, the typed ``-> rapace.Tunnel``
form), their acknowledgement and refusals on the wire, chunks held before the handler
runs, abort (``TunnelAborted``), hostile control frames, and a peer that ignores the
control channel. Every test runs on both twins.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from typing import Any

import pytest
from net_helpers import ECHO as NET_ECHO
from net_helpers import KINDS, listen_address, pattern, short_tmpdir, spawn
from net_helpers import run as net_run
from session_helpers import (
    CONTROL,
    DATA,
    ECHO,
    EOS,
    REQUEST,
    echo_dispatcher,
    raw_peer,
    run,
    session_pair,
    settle,
    until,
    wait_for,
)

import rapace
from rapace import (
    Aborted,
    DeadlineExceeded,
    ResourceExhausted,
    SessionClosed,
    TunnelAborted,
    TunnelStream,
    Unimplemented,
)
from rapace.control import (
    CancelChannel,
    CancelReason,
    CloseChannel,
    CloseError,
    CloseNormal,
    ControlCodec,
    GrantCredits,
    OpenChannel,
)
from rapace.named import DEFAULT_TUNNEL_CREDIT_WINDOW
from rapace.tunnel import DEFAULT_TUNNEL_CAPACITY, forward

OPEN, CLOSE, CANCEL, GRANT = 1, 2, 3, 4  # the control verbs
PLAIN = {"tunnel_credit_window": None}
"""A session without credits: its first frame for an open is the OpenChannel itself
(tests/test_credits.py covers the announcement and the credit-controlled channels)."""


def control_bytes(message: Any) -> tuple[int, bytes]:
    return ControlCodec().encode(message)


async def send_control(raw: Any, message: Any) -> None:
    verb, payload = control_bytes(message)
    await raw.send(0, verb, CONTROL, payload)


async def recv_control(raw: Any) -> Any:
    """The next frame the raw end gets, which must be a control frame: its message."""
    frame = await raw.recv()
    desc = frame.desc
    assert (desc.channel_id, desc.flags) == (0, CONTROL), frame
    message, problem = ControlCodec().decode(desc.method_id, frame.payload)
    assert message is not None, problem
    return message


async def echo_upper(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
    """Answers the opener's metadata, then echoes what it reads, upper-cased."""
    stream.write(repr(metadata).encode() + b"\n")
    async for data in stream:
        stream.write(data.upper())
    await stream.drain()


# -- both directions, metadata -------------------------------------------------------------


@pytest.mark.parametrize("opener", ["client", "server"])
def test_named_tunnel_both_directions_with_metadata(twin: Any, opener: str) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            a, b = (p.client, p.server) if opener == "client" else (p.server, p.client)
            b.set_tunnel_handler("Shell.upper", echo_upper)
            stream = await a.open_tunnel("Shell.upper", {"user": b"ann", "term": b"\x00\xff"})
            assert stream.channel_id % 2 == (1 if opener == "client" else 0)
            assert await stream.readline() == b"[('user', b'ann'), ('term', b'\\x00\\xff')]\n"
            stream.write(b"hello ")
            stream.write(b"world")
            stream.write_eof()
            assert await stream.read(-1) == b"HELLO WORLD"
            assert stream.at_eof()
            await until(lambda: not b.tunnel_channel_ids(), "the acceptor's tunnel to end")
            assert a.tunnel_channel_ids() == []
            # pairs keep their order and repeats
            stream = await a.open_tunnel("Shell.upper", [("k", b"1"), ("k", b"2")])
            assert await stream.readline() == b"[('k', b'1'), ('k', b'2')]\n"
            stream.close()

    run(main())


def test_open_tunnel_wire_and_acknowledgement(twin: Any) -> None:
    """The opener sends OpenChannel (channel of its parity, nothing before it); the
    acknowledgement is GrantCredits of 0 bytes; refusal is CloseChannel(Error)."""

    async def main() -> None:
        async with raw_peer(twin, session_kwargs=PLAIN) as s:
            opening = asyncio.create_task(s.session.open_tunnel("Svc.up", {"k": b"v"}))
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.desc.method_id, frame.desc.flags) == (
                0,
                OPEN,
                CONTROL,
            )
            # postcard by hand: channel 1, "Svc", "up", one pair ("k", b"v")
            assert frame.payload == b"\x01\x03Svc\x02up\x01\x01k\x01v"
            assert s.session.tunnel_channel_ids() == [1]  # registered before it was sent
            await settle()
            assert not opening.done()  # waits for the answer
            await s.raw.send(0, GRANT, CONTROL, b"\x01\x00")  # GrantCredits{1, 0}
            stream = await wait_for(opening, "the open")
            assert stream.channel_id == 1
            await s.raw.send(1, 0, DATA, b"from raw")
            assert await stream.read(100) == b"from raw"
            stream.write(b"to raw")
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.desc.flags, frame.payload) == (1, DATA, b"to raw")

            # refused: CloseChannel{3, Error("nope")}
            opening = asyncio.create_task(s.session.open_tunnel("Svc.other"))
            assert isinstance(await recv_control(s.raw), OpenChannel)
            await s.raw.send(0, CLOSE, CONTROL, b"\x03\x01\x04nope")
            with pytest.raises(Unimplemented, match="nope"):
                await wait_for(opening, "the refusal")
            assert s.session.tunnel_channel_ids() == [1]

    run(main())


def test_acceptor_answers_open_with_grant_credits_zero(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, session_kwargs=PLAIN) as s:
            got: asyncio.Future[list[tuple[str, bytes]]] = asyncio.Future()

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                got.set_result(metadata)
                stream.write(await stream.read(100))

            s.session.set_tunnel_handler("Svc.echo", handler)
            await send_control(s.raw, OpenChannel(2, "Svc", "echo", [("a", b"b")]))
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.desc.method_id, frame.desc.flags) == (
                0,
                GRANT,
                CONTROL,
            )
            assert frame.payload == b"\x02\x00"
            assert await wait_for(got, "the handler") == [("a", b"b")]
            await s.raw.send(2, 0, DATA, b"ping")
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.desc.flags, frame.payload) == (2, DATA, b"ping")
            frame = await s.raw.recv()  # the handler returned: the stream is closed (EOS)
            assert (frame.desc.channel_id, frame.desc.flags, frame.payload) == (2, REQUEST, b"")

    run(main())


def test_unknown_name_raises_unimplemented(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            p.server.set_tunnel_handler("Shell.upper", echo_upper)
            with pytest.raises(Unimplemented, match=r"Shell\.lower"):
                await p.client.open_tunnel("Shell.lower")
            p.server.set_tunnel_handler("Shell.upper", None)  # removed: refused too
            with pytest.raises(Unimplemented):
                await p.client.open_tunnel("Shell.upper")
            assert p.client.tunnel_channel_ids() == [] == p.server.tunnel_channel_ids()
            # the session goes on: calls and other tunnels
            p.server.set_dispatcher(echo_dispatcher)
            assert (await p.client.call(p.client.next_channel_id(), ECHO, b"ok")).payload == b"ok"
            p.server.set_tunnel_handler("Shell.upper", echo_upper)
            stream = await p.client.open_tunnel("Shell.upper")
            assert await stream.readline() == b"[]\n"

    run(main())


def test_bad_names_and_metadata_are_refused_before_sending(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, session_kwargs=PLAIN) as s:
            for bad in ("noservice", ".method", "Service."):
                with pytest.raises(ValueError, match=r"Service\.method"):
                    await s.session.open_tunnel(bad)
            with pytest.raises(TypeError, match="pairs"):
                await s.session.open_tunnel("A.b", {"k": "not bytes"})  # type: ignore[dict-item]
            with pytest.raises(ValueError):
                s.session.set_tunnel_handler("nodot", echo_upper)
            assert s.session.tunnel_channel_ids() == []
            await s.raw.send(1, ECHO, REQUEST, b"x")  # nothing was sent before this answer
            s.session.set_dispatcher(echo_dispatcher)

    run(main())


# -- early chunks held ---------------------------------------------------------------------


def test_chunks_in_the_same_batch_as_the_open_are_held(twin: Any, caplog: Any) -> None:
    """OpenChannel and the chunks after it arrive in one batch, before the handler task
    has run at all: they are held on the channel, none is dropped as unroutable."""
    caplog.set_level(logging.DEBUG, logger="rapace")

    async def main() -> None:
        async with raw_peer(twin, session_kwargs=PLAIN) as s:
            got: asyncio.Future[bytes] = asyncio.Future()

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                got.set_result(await stream.read(-1))

            s.session.set_tunnel_handler("Svc.sink", handler)
            s.session_transport.pause_reading()  # everything below lands in one batch
            await send_control(s.raw, OpenChannel(2, "Svc", "sink", []))
            for i in range(20):
                await s.raw.send(2, 0, DATA, b"%02d," % i)
            await s.raw.send(2, 0, REQUEST, b"")
            s.session_transport.resume_reading()
            data = await wait_for(got, "the handler")
            assert data == b"".join(b"%02d," % i for i in range(20))

    run(main())
    assert not [r for r in caplog.records if "unroutable" in r.getMessage()]


def test_early_chunks_are_bounded_and_never_dropped(twin: Any) -> None:
    """A handler that does not read yet: its chunks are held up to the tunnel's capacity,
    then reading pauses (the sender waits); once it reads, every chunk arrives in order."""
    capacity = DEFAULT_TUNNEL_CAPACITY
    count = capacity * 5

    async def main() -> None:
        async with raw_peer(twin, session_kwargs=PLAIN) as s:
            gate = asyncio.Event()
            streams: list[TunnelStream] = []
            got: asyncio.Future[bytes] = asyncio.Future()

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                streams.append(stream)
                await gate.wait()
                got.set_result(await stream.read(-1))

            s.session.set_tunnel_handler("Svc.slow", handler)

            async def send() -> None:
                await send_control(s.raw, OpenChannel(2, "Svc", "slow", []))
                for i in range(count):
                    await s.raw.send(2, 0, DATA, b"%04d" % i)
                await s.raw.send(2, 0, REQUEST, b"")

            sender = asyncio.create_task(send())
            await until(lambda: bool(streams), "the handler to start")
            receiver = streams[0]._receiver
            await until(lambda: receiver.buffered >= capacity, "the tunnel buffer to fill")
            await settle(50)
            assert not sender.done()  # reading paused: the sender is held back
            assert receiver.buffered <= 2 * capacity  # the capacity, plus one batch at most
            gate.set()
            data = await wait_for(got, "the handler's read")
            assert data == b"".join(b"%04d" % i for i in range(count))
            await wait_for(sender, "the sender")

    run(main())


# -- abort -----------------------------------------------------------------------------------


@pytest.mark.parametrize("aborter", ["opener", "acceptor"])
def test_abort_is_seen_as_tunnel_aborted(twin: Any, aborter: str) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            accepted: asyncio.Future[TunnelStream] = asyncio.Future()
            handler_done = asyncio.Event()

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                accepted.set_result(stream)
                await handler_done.wait()

            p.server.set_tunnel_handler("Svc.t", handler)
            opened = await p.client.open_tunnel("Svc.t")
            served = await wait_for(accepted, "the handler")
            me, peer = (opened, served) if aborter == "opener" else (served, opened)
            me.write(b"partial")
            await me.drain()
            me.abort("disk full")
            # what arrived before the abort is still read; then the abort, not an EOF
            assert await peer.read(100) == b"partial"
            with pytest.raises(TunnelAborted, match="disk full") as caught:
                await peer.read(100)
            assert caught.value.reason == "disk full"
            assert isinstance(caught.value, Aborted)
            with pytest.raises(TunnelAborted):  # and it stays aborted
                await peer.readexactly(1)
            with pytest.raises(TunnelAborted):
                peer.write(b"too late")
            # this side's own reads and writes fail the same way
            with pytest.raises(TunnelAborted):
                await me.read(1)
            with pytest.raises(TunnelAborted):
                me.write(b"x")
            handler_done.set()
            await until(lambda: not p.server.tunnel_channel_ids(), "the server's tunnel gone")
            assert p.client.tunnel_channel_ids() == []

    run(main())


def test_abort_on_the_wire_is_close_channel_error_and_no_eos(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, session_kwargs=PLAIN) as s:
            opening = asyncio.create_task(s.session.open_tunnel("Svc.t"))
            assert isinstance(await recv_control(s.raw), OpenChannel)
            await send_control(s.raw, GrantCredits(1, 0))
            stream = await wait_for(opening, "the open")
            stream.abort("why")
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.desc.method_id, frame.desc.flags) == (
                0,
                CLOSE,
                CONTROL,
            )
            assert frame.payload == b"\x01\x01\x03why"  # CloseChannel{1, Error("why")}
            stream.close()  # no EOS after an abort
            del stream
            s.session.set_dispatcher(echo_dispatcher)
            await s.raw.send(3, ECHO, REQUEST, b"next")
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.payload) == (3, b"next")

    run(main())


def test_a_failing_handler_aborts_its_tunnel(twin: Any, caplog: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                stream.write(b"some")
                await stream.drain()
                raise ValueError("bad state")

            p.server.set_tunnel_handler("Svc.fail", handler)
            stream = await p.client.open_tunnel("Svc.fail")
            with pytest.raises(TunnelAborted, match=r"Svc.fail.*ValueError: bad state"):
                await stream.read(-1)

    run(main())
    assert any("tunnel handler Svc.fail failed" in r.getMessage() for r in caplog.records)


def test_close_normal_is_a_full_close(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, session_kwargs=PLAIN) as s:
            opening = asyncio.create_task(s.session.open_tunnel("Svc.t"))
            assert isinstance(await recv_control(s.raw), OpenChannel)
            await send_control(s.raw, GrantCredits(1, 0))
            stream = await wait_for(opening, "the open")
            await s.raw.send(1, 0, DATA, b"last words")
            await send_control(s.raw, CloseChannel(1, CloseNormal()))
            assert await stream.read(-1) == b"last words"  # ends cleanly
            assert stream.at_eof()
            assert s.session.tunnel_channel_ids() == []
            with pytest.raises(BrokenPipeError):
                stream.write(b"nobody reads this")
            stream.close()  # sends nothing: no EOS into a closed channel
            s.session.set_dispatcher(echo_dispatcher)
            await s.raw.send(3, ECHO, REQUEST, b"next")
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.payload) == (3, b"next")

    run(main())


def test_forward_aborts_the_tunnel_when_the_local_connection_fails(twin: Any) -> None:
    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()
            self.closed = False

        def write(self, data: bytes) -> None:
            self.data += data

        async def drain(self) -> None:
            pass

        def can_write_eof(self) -> bool:
            return True

        def write_eof(self) -> None:
            pass

        def close(self) -> None:
            self.closed = True

    async def main() -> None:
        async with session_pair(twin) as p:
            accepted: asyncio.Future[TunnelStream] = asyncio.Future()
            reader = asyncio.StreamReader()
            sink = Sink()
            forwarding: list[asyncio.Task[None]] = []

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                accepted.set_result(stream)
                await forward(stream, reader, sink)

            p.server.set_tunnel_handler("Net.forward", handler)
            stream = await p.client.open_tunnel("Net.forward")
            await wait_for(accepted, "the handler")
            reader.feed_data(b"from the local socket")
            assert await stream.read(100) == b"from the local socket"
            stream.write(b"to the local socket")
            await until(lambda: bool(sink.data), "the bytes to reach the local connection")
            assert bytes(sink.data) == b"to the local socket"
            reader.set_exception(ConnectionResetError("connection reset by peer"))
            with pytest.raises(TunnelAborted, match="ConnectionResetError: connection reset"):
                await stream.read(100)
            assert sink.closed
            del forwarding

    run(main())


def test_forward_closes_the_local_connection_when_the_peer_aborts(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            done: asyncio.Future[None] = asyncio.Future()
            closed = asyncio.Event()

            class Sink:
                def write(self, data: bytes) -> None:
                    pass

                async def drain(self) -> None:
                    pass

                def can_write_eof(self) -> bool:
                    return False

                def write_eof(self) -> None:
                    pass

                def close(self) -> None:
                    closed.set()

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                await forward(stream, asyncio.StreamReader(), Sink())
                done.set_result(None)

            p.server.set_tunnel_handler("Net.forward", handler)
            stream = await p.client.open_tunnel("Net.forward")
            stream.abort("client went away")
            await wait_for(closed, "the local connection to close")
            await wait_for(done, "forward to return")

    run(main())


# -- refusals and hostile control frames --------------------------------------------------


def test_open_of_wrong_parity_or_in_use_is_refused_and_owner_untouched(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(
            twin, session_kwargs=PLAIN
        ) as s:  # the session opens odd channels; the raw end even
            s.session.set_tunnel_handler("Svc.t", echo_upper)
            own = s.session.open_tunnel_stream()  # channel 1, the session's own
            assert own.channel_id == 1
            await send_control(s.raw, OpenChannel(1, "Svc", "t", []))  # wrong parity
            message = await recv_control(s.raw)
            assert isinstance(message, CloseChannel) and message.channel_id == 1
            assert isinstance(message.reason, CloseError) and "parity" in message.reason.message
            await s.raw.send(1, 0, DATA, b"still mine")
            assert await own.read(100) == b"still mine"

            await send_control(s.raw, OpenChannel(2, "Svc", "t", []))  # accepted
            assert await recv_control(s.raw) == GrantCredits(2, 0)
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.payload) == (2, b"[]\n")
            await send_control(s.raw, OpenChannel(2, "Svc", "t", []))  # in use
            message = await recv_control(s.raw)
            assert isinstance(message, CloseChannel) and message.channel_id == 2
            assert isinstance(message.reason, CloseError) and "in use" in message.reason.message
            await s.raw.send(2, 0, DATA, b"abc")  # the first tunnel still works
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.payload) == (2, b"ABC")

            await send_control(s.raw, OpenChannel(0, "Svc", "t", []))  # channel 0: ignored
            s.session.set_dispatcher(echo_dispatcher)
            await s.raw.send(4, ECHO, REQUEST, b"next")
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.payload) == (4, b"next")

    run(main())


def test_hostile_control_frames_crash_nothing(twin: Any) -> None:
    huge_vec = b"\x02\x01S\x01m" + b"\xff\xff\xff\xff\x0f"  # 2**32 - 1 metadata pairs
    bad_frames = [
        (OPEN, b""),  # too short
        (OPEN, b"\x02\x03Sv"),  # truncated string
        (OPEN, b"\x02\x02\xff\xfe\x01m\x00"),  # bad UTF-8 in the service name
        (OPEN, huge_vec),
        (OPEN, b"\x02\x01S\x01m\x01\x01k\xff\xff\xff\xff\x0f"),  # huge bytes length
        (OPEN, b"\x02\x01S\x01m\x00trailing"),
        (CLOSE, b"\x02\x07"),  # unknown CloseReason
        (CLOSE, b"\x02\x01\x02\xc3\x28"),  # bad UTF-8 in the reason
        (CANCEL, b"\x02\x09"),
        (GRANT, b"\x02\xff\xff\xff\xff\x1f"),  # u32 overflow
        (GRANT, b"\x02\x02"),  # credits for a channel nobody opened
        (GRANT, b"\x04\xff\xff\xff\xff\x0f"),
        (GRANT, b"\x04\xff\xff\xff\xff\x0f"),  # sums past u32
        (99, b"whatever"),  # unknown verb
        (0, b""),
        (5, b"short"),  # ping of the wrong size
    ]

    async def main() -> None:
        async with raw_peer(twin, dispatcher=echo_dispatcher) as s:
            s.session.set_tunnel_handler("S.m", echo_upper)
            for verb, payload in bad_frames:
                await s.raw.send(0, verb, CONTROL, payload)
            await s.raw.send(1 + 1, ECHO, REQUEST, b"alive")  # a call still works
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.payload) == (2, b"alive")
            assert s.session.tunnel_channel_ids() == []
            await send_control(s.raw, OpenChannel(6, "S", "m", []))  # a tunnel still works
            assert await recv_control(s.raw) == GrantCredits(6, 0)
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.payload) == (6, b"[]\n")

    run(main())


def test_a_flood_of_refused_opens_stays_bounded(twin: Any) -> None:
    """A peer that opens unknown names and never reads the refusals: the refusals that
    wait are bounded (reading pauses), and each one is sent once it reads."""
    count = 300
    max_pending = 8

    async def main() -> None:
        async with raw_peer(
            twin, session_kwargs={"max_pending": max_pending}, max_in_flight=16
        ) as s:

            async def flood() -> None:
                for i in range(count):
                    await send_control(s.raw, OpenChannel(2 + 2 * i, "No", "such", []))

            sender = asyncio.create_task(flood())
            await until(lambda: len(s.session._background) >= max_pending, "refusals to wait")
            await settle(50)
            assert not sender.done()  # reading paused
            assert len(s.session._background) <= max_pending + 16
            refused = set()
            for _ in range(count):
                message = await recv_control(s.raw)
                assert isinstance(message, CloseChannel)
                refused.add(message.channel_id)
            assert refused == {2 + 2 * i for i in range(count)}
            await wait_for(sender, "the flood")

    run(main())


def test_too_many_open_tunnels_is_resource_exhausted(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin, server_kwargs={"max_pending": 2}) as p:
            release = asyncio.Event()

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                await release.wait()

            p.server.set_tunnel_handler("Svc.hold", handler)
            first = await p.client.open_tunnel("Svc.hold")
            await p.client.open_tunnel("Svc.hold")
            with pytest.raises(ResourceExhausted):
                await p.client.open_tunnel("Svc.hold")
            release.set()
            assert await first.read(-1) == b""  # the handler returned: EOS
            await until(lambda: not p.server._named.accepted_channel_ids, "the handlers to end")
            release.clear()
            await p.client.open_tunnel("Svc.hold")  # room again

    run(main())


# -- a peer that ignores the control channel; lifecycle ------------------------------------


def test_peer_ignoring_control_frames_times_out_and_still_works(twin: Any) -> None:
    """The raw end speaks only the seed protocol: it ignores OpenChannel. ``open_tunnel``
    fails with DeadlineExceeded (and tells it so); calls and plain tunnels work."""

    async def main() -> None:
        async with raw_peer(twin) as s:  # credits on (the default): announced first
            with pytest.raises(DeadlineExceeded, match="OpenChannel"):
                await s.session.open_tunnel("Svc.t", timeout=0.05)
            assert await recv_control(s.raw) == GrantCredits(0, DEFAULT_TUNNEL_CREDIT_WINDOW)
            assert isinstance(await recv_control(s.raw), OpenChannel)
            message = await recv_control(s.raw)
            assert isinstance(message, CloseChannel) and message.channel_id == 1
            assert s.session.tunnel_channel_ids() == []
            assert s.session._named.opening_channel_ids == []
            # a late acknowledgement changes nothing
            await send_control(s.raw, GrantCredits(1, 0))
            # a unary call, answered by hand
            call = asyncio.create_task(s.session.call(3, ECHO, b"hi"))
            request = await s.raw.recv()
            assert (request.desc.channel_id, request.desc.method_id) == (3, ECHO)
            await s.raw.send(3, 0, REQUEST, b"hi back", msg_id=0)
            assert (await wait_for(call, "the call")).payload == b"hi back"
            # a plain tunnel, by channel id
            stream = s.session.tunnel_stream(5)
            stream.write(b"up")
            frame = await s.raw.recv()
            assert (frame.desc.channel_id, frame.desc.flags, frame.payload) == (5, DATA, b"up")
            await s.raw.send(5, 0, DATA | EOS, b"down")
            assert await stream.read(-1) == b"down"

    run(main())


def test_cancelling_an_open_cleans_up_and_tells_the_peer(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, session_kwargs=PLAIN) as s:
            opening = asyncio.create_task(s.session.open_tunnel("Svc.t"))
            assert isinstance(await recv_control(s.raw), OpenChannel)
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            message = await recv_control(s.raw)
            assert isinstance(message, CloseChannel) and message.channel_id == 1
            assert isinstance(message.reason, CloseError)
            assert s.session.tunnel_channel_ids() == []
            assert s.session._named.opening_channel_ids == []

    run(main())


def test_session_close_fails_the_open_and_cancels_handlers(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            cancelled = asyncio.Event()
            started = asyncio.Event()

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                started.set()
                try:
                    await asyncio.Event().wait()
                finally:
                    cancelled.set()

            p.server.set_tunnel_handler("Svc.hold", handler)
            stream = await p.client.open_tunnel("Svc.hold")
            await wait_for(started, "the handler")
            p.server.close()
            await wait_for(cancelled, "the handler to be cancelled")
            with pytest.raises(SessionClosed):
                await stream.read(1)

        async with raw_peer(twin, session_kwargs=PLAIN) as s:
            opening = asyncio.create_task(s.session.open_tunnel("Svc.t"))
            assert isinstance(await recv_control(s.raw), OpenChannel)
            s.session.close()
            with pytest.raises(SessionClosed):
                await wait_for(opening, "the open to fail")
            with pytest.raises(SessionClosed):
                await s.session.open_tunnel("Svc.t")

    run(main())


def test_cancel_channel_answering_an_open(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, session_kwargs=PLAIN) as s:
            opening = asyncio.create_task(s.session.open_tunnel("Svc.t"))
            assert isinstance(await recv_control(s.raw), OpenChannel)
            await send_control(s.raw, CancelChannel(1, CancelReason.RESOURCE_EXHAUSTED))
            with pytest.raises(ResourceExhausted):
                await wait_for(opening, "the refusal")
            assert s.session.tunnel_channel_ids() == []

    run(main())


# -- the typed-service form ----------------------------------------------------------------


@rapace.service
class Shell:
    async def upper(self) -> rapace.Tunnel: ...

    async def missing(self) -> rapace.Tunnel: ...

    async def add(self, a: rapace.i32, b: rapace.i32) -> rapace.i32: ...


class ShellImpl(Shell):
    async def upper(self, tunnel: rapace.Tunnel) -> None:  # type: ignore[override]
        tunnel.write(b"".join(value for _, value in tunnel.metadata) + b"|")
        async for data in tunnel:
            tunnel.write(data.upper())

    async def add(self, a: int, b: int) -> int:
        return a + b


def test_typed_service_tunnel_method(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            rapace.register_services(p.server, ShellImpl())
            shell = rapace.client(Shell, p.client)
            stream = await shell.upper(metadata={"greeting": b"hi"})
            assert isinstance(stream, TunnelStream)
            stream.write(b"abc")
            stream.write_eof()
            assert await stream.read(-1) == b"hi|ABC"
            assert await shell.add(2, 3) == 5  # unary methods unaffected
            with pytest.raises(Unimplemented):  # declared, not implemented: refused
                await shell.missing()
            # the tunnel's method id is not a call
            with pytest.raises(Unimplemented, match="opened by name"):
                await p.client.call(
                    p.client.next_channel_id(), Shell.__rapace_service__.methods["upper"].method_id
                )

    run(main())


def test_typed_tunnel_method_takes_no_parameters() -> None:
    with pytest.raises(TypeError, match="takes no parameters"):

        @rapace.service
        class Bad:
            async def shell(self, user: str) -> rapace.Tunnel: ...


def test_tunnel_aborted_is_an_exported_aborted_status() -> None:
    assert "TunnelAborted" in rapace.__all__ and rapace.TunnelAborted is TunnelAborted
    error = TunnelAborted("reason text")
    assert error.code == rapace.ErrorCode.Aborted and error.reason == "reason text"
    assert isinstance(error, Aborted) and isinstance(error, rapace.RpcError)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is TunnelAborted and copy.reason == "reason text"
    assert type(rapace.RpcError(9, "x")) is Aborted  # the code still maps to Aborted


# -- across processes ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_named_tunnels_to_a_server_in_another_process(twin: Any, kind: str) -> None:
    """The child server (tests/net_helpers.py) serves NetTest.echo (metadata, then every
    byte back, 3 MiB through the credit window) and NetTest.refuse (aborts with a
    reason); an unknown name is refused."""

    async def main(address: str) -> None:
        async with rapace.connect(address) as session:
            stream = await session.open_tunnel("NetTest.echo", {"user": b"ada"})
            assert await stream.readline() == b"user=ada\n"
            data = pattern(3, 3 * 1024 * 1024)

            async def write() -> None:
                stream.write(data)
                await stream.drain()
                stream.write_eof()
                await stream.drain()

            writer = asyncio.create_task(write())
            assert await stream.read() == data
            await writer
            aborting = await session.open_tunnel("NetTest.refuse")
            aborting.write(b"no thanks\n")
            with pytest.raises(TunnelAborted, match="refused: no thanks"):
                await aborting.read()
            with pytest.raises(Unimplemented):
                await session.open_tunnel("NetTest.nothing")
            assert (await session.call(session.next_channel_id(), NET_ECHO, b"ok")).payload == b"ok"

    with short_tmpdir() as tmp, spawn(twin.name, "serve", listen_address(kind, tmp)) as child:
        net_run(main(child.address))


# -- found in review: each once a defect ---------------------------------------------------


def test_an_open_given_up_after_its_acceptance_tells_the_acceptor(twin: Any) -> None:
    """The acceptance arrives in the loop pass in which the opener's timeout fires: the
    acceptor must hear that nobody will use the tunnel, or its handler waits forever."""

    async def main() -> None:
        async with raw_peer(twin, session_kwargs=PLAIN) as s:
            opening = asyncio.create_task(s.session.open_tunnel("Svc.t"))
            message = await recv_control(s.raw)
            assert isinstance(message, OpenChannel)
            verb, payload = control_bytes(GrantCredits(message.channel_id, 0))
            s.session.frames_received([s.raw.frame(0, verb, CONTROL, payload)])
            opening.cancel()  # before it could resume with its stream
            with pytest.raises(asyncio.CancelledError):
                await opening
            gave_up = await recv_control(s.raw)
            assert isinstance(gave_up, CloseChannel) and gave_up.channel_id == message.channel_id
            assert isinstance(gave_up.reason, CloseError)
            assert s.session.tunnel_channel_ids() == []

    run(main())


def test_a_channel_whose_handler_still_runs_cannot_be_opened_again(twin: Any) -> None:
    """The peer ends its side of a tunnel (EOS) while the handler works on, then opens
    the same channel again: refused, and no handler outlives the session."""
    finished = asyncio.Event()
    release = asyncio.Event()

    async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
        try:
            assert await stream.read() == b""  # the peer's EOS
            await release.wait()
        finally:
            finished.set()

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2, session_kwargs=PLAIN) as s:
            s.session.set_tunnel_handler("Svc.t", handler)
            verb, payload = control_bytes(OpenChannel(1, "Svc", "t", []))
            await s.raw.send(0, verb, CONTROL, payload)
            assert isinstance(await recv_control(s.raw), GrantCredits)  # accepted
            await s.raw.send(1, 0, DATA | EOS, b"")
            await until(lambda: s.session.tunnel_channel_ids() == [], "the EOS to be read")
            await s.raw.send(0, verb, CONTROL, payload)  # again, while the handler runs
            refusal = await recv_control(s.raw)
            assert isinstance(refusal, CloseChannel) and refusal.channel_id == 1
            assert "in use" in refusal.reason.message
            assert s.session._named.accepted_channel_ids == [1]
            s.session.close()
            await wait_for(finished, "the handler to be cancelled")
            assert s.session._named.accepted_channel_ids == []

    run(main())


def test_a_graceful_shutdown_waits_for_the_tunnel_handlers_it_serves(twin: Any) -> None:
    """A handler serving the peer's tunnel is work in progress, as a call is: the session
    is busy while it runs, ``shutdown()`` lets it finish, and a new open is refused."""

    async def main() -> None:
        async with session_pair(twin) as p:
            started, finish = asyncio.Event(), asyncio.Event()

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                started.set()
                await finish.wait()
                stream.write(b"all done")

            p.server.set_tunnel_handler("Svc.job", handler)
            stream = await p.client.open_tunnel("Svc.job")
            await wait_for(started, "the handler")
            assert p.server.busy
            shutting_down = asyncio.create_task(p.server.shutdown(grace=30.0))
            await until(lambda: p.server._draining, "the drain")
            with pytest.raises(Unimplemented, match="shutting down"):
                await p.client.open_tunnel("Svc.job")
            assert not shutting_down.done()
            finish.set()
            assert await stream.read(-1) == b"all done"  # its answer, then a normal end
            await wait_for(shutting_down, "the shutdown")
            assert not p.server.busy

    run(main())


def test_a_tunnel_handler_still_running_after_the_grace_is_cancelled(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            started, cancelled = asyncio.Event(), asyncio.Event()

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                started.set()
                try:
                    await asyncio.Event().wait()
                finally:
                    cancelled.set()

            p.server.set_tunnel_handler("Svc.hold", handler)
            stream = await p.client.open_tunnel("Svc.hold")
            await wait_for(started, "the handler")
            await wait_for(p.server.shutdown(grace=0.05), "the shutdown")
            assert cancelled.is_set()
            with pytest.raises(TunnelAborted, match="shut down"):
                await stream.read(1)

    run(main())


@pytest.mark.parametrize("credits", [True, False], ids=["credits", "no-credits"])
def test_an_abort_after_the_peers_eos_still_fails_the_tunnel(twin: Any, credits: bool) -> None:
    """The peer's EOS unregisters this side's receiver; an abort that follows is not lost:
    this side's writes and further reads raise ``TunnelAborted`` with its reason."""

    async def main() -> None:
        kwargs = {} if credits else PLAIN
        async with session_pair(twin, client_kwargs=kwargs, server_kwargs=kwargs) as p:
            go = asyncio.Event()

            async def handler(stream: TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
                stream.write(b"bye")
                stream.write_eof()
                await go.wait()
                stream.abort("changed my mind")

            p.server.set_tunnel_handler("Svc.t", handler)
            stream = await p.client.open_tunnel("Svc.t")
            assert await stream.read(-1) == b"bye"
            go.set()
            receiver = stream.receiver
            await until(lambda: receiver.aborted is not None, "the abort")
            with pytest.raises(TunnelAborted, match="changed my mind"):
                stream.write(b"x")
            with pytest.raises(TunnelAborted, match="changed my mind"):
                await stream.read(1)
            await until(lambda: not p.server.tunnel_channel_ids(), "the server's tunnel gone")

    run(main())


def test_an_open_whose_acceptor_overran_the_window_first_raises(twin: Any) -> None:
    """Bytes past the window before the acknowledgement: the open fails with
    ``TunnelAborted`` instead of returning a stream that is already dead."""

    async def main() -> None:
        async with raw_peer(twin, session_kwargs={"tunnel_credit_window": 100}) as s:
            opening = asyncio.create_task(s.session.open_tunnel("Svc.t"))
            assert await recv_control(s.raw) == GrantCredits(0, 100)
            assert isinstance(await recv_control(s.raw), OpenChannel)
            await s.raw.send(1, 0, DATA, b"e" * 101)  # past the window, ahead of the answer
            await send_control(s.raw, GrantCredits(1, 500))
            with pytest.raises(TunnelAborted, match="credit exceeded"):
                await wait_for(opening, "the open")
            message = await recv_control(s.raw)
            assert isinstance(message, CloseChannel) and message.channel_id == 1
            assert s.session.tunnel_channel_ids() == []

    run(main())
