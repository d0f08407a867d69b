"""``rapace.connect`` / ``rapace.serve`` over real sockets: addresses, calls between
processes, many clients, servers and clients that go away mid-call, socketpairs.

Every test runs against both twins (the ``twin`` fixture; child processes get
``RAPACE_NO_EXTENSIONS=1`` for the pure one) and, unless it says otherwise, on uvloop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

import pytest
from net_helpers import (
    ECHO,
    HANG,
    KINDS,
    LOOPS,
    PID,
    UNKNOWN,
    YIELD_ECHO,
    Service,
    listen_address,
    open_tunnel,
    pattern,
    run,
    serve_service,
    settle,
    short_tmpdir,
    spawn,
    wait_for,
    wait_until,
)

import rapace
from rapace import Address
from rapace.connection import parse_address

# -- addresses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/tmp/x.sock", Address("unix", path="/tmp/x.sock")),
        ("unix:///tmp/x.sock", Address("unix", path="/tmp/x.sock")),
        ("unix:relative.sock", Address("unix", path="relative.sock")),
        ("tcp://127.0.0.1:0", Address("tcp", host="127.0.0.1", port=0)),
        ("tcp://localhost:8080", Address("tcp", host="localhost", port=8080)),
        ("tcp://example.org:65535", Address("tcp", host="example.org", port=65535)),
        ("tcp://[::1]:0", Address("tcp", host="::1", port=0)),
        ("tcp://[fe80::1]:443", Address("tcp", host="fe80::1", port=443)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (Address("unix", path="/tmp/x.sock"), "unix:/tmp/x.sock"),
        (Address("tcp", host="127.0.0.1", port=9), "tcp://127.0.0.1:9"),
        (Address("tcp", host="::1", port=9), "tcp://[::1]:9"),
    ],
)
def test_address_str_round_trips(address: Address, text: str) -> None:
    assert str(address) == text
    assert parse_address(text) == address


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "unsupported address"),
        ("/tmp/x.sock", "unsupported address"),
        ("http://127.0.0.1:80", "unsupported address"),
        ("udp://127.0.0.1:80", "unsupported address"),
        ("TCP://127.0.0.1:80", "unsupported address"),
        ("unix:", "has no path"),
        ("unix://", "has no path"),
        ("tcp://127.0.0.1", "needs a port"),
        ("tcp://127.0.0.1:", "needs a port"),
        ("tcp://127.0.0.1:http", "needs a port"),
        ("tcp://127.0.0.1:-1", "needs a port"),
        ("tcp://127.0.0.1:80/path", "needs a port"),
        ("tcp://[::1]", "needs a port"),
        ("tcp://:80", "needs a host"),
        ("tcp://[]:80", "needs a host"),
        ("tcp://127.0.0.1:65536", "0..65535"),
        ("tcp://127.0.0.1:99999999999999999999", "0..65535"),
    ],
)
def test_parse_address_rejects(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        parse_address(text)
    assert repr(text) in str(info.value) or not text


@pytest.mark.parametrize("text", ["tcp://127.0.0.1:\uff18\uff10", "tcp://127.0.0.1:\u00b2"])
def test_parse_address_rejects_non_ascii_port_digits(text: str) -> None:
    """``str.isdigit`` accepts fullwidth and superscript digits; a port is ASCII only."""
    with pytest.raises(ValueError, match="needs a port"):
        parse_address(text)


def test_parse_address_type_error() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        parse_address(b"tcp://127.0.0.1:1")  # type: ignore[arg-type]


def test_connect_rejects_bad_address(twin: Any) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="unsupported address"):
            await rapace.connect("127.0.0.1:80")
        with pytest.raises(ValueError, match="needs a port"):
            await rapace.serve(lambda s: None, "tcp://127.0.0.1")

    run(main())


def test_tcp_port_zero_resolves_to_the_bound_port(twin: Any) -> None:
    async def main() -> None:
        async with serve_service(twin, "tcp://127.0.0.1:0") as (server, _):
            address = server.address
            assert address.kind == "tcp" and address.host == "127.0.0.1"
            assert 0 < address.port <= 65535
            assert str(address) == f"tcp://127.0.0.1:{address.port}"
            async with rapace.connect(str(address)) as client:
                response = await client.call(client.next_channel_id(), ECHO, b"port")
                assert response.payload == b"port"
                peer = client.transport._transport.get_extra_info("peername")  # type: ignore[attr-defined]
                assert peer[1] == address.port

    run(main())


def test_ipv6_loopback(twin: Any) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")

    async def main() -> None:
        async with serve_service(twin, "tcp://[::1]:0") as (server, _):
            assert server.address.host == "::1" and server.address.port > 0
            text = str(server.address)
            assert text == f"tcp://[::1]:{server.address.port}"
            async with rapace.connect(text) as client:
                response = await client.call(client.next_channel_id(), ECHO, b"six")
                assert response.payload == b"six"

    run(main())


def path_exists(path: str) -> bool:
    """``os.path.exists`` (a local stat: no need to leave the loop for it in a test)."""
    return os.path.exists(path)


def test_unix_socket_file_is_removed_on_close(twin: Any) -> None:
    async def main() -> None:
        with short_tmpdir() as directory:
            path = f"{directory}/s.sock"
            async with serve_service(twin, f"unix:{path}") as (server, _):
                assert str(server.address) == f"unix:{path}"
                assert path_exists(path)
                async with rapace.connect(f"unix:{path}") as client:
                    assert (await client.call(1, ECHO, b"alive")).payload == b"alive"
            assert not path_exists(path)

    run(main())


def test_unix_stale_socket_file_is_replaced(twin: Any) -> None:
    """A socket file nobody listens on (as a crashed server leaves it) does not block serve."""

    async def main() -> None:
        with short_tmpdir() as directory:
            path = f"{directory}/s.sock"
            stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stale.bind(path)
            stale.close()
            assert path_exists(path)
            async with (
                serve_service(twin, f"unix:{path}") as (_server, _),
                rapace.connect(f"unix:{path}") as client,
            ):
                assert (await client.call(1, ECHO, b"again")).payload == b"again"

    run(main())


def test_unix_live_socket_is_never_stolen(twin: Any) -> None:
    """Serving on the path of a live server fails; the live server keeps its address."""

    async def main() -> None:
        with short_tmpdir() as directory:
            path = f"{directory}/s.sock"
            async with serve_service(twin, f"unix:{path}") as (server, _):
                inode = os.stat(path).st_ino
                intruder: rapace.Server | None = None
                try:
                    with pytest.raises(OSError):
                        intruder = await rapace.serve(lambda s: None, f"unix:{path}")
                finally:
                    if intruder is not None:
                        intruder.close()
                        await intruder.wait_closed()
                assert path_exists(path) and os.stat(path).st_ino == inode
                async with rapace.connect(str(server.address)) as client:
                    assert (await client.call(1, ECHO, b"mine")).payload == b"mine"

    run(main())


def test_unix_close_leaves_a_newer_servers_socket_alone(twin: Any) -> None:
    """close() unlinks the path only while it is still this server's socket."""

    async def main() -> None:
        with short_tmpdir() as directory:
            path = f"{directory}/s.sock"
            old = await rapace.serve(lambda s: None, f"unix:{path}")
            os.unlink(path)  # e.g. an operator cleaned up, and a new server took the path
            async with serve_service(twin, f"unix:{path}") as (new, _):
                old.close()
                await old.wait_closed()
                assert path_exists(path), "closing the old server removed the new one's socket"
                async with rapace.connect(str(new.address)) as client:
                    assert (await client.call(1, ECHO, b"new")).payload == b"new"

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_connect_to_nobody_fails_clearly(twin: Any, kind: str) -> None:
    async def main() -> None:
        with short_tmpdir() as directory:
            if kind == "unix":
                address = f"unix:{directory}/nobody.sock"
            else:
                with socket.socket() as probe:  # a port nobody listens on
                    probe.bind(("127.0.0.1", 0))
                    address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
            with pytest.raises(OSError):
                await rapace.connect(address)

    run(main())


