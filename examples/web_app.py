"""HTTP routes and a rapace service in one ASGI app under uvicorn.

Run it (``pip install 'rapace[asgi]'``)::

    python examples/web_app.py 8000

then open http://127.0.0.1:8000/ for an HTTP route, http://127.0.0.1:8000/browser for a
page whose script calls the Calculator over the browser's own WebSocket in both framings,
or call it from Python: ``python examples/calculator_client.py ws://127.0.0.1:8000/rapace``.

- ``/rapace``: the Rust framing by default (one message per frame);
- ``/rapace-stream``: the stream framing by default (rapace's TypeScript client);
- on either, a client may pick one by subprotocol: ``rapace.rust`` or ``rapace.stream``.

The page posts what it saw to ``/browser/result``; the app prints it as one line,
``BROWSER-RESULT {...}``, which the browser test reads.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from calculator_server import CalculatorImpl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute

import rapace
import rapace.asgi

PAGE = Path(__file__).resolve().parent / "web_page.html"


class QuickCalculator(CalculatorImpl):
    async def countdown(self, start: int) -> AsyncIterator[int]:
        for n in range(start, -1, -1):
            yield n


def on_session(session: rapace.RpcSession) -> None:
    rapace.register_services(session, QuickCalculator())


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse(
        "an HTTP route, next to the rapace endpoints /rapace and /rapace-stream\n"
    )


async def browser_page(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE.read_text())


async def browser_result(request: Request) -> PlainTextResponse:
    result = await request.json()
    print("BROWSER-RESULT", json.dumps(result, sort_keys=True), flush=True)
    return PlainTextResponse("thanks\n")


app = Starlette(
    routes=[
        Route("/", home),
        Route("/browser", browser_page),
        Route("/browser/result", browser_result, methods=["POST"]),
        WebSocketRoute("/rapace", rapace.asgi.endpoint(on_session, framing="rust")),
        WebSocketRoute("/rapace-stream", rapace.asgi.endpoint(on_session, framing="stream")),
    ]
)


def main(port: int) -> None:
    """Serve on 127.0.0.1:``port`` (0: a free port); print ``READY <url>`` once listening."""
    sock = socket.create_server(("127.0.0.1", port))
    print(f"READY http://127.0.0.1:{sock.getsockname()[1]}/", flush=True)
    config = uvicorn.Config(app, log_level="warning")
    rapace.run(uvicorn.Server(config).serve(sockets=[sock]))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
