"""The two child processes of a benchmark run: ``bench-server`` and ``bench-client``.

Each reports on stdout as one JSON line (the server: its bound address, the client: its
figures), along with the rapace core and the loop it runs on, so the driver can refuse a
run whose children are not the build it asked for. A server lives until its stdin closes,
which also happens when the driver dies, so no server outlives its benchmark.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Literal

from rapace.benchmark.floor import run_floor_client, start_floor_server
from rapace.benchmark.rpc import run_rpc_client, start_rpc_server
from rapace.benchmark.shm_floor import run_shm_floor_client, start_shm_floor_server
from rapace.benchmark.workload import Workload, child_info, emit
from rapace.benchmark.ws_floor import run_ws_floor_client, start_ws_floor_server

__all__ = ["Kind", "run_client", "run_server"]

Kind = Literal["floor", "rpc"]


async def _stdin_closed() -> None:
    """Wait for end of file on stdin: the driver's signal to stop."""
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()

    class Watcher(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            if not closed.done():
                closed.set_result(None)

    transport, _ = await loop.connect_read_pipe(Watcher, sys.stdin)
    try:
        await closed
    finally:
        transport.close()


async def run_server(kind: Kind, address: str) -> None:
    """Serve ``kind`` on ``address``, report the bound address, stop when stdin closes."""
    report = child_info()
    if kind == "floor" and address.startswith("shm:"):
        shm_server, shm_address = await start_shm_floor_server(address)
        report["address"] = shm_address
        emit(report)
        async with shm_server:
            await _stdin_closed()
    elif kind == "floor":
        start = start_ws_floor_server if address.startswith("ws://") else start_floor_server
        floor_server, bound = await start(address)
        report["address"] = str(bound)
        emit(report)
        async with floor_server:
            await _stdin_closed()
    else:
        rpc_server = await start_rpc_server(address)
        report["address"] = str(rpc_server.address)
        emit(report)
        async with rpc_server:
            await _stdin_closed()


async def run_client(kind: Kind, address: str, workload: Workload) -> None:
    """Measure against the server at ``address`` and report the figures."""
    if kind == "floor" and address.startswith("shm:"):
        emit(await run_shm_floor_client(address, workload))
    elif kind == "floor":
        run = run_ws_floor_client if address.startswith("ws://") else run_floor_client
        emit(await run(address, workload))
    else:
        emit(await run_rpc_client(address, workload))