# -- both ways of connecting; parity of channel ids ----------------------------------------


def test_connect_await_and_async_with(twin: Any) -> None:
    async def main() -> None:
        with short_tmpdir() as directory:
            async with serve_service(twin, listen_address("unix", directory)) as (server, _):
                session = await rapace.connect(str(server.address))
                assert isinstance(session, rapace.RpcSession)
                assert (await session.call(1, ECHO, b"a")).payload == b"a"
                await session.aclose()
                assert session.is_closed
                with pytest.raises(rapace.SessionClosed):
                    await session.call(3, ECHO, b"b")

                async with rapace.connect(str(server.address)) as inner:
                    assert (await inner.call(1, ECHO, b"c")).payload == b"c"
                assert inner.is_closed
                await wait_until(lambda: not server.sessions, "the server saw both close")

    run(main())


def test_accepted_sessions_use_even_channel_ids(twin: Any) -> None:
    async def main() -> None:
        seen: list[int] = []

        async def client_dispatch(frame: Any) -> bytes:
            seen.append(frame.desc.channel_id)
            return b"from client " + frame.payload

        with short_tmpdir() as directory:
            async with (
                serve_service(twin, listen_address("unix", directory)) as (server, svc),
                rapace.connect(str(server.address)) as client,
            ):
                client.set_dispatcher(client_dispatch)
                assert [client.next_channel_id() for _ in range(3)] == [1, 3, 5]
                await client.call(7, ECHO, b"hello")  # the server session exists now
                (accepted,) = svc.sessions
                ids = [accepted.next_channel_id() for _ in range(3)]
                assert ids == [2, 4, 6]
                for channel_id in (8, 10):
                    response = await accepted.call(channel_id, ECHO, b"x")
                    assert response.payload == b"from client x"
                assert seen == [8, 10]

    run(main())


