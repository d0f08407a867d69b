"""``StreamTransport``: framing through the twin's decoder, coalesced writes, write and
read backpressure, clean and broken ends; then tunnels over real sockets: 100 MiB each
way with half-close, a slow reader holding memory bounded, and a graceful close that
flushes everything written.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import socket
import struct
import time
import tracemalloc
from typing import Any

import pytest
from net_helpers import (
    COUNT,
    DATA,
    ECHO,
    EOS,
    KINDS,
    LOOPS,
    OPEN_TUNNEL,
    REQUEST,
    Service,
    listen_address,
    open_tunnel,
    raw_frame,
    run,
    serve_service,
    settle,
    short_tmpdir,
    wait_for,
    wait_until,
)
from session_helpers import pull

import rapace
from rapace.errors import FrameError
from rapace.transport import TransportClosed
from rapace.transport.stream import HANGUP_CHECK_INTERVAL, StreamTransport
from rapace.tunnel import DEFAULT_TUNNEL_CAPACITY

MiB = 1 << 20


class Sink:
    """A recording ``FrameSink``."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.batches = 0
        self.lost: list[BaseException | None] = []
        self.got_lost = asyncio.Event()
        self.count_reached = asyncio.Event()
        self.target = 0

    def frames_received(self, frames: list[Any]) -> None:
        self.batches += 1
        self.frames.extend(frames)
        if self.target and len(self.frames) >= self.target:
            self.count_reached.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)
        self.got_lost.set()


class FakeTransport(asyncio.Transport):
    """Records writes and reading state (for the write-coalescing unit tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[list[bytes]] = []
        self.reading = True
        self.closing = False

    def write(self, data: Any) -> None:
        self.writes.append([bytes(data)])

    def writelines(self, list_of_data: Any) -> None:
        self.writes.append([bytes(d) for d in list_of_data])

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": "fake-peer"}.get(name, default)


def frame(twin: Any, msg_id: int, payload: bytes = b"", channel_id: int = 1) -> Any:
    return twin.frame.build_frame(msg_id, channel_id, 0, DATA, payload)


def completes_without_suspending(coro: Any) -> bool:
    try:
        coro.send(None)
    except StopIteration:
        return True
    coro.close()
    return False


# -- writes: coalescing and write backpressure (a recording transport) ----------------------


def test_frames_sent_in_one_iteration_leave_in_one_write(twin: Any) -> None:
    async def main() -> None:
        st = StreamTransport()
        fake = FakeTransport()
        st.connection_made(fake)
        frames = [frame(twin, i, b"x" * i * 10) for i in range(1, 6)]
        for f in frames:
            assert completes_without_suspending(st.send_frame(f)), "send_frame suspended"
        assert fake.writes == [], "written before the loop iteration ended"
        await asyncio.sleep(0)
        # One write call (writelines on uvloop, one joined write on asyncio's transports).
        assert len(fake.writes) == 1
        assert b"".join(fake.writes[0]) == b"".join(twin.frame.encode_frame(f) for f in frames)
        assert completes_without_suspending(st.send_frame(frames[0]))
        await asyncio.sleep(0)
        assert len(fake.writes) == 2
        assert fake.writes[1] == [twin.frame.encode_frame(frames[0])]

    run(main())


def test_send_frame_waits_only_while_writing_is_paused(twin: Any) -> None:
    async def main() -> None:
        st = StreamTransport()
        fake = FakeTransport()
        st.connection_made(fake)
        st.pause_writing()
        sends = [asyncio.ensure_future(st.send_frame(frame(twin, i))) for i in (1, 2)]
        await settle()
        assert not any(s.done() for s in sends)
        # The frames are queued for the socket all the same (asyncio buffers them).
        assert len(fake.writes) == 1
        assert b"".join(fake.writes[0]) == b"".join(
            twin.frame.encode_frame(frame(twin, i)) for i in (1, 2)
        )
        st.resume_writing()
        await wait_for(asyncio.gather(*sends), "the writers to be released")
        assert completes_without_suspending(st.send_frame(frame(twin, 3)))

    run(main())


def test_try_send_frame_declines_while_not_connected_paused_or_closed(twin: Any) -> None:
    async def main() -> None:
        st = StreamTransport()
        assert not st.try_send_frame(frame(twin, 1))  # not connected yet
        fake = FakeTransport()
        st.connection_made(fake)
        assert st.try_send_frame(frame(twin, 2))
        st.pause_writing()
        assert not st.try_send_frame(frame(twin, 3))
        st.resume_writing()
        assert st.try_send_frame(frame(twin, 4))
        await asyncio.sleep(0)  # the iteration's frames leave in one write
        assert fake.writes == [
            [twin.frame.encode_frame(frame(twin, 2)) + twin.frame.encode_frame(frame(twin, 4))]
        ] or fake.writes == [[twin.frame.encode_frame(frame(twin, i)) for i in (2, 4)]]
        st.close()
        assert not st.try_send_frame(frame(twin, 5))
        assert len(fake.writes) == 1

    run(main())


def test_close_releases_paused_writers(twin: Any) -> None:
    async def main() -> None:
        st = StreamTransport()
        fake = FakeTransport()
        st.connection_made(fake)
        st.pause_writing()
        send = asyncio.ensure_future(st.send_frame(frame(twin, 1)))
        await settle()
        assert not send.done()
        st.close()
        with pytest.raises(TransportClosed):
            await wait_for(send, "the paused writer to be released")
        assert fake.closing and st.is_closed
        with pytest.raises(TransportClosed):
            await st.send_frame(frame(twin, 2))

    run(main())


def test_lost_connection_releases_paused_writers(twin: Any) -> None:
    async def main() -> None:
        st = StreamTransport()
        fake = FakeTransport()
        st.connection_made(fake)
        sink = Sink()
        st.attach(sink)
        st.pause_writing()
        send = asyncio.ensure_future(st.send_frame(frame(twin, 1)))
        await settle()
        st.connection_lost(ConnectionResetError("peer reset"))
        with pytest.raises(TransportClosed, match="peer reset"):
            await wait_for(send, "the paused writer to be released")
        assert len(sink.lost) == 1 and isinstance(sink.lost[0], ConnectionResetError)

    run(main())


# -- reading over a real socketpair ------------------------------------------------------


async def socketpair_transport(twin: Any, **kwargs: Any) -> tuple[StreamTransport, socket.socket]:
    """A StreamTransport on one end of a socketpair; the other end is a raw socket."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    _, st = await loop.create_connection(lambda: StreamTransport(**kwargs), sock=ours)
    return st, theirs


