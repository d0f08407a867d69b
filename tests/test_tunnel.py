"""Tunnels: ``register_tunnel``/``send_chunk``/``close_tunnel`` (the seed's tunnel APIs),
``TunnelReceiver`` backpressure and ``TunnelStream``, against both twins.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import random
from typing import Any

import pytest
from session_helpers import (
    DATA,
    ECHO,
    EOS,
    ERROR,
    REQUEST,
    echo_dispatcher,
    raw_peer,
    run,
    session_pair,
    settle,
    wait_for,
)

from rapace import NotFound, SessionClosed, TunnelChunk, TunnelReceiver, TunnelStream
from rapace.tunnel import DEFAULT_TUNNEL_CAPACITY, DEFAULT_WRITE_CHUNK_SIZE
from rapace.wire import encode_error_payload


async def recv(receiver: TunnelReceiver) -> TunnelChunk | None:
    return await wait_for(asyncio.ensure_future(receiver.recv()), "a tunnel chunk")


# -- the seed's tunnel API ----------------------------------------------------------------


@pytest.mark.parametrize("first_to_close", ["client", "server"])
def test_tunnel_both_ways_with_half_close(twin: Any, first_to_close: str) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            ch = p.client.next_channel_id()
            at_client = p.client.register_tunnel(ch)
            at_server = p.server.register_tunnel(ch)
            assert at_client.channel_id == at_server.channel_id == ch
            assert p.client.tunnel_channel_ids() == [ch] == p.server.tunnel_channel_ids()

            await p.client.send_chunk(ch, b"c1")
            await p.server.send_chunk(ch, b"s1" * 20)
            assert (await recv(at_server)).payload == b"c1"
            assert (await recv(at_client)).payload == b"s1" * 20

            closer, other = (
                (p.client, p.server) if first_to_close == "client" else (p.server, p.client)
            )
            closer_rx, other_rx = (
                (at_client, at_server) if first_to_close == "client" else (at_server, at_client)
            )
            await closer.close_tunnel(ch)
            eos = await recv(other_rx)
            assert eos.is_eos and not eos.is_error and eos.payload == b""
            assert await recv(other_rx) is None
            assert other.tunnel_channel_ids() == []  # EOS unregistered it on the receiving side
            assert closer.tunnel_channel_ids() == [ch]  # still receiving: half-close

            # the other side keeps sending until its own EOS
            for i in range(5):
                await other.send_chunk(ch, b"more-%d" % i)
            await other.close_tunnel(ch)
            got = [await recv(closer_rx) for _ in range(6)]
            assert [c.payload for c in got[:5]] == [b"more-%d" % i for i in range(5)]
            assert got[5].is_eos and got[5].payload == b""
            assert await recv(closer_rx) is None
            assert closer.tunnel_channel_ids() == []

    run(main())


def test_tunnel_frames_on_the_wire(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            s.session.register_tunnel(9)
            await s.session.send_chunk(9, b"chunk")
            await s.session.send_chunk(9, b"y" * 100)
            await s.session.close_tunnel(9)
            frames = [await s.raw.recv() for _ in range(3)]
            for f in frames:
                assert (f.desc.channel_id, f.desc.method_id) == (9, 0)
            assert [f.desc.flags for f in frames] == [DATA, DATA, DATA | EOS]
            assert [f.payload for f in frames] == [b"chunk", b"y" * 100, b""]
            ids = [f.desc.msg_id for f in frames]
            assert ids == sorted(ids) and len(set(ids)) == 3

    run(main())


def test_tunnel_takes_every_frame_on_its_channel(twin: Any) -> None:
    """A registered tunnel has priority: even a frame with a method id or ERROR goes to it."""

    async def main() -> None:
        async with raw_peer(twin, dispatcher=echo_dispatcher) as s:
            receiver = s.session.register_tunnel(5)
            await s.raw.send(5, ECHO, REQUEST & ~EOS, b"looks like a request")
            await s.raw.send(5, 0, ERROR | EOS, encode_error_payload(4, "bad"))
            first = await recv(receiver)
            assert first.payload == b"looks like a request" and not first.is_eos
            second = await recv(receiver)
            assert second.is_error and second.is_eos
            assert await recv(receiver) is None
            assert s.session.tunnel_channel_ids() == []

    run(main())


def test_registering_a_channel_twice_raises(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            receiver = s.session.register_tunnel(3)
            with pytest.raises(ValueError):
                s.session.register_tunnel(3)
            assert s.session.tunnel_channel_ids() == [3]
            await s.raw.send(3, 0, DATA, b"still routed to the first")
            assert (await recv(receiver)).payload == b"still routed to the first"

    run(main())


def test_unregister_and_close_receiver(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            receiver = s.session.register_tunnel(3)
            s.session.unregister_tunnel(3)
            assert s.session.tunnel_channel_ids() == []
            assert await recv(receiver) is None
            s.session.unregister_tunnel(3)  # no tunnel: nothing happens
            other = s.session.register_tunnel(3)  # the channel is free again
            sentinel = s.session.register_tunnel(1)
            await s.raw.send(3, 0, DATA, b"buffered")
            await s.raw.send(1, 0, DATA, b"sentinel")  # in order: channel 3's chunk came first
            assert (await recv(sentinel)).payload == b"sentinel"
            assert other.buffered == 1
            other.close()  # drops what is buffered, unregisters
            assert other.buffered == 0
            assert await recv(other) is None
            assert s.session.tunnel_channel_ids() == [1]

    run(main())


def test_closing_a_stale_receiver_does_not_unregister_a_newer_tunnel(twin: Any) -> None:
    """A receiver that already ended (EOS) and is closed later (cleanup code, a finalizer)
    must not tear down a newer tunnel that reuses its channel id."""

    async def main() -> None:
        async with raw_peer(twin) as s:
            old = s.session.register_tunnel(3)
            await s.raw.send(3, 0, DATA | EOS, b"")
            assert (await recv(old)).is_eos
            assert s.session.tunnel_channel_ids() == []
            new = s.session.register_tunnel(3)
            old.close()  # stale cleanup
            assert s.session.tunnel_channel_ids() == [3]
            await s.raw.send(3, 0, DATA, b"for the new one")
            assert (await recv(new)).payload == b"for the new one"

    run(main())


def test_receiver_async_iteration(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            receiver = s.session.register_tunnel(3)
            for i in range(3):
                await s.raw.send(3, 0, DATA, b"%d" % i)
            await s.raw.send(3, 0, DATA | EOS, b"")
            chunks = [c async for c in receiver]
            assert [c.payload for c in chunks] == [b"0", b"1", b"2", b""]
            assert [c.is_eos for c in chunks] == [False, False, False, True]
            assert "TunnelChunk" in repr(chunks[0])

    run(main())


def test_receiver_capacity_must_be_positive(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as s:
            with pytest.raises(ValueError):
                TunnelReceiver(s.session.port, 3, capacity=0)

    run(main())


# -- backpressure -------------------------------------------------------------------------


def test_10_mib_to_a_slow_reader_stays_bounded(twin: Any) -> None:
    size = 10 * 1024 * 1024
    chunk_size = 16 * 1024  # 640 frames: far more than the inbox and the receiver hold
    data = random.Random(7).randbytes(size)
    capacity = DEFAULT_TUNNEL_CAPACITY
    assert capacity == 64
    mem_bound = 64

    async def main() -> None:
        async with session_pair(twin) as p:
            ch = p.client.next_channel_id()
            receiver = p.server.register_tunnel(ch)
            p.client.register_tunnel(ch)
            progress = {"sent": 0}

            async def send() -> None:
                for offset in range(0, size, chunk_size):
                    await p.client.send_chunk(ch, data[offset : offset + chunk_size])
                    progress["sent"] += 1
                await p.client.close_tunnel(ch)

            sender = asyncio.create_task(send())
            digest = hashlib.sha256()
            received = 0
            max_buffered = max_inbox = max_in_flight = 0
            while True:
                chunk = await recv(receiver)  # one chunk per wake-up
                assert chunk is not None
                max_buffered = max(max_buffered, receiver.buffered + 1)
                max_inbox = max(max_inbox, len(p.server_transport._inbox))
                if chunk.is_eos:
                    break
                received += 1
                max_in_flight = max(max_in_flight, progress["sent"] - received)
                digest.update(chunk.payload)
                await asyncio.sleep(0)  # a slow reader: the loop turns between chunks
            await wait_for(sender, "the sender")
            assert received == size // chunk_size
            assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
            assert max_buffered <= capacity + mem_bound, max_buffered
            assert max_inbox <= mem_bound, max_inbox
            # backpressure reached the sender: it was never further ahead of the reader
            # than what the receiver and the transport may hold
            assert max_in_flight <= capacity + 2 * mem_bound + 1, max_in_flight
            assert p.server.tunnel_channel_ids() == []

    run(main(), timeout=30)


def test_paused_tunnel_resumes_after_reader_drains(twin: Any) -> None:
    """A full receiver pauses the transport; reading half of it resumes the flow."""

    async def main() -> None:
        async with session_pair(twin) as p:
            ch = p.client.next_channel_id()
            receiver = p.server.register_tunnel(ch)
            sent = 0

            async def send(n: int) -> None:
                nonlocal sent
                for _ in range(n):
                    await p.client.send_chunk(ch, b"x")
                    sent += 1

            sender = asyncio.create_task(send(64 * 4))
            await settle(50)
            assert not sender.done()  # held back: 64 buffered + 64 queued at most
            assert receiver.buffered <= 128
            for _ in range(64 * 4):
                assert (await recv(receiver)).payload == b"x"
            await wait_for(sender, "the sender")
            # other traffic flows again once the reader caught up
            p.server.set_dispatcher(echo_dispatcher)
            assert (await p.client.call(p.client.next_channel_id(), ECHO, b"ok")).payload == b"ok"

    run(main())


# -- TunnelStream -------------------------------------------------------------------------


def streams(p: Any) -> tuple[TunnelStream, TunnelStream]:
    """A client stream on a fresh channel and the server's stream on the same channel."""
    client_stream = p.client.open_tunnel_stream()
    server_stream = p.server.tunnel_stream(client_stream.channel_id)
    return client_stream, server_stream


