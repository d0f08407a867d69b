"""Peer identity and admission over real sockets: ``session.peer`` on both sides, Unix
socket credentials, ``serve(authorize=...)`` deciding before any frame is read (and
refusing, raising or stalling without disturbing other connections), Unix socket file
permissions, and the warning for a server open to the network. Both twins.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from typing import Any

import pytest
from net_helpers import (
    ECHO,
    Service,
    run,
    serve_service,
    settle,
    short_tmpdir,
    wait_for,
    wait_until,
)

import rapace
from rapace import connection, security
from rapace.peer import Peer

FAST = 3.0


def rapace_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("rapace") and r.levelno >= logging.WARNING
    ]


async def echo(client: rapace.RpcSession, payload: bytes) -> None:
    response = await wait_for(client.call(client.next_channel_id(), ECHO, payload), "an echo")
    assert response.payload == payload


# -- who is there ------------------------------------------------------------------------


def test_unix_peers_carry_the_kernels_credentials(twin: Any) -> None:
    async def main() -> None:
        with short_tmpdir() as directory:
            async with (
                serve_service(twin, f"unix:{directory}/s.sock") as (_server, service),
                rapace.connect(f"unix:{directory}/s.sock") as client,
            ):
                await echo(client, b"who")
                (session,) = service.sessions
                peer = session.peer
                assert peer is not None
                assert (peer.kind, peer.pid, peer.uid, peer.gid) == (
                    "unix",
                    os.getpid(),
                    os.getuid(),
                    os.getgid(),
                )
                assert peer.certificate is None
                assert f"pid {os.getpid()}" in str(peer)
                assert client.peer is not None
                assert client.peer.kind == "unix"
                assert client.peer.uid == os.getuid()

    run(main())


def test_tcp_peers_name_the_other_end(twin: Any) -> None:
    async def main() -> None:
        async with (
            serve_service(twin, "tcp://127.0.0.1:0") as (server, service),
            rapace.connect(server.address) as client,
        ):
            await echo(client, b"who")
            (session,) = service.sessions
            own = client.transport.describe_peer()  # type: ignore[attr-defined]
            assert own.address == f"127.0.0.1:{server.address.port}"
            assert session.peer is not None
            assert session.peer.kind == "tcp"
            assert session.peer.pid is None
            assert session.peer.address.startswith("127.0.0.1:")
            assert client.peer == own

    run(main())


def test_a_connected_socket_names_its_peer(twin: Any) -> None:
    """``connect(sock)``: a socketpair end is a Unix peer, this very process."""

    async def main() -> None:
        left, right = socket.socketpair()
        async with rapace.connect(left) as a, rapace.connect(right, start_channel_id=2) as b:
            for session in (a, b):
                assert session.peer is not None
                assert (session.peer.kind, session.peer.pid) == ("unix", os.getpid())

    run(main())


def test_a_session_without_a_socket_has_no_peer() -> None:
    async def main() -> None:
        left, _right = rapace.mem_pair()
        assert rapace.RpcSession(left).peer is None

    run(main())


def test_peer_text_and_common_name() -> None:
    certificate = {"subject": ((("countryName", "FR"),), (("commonName", "svc-a"),))}
    peer = Peer("tls", "[::1]:9", certificate=certificate)
    assert peer.common_name == "svc-a"
    assert str(peer) == "tls [::1]:9 CN=svc-a"
    assert Peer("tls", "h:1", certificate={"subject": ()}).common_name is None
    assert str(Peer("unix", "")) == "unix"


# -- authorize ---------------------------------------------------------------------------


def test_authorize_runs_before_any_frame_is_read(twin: Any) -> None:
    """While ``authorize`` (async) is still deciding, the client's call sits unread:
    no handler runs, no session exists; once admitted, the call is answered."""
    asked: list[Peer] = []
    decide: asyncio.Future[bool] | None = None

    async def authorize(peer: Peer) -> bool:
        asked.append(peer)
        assert decide is not None
        return await decide

    async def main() -> None:
        nonlocal decide
        decide = asyncio.get_running_loop().create_future()
        with short_tmpdir() as directory:
            address = f"unix:{directory}/s.sock"
            async with (
                serve_service(twin, address, authorize=authorize) as (server, service),
                rapace.connect(address) as client,
            ):
                call = asyncio.ensure_future(client.call(client.next_channel_id(), ECHO, b"x"))
                await wait_until(lambda: len(asked) == 1, "authorize to be asked")
                assert asked[0].uid == os.getuid()
                await settle()
                assert not call.done()
                assert service.requests == 0
                assert service.sessions == [] and not server.sessions
                decide.set_result(True)
                response = await wait_for(call, "the admitted call")
                assert response.payload == b"x"
                (session,) = service.sessions
                assert session.peer is asked[0]

    run(main())


@pytest.mark.parametrize(
    ("verdict", "reason"),
    [
        ("false", "authorize returned False"),
        ("none", "authorize returned None"),
        ("raises", "authorize raised PermissionError('not you')"),
        ("async raises", "authorize raised PermissionError('not you')"),
        ("stalls", "authorize did not answer within 0.2 s"),
    ],
)
def test_a_refused_connection_is_closed_alone(
    twin: Any, verdict: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The first client is admitted; the second is refused (False, None, raising, or no
    answer in time): it is closed with its reason logged, no frame of it handled, and
    the first goes on, as do new ones."""
    asked = 0

    def authorize(peer: Peer) -> Any:
        nonlocal asked
        asked += 1
        if asked == 1:
            return True
        if verdict == "false":
            return False
        if verdict == "none":
            return None
        if verdict == "raises":
            raise PermissionError("not you")

        async def deciding() -> bool:
            if verdict == "stalls":
                await asyncio.get_running_loop().create_future()
            raise PermissionError("not you")

        return deciding()

    async def main() -> None:
        async with (
            serve_service(
                twin, "tcp://127.0.0.1:0", authorize=authorize, handshake_timeout=0.2
            ) as (server, service),
            rapace.connect(server.address) as good,
        ):
            await echo(good, b"before")
            async with rapace.connect(server.address) as refused:
                with pytest.raises(rapace.SessionClosed):
                    await wait_for(
                        refused.call(refused.next_channel_id(), ECHO, b"x"),
                        "the refused client's call to fail",
                        FAST,
                    )
            assert any(reason in m for m in rapace_warnings(caplog)), rapace_warnings(caplog)
            assert any(
                "refused rapace connection from tcp 127.0.0.1:" in m
                for m in rapace_warnings(caplog)
            )
            assert service.requests == 1
            assert len(service.sessions) == 1
            await echo(good, b"after")

    run(main())


