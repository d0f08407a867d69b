"""The floor: a raw ``asyncio.Protocol`` echo with length-prefixed messages and no RPC.

Messages are ``[length: u32 LE][payload]``, the same payload sizes rapace carries. The floor
is written the way a careful hand-rolled protocol would be, so that rapace is compared with
the best plain asyncio does, not with a strawman: messages are parsed in place from the
receive buffer (compacted once per read, not per message) and handed on as ``bytes``; the
server answers everything one read produced with one ``writelines``; the client, like
rapace, sends what its callers queued during one loop iteration in one ``writelines``;
TCP_NODELAY is set. On a ``tls://`` address the same protocol runs over the loop's TLS
(the certificates of ``rapace.benchmark.tls``): the floor of the ``tls`` row, joining each
batch into one write there (each buffer of a ``writelines`` would be a TLS record of its
own), as rapace does.

A connection starts with one mode byte: ``E`` echoes every message back, ``S`` (sink)
counts payload bytes until an empty message, then answers with the 8-byte total.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Final

from rapace.benchmark import tls
from rapace.benchmark.workload import (
    CHUNK_SIZE,
    BenchError,
    Workload,
    bulk_chunk,
    child_info,
    measure_bulk,
    measure_inflight,
    measure_sequential,
)
from rapace.connection import Address, parse_address

__all__ = ["run_floor_client", "start_floor_server"]

_LEN: Final = struct.Struct("<I")
_TOTAL: Final = struct.Struct("<Q")
_MODE_ECHO: Final = b"E"
_MODE_SINK: Final = b"S"
_MAX_MESSAGE: Final = 1 << 20


class _MessageFramer:
    """Splits a byte stream into length-prefixed messages, parsing in place.

    A read that holds whole messages is parsed straight from the bytes received; only an
    incomplete tail is copied into the buffer, which is compacted once per read.
    """

    __slots__ = ("_buffer", "_on_message")

    def __init__(self, on_message: Callable[[bytes], None]) -> None:
        self._buffer = bytearray()
        self._on_message = on_message

    def feed(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer:
            buffer += data
            source: bytes | bytearray = buffer
        else:
            source = data
        end = len(source)
        pos = 0
        unpack_from = _LEN.unpack_from
        on_message = self._on_message
        with memoryview(source) as view:
            while end - pos >= 4:
                (length,) = unpack_from(source, pos)
                if length > _MAX_MESSAGE:
                    raise BenchError(f"floor message of {length} bytes exceeds {_MAX_MESSAGE}")
                stop = pos + 4 + length
                if stop > end:
                    break
                on_message(view[pos + 4 : stop].tobytes())
                pos = stop
        if source is buffer:
            if pos:
                del buffer[:pos]
        elif pos < end:
            buffer += memoryview(data)[pos:]


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _batch_writer(transport: asyncio.Transport) -> Callable[[Sequence[bytes]], None]:
    """How to write a batch on ``transport``: ``writelines``, or over TLS one joined
    write (each buffer would be a record of its own). Chosen once per connection."""
    if transport.get_extra_info("sslcontext") is None:
        return transport.writelines
    return lambda buffers: transport.write(b"".join(buffers))


class _FloorServerProtocol(asyncio.Protocol):
    """One accepted floor connection: echo or sink, chosen by its first byte."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._framer: _MessageFramer | None = None
        self._out: list[bytes] = []
        self._received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._write_batch = _batch_writer(transport)  # type: ignore[arg-type]
        _set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        if self._framer is None:
            mode, data = data[:1], data[1:]
            if mode == _MODE_ECHO:
                self._framer = _MessageFramer(self._echo)
            elif mode == _MODE_SINK:
                self._framer = _MessageFramer(self._count)
            else:
                raise BenchError(f"unknown floor mode byte {mode!r}")
        self._framer.feed(data)
        if self._out:
            out, self._out = self._out, []
            assert self._transport is not None
            self._write_batch(out)

    def _echo(self, message: bytes) -> None:
        self._out.append(_LEN.pack(len(message)) + message)

    def _count(self, message: bytes) -> None:
        if message:
            self._received += len(message)
        else:
            self._out.append(_LEN.pack(_TOTAL.size) + _TOTAL.pack(self._received))


async def start_floor_server(address: str) -> tuple[asyncio.Server, Address]:
    """Listen for floor connections; returns the server and the address it is bound to."""
    loop = asyncio.get_running_loop()
    parsed = parse_address(address)
    if parsed.kind == "unix":
        server = await loop.create_unix_server(_FloorServerProtocol, parsed.path)
        return server, parsed
    context = tls.server_context() if parsed.kind == "tls" else None
    server = await loop.create_server(_FloorServerProtocol, parsed.host, parsed.port, ssl=context)
    port = server.sockets[0].getsockname()[1]
    return server, Address(parsed.kind, host=parsed.host, port=port)


class _FloorClient(asyncio.Protocol):
    """The client end of a floor connection; replies are matched to callers in order."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._framer = _MessageFramer(self._on_message)
        self._waiters: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._write_paused = False
        self._resumed: asyncio.Future[None] | None = None
        self._out: list[bytes] = []

    @classmethod
    async def connect(cls, address: str, mode: bytes) -> _FloorClient:
        loop = asyncio.get_running_loop()
        parsed = parse_address(address)
        if parsed.kind == "unix":
            _, client = await loop.create_unix_connection(cls, parsed.path)
        else:
            context = tls.client_context() if parsed.kind == "tls" else None
            _, client = await loop.create_connection(cls, parsed.host, parsed.port, ssl=context)
        assert client._transport is not None
        client._transport.write(mode)
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._write_batch = _batch_writer(transport)  # type: ignore[arg-type]
        _set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self._framer.feed(data)

    def _on_message(self, message: bytes) -> None:
        if not self._waiters:
            raise BenchError("the floor server sent a message nobody asked for")
        waiter = self._waiters.popleft()
        if not waiter.done():
            waiter.set_result(message)

    def connection_lost(self, exc: Exception | None) -> None:
        error = BenchError(f"the floor connection closed: {exc or 'end of stream'}")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
        self._wake_writer()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    def _request(self, data: bytes) -> asyncio.Future[bytes]:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise BenchError("the floor connection is closed")
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(data)
        return waiter

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and not self._transport.is_closing():
            self._write_batch(out)

    async def echo(self, payload: bytes) -> bytes:
        return await self._request(_LEN.pack(len(payload)) + payload)

    async def send_bulk(self, total: int) -> int:
        """Write ``total`` bytes as ``CHUNK_SIZE`` messages, honouring flow control."""
        transport = self._transport
        assert transport is not None
        chunk = bulk_chunk()
        header = _LEN.pack(len(chunk))
        for _ in range(total // CHUNK_SIZE):
            self._write_batch((header, chunk))
            while self._write_paused and not transport.is_closing():
                self._resumed = self._loop.create_future()
                await self._resumed
        (confirmed,) = _TOTAL.unpack(await self._request(_LEN.pack(0)))
        return int(confirmed)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def run_floor_client(address: str, workload: Workload) -> dict[str, object]:
    """The three measurements against a floor server."""
    echo_client = await _FloorClient.connect(address, _MODE_ECHO)
    sink_client = await _FloorClient.connect(address, _MODE_SINK)
    try:
        report: dict[str, object] = child_info()
        report["sequential"] = await measure_sequential(echo_client.echo, workload)
        report["inflight"] = await measure_inflight(echo_client.echo, workload)
        report["tunnel"] = await measure_bulk(sink_client.send_bulk, workload)
    finally:
        echo_client.close()
        sink_client.close()
    return report