def test_stream_read_n(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            c, s = streams(p)
            assert c.channel_id % 2 == 1 and c.get_extra_info("channel_id") == c.channel_id
            s.write(b"hello world")
            await s.drain()
            assert await c.read(5) == b"hello"
            assert await c.read(100) == b" world"  # what is there, at least one byte
            assert await c.read(0) == b""
            s.write(b"ab")
            s.write_eof()
            await s.drain()
            assert await c.read() == b"ab"  # n < 0: to EOF
            assert await c.read(10) == b""
            assert c.at_eof()

    run(main())


def test_stream_readexactly(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            c, s = streams(p)
            s.write(b"a")
            s.write(b"bc")
            s.write_eof()
            assert await c.readexactly(0) == b""
            assert await c.readexactly(2) == b"ab"
            with pytest.raises(asyncio.IncompleteReadError) as info:
                await c.readexactly(5)
            assert info.value.partial == b"c"
            assert info.value.expected == 5
            with pytest.raises(ValueError):
                await c.readexactly(-1)

    run(main())


def test_stream_readline_and_readuntil(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            c, s = streams(p)
            for piece in (b"li", b"ne1\nline2\nab", b"c||def", b"\nrest"):
                s.write(piece)
                await s.drain()
            s.write_eof()
            assert await c.readline() == b"line1\n"
            assert await c.readline() == b"line2\n"
            assert await c.readuntil(b"||") == b"abc||"
            assert await c.readline() == b"def\n"
            assert await c.readline() == b"rest"  # what is left at EOF
            assert await c.readline() == b""
            with pytest.raises(asyncio.IncompleteReadError):
                await c.readuntil(b"\n")
            with pytest.raises(ValueError):
                await c.readuntil(b"")

    run(main())


def test_stream_async_for_and_write_chunking(twin: Any) -> None:
    data = random.Random(3).randbytes(3 * DEFAULT_WRITE_CHUNK_SIZE + 123)

    async def main() -> None:
        async with session_pair(twin) as p:
            c, s = streams(p)
            c.write(data)
            c.write_eof()
            await c.drain()
            pieces = [piece async for piece in s]
            assert b"".join(pieces) == data
            assert max(len(piece) for piece in pieces) <= DEFAULT_WRITE_CHUNK_SIZE
            assert len(pieces) >= 4

    run(main())


def test_stream_write_chunk_size(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as setup:
            stream = TunnelStream(setup.session.port, 3, write_chunk_size=4)
            stream.writelines([b"abcdef", b"gh"])
            await stream.drain()
            # Each write is cut at write_chunk_size; a write that fits is one frame.
            frames = [await setup.raw.recv() for _ in range(3)]
            assert [f.payload for f in frames] == [b"abcd", b"ef", b"gh"]
            assert all(f.desc.flags == DATA for f in frames)
            with pytest.raises(ValueError):
                TunnelStream(setup.session.port, 5, write_chunk_size=0)
            stream.close()
            await stream.wait_closed()

    run(main())


def test_stream_half_close_both_directions(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            c, s = streams(p)
            assert c.can_write_eof()
            c.write(b"request")
            c.write_eof()
            await c.drain()
            with pytest.raises(RuntimeError):
                c.write(b"after eof")
            assert await s.read() == b"request"  # the server reads to EOF ...
            assert s.at_eof()
            assert p.server.tunnel_channel_ids() == []
            s.write(b"response")  # ... and still answers
            s.write_eof()
            await s.drain()
            assert await c.read() == b"response"
            assert c.at_eof()
            assert p.client.tunnel_channel_ids() == []

    run(main())


def test_stream_close_and_wait_closed(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            c, s = streams(p)
            c.write(b"last words")
            assert not c.is_closing()
            c.close()
            assert c.is_closing()
            await wait_for(asyncio.ensure_future(c.wait_closed()), "wait_closed")
            assert c.channel_id not in p.client.tunnel_channel_ids()
            with pytest.raises(RuntimeError):
                c.write(b"more")
            assert await s.read() == b"last words"
            assert s.at_eof()
            c.close()  # idempotent

    run(main())


def test_stream_as_async_context_manager(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            c, s = streams(p)
            async with c:
                c.write(b"inside")
            assert c.is_closing()
            assert await s.read() == b"inside"

    run(main())


def test_stream_read_raises_the_peer_error(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as setup:
            stream = setup.session.tunnel_stream(3)
            await setup.raw.send(3, 0, DATA, b"some")
            await setup.raw.send(3, 0, ERROR | EOS, encode_error_payload(4, "gone"))
            assert await stream.read(4) == b"some"
            with pytest.raises(NotFound, match="gone"):
                await stream.read(1)

    run(main())


def test_stream_write_after_session_close_raises_from_drain(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            c, _s = streams(p)
            p.client.close()
            c.write(b"into the void")
            with pytest.raises(SessionClosed):
                await c.drain()
            with pytest.raises(SessionClosed):
                c.write(b"again")

    run(main())


def test_stream_read_after_session_close_raises(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            c, _s = streams(p)
            reading = asyncio.ensure_future(c.read(10))
            await settle()
            p.server_transport.close()
            with pytest.raises(SessionClosed):
                await wait_for(reading, "the read to fail")

    run(main())


def test_garbage_collected_stream_unregisters_and_peer_sees_eos(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            ch = p.client.next_channel_id()
            peer = p.server.tunnel_stream(ch)

            def open_and_drop() -> None:
                stream = p.client.tunnel_stream(ch)
                assert ch in p.client.tunnel_channel_ids()
                del stream

            open_and_drop()
            gc.collect()
            assert ch not in p.client.tunnel_channel_ids()
            assert await wait_for(asyncio.ensure_future(peer.read()), "the peer's EOF") == b""
            assert peer.at_eof()
            assert p.server.tunnel_channel_ids() == []

    run(main())


def test_garbage_collected_stream_sends_its_data_then_eos(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            ch = p.client.next_channel_id()
            peer = p.server.tunnel_stream(ch)

            def write_and_drop() -> None:
                stream = p.client.tunnel_stream(ch)
                stream.write(b"parting gift")

            write_and_drop()
            assert (
                await wait_for(asyncio.ensure_future(peer.read()), "data then EOF")
                == b"parting gift"
            )
            gc.collect()
            assert ch not in p.client.tunnel_channel_ids()

    run(main())
