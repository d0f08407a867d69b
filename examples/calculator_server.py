"""Serve the Calculator on a Unix socket: `python examples/calculator_server.py`."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

from calculator import ADDRESS, Calculator

import rapace


class CalculatorImpl(Calculator):
    async def add(self, a: int, b: int) -> int:
        return a + b

    async def divide(self, a: int, b: int) -> float:
        if b == 0:
            raise rapace.InvalidArgument("division by zero")
        return a / b

    async def countdown(self, start: int) -> AsyncIterator[int]:
        for n in range(start, -1, -1):
            yield n
            await asyncio.sleep(0.2)  # a slow producer, to watch the stream arrive


async def main(address: str) -> None:
    def on_session(session: rapace.RpcSession) -> None:
        rapace.register_services(session, CalculatorImpl())

    async with rapace.serve(on_session, address) as server:
        print(f"calculator serving on {server.address} ({rapace.IMPLEMENTATION} core)", flush=True)
        # Until SIGTERM or Ctrl-C: rapace.run() then drains the server (calls in flight
        # finish, new ones are refused with Unavailable) and this returns.
        await server.serve_forever()
    print("calculator stopped", flush=True)


if __name__ == "__main__":
    rapace.run(main(sys.argv[1] if len(sys.argv) > 1 else ADDRESS), shutdown_grace=5.0)
