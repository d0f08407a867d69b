"""Helpers for the typed service tests (``tests/test_service.py``).

- ``KINDS``: the two ways the tests connect a client and a server session: ``"mem"``
  (a ``mem_pair``, on asyncio's loop) and ``"unix"`` (``rapace.serve`` / ``rapace.connect``
  over a Unix socket, on uvloop, the loop ``rapace.run`` uses).
- ``run_kind(kind, coro)``: run a test coroutine on that kind's loop, failing (not
  hanging) after a timeout and on errors the loop reports ("Task exception was never
  retrieved" and friends).
- ``service_env(twin, kind, serve=..., client_serve=...)``: a running client session and
  the server session that accepted it; ``serve(server_session)`` registers the server's
  services before its first request, ``client_serve(client_session)`` the client's own
  (for callbacks from the server).
- ``Capture``: a dispatcher wrapper recording each request frame's method id and
  payload before handing it to the real dispatcher (the raw bytes on the wire).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from net_helpers import run as net_run
from net_helpers import short_tmpdir, wait_for, wait_until
from session_helpers import session_pair

import rapace

T = TypeVar("T")

KINDS = ("mem", "unix")

TEST_TIMEOUT = 15.0


def run_kind(kind: str, coro: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT) -> T:
    """Run ``coro`` on asyncio's loop (``mem``) or on uvloop (``unix``)."""
    assert kind in KINDS, kind
    return net_run(coro, loop="uvloop" if kind == "unix" else "asyncio", timeout=timeout)


@dataclass
class Env:
    client: rapace.RpcSession
    server: rapace.RpcSession
    kind: str

    async def no_tunnels_left(self, what: str = "no tunnel entries remain") -> None:
        """Wait (bounded) until neither side has a registered tunnel."""
        await wait_until(
            lambda: not self.client.tunnel_channel_ids() and not self.server.tunnel_channel_ids(),
            f"{what} (client {self.client.tunnel_channel_ids()}, "
            f"server {self.server.tunnel_channel_ids()})",
        )


ServeFn = Callable[[rapace.RpcSession], Any]


@contextlib.asynccontextmanager
async def service_env(
    twin: Any,
    kind: str,
    *,
    serve: ServeFn,
    client_serve: ServeFn | None = None,
) -> AsyncIterator[Env]:
    """A connected client/server session pair with ``serve`` run on the server session."""
    if kind == "mem":
        async with session_pair(twin) as pair:
            serve(pair.server)
            if client_serve is not None:
                client_serve(pair.client)
            yield Env(pair.client, pair.server, kind)
        return
    assert kind == "unix", kind
    with short_tmpdir() as directory:
        accepted: asyncio.Future[rapace.RpcSession] = asyncio.get_running_loop().create_future()

        def on_session(session: rapace.RpcSession) -> None:
            serve(session)
            if not accepted.done():
                accepted.set_result(session)

        server = await rapace.serve(on_session, f"unix:{directory}/svc.sock")
        try:
            client = await rapace.connect(f"unix:{directory}/svc.sock")
            try:
                if client_serve is not None:
                    client_serve(client)
                server_session = await wait_for(accepted, "the server to accept the client")
                yield Env(client, server_session, kind)
            finally:
                await wait_for(client.aclose(), "the client session to close")
        finally:
            server.close()
            await wait_for(server.wait_closed(), "the server to close")


@dataclass
class Captured:
    method_id: int
    channel_id: int
    flags: int
    payload: bytes


@dataclass
class Capture:
    """Wraps a dispatcher; ``frames`` lists every request it saw, as received."""

    inner: Any
    frames: list[Captured] = field(default_factory=list)

    async def __call__(self, frame: Any) -> Any:
        desc = frame.desc
        self.frames.append(
            Captured(desc.method_id, desc.channel_id, desc.flags, bytes(frame.payload))
        )
        return await self.inner(frame)

    @property
    def payloads(self) -> list[bytes]:
        return [f.payload for f in self.frames]
