"""Shared-memory transport: two processes on one host, one mapped segment file.

The segment is the Rust implementation's pair segment, byte for byte (``docs/protocol.md``,
"Shared memory"): two descriptor rings, one pool of payload slots, futex words for
wake-ups. Peer A creates it (``rapace.serve(on_session, "shm:/path")``), peer B opens it
(``rapace.connect("shm:/path")``). Payloads up to 16 bytes travel in the descriptor,
larger ones in one slot each; a payload larger than a slot is refused by the session
before it is sent (the transport's ``max_payload_size`` is the slot size; tunnels write
in 64 KiB chunks, the default slot size). The receiver copies a payload out and frees
its slot at once, so a slot is held only while its frame sits in the ring.

Event-loop integration (a futex wait cannot run on the loop thread):

* **Receive** runs on the loop: ``_drain`` takes up to ``BATCH`` frames from the ring and
  hands them to the session in one call. After a batch it looks again at once (a look is
  a pair of loads in our own memory, nanoseconds). When the ring is empty it keeps looking
  from ``call_soon`` callbacks for ``spin`` seconds after the last frame sent or received
  (a reply to what we just sent usually lands within that window, and catching it there
  saves two thread hops), then **parks**: a waiter thread, armed through a lock, loads the
  receive-data futex word, checks the ring, and blocks in ``FUTEX_WAIT`` on that value (the
  load comes first, so a signal between the check and the wait is never lost); when the
  ring has a frame it writes an ``eventfd`` the loop watches with ``add_reader``, and the
  loop drains. Parked, a pair costs nothing but the 100 ms futex timeouts (upstream's
  bound) and the liveness tick.
* **Send** publishes from the loop without waiting (``try_send_frame``) and signals the
  peer's data word as upstream does (an atomic add and one ``FUTEX_WAKE``, whether or not
  the peer waits: the layout has no "waiter present" flag), but once per loop iteration
  for everything published in it rather than once per frame (the word's value means
  only "changed", and a waiting peer loaded it before it looked at the ring). When the
  ring is full or no slot is free, ``send_frame`` waits in FIFO order, looking again
  after every loop iteration for 2 ms, then every 1-2 ms (the waits that would tell us
  sooner are futexes the loop cannot block on, and a full ring is backpressure, rare).
  Receiving goes on meanwhile, so our side keeps freeing slots while a send waits
  (§11.11), and each side holds at most half the slots in flight (the core's cap): a
  pipelining peer cannot take the whole pool and deadlock the pair.
* **Liveness** (``LIVENESS_INTERVAL``): a timer heartbeats (upstream's 500 ms at most,
  here every tick) and applies upstream's rule: a peer whose last heartbeat is 3 s old is
  dead. Between two rapace-python peers death shows sooner: each holds an open-file-
  description lock on one byte of the file (A byte 0, B byte 1) and says so in the
  header's ``flags`` (bits upstream neither writes nor reads); the kernel drops the lock
  when the process exits, however it exits, and the other side sees that at its next tick.
  A clean close looks the same, and ends the other side's session too.

Measured on a loaded 2-core machine (compiled, uvloop, sequential 5-byte echo against a
child process, the waiter loop in the core): always parking (no spin) gave p50 102 µs, a
50 µs spin window 52 µs, 2 ms 35 µs (p90 46 µs); ``DEFAULT_SPIN`` is 2 ms. The spin yields
the CPU (``sched_yield``) before each look, so that on a busy machine the peer it waits
for gets to run: without it p50 was better (23-35 µs against 44-84 µs, three runs each,
same load) but p99 grew from 2-3 ms to 7-8 ms and throughput fell by a third; yielding
only after the first 100 µs of a spin was worst (p50 about 280 µs). A first waiter
thread written in Python (a lock to arm it, the futex call through the core) cost
multi-millisecond stalls whenever it woke while the loop held the GIL (64 calls in
flight: under 4,000 calls/s); the loop now runs inside the core, without the GIL in the
compiled twin. One signal per loop iteration against one per frame: no difference the
load on the machine let us see (two interleaved runs each), kept for the syscalls it
saves. Signalling only when the peer may be waiting was not measured: it needs a flag
the Rust layout does not have.

A segment found corrupt (a descriptor naming a bad slot, a wrong generation, a slot not
in flight, a payload over its slot, an inline length over 16, a ring head out of range)
is logged with the reason and ends the session; the bad slot is never freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
from typing import TYPE_CHECKING, Final

from rapace import _impl
from rapace import _shm_layout as L
from rapace.errors import FrameError
from rapace.peer import Peer
from rapace.transport.base import FrameSink, TransportClosed

if TYPE_CHECKING:
    from rapace._frame_py import Frame

__all__ = [
    "DEFAULT_SHM_CONFIG",
    "DEFAULT_SPIN",
    "ShmConfig",
    "ShmError",
    "ShmTransport",
    "create_shm",
    "open_shm",
]

ShmConfig = L.ShmConfig
ShmError = L.ShmError
DEFAULT_SHM_CONFIG = L.DEFAULT_SHM_CONFIG

logger = logging.getLogger("rapace")

BATCH: Final = 256
"""Frames taken from the ring per delivery to the session."""

DEFAULT_SPIN: Final = 2e-3
"""Seconds the loop keeps looking at an empty ring after the last frame before it parks
(see the module docstring for the measurements)."""

LIVENESS_INTERVAL: Final = 0.1
"""Seconds between two heartbeats and looks at the peer's liveness."""

