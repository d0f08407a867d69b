"""Bad input from a peer, over real sockets (docs/protocol.md §4-5, DESIGN.md "Behaviour that
must hold everywhere").

A hand-written raw client talks to a real ``rapace.serve`` server (and a hand-written raw
server to a real ``rapace.connect`` client). For each kind of bad input: the offending
connection is closed with a logged reason (or the frame is dropped with a warning, as
docs/protocol.md §4 says), the calls pending on it fail at once, and the other connections to the
same server keep working.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import resource
import socket
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from net_helpers import (
    DATA,
    ECHO,
    EOS,
    ERROR,
    HANG,
    KINDS,
    LOOPS,
    REQUEST,
    UNKNOWN,
    Service,
    closed_by_peer,
    error_code,
    listen_address,
    raw_desc,
    raw_frame,
    read_raw_frame,
    read_raw_frames,
    run,
    settle,
    short_tmpdir,
    wait_for,
    wait_until,
)

import rapace
from rapace import ErrorCode
from rapace.connection import parse_address
from rapace.wire import compute_method_id

MiB = 1 << 20
PROBE = compute_method_id("NetTest", "probe")
"""What the server calls on each client it accepts, so every connection has a pending call."""

FAST = 3.0
"""Seconds within which a call on a closed connection must fail (its timeout is 60 s)."""


@dataclass
class ProbingServer:
    """A real server whose sessions each start a call to their client (left pending)."""

    server: rapace.Server
    service: Service
    probes: list[asyncio.Future[Any]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return str(self.server.address)


@asynccontextmanager
async def probing_server(
    twin: Any, kind: str, directory: str, **kwargs: Any
) -> AsyncIterator[ProbingServer]:
    svc = Service()
    probes: list[asyncio.Future[Any]] = []

    def on_session(session: rapace.RpcSession) -> None:
        svc.on_session(session)
        probes.append(
            asyncio.ensure_future(session.call(session.next_channel_id(), PROBE, b"?", timeout=60))
        )

    server = await rapace.serve(on_session, listen_address(kind, directory), **kwargs)
    ps = ProbingServer(server, svc, probes)
    try:
        yield ps
    finally:
        server.close()
        await wait_for(server.wait_closed(), "the server to close")
        # Every probe has ended by now (answered, refused or failed): retrieve them all.
        await asyncio.gather(*probes, return_exceptions=True)


async def open_raw(
    address: str, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client connection; ``rcvbuf`` shrinks its socket's receive buffer."""
    parsed = parse_address(address)
    if parsed.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = parsed.path
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (parsed.host, parsed.port)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, target)
    except BaseException:
        sock.close()
        raise
    if parsed.kind == "unix":
        return await asyncio.open_unix_connection(sock=sock)
    return await asyncio.open_connection(sock=sock)


def warnings_from_rapace(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("rapace") and r.levelno >= logging.WARNING
    ]


async def good_call(client: rapace.RpcSession, payload: bytes) -> None:
    response = await wait_for(
        client.call(client.next_channel_id(), ECHO, payload), "a well-behaved client's call"
    )
    assert response.payload == payload


# -- the server against bad clients ------------------------------------------------------

GARBAGE = random.Random(1234).randbytes(8192)