# -- calls between two processes ---------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", KINDS)
def test_calls_between_processes(twin: Any, kind: str, loop: str) -> None:
    with (
        short_tmpdir() as directory,
        spawn(twin.name, "serve", listen_address(kind, directory)) as child,
    ):
        assert child.implementation == twin.name, "the child runs the other twin"
        if kind == "tcp":
            assert parse_address(child.address).port > 0

        async def main() -> None:
            async with rapace.connect(child.address) as client:
                # It really is another process.
                pid = await client.call(client.next_channel_id(), PID)
                assert int(pid.payload) == child.pid != os.getpid()
                # Payload sizes around the inline limit and up to the 1 MiB maximum.
                for size in (0, 1, 15, 16, 17, 1000, 65536, 1 << 20):
                    payload = pattern(size, size)
                    response = await client.call(client.next_channel_id(), ECHO, payload)
                    assert response.payload == payload, size
                    assert response.desc.method_id == 0
                # Many calls in flight at once, each with its own answer.
                payloads = [b"call-%d" % i * (i % 7 + 1) for i in range(300)]
                responses = await asyncio.gather(
                    *(client.call(client.next_channel_id(), YIELD_ECHO, p) for p in payloads)
                )
                assert [r.payload for r in responses] == payloads
                # An error response carries its status across.
                with pytest.raises(rapace.Unimplemented, match="unknown method_id"):
                    await client.call(client.next_channel_id(), UNKNOWN, b"")
                # A tunnel, echoed by the child.
                stream = await open_tunnel(client)
                data = pattern(7, 300_000)
                stream.write(data)
                stream.write_eof()
                await stream.drain()
                assert await stream.read() == data
                assert not client.pending_channel_ids()

        run(main(), loop=loop)
        assert child.proc.poll() is None, "the server process died"


