"""WebSocket transport: both framings over real sockets (``ws://``), on both twins.

Our own client against our own server for calls, notifications, server streams and
tunnels; raw picows peers for bad input (text, short messages, bad length prefixes,
oversized messages, unknown subprotocols, plain HTTP), each answered with a close code
or an HTTP status while a good connection beside it keeps working.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trustme
from net_helpers import (
    COUNT,
    DATA,
    ECHO,
    HANG,
    REQUEST,
    Service,
    open_tunnel,
    pattern,
    run,
    serve_service,
    wait_for,
    wait_until,
)

import rapace
from rapace.transport.websocket import MessageCodec, choose_framing
from rapace.wire import FrameError

picows = pytest.importorskip("picows", reason="the WebSocket transport needs rapace[ws]")

FRAMINGS = ("rust", "stream")
URL = "ws://127.0.0.1:0/rapace"


@rapace.service
class Counter:
    async def upto(self, n: rapace.u32) -> AsyncIterator[rapace.u32]: ...

    async def twice(self, n: rapace.i32) -> rapace.i32: ...


class CounterImpl(Counter):
    async def upto(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def twice(self, n: int) -> int:
        if n < 0:
            raise rapace.InvalidArgument("negative")
        return 2 * n


def typed_service(service: Service) -> Any:
    def on_session(session: rapace.RpcSession) -> None:
        service.sessions.append(session)  # (the typed router is its only dispatcher)
        rapace.register_services(session, CounterImpl())

    return on_session


def raw_frame(msg_id: int, channel_id: int, method_id: int, flags: int, payload: bytes) -> bytes:
    """A descriptor built with ``struct`` (not the codec under test) and its payload."""
    inline = len(payload) <= 16
    desc = struct.pack(
        "<QIIIIIIIIQ16s",
        msg_id,
        channel_id,
        method_id,
        0xFFFFFFFF if inline else 0,
        0,
        0,
        len(payload),
        flags,
        0,
        0xFFFFFFFFFFFFFFFF,
        payload if inline else b"",
    )
    return desc + payload


class RawPeer(picows.WSListener):  # type: ignore[misc]
    """A hand-driven WebSocket client: records messages and the close it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[bytes] = []
        self.got_message = asyncio.Event()
        self.closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type == picows.WSMsgType.CLOSE:
            if not self.closed.done():
                self.closed.set_result((frame.get_close_code().value, frame.get_close_reason()))
            transport.disconnect()
        elif frame.msg_type == picows.WSMsgType.BINARY:
            self.messages.append(frame.get_payload_as_bytes())
            self.got_message.set()

    def on_ws_disconnected(self, transport: Any) -> None:
        if not self.closed.done():
            self.closed.set_result((1006, "no close frame"))


async def raw_connect(url: str, protocol: str | None = None) -> tuple[Any, RawPeer]:
    headers = {"Sec-WebSocket-Protocol": protocol} if protocol else None
    ws, peer = await picows.ws_connect(RawPeer, url, extra_headers=headers)
    return ws, peer


# -- the codec alone ---------------------------------------------------------------------


def test_rust_framing_reads_trailing_or_inline_only_payloads(twin: Any) -> None:
    codec = MessageCodec("rust")
    (frame,), _ = codec.decode(raw_frame(7, 3, 9, REQUEST, b"\x04\x06"))  # inline, no tail
    assert (frame.desc.msg_id, frame.payload) == (7, b"\x04\x06")
    desc_only = raw_frame(8, 3, 9, REQUEST, b"")
    (frame,), _ = codec.decode(desc_only + b"ab")  # the Rust sender's trailing copy
    assert frame.payload == b"ab"
    big = pattern(1, 100)
    (frame,), _ = codec.decode(raw_frame(9, 5, 9, REQUEST, big))
    assert frame.payload == big
    # Encoding: one message per frame, descriptor then payload, no length prefix.
    out = codec.encode([frame, frame])
    assert [bytes(m) for m in out] == [raw_frame(9, 5, 9, REQUEST, big)] * 2


