"""Helpers for the real-socket tests (stream transport, connect/serve, bad peers).

- ``run(coro, loop=...)``: run a test coroutine on uvloop (``rapace.run``'s loop) or on
  asyncio's own loop, failing (not hanging) after a timeout, and failing when the loop
  reports an error nobody retrieved ("Task exception was never retrieved" and friends).
- ``Service``: an in-process dispatcher with echo, hang, tunnel and notification methods,
  recording what it saw; ``serve_service`` starts a real server with it.
- ``spawn``: a child process running this file (``serve ADDRESS`` or ``call ADDRESS``),
  on the compiled or the pure twin; it is always killed on exit.
- Raw wire bytes built with ``struct`` (independently of the codec under test) and a raw
  frame reader for hand-written peers.

Run as a script, this file is the child: ``python net_helpers.py serve ADDRESS`` prints
``READY <address> <implementation> <pid>`` and serves until killed (or until its stdin
closes, so an orphaned child never outlives the test run); ``call ADDRESS`` connects,
prints ``READY``, and makes one call to ``HANG`` that never returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import rapace
from rapace.wire import FrameFlags, compute_method_id

T = TypeVar("T")

DATA = int(FrameFlags.DATA)
EOS = int(FrameFlags.EOS)
ERROR = int(FrameFlags.ERROR)
NO_REPLY = int(FrameFlags.NO_REPLY)
CONTROL = int(FrameFlags.CONTROL)
REQUEST = DATA | EOS
NOTIFY = DATA | EOS | NO_REPLY
INLINE_SLOT = 0xFFFFFFFF
NO_DEADLINE = 0xFFFFFFFFFFFFFFFF

ECHO = compute_method_id("NetTest", "echo")
YIELD_ECHO = compute_method_id("NetTest", "yield_echo")
HANG = compute_method_id("NetTest", "hang")
HANG_CANCELLED = compute_method_id("NetTest", "hang_cancelled")
PID = compute_method_id("NetTest", "pid")
OPEN_TUNNEL = compute_method_id("NetTest", "open_tunnel")
COUNT = compute_method_id("NetTest", "count")
UNKNOWN = compute_method_id("NetTest", "no_such_method")

TEST_TIMEOUT = 10.0
"""Seconds a test may run before it counts as a hang."""

LOOPS = ("uvloop", "asyncio")
KINDS = ("unix", "tcp")

HERE = Path(__file__).resolve().parent


# -- running ---------------------------------------------------------------------------


def _loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if loop == "uvloop":
        factory = rapace.runner.uvloop_factory()
        if factory is None:
            import pytest  # noqa: PLC0415

            pytest.skip("uvloop is not installed")
        return factory
    assert loop == "asyncio", loop
    return None


def run(coro: Coroutine[Any, Any, T], *, loop: str = "uvloop", timeout: float = TEST_TIMEOUT) -> T:
    """Run ``coro`` on a fresh loop; fail after ``timeout`` s or on unretrieved loop errors."""
    from session_helpers import run as run_guarded  # noqa: PLC0415  (pytest: not in children)

    return run_guarded(coro, timeout, loop_factory=_loop_factory(loop))


async def wait_for(aw: Any, what: str, timeout: float = 5.0) -> Any:
    """Await an event, future or coroutine; fail with ``what`` instead of hanging."""
    import pytest  # noqa: PLC0415

    try:
        async with asyncio.timeout(timeout):
            if isinstance(aw, asyncio.Event):
                await aw.wait()
                return None
            return await aw
    except TimeoutError:
        pytest.fail(f"timed out after {timeout} s waiting for {what}")


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``predicate`` (bounded) for a state change that no event reports."""
    import pytest  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        await asyncio.sleep(0.002)