@pytest.mark.parametrize("kind", KINDS)
def test_server_process_killed_mid_call(twin: Any, kind: str) -> None:
    """The peer process dies (SIGKILL): pending calls fail at once, not after the timeout."""
    with (
        short_tmpdir() as directory,
        spawn(twin.name, "serve", listen_address(kind, directory)) as child,
    ):

        async def main() -> None:
            client = await rapace.connect(child.address, call_timeout=60)
            try:
                assert (await client.call(1, ECHO, b"up")).payload == b"up"
                calls = [
                    asyncio.ensure_future(client.call(client.next_channel_id(), HANG, b""))
                    for _ in range(10)
                ]
                await wait_until(
                    lambda: len(client.pending_channel_ids()) == 10, "all calls are pending"
                )
                # The child got them: its answer to a later call comes after theirs.
                assert (await client.call(client.next_channel_id(), ECHO, b"x")).payload == b"x"
                start = time.monotonic()
                child.proc.kill()
                results = await wait_for(
                    asyncio.gather(*calls, return_exceptions=True), "the calls to fail", 5.0
                )
                assert time.monotonic() - start < 5.0
                assert all(isinstance(r, rapace.SessionClosed) for r in results), results
                assert client.is_closed
                assert not client.pending_channel_ids()
                with pytest.raises(rapace.SessionClosed):
                    await client.call(client.next_channel_id(), ECHO, b"late")
            finally:
                await client.aclose()

        run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_tunnel_cut_short_by_a_dying_peer_is_an_error_not_eof(twin: Any, kind: str) -> None:
    """A tunnel whose peer process dies mid-stream raises SessionClosed: a truncated stream
    is never mistaken for a complete one."""
    with (
        short_tmpdir() as directory,
        spawn(twin.name, "serve", listen_address(kind, directory)) as child,
    ):

        async def main() -> None:
            async with rapace.connect(child.address) as client:
                stream = await open_tunnel(client)
                stream.write(b"x" * 100_000)
                await stream.drain()
                assert await stream.readexactly(100_000) == b"x" * 100_000
                child.proc.kill()
                with pytest.raises(rapace.SessionClosed):
                    await wait_for(stream.read(), "the read to fail", 5.0)
                with pytest.raises(rapace.SessionClosed):
                    stream.write(b"more")
                    await wait_for(stream.drain(), "the write to fail", 5.0)

        run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_client_process_killed_mid_call(twin: Any, kind: str) -> None:
    """A client killed while its call is handled: the handler is cancelled, the session ends."""

    async def main() -> None:
        with short_tmpdir() as directory:
            # A well-behaved in-process client stays connected throughout.
            async with (
                serve_service(twin, listen_address(kind, directory)) as (server, svc),
                rapace.connect(str(server.address)) as other,
            ):
                assert (await other.call(1, ECHO, b"before")).payload == b"before"
                await wait_until(lambda: len(server.sessions) == 1, "one session")
                with spawn(twin.name, "call", str(server.address)) as child:
                    assert child.implementation == twin.name
                    await wait_for(svc.hang_started, "the child's call to be handled")
                    assert len(server.sessions) == 2
                    assert svc.hang_cancelled == 0
                    child.proc.kill()
                    await wait_until(lambda: svc.hang_cancelled == 1, "the handler was cancelled")
                    await wait_until(
                        lambda: len(server.sessions) == 1, "the dead client's session ended"
                    )
                dead = svc.sessions[1]
                assert dead.is_closed and dead not in server.sessions
                assert not dead.pending_channel_ids() and not dead.tunnel_channel_ids()
                assert (await other.call(3, ECHO, b"after")).payload == b"after"

    run(main())


# -- many clients; servers that close ----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_many_clients_concurrent_calls(twin: Any, kind: str) -> None:
    clients_n, calls_n = 20, 50

    async def one_client(address: str, index: int) -> None:
        async with rapace.connect(address) as client:
            payloads = [b"client %d call %d " % (index, i) + bytes(i * 13) for i in range(calls_n)]
            responses = await asyncio.gather(
                *(client.call(client.next_channel_id(), YIELD_ECHO, p) for p in payloads)
            )
            assert [r.payload for r in responses] == payloads

    async def main() -> None:
        with short_tmpdir() as directory:
            async with serve_service(twin, listen_address(kind, directory)) as (server, svc):
                address = str(server.address)
                await asyncio.gather(*(one_client(address, i) for i in range(clients_n)))
                assert len(svc.sessions) == clients_n
                await wait_until(lambda: not server.sessions, "every session ended")

    run(main())


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", KINDS)
def test_server_close_fails_calls_in_flight_fast(twin: Any, kind: str, loop: str) -> None:
    clients_n, calls_n = 5, 4

    async def main() -> None:
        with short_tmpdir() as directory:
            svc = Service(hang_target=clients_n * calls_n)
            server = await rapace.serve(svc.on_session, listen_address(kind, directory))
            address = str(server.address)
            clients = [await rapace.connect(address, call_timeout=60) for _ in range(clients_n)]
            try:
                calls = [
                    asyncio.ensure_future(c.call(c.next_channel_id(), HANG, b"", timeout=60))
                    for c in clients
                    for _ in range(calls_n)
                ]
                await wait_for(svc.hang_started, "every call to reach its handler")
                start = time.monotonic()
                server.close()
                results = await wait_for(
                    asyncio.gather(*calls, return_exceptions=True), "the calls to fail", 5.0
                )
                assert time.monotonic() - start < 5.0
                assert all(isinstance(r, rapace.SessionClosed) for r in results), results
                await wait_for(server.wait_closed(), "server.wait_closed()")
                assert not server.sessions
                assert svc.hang_cancelled == clients_n * calls_n
                assert all(c.is_closed for c in clients)
                with pytest.raises(OSError):
                    await rapace.connect(address)
            finally:
                server.close()
                for client in clients:
                    await client.aclose()

    run(main(), loop=loop)