def test_stream_framing_joins_frames_into_one_message_and_splits_anywhere(twin: Any) -> None:
    codec = MessageCodec("stream")
    frames = [twin.frame.build_frame(i, 1, 0, DATA, pattern(i, 10 * i)) for i in range(1, 5)]
    (message,) = codec.encode(frames)
    assert bytes(message) == b"".join(twin.frame.encode_frame(f) for f in frames)
    got: list[Any] = []
    for i in range(0, len(message), 7):  # message boundaries mean nothing in this framing
        got += codec.decode(message[i : i + 7])[0]
    assert [f.payload for f in got] == [f.payload for f in frames]


def test_short_or_garbled_messages_are_frame_errors(twin: Any) -> None:
    with pytest.raises(FrameError, match="shorter than the 64-byte descriptor"):
        MessageCodec("rust").decode(b"x" * 63)
    with pytest.raises(FrameError):
        MessageCodec("stream").decode(struct.pack("<I", 10) + b"x" * 10)
    liar = struct.pack("<I", 64 + 5000) + raw_frame(1, 1, 9, REQUEST, b"")  # says 0 bytes
    with pytest.raises(FrameError, match="length prefix"):
        MessageCodec("stream", max_payload_size=1024).decode(liar)


def test_subprotocol_choice() -> None:
    assert choose_framing([], "stream") == ("stream", None)
    assert choose_framing(["x", "rapace.rust"], "stream") == ("rust", "rapace.rust")
    with pytest.raises(ValueError, match=r"unsupported subprotocol nope.*rapace.rust"):
        choose_framing(["nope"], "rust")


def test_ws_address_parsing() -> None:
    address = rapace.connection.parse_address("ws://[::1]:80/a/b?x=1")
    assert (address.kind, address.host, address.port, address.path) == ("ws", "::1", 80, "/a/b?x=1")
    assert str(rapace.connection.parse_address("wss://h:1")) == "wss://h:1/"
    with pytest.raises(ValueError, match="needs a port"):
        rapace.connection.parse_address("ws://host/path")


# -- real sockets --------------------------------------------------------------------------


@pytest.mark.parametrize("framing", FRAMINGS)
def test_calls_notifications_streams_and_tunnels(twin: Any, framing: str) -> None:
    async def main() -> None:
        service = Service(notify_target=50)
        async with (
            serve_service(twin, URL, service, framing=framing) as (server, _),
            rapace.connect(str(server.address), framing=framing) as client,
        ):
            assert server.address.port != 0
            small = await client.call(client.next_channel_id(), ECHO, b"hi")
            assert small.payload == b"hi"
            big = pattern(2, 300_000)
            assert (await client.call(client.next_channel_id(), ECHO, big)).payload == big
            many = await asyncio.gather(
                *(client.call(client.next_channel_id(), ECHO, b"%d" % i) for i in range(64))
            )
            assert [f.payload for f in many] == [b"%d" % i for i in range(64)]
            for i in range(50):
                await client.notify(COUNT, b"n%d" % i)
            await wait_for(service.notify_done, "50 notifications")
            stream = await open_tunnel(client)
            data = pattern(3, 1_000_000)
            stream.write(data)
            stream.write_eof()
            got = bytearray()
            async for chunk in stream:
                got += chunk
            assert bytes(got) == data

    run(main())


@pytest.mark.parametrize("framing", FRAMINGS)
def test_typed_stream_and_error_and_subprotocol_choice(twin: Any, framing: str) -> None:
    """The server's default is Rust; a client asking for the stream framing by
    subprotocol gets it on the same endpoint."""

    async def main() -> None:
        service = Service()
        async with (
            rapace.serve(typed_service(service), URL) as server,
            rapace.connect(str(server.address), framing=framing) as session,
        ):
            counter = rapace.client(Counter, session, timeout=5.0)
            assert await counter.twice(21) == 42
            with pytest.raises(rapace.InvalidArgument, match="negative"):
                await counter.twice(-1)
            assert [n async for n in await counter.upto(100)] == list(range(100))
            (accepted,) = server.sessions
            assert accepted._transport.subprotocol == f"rapace.{framing}"
            assert accepted._transport.codec.framing == framing

    run(main())


