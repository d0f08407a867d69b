"""Frame codec benchmarks: each operation on the compiled and the pure twin, side by side.

    pytest bench/test_bench_frame.py --benchmark-group-by=group \\
        --benchmark-columns=median,ops,rounds

Every benchmark checks its result against bytes built here with ``struct`` (no twin
involved), so a broken twin fails instead of timing nothing. ``extra_info["frames"]`` is
the number of frames one call handles: frames/s = frames / median. A compiled twin that
does not import is an error, never a skip.
"""

from __future__ import annotations

import ctypes
import importlib
import random
import struct
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

TWINS = {"cython": "rapace._frame", "python": "rapace._frame_py"}

DESC = struct.Struct("<QIIIIIIIIQ16s")
PREFIX = struct.Struct("<I")
INLINE_SLOT = 0xFFFFFFFF
NO_DEADLINE = 0xFFFFFFFFFFFFFFFF
METHOD_ID = 0x193FA158  # Calculator.add
DATA_EOS = 0x05
BIG_PAYLOAD = 4096
READ_SIZE = 8192  # a typical socket read
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter number
DEFAULT_TRIM_THRESHOLD = 128 * 1024  # glibc's default

FIELDS: dict[str, Any] = {
    "msg_id": 0x0102030405060708,
    "channel_id": 3,
    "method_id": METHOD_ID,
    "payload_slot": INLINE_SLOT,
    "payload_generation": 0,
    "payload_offset": 0,
    "payload_len": 2,
    "flags": DATA_EOS,
    "credit_grant": 5,
    "deadline_ns": NO_DEADLINE,
    "inline_payload": b"\x04\x06" + bytes(14),
}
PACKED = DESC.pack(*FIELDS.values())


def wire_frame(msg_id: int, payload: bytes) -> bytes:
    """A frame as the Rust sender writes it: payload after the descriptor, even if inline."""
    n = len(payload)
    inline = n <= 16
    desc = DESC.pack(
        msg_id,
        1,
        METHOD_ID,
        INLINE_SLOT if inline else 0,
        0,
        0,
        n,
        DATA_EOS,
        0,
        NO_DEADLINE,
        payload if inline else b"",
    )
    return PREFIX.pack(len(desc) + n) + desc + payload


_rng = random.Random(20240601)


def _small_payload() -> bytes:
    return _rng.randbytes(_rng.randint(0, 16))


# Three small frames per 4 KiB one; and a stream of small frames only.
MIXED = [_rng.randbytes(BIG_PAYLOAD) if i % 4 == 3 else _small_payload() for i in range(1000)]
SMALL = [_small_payload() for _ in range(4000)]
MIXED_WIRE = b"".join(wire_frame(i, p) for i, p in enumerate(MIXED, 1))
SMALL_WIRE = b"".join(wire_frame(i, p) for i, p in enumerate(SMALL, 1))


@pytest.fixture(scope="module", autouse=True)
def steady_heap() -> Iterator[None]:
    """Keep freed memory in the heap between rounds, for these benchmarks (glibc only).

    A decode round allocates about 1 MB of payloads and frees it all. glibc gives freed
    memory at the top of the heap back to the kernel, so the next round page-faults it in
    again: about 0.5 ms per round, the same for both twins, which swamps the compiled
    decoder's 0.1 ms and moves with heap layout from run to run.
    """
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # not glibc
        yield
        return
    mallopt(M_TRIM_THRESHOLD, 1 << 30)
    yield
    mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)


@pytest.fixture(params=list(TWINS))
def twin(request: pytest.FixtureRequest) -> ModuleType:
    """The twin's frame module; an ImportError here fails the benchmark."""
    return importlib.import_module(TWINS[request.param])


def check_decoded(frames: list[Any], payloads: list[bytes]) -> None:
    assert [f.payload for f in frames] == payloads
    assert [f.desc.msg_id for f in frames] == list(range(1, len(payloads) + 1))
    assert all(f.desc.payload_len == len(f.payload) for f in frames)


@pytest.mark.benchmark(group="MsgDescHot.pack")
def test_pack(benchmark: Any, twin: ModuleType) -> None:
    benchmark.extra_info["frames"] = 1
    desc = twin.MsgDescHot(**FIELDS)
    assert benchmark(desc.pack) == PACKED


