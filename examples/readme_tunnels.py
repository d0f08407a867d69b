"""The README's named-tunnel snippet (``tests/test_readme.py`` checks the README shows it
verbatim; ``.ci/run`` type-checks it with ``mypy --strict``)."""

from __future__ import annotations

import rapace


async def shell(stream: rapace.TunnelStream, metadata: list[tuple[str, bytes]]) -> None:
    async for data in stream:  # metadata: the opener's (key, value) pairs
        stream.write(data)  # returning closes the tunnel; raising aborts it


async def open_shell(
    server_session: rapace.RpcSession, client_session: rapace.RpcSession
) -> rapace.TunnelStream:
    server_session.set_tunnel_handler("Shell.run", shell)
    return await client_session.open_tunnel("Shell.run", {"user": b"ann"})
