"""The shared-memory floors: two blocking processes, over the segment and over a pipe.

No event loop, no session: the server (peer A) echoes every frame back from a thread
that blocks in ``FUTEX_WAIT`` whenever its ring is empty; the client (peer B) sends a
frame and blocks the same way for the answer. That is what the segment itself costs, the
physical floor an ``shm:`` rapace session is compared with. The same server also echoes
16-byte messages over a pair of FIFOs (``<path>.up`` / ``<path>.down``) with blocking
``read``/``write``: the pipe floor, the kernel's cheapest process-to-process round trip,
reported as ``pipe_p50_us`` next to the segment's figures.

Frames carry the method in the descriptor: ``_ECHO`` is answered with the same payload,
``_SINK`` frames are counted, and ``_SINK_END`` is answered with the 8-byte total.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import threading
import time
from typing import Any, Final

from rapace import _impl
from rapace import _shm_layout as L
from rapace.benchmark.workload import (
    CONCURRENCY,
    BenchError,
    Workload,
    bulk_chunk,
    child_info,
    measure_bulk,
    measure_sequential,
)
from rapace.connection import parse_address

__all__ = ["run_shm_floor_client", "start_shm_floor_server"]

_ECHO: Final = 1
_SINK: Final = 2
_SINK_END: Final = 3
_TOTAL: Final = struct.Struct("<Q")
_WAIT: Final = 0.1
_PIPE_MESSAGE: Final = 16


def _desc(method: int) -> bytes:
    return struct.pack("<QIIIIIIIIQ16s", 0, 0, method, 0xFFFFFFFF, 0, 0, 0, 1, 0, 2**64 - 1, b"")


_DESCS: Final = {m: _desc(m) for m in (_ECHO, _SINK, _SINK_END)}


def _method(desc: bytes) -> int:
    return int(struct.unpack_from("<I", desc, 12)[0])


def _receive(core: Any, stop: threading.Event | None = None) -> list[tuple[bytes, bytes]]:
    """Block until at least one frame is in the ring (the word loaded before the look)."""
    while True:
        word = core.recv_word()
        frames: list[tuple[bytes, bytes]] = core.receive(256)
        if frames:
            return frames
        if core.failure is not None:
            raise BenchError(f"the floor's segment is corrupt: {core.failure}")
        if stop is not None and stop.is_set():
            return []
        core.wait_recv(word, _WAIT)


def _send(core: Any, desc: bytes, payload: bytes) -> None:
    """Publish, yielding the CPU while the ring or the pool is full (the peer drains)."""
    while core.try_send(desc, payload):
        os.sched_yield()


class ShmFloorServer:
    """The segment and the FIFOs, each served by a blocking thread, until ``close``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._config = L.DEFAULT_SHM_CONFIG
        self._mapping = L.create_segment(path, self._config)
        self._core = _impl.current().SegmentCore(self._mapping, self._config, True)
        self._core.publish_magic()
        for suffix in (".up", ".down"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)
            os.mkfifo(path + suffix)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve_segment, daemon=True),
            threading.Thread(target=self._serve_pipe, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _serve_segment(self) -> None:
        core = self._core
        total = 0
        while not self._stop.is_set():
            for desc, payload in _receive(core, self._stop):
                method = _method(desc)
                if method == _SINK:
                    total += len(payload)
                elif method == _SINK_END:
                    _send(core, desc, _TOTAL.pack(total))
                    total = 0
                else:
                    _send(core, desc, payload)

    def _serve_pipe(self) -> None:
        # The client opens .up first, then .down: the same order here, or both block.
        with (
            open(self.path + ".up", "rb", buffering=0) as up,
            open(self.path + ".down", "wb", buffering=0) as down,
        ):
            while message := up.read(_PIPE_MESSAGE):
                down.write(message)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):  # a pipe reader still waiting for its writer
            os.close(os.open(self.path + ".up", os.O_WRONLY | os.O_NONBLOCK))
        for thread in self._threads:
            thread.join(timeout=1.0)
        if not self._threads[0].is_alive():
            self._core.close()
            self._mapping.close()
        for suffix in ("", ".up", ".down"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + suffix)

    async def __aenter__(self) -> ShmFloorServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


async def start_shm_floor_server(address: str) -> tuple[ShmFloorServer, str]:
    """Create the segment and the FIFOs at the ``shm:`` address's path."""
    return ShmFloorServer(parse_address(address).path), address


def _pipe_p50_us(path: str, calls: int) -> float:
    message = bytes(range(_PIPE_MESSAGE))
    samples = []
    with (
        open(path + ".up", "wb", buffering=0) as up,
        open(path + ".down", "rb", buffering=0) as down,
    ):
        for _ in range(calls):
            started = time.perf_counter_ns()
            up.write(message)
            if down.read(_PIPE_MESSAGE) != message:
                raise BenchError("the pipe floor echoed something else")
            samples.append(time.perf_counter_ns() - started)
    samples.sort()
    return samples[len(samples) // 2] / 1000


def _inflight(core: Any, workload: Workload) -> dict[str, float]:
    """``CONCURRENCY`` frames outstanding, a new one sent for each answer."""
    total = workload.inflight_calls
    payload = bytes(range(16))
    desc = _DESCS[_ECHO]
    started = time.perf_counter()
    sent = received = 0
    while sent < min(CONCURRENCY, total):
        _send(core, desc, payload)
        sent += 1
    while received < total:
        for _, answer in _receive(core):
            if answer != payload:
                raise BenchError("the segment floor echoed something else")
            received += 1
            if sent < total:
                _send(core, desc, payload)
                sent += 1
    elapsed = time.perf_counter() - started
    return {
        "calls": total,
        "concurrency": CONCURRENCY,
        "elapsed_s": elapsed,
        "calls_per_s": total / elapsed,
    }


async def run_shm_floor_client(address: str, workload: Workload) -> dict[str, object]:
    """The segment's sequential, in-flight and bulk figures, and the pipe's p50."""
    path = parse_address(address).path
    mapping, config = L.open_segment(path)
    core = _impl.current().SegmentCore(mapping, config, False)
    try:
        echo_desc = _DESCS[_ECHO]

        async def echo(payload: bytes) -> bytes:
            _send(core, echo_desc, payload)
            ((_, answer),) = _receive(core)
            return bytes(answer)

        async def send_bulk(size: int) -> int:
            chunk = bulk_chunk()
            left = size
            while left > 0:
                piece = chunk if left >= len(chunk) else chunk[:left]
                _send(core, _DESCS[_SINK], piece)
                left -= len(piece)
            _send(core, _DESCS[_SINK_END], b"")
            ((_, answer),) = _receive(core)
            return int(_TOTAL.unpack(answer)[0])

        report: dict[str, object] = child_info()
        report["sequential"] = await measure_sequential(echo, workload)
        report["inflight"] = _inflight(core, workload)
        report["tunnel"] = await measure_bulk(send_bulk, workload)
        report["pipe_p50_us"] = await asyncio.to_thread(_pipe_p50_us, path, workload.calls)
    finally:
        core.close()
        mapping.close()
    return report
