"""Keepalive, ``session.ping()``, idle and frame timeouts (``rapace.keepalive``).

In memory (a raw peer driven by hand): pings are answered, bad pings ignored, ping floods
bounded; a proven peer that goes silent is closed naming keepalive, a peer that ignores
control frames is never closed for it, any frame is a sign of life. Over real sockets:
a ``SIGSTOP``ped server or client process, a TCP peer whose packets are silently dropped
(a network namespace, a veth pair and a blackhole route), idle and slowloris clients.

Every test runs on both twins; the keepalive intervals are small (0.05 to 0.2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from net_helpers import (
    ECHO,
    HANG,
    HERE,
    Child,
    child_env,
    closed_by_peer,
    raw_frame,
    read_raw_frame,
    serve_service,
    short_tmpdir,
    spawn,
    wait_for,
    wait_until,
)
from net_helpers import (
    REQUEST as NET_REQUEST,
)
from net_helpers import run as net_run
from session_helpers import (
    CONTROL,
    DATA,
    REQUEST,
    echo_dispatcher,
    raw_peer,
    run,
    session_pair,
)
from session_helpers import ECHO as MEM_ECHO

import rapace
from rapace import DeadlineExceeded, SessionClosed
from rapace.keepalive import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_KEEPALIVE,
    MAX_PONGS_WAITING,
    Liveness,
    PeerUnresponsive,
)
from rapace.session import RpcSession
from rapace.transport import mem_pair

PING_VERB, PONG_VERB = 5, 6
NOTIFY_ECHO = MEM_ECHO  # any method id: the raw peer's sign-of-life frames


def _liveness(session: RpcSession) -> Liveness:
    return session._liveness


# -- Ping and Pong -------------------------------------------------------------------------


def test_ping_is_answered_with_pong(twin: Any) -> None:
    """Keepalive off (the session default): a Ping still gets a Pong with its bytes."""

    async def main() -> None:
        async with raw_peer(twin) as setup:
            for payload in (b"\x01\x02\x03\x04\x05\x06\x07\x08", bytes(8), b"\xff" * 8):
                await setup.raw.send(0, PING_VERB, CONTROL, payload)
                pong = await setup.raw.recv()
                assert (pong.desc.channel_id, pong.desc.method_id, pong.desc.flags) == (
                    0,
                    PONG_VERB,
                    CONTROL,
                )
                assert bytes(pong.payload) == payload
            assert setup.session.peer_speaks_control

    run(main())


def test_bad_ping_payload_lengths_are_ignored(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, dispatcher=echo_dispatcher) as setup:
            raw = setup.raw
            for size in (0, 1, 7, 9, 16, 17, 100):
                await raw.send(0, PING_VERB, CONTROL, bytes(size))
                await raw.send(0, PONG_VERB, CONTROL, bytes(size))
            # A request after them: its answer is the next frame, so no pong came before.
            await raw.send(1, MEM_ECHO, REQUEST, b"after")
            answer = await raw.recv()
            assert (answer.desc.channel_id, bytes(answer.payload)) == (1, b"after")
            assert not setup.session.is_closed
            assert not setup.session.peer_speaks_control  # a bad pong proves nothing
            await raw.send(0, PING_VERB, CONTROL, b"12345678")
            assert bytes((await raw.recv()).payload) == b"12345678"

    run(main())


def test_ping_flood_is_bounded_and_other_channels_work(
    twin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that floods pings and reads nothing gets at most what fits in its inbox
    plus MAX_PONGS_WAITING pongs; the rest are dropped with a rate-limited warning, and
    a call behind the flood is still answered."""
    pings = 2000
    inbox = 64

    async def main() -> None:
        async with raw_peer(twin, dispatcher=echo_dispatcher, max_in_flight=inbox) as setup:
            raw, session = setup.raw, setup.session
            for i in range(pings):
                await raw.send(0, PING_VERB, CONTROL, struct.pack("<Q", i))
                assert len(_liveness(session)._pongs) <= MAX_PONGS_WAITING
            await raw.send(1, MEM_ECHO, REQUEST, b"behind the flood")
            # Then it reads: the answer to the call, with pongs before and after it (those
            # that waited); then one more ping is answered (it reads again).
            pongs: list[int] = []

            async def read_until(done: Any) -> None:
                while True:
                    frame = await raw.recv()
                    if done(frame):
                        return
                    assert frame.desc.method_id == PONG_VERB, frame
                    pongs.append(struct.unpack("<Q", bytes(frame.payload))[0])

            await read_until(lambda f: f.desc.channel_id == 1)
            await raw.send(0, PING_VERB, CONTROL, b"8 bytes!")
            await read_until(lambda f: bytes(f.payload) == b"8 bytes!")
            assert inbox <= len(pongs) <= inbox + MAX_PONGS_WAITING, len(pongs)
            assert len(set(pongs)) == len(pongs)  # each ping answered at most once
            assert session.stats.pings_dropped == pings - len(pongs)
            assert not session.is_closed

    with caplog.at_level(logging.WARNING, logger="rapace"):
        run(main())
    drops = [r for r in caplog.records if "dropping a ping" in r.getMessage()]
    assert 1 <= len(drops) <= 3, [r.getMessage() for r in drops]  # rate-limited