def test_many_clients(twin: Any) -> None:
    async def main() -> None:
        async with serve_service(twin, URL, framing="stream") as (server, _):

            async def one(i: int) -> list[bytes]:
                framing = FRAMINGS[i % 2]
                async with rapace.connect(str(server.address), framing=framing) as c:
                    calls = [
                        c.call(c.next_channel_id(), ECHO, b"%d-%d" % (i, j)) for j in range(20)
                    ]
                    return [f.payload for f in await asyncio.gather(*calls)]

            results = await asyncio.gather(*(one(i) for i in range(16)))
            assert results == [[b"%d-%d" % (i, j) for j in range(20)] for i in range(16)]

    run(main())


@pytest.mark.parametrize("framing", FRAMINGS)
def test_server_close_fails_calls_in_flight_fast(twin: Any, framing: str) -> None:
    async def main() -> None:
        service = Service()
        server = await rapace.serve(service.on_session, URL, framing=framing)
        client = await rapace.connect(str(server.address), framing=framing)
        try:
            call = asyncio.ensure_future(client.call(client.next_channel_id(), HANG, b""))
            await wait_for(service.hang_started, "the call to reach the server")
            server.close()
            with pytest.raises(rapace.RpcError):
                await wait_for(call, "the call to fail", timeout=3.0)
            with pytest.raises(rapace.RpcError):
                await client.call(client.next_channel_id(), ECHO, b"x")
        finally:
            await client.aclose()
            server.close()
            await server.wait_closed()

    run(main())


@pytest.mark.parametrize(
    ("framing", "message", "code", "reason"),
    [
        ("rust", "text", 1003, "binary messages only"),
        ("stream", "text", 1003, "binary messages only"),
        ("rust", b"short", 1002, "shorter than the 64-byte descriptor"),
        ("stream", struct.pack("<I", 8) + b"x" * 8, 1002, "shorter"),
        (
            "stream",
            struct.pack("<I", 64 + 5000) + raw_frame(1, 1, ECHO, REQUEST, b""),
            1002,
            "length prefix",
        ),
        ("rust", b"x" * (1024 + 68 + 64 * 1024 + 1), 1009, ""),
    ],
    ids=["text-rust", "text-stream", "short-rust", "short-prefix", "lying-prefix", "too-big"],
)
def test_bad_messages_close_that_connection_only(
    twin: Any, framing: str, message: Any, code: int, reason: str
) -> None:
    async def main() -> None:
        async with (
            serve_service(twin, URL, framing=framing, max_payload_size=1024) as (server, _),
            rapace.connect(str(server.address), framing=framing) as good,
        ):
            ws, peer = await raw_connect(str(server.address))
            if isinstance(message, str):
                ws.send(picows.WSMsgType.TEXT, message.encode())
            else:
                ws.send(picows.WSMsgType.BINARY, message)
            got_code, got_reason = await wait_for(peer.closed, "the server to close")
            assert got_code == code
            assert reason in got_reason
            assert (await good.call(good.next_channel_id(), ECHO, b"ok")).payload == b"ok"

    run(main())


@pytest.mark.parametrize("framing", FRAMINGS)
def test_oversized_frame_fails_one_call(twin: Any, framing: str) -> None:
    """A frame just over the limit is skipped as on TCP (its call fails; the connection
    stays); a message far over it is refused by the WebSocket layer (1009, above)."""

    async def main() -> None:
        async with (
            serve_service(twin, URL, framing=framing, max_payload_size=1024) as (server, _),
            rapace.connect(str(server.address), framing=framing) as client,
        ):
            with pytest.raises(rapace.RpcError):
                await client.call(client.next_channel_id(), ECHO, b"x" * 1025)
            assert (await client.call(client.next_channel_id(), ECHO, b"y")).payload == b"y"

    run(main())


