"""TLS on TCP: ``tls://`` and ``ssl=``, mutual TLS, the peer's certificate, and peers that
get the handshake wrong (garbage, plain TCP either way round, an untrusted or expired or
misnamed certificate, silence): each gets a clear error, the server logs why, and other
connections go on. Certificates are made at test time by ``trustme``.

Every test runs on both twins; those where the TLS layer itself differs (uvloop has its
own) on both loops.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import pytest
import trustme
from net_helpers import (
    ECHO,
    LOOPS,
    Service,
    closed_by_peer,
    run,
    serve_service,
    wait_for,
    wait_until,
)

import rapace
from rapace import Address
from rapace.connection import parse_address
from rapace.transport.stream import StreamTransport

FAST = 3.0
"""Seconds within which a refused or broken connection must be closed."""


@dataclass(frozen=True)
class Certificates:
    ca: trustme.CA
    server: trustme.LeafCert
    client: trustme.LeafCert

    def server_context(self, *, mutual: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(context)
        if mutual:
            self.ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self, *, with_certificate: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if with_certificate:
            self.client.configure_cert(context)
        return context


@pytest.fixture(scope="module")
def certs() -> Certificates:
    ca = trustme.CA()
    return Certificates(
        ca,
        ca.issue_cert("127.0.0.1", "localhost", common_name="rapace-test-server"),
        ca.issue_cert("client.rapace.test", common_name="client-1"),
    )


def rapace_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("rapace") and r.levelno >= logging.WARNING
    ]


async def echo(client: rapace.RpcSession, payload: bytes) -> None:
    response = await wait_for(client.call(client.next_channel_id(), ECHO, payload), "an echo")
    assert response.payload == payload


# -- addresses and arguments ---------------------------------------------------------------


def test_tls_addresses_parse_and_print() -> None:
    assert parse_address("tls://127.0.0.1:0") == Address("tls", host="127.0.0.1", port=0)
    assert parse_address("tls://[::1]:443") == Address("tls", host="::1", port=443)
    assert str(Address("tls", host="::1", port=443)) == "tls://[::1]:443"
    with pytest.raises(ValueError, match="tls address 'tls://h' needs a port"):
        parse_address("tls://h")


def test_tls_arguments_are_checked_before_anything_connects(certs: Certificates) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="a tls:// server needs ssl=SSLContext"):
            await rapace.serve(Service().on_session, "tls://127.0.0.1:0")
        with pytest.raises(ValueError, match="not unix: ones"):
            await rapace.serve(
                Service().on_session, "unix:/tmp/never.sock", ssl=certs.server_context()
            )
        with pytest.raises(ValueError, match="handshake_timeout must be a positive number"):
            await rapace.serve(Service().on_session, "tcp://127.0.0.1:0", handshake_timeout=0)
        with pytest.raises(ValueError, match="for tcp:// and tls:// addresses"):
            rapace.connect("unix:/tmp/never.sock", ssl=certs.client_context())
        with pytest.raises(ValueError, match="server_hostname needs TLS"):
            rapace.connect("tcp://127.0.0.1:1", server_hostname="localhost")
        with pytest.raises(ValueError, match=r"a server needs one made by .*CLIENT_AUTH"):
            await rapace.serve(
                Service().on_session, "tls://127.0.0.1:0", ssl=certs.client_context()
            )
        with pytest.raises(ValueError, match=r"a client needs one made by .*SERVER_AUTH"):
            rapace.connect("tls://127.0.0.1:1", ssl=certs.server_context())
        with pytest.raises(TypeError, match=r"ssl= must be an ssl\.SSLContext, not bool"):
            rapace.connect("tls://127.0.0.1:1", ssl=True)  # type: ignore[arg-type]

    run(main())


# -- working TLS -------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_mutual_tls_calls_and_both_certificates(twin: Any, loop: str, certs: Certificates) -> None:
    """An mTLS server on ``tcp://`` with ``ssl=`` reports a ``tls://`` address; each side's
    session knows the other's verified certificate; calls and tunnels work through it."""
    seen: list[rapace.Peer] = []

    def authorize(peer: rapace.Peer) -> bool:
        seen.append(peer)
        return peer.common_name == "client-1"

    async def main() -> None:
        async with serve_service(
            twin, "tcp://127.0.0.1:0", ssl=certs.server_context(), authorize=authorize
        ) as (server, service):
            assert str(server.address).startswith("tls://127.0.0.1:")
            async with rapace.connect(server.address, ssl=certs.client_context()) as client:
                await echo(client, b"over TLS")
                await echo(client, bytes(range(256)) * 1024)  # many TLS records
                assert client.peer is not None
                assert client.peer.kind == "tls"
                assert client.peer.common_name == "rapace-test-server"
                assert client.peer.certificate_der is not None
                (session,) = service.sessions
                assert session.peer is seen[0]
                assert session.peer.kind == "tls"
                assert session.peer.common_name == "client-1"
                assert session.peer.certificate is not None
                assert ("DNS", "client.rapace.test") in session.peer.certificate["subjectAltName"]
                client_pem = certs.client.cert_chain_pems[0].bytes().decode()
                assert session.peer.certificate_der == ssl.PEM_cert_to_DER_cert(client_pem)

    run(main(), loop=loop)