def run_program(program: str, cwd: Path) -> str:
    """Run ``program`` (Python source) in a fresh interpreter that imports this rapace;
    its standard output, stripped (it must exit 0)."""
    root = str(Path(rapace.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def settle(iterations: int = 20) -> None:
    """Let the loop run a few iterations (to show that something does NOT happen)."""
    for _ in range(iterations):
        await asyncio.sleep(0)


@contextlib.contextmanager
def short_tmpdir() -> Iterator[str]:
    """A short temporary directory (Unix socket paths are limited to ~107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="rpn", dir="/tmp") as path:
        yield path


def listen_address(kind: str, directory: str, name: str = "s.sock") -> str:
    if kind == "unix":
        return f"unix:{directory}/{name}"
    assert kind == "tcp", kind
    return "tcp://127.0.0.1:0"


# -- an in-process service ---------------------------------------------------------------


@dataclass
class Service:
    """A dispatcher factory recording what every session it served saw."""

    sessions: list[rapace.RpcSession] = field(default_factory=list)
    requests: int = 0
    hanging: int = 0
    hang_started: asyncio.Event = field(default_factory=asyncio.Event)
    hang_cancelled: int = 0
    hang_cancel_waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)
    hang_target: int = 1
    notifications: int = 0
    notified_bytes: int = 0
    notify_target: int = 0
    notify_done: asyncio.Event = field(default_factory=asyncio.Event)
    tunnel_tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    tunnel_streams: list[Any] = field(default_factory=list)
    on_tunnel: Callable[[rapace.RpcSession, int], Coroutine[Any, Any, Any]] | None = None
    """Called (synchronously, before the answer) to register the channel; returns the
    coroutine that then serves it in a task."""

    def on_session(self, session: rapace.RpcSession) -> None:
        self.sessions.append(session)
        session.set_tunnel_handler("NetTest.echo", named_echo)
        session.set_tunnel_handler("NetTest.refuse", named_abort)

        async def dispatch(frame: Any) -> bytes:
            return await self.handle(session, frame)

        session.set_dispatcher(dispatch)

    async def handle(self, session: rapace.RpcSession, frame: Any) -> bytes:
        method_id = frame.desc.method_id
        self.requests += 1
        if method_id == ECHO:
            return frame.payload
        if method_id == YIELD_ECHO:
            await asyncio.sleep(0)
            return frame.payload
        if method_id == PID:
            return str(os.getpid()).encode()
        if method_id == COUNT:
            self.notifications += 1
            self.notified_bytes += len(frame.payload)
            if self.notify_target and self.notifications >= self.notify_target:
                self.notify_done.set()
            return b""
        if method_id == HANG:
            self.hanging += 1
            if self.hanging >= self.hang_target:
                self.hang_started.set()
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                self.hang_cancelled += 1
                for target, waiter in self.hang_cancel_waiters:
                    if target <= self.hang_cancelled and not waiter.done():
                        waiter.set_result(None)
                raise
            raise AssertionError("unreachable")
        if method_id == HANG_CANCELLED:  # wait until that many HANG handlers were cancelled
            waiter = asyncio.get_running_loop().create_future()
            self.hang_cancel_waiters.append((frame.payload[0], waiter))
            if self.hang_cancelled >= frame.payload[0]:
                waiter.set_result(None)
            await asyncio.wait_for(waiter, 5.0)
            return str(self.hang_cancelled).encode()
        if method_id == OPEN_TUNNEL:
            (channel_id,) = struct.unpack("<I", frame.payload)
            if self.on_tunnel is None:
                stream = session.tunnel_stream(channel_id)
                self.tunnel_streams.append(stream)
                task = asyncio.get_running_loop().create_task(echo_tunnel(stream))
            else:
                task = asyncio.get_running_loop().create_task(self.on_tunnel(session, channel_id))
            self.tunnel_tasks.append(task)
            return b"ok"
        raise rapace.Unimplemented(f"unknown method_id: {method_id}")


async def named_echo(stream: Any, metadata: list[tuple[str, bytes]]) -> None:
    """A named tunnel: the metadata first (``key=value`` lines), then every byte back."""
    stream.write(b"".join(b"%s=%s\n" % (key.encode(), value) for key, value in metadata))
    await echo_tunnel(stream)


async def named_abort(stream: Any, metadata: list[tuple[str, bytes]]) -> None:
    """A named tunnel that reads one line, then aborts with it as the reason."""
    line = await stream.readline()
    stream.abort(f"refused: {line.decode().strip()}")


async def echo_tunnel(stream: Any) -> None:
    """Send back every byte received, then half-close at the peer's EOF."""
    async for chunk in stream:
        stream.write(chunk)
        await stream.drain()
    stream.write_eof()
    await stream.drain()


async def open_tunnel(client: rapace.RpcSession) -> Any:
    """Open a tunnel the server side registers before we write (no chunk can be dropped)."""
    stream = client.open_tunnel_stream()
    await client.call(client.next_channel_id(), OPEN_TUNNEL, struct.pack("<I", stream.channel_id))
    return stream


@contextlib.asynccontextmanager
async def serve_service(
    twin: Any, address: str, service: Service | None = None, **kwargs: Any
) -> Any:
    service = service or Service()
    server = await rapace.serve(service.on_session, address, **kwargs)
    try:
        yield server, service
    finally:
        server.close()
        await wait_for(server.wait_closed(), "the server to close")


def pattern(seed: int, size: int) -> bytes:
    """Deterministic, incompressible-looking bytes (a sha256 counter stream)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:size])


# -- child processes -------------------------------------------------------------------


class Child(NamedTuple):
    proc: subprocess.Popen[bytes]
    address: str
    implementation: str
    pid: int


def child_env(twin_name: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAPACE_NO_EXTENSIONS", None)
    if twin_name == "python":
        env["RAPACE_NO_EXTENSIONS"] = "1"
    return env


@contextlib.contextmanager
def spawn(twin_name: str, *args: str, ready_timeout: float = 10.0) -> Iterator[Child]:
    """Start this file as a child on the given twin; wait for READY; always kill it."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "net_helpers.py"), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(twin_name),
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], ready_timeout)
        line = proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY "):
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise AssertionError(f"the child did not start: {line!r} {err.decode()[-2000:]}")
        _, address, implementation, pid = line.split()
        yield Child(proc, address, implementation, int(pid))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _die_with_parent() -> None:
    """The child exits when its stdin closes (the test process went away)."""

    def watch() -> None:
        with contextlib.suppress(Exception):
            sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


