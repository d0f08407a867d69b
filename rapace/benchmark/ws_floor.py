"""The WebSocket floor: a raw picows echo (the library rapace's ``ws://`` runs on), no RPC.

One binary message per payload, the same sizes rapace carries. Written as a careful
hand-rolled protocol would be, and as the stream floor is (``floor.py``): the server
answers from the frame callback (picows parses in place); the client, like rapace, sends
what its callers queued during one loop iteration together (one ``call_soon`` flush) and
matches replies in order. Path ``/echo``
echoes every message; ``/sink`` counts payload bytes until an empty message, then answers
with the 8-byte total.
"""

from __future__ import annotations

import asyncio
import collections
import struct
from typing import Any, Final

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
from rapace.transport.websocket import ListenerBase, require_picows

__all__ = ["run_ws_floor_client", "start_ws_floor_server"]

_TOTAL: Final = struct.Struct("<Q")
_MAX_MESSAGE: Final = 2 << 20


async def start_ws_floor_server(address: str) -> tuple[asyncio.Server, Address]:
    """Listen for floor connections on ``ws://host:port/``; returns the bound address."""
    picows = require_picows()
    binary = picows.WSMsgType.BINARY

    class Echo(ListenerBase):
        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type == binary:
                transport.send(binary, frame.get_payload_as_memoryview())
            elif frame.msg_type == picows.WSMsgType.CLOSE:
                transport.disconnect()

    class Sink(ListenerBase):
        received = 0

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type == binary:
                size = frame.payload_size
                if size:
                    self.received += size
                else:
                    transport.send(binary, _TOTAL.pack(self.received))
            elif frame.msg_type == picows.WSMsgType.CLOSE:
                transport.disconnect()

    def route(request: Any) -> Any:
        return Sink() if request.path.endswith(b"/sink") else Echo()

    parsed = parse_address(address)
    server: asyncio.Server = await picows.ws_create_server(
        route, parsed.host, parsed.port, max_frame_size=_MAX_MESSAGE
    )
    port = server.sockets[0].getsockname()[1]
    return server, Address("ws", host=parsed.host, port=port, path="/")


class _FloorClient:
    def __init__(self) -> None:
        self._waiters: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._ws: Any = None
        self._out: list[bytes] = []

    @classmethod
    async def connect(cls, url: str) -> _FloorClient:
        picows = require_picows()
        client = cls()
        binary = picows.WSMsgType.BINARY
        waiters = client._waiters

        class Listener(ListenerBase):
            write_paused = False
            resumed: asyncio.Future[None] | None = None

            def on_ws_frame(self, transport: Any, frame: Any) -> None:
                if frame.msg_type == binary:
                    if not waiters:
                        raise BenchError("the floor server sent a message nobody asked for")
                    waiter = waiters.popleft()
                    if not waiter.done():
                        waiter.set_result(frame.get_payload_as_bytes())

            def on_ws_disconnected(self, transport: Any) -> None:
                while waiters:
                    waiter = waiters.popleft()
                    if not waiter.done():
                        waiter.set_exception(BenchError("the floor WebSocket closed"))

            def pause_writing(self) -> None:
                self.write_paused = True

            def resume_writing(self) -> None:
                self.write_paused = False
                if self.resumed is not None and not self.resumed.done():
                    self.resumed.set_result(None)

        client._ws, client._listener = await picows.ws_connect(
            Listener, url, max_frame_size=_MAX_MESSAGE
        )
        client._binary = binary
        return client

    _listener: Any
    _binary: Any

    async def echo(self, payload: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(payload)
        result: bytes = await waiter
        return result

    def _flush(self) -> None:
        out, self._out = self._out, []
        send, binary = self._ws.send, self._binary
        for payload in out:
            send(binary, payload)

    async def send_bulk(self, total: int) -> int:
        chunk = bulk_chunk()
        listener = self._listener
        loop = asyncio.get_running_loop()
        for _ in range(total // CHUNK_SIZE):
            self._ws.send(self._binary, chunk)
            while listener.write_paused:
                listener.resumed = loop.create_future()
                await listener.resumed
        (confirmed,) = _TOTAL.unpack(await self.echo(b""))
        return int(confirmed)

    def close(self) -> None:
        self._ws.disconnect()


async def run_ws_floor_client(address: str, workload: Workload) -> dict[str, object]:
    """The three measurements against a WebSocket floor server."""
    base = address.rstrip("/")
    echo_client = await _FloorClient.connect(base + "/echo")
    sink_client = await _FloorClient.connect(base + "/sink")
    try:
        report: dict[str, object] = child_info()
        report["sequential"] = await measure_sequential(echo_client.echo, workload)
        report["inflight"] = await measure_inflight(echo_client.echo, workload)
        report["tunnel"] = await measure_bulk(sink_client.send_bulk, workload)
    finally:
        echo_client.close()
        sink_client.close()
    return report
