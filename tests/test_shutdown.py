"""Graceful shutdown: calls in flight finish, new calls fail fast with ``Unavailable``, the
listener and its Unix socket file go, and ``rapace.run`` does it on SIGTERM. Both twins,
real sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from net_helpers import (
    KINDS,
    listen_address,
    raw_frame,
    read_raw_frame,
    run,
    short_tmpdir,
    wait_for,
)
from session_helpers import until
from test_examples import EXAMPLES, calculator_server

import rapace
from rapace.wire import FrameFlags, compute_method_id, parse_error_payload

REQUEST = int(FrameFlags.DATA | FrameFlags.EOS)
ERROR = int(FrameFlags.ERROR)
CONTROL = int(FrameFlags.CONTROL)
SLOW = compute_method_id("Test", "slow")
ECHO = compute_method_id("Test", "echo")


class Held:
    """A dispatcher: ``slow`` requests wait for ``release``; ``echo`` answers at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0
        self.all_started = asyncio.Event()
        self.expected = 3
        self.cancelled = asyncio.Event()

    def on_session(self, session: rapace.RpcSession) -> None:
        session.set_dispatcher(self)

    async def __call__(self, frame: Any) -> bytes:
        if frame.desc.method_id == SLOW:
            self.started += 1
            if self.started == self.expected:
                self.all_started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return bytes(frame.payload)


@pytest.mark.parametrize("kind", KINDS)
def test_calls_in_flight_finish_new_ones_fail_fast(twin: Any, kind: str) -> None:
    async def main() -> None:
        held = Held()
        with short_tmpdir() as directory:
            address = listen_address(kind, directory)
            async with rapace.serve(held.on_session, address) as server:  # no await needed
                client = await rapace.connect(str(server.address))
                calls = [
                    asyncio.create_task(client.call(client.next_channel_id(), SLOW, b"%d" % i))
                    for i in range(3)
                ]
                await wait_for(held.all_started.wait(), "three calls in flight")
                stopping = asyncio.create_task(server.shutdown(grace=30))
                forever = asyncio.create_task(server.serve_forever())
                # The server said it takes no new calls: the next one fails at once, locally.
                await until(lambda: client._peer_going_away, "the going-away notice")
                with pytest.raises(rapace.Unavailable):
                    await client.call(client.next_channel_id(), ECHO, b"new")
                if kind == "unix":
                    assert not os.path.exists(address.removeprefix("unix:"))  # noqa: ASYNC240
                with pytest.raises(OSError):
                    await rapace.connect(str(server.address))  # nobody listens any more
                assert not stopping.done()
                held.release.set()
                results = await asyncio.gather(*calls)
                assert [r.payload for r in results] == [b"0", b"1", b"2"]
                await wait_for(stopping, "the shutdown")
                await wait_for(forever, "serve_forever to return")
                await wait_for(client.wait_closed(), "the client to see the end")
                assert not held.cancelled.is_set()

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_calls_past_the_grace_are_answered_unavailable(twin: Any, kind: str) -> None:
    async def main() -> None:
        held = Held()
        held.expected = 1
        with short_tmpdir() as directory:
            async with rapace.serve(held.on_session, listen_address(kind, directory)) as server:
                client = await rapace.connect(str(server.address))
                call = asyncio.create_task(client.call(client.next_channel_id(), SLOW, b""))
                await wait_for(held.all_started.wait(), "the call in flight")
                await wait_for(server.shutdown(grace=0.1), "the shutdown")
                with pytest.raises(rapace.Unavailable, match="shut down before this call"):
                    await call
                assert held.cancelled.is_set()  # the handler saw CancelledError

    run(main())


def test_a_peer_that_ignores_control_frames_sees_refusals(twin: Any) -> None:
    """A client driven by hand (no control channel): the notice arrives and is harmless;
    its new requests are refused with Unavailable; its call in flight is answered."""

    async def main() -> None:
        held = Held()
        held.expected = 1
        with short_tmpdir() as directory:
            address = listen_address("unix", directory)
            async with rapace.serve(held.on_session, address) as server:
                reader, writer = await asyncio.open_unix_connection(address.removeprefix("unix:"))
                writer.write(raw_frame(1, 1, SLOW, REQUEST, b"first"))
                await wait_for(held.all_started.wait(), "the call in flight")
                stopping = asyncio.create_task(server.shutdown(grace=30))
                notice = await wait_for(read_raw_frame(reader), "the going-away notice")
                assert (notice.channel_id, notice.flags, notice.method_id) == (0, CONTROL, 2)
                assert notice.payload == b"\x00\x00"  # CloseChannel(0, Normal)
                writer.write(raw_frame(2, 3, ECHO, REQUEST, b"second"))
                refusal = await wait_for(read_raw_frame(reader), "the refusal")
                assert refusal.channel_id == 3 and refusal.flags & ERROR
                assert isinstance(parse_error_payload(refusal.payload), rapace.Unavailable)
                held.release.set()
                answer = await wait_for(read_raw_frame(reader), "the answer in flight")
                assert (answer.channel_id, answer.payload) == (1, b"first")
                await wait_for(stopping, "the shutdown")
                writer.close()

    run(main())


def test_500_concurrent_unix_connects_are_all_accepted(twin: Any) -> None:
    """The listen backlog (1024 by default; asyncio's is 100) holds a burst of connects."""

    async def main() -> None:
        with short_tmpdir() as directory:
            address = listen_address("unix", directory)
            async with rapace.serve(lambda s: None, address):
                path = address.removeprefix("unix:")
                socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(500)]
                try:
                    for sock in socks:
                        sock.setblocking(False)
                        sock.connect(path)  # raises BlockingIOError when the backlog is full
                finally:
                    for sock in socks:
                        sock.close()

    run(main())


def test_backlog_must_be_positive() -> None:
    with pytest.raises(ValueError, match="backlog must be at least 1"):
        rapace.serve(lambda s: None, "unix:/nonexistent/x.sock", backlog=0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_the_example_server(twin: Any, signum: int, tmp_path: Path) -> None:
    """``rapace.run`` on SIGTERM/SIGINT: the stream in flight (a slow countdown) ends
    whole, the server process exits cleanly, its socket file is gone."""
    env = dict(os.environ)
    if twin.name == "python":
        env["RAPACE_NO_EXTENSIONS"] = "1"
    with short_tmpdir() as directory:
        address = f"unix:{directory}/calc.sock"
        with calculator_server(address, env) as (_, server):
            client = subprocess.Popen(
                [sys.executable, "-c", _COUNTDOWN, address],
                cwd=EXAMPLES,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert client.stdout is not None
            assert client.stdout.readline() == b"5\n"  # the stream is running
            server.send_signal(signum)
            out, err = client.communicate(timeout=20)
            assert client.returncode == 0, err.decode()[-3000:]
            assert out.split() == [b"4", b"3", b"2", b"1", b"0", b"done"]
            server_out, server_err = server.communicate(timeout=20)
            assert server.returncode == 0, server_err.decode()[-3000:]
            assert b"calculator stopped" in server_out
            assert not os.path.exists(address.removeprefix("unix:"))


_COUNTDOWN = """
import sys
import rapace
from calculator import Calculator

async def main(address):
    async with rapace.connect(address) as session:
        calc = rapace.client(Calculator, session, timeout=10)
        async for n in await calc.countdown(5):
            print(n, flush=True)
    print("done", flush=True)

rapace.run(main(sys.argv[1]))
"""