@pytest.mark.benchmark(group="MsgDescHot.unpack")
def test_unpack(benchmark: Any, twin: ModuleType) -> None:
    benchmark.extra_info["frames"] = 1
    desc = benchmark(twin.MsgDescHot.unpack, PACKED)
    assert {name: getattr(desc, name) for name in FIELDS} == FIELDS


@pytest.mark.benchmark(group="build_frame")
def test_build_frame(benchmark: Any, twin: ModuleType) -> None:
    benchmark.extra_info["frames"] = 1
    frame = benchmark(twin.build_frame, 7, 1, METHOD_ID, DATA_EOS, b"\x04\x06")
    assert twin.encode_frame(frame) == wire_frame(7, b"\x04\x06")


@pytest.mark.benchmark(group="encode_frame")
def test_encode_frame(benchmark: Any, twin: ModuleType) -> None:
    benchmark.extra_info["frames"] = 1
    frame = twin.build_frame(7, 1, METHOD_ID, DATA_EOS, b"\x04\x06")
    assert benchmark(twin.encode_frame, frame) == wire_frame(7, b"\x04\x06")


@pytest.mark.benchmark(group="feed: 1000 mixed frames in one buffer")
def test_feed_mixed(benchmark: Any, twin: ModuleType) -> None:
    benchmark.extra_info["frames"] = len(MIXED)
    decoder = twin.FrameDecoder()
    check_decoded(benchmark(decoder.feed, MIXED_WIRE), MIXED)
    assert decoder.buffered == 0


@pytest.mark.benchmark(group="feed: 4000 small frames in one buffer")
def test_feed_small(benchmark: Any, twin: ModuleType) -> None:
    benchmark.extra_info["frames"] = len(SMALL)
    decoder = twin.FrameDecoder()
    check_decoded(benchmark(decoder.feed, SMALL_WIRE), SMALL)
    assert decoder.buffered == 0


@pytest.mark.benchmark(group="feed: 1000 mixed frames in 8 KiB reads")
def test_feed_reads(benchmark: Any, twin: ModuleType) -> None:
    """Frames cut across reads: the path that buffers an incomplete frame."""
    benchmark.extra_info["frames"] = len(MIXED)
    reads = [MIXED_WIRE[i : i + READ_SIZE] for i in range(0, len(MIXED_WIRE), READ_SIZE)]
    decoder = twin.FrameDecoder()
    feed = decoder.feed

    def feed_all() -> list[Any]:
        frames: list[Any] = []
        for data in reads:
            frames += feed(data)
        return frames

    check_decoded(benchmark(feed_all), MIXED)
    assert decoder.buffered == 0


OVERSIZED_PAYLOAD = 64 * 1024  # skipped by a decoder whose maximum is BIG_PAYLOAD
SKIP_WIRE = b"".join(
    wire_frame(i, p) + (wire_frame(0, bytes(OVERSIZED_PAYLOAD)) if i % 10 == 0 else b"")
    for i, p in enumerate(MIXED, 1)
)


@pytest.mark.benchmark(group="feed: 1000 mixed frames, 100 oversized ones skipped, 8 KiB reads")
def test_feed_skipping(benchmark: Any, twin: ModuleType) -> None:
    """Oversized frames between the normal ones: the path that discards a body as it comes."""
    benchmark.extra_info["frames"] = len(MIXED)
    reads = [SKIP_WIRE[i : i + READ_SIZE] for i in range(0, len(SKIP_WIRE), READ_SIZE)]
    decoder = twin.FrameDecoder(max_payload_size=BIG_PAYLOAD)
    feed = decoder.feed

    def feed_all() -> list[Any]:
        frames: list[Any] = []
        for data in reads:
            frames += feed(data)
        skipped = decoder.take_skipped()
        assert [n for _, n in skipped] == [OVERSIZED_PAYLOAD] * (len(MIXED) // 10)
        return frames

    check_decoded(benchmark(feed_all), MIXED)
    assert (decoder.buffered, decoder.skipping) == (0, 0)