async def _child_serve(address: str) -> None:
    service = Service()
    server = await rapace.serve(service.on_session, address)
    print(f"READY {server.address} {rapace.IMPLEMENTATION} {os.getpid()}", flush=True)
    await asyncio.get_running_loop().create_future()


async def _child_call(address: str) -> None:
    session = await rapace.connect(address)
    print(f"READY {address} {rapace.IMPLEMENTATION} {os.getpid()}", flush=True)
    await session.call(session.next_channel_id(), HANG, b"", timeout=60)


# -- raw wire bytes ----------------------------------------------------------------------

_DESC = struct.Struct("<QIIIIIIIIQ16s")
_LEN = struct.Struct("<I")


def raw_desc(
    *,
    msg_id: int = 0,
    channel_id: int = 0,
    method_id: int = 0,
    payload_slot: int = INLINE_SLOT,
    payload_generation: int = 0,
    payload_offset: int = 0,
    payload_len: int = 0,
    flags: int = 0,
    credit_grant: int = 0,
    deadline_ns: int = NO_DEADLINE,
    inline_payload: bytes = b"",
) -> bytes:
    """The 64 descriptor bytes, field by field (docs/protocol.md §1)."""
    return _DESC.pack(
        msg_id,
        channel_id,
        method_id,
        payload_slot,
        payload_generation,
        payload_offset,
        payload_len,
        flags,
        credit_grant,
        deadline_ns,
        inline_payload.ljust(16, b"\0"),
    )