def test_ping_flood_over_a_socket_is_bounded(twin: Any) -> None:
    """The same over TCP: a client writes 100,000 pings (more pongs than the kernel's
    largest send buffer, tcp_wmem, holds) and reads nothing. The server answers what its
    socket takes, keeps at most MAX_PONGS_WAITING more, drops (and counts) the rest, and
    still answers a call behind the flood."""
    pings = 100_000

    async def main() -> None:
        async with serve_service(twin, "tcp://127.0.0.1:0", keepalive=None) as (server, _):
            host, port = str(server.address).removeprefix("tcp://").rsplit(":", 1)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            reader, writer = await asyncio.open_connection(sock=sock)
            try:
                for i in range(pings):
                    writer.write(raw_frame(i + 1, 0, PING_VERB, CONTROL, struct.pack("<Q", i)))
                    if i % 256 == 0:
                        await writer.drain()
                writer.write(raw_frame(pings + 1, 1, ECHO, NET_REQUEST, b"behind"))
                await writer.drain()
                await wait_until(lambda: len(server.sessions) == 1, "the session")
                (session,) = server.sessions
                await wait_until(
                    lambda: session.stats.pings_dropped > 0, "pings to be dropped", 10.0
                )
                assert len(_liveness(session)._pongs) <= MAX_PONGS_WAITING
                pongs = 0
                while True:
                    frame = await wait_for(read_raw_frame(reader), "a frame", 10.0)
                    if frame.channel_id == 1:
                        assert frame.payload == b"behind"
                        break
                    assert frame.method_id == PONG_VERB
                    pongs += 1
                # (Pongs that waited may still follow the answer.)
                await wait_until(lambda: not _liveness(session)._pongs, "waiting pongs sent")
                assert 0 < pongs <= pings - session.stats.pings_dropped
                assert not session.is_closed
            finally:
                writer.close()

    net_run(main(), timeout=60)


def test_session_ping_measures_a_round_trip(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as pair:
            started = time.monotonic()
            rtt = await pair.client.ping()
            elapsed = time.monotonic() - started
            assert 0 < rtt <= elapsed
            assert await pair.server.ping(timeout=5) > 0
            results = await asyncio.gather(*(pair.client.ping() for _ in range(20)))
            assert all(r > 0 for r in results)
            assert not _liveness(pair.client)._pings  # nothing left behind
            assert pair.client.peer_speaks_control and pair.server.peer_speaks_control

    run(main())


def test_ping_times_out_on_a_peer_that_ignores_control_frames(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin) as setup:
            session = setup.session
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="ping: no pong"):
                await session.ping(timeout=0.05)
            assert time.monotonic() - started >= 0.05
            assert (await setup.raw.recv()).desc.method_id == PING_VERB  # it was sent
            assert not _liveness(session)._pings
            # A ping pending when the session closes fails with SessionClosed.
            pending = asyncio.ensure_future(session.ping(timeout=5))
            await setup.raw.recv()
            session.close()
            with pytest.raises(SessionClosed):
                await wait_for_result(pending)
            with pytest.raises(SessionClosed):
                await session.ping()

    run(main())


