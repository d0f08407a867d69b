"""``rapace.asgi``: the example app (``examples/web_app.py``: HTTP routes and the
Calculator on two WebSocket routes) under uvicorn in a child process, on both twins;
our client in both framings, bad input, and a real headless Chromium whose page calls
the service with the browser's own ``WebSocket``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from net_helpers import child_env, run, wait_for

import rapace
import rapace.asgi

pytest.importorskip("starlette", reason="the ASGI example needs rapace[asgi]")
pytest.importorskip("uvicorn", reason="the ASGI example needs rapace[asgi]")
picows = pytest.importorskip("picows", reason="the raw peers need rapace[ws]")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
from calculator import Calculator  # noqa: E402


def read_line(proc: subprocess.Popen[bytes], prefix: str, timeout: float) -> str:
    """The child's first stdout line starting with ``prefix`` (fail after ``timeout``)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(left, 0))
        if not ready:
            proc.kill()
            err = proc.communicate(timeout=5)[1].decode()[-2000:]
            pytest.fail(f"no {prefix!r} line from the app within {timeout} s: {err}")
        line = proc.stdout.readline().decode()
        if not line:
            err = proc.communicate(timeout=5)[1].decode()[-2000:]
            pytest.fail(f"the app exited before printing {prefix!r}: {err}")
        if line.startswith(prefix):
            return line[len(prefix) :].strip()


@contextlib.contextmanager
def web_app(twin_name: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "web_app.py"), "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(twin_name),
    )
    try:
        url = read_line(proc, "READY ", 20.0)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    response = await wait_for(reader.read(), "an HTTP response")
    writer.close()
    status = int(response.split(b" ", 2)[1])
    return status, response.split(b"\r\n\r\n", 1)[1]


class Closes(picows.WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type == picows.WSMsgType.CLOSE and not self.closed.done():
            self.closed.set_result((frame.get_close_code().value, frame.get_close_reason()))
            transport.disconnect()

    def on_ws_disconnected(self, transport: Any) -> None:
        if not self.closed.done():
            self.closed.set_result((1006, ""))


async def calculator_round(session: rapace.RpcSession) -> None:
    calc = rapace.client(Calculator, session, timeout=5.0)
    assert await calc.add(2, 40) == 42
    assert await calc.divide(7, 2) == 3.5
    with pytest.raises(rapace.InvalidArgument, match="division by zero"):
        await calc.divide(1, 0)
    assert [n async for n in await calc.countdown(3)] == [3, 2, 1, 0]


def test_asgi_endpoint_under_uvicorn(twin: Any) -> None:
    with web_app(twin.name) as (_, url):
        port = int(url.rsplit(":", 1)[1].strip("/"))
        ws = f"ws://127.0.0.1:{port}"

        async def main() -> None:
            status, body = await http_get(port, "/")
            assert status == 200
            assert b"HTTP route" in body
            for path, framing in [
                ("/rapace", "rust"),
                ("/rapace-stream", "stream"),
                ("/rapace", "stream"),  # chosen by subprotocol on a Rust-default route
                ("/rapace-stream", "rust"),
            ]:
                async with rapace.connect(ws + path, framing=framing) as session:
                    await calculator_round(session)
            # Many clients at once, both framings.
            async with contextlib.AsyncExitStack() as stack:
                sessions = [
                    await stack.enter_async_context(
                        rapace.connect(ws + "/rapace", framing=("rust", "stream")[i % 2])
                    )
                    for i in range(8)
                ]
                sums = await asyncio.gather(
                    *(rapace.client(Calculator, s).add(i, i) for i, s in enumerate(sessions))
                )
                assert sums == [2 * i for i in range(8)]
            # Bad input: each closed with a clear code and reason; the app serves on.
            for message, code, reason in [
                ("text", 1003, "binary messages only"),
                (b"short", 1002, "shorter than the 64-byte descriptor"),
            ]:
                transport, peer = await picows.ws_connect(Closes, ws + "/rapace")
                kind = (
                    picows.WSMsgType.TEXT if isinstance(message, str) else picows.WSMsgType.BINARY
                )
                transport.send(kind, message.encode() if isinstance(message, str) else message)
                got = await wait_for(peer.closed, "the app to close the connection")
                assert got[0] == code
                assert reason in got[1]
            with pytest.raises(picows.WSHandshakeError) as refused:
                await picows.ws_connect(
                    Closes, ws + "/rapace", extra_headers={"Sec-WebSocket-Protocol": "mqtt"}
                )
            assert refused.value.response.status == 403  # closed before accept: ASGI's 403
            status, _ = await http_get(port, "/rapace")  # plain HTTP on the WebSocket route
            assert status == 404
            async with rapace.connect(ws + "/rapace") as session:
                await calculator_round(session)

        run(main(), timeout=30.0)


def test_plain_http_to_the_endpoint_itself_is_426() -> None:
    """Mounted as a raw ASGI app (not behind a WebSocketRoute), HTTP gets 426."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    app = rapace.asgi.endpoint(lambda session: None)
    asyncio.run(app({"type": "http", "path": "/"}, receive, send))
    assert sent[0]["status"] == 426
    assert b"rapace WebSocket endpoint" in sent[1]["body"]


def test_browser_calls_both_framings(twin: Any) -> None:
    """Headless Chromium loads /browser; its script calls add, divide (and an error) and
    a countdown stream in both framings and posts the results, which the app prints."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if reason := os.environ.get("RAPACE_NO_BROWSER"):
            pytest.skip(f"no browser: {reason}")
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    # (Chromium's helper processes may outlive a kill by a moment: a profile file they
    # still write must not fail the test, which is about the results.)
    profile_dir = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
    with web_app(twin.name) as (proc, url), profile_dir as profile:
        browser = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                url + "browser",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: its helpers end with it
        )
        try:
            results = json.loads(read_line(proc, "BROWSER-RESULT ", 60.0))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGKILL)
            browser.wait(timeout=10)
    expected = {
        "add": 42,
        "add_negative": -300007,
        "divide": 3.5,
        "error": {"code": 3, "message": "division by zero"},
        "countdown": [3, 2, 1, 0],
    }
    for name, protocol in [
        ("rust", ""),
        ("stream", ""),
        ("stream_by_subprotocol", "rapace.stream"),
    ]:
        assert results[name] == {**expected, "protocol": protocol}, name