def test_raw_client_with_no_subprotocol_gets_the_default_framing(twin: Any) -> None:
    async def main() -> None:
        for framing in FRAMINGS:
            async with serve_service(twin, URL, framing=framing) as (server, _):
                ws, peer = await raw_connect(str(server.address))
                request = raw_frame(1, 1, ECHO, DATA, b"abc")  # DATA only, like the TS client
                ws.send(
                    picows.WSMsgType.BINARY,
                    request if framing == "rust" else struct.pack("<I", 64) + request[:64],
                )
                await wait_for(peer.got_message, "the answer")
                reply = peer.messages[0]
                if framing == "stream":
                    (length,) = struct.unpack_from("<I", reply)
                    assert length == len(reply) - 4
                    reply = reply[4:]
                msg_id, channel_id, method_id = struct.unpack_from("<QII", reply)
                assert (msg_id, channel_id, method_id) == (1, 1, 0)  # msg_id echoed
                assert reply[64:] == b"abc"
                ws.disconnect()

    run(main())


def test_handshake_refusals(twin: Any) -> None:
    """An unknown subprotocol, another path or a plain HTTP request: a clear refusal."""

    async def main() -> None:
        async with serve_service(twin, URL) as (server, _):
            url = str(server.address)
            with pytest.raises(picows.WSHandshakeError) as refused:
                await raw_connect(url, "graphql-ws")
            assert refused.value.response.status == 400
            assert b"rapace.rust" in (refused.value.response.body or refused.value.raw_body)
            with pytest.raises(picows.WSHandshakeError) as missing:
                await raw_connect(url.replace("/rapace", "/elsewhere"))
            assert missing.value.response.status == 404
            reader, writer = await asyncio.open_connection("127.0.0.1", server.address.port)
            writer.write(b"GET /rapace HTTP/1.1\r\nHost: x\r\n\r\n")
            status = await wait_for(reader.readline(), "an HTTP answer")
            assert status.split()[1].startswith(b"4"), status
            writer.close()
            async with rapace.connect(url) as good:
                assert (await good.call(good.next_channel_id(), ECHO, b"z")).payload == b"z"

    run(main())


def test_a_client_that_never_reads_holds_a_bounded_buffer(twin: Any) -> None:
    """8 MB of answers to a peer that reads nothing: its handlers wait on the socket's
    backpressure while holding their requests, the session stops reading once it holds
    ``max_request_bytes`` of them, so what is buffered for the peer stays under that bound
    plus one flush; other clients are served meanwhile."""

    async def main() -> None:
        async with (
            serve_service(twin, URL, max_request_bytes=1_000_000) as (server, _),
            rapace.connect(str(server.address)) as good,
        ):
            ws, _ = await raw_connect(str(server.address))
            ws.underlying_transport.pause_reading()  # never reads again
            payload = pattern(4, 200_000)
            for i in range(40):
                ws.send(
                    picows.WSMsgType.BINARY, raw_frame(i + 1, 2 * i + 1, ECHO, REQUEST, payload)
                )
            await wait_until(
                lambda: any(s._transport._write_paused for s in server.sessions),
                "the server's writes to the silent peer to pause",
            )
            (stuck,) = [s for s in server.sessions if s._transport._write_paused]
            await wait_until(
                lambda: stuck._transport._read_paused_by_session,
                "the session to stop reading requests it cannot answer",
            )
            held = stuck._transport._raw.get_write_buffer_size() + stuck._transport._out_bytes
            assert held < 1_000_000 + 2 * 262_144, held  # not the 8 MB it was asked for
            assert (await good.call(good.next_channel_id(), ECHO, b"ok")).payload == b"ok"
            ws.disconnect(graceful=False)
            await wait_until(lambda: stuck.is_closed, "the silent peer's session to end")

    run(main())


def test_wss_with_an_ssl_context(twin: Any) -> None:
    ca = trustme.CA()
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ssl)
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)

    async def main() -> None:
        with pytest.raises(ValueError, match="needs ssl"):
            await rapace.serve(Service().on_session, "wss://127.0.0.1:0/rapace")
        async with (
            serve_service(twin, "wss://127.0.0.1:0/rapace", ssl=server_ssl) as (server, _),
            rapace.connect(str(server.address), ssl=client_ssl, framing="stream") as client,
        ):
            assert str(server.address).startswith("wss://")
            big = pattern(5, 100_000)
            assert (await client.call(client.next_channel_id(), ECHO, big)).payload == big

    run(main())