async def wait_for_result(future: Any) -> Any:
    async with asyncio.timeout(5):
        return await future


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="needs keepalive"):
        rapace.connect("unix:/nowhere", keepalive=None, keepalive_timeout=1)
    with pytest.raises(ValueError, match="idle_timeout"):
        rapace.serve(lambda s: None, "unix:/nowhere", idle_timeout=-1)
    a, _ = mem_pair()
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(ValueError):
            RpcSession(a, keepalive=bad)
        with pytest.raises(ValueError):
            RpcSession(a, idle_timeout=bad)
    with pytest.raises(TypeError):
        RpcSession(a, keepalive="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs keepalive"):
        RpcSession(a, keepalive_timeout=1.0)
    assert _liveness(RpcSession(a)).tick is None  # all off by default
    assert _liveness(RpcSession(a, keepalive=0.4)).tick == pytest.approx(0.1)
    assert (DEFAULT_KEEPALIVE, DEFAULT_IDLE_TIMEOUT, DEFAULT_FRAME_TIMEOUT) == (10, 120, 30)


# -- keepalive in memory -------------------------------------------------------------------


async def answer_pings(raw: Any, answers: int, other: list[Any]) -> None:
    """Read what the session sends: answer the first ``answers`` pings with a Pong,
    ignore later ones; keep the other frames in ``other``."""
    while True:
        frame = await raw.recv(timeout=30)
        if frame.desc.method_id == PING_VERB and frame.desc.flags == CONTROL:
            if answers:
                answers -= 1
                await raw.send(0, PONG_VERB, CONTROL, bytes(frame.payload))
        else:
            other.append(frame)