def test_websocket_peers_are_asked_too(twin: Any) -> None:
    """``ws://``: the peer (kind ``ws``) is asked after the upgrade, before a frame."""
    pytest.importorskip("picows", reason="the WebSocket transport needs rapace[ws]")
    asked: list[Peer] = []

    def authorize(peer: Peer) -> bool:
        asked.append(peer)
        return len(asked) == 1

    async def main() -> None:
        address = "ws://127.0.0.1:0/rapace"
        async with serve_service(twin, address, authorize=authorize) as (server, service):
            async with rapace.connect(server.address) as admitted:
                await echo(admitted, b"ws")
                async with rapace.connect(server.address) as refused:
                    with pytest.raises(rapace.SessionClosed):
                        await wait_for(
                            refused.call(refused.next_channel_id(), ECHO, b"x"),
                            "the refused call to fail",
                            FAST,
                        )
                await echo(admitted, b"still")
            assert [peer.kind for peer in asked] == ["ws", "ws"]
            assert asked[0].address.startswith("127.0.0.1:")
            (session,) = service.sessions
            assert session.peer is asked[0]

    run(main())


def test_closing_the_server_stops_connections_being_admitted(twin: Any) -> None:
    """A connection whose ``authorize`` has not answered when the server closes is
    closed with it (nothing waits for the callback)."""
    asked = asyncio.Event()

    async def authorize(peer: Peer) -> bool:
        asked.set()
        await asyncio.get_running_loop().create_future()
        return True

    async def main() -> None:
        server = await rapace.serve(Service().on_session, "tcp://127.0.0.1:0", authorize=authorize)
        reader, writer = await asyncio.open_connection(server.address.host, server.address.port)
        await wait_for(asked, "authorize to be asked")
        server.close()
        await wait_for(server.wait_closed(), "the server to close")
        assert await wait_for(reader.read(), "the connection to close") == b""
        writer.close()

    run(main())


