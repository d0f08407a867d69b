"""Calls in both directions, a notification, a named tunnel and a graceful shutdown, in
one process: ``python examples/two_way.py`` (``tests/test_examples.py`` runs it).

The client offers a ``Progress`` service the server calls back while it works on a job;
``connect(services=[...])`` installs it before the first frame, so the server may call it
from its very first handler. The client tells the server about itself with a
notification (no answer), opens a ``Shell.run`` tunnel, then the server shuts down
gracefully: the call in flight finishes, a new one is refused with ``Unavailable``.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import rapace

ADDRESS = "tcp://127.0.0.1:0"


@rapace.service
class Jobs(Protocol):
    async def run(self, steps: rapace.u32) -> str: ...
    async def hello(self, client_name: str) -> None: ...
    async def shell(self) -> rapace.Tunnel: ...


@rapace.service
class Progress(Protocol):
    async def report(self, done: rapace.u32, total: rapace.u32) -> None: ...


class JobsImpl(Jobs):
    def __init__(self, session: rapace.RpcSession, greeted: asyncio.Event) -> None:
        self._progress = rapace.client(Progress, session, timeout=5.0)  # the caller's service
        self._greeted = greeted

    async def run(self, steps: int) -> str:
        for done in range(1, steps + 1):
            await self._progress.report(done, steps)  # a call back to the client
        return f"ran {steps} steps"

    async def hello(self, client_name: str) -> None:
        print(f"server: notified by {client_name}")  # a notification's result is dropped
        self._greeted.set()

    async def shell(self, tunnel: rapace.Tunnel) -> None:  # type: ignore[override]
        async for data in tunnel:
            tunnel.write(data.upper())


class ProgressImpl(Progress):
    async def report(self, done: int, total: int) -> None:
        print(f"client: progress {done}/{total}")


async def main() -> None:
    greeted = asyncio.Event()

    def on_session(session: rapace.RpcSession) -> None:
        rapace.register_services(session, JobsImpl(session, greeted))

    server = await rapace.serve(on_session, ADDRESS)
    async with rapace.connect(server.address, services=[ProgressImpl()]) as session:
        jobs = rapace.client(Jobs, session, timeout=5.0)
        print("client:", await jobs.run(3))

        hello = rapace.wire.compute_method_id("Jobs", "hello")
        await session.notify(hello, rapace.postcard.dumps("two_way.py", str))
        await greeted.wait()

        tunnel = await jobs.shell()
        tunnel.write(b"echo me")
        print("client: tunnel says", (await tunnel.read(7)).decode())
        tunnel.close()

        await server.shutdown(grace=5.0)  # what rapace.run() does on SIGTERM
        try:
            await jobs.run(1)
        except (rapace.Unavailable, rapace.SessionClosed) as exc:
            print(f"client: after shutdown: {type(exc).__name__}")


if __name__ == "__main__":
    rapace.run(main())