BAD_INPUTS = {
    # name: (bytes to send, then half-close?, what the logged reason says)
    "length_under_64": (struct.pack("<I", 63) + bytes(63), False, "shorter than the 64-byte"),
    "length_zero": (bytes(4) + b"\x01" * 60, False, "shorter than the 64-byte"),
    # Over the maximum, and its descriptor does not say that size: garbage, not a frame.
    "length_over_max": (
        b"\xff\xff\xff\xff" + raw_desc(msg_id=1, channel_id=1, method_id=ECHO, flags=REQUEST),
        False,
        "not a rapace stream",
    ),
    "truncated_then_eof": (
        raw_frame(1, 1, ECHO, REQUEST, bytes(500))[:300],
        True,
        "middle of a frame",
    ),
    "prefix_only_then_eof": (struct.pack("<I", 100)[:3], True, "middle of a frame"),
    "random_garbage": (GARBAGE, False, "closing rapace connection"),
    "inline_claims_200": (
        struct.pack("<I", 64)
        + raw_desc(msg_id=1, channel_id=1, method_id=ECHO, payload_len=200, flags=REQUEST),
        False,
        "payload_len 200",
    ),
    "inline_with_generation": (
        struct.pack("<I", 64)
        + raw_desc(
            msg_id=1,
            channel_id=1,
            method_id=ECHO,
            payload_len=2,
            payload_generation=5,
            flags=REQUEST,
        ),
        False,
        "inline descriptor",
    ),
    "out_of_line_without_bytes": (
        struct.pack("<I", 64)
        + raw_desc(
            msg_id=1, channel_id=1, method_id=ECHO, payload_slot=0, payload_len=100, flags=REQUEST
        ),
        False,
        "claims 100 out-of-line payload bytes",
    ),
}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_client_is_closed_alone(
    twin: Any, kind: str, loop: str, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad, half_close, reason = BAD_INPUTS[case]

    async def main() -> None:
        with short_tmpdir() as directory:
            async with probing_server(twin, kind, directory) as ps:
                # A well-behaved client, connected before and after the bad one.
                async with rapace.connect(ps.address) as good:
                    await good_call(good, b"before")
                    await wait_until(lambda: len(ps.probes) == 1, "the good session")
                    reader, writer = await open_raw(ps.address)
                    try:
                        # The server's call to us is pending: it must fail at once below.
                        probe_request = await wait_for(read_raw_frame(reader), "the probe")
                        assert probe_request.method_id == PROBE
                        assert probe_request.channel_id % 2 == 0
                        bad_session = ps.service.sessions[1]
                        probe = ps.probes[1]
                        assert not probe.done()
                        started = time.monotonic()
                        writer.write(bad)
                        if half_close:
                            writer.write_eof()
                        await writer.drain()
                        rest = await wait_for(
                            closed_by_peer(reader), "the server to close us", FAST
                        )
                        assert rest == b"", "the server answered bad input"
                        with pytest.raises(rapace.SessionClosed):
                            await wait_for(probe, "the pending call to fail", FAST)
                        assert time.monotonic() - started < FAST
                        await wait_until(lambda: bad_session.is_closed, "the bad session closed")
                        await wait_until(
                            lambda: bad_session not in ps.server.sessions, "the server forgot it"
                        )
                    finally:
                        writer.close()
                    assert warnings_from_rapace(caplog), "no reason was logged"
                    assert any(reason in m for m in warnings_from_rapace(caplog)), (
                        reason,
                        warnings_from_rapace(caplog),
                    )
                    # The other connection is untouched; new ones are accepted.
                    await good_call(good, b"after")
                    assert not good.is_closed
                async with rapace.connect(ps.address) as fresh:
                    await good_call(fresh, b"fresh")

    with caplog.at_level(logging.WARNING, logger="rapace"):
        run(main(), loop=loop)


@pytest.mark.parametrize("prefix", [0xFFFFFFFF, 0x7FFFFFFF, 8 * MiB + 64 + 1])
@pytest.mark.parametrize("kind", KINDS)
def test_oversized_request_is_answered_before_its_body_without_allocating(
    twin: Any, kind: str, prefix: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the prefix and descriptor of an oversized request are sent: the server answers
    that one request with ResourceExhausted at once, without waiting for the body and
    without allocating anything near the announced size (tracemalloc sees Python
    allocations; the RSS check catches a large C allocation that was touched); its
    pending call to this client and every other connection carry on."""

    async def main() -> None:
        with short_tmpdir() as directory:
            async with (
                probing_server(twin, kind, directory, max_payload_size=8 * MiB) as ps,
                rapace.connect(ps.address) as good,
            ):
                await good_call(good, b"before")
                reader, writer = await open_raw(ps.address)
                await wait_for(read_raw_frame(reader), "the probe")
                rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                tracemalloc.start()
                try:
                    size = prefix - 64
                    writer.write(
                        struct.pack("<I", prefix)
                        + raw_desc(
                            msg_id=9,
                            channel_id=7,
                            method_id=ECHO,
                            payload_slot=0,
                            payload_len=size,
                            flags=REQUEST,
                        )
                    )
                    await writer.drain()
                    answer = await wait_for(read_raw_frame(reader), "the refusal", FAST)
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
                rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                assert (answer.channel_id, answer.msg_id) == (7, 9)
                assert answer.flags & ERROR
                error = rapace.wire.parse_error_payload(answer.payload)
                assert isinstance(error, rapace.ResourceExhausted), error
                assert f"{size} payload bytes exceeds the maximum of {8 * MiB}" in error.message
                assert peak < 1 * MiB, f"peak {peak} bytes for a {prefix}-byte prefix"
                assert rss_after - rss_before < 64 * MiB
                session = ps.service.sessions[1]
                assert not session.is_closed and session.stats.frames_skipped_oversized == 1
                assert not ps.probes[1].done()  # its own call to this client still waits
                if prefix <= 16 * MiB:  # the body goes by unread; the stream is in sync after
                    writer.write(bytes(size) + raw_frame(10, 11, ECHO, REQUEST, b"next"))
                    echo = await wait_for(read_raw_frame(reader), "the next answer", FAST)
                    assert (echo.channel_id, echo.payload) == (11, b"next")
                writer.close()
                await good_call(good, b"after")
        assert any("over the maximum" in m for m in warnings_from_rapace(caplog))

    with caplog.at_level(logging.WARNING, logger="rapace"):
        run(main())


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", KINDS)
def test_response_nobody_waits_for_is_dropped_with_a_warning(
    twin: Any,
    kind: str,
    loop: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The session logs such warnings once a second at most; a clock that jumps 2 s at
    # every reading lets each stray frame here get its own.
    clock = iter(range(0, 10_000, 2))
    monkeypatch.setattr("rapace.ratelimit._clock", lambda: float(next(clock)))

    async def main() -> None:
        with short_tmpdir() as directory:
            async with probing_server(twin, kind, directory) as ps:
                reader, writer = await open_raw(ps.address)
                try:
                    probe_request = await wait_for(read_raw_frame(reader), "the probe")
                    # Responses (method_id 0) on channels nobody waits on: odd (ours) and
                    # even (the server's, never used), inline and out of line.
                    writer.write(raw_frame(50, 77, 0, REQUEST, b"stray"))
                    writer.write(raw_frame(51, 1001, 0, REQUEST, b"s" * 300))
                    writer.write(
                        raw_frame(52, 2000, 0, ERROR | EOS, b"\x0c\x00\x00\x00\x00\x00\x00\x00")
                    )
                    # The connection is still open: a request gets its answer.
                    writer.write(raw_frame(53, 3, ECHO, REQUEST, b"still here"))
                    await writer.drain()
                    answer = await wait_for(read_raw_frame(reader), "the echo answer")
                    assert answer.channel_id == 3 and answer.method_id == 0
                    assert answer.flags & DATA and not answer.flags & ERROR
                    assert answer.payload == b"still here"
                    assert answer.msg_id == 53
                    # The server's pending call was not disturbed: answer it now.
                    assert not ps.probes[0].done()
                    writer.write(
                        raw_frame(54, probe_request.channel_id, 0, REQUEST, b"probe answer")
                    )
                    await writer.drain()
                    response = await wait_for(ps.probes[0], "the probe's answer")
                    assert response.payload == b"probe answer"
                    assert not ps.service.sessions[0].is_closed
                finally:
                    writer.close()
        messages = warnings_from_rapace(caplog)
        for channel_id in (77, 1001, 2000):
            assert any(f"channel {channel_id}" in m and "dropped" in m for m in messages), (
                channel_id,
                messages,
            )

    with caplog.at_level(logging.WARNING, logger="rapace"):
        run(main(), loop=loop)


def _flood(count: int, method_id: int = UNKNOWN) -> bytes:
    return b"".join(raw_frame(i + 1, 2 * i + 1, method_id, REQUEST, b"") for i in range(count))


@pytest.mark.parametrize("kind", KINDS)
def test_flood_of_unknown_method_requests(twin: Any, kind: str) -> None:
    """5000 requests for a method nobody serves: 5000 Unimplemented answers, in bounded
    memory, while another client keeps getting answers."""
    count = 5000

    async def main() -> None:
        with short_tmpdir() as directory:
            async with (
                probing_server(twin, kind, directory) as ps,
                rapace.connect(ps.address) as good,
            ):
                await good_call(good, b"before")
                reader, writer = await open_raw(ps.address)
                try:
                    probe = await wait_for(read_raw_frame(reader), "the probe")
                    assert probe.method_id == PROBE
                    tracemalloc.start()
                    try:
                        writer.write(_flood(count))
                        draining = asyncio.ensure_future(writer.drain())
                        await good_call(good, b"during")
                        answers = await wait_for(read_raw_frames(reader, count), "every answer", 20)
                        await wait_for(draining, "the flood to be written")
                        _, peak = tracemalloc.get_traced_memory()
                    finally:
                        tracemalloc.stop()
                    assert sorted(a.channel_id for a in answers) == [
                        2 * i + 1 for i in range(count)
                    ]
                    for answer in answers:
                        assert answer.method_id == 0
                        assert answer.flags & (ERROR | EOS) == ERROR | EOS
                        assert answer.msg_id == (answer.channel_id + 1) // 2  # echoed
                        error = rapace.wire.parse_error_payload(answer.payload)
                        assert error.code == ErrorCode.Unimplemented
                        assert f"unknown method_id: {UNKNOWN}" in error.message
                    assert peak < 32 * MiB, f"peak {peak / MiB:.1f} MiB"
                    assert not ps.service.sessions[1].is_closed
                finally:
                    writer.close()
                await good_call(good, b"after")

    run(main(), timeout=30)


def test_flood_without_a_dispatcher_gets_unimplemented(twin: Any) -> None:
    async def main() -> None:
        with short_tmpdir() as directory:
            server = await rapace.serve(lambda s: None, listen_address("unix", directory))
            async with server:
                reader, writer = await open_raw(str(server.address))
                try:
                    writer.write(_flood(1000, ECHO))
                    await writer.drain()
                    answers = await wait_for(read_raw_frames(reader, 1000), "every answer")
                    assert all(
                        error_code(a.payload) == int(ErrorCode.Unimplemented) for a in answers
                    )
                    assert all(a.flags & ERROR for a in answers)
                finally:
                    writer.close()

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_flood_from_a_client_that_never_reads_stays_bounded(twin: Any, kind: str) -> None:
    """A client floods requests and does not read the answers. The answers back up (the
    server's socket pauses writing) and handlers wait to send them. Whatever the server
    does about it (stop reading, or refuse / drop what exceeds ``max_pending``), what it
    holds must stay bounded by ``max_pending`` (plus one read's worth of frames), not grow
    with the flood; other clients are served meanwhile; every answer that does come is a
    well-formed error for its own request; and once the client reads again, the same
    connection serves requests normally."""
    count, max_pending = 10_000, 128
    one_read = 256 * 1024 // 68 + 1  # the most frames one socket read can carry
    bound = 2 * max_pending + one_read

    async def main() -> None:
        with short_tmpdir() as directory:
            async with (
                probing_server(twin, kind, directory, max_pending=max_pending) as ps,
                rapace.connect(ps.address) as good,
            ):
                await good_call(good, b"before")
                # Small socket buffers, so that the answers back up after a few thousand
                # (TCP loopback buffers autotune up to tens of MB otherwise).
                reader, writer = await open_raw(ps.address, rcvbuf=32 * 1024)
                try:
                    probe = await wait_for(read_raw_frame(reader), "the probe")
                    session = ps.service.sessions[1]
                    asyncio_transport = session.transport._transport  # type: ignore[attr-defined]
                    asyncio_transport.get_extra_info("socket").setsockopt(
                        socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024
                    )
                    routed = 0
                    route = session.frames_received

                    def counting(frames: list[Any]) -> None:
                        nonlocal routed
                        routed += len(frames)
                        route(frames)

                    session.frames_received = counting  # type: ignore[method-assign]
                    most_in_flight = 0

                    def quiet() -> bool:
                        nonlocal most_in_flight
                        most_in_flight = max(
                            most_in_flight, len(session._handlers) + len(session._background)
                        )
                        # Either the server stopped reading, or it took the whole flood in.
                        return not asyncio_transport.is_reading() or routed >= count

                    tracemalloc.start()
                    try:
                        writer.write(_flood(count))
                        draining = asyncio.ensure_future(writer.drain())
                        await wait_until(quiet, "the server to stop reading or read it all")
                        await settle(50)
                        quiet()
                        # Other clients are still served meanwhile.
                        await good_call(good, b"during")
                        _, peak = tracemalloc.get_traced_memory()
                    finally:
                        tracemalloc.stop()
                    assert most_in_flight <= bound, most_in_flight
                    # The flood itself (0.7 MB) is in this process too.
                    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB"

                    # Now the client reads again: the server drains what it holds.
                    answers: list[Any] = []

                    async def read_answers() -> None:
                        while True:
                            answers.append(await read_raw_frame(reader))
                            if answers[-1].method_id == 0 and answers[-1].channel_id == 999_999:
                                return

                    reading = asyncio.ensure_future(read_answers())
                    await wait_for(draining, "the flood to be taken in", 20)
                    await wait_until(
                        lambda: (
                            routed >= count
                            and not session._handlers
                            and not session._background
                            and not session._waiting
                        ),
                        "the server to finish with the flood",
                        20,
                    )
                    # The same connection serves requests normally again.
                    writer.write(raw_frame(count + 1, 999_999, ECHO, REQUEST, b"marker"))
                    await writer.drain()
                    await wait_for(reading, "the marker's answer", 20)
                    marker = answers.pop()
                    assert marker.payload == b"marker" and not marker.flags & ERROR
                    channels = [a.channel_id for a in answers]
                    assert len(set(channels)) == len(channels), "a request answered twice"
                    assert set(channels) <= {2 * i + 1 for i in range(count)}
                    codes = {error_code(a.payload) for a in answers if a.flags & ERROR}
                    assert all(a.flags & ERROR for a in answers)
                    allowed = {int(ErrorCode.Unimplemented), int(ErrorCode.ResourceExhausted)}
                    assert codes <= allowed, codes
                    assert probe.method_id == PROBE
                finally:
                    writer.transport.abort()
                await wait_until(lambda: session.is_closed, "the flooder's session ends")
                assert not session._handlers and not session._background
                await good_call(good, b"after")

    run(main(), timeout=40)


# -- a client against a bad server -------------------------------------------------------


@asynccontextmanager
async def raw_server(kind: str, directory: str, behave: Any) -> AsyncIterator[str]:
    """A hand-written server: ``behave(reader, writer)`` for each connection."""
    tasks: list[asyncio.Task[Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        try:
            await behave(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    if kind == "unix":
        path = f"{directory}/bad.sock"
        server = await asyncio.start_unix_server(handle, path)
        address = f"unix:{path}"
    else:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        address = f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield address
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


SERVER_REPLIES = {
    # name: (what the bad server answers a request with, what the client logs)
    "garbage": (lambda req: GARBAGE, "closing rapace connection"),
    "length_under_64": (lambda req: struct.pack("<I", 10) + bytes(10), "shorter than"),
    "length_over_max": (
        lambda req: b"\xff\xff\xff\xff" + raw_desc(channel_id=req.channel_id, flags=REQUEST),
        "not a rapace stream",
    ),
    "inline_claims_200": (
        lambda req: (
            struct.pack("<I", 64)
            + raw_desc(msg_id=1, channel_id=req.channel_id, payload_len=200, flags=REQUEST)
        ),
        "payload_len 200",
    ),
    "truncated_answer_then_close": (
        lambda req: raw_frame(1, req.channel_id, 0, REQUEST, bytes(100))[:80],
        "middle of a frame",
    ),
    "close_without_answer": (lambda req: b"", None),
}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", sorted(SERVER_REPLIES))
def test_client_pending_call_fails_at_once_on_a_bad_server(
    twin: Any, kind: str, loop: str, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    reply, reason = SERVER_REPLIES[case]

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_raw_frame(reader)
        writer.write(reply(request))
        await writer.drain()
        if case.endswith("then_close") or case == "close_without_answer":
            return  # the handler closes the connection
        await reader.read()  # keep the connection open until the client closes it

    async def main() -> None:
        with short_tmpdir() as directory:
            async with raw_server(kind, directory, behave) as address:
                client = await rapace.connect(address, call_timeout=60)
                try:
                    started = time.monotonic()
                    other = asyncio.ensure_future(client.call(3, ECHO, b"other", timeout=60))
                    with pytest.raises(rapace.SessionClosed):
                        await wait_for(client.call(1, ECHO, b"x", timeout=60), "the call", FAST)
                    with pytest.raises(rapace.SessionClosed):
                        await wait_for(other, "the other pending call", FAST)
                    assert time.monotonic() - started < FAST
                    assert client.is_closed and not client.pending_channel_ids()
                    with pytest.raises(rapace.SessionClosed):
                        await client.call(5, ECHO, b"late")
                finally:
                    await client.aclose()
        if reason is not None:
            assert any(reason in m for m in warnings_from_rapace(caplog)), (
                reason,
                warnings_from_rapace(caplog),
            )

    with caplog.at_level(logging.WARNING, logger="rapace"):
        run(main(), loop=loop)


@pytest.mark.parametrize("kind", KINDS)
def test_client_drops_a_stray_response_and_keeps_waiting(
    twin: Any, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_raw_frame(reader)
        writer.write(raw_frame(1, request.channel_id + 100, 0, REQUEST, b"stray"))
        writer.write(raw_frame(2, request.channel_id, 0, REQUEST, b"the answer"))
        await writer.drain()
        await reader.read()

    async def main() -> None:
        with short_tmpdir() as directory:
            async with (
                raw_server(kind, directory, behave) as address,
                rapace.connect(address) as client,
            ):
                response = await wait_for(client.call(1, ECHO, b"q", timeout=60), "the answer")
                assert response.payload == b"the answer"
                assert not client.is_closed
        assert any("channel 101" in m for m in warnings_from_rapace(caplog))

    with caplog.at_level(logging.WARNING, logger="rapace"):
        run(main())


def test_hang_handler_is_cancelled_when_its_client_sends_garbage(twin: Any) -> None:
    """A request being handled when its connection breaks: the handler task is cancelled."""

    async def main() -> None:
        with short_tmpdir() as directory:
            async with probing_server(twin, "unix", directory) as ps:
                reader, writer = await open_raw(ps.address)
                try:
                    await wait_for(read_raw_frame(reader), "the probe")
                    writer.write(raw_frame(1, 1, HANG, REQUEST, b""))
                    await writer.drain()
                    await wait_for(ps.service.hang_started, "the handler to start")
                    writer.write(GARBAGE)
                    await writer.drain()
                    await wait_for(closed_by_peer(reader), "the server to close us", FAST)
                    await wait_until(lambda: ps.service.hang_cancelled == 1, "the cancellation")
                finally:
                    writer.close()

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_an_oversized_response_fails_its_call_only(twin: Any, kind: str) -> None:
    """A server answers one of two calls with a frame over the client's maximum: that call
    fails with ResourceExhausted as soon as the descriptor is in, the body goes by unread,
    the other call gets its answer on the same connection."""
    size = 2 * MiB

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first, second = await read_raw_frames(reader, 2)
        big = raw_desc(
            msg_id=1, channel_id=first.channel_id, payload_slot=0, payload_len=size, flags=REQUEST
        )
        writer.write(struct.pack("<I", 64 + size) + big + bytes(size))
        writer.write(raw_frame(2, second.channel_id, 0, REQUEST, b"small"))
        await writer.drain()
        await reader.read()

    async def main() -> None:
        with short_tmpdir() as directory:
            async with (
                raw_server(kind, directory, behave) as address,
                rapace.connect(address) as client,
            ):
                big = asyncio.ensure_future(client.call(1, ECHO, b"big", timeout=60))
                small = asyncio.ensure_future(client.call(3, ECHO, b"small", timeout=60))
                with pytest.raises(rapace.ResourceExhausted, match=f"{size} payload bytes"):
                    await wait_for(big, "the oversized answer", FAST)
                assert (await wait_for(small, "the small answer", FAST)).payload == b"small"
                assert not client.is_closed and client.stats.frames_skipped_oversized == 1

    run(main())


@pytest.mark.parametrize("size", [1024, 64 * 1024, MiB])
def test_a_flood_of_echo_requests_from_a_peer_that_never_reads_stays_in_budget(
    twin: Any, size: int
) -> None:
    """A client sends echo requests of ``size`` bytes and reads no answer. The server holds
    requests up to its byte budget (running, then waiting), answers back up in its socket,
    and then it stops reading: what it holds stays under a few budgets, whatever the
    client sends. Once the client reads, every request is answered, in full."""
    budget = 4 * MiB
    count = max(64, 48 * MiB // size)  # far more than the budget, and than socket buffers

    async def main() -> None:
        with short_tmpdir() as directory:
            svc = Service()
            async with rapace.serve(
                svc.on_session, listen_address("unix", directory), max_request_bytes=budget
            ) as server:
                reader, writer = await open_raw(str(server.address), rcvbuf=64 * 1024)
                rss_before = _rss()
                tracemalloc.start()
                try:
                    frames = (
                        raw_frame(i + 1, 2 * i + 1, ECHO, REQUEST, bytes(size))
                        for i in range(count)
                    )
                    sending = asyncio.ensure_future(_write_all(writer, frames))
                    session = await _only_session(svc)
                    asyncio_transport = session.transport._transport  # type: ignore[attr-defined]
                    await wait_until(
                        lambda: not asyncio_transport.is_reading(),
                        f"the server to stop reading ({len(session._handlers)} running, "
                        f"{len(session._waiting)} waiting, {len(session._background)} "
                        f"background; {session.stats})",
                    )
                    await settle(50)
                    _, peak = tracemalloc.get_traced_memory()
                    rss_grown = _rss() - rss_before
                finally:
                    tracemalloc.stop()
                assert not sending.done(), "the server took the whole flood in"
                # Held: the budget running (each payload copied on its way in and its echo
                # on its way out, about five times), the budget waiting, and per request a
                # few KiB of task and frame bookkeeping.
                held = 2 * (budget // size + 1)
                assert peak < 7 * budget + held * 4096, f"peak {peak / MiB:.1f} MiB"
                # The process's resident memory too (what tracemalloc cannot see: buffers
                # of C code, allocator slack), within RSS_SLACK of the same bound.
                bound = 7 * budget + held * 4096 + RSS_SLACK
                assert rss_grown < bound, f"RSS grew {rss_grown / MiB:.1f} MiB"
                answers = await wait_for(read_raw_frames(reader, count), "every answer", 60)
                await wait_for(sending, "the flood to be taken in", 60)
                assert sorted(a.channel_id for a in answers) == [2 * i + 1 for i in range(count)]
                assert all(not a.flags & ERROR and len(a.payload) == size for a in answers)
                assert session.stats.requests_refused == 0
                writer.close()

    run(main(), timeout=90)


RSS_SLACK = 32 * MiB
"""Resident memory a flood may add beyond what the server holds (allocator arenas, the
interpreter's own growth): a constant, whatever the flood's size."""


def _rss() -> int:
    """This process's resident memory now, in bytes (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _write_all(writer: asyncio.StreamWriter, frames: Any) -> None:
    for frame in frames:
        writer.write(frame)
        await writer.drain()


async def _only_session(svc: Service) -> rapace.RpcSession:
    await wait_until(lambda: len(svc.sessions) == 1, "the session")
    return svc.sessions[0]


@pytest.mark.parametrize("kind", KINDS)
def test_many_bad_connections_log_one_line_a_second(
    twin: Any, kind: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 connections that send garbage within one (frozen) second: one warning; the next
    second's says how many it stood for. Every one of them is still closed."""
    now = [1000.0]
    monkeypatch.setattr("rapace.ratelimit._clock", lambda: now[0])

    async def main() -> None:
        with short_tmpdir() as directory:
            async with probing_server(twin, kind, directory) as ps:
                for _ in range(20):
                    reader, writer = await open_raw(ps.address)
                    try:
                        await wait_for(read_raw_frame(reader), "the probe")
                        writer.write(GARBAGE)
                        await writer.drain()
                        await wait_for(closed_by_peer(reader), "the server to close us", FAST)
                    finally:
                        writer.close()
                closing = [m for m in warnings_from_rapace(caplog) if "closing rapace" in m]
                assert len(closing) == 1, closing
                now[0] += 2.0
                reader, writer = await open_raw(ps.address)
                try:
                    await wait_for(read_raw_frame(reader), "the probe")
                    writer.write(GARBAGE)
                    await writer.drain()
                    await wait_for(closed_by_peer(reader), "the server to close us", FAST)
                finally:
                    writer.close()
                closing = [m for m in warnings_from_rapace(caplog) if "closing rapace" in m]
                assert len(closing) == 2 and "19 more since the last warning" in closing[1]

    with caplog.at_level(logging.WARNING, logger="rapace"):
        run(main())