def test_tls_address_and_server_hostname(twin: Any, certs: Certificates) -> None:
    """``tls://`` needs no ``ssl`` on the server's address kind; the client names the
    certificate's host with ``server_hostname`` when it dials an IP it does not carry."""

    async def main() -> None:
        context = certs.server_context(mutual=False)
        async with serve_service(twin, "tls://127.0.0.1:0", ssl=context) as (server, service):
            address = f"tls://127.0.0.1:{server.address.port}"
            client_context = certs.client_context(with_certificate=False)
            async with rapace.connect(
                address, ssl=client_context, server_hostname="localhost"
            ) as client:
                await echo(client, b"named")
                (session,) = service.sessions
                assert session.peer is not None
                assert session.peer.certificate is None  # not asked for: not verified
                assert session.peer.common_name is None

    run(main())


# -- a client refusing the server --------------------------------------------------------


@pytest.mark.parametrize("problem", ["wrong hostname", "expired", "untrusted"])
def test_the_client_refuses_a_bad_server_certificate(
    twin: Any, problem: str, certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    expected = {
        "wrong hostname": "Hostname mismatch",
        "expired": "certificate has expired",
        "untrusted": "unable to get local issuer certificate",
    }[problem]

    async def main() -> None:
        context = certs.server_context(mutual=False)
        if problem == "expired":
            now = datetime.datetime.now(datetime.UTC)
            expired = certs.ca.issue_cert(
                "127.0.0.1",
                not_before=now - datetime.timedelta(days=10),
                not_after=now - datetime.timedelta(days=1),
            )
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            expired.configure_cert(context)
        async with serve_service(twin, "tls://127.0.0.1:0", ssl=context) as (server, service):
            client_context = certs.client_context(with_certificate=False)
            kwargs: dict[str, Any] = {"ssl": client_context}
            if problem == "wrong hostname":
                kwargs["server_hostname"] = "not-the-server.example"
            elif problem == "untrusted":
                kwargs = {}  # tls:// alone: the system's trust store, which lacks our CA
            with pytest.raises(rapace.ConnectionFailed) as failed:
                await wait_for(rapace.connect(server.address, **kwargs), "the refusal", FAST)
            assert expected in str(failed.value)
            assert str(server.address) in str(failed.value)
            # The server saw a failed handshake, said so, and serves others.
            await wait_until(
                lambda: any("TLS handshake with" in m for m in rapace_warnings(caplog)),
                "the server's log line",
            )
            assert any("does not trust" in m for m in rapace_warnings(caplog))
            assert service.sessions == []
            trusted = certs.client_context(with_certificate=False)
            if problem != "expired":
                async with rapace.connect(server.address, ssl=trusted) as client:
                    await echo(client, b"still serving")

    run(main())


# -- peers that get the handshake wrong --------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("case", ["garbage", "plain rapace client", "silent", "no certificate"])
def test_a_bad_handshake_is_closed_alone(
    twin: Any, loop: str, case: str, certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage, a plain rapace client, a client that says nothing (the handshake timeout)
    and an mTLS client without a certificate: each is closed quickly, with a log line
    that says why, no session is made for it, and a connected client goes on."""
    reason = {
        "garbage": "TLS handshake with 127.0.0.1:",
        "plain rapace client": "TLS handshake with 127.0.0.1:",
        "silent": "SSL handshake is taking longer than 0.3 seconds",
        "no certificate": "certificate",
    }[case]

    async def main() -> None:
        async with serve_service(
            twin, "tls://127.0.0.1:0", ssl=certs.server_context(), handshake_timeout=0.3
        ) as (server, service):
            host, port = server.address.host, server.address.port
            async with rapace.connect(server.address, ssl=certs.client_context()) as good:
                await echo(good, b"before")
                if case == "plain rapace client":
                    async with rapace.connect(f"tcp://{host}:{port}") as plain:
                        with pytest.raises((rapace.SessionClosed, ConnectionError)):
                            await wait_for(
                                plain.call(plain.next_channel_id(), ECHO, b"x"),
                                "the plain client's call to fail",
                                FAST,
                            )
                elif case == "no certificate":
                    # TLS 1.3: the client's handshake may end before the server has
                    # checked its (missing) certificate; then its first call fails, and
                    # says what the server's silent close usually means.
                    try:
                        anonymous = await wait_for(
                            rapace.connect(
                                server.address, ssl=certs.client_context(with_certificate=False)
                            ),
                            "the connection attempt",
                            FAST,
                        )
                    except rapace.ConnectionFailed as exc:
                        assert "certificate" in str(exc)
                    else:
                        async with anonymous:
                            with pytest.raises(
                                (rapace.SessionClosed, ConnectionError),
                                match="requires a client certificate",
                            ):
                                await wait_for(
                                    anonymous.call(anonymous.next_channel_id(), ECHO, b"x"),
                                    "the call without a certificate to fail",
                                    FAST,
                                )
                else:
                    reader, writer = await asyncio.open_connection(host, port)
                    try:
                        if case == "garbage":
                            writer.write(b"\x00\x01garbage, not a ClientHello" * 40)
                            await writer.drain()
                        assert await wait_for(closed_by_peer(reader), "the close", FAST) == b""
                    finally:
                        writer.close()
                await wait_until(
                    lambda: any(reason in m for m in rapace_warnings(caplog)),
                    f"a log line with {reason!r}",
                )
                assert any(
                    "TLS handshake with 127.0.0.1:" in m and "failed" in m
                    for m in rapace_warnings(caplog)
                ), rapace_warnings(caplog)
                assert len(service.sessions) == 1  # only the good client's
                assert service.requests == 1
                await echo(good, b"after")
            async with rapace.connect(server.address, ssl=certs.client_context()) as fresh:
                await echo(fresh, b"fresh")

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_tls_client_to_a_plain_server_fails_clearly(
    twin: Any, loop: str, certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serve_service(twin, "tcp://127.0.0.1:0") as (server, _):
            address = f"tls://127.0.0.1:{server.address.port}"
            async with rapace.connect(server.address) as good:
                with pytest.raises(rapace.ConnectionFailed) as failed:
                    await wait_for(
                        rapace.connect(address, ssl=certs.client_context()), "the failure", FAST
                    )
                assert address in str(failed.value)
                assert "closed the connection during the TLS handshake" in str(failed.value)
                await wait_until(
                    lambda: any("like a TLS handshake" in m for m in rapace_warnings(caplog)),
                    "the server to log the ClientHello it could not read",
                )
                await echo(good, b"unaffected")
                await wait_until(lambda: len(server.sessions) == 1, "the bad session gone")

    run(main(), loop=loop)


def test_the_client_handshake_times_out(twin: Any, certs: Certificates) -> None:
    """A server that accepts and never answers the ClientHello: ``connect`` fails after
    ``handshake_timeout``, naming the address."""

    async def main() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def mute(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)

        mute_server = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = mute_server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(rapace.ConnectionFailed, match=f"tls://127.0.0.1:{port}"):
                await wait_for(
                    rapace.connect(
                        f"tls://127.0.0.1:{port}",
                        ssl=certs.client_context(),
                        handshake_timeout=0.2,
                    ),
                    "the client's handshake timeout",
                    FAST,
                )
        finally:
            for writer in accepted:
                writer.close()
            mute_server.close()
            await mute_server.wait_closed()

    run(main())


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("address", ["tcp://127.0.0.1:0", "tls://127.0.0.1:0"])
def test_a_connection_accepted_as_the_server_closes_is_closed_too(
    twin: Any, loop: str, address: str, certs: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server closes while a connection is being admitted: for TLS, in the very
    callback that accepted it, before its handshake ever started; for plain TCP, as the
    connection is made. Either way the connection (for TLS, rapace's own copy of the
    socket) is closed too, and nothing is left open or un-awaited."""
    servers: list[rapace.Server] = []
    if address.startswith("tls"):
        original_admit = rapace.Server._admit

        def admit_then_close(self: rapace.Server, *args: Any, **kwargs: Any) -> None:
            original_admit(self, *args, **kwargs)
            self.close()

        monkeypatch.setattr(rapace.Server, "_admit", admit_then_close)
    else:
        original_made = StreamTransport.connection_made

        def close_then_made(self: StreamTransport, transport: Any) -> None:
            servers[0].close()
            original_made(self, transport)

        monkeypatch.setattr(StreamTransport, "connection_made", close_then_made)

    async def main() -> None:
        ssl_context = certs.server_context(mutual=False) if address.startswith("tls") else None
        server = await rapace.serve(Service().on_session, address, ssl=ssl_context)
        servers.append(server)
        reader, writer = await asyncio.open_connection(server.address.host, server.address.port)
        try:
            assert await wait_for(closed_by_peer(reader), "the connection to close", FAST) == b""
        finally:
            writer.close()
        await wait_for(server.wait_closed(), "the server to close")
        assert not server.sessions

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_tls_writes_are_joined(twin: Any, loop: str, certs: Certificates) -> None:
    """Frames queued in one loop iteration go out as one write over TLS on either loop
    (uvloop's ``writelines`` would make each frame a TLS record of its own: a fifth of
    the calls/s with 64 in flight, measured), and still as gathered buffers on plain TCP."""

    async def main() -> None:
        async with serve_service(twin, "tls://127.0.0.1:0", ssl=certs.server_context()) as (
            server,
            _,
        ):
            async with rapace.connect(server.address, ssl=certs.client_context()) as client:
                await echo(client, b"joined")
                assert client.transport._gather_writes is False  # type: ignore[attr-defined]
            plain = await rapace.serve(Service().on_session, "tcp://127.0.0.1:0")
            async with plain, rapace.connect(plain.address) as client:
                gathered = client.transport._gather_writes  # type: ignore[attr-defined]
                assert gathered is (loop == "uvloop")

    run(main(), loop=loop)


def test_an_mtls_server_refuses_a_tls12_client_without_a_certificate_in_connect(
    twin: Any, certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    """Under TLS 1.2 the server's refusal ends the client's own handshake: ``connect``
    fails, saying what a handshake cut short can mean."""

    async def main() -> None:
        async with serve_service(twin, "tls://127.0.0.1:0", ssl=certs.server_context()) as (
            server,
            service,
        ):
            context = certs.client_context(with_certificate=False)
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            with pytest.raises(rapace.ConnectionFailed, match="refused this client's certificate"):
                await wait_for(rapace.connect(server.address, ssl=context), "the refusal", FAST)
            await wait_until(
                lambda: any(
                    "PEER_DID_NOT_RETURN_A_CERTIFICATE" in m for m in rapace_warnings(caplog)
                ),
                "the server's log line",
            )
            assert service.sessions == []

    run(main())