# -- Unix socket files -------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "expected"), [(None, 0o600), (0o660, 0o660)])
def test_unix_socket_files_get_their_mode_whatever_the_umask(
    twin: Any, mode: int | None, expected: int
) -> None:
    async def main() -> None:
        with short_tmpdir() as directory:
            path = f"{directory}/s.sock"
            kwargs = {} if mode is None else {"mode": mode}
            old_umask = os.umask(0)  # the worst case: files would be 0o777
            try:
                server = await rapace.serve(Service().on_session, f"unix:{path}", **kwargs)
            finally:
                os.umask(old_umask)
            try:
                info = os.stat(path)
                assert stat.S_ISSOCK(info.st_mode)
                assert stat.S_IMODE(info.st_mode) == expected
                async with rapace.connect(f"unix:{path}") as client:
                    await client.ping()
            finally:
                server.close()
                await server.wait_closed()

    run(main())


@pytest.mark.parametrize("mode", [0o1000, -1, True, "600"])
def test_a_bad_mode_is_refused(mode: Any) -> None:
    with pytest.raises(ValueError, match="mode must be permission bits"):
        rapace.serve(Service().on_session, "unix:/tmp/never.sock", mode=mode)


# -- a server open to the network --------------------------------------------------------


@pytest.mark.parametrize(
    ("sockname", "exposed"),
    [
        (("127.0.0.1", 5), False),
        (("127.5.5.5", 5), False),
        (("::1", 5, 0, 0), False),
        (("0.0.0.0", 5), True),
        (("::", 5, 0, 0), True),
        (("192.0.2.7", 5), True),
        (("fe80::1%eth0", 5, 0, 2), True),
    ],
)
def test_the_exposure_warning(
    sockname: tuple[Any, ...], exposed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="rapace"):
        assert security.warn_if_exposed("tcp://x:5", [sockname], protected=False) is exposed
        assert security.warn_if_exposed("tcp://x:5", [sockname], protected=True) is False
    warnings = rapace_warnings(caplog)
    assert len(warnings) == int(exposed)
    if exposed:
        assert "without TLS or an authorize hook" in warnings[0]


@pytest.mark.parametrize(
    ("kwargs", "protected"),
    [({}, False), ({"authorize": lambda peer: True}, True)],
)
def test_servers_ask_about_exposure_once_with_what_protects_them(
    twin: Any, kwargs: dict[str, Any], protected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests listen on loopback only: the check itself is tested above; here, that a
    server makes it once, on its listening sockets, knowing whether it is protected."""
    asked: list[tuple[list[Any], bool]] = []

    def record(address: object, socknames: Any, *, protected: bool) -> bool:
        asked.append((list(socknames), protected))
        return False

    monkeypatch.setattr(connection, "warn_if_exposed", record)

    async def main() -> None:
        async with serve_service(twin, "tcp://127.0.0.1:0", **kwargs) as (server, _):
            async with rapace.connect(server.address) as client:
                await echo(client, b"x")
            ((socknames, was_protected),) = asked
            assert socknames == [("127.0.0.1", server.address.port)]
            assert was_protected is protected

    run(main())


def test_a_loopback_server_does_not_warn(twin: Any, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with serve_service(twin, "tcp://127.0.0.1:0") as (server, _):  # noqa: SIM117
            async with rapace.connect(server.address) as client:  # the address is bound first
                await echo(client, b"x")
        assert rapace_warnings(caplog) == []

    run(main())


def test_a_handler_sees_its_callers_peer_in_the_call_context(twin: Any) -> None:
    """``rapace.current_call().peer``: the Unix credentials of the process calling."""

    @rapace.service
    class Who:
        async def uid(self) -> rapace.u32: ...

    class WhoImpl(Who):
        async def uid(self) -> int:
            call = rapace.current_call()
            assert call.peer is call.session.peer
            assert call.peer is not None and call.peer.kind == "unix"
            assert call.peer.pid == os.getpid()
            return call.peer.uid if call.peer.uid is not None else 0

    async def main() -> None:
        with short_tmpdir() as directory:
            address = f"unix:{directory}/s.sock"
            async with (
                rapace.serve(lambda s: rapace.register_services(s, WhoImpl()), address),
                rapace.connect(address) as client,
            ):
                assert await wait_for(rapace.client(Who, client).uid(), "the call") == os.getuid()
        a, b = rapace.mem_pair()
        async with rapace.RpcSession(a, 1) as left, rapace.RpcSession(b, 2) as right:
            seen: list[object] = []

            @rapace.service
            class NoPeer:
                async def look(self) -> None: ...

            class NoPeerImpl(NoPeer):
                async def look(self) -> None:
                    seen.append(rapace.current_call().peer)

            rapace.register_services(right, NoPeerImpl())
            await wait_for(rapace.client(NoPeer, left).look(), "the call")
            assert seen == [None]

    run(main())