PEER_DEAD_AFTER_NS: Final = 3_000_000_000
"""Upstream's rule: a peer silent for 3 s is dead."""

FUTEX_TIMEOUT: Final = 0.1
"""The waiter thread's futex wait bound (upstream's), so it notices a close."""

OPEN_TIMEOUT: Final = 5.0
"""Seconds ``open_shm`` waits for the segment file to appear and be initialised (as
upstream's ``rapace-cell``)."""

_SEND_YIELD_FOR: Final = 2e-3
"""Seconds a send waiting for ring space or a slot yields to the loop before it sleeps."""

_FLOCK: Final = struct.Struct("hhqqi4x")  # struct flock on Linux (l_type, l_whence, ...)


def _lock_request(kind: int, byte: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0)


class ShmTransport:
    """One peer's end of a shared-memory segment (see the module docstring)."""

    def __init__(
        self,
        mapping: mmap.mmap,
        config: L.ShmConfig,
        *,
        peer_a: bool,
        path: str,
        lock_fd: int,
        spin: float = DEFAULT_SPIN,
    ) -> None:
        self._core = _impl.current().SegmentCore(mapping, config, peer_a)
        self._mapping: mmap.mmap | None = mapping
        self._config = config
        self._lock_fd = lock_fd
        self._peer_flag = L.FLAG_B_LOCKS if peer_a else L.FLAG_A_LOCKS
        self._peer_byte = 1 if peer_a else 0
        self._spin = spin
        self.path = path
        self.peer = f"shm:{path}"
        self._twin = _impl.current()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: FrameSink | None = None
        self._paused = False
        self._closed = False
        self._lost = False
        self._failure: BaseException | None = None
        self._drain_scheduled = False
        self._signal_scheduled = False
        self._spin_until = 0.0
        self._armed = False
        self._eventfd = -1
        self._thread: threading.Thread | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._send_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._peer_arrived = False

    # -- properties ----------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def max_payload_size(self) -> int:
        """The largest payload one frame carries: the slot size."""
        return self._config.slot_size

    @property
    def config(self) -> L.ShmConfig:
        """The segment's geometry (read from its header by peer B)."""
        return self._config

    @property
    def is_connected(self) -> bool:
        """Whether the peer has shown up (its first heartbeat), even if gone since."""
        return self._peer_arrived

    def describe_peer(self) -> Peer:
        """Who is connected: the segment, named by its path (the process on the other
        side shares no socket whose credentials the kernel would tell)."""
        return Peer("shm", self.path)

    def abort(self) -> None:
        """As ``close``: a segment has no unsent bytes to throw away."""
        self.close()

    async def wait_connected(self) -> None:
        """Peer A: wait until peer B has opened the segment (its first heartbeat)."""
        self._start(asyncio.get_running_loop())
        await self._connected.wait()

    # -- sending -------------------------------------------------------------------------

    def try_send_frame(self, frame: Frame) -> bool:
        """Publish ``frame`` now if the ring has room and a slot is free (when needed)."""
        if self._closed or self._send_lock.locked():
            return False
        payload = frame.payload
        if len(payload) > self._config.slot_size:
            return False  # send_frame raises the clear error
        if self._core.try_send(frame.desc.pack(), payload, False):
            return False
        self._sent()
        return True

    async def send_frame(self, frame: Frame) -> None:
        if self._closed:
            raise TransportClosed(self._closed_reason())
        payload = frame.payload
        if len(payload) > self._config.slot_size:
            raise FrameError(
                f"a payload of {len(payload)} bytes does not fit a shared-memory slot "
                f"({self._config.slot_size} bytes)"
            )
        desc = frame.desc.pack()
        core = self._core
        if not self._send_lock.locked() and not core.try_send(desc, payload, False):
            self._sent()
            return
        async with self._send_lock:  # FIFO: the first waiter is the one that polls
            started = time.perf_counter()
            delay = 0.0
            while True:
                if self._closed:
                    raise TransportClosed(self._closed_reason())
                if not core.try_send(desc, payload, False):
                    break
                if core.failure is not None:
                    self._fail(FrameError(f"shared-memory segment corrupt: {core.failure}"))
                    continue
                # One loop iteration at a time (our drain runs meanwhile) for a while,
                # then sleeps that grow to 2 ms.
                if time.perf_counter() - started > _SEND_YIELD_FOR:
                    delay = min(max(delay * 2, 1e-3), 2e-3)
                await asyncio.sleep(delay)
        self._sent()

    def _sent(self) -> None:
        """After a publish: signal the peer once for everything published in this loop
        iteration, and look for the answer for a while (spin), from now."""
        loop = self._loop
        if loop is None:
            self._core.signal_peer()
            return
        if not self._signal_scheduled:
            self._signal_scheduled = True
            loop.call_soon(self._signal_peer)
        self._spin_until = time.perf_counter() + self._spin
        if not self._drain_scheduled and self._sink is not None:
            self._drain_scheduled = True
            loop.call_soon(self._drain)

    def _signal_peer(self) -> None:
        self._signal_scheduled = False
        if not self._closed:
            self._core.signal_peer()

    # -- receiving -----------------------------------------------------------------------

    def attach(self, sink: FrameSink) -> None:
        if self._sink is not None:
            raise RuntimeError("a sink is already attached to this transport")
        self._sink = sink
        if self._closed:
            self._report_lost()
            return
        loop = asyncio.get_running_loop()
        self._start(loop)
        self._schedule_drain()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._schedule_drain()

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to ``loop``: the eventfd, the waiter thread and the liveness tick."""
        if self._loop is not None or self._closed:
            return
        self._loop = loop
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        loop.add_reader(self._eventfd, self._on_eventfd)
        self._thread = threading.Thread(
            target=self._wait_for_frames, name=f"rapace-shm {self.path}", daemon=True
        )
        self._thread.start()
        self._tick()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and self._loop is not None and not self._closed:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        sink = self._sink
        if sink is None or self._closed or self._paused:
            return
        core = self._core
        items = core.receive(BATCH)
        if items:
            twin = self._twin
            unpack = twin.MsgDescHot.unpack
            frame_type = twin.Frame
            sink.frames_received([frame_type(unpack(desc), payload) for desc, payload in items])
            if core.failure is None and not self._closed:
                self._spin_until = time.perf_counter() + self._spin
                self._schedule_drain()
        if core.failure is not None:
            self._fail(FrameError(f"shared-memory segment corrupt: {core.failure}"))
            return
        if items or self._closed:
            return
        if time.perf_counter() < self._spin_until:
            os.sched_yield()  # a peer waiting for this core runs first (2 cores, loaded)
            self._schedule_drain()
        elif not self._armed:
            self._armed = True
            core.arm_waiter()

    def _on_eventfd(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._eventfd)
        self._armed = False
        self._drain()

    def _wait_for_frames(self) -> None:
        """The waiter thread (see the module docstring). It unmaps the segment when it
        ends, so that the mapping never goes away under its futex wait."""
        try:
            self._core.run_waiter(self._eventfd, FUTEX_TIMEOUT)
        finally:
            self._release_mapping()

    # -- liveness ------------------------------------------------------------------------

    def _tick(self) -> None:
        self._ticker = None
        if self._closed or self._loop is None:
            return
        core = self._core
        now = time.time_ns()
        core.heartbeat(now)
        seen = core.peer_last_seen()
        if seen and not self._peer_arrived:
            self._peer_arrived = True
            self._connected.set()
        if seen:
            if core.flags() & self._peer_flag and self._peer_gone():
                self._drain()  # what it sent before it went
                self._end(None, "the peer closed the segment or exited")
                return
            if now - seen >= PEER_DEAD_AFTER_NS:
                self._end(
                    ConnectionResetError(
                        f"shared-memory peer silent for {(now - seen) / 1e9:.1f} s: dead"
                    ),
                    "no heartbeat",
                )
                return
        self._ticker = self._loop.call_later(LIVENESS_INTERVAL, self._tick)

    def _peer_gone(self) -> bool:
        """Whether the peer's byte lock is gone (its process closed the segment or died)."""
        try:
            answer = fcntl.fcntl(
                self._lock_fd, fcntl.F_OFD_GETLK, _lock_request(fcntl.F_WRLCK, self._peer_byte)
            )
        except OSError:
            return False
        return bool(_FLOCK.unpack(answer)[0] == fcntl.F_UNLCK)

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Close our end (the peer sees it at its next liveness tick); idempotent."""
        self._end(None, None)

    def _fail(self, exc: BaseException) -> None:
        logger.warning("closing rapace shared-memory session %s: %s", self.peer, exc)
        self._end(exc, None)

    def _end(self, exc: BaseException | None, why: str | None) -> None:
        if self._closed:
            return
        if why is not None:
            logger.info("rapace shared-memory session %s ended: %s", self.peer, why)
        self._closed = True
        self._failure = exc
        self._connected.set()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._loop is not None and self._eventfd >= 0:
            self._loop.remove_reader(self._eventfd)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)  # drops our lock: the peer sees we are gone
        if self._thread is not None and self._thread.is_alive():
            self._core.stop_waiter()  # it wakes, sees the stop, unmaps on its way out
        else:
            self._release_mapping()
        self._report_lost()

    def _release_mapping(self) -> None:
        mapping, self._mapping = self._mapping, None
        if mapping is None:
            return
        self._core.close()
        mapping.close()
        if self._eventfd >= 0:
            os.close(self._eventfd)
            self._eventfd = -1

    def _closed_reason(self) -> str:
        if self._failure is not None:
            return f"shared-memory transport closed: {self._failure}"
        return "shared-memory transport closed"

    def _report_lost(self) -> None:
        if self._sink is not None and not self._lost:
            self._lost = True
            self._sink.connection_lost(self._failure)


def _lock_byte(path: str, byte: int, who: str) -> int:
    """Open ``path`` and take the OFD write lock on ``byte``; the fd, held for life."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _lock_request(fcntl.F_WRLCK, byte))
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ShmError(f"shared-memory segment {path} already has a {who}") from None
        raise
    return fd


