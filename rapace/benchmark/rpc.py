"""The rapace side of the benchmark: an echo method and a tunnel sink over real sessions.

The server's ``echo`` method returns the request payload. Its ``tunnel`` method opens a
``TunnelStream`` on a fresh channel, answers with that channel id, then reads the tunnel to
its end and writes back the byte count before closing: the client stops its clock only on
that confirmation, so the figure is bytes the server really received.

``RAPACE_BENCH_KEEPALIVE`` (seconds, or ``off``) sets both sides' keepalive, to measure
what it costs (unset: the ``connect``/``serve`` defaults).
"""

from __future__ import annotations

import asyncio
import os
import struct
from typing import TYPE_CHECKING, Any, Final

import rapace
from rapace.benchmark import tls
from rapace.benchmark.workload import (
    BenchError,
    Workload,
    bulk_chunk,
    child_info,
    measure_bulk,
    measure_inflight,
    measure_sequential,
)
from rapace.errors import Unimplemented
from rapace.method_id import compute_method_id

if TYPE_CHECKING:
    from rapace._frame_py import Frame

__all__ = ["ECHO_METHOD", "TUNNEL_METHOD", "run_rpc_client", "start_rpc_server"]

ECHO_METHOD: Final = compute_method_id("RapaceBench", "echo")
TUNNEL_METHOD: Final = compute_method_id("RapaceBench", "tunnel")

_CHANNEL: Final = struct.Struct("<I")
_TOTAL: Final = struct.Struct("<Q")
_READ_SIZE: Final = 1 << 20


def _keepalive_options() -> dict[str, Any]:
    """The keepalive ``RAPACE_BENCH_KEEPALIVE`` asks for (nothing: the defaults)."""
    value = os.environ.get("RAPACE_BENCH_KEEPALIVE", "").strip()
    if not value:
        return {}
    if value == "off":
        return {"keepalive": None}
    try:
        return {"keepalive": float(value)}
    except ValueError:
        raise BenchError(f"RAPACE_BENCH_KEEPALIVE={value!r}: seconds or 'off'") from None


def _tls(address: str, server: bool) -> dict[str, Any]:
    """``ssl=`` for a ``tls://`` address (the run's certificates), else nothing."""
    if not address.startswith("tls://"):
        return {}
    return {"ssl": tls.server_context() if server else tls.client_context()}


async def _sink(stream: rapace.TunnelStream) -> None:
    """Count what arrives on the tunnel, then confirm the count and close."""
    async with stream:
        received = 0
        while data := await stream.read(_READ_SIZE):
            received += len(data)
        stream.write(_TOTAL.pack(received))
        stream.write_eof()


async def start_rpc_server(address: str) -> rapace.Server:
    """Serve the benchmark's two methods on ``address``."""
    sinks: set[asyncio.Task[None]] = set()

    def on_session(session: rapace.RpcSession) -> None:
        async def dispatch(frame: Frame) -> bytes:
            method_id = frame.desc.method_id
            if method_id == ECHO_METHOD:
                return frame.payload
            if method_id == TUNNEL_METHOD:
                stream = session.open_tunnel_stream()
                task = asyncio.get_running_loop().create_task(_sink(stream))
                sinks.add(task)
                task.add_done_callback(sinks.discard)
                return _CHANNEL.pack(stream.channel_id)
            raise Unimplemented(f"the benchmark server has no method {method_id:#010x}")

        session.set_dispatcher(dispatch)

    return await rapace.serve(on_session, address, **_keepalive_options(), **_tls(address, True))


async def run_rpc_client(address: str, workload: Workload) -> dict[str, object]:
    """The three measurements against a rapace benchmark server."""
    options = {**_keepalive_options(), **_tls(address, False)}
    async with rapace.connect(address, **options) as session:
        call = session.call
        next_channel_id = session.next_channel_id

        async def echo(payload: bytes) -> bytes:
            return (await call(next_channel_id(), ECHO_METHOD, payload)).payload

        report: dict[str, object] = child_info()
        report["sequential"] = await measure_sequential(echo, workload)
        report["inflight"] = await measure_inflight(echo, workload)

        reply = await call(next_channel_id(), TUNNEL_METHOD, b"")
        (channel_id,) = _CHANNEL.unpack(reply.payload)
        async with session.tunnel_stream(channel_id) as stream:

            async def send_through_tunnel(total: int) -> int:
                chunk = bulk_chunk()
                for _ in range(total // len(chunk)):
                    stream.write(chunk)
                    await stream.drain()
                stream.write_eof()
                try:
                    confirmation = await stream.readexactly(_TOTAL.size)
                except asyncio.IncompleteReadError as exc:
                    raise BenchError("the server closed the tunnel without confirming") from exc
                return int(_TOTAL.unpack(confirmation)[0])

            report["tunnel"] = await measure_bulk(send_through_tunnel, workload)
    return report