def raw_frame(
    msg_id: int,
    channel_id: int,
    method_id: int,
    flags: int,
    payload: bytes = b"",
    *,
    deadline_ns: int = NO_DEADLINE,
) -> bytes:
    """An honest frame as the Rust sender writes it (payload trailing even when inline)."""
    inline = len(payload) <= 16
    desc = raw_desc(
        msg_id=msg_id,
        channel_id=channel_id,
        method_id=method_id,
        payload_slot=INLINE_SLOT if inline else 0,
        payload_len=len(payload),
        flags=flags,
        deadline_ns=deadline_ns,
        inline_payload=payload if inline else b"",
    )
    return _LEN.pack(64 + len(payload)) + desc + payload


class RawFrame(NamedTuple):
    msg_id: int
    channel_id: int
    method_id: int
    flags: int
    payload: bytes


def parse_raw(body: bytes) -> RawFrame:
    fields = _DESC.unpack_from(body)
    msg_id, channel_id, method_id, slot, _gen, _off, plen, flags = fields[:8]
    trailing = body[64:]
    payload = trailing if trailing or slot != INLINE_SLOT else fields[10][:plen]
    return RawFrame(msg_id, channel_id, method_id, flags, payload)


PING_VERB, SETTINGS = 5, 7
"""Control verbs a session sends unasked: keepalive's heartbeat ``Ping`` (every 10 s by
default in ``serve``), and the ``Settings`` of a session with a non-default maximum."""


def is_unasked(frame: RawFrame) -> bool:
    """A heartbeat or a ``Settings`` announcement: not an answer to anything."""
    return (
        frame.channel_id == 0
        and frame.flags == CONTROL
        and frame.method_id in (PING_VERB, SETTINGS)
    )


async def read_raw_frame(reader: asyncio.StreamReader, *, settings: bool = False) -> RawFrame:
    """The next frame; what a session sends unasked (its ``Settings``, keepalive's
    heartbeats) is passed over unless ``settings``."""
    while True:
        (frame_len,) = _LEN.unpack(await reader.readexactly(4))
        assert 64 <= frame_len <= 64 + (1 << 20), frame_len
        frame = parse_raw(await reader.readexactly(frame_len))
        if settings or not is_unasked(frame):
            return frame


async def read_raw_frames(reader: asyncio.StreamReader, count: int) -> list[RawFrame]:
    """Read ``count`` frames, parsing in bulk (fast enough for floods of answers); what a
    session sends unasked (heartbeats, ``Settings``) is passed over, not counted."""
    frames: list[RawFrame] = []
    buffer = b""
    while len(frames) < count:
        data = await reader.read(1 << 20)
        if not data:
            raise asyncio.IncompleteReadError(buffer, None)
        buffer += data
        pos = 0
        while len(buffer) - pos >= 4 and len(frames) < count:
            (frame_len,) = _LEN.unpack_from(buffer, pos)
            assert 64 <= frame_len <= 64 + (1 << 20), frame_len
            if len(buffer) - pos - 4 < frame_len:
                break
            frame = parse_raw(buffer[pos + 4 : pos + 4 + frame_len])
            if not is_unasked(frame):
                frames.append(frame)
            pos += 4 + frame_len
        buffer = buffer[pos:]
    assert not buffer, "more bytes than the frames expected"
    return frames


async def closed_by_peer(reader: asyncio.StreamReader, limit: int = 1 << 20) -> bytes:
    """Read until the peer closes (EOF or reset); return what came before."""
    received = bytearray()
    try:
        while len(received) <= limit:
            data = await reader.read(65536)
            if not data:
                break
            received += data
    except ConnectionResetError:
        pass
    return bytes(received)


def error_code(payload: bytes) -> int:
    return int(rapace.wire.parse_error_payload(payload).code)


def main(argv: list[str]) -> None:
    mode, address = argv
    _die_with_parent()
    coro = _child_serve(address) if mode == "serve" else _child_call(address)
    rapace.run(coro)


if __name__ == "__main__":
    main(sys.argv[1:])