def test_server_async_with_closes_accepted_sessions(twin: Any) -> None:
    async def main() -> None:
        with short_tmpdir() as directory:
            svc = Service()
            async with await rapace.serve(
                svc.on_session, listen_address("unix", directory)
            ) as server:
                client = await rapace.connect(str(server.address))
                pending = asyncio.ensure_future(client.call(1, HANG, b"", timeout=60))
                await wait_for(svc.hang_started, "the call to be handled")
            with pytest.raises(rapace.SessionClosed):
                await wait_for(pending, "the pending call to fail", 5.0)
            assert not server.sessions and svc.sessions[0].is_closed
            await client.aclose()

    run(main())


def test_on_session_failure_closes_only_that_connection(
    twin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        accepted = 0

        def on_session(session: rapace.RpcSession) -> None:
            nonlocal accepted
            accepted += 1
            if accepted == 2:
                raise RuntimeError("refusing the second connection")

            async def dispatch(frame: Any) -> bytes:
                return frame.payload

            session.set_dispatcher(dispatch)

        with short_tmpdir() as directory:
            server = await rapace.serve(on_session, listen_address("unix", directory))
            async with server:
                first = await rapace.connect(str(server.address))
                assert (await first.call(1, ECHO, b"1")).payload == b"1"
                second = await rapace.connect(str(server.address))
                with pytest.raises(rapace.SessionClosed):
                    await wait_for(second.call(1, ECHO, b"2", timeout=60), "the refusal", 2.0)
                assert (await first.call(3, ECHO, b"3")).payload == b"3"
                await first.aclose()
                await second.aclose()
        assert "refusing the second connection" in caplog.text

    with caplog.at_level(logging.WARNING, logger="rapace"):
        run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_on_session_can_send_to_its_client(twin: Any, loop: str) -> None:
    """``on_session`` may greet its client (a notification) before serving requests."""
    greet = 0x77

    async def main() -> None:
        greeted = asyncio.get_running_loop().create_future()

        async def on_session(session: rapace.RpcSession) -> None:
            await session.notify(greet, b"hello")

            async def dispatch(frame: Any) -> bytes:
                return frame.payload

            session.set_dispatcher(dispatch)

        async def client_dispatch(frame: Any) -> bytes:
            if frame.desc.method_id == greet and not greeted.done():
                greeted.set_result(frame.payload)
            return b""

        with short_tmpdir() as directory:
            server = await rapace.serve(on_session, listen_address("unix", directory))
            async with server, rapace.connect(str(server.address)) as client:
                client.set_dispatcher(client_dispatch)
                assert await wait_for(greeted, "the greeting", 2.0) == b"hello"
                assert (await client.call(1, ECHO, b"x", timeout=5)).payload == b"x"

    run(main(), loop=loop)


def test_call_timeout_over_a_real_connection(twin: Any) -> None:
    async def main() -> None:
        with short_tmpdir() as directory:
            async with (
                serve_service(twin, listen_address("unix", directory)) as (server, svc),
                rapace.connect(str(server.address), call_timeout=0.05) as client,
            ):
                with pytest.raises(rapace.DeadlineExceeded):
                    await client.call(1, HANG, b"")
                assert not client.pending_channel_ids()
                assert (await client.call(3, ECHO, b"still fine")).payload == b"still fine"
                assert svc.hanging == 1

    run(main())


def test_on_session_async_runs_before_the_first_request(twin: Any) -> None:
    async def main() -> None:
        ready = asyncio.Event()

        async def on_session(session: rapace.RpcSession) -> None:
            await ready.wait()  # the request is already on the wire by now

            async def dispatch(frame: Any) -> bytes:
                return b"set late " + frame.payload

            session.set_dispatcher(dispatch)

        with short_tmpdir() as directory:
            server = await rapace.serve(on_session, listen_address("unix", directory))
            async with server, rapace.connect(str(server.address)) as client:
                call = asyncio.ensure_future(client.call(1, ECHO, b"x"))
                await settle()
                assert not call.done()
                ready.set()
                assert (await wait_for(call, "the answer")).payload == b"set late x"

    run(main())


# -- socketpair --------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_connect_socketpair(twin: Any, loop: str) -> None:
    async def main() -> None:
        left, right = socket.socketpair()
        a = await rapace.connect(left)
        b = await rapace.connect(right, start_channel_id=2)
        try:

            async def dispatch_a(frame: Any) -> bytes:
                if frame.desc.method_id == HANG:
                    await asyncio.get_running_loop().create_future()
                return b"a:" + frame.payload

            async def dispatch_b(frame: Any) -> bytes:
                return b"b:" + frame.payload

            a.set_dispatcher(dispatch_a)
            b.set_dispatcher(dispatch_b)
            assert (await a.call(a.next_channel_id(), ECHO, b"1")).payload == b"b:1"
            assert (await b.call(b.next_channel_id(), ECHO, b"2")).payload == b"a:2"
            both = await asyncio.gather(
                *(a.call(a.next_channel_id(), ECHO, b"%d" % i) for i in range(100)),
                *(b.call(b.next_channel_id(), ECHO, b"%d" % i) for i in range(100)),
            )
            assert [r.payload for r in both] == [b"b:%d" % i for i in range(100)] + [
                b"a:%d" % i for i in range(100)
            ]
            # Closing one end fails the other's pending calls at once.
            pending = asyncio.ensure_future(b.call(b.next_channel_id(), HANG, b"", timeout=60))
            await wait_until(lambda: bool(b.pending_channel_ids()), "the call is pending")
            await a.aclose()
            with pytest.raises(rapace.SessionClosed):
                await wait_for(pending, "the pending call to fail", 5.0)
            await wait_for(b.wait_closed(), "the other end to close")
        finally:
            await a.aclose()
            await b.aclose()

    run(main(), loop=loop)


def test_tcp_nodelay_on_both_ends(twin: Any) -> None:
    async def main() -> None:
        async with (
            serve_service(twin, "tcp://127.0.0.1:0") as (server, svc),
            rapace.connect(str(server.address)) as client,
        ):
            await client.call(1, ECHO, b"x")
            for session in (client, svc.sessions[0]):
                sock = session.transport._transport.get_extra_info("socket")  # type: ignore[attr-defined]
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    run(main())


def test_max_payload_size_option(twin: Any) -> None:
    """Both ends enforce their own maximum, and one oversized message fails one call."""

    async def main() -> None:
        with short_tmpdir() as directory:
            address = listen_address("unix", directory)
            async with (
                serve_service(twin, address, max_payload_size=1024) as (server, _),
                rapace.connect(str(server.address)) as client,
            ):
                assert client.transport.max_payload_size == rapace.wire.DEFAULT_MAX_PAYLOAD_SIZE
                ok = await client.call(1, ECHO, bytes(1024))
                assert len(ok.payload) == 1024
                # The server announced that it takes at most 1024 (Settings): the client
                # refuses more before writing it.
                with pytest.raises(
                    rapace.ResourceExhausted, match="1025 bytes exceeds the peer's maximum of 1024"
                ):
                    await client.call(3, ECHO, bytes(1025), timeout=60)
                assert (await client.call(5, ECHO, b"still up")).payload == b"still up"
            async with (
                serve_service(twin, address) as (server, _),
                rapace.connect(str(server.address), max_payload_size=100) as client,
            ):
                assert (await client.call(1, ECHO, bytes(100))).payload == bytes(100)
                # The client announced 100; the server answered with its own 1 MiB. So the
                # 101-byte request goes out, and the server refuses to send its 101-byte
                # echo back: that one call fails, the connection stays up.
                with pytest.raises(
                    rapace.ResourceExhausted, match="101 bytes exceeds the peer's maximum of 100"
                ):
                    await client.call(3, ECHO, bytes(101), timeout=60)
                with pytest.raises(rapace.ResourceExhausted):
                    await client.notify(ECHO, bytes(1024 * 1024 + 1))
                assert (await client.call(5, ECHO, b"still up")).payload == b"still up"
                assert client.pending_channel_ids() == []

    run(main())


def test_default_maximum_is_one_mib(twin: Any) -> None:
    async def main() -> None:
        with short_tmpdir() as directory:
            async with (
                serve_service(twin, listen_address("unix", directory)) as (server, _),
                rapace.connect(str(server.address)) as client,
            ):
                big = bytes(1 << 20)
                assert (await client.call(1, ECHO, big)).payload == big
                with pytest.raises(rapace.ResourceExhausted, match="maximum of 1048576"):
                    await client.call(3, ECHO, big + b"!", timeout=60)
                assert (await client.call(5, ECHO, b"ok")).payload == b"ok"

    run(main())


def test_run_uses_uvloop_when_installed() -> None:
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    pytest.importorskip("uvloop")
    assert rapace.run(which()).startswith("uvloop")
    assert rapace.run(asyncio.sleep(0, "value")) == "value"
