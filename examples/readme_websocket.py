"""The README's WebSocket snippet (``tests/test_readme.py`` checks the README shows it
verbatim; ``.ci/run`` type-checks it with ``mypy --strict``)."""

from __future__ import annotations

import ssl

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

import rapace
from rapace.asgi import endpoint


def on_session(session: rapace.RpcSession) -> None:
    """Install the services of each session here (rapace.register_services)."""


async def main() -> None:
    server = await rapace.serve(on_session, "ws://127.0.0.1:8080/rapace")  # framing="rust"
    session = await rapace.connect("ws://127.0.0.1:8080/rapace", framing="stream")
    tls = ssl.create_default_context()
    secure = await rapace.connect("wss://example.org:443/rapace", ssl=tls)
    for each in (session, secure):
        await each.aclose()
    await server.shutdown()


app = Starlette(routes=[WebSocketRoute("/rapace", endpoint(on_session, framing="stream"))])