def create_shm(
    path: str,
    config: L.ShmConfig = DEFAULT_SHM_CONFIG,
    *,
    spin: float = DEFAULT_SPIN,
    mode: int = 0o600,
) -> ShmTransport:
    """Create the segment file at ``path`` (replacing any) as peer A, with permissions
    ``mode`` (default: its owner's processes only)."""
    mapping = L.create_segment(path, config, mode)
    try:
        lock_fd = _lock_byte(path, 0, "peer A")
    except BaseException:
        mapping.close()
        raise
    transport = ShmTransport(mapping, config, peer_a=True, path=path, lock_fd=lock_fd, spin=spin)
    core = transport._core
    core.set_flags(L.FLAG_A_LOCKS)
    core.heartbeat(time.time_ns())
    core.publish_magic()
    return transport


async def open_shm(
    path: str, *, timeout: float = OPEN_TIMEOUT, spin: float = DEFAULT_SPIN
) -> ShmTransport:
    """Open the segment at ``path`` as peer B, waiting up to ``timeout`` seconds for the
    file to appear and its creator to finish it (polling every 10 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            mapping, config = L.open_segment(path)
            break
        except (FileNotFoundError, L.ShmNotReady):
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.01)
    try:
        lock_fd = _lock_byte(path, 1, "peer B")
    except BaseException:
        mapping.close()
        raise
    transport = ShmTransport(mapping, config, peer_a=False, path=path, lock_fd=lock_fd, spin=spin)
    transport._core.set_flags(L.FLAG_B_LOCKS)
    transport._core.heartbeat(time.time_ns())
    return transport