@pytest.mark.parametrize("loop", LOOPS)
def test_frames_split_anywhere_arrive_whole(twin: Any, loop: str) -> None:
    async def main() -> None:
        st, raw = await socketpair_transport(twin)
        sink = Sink()
        st.attach(sink)
        ev_loop = asyncio.get_running_loop()
        payloads = [b"", b"ab", bytes(range(16)), bytes(17), b"z" * 5000, b"q" * 70000]
        wire = b"".join(raw_frame(i + 1, 1, 0, DATA, p) for i, p in enumerate(payloads))
        # An inline-only frame (no trailing bytes), as other clients send it.
        wire += struct.pack("<I", 64) + raw_frame(99, 1, 0, DATA, b"hi")[4:68]
        sink.target = len(payloads) + 1
        rng = random.Random(5)
        pos = 0
        while pos < len(wire):
            step = rng.choice((1, 2, 3, 63, 64, 65, 1000, 40000))
            await ev_loop.sock_sendall(raw, wire[pos : pos + step])
            pos += step
        await wait_for(sink.count_reached, "every frame")
        assert [f.payload for f in sink.frames] == [*payloads, b"hi"]
        assert [f.desc.msg_id for f in sink.frames] == [1, 2, 3, 4, 5, 6, 99]
        raw.close()
        await wait_for(sink.got_lost, "the end of the connection")
        assert sink.lost == [None]

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_broken_framing_closes_with_a_logged_reason(
    twin: Any, loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        st, raw = await socketpair_transport(twin)
        sink = Sink()
        st.attach(sink)
        ev_loop = asyncio.get_running_loop()
        sink.target = 1
        await ev_loop.sock_sendall(raw, raw_frame(1, 1, 0, DATA, b"ok"))
        await wait_for(sink.count_reached, "the good frame")
        await ev_loop.sock_sendall(raw, struct.pack("<I", 63))
        await wait_for(sink.got_lost, "the connection to be closed")
        assert [f.payload for f in sink.frames] == [b"ok"]
        assert isinstance(sink.lost[0], FrameError)
        assert st.is_closed
        assert await ev_loop.sock_recv(raw, 100) == b""  # our end was closed
        raw.close()
        with pytest.raises(TransportClosed, match="shorter than"):
            await st.send_frame(frame(twin, 2))

    with caplog.at_level(logging.WARNING, logger="rapace"):
        run(main(), loop=loop)
    assert any("shorter than" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("loop", LOOPS)
def test_frames_before_a_framing_error_in_the_same_read_are_delivered(twin: Any, loop: str) -> None:
    """Whole frames that precede the garbage are valid: delivering them must not depend on
    whether the garbage arrived in the same read (i.e. on how the stream was segmented)."""

    async def main() -> None:
        st, raw = await socketpair_transport(twin)
        sink = Sink()
        st.attach(sink)
        good = b"".join(raw_frame(i, 1, 0, DATA, b"ok%d" % i) for i in (1, 2, 3))
        await asyncio.get_running_loop().sock_sendall(raw, good + struct.pack("<I", 63))
        await wait_for(sink.got_lost, "the connection to be closed")
        assert isinstance(sink.lost[0], FrameError)
        assert [f.payload for f in sink.frames] == [b"ok1", b"ok2", b"ok3"]
        raw.close()

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_eof_in_the_middle_of_a_frame(
    twin: Any, loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        st, raw = await socketpair_transport(twin)
        sink = Sink()
        st.attach(sink)
        await asyncio.get_running_loop().sock_sendall(
            raw, raw_frame(1, 1, 0, DATA, bytes(100))[:50]
        )
        raw.shutdown(socket.SHUT_WR)
        await wait_for(sink.got_lost, "the truncated connection to be reported")
        assert isinstance(sink.lost[0], FrameError)
        assert "middle of a frame" in str(sink.lost[0])
        raw.close()

    with caplog.at_level(logging.WARNING, logger="rapace"):
        run(main(), loop=loop)
    assert any("middle of a frame" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("loop", LOOPS)
def test_pause_reading_stops_delivery_until_resumed(twin: Any, loop: str) -> None:
    async def main() -> None:
        st, raw = await socketpair_transport(twin)
        sink = Sink()
        st.attach(sink)
        ev_loop = asyncio.get_running_loop()
        sink.target = 1
        await ev_loop.sock_sendall(raw, raw_frame(1, 1, 0, DATA, b"first"))
        await wait_for(sink.count_reached, "the first frame")
        st.pause_reading()
        sink.count_reached.clear()
        sink.target = 2
        await ev_loop.sock_sendall(raw, raw_frame(2, 1, 0, DATA, b"second"))
        await settle(50)
        assert len(sink.frames) == 1, "a frame arrived while reading was paused"
        st.resume_reading()
        await wait_for(sink.count_reached, "the second frame after resume")
        assert [f.payload for f in sink.frames] == [b"first", b"second"]
        st.close()
        raw.close()

    run(main(), loop=loop)


def test_nothing_is_read_before_a_sink_attaches(twin: Any) -> None:
    """Until the session attaches, frames wait in the socket (bounded by the kernel), not
    in memory; once a sink attaches every one arrives, in order."""

    async def main() -> None:
        st, raw = await socketpair_transport(twin)
        ev_loop = asyncio.get_running_loop()
        total = 20_000  # 1.4 MB: more than the socket buffers hold
        wire = b"".join(raw_frame(i, 1, 0, DATA, b"p%d" % i) for i in range(1, total + 1))
        sender = asyncio.ensure_future(ev_loop.sock_sendall(raw, wire))
        asyncio_transport = st._transport
        assert asyncio_transport is not None
        await settle(20)
        assert not asyncio_transport.is_reading()
        assert not sender.done(), "the socket buffers took 1.4 MB: nothing held it back"
        # Loops that ignore a pause from connection_made read once, then pause.
        one_read = (256 * 1024) // 68 + 1
        assert len(st._early) <= one_read, "frames kept piling up before a sink attached"
        got = [await pull(st).recv_frame() for _ in range(total)]
        assert [f.desc.msg_id for f in got] == list(range(1, total + 1))
        await wait_for(sender, "the sender")
        assert asyncio_transport.is_reading()
        raw.close()
        with pytest.raises(TransportClosed):
            await wait_for(pull(st).recv_frame(), "the end of the stream")

    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_close_flushes_queued_frames(twin: Any, loop: str) -> None:
    async def main() -> None:
        st, raw = await socketpair_transport(twin)
        ev_loop = asyncio.get_running_loop()
        frames = [frame(twin, i, bytes([i % 256]) * 1000) for i in range(1, 3001)]
        sends = [asyncio.ensure_future(st.send_frame(f)) for f in frames]
        await asyncio.sleep(0)
        reading = asyncio.ensure_future(_read_all(ev_loop, raw))
        await wait_for(asyncio.gather(*sends), "the sends")
        st.close()
        data = await wait_for(reading, "the peer to read everything")
        assert data == b"".join(twin.frame.encode_frame(f) for f in frames)
        raw.close()

    run(main(), loop=loop)


async def _read_all(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        data = await loop.sock_recv(sock, 1 << 16)
        if not data:
            return bytes(out)
        out += data


# -- tunnels over real connections -------------------------------------------------------


def _block_source(seed: int, size: int, block: int = MiB) -> tuple[list[bytes], str]:
    """``size`` bytes as distinct blocks (a rotated random base), and their sha256."""
    base = random.Random(seed).randbytes(block)
    blocks = []
    digest = hashlib.sha256()
    left, i = size, 0
    while left > 0:
        shift = (i * 7919) % block
        piece = (base[shift:] + base[:shift])[: min(block, left)]
        blocks.append(piece)
        digest.update(piece)
        left -= len(piece)
        i += 1
    return blocks, digest.hexdigest()


async def _write_all(stream: Any, blocks: list[bytes]) -> None:
    for piece in blocks:
        stream.write(piece)
        await stream.drain()
    stream.write_eof()
    await stream.drain()


async def _hash_to_eof(stream: Any) -> tuple[int, str]:
    digest = hashlib.sha256()
    total = 0
    async for data in stream:
        digest.update(data)
        total += len(data)
    assert stream.at_eof()
    return total, digest.hexdigest()


TUNNEL_SIZE = 100 * MiB
"""Both twins carry the full 100 MiB each way (well under a second on loopback)."""


@pytest.mark.parametrize("kind", KINDS)
def test_tunnel_carries_100_mib_each_way_with_half_close(twin: Any, kind: str) -> None:
    size = TUNNEL_SIZE
    client_blocks, client_digest = _block_source(1, size)
    server_blocks, server_digest = _block_source(2, size)

    async def main() -> None:
        svc = Service()
        server_result: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

        def on_tunnel(session: rapace.RpcSession, channel_id: int) -> Any:
            stream = session.tunnel_stream(channel_id)

            async def serve_stream() -> None:
                received, _ = await asyncio.gather(
                    _hash_to_eof(stream), _write_all(stream, server_blocks)
                )
                server_result.set_result(received)

            return serve_stream()

        svc.on_tunnel = on_tunnel
        with short_tmpdir() as directory:
            async with (
                serve_service(twin, listen_address(kind, directory), svc) as (server, _),
                rapace.connect(str(server.address)) as client,
            ):
                stream = await open_tunnel(client)
                started = time.monotonic()
                client_received, _ = await asyncio.gather(
                    _hash_to_eof(stream), _write_all(stream, client_blocks)
                )
                server_received = await wait_for(server_result, "the server's side")
                elapsed = time.monotonic() - started
                assert client_received == (size, server_digest)
                assert server_received == (size, client_digest)
                # Both directions ended: the channel is gone from both tables.
                assert client.tunnel_channel_ids() == []
                await wait_until(
                    lambda: svc.sessions[0].tunnel_channel_ids() == [], "server unregistered"
                )
                assert elapsed < 20, f"{2 * size / MiB:.0f} MiB took {elapsed:.1f} s"

    run(main(), timeout=40)


@pytest.mark.parametrize("kind", KINDS)
def test_slow_tunnel_reader_keeps_memory_bounded(twin: Any, kind: str) -> None:
    """A reader that stalls pauses the socket; the writer's drain() blocks; nothing is lost."""
    chunk = 64 * 1024
    size = 64 * MiB
    blocks, digest = _block_source(3, size, block=chunk)

    async def main() -> None:
        svc = Service()
        release = asyncio.Event()
        receivers: list[Any] = []

        def on_tunnel(session: rapace.RpcSession, channel_id: int) -> Any:
            receiver = session.register_tunnel(channel_id)
            receivers.append(receiver)

            async def slow_reader() -> tuple[int, str]:
                await release.wait()
                h = hashlib.sha256()
                total = 0
                async for item in receiver:
                    h.update(item.payload)
                    total += len(item.payload)
                return total, h.hexdigest()

            return slow_reader()

        svc.on_tunnel = on_tunnel
        sent = 0

        async def writer(stream: Any) -> None:
            nonlocal sent
            for piece in blocks:
                stream.write(piece)
                await stream.drain()
                sent += len(piece)
            stream.write_eof()
            await stream.drain()

        with short_tmpdir() as directory:
            async with (
                serve_service(twin, listen_address(kind, directory), svc) as (server, _),
                rapace.connect(str(server.address)) as client,
            ):
                stream = await open_tunnel(client)
                (receiver,) = receivers
                server_socket = svc.sessions[0].transport._transport  # type: ignore[attr-defined]
                client_transport = client.transport
                tracemalloc.start()
                try:
                    writing = asyncio.ensure_future(writer(stream))

                    def stalled() -> bool:
                        return not server_socket.is_reading() and client_transport._write_paused  # type: ignore[attr-defined,no-any-return]

                    await wait_until(
                        stalled, "the reader's side paused reading, the writer's paused"
                    )
                    # Kernel buffers may still take a little more: wait (bounded) until the
                    # writer makes no progress at all over a short window. (No event says
                    # "the kernel takes nothing more": the window is the measurement.)
                    for _ in range(100):
                        before = sent
                        await asyncio.sleep(0.02)
                        if sent == before and stalled():
                            break
                    else:
                        pytest.fail("the writer never stalled")
                    assert not writing.done(), "drain() returned while the peer was stalled"
                    assert sent < 24 * MiB, f"{sent / MiB:.1f} MiB went out before stalling"
                    capacity = 64
                    assert receiver.buffered <= capacity + 8, receiver.buffered
                    # What waits in the writer's socket transport stays small too.
                    write_buffer = client_transport._transport.get_write_buffer_size()  # type: ignore[attr-defined]
                    assert write_buffer < 1 * MiB, write_buffer
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
                assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB while the reader stalled"
                release.set()
                await wait_for(writing, "the writer to finish once the reader reads", 20)
                result = await wait_for(svc.tunnel_tasks[0], "the reader", 20)
                assert result == (size, digest)
                assert server_socket.is_reading(), "reading was not resumed"
                # The connection still works for calls.
                response = await client.call(client.next_channel_id(), ECHO, b"ok")
                assert response.payload == b"ok"

    run(main(), timeout=40)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", KINDS)
def test_graceful_close_flushes_notifications(twin: Any, kind: str, loop: str) -> None:
    count, size = 20_000, 500  # 10 MB: far more than any socket buffer

    async def main() -> None:
        svc = Service(notify_target=count)
        with short_tmpdir() as directory:
            async with serve_service(twin, listen_address(kind, directory), svc) as (server, _):
                client = await rapace.connect(str(server.address))
                for i in range(count):
                    await client.notify(COUNT, i.to_bytes(4, "little") * (size // 4))
                await client.aclose()  # right away: no round trip before closing
                await wait_for(svc.notify_done, "every notification", 20)
                assert svc.notifications == count
                assert svc.notified_bytes == count * size

    run(main(), loop=loop, timeout=30)


@pytest.mark.parametrize("kind", KINDS)
def test_graceful_close_flushes_tunnel_chunks(twin: Any, kind: str) -> None:
    chunks = [bytes([i % 251]) * (1000 + i) for i in range(3000)]

    async def main() -> None:
        svc = Service()

        def on_tunnel(session: rapace.RpcSession, channel_id: int) -> Any:
            receiver = session.register_tunnel(channel_id)

            async def collect() -> tuple[list[bytes], bool]:
                got, eos = [], False
                async for item in receiver:
                    if item.payload:
                        got.append(item.payload)
                    eos = eos or item.is_eos
                return got, eos

            return collect()

        svc.on_tunnel = on_tunnel
        with short_tmpdir() as directory:
            async with serve_service(twin, listen_address(kind, directory), svc) as (server, _):
                client = await rapace.connect(str(server.address))
                channel_id = client.next_channel_id()
                await client.call(
                    client.next_channel_id(), OPEN_TUNNEL, struct.pack("<I", channel_id)
                )
                for piece in chunks:
                    await client.send_chunk(channel_id, piece)
                await client.close_tunnel(channel_id)
                await client.aclose()
                got, eos = await wait_for(svc.tunnel_tasks[0], "every chunk", 20)
                assert eos
                assert got == chunks

    run(main(), timeout=30)


def test_request_flags_seen_by_the_server(twin: Any) -> None:
    """A unary call on a real connection carries DATA|EOS, the answer method_id 0."""

    async def main() -> None:
        seen: list[Any] = []
        svc = Service()

        def on_session(session: rapace.RpcSession) -> None:
            async def dispatch(f: Any) -> bytes:
                seen.append(f.desc)
                return f.payload

            session.set_dispatcher(dispatch)
            svc.sessions.append(session)

        with short_tmpdir() as directory:
            server = await rapace.serve(on_session, listen_address("unix", directory))
            async with server, rapace.connect(str(server.address)) as client:
                response = await client.call(5, 77, b"abc")
                assert response.payload == b"abc" and response.desc.method_id == 0
                assert response.desc.flags & REQUEST == REQUEST
                (desc,) = seen
                assert desc.flags & (DATA | EOS) == DATA | EOS
                assert desc.channel_id == 5 and desc.method_id == 77
                assert response.desc.msg_id == desc.msg_id  # the echo extension

    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_sender_that_never_yields_is_held_by_socket_backpressure(twin: Any, loop: str) -> None:
    """Frames queued within one loop iteration reach the socket once enough pile up, so
    the write buffer's high-water mark stops the sender instead of memory growing."""

    async def main() -> None:
        st, raw = await socketpair_transport(twin)
        payload = bytes(64 * 1024)
        sent = 0
        try:
            while sent < 2000:  # 125 MiB if nothing held it back; the peer never reads
                # Drive send_frame by hand, never giving the loop a turn: it must either
                # complete at once or suspend because the socket applies backpressure.
                sending = st.send_frame(_chunk_frame(twin, payload))
                try:
                    sending.send(None)
                except StopIteration:
                    sent += 1
                    continue
                sending.close()
                break
            else:
                pytest.fail("2000 chunks of 64 KiB were queued without any backpressure")
            assert st._out_bytes < 512 * 1024
            assert st._transport is not None
            assert st._transport.get_write_buffer_size() < 8 * MiB
        finally:
            st.close()
            raw.close()

    run(main(), loop=loop)


def _chunk_frame(twin: Any, payload: bytes) -> Any:
    return twin.frame.build_frame(1, 3, 0, DATA, payload)


@pytest.mark.parametrize("kind", KINDS)
def test_a_paused_session_notices_its_peer_hang_up(twin: Any, kind: str) -> None:
    """A tunnel reader that never reads pauses the server's reading; the client then
    closes. Its end of stream waits behind unread bytes, yet the server's session ends
    within about HANGUP_CHECK_INTERVAL, its tunnel and held chunks released."""
    chunk = 16 * 1024

    async def main() -> None:
        svc = Service()
        receivers: list[Any] = []

        def on_tunnel(session: rapace.RpcSession, channel_id: int) -> Any:
            receivers.append(session.register_tunnel(channel_id))

            async def never_read() -> None:
                await asyncio.get_running_loop().create_future()

            return never_read()

        svc.on_tunnel = on_tunnel
        with short_tmpdir() as directory:
            async with serve_service(twin, listen_address(kind, directory), svc) as (server, _):
                client = await rapace.connect(str(server.address), keepalive=None)
                stream = await open_tunnel(client)
                (session,) = svc.sessions
                for _ in range(DEFAULT_TUNNEL_CAPACITY + 8):  # past what the reader holds
                    stream.write(bytes(chunk))
                await wait_until(lambda: session.transport._read_paused_by_session, "a pause")
                await client.aclose()
                started = time.monotonic()
                await wait_until(lambda: session.is_closed, "the server's session to end", 5.0)
                assert time.monotonic() - started < HANGUP_CHECK_INTERVAL + 2.0
                assert session.tunnel_channel_ids() == []
                assert isinstance(session.transport._failure, ConnectionResetError)
                # the held chunks can still be read; then the tunnel fails (no clean end)
                with pytest.raises((rapace.SessionClosed, ConnectionError)):
                    async for _ in receivers[0]:
                        pass

    run(main())