def test_a_silent_proven_peer_is_declared_dead(twin: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The peer answers the probe (it speaks the control channel), then goes silent: a
    call with no timeout fails with SessionClosed naming keepalive, within the bound,
    and the reason is logged once at WARNING."""
    interval = timeout = 0.05

    async def main() -> None:
        kwargs = {"keepalive": interval, "keepalive_timeout": timeout}
        async with raw_peer(twin, session_kwargs=kwargs, check_clean=False) as setup:
            session, raw = setup.session, setup.raw
            other: list[Any] = []
            reader = asyncio.ensure_future(answer_pings(raw, 1, other))
            try:
                await wait_until(lambda: session.peer_speaks_control, "the probe is answered")
                proven_at = time.monotonic()
                call = asyncio.ensure_future(session.call(1, MEM_ECHO, b"x", timeout=math.inf))
                with pytest.raises(SessionClosed, match="keepalive") as caught:
                    await wait_for(call, "the call to fail", 5.0)
                elapsed = time.monotonic() - proven_at
                tick = interval / 4
                assert timeout <= elapsed < interval + timeout + 2 * tick + 0.5, elapsed
                assert "no frame from the peer for 0.1 s" in str(caught.value)
                assert session.is_closed and not session.pending_channel_ids()
                assert any(f.desc.channel_id == 1 for f in other)  # the call went out
                with pytest.raises(SessionClosed, match="keepalive"):
                    await session.call(3, MEM_ECHO, b"late")
                await asyncio.wait([setup.session_run], timeout=5)
                assert isinstance(setup.session_run.exception(), PeerUnresponsive)
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            with pytest.raises(rapace.TransportClosed):
                await raw.transport.send_frame(raw.frame(5, MEM_ECHO, REQUEST, b"?"))

    with caplog.at_level(logging.WARNING, logger="rapace"):
        run(main())
    warnings = [r for r in caplog.records if "keepalive" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING, warnings


def test_any_frame_is_a_sign_of_life(twin: Any) -> None:
    """A proven peer that answers later pings with some other frame (not a Pong) is
    alive: many pings pass, the session stays open."""
    interval = 0.05

    async def main() -> None:
        kwargs = {"keepalive": interval}
        async with raw_peer(twin, session_kwargs=kwargs) as setup:
            session, raw = setup.session, setup.raw
            pings = 0
            answered_probe = False
            while pings < 8:
                frame = await raw.recv()
                if frame.desc.method_id != PING_VERB:
                    continue
                pings += 1
                if not answered_probe:
                    answered_probe = True
                    await raw.send(0, PONG_VERB, CONTROL, bytes(frame.payload))
                else:  # a notification nobody handles: a frame, not a pong
                    await raw.send(7, NOTIFY_ECHO, DATA, b"still here")
            assert session.peer_speaks_control
            assert not session.is_closed

    run(main())


def test_a_peer_that_ignores_control_frames_is_never_declared_dead(twin: Any) -> None:
    """A peer that never answers a Ping (the Rust implementation): it serves calls,
    and stays connected while idle through many unanswered pings."""

    async def main() -> None:
        async with raw_peer(twin, session_kwargs={"keepalive": 0.05}) as setup:
            session, raw = setup.session, setup.raw

            async def serve_calls() -> None:
                call = asyncio.ensure_future(session.call(1, MEM_ECHO, b"hello", timeout=5))
                while True:
                    frame = await raw.recv()
                    if frame.desc.method_id == MEM_ECHO:
                        desc = frame.desc
                        await raw.send(desc.channel_id, 0, REQUEST, bytes(frame.payload))
                        break
                assert (await call).payload == b"hello"

            await serve_calls()
            pings = 0
            while pings < 6:  # several times the interval plus the timeout, unanswered
                if (await raw.recv()).desc.method_id == PING_VERB:
                    pings += 1
            assert not session.is_closed and not session.peer_speaks_control
            await serve_calls()

    run(main())


def test_no_judgement_while_this_side_pauses_reading(twin: Any) -> None:
    """A full tunnel reader pauses reading: the peer's silence is this side's doing."""

    async def main() -> None:
        a, b = mem_pair()
        session = RpcSession(a, 1, keepalive=0.05)
        peer = RpcSession(b, 2)
        runs = [asyncio.ensure_future(session.run()), asyncio.ensure_future(peer.run())]
        try:
            assert await session.ping(timeout=5) > 0
            session._reader_blocked()  # as a full tunnel reader does
            assert a._paused
            peer.set_dispatcher(echo_dispatcher)
            # The peer's answer cannot arrive while reading is paused: ten intervals of
            # silence (counted by the heartbeats the session sends meanwhile), which would
            # close the session (0.1 s) if it judged the peer.
            call = asyncio.ensure_future(session.call(1, MEM_ECHO, b"held", timeout=5))
            seen = peer._batches_received
            await wait_until(lambda: peer._batches_received >= seen + 10, "ten heartbeats", 5.0)
            assert not session.is_closed and not call.done()
            session._reader_unblocked()
            assert (await call).payload == b"held"
            assert await session.ping(timeout=5) > 0
        finally:
            session.close()
            peer.close()
            await asyncio.gather(*runs, return_exceptions=True)

    run(main())


# -- stopped processes ---------------------------------------------------------------------


def test_a_stopped_server_process_fails_pending_calls_within_the_keepalive_bound(
    twin: Any,
) -> None:
    interval = 0.1
    with short_tmpdir() as directory, spawn(twin.name, "serve", f"unix:{directory}/s") as child:

        async def main() -> None:
            client = await rapace.connect(child.address, keepalive=interval)
            try:
                assert (await client.call(1, ECHO, b"up")).payload == b"up"
                await wait_until(lambda: client.peer_speaks_control, "the probe is answered")
                calls = [
                    asyncio.ensure_future(
                        client.call(client.next_channel_id(), HANG, b"", timeout=math.inf)
                    )
                    for _ in range(5)
                ]
                assert (await client.call(client.next_channel_id(), ECHO, b"x")).payload == b"x"
                os.kill(child.pid, signal.SIGSTOP)
                stopped = time.monotonic()
                results = await wait_for(
                    asyncio.gather(*calls, return_exceptions=True), "the calls to fail", 5.0
                )
                elapsed = time.monotonic() - stopped
                assert elapsed < 2 * interval + 2 * interval / 4 + 1.0, elapsed
                for result in results:
                    assert isinstance(result, SessionClosed), result
                    assert "keepalive" in str(result)
                assert client.is_closed and not client.pending_channel_ids()
            finally:
                await client.aclose()
                os.kill(child.pid, signal.SIGCONT)

        net_run(main())


def test_the_server_notices_a_stopped_client_process(twin: Any) -> None:
    """A stopped client's session and handlers do not stay on the server."""
    interval = 0.1

    async def main() -> None:
        with short_tmpdir() as directory:
            address = f"unix:{directory}/s"
            async with serve_service(twin, address, keepalive=interval) as (server, service):
                with spawn(twin.name, "call", address) as child:
                    await wait_for(service.hang_started, "the client's call to start")
                    (session,) = server.sessions
                    await wait_until(lambda: session.peer_speaks_control, "the probe answered")
                    os.kill(child.pid, signal.SIGSTOP)
                    stopped = time.monotonic()
                    try:
                        await wait_until(lambda: session.is_closed, "the server closes it")
                        elapsed = time.monotonic() - stopped
                        assert elapsed < 2 * interval + 2 * interval / 4 + 1.0, elapsed
                        await wait_until(lambda: not server.sessions, "the session is gone")
                        await wait_until(lambda: service.hang_cancelled == 1, "handler cancelled")
                    finally:
                        os.kill(child.pid, signal.SIGCONT)

    net_run(main())


# -- dropped packets: a network namespace ----------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@contextlib.contextmanager
def veth_namespace(index: int) -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (namespace, our address,
    its address). Skips only when namespaces are unavailable; always cleans up."""
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed")
    tag = f"{os.getpid() % 100000}{index}"
    namespace, ours, theirs = f"rk{tag}", f"rka{tag}", f"rkb{tag}"
    added = _ip("netns", "add", namespace, check=False)
    if added.returncode != 0:
        pytest.skip(f"ip netns is unavailable here: {added.stderr.strip()}")
    octet = (os.getpid() + index) % 250
    here, there = f"10.213.{octet}.1", f"10.213.{octet}.2"
    try:
        _ip("link", "add", ours, "type", "veth", "peer", "name", theirs)
        _ip("link", "set", theirs, "netns", namespace)
        _ip("addr", "add", f"{here}/30", "dev", ours)
        _ip("link", "set", ours, "up")
        _ip("-n", namespace, "addr", "add", f"{there}/30", "dev", theirs)
        _ip("-n", namespace, "link", "set", theirs, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        yield namespace, here, there
    finally:
        _ip("route", "del", "blackhole", f"{there}/32", check=False)
        _ip("link", "del", ours, check=False)
        _ip("netns", "del", namespace, check=False)


@contextlib.contextmanager
def spawn_in(namespace: str, twin_name: str, address: str) -> Iterator[Child]:
    """``net_helpers.py serve ADDRESS`` in ``namespace``; always killed."""
    child = [sys.executable, str(HERE / "net_helpers.py"), "serve", address]
    proc = subprocess.Popen(
        ["ip", "netns", "exec", namespace, *child],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(twin_name),
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        line = proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY "):
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise AssertionError(f"the child did not start: {line!r} {err.decode()[-2000:]}")
        _, child_address, implementation, pid = line.split()
        yield Child(proc, child_address, implementation, int(pid))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_a_tcp_peer_whose_packets_are_dropped_fails_calls_within_the_keepalive_bound(
    twin: Any,
) -> None:
    """The server runs in another network namespace; a blackhole route (both ways)
    then silently drops every packet between us: no FIN, no RST, no ICMP. Calls fail
    within the keepalive bound, not after their timeout."""
    interval = 0.1
    with (
        veth_namespace(0 if twin.name == "cython" else 1) as (namespace, here, there),
        spawn_in(namespace, twin.name, f"tcp://{there}:0") as child,
    ):

        async def main() -> None:
            client = await rapace.connect(child.address, keepalive=interval)
            try:
                assert (await client.call(1, ECHO, b"up")).payload == b"up"
                await wait_until(lambda: client.peer_speaks_control, "the probe is answered")
                calls = [
                    asyncio.ensure_future(
                        client.call(client.next_channel_id(), HANG, b"", timeout=math.inf)
                    )
                    for _ in range(3)
                ]
                assert (await client.call(client.next_channel_id(), ECHO, b"x")).payload == b"x"
                _ip("route", "add", "blackhole", f"{there}/32")
                _ip("-n", namespace, "route", "add", "blackhole", f"{here}/32")
                dropped = time.monotonic()
                results = await wait_for(
                    asyncio.gather(*calls, return_exceptions=True), "the calls to fail", 5.0
                )
                elapsed = time.monotonic() - dropped
                assert elapsed < 2 * interval + 2 * interval / 4 + 1.0, elapsed
                for result in results:
                    assert isinstance(result, SessionClosed), result
                    assert "keepalive" in str(result)
                assert client.is_closed
            finally:
                await client.aclose()

        net_run(main())


# -- idle and slow peers of a server ---------------------------------------------------------


async def _open_raw(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


def test_idle_timeout_closes_an_idle_and_a_slowloris_connection(twin: Any) -> None:
    idle = 0.2

    async def main() -> None:
        async with serve_service(
            twin, "tcp://127.0.0.1:0", keepalive=None, idle_timeout=idle, frame_timeout=None
        ) as (server, _):
            address = str(server.address)
            idle_reader, idle_writer = await _open_raw(address)
            slow_reader, slow_writer = await _open_raw(address)
            started = time.monotonic()
            frame = raw_frame(1, 1, ECHO, NET_REQUEST, b"x")
            slow_writer.write(frame[: 4 + 32])  # half a descriptor, never the rest
            for reader in (idle_reader, slow_reader):
                assert await wait_for(closed_by_peer(reader), "the server to close", 5.0) == b""
                assert idle - 0.05 <= time.monotonic() - started < idle + 2 * idle / 4 + 1.0
            for writer in (idle_writer, slow_writer):
                writer.close()
            await wait_until(lambda: not server.sessions, "the sessions are gone")

    net_run(main())


def test_frame_timeout_closes_a_slowloris_but_not_an_idle_connection(twin: Any) -> None:
    bound = 0.2

    async def main() -> None:
        async with serve_service(
            twin, "tcp://127.0.0.1:0", keepalive=None, idle_timeout=None, frame_timeout=bound
        ) as (server, _):
            address = str(server.address)
            idle_reader, idle_writer = await _open_raw(address)
            slow_reader, slow_writer = await _open_raw(address)
            started = time.monotonic()
            frame = raw_frame(1, 1, ECHO, NET_REQUEST, b"x" * 100)
            slow_writer.write(frame[:40])
            assert await wait_for(closed_by_peer(slow_reader), "the slowloris closed", 5.0) == b""
            assert bound - 0.05 <= time.monotonic() - started < bound + 2 * bound / 4 + 1.0
            # The idle one still works: a request is answered.
            idle_writer.write(frame)
            answer = await wait_for(read_raw_frame(idle_reader), "the answer", 5.0)
            assert answer.payload == b"x" * 100
            assert len(server.sessions) == 1
            for writer in (idle_writer, slow_writer):
                writer.close()

    net_run(main())


def test_idle_timeout_spares_active_connections(twin: Any) -> None:
    """A raw client calling back to back, and a rapace client with keepalive that makes
    no call at all (it answers the server's pings), stay connected for many idle
    timeouts."""
    idle = 0.15

    async def main() -> None:
        async with serve_service(twin, "tcp://127.0.0.1:0", keepalive=0.05, idle_timeout=idle) as (
            server,
            _,
        ):
            address = str(server.address)
            quiet = await rapace.connect(address, keepalive=0.05)
            reader, writer = await _open_raw(address)
            try:
                started = time.monotonic()
                channel = 1
                while time.monotonic() - started < 5 * idle:
                    writer.write(raw_frame(channel, channel, ECHO, NET_REQUEST, b"busy"))
                    answer = await wait_for(read_raw_frame(reader), "an answer", 5.0)
                    if answer.channel_id == 0:  # the server's keepalive ping: answer it
                        writer.write(raw_frame(1, 0, PONG_VERB, CONTROL, answer.payload))
                        continue
                    assert answer.payload == b"busy"
                    channel += 2
                    await asyncio.sleep(idle / 5)  # pacing, not ordering
                assert not quiet.is_closed and len(server.sessions) == 2
                assert (await quiet.call(1, ECHO, b"still")).payload == b"still"
            finally:
                writer.close()
                await quiet.aclose()

    net_run(main())


def test_connect_and_serve_turn_keepalive_on_by_default(twin: Any) -> None:
    async def main() -> None:
        async with serve_service(twin, "tcp://127.0.0.1:0") as (server, _):
            async with rapace.connect(str(server.address)) as client:
                assert _liveness(client)._interval == DEFAULT_KEEPALIVE
                assert _liveness(client)._idle_timeout is None
                assert _liveness(client)._frame_timeout == DEFAULT_FRAME_TIMEOUT
                await wait_until(lambda: len(server.sessions) == 1, "the server's session")
                (session,) = server.sessions
                assert _liveness(session)._interval == DEFAULT_KEEPALIVE
                assert _liveness(session)._idle_timeout == DEFAULT_IDLE_TIMEOUT
                assert await client.ping() > 0
            async with rapace.connect(str(server.address), keepalive=None) as client:
                assert _liveness(client).tick is not None  # the frame timeout remains
                assert _liveness(client)._interval is None

    net_run(main())


def test_a_peer_that_paused_its_own_reading_is_not_declared_dead(twin: Any) -> None:
    """The server runs one handler at a time and stops reading while requests wait: it
    reads none of the client's pings for many intervals, so none is answered. Its own
    heartbeats still reach the client, which keeps the session; every call then succeeds."""
    interval = 0.05
    gate = asyncio.Event()

    async def slow(frame: Any) -> bytes:
        await gate.wait()
        return bytes(frame.payload)

    async def main() -> None:
        a, b = mem_pair()
        kwargs = {"keepalive": interval, "keepalive_timeout": interval}
        client = RpcSession(a, 1, **kwargs)
        server = RpcSession(b, 2, max_pending=1, **kwargs)
        server.set_dispatcher(slow)
        runs = [asyncio.ensure_future(client.run()), asyncio.ensure_future(server.run())]
        try:
            await wait_until(lambda: client.peer_speaks_control, "the probe answered")
            calls = [asyncio.ensure_future(client.call(c, MEM_ECHO, b"%d" % c)) for c in (1, 3, 5)]
            await wait_until(lambda: server._overloaded, "the server to stop reading")
            seen = client._batches_received
            # ten intervals' worth of the server's heartbeats, while it reads nothing
            await wait_until(lambda: client._batches_received >= seen + 10, "heartbeats", 5.0)
            assert not client.is_closed and server._overloaded
            gate.set()
            assert [(await c).payload for c in calls] == [b"1", b"3", b"5"]
        finally:
            client.close()
            server.close()
            await asyncio.gather(*runs, return_exceptions=True)

    run(main())
