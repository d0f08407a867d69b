"""The shared-memory transport: the segment byte for byte (the Rust pair layout), opener
refusals, the core's send/receive/slot rules and hostile descriptors (in one process,
both ends on the twin under test), then real sessions: in one process and against a
child process on the same twin (calls, notifications, payload sizes, 64 and 1,000 in
flight, a 100 MiB tunnel both ways, a peer killed mid-call), and a stress run after which
the segment is read back: every slot free, both rings empty.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import logging
import mmap
import os
import random
import signal
import stat
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from net_helpers import ECHO, HANG, PID, Service, open_tunnel, run, spawn, wait_for, wait_until

import rapace
from rapace import _impl
from rapace import _shm_layout as L
from rapace.errors import SessionClosed
from rapace.transport import shm
from rapace.transport.shm import ShmConfig, ShmError

SMALL = ShmConfig(256, 4096, 64)  # upstream rapace-core's default (§11.16)
DESC = bytes(range(64))
MiB = 1 << 20


def core_pair(path: Path, config: ShmConfig = SMALL) -> tuple[Any, Any, mmap.mmap, mmap.mmap]:
    """Peer A's and peer B's cores on one fresh segment (the twin under test)."""
    core_type = _impl.current().SegmentCore
    a_map = L.create_segment(str(path), config)
    a = core_type(a_map, config, True)
    a.publish_magic()
    b_map, opened = L.open_segment(str(path))
    assert opened == config
    return a, core_type(b_map, opened, False), a_map, b_map


def u32(data: bytes | mmap.mmap, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


def u64(data: bytes | mmap.mmap, offset: int) -> int:
    return int(struct.unpack_from("<Q", data, offset)[0])


def free_list(data: bytes | mmap.mmap, config: ShmConfig) -> list[int]:
    """The slot indices on the free list, in order (fails on a cycle: a double free)."""
    index = u64(data, config.slab + L.SLAB_FREE_HEAD) & 0xFFFFFFFF
    seen: list[int] = []
    while index != L.EMPTY_INDEX:
        assert index < config.slot_count and index not in seen, f"bad free list {seen}+{index}"
        seen.append(index)
        index = u32(data, config.slot_data + index * config.slot_size)
    return seen


def assert_quiet(data: bytes | mmap.mmap, config: ShmConfig) -> None:
    """Every slot FREE and on the free list, both rings empty."""
    for i in range(config.slot_count):
        assert u32(data, config.slot_meta + 8 * i + 4) == 0, f"slot {i} is not free"
    assert sorted(free_list(data, config)) == list(range(config.slot_count))
    for ring in (config.a2b_ring, config.b2a_ring):
        assert u64(data, ring + L.RING_HEAD) == u64(data, ring + L.RING_TAIL)


# -- the layout ------------------------------------------------------------------------


def test_default_segment_bytes_are_the_upstream_image(twin: Any, tmp_path: Path) -> None:
    """§11.16: every offset, and every non-zero byte of a fresh default segment."""
    path = tmp_path / "seg"
    a, b, a_map, b_map = core_pair(path)
    data = path.read_bytes()
    assert len(data) == SMALL.size == 296_000
    assert (SMALL.a2b_ring, SMALL.b2a_ring, SMALL.slab) == (128, 16_704, 33_280)
    assert (SMALL.slot_meta, SMALL.slot_data) == (33_344, 33_856)
    expected = bytearray(len(data))
    expected[0:8] = b"RAPACE\x00\x00"
    expected[8:12] = bytes.fromhex("00000100")
    expected[0x10:0x1C] = bytes.fromhex("00010000 00100000 40000000")
    expected[0x100:0x104] = bytes.fromhex("00010000")
    expected[0x41C0:0x41C4] = bytes.fromhex("00010000")
    expected[0x8200:0x820C] = bytes.fromhex("00100000 40000000 00100000")
    for i in range(63):
        expected[0x8440 + 4096 * i : 0x8444 + 4096 * i] = struct.pack("<I", i + 1)
    expected[0x47440:0x47444] = b"\xff\xff\xff\xff"
    assert data == bytes(expected)
    for core, mapping in ((a, a_map), (b, b_map)):
        core.close()
        mapping.close()


def test_cell_config_size_and_offsets() -> None:
    config = shm.DEFAULT_SHM_CONFIG
    assert (config.ring_capacity, config.slot_size, config.slot_count) == (256, 65_536, 128)
    assert (config.slab, config.slot_meta, config.slot_data) == (33_280, 33_344, 34_368)
    assert config.size == 8_422_976


def test_descriptors_in_the_ring_are_the_upstream_bytes(twin: Any, tmp_path: Path) -> None:
    """§11.6's two examples, as our sender writes them into the A->B ring."""
    a, b, a_map, _ = core_pair(tmp_path / "seg")
    desc = _impl.current().MsgDescHot(msg_id=1, channel_id=1, method_id=42, flags=1)
    assert a.try_send(desc.pack(), b"hello") == 0
    entry = SMALL.a2b_ring + L.RING_HEADER_SIZE
    assert a_map[entry : entry + 64] == bytes.fromhex(
        "0100000000000000 01000000 2a000000 ffffffff 00000000 00000000 05000000"
        "01000000 00000000 ffffffffffffffff 68656c6c6f0000000000000000000000"
    )
    desc = _impl.current().MsgDescHot(msg_id=0x1_0000_0003, channel_id=7, flags=5)
    assert a.try_send(desc.pack(), bytes(1000)) == 0
    slot, generation = a_map[entry + 64 + 16 : entry + 64 + 24], u32(a_map, entry + 64 + 20)
    assert (u32(slot, 0), generation) == (0, 1)  # the first slot popped, generation 1
    assert a_map[entry + 64 + 24 : entry + 64 + 32] == bytes.fromhex("00000000 e8030000")
    assert u64(a_map, SMALL.a2b_ring + L.RING_HEAD) == 2
    assert u32(a_map, L.OFF_A2B_DATA) == 2  # signalled once per enqueue
    frames = b.receive(10)
    assert [len(p) for _, p in frames] == [5, 1000]
    assert u32(a_map, L.OFF_A2B_SPACE) == 1  # once per batch
    assert u32(a_map, SMALL.slab + L.SLAB_SLOT_AVAILABLE) == 1
    assert_quiet(a_map, SMALL)


# -- opening ---------------------------------------------------------------------------


def _segment_with(tmp_path: Path, offset: int, value: bytes) -> str:
    path = tmp_path / "seg"
    a, _, a_map, b_map = core_pair(path)
    a_map[offset : offset + len(value)] = value
    a.close()
    a_map.close()
    b_map.close()
    return str(path)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, b"RAPACF\x00\x00", "not a rapace segment (bad magic 52 41 50 41 43 46 00 00)"),
        (8, struct.pack("<I", 0x0002_0000), "segment version 2.0; this peer speaks 1.x"),
        (16, struct.pack("<I", 255), "ring_capacity must be a power of two, got 255"),
        (16, struct.pack("<I", 0), "ring_capacity must be an integer in 1..2**32-1, got 0"),
        (20, struct.pack("<I", 0), "slot_size must be an integer"),
        (24, struct.pack("<I", 0), "slot_count must be an integer"),
        (24, struct.pack("<I", 65), "is too short: 296000 bytes, its header describes 300104"),
        (0x100, struct.pack("<I", 128), "the A->B ring says capacity 128, the header 256"),
        (SMALL.slab, struct.pack("<I", 8), "the slab header says 64 slots of 8 bytes"),
        (0, bytes(8), "is not initialised (its magic is zero)"),
    ],
)
def test_opener_refuses_a_bad_header(
    tmp_path: Path, offset: int, value: bytes, message: str
) -> None:
    path = _segment_with(tmp_path, offset, value)
    with pytest.raises(ShmError) as info:
        L.open_segment(path)
    assert message in str(info.value)
    assert path in str(info.value)


def test_opener_ignores_the_minor_version_and_flags(tmp_path: Path) -> None:
    path = _segment_with(tmp_path, 8, struct.pack("<II", 0x0001_0007, 0xFF))
    mapping, config = L.open_segment(path)
    assert config == SMALL
    mapping.close()


def test_opener_refuses_a_short_file_and_the_size_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"RAPACE\x00\x00" + bytes(50))
    with pytest.raises(ShmError, match="too short for a segment header \\(58 bytes\\)"):
        L.open_segment(str(short))
    path = _segment_with(tmp_path, 0, b"RAPACE\x00\x00")
    monkeypatch.setenv("RAPACE_SHM_MAX_BYTES", "100000")
    with pytest.raises(ShmError, match="296000 bytes is over the limit of 100000 bytes"):
        L.open_segment(path)
    with pytest.raises(ShmError, match="over the limit"):
        L.create_segment(str(tmp_path / "other"), SMALL)
    monkeypatch.delenv("RAPACE_SHM_MAX_BYTES")
    with pytest.raises(ShmError, match=r"slot_size must be a multiple of 4 .*got 4094"):
        L.create_segment(str(tmp_path / "other"), ShmConfig(256, 4094, 64))
    assert not (tmp_path / "other").exists()


def test_config_is_checked() -> None:
    with pytest.raises(ShmError, match="power of two"):
        ShmConfig(ring_capacity=100)
    with pytest.raises(ShmError, match="slot_count must be"):
        ShmConfig(slot_count=0)


def test_connect_waits_bounded_for_the_segment(twin: Any, tmp_path: Path) -> None:
    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(FileNotFoundError):
            await shm.open_shm(str(tmp_path / "never"), timeout=0.2)
        assert 0.2 <= time.monotonic() - started < 2
        (tmp_path / "zero").write_bytes(bytes(SMALL.size))  # created, not initialised
        with pytest.raises(L.ShmNotReady, match="not initialised"):
            await shm.open_shm(str(tmp_path / "zero"), timeout=0.1)

    run(main())


def test_a_second_peer_b_is_refused(twin: Any, tmp_path: Path) -> None:
    async def main() -> None:
        path = str(tmp_path / "seg")
        a = shm.create_shm(path, SMALL)
        b = await shm.open_shm(path)
        with pytest.raises(ShmError, match="already has a peer B"):
            await shm.open_shm(path)
        b.close()
        a.close()

    run(main())


# -- the core --------------------------------------------------------------------------


def test_payload_sizes_inline_and_in_slots(twin: Any, tmp_path: Path) -> None:
    a, b, a_map, _ = core_pair(tmp_path / "seg")
    sizes = [0, 1, 16, 17, 4095, 4096]
    for n in sizes:
        assert a.try_send(DESC, bytes([n % 251]) * n) == 0
    frames = b.receive(100)
    assert [p for _, p in frames] == [bytes([n % 251]) * n for n in sizes]
    for (desc, _), n in zip(frames, sizes, strict=True):
        slot = u32(desc, 16)
        assert (slot == 0xFFFFFFFF) == (n <= 16)
        assert desc[:16] == DESC[:16] and desc[32:48] == DESC[32:48]
    with pytest.raises(ValueError, match="a payload of 4097 bytes does not fit a slot of 4096"):
        a.try_send(DESC, bytes(4097))
    assert_quiet(a_map, SMALL)


def test_ring_wraps_many_times(twin: Any, tmp_path: Path) -> None:
    config = ShmConfig(8, 64, 8)
    a, b, a_map, _ = core_pair(tmp_path / "seg", config)
    received = []
    for i in range(1000):
        payload = struct.pack("<I", i) * (1 + i % 12)
        assert a.try_send(DESC, payload) == 0
        if i % 3 == 2:
            received += [p for _, p in b.receive(3)]
    received += [p for _, p in b.receive(100)]
    assert received == [struct.pack("<I", i) * (1 + i % 12) for i in range(1000)]
    assert u64(a_map, config.a2b_ring + L.RING_HEAD) == 1000
    assert_quiet(a_map, config)


def test_ring_full_and_slot_cap(twin: Any, tmp_path: Path) -> None:
    config = ShmConfig(16, 64, 8)
    a, b, a_map, _ = core_pair(tmp_path / "seg", config)
    for _ in range(16):
        assert a.try_send(DESC, b"x") == 0
    assert a.try_send(DESC, b"x") == shm_status("SEND_RING_FULL")
    b.receive(100)
    # At most half the pool in flight from one side: the peer keeps slots to answer with.
    for _ in range(4):
        assert a.try_send(DESC, bytes(20)) == 0
    assert a.try_send(DESC, bytes(20)) == shm_status("SEND_NO_SLOT")
    assert b.try_send(DESC, bytes(20)) == 0  # the other side still has slots
    assert len(b.receive(1)) == 1  # one of A's frees one slot
    assert a.try_send(DESC, bytes(20)) == 0
    b.receive(100)
    a.receive(100)
    assert_quiet(a_map, config)


def shm_status(name: str) -> int:
    """A ``try_send`` status of the twin under test."""
    suffix = "" if _impl.current().name == "cython" else "_py"
    return int(getattr(importlib.import_module(f"rapace._shm{suffix}"), name))


def _publish_raw(mapping: mmap.mmap, config: ShmConfig, ring: int, desc: bytes) -> None:
    """Enqueue 64 raw bytes as a hostile producer would."""
    head = u64(mapping, ring + L.RING_HEAD)
    entry = ring + L.RING_HEADER_SIZE + 64 * (head % config.ring_capacity)
    mapping[entry : entry + 64] = desc
    struct.pack_into("<Q", mapping, ring + L.RING_HEAD, head + 1)


def _raw_desc(slot: int, generation: int, offset: int, n: int) -> bytes:
    return DESC[:16] + struct.pack("<IIII", slot, generation, offset, n) + DESC[32:]


def _take_slot(mapping: mmap.mmap, config: ShmConfig) -> tuple[int, int]:
    """Pop a slot and mark it IN_FLIGHT by hand (single-threaded test)."""
    head = u64(mapping, config.slab + L.SLAB_FREE_HEAD)
    index = head & 0xFFFFFFFF
    following = u32(mapping, config.slot_data + index * config.slot_size)
    struct.pack_into(
        "<Q", mapping, config.slab + L.SLAB_FREE_HEAD, ((head >> 32) + 1) << 32 | following
    )
    meta = config.slot_meta + 8 * index
    generation = u32(mapping, meta) + 1
    struct.pack_into("<II", mapping, meta, generation, 2)
    return index, generation


HOSTILE = {
    "slot index": (lambda idx, gen: _raw_desc(64, gen, 0, 100), "names slot 64 of 64"),
    "generation": (lambda idx, gen: _raw_desc(idx, gen + 5, 0, 100), "generation"),
    "not in flight": (lambda idx, gen: _raw_desc(idx + 1, 0, 0, 100), "not in flight (state 0)"),
    "over the slot": (lambda idx, gen: _raw_desc(idx, gen, 4000, 100), "overruns slot"),
    "inline length": (lambda idx, gen: _raw_desc(0xFFFFFFFF, 0, 0, 17), "inline payload of 17"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_core_rejects_a_hostile_descriptor(twin: Any, tmp_path: Path, case: str) -> None:
    a, b, a_map, _ = core_pair(tmp_path / "seg")
    index, generation = _take_slot(a_map, SMALL)
    build, reason = HOSTILE[case]
    assert b.try_send(DESC, b"good") == 0
    _publish_raw(a_map, SMALL, SMALL.b2a_ring, build(index, generation))
    frames = a.receive(10)
    assert [p for _, p in frames] == [b"good"]  # what came before is delivered
    assert reason in a.failure
    assert a.receive(10) == []  # and nothing after: the segment is not trusted
    # Nothing was freed twice: the slot taken by hand is still in flight, off the list.
    assert u32(a_map, SMALL.slot_meta + 8 * index + 4) == 2
    assert sorted(free_list(a_map, SMALL)) == [i for i in range(64) if i != index]


def test_core_rejects_a_ring_head_out_of_range(twin: Any, tmp_path: Path) -> None:
    a, _, a_map, _ = core_pair(tmp_path / "seg")
    struct.pack_into("<Q", a_map, SMALL.b2a_ring + L.RING_HEAD, 257)
    assert a.receive(10) == []
    assert "head (257) is more than its capacity (256) ahead of its tail (0)" in a.failure


# -- sessions --------------------------------------------------------------------------


async def _session_pair(path: str, **kwargs: Any) -> tuple[Any, Service, rapace.RpcSession]:
    svc = Service()
    server = await rapace.serve(svc.on_session, f"shm:{path}", **kwargs)
    client = await rapace.connect(f"shm:{path}")
    return server, svc, client


def test_calls_in_one_process(twin: Any, tmp_path: Path) -> None:
    async def main() -> None:
        path = str(tmp_path / "seg")
        server, svc, client = await _session_pair(path)
        assert client.transport.max_payload_size == 65536
        for n in (0, 1, 16, 17, 65536):
            reply = await client.call(client.next_channel_id(), ECHO, bytes(n))
            assert len(reply.payload) == n
        with pytest.raises(rapace.ResourceExhausted, match="65537 bytes exceeds"):
            await client.call(client.next_channel_id(), ECHO, bytes(65537))
        assert client.next_channel_id() % 2 == 1
        await client.aclose()
        await wait_until(lambda: svc.sessions[0].is_closed, "the server sees the close")
        server.close()
        await server.wait_closed()
        assert not await asyncio.to_thread(os.path.exists, path)  # the creator removed it

    run(main())


def test_hostile_peer_ends_the_session_cleanly(
    twin: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Rust-like peer B (heartbeats, no lock) that publishes a corrupt descriptor."""
    caplog.set_level(logging.WARNING, logger="rapace")

    async def main() -> None:
        path = str(tmp_path / "seg")
        svc = Service()
        async with rapace.serve(svc.on_session, f"shm:{path}") as server:
            mapping, config = L.open_segment(path)
            peer = _impl.current().SegmentCore(mapping, config, False)
            peer.heartbeat(time.time_ns())
            await wait_until(lambda: bool(svc.sessions), "the server's session")
            _publish_raw(mapping, config, config.b2a_ring, _raw_desc(200, 1, 0, 100))
            await wait_until(lambda: svc.sessions[0].is_closed, "the session to end")
            assert u32(mapping, config.slot_meta + 4) == 0  # nothing freed
            peer.close()
            mapping.close()
            assert server.sessions == frozenset()

    run(main())
    assert any("names slot 200 of 128" in r.getMessage() for r in caplog.records)


def test_silent_peer_is_dead_after_the_heartbeat_rule(
    twin: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shm, "PEER_DEAD_AFTER_NS", 300_000_000)

    async def main() -> None:
        path = str(tmp_path / "seg")
        svc = Service()
        async with rapace.serve(svc.on_session, f"shm:{path}"):
            mapping, config = L.open_segment(path)
            peer = _impl.current().SegmentCore(mapping, config, False)
            peer.heartbeat(time.time_ns())  # once, then silence
            await wait_until(lambda: bool(svc.sessions), "the server's session")
            started = time.monotonic()
            await wait_until(lambda: svc.sessions[0].is_closed, "the peer declared dead")
            assert time.monotonic() - started < 2
            peer.close()
            mapping.close()

    run(main())


def test_stress_random_sizes_and_cancellation_leaves_the_segment_clean(
    twin: Any, tmp_path: Path
) -> None:
    async def main() -> None:
        path = str(tmp_path / "seg")
        server, _, client = await _session_pair(path, max_payload_size=8192)
        rng = random.Random(12)
        sizes = [rng.choice([0, 1, 16, 17, 100, 4096, 8192]) for _ in range(600)]

        async def one(n: int) -> None:
            payload = rng.randbytes(n)
            reply = await client.call(client.next_channel_id(), ECHO, payload)
            assert reply.payload == payload

        tasks = [asyncio.ensure_future(one(n)) for n in sizes]
        await asyncio.sleep(0)
        for task in rng.sample(tasks, 100):
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)
        mapping, config = L.open_segment(path)
        await wait_until(lambda: _quiet(mapping, config), "every slot free, both rings empty")
        assert_quiet(mapping, config)
        mapping.close()
        await client.aclose()
        server.close()
        await server.wait_closed()

    run(main(), timeout=30)


def _quiet(mapping: mmap.mmap, config: ShmConfig) -> bool:
    try:
        assert_quiet(mapping, config)
    except AssertionError:
        return False
    return True


@rapace.service
class Counter:
    async def count(self, n: rapace.u32, size: rapace.u32) -> AsyncIterator[bytes]: ...


class CounterImpl(Counter):
    async def count(self, n: int, size: int) -> AsyncIterator[bytes]:
        for i in range(n):
            yield bytes([i % 256]) * size


def test_streaming_calls_with_inline_and_slot_items(twin: Any, tmp_path: Path) -> None:
    """Four server-streaming calls at once, items from 1 byte (inline) to nearly a slot."""

    async def main() -> None:
        path = str(tmp_path / "seg")
        on_session = lambda s: rapace.register_services(s, CounterImpl())  # noqa: E731
        async with (
            rapace.serve(on_session, f"shm:{path}"),
            rapace.connect(f"shm:{path}") as session,
        ):
            counter = rapace.client(Counter, session, timeout=5.0)

            async def drain(n: int, size: int) -> list[bytes]:
                return [item async for item in await counter.count(n, size)]

            results = await asyncio.gather(
                drain(0, 1), drain(300, 5), drain(200, 4000), drain(50, 65000)
            )
            for (n, size), items in zip(
                ((0, 1), (300, 5), (200, 4000), (50, 65000)), results, strict=True
            ):
                assert items == [bytes([i % 256]) * size for i in range(n)]

    run(main(), timeout=30)


# -- against a child process -------------------------------------------------------------


def test_child_process_calls_notifications_and_in_flight(twin: Any, tmp_path: Path) -> None:
    async def main(address: str, child_pid: int) -> None:
        async with rapace.connect(address, max_pending=2000) as client:
            pid = await client.call(client.next_channel_id(), PID)
            assert int(pid.payload) == child_pid
            for n in (0, 1, 16, 17, 65536):
                payload = random.randbytes(n)
                assert (
                    await client.call(client.next_channel_id(), ECHO, payload)
                ).payload == payload
            for count in (64, 1000):
                payloads = [random.randbytes(i % 300) for i in range(count)]
                replies = await asyncio.gather(
                    *(client.call(client.next_channel_id(), ECHO, p) for p in payloads)
                )
                assert [r.payload for r in replies] == payloads
            for i in range(50):
                await client.notify(ECHO, bytes(i))
            # The notifications were handled before this call (one ring, in order).
            assert (await client.call(client.next_channel_id(), ECHO, b"after")).payload == b"after"

    with spawn(twin.name, "serve", f"shm:{tmp_path}/seg") as child:
        assert child.implementation == twin.name
        run(main(child.address, child.pid), timeout=30)


def test_child_process_tunnel_100_mib_both_ways(twin: Any, tmp_path: Path) -> None:
    size = 100 * MiB
    block = random.Random(5).randbytes(MiB)
    digest = hashlib.sha256(block * 100).hexdigest()

    async def main(address: str) -> None:
        async with rapace.connect(address) as client:
            stream = await open_tunnel(client)

            async def write() -> None:
                for _ in range(size // MiB):
                    stream.write(block)
                    await stream.drain()
                stream.write_eof()
                await stream.drain()

            async def read() -> tuple[int, str]:
                received = hashlib.sha256()
                total = 0
                async for data in stream:
                    received.update(data)
                    total += len(data)
                return total, received.hexdigest()

            _, echoed = await asyncio.gather(write(), read())
            assert echoed == (size, digest)

    with spawn(twin.name, "serve", f"shm:{tmp_path}/seg") as child:
        run(main(child.address), timeout=60)


def test_child_killed_mid_call_fails_pending_calls_fast(twin: Any, tmp_path: Path) -> None:
    async def main(child: Any) -> None:
        async with rapace.connect(child.address) as client:
            await client.call(client.next_channel_id(), ECHO, b"up")
            pending = [
                asyncio.ensure_future(client.call(client.next_channel_id(), HANG, bytes(i * 10)))
                for i in range(5)
            ]
            # One ring, in order: once this is answered, the child has the hanging calls.
            await client.call(client.next_channel_id(), ECHO, b"behind them")
            started = time.monotonic()
            os.kill(child.pid, signal.SIGKILL)
            for call in pending:
                with pytest.raises(SessionClosed):
                    await wait_for(call, "the pending call to fail")
            assert time.monotonic() - started < 1.0

    with spawn(twin.name, "serve", f"shm:{tmp_path}/seg") as child:
        run(main(child))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_pair_backs_off(twin: Any, tmp_path: Path) -> None:
    """After traffic, a connected pair that sends nothing parks: the child serving it uses
    next to no CPU (the 2 ms spin window, then futex waits; the issue's bound is 2%)."""

    async def main(child: Any) -> None:
        async with rapace.connect(child.address) as client:
            for _ in range(200):
                await client.call(client.next_channel_id(), ECHO, bytes(100))
            # The window measured includes the child's 2 ms spin after the last call
            # (0.1% of it): what stays is what parking costs. The wait is the measurement.
            before, started = _cpu_seconds(child.pid), time.monotonic()
            await asyncio.sleep(2.0)
            used = (_cpu_seconds(child.pid) - before) / (time.monotonic() - started)
            assert used < 0.03, f"the idle child used {used:.1%} of a core"

    with spawn(twin.name, "serve", f"shm:{tmp_path}/seg") as child:
        run(main(child))


def test_the_segment_file_is_its_owners_only_and_names_the_peer(twin: Any, tmp_path: Path) -> None:
    """Whoever can read the segment reads every payload, whoever can write it forges
    frames: it is created ``0o600`` whatever the umask (``mode=`` to share it), as a
    fresh file each time, and each side's ``peer`` names it."""

    def an_old_file(path: Path) -> BinaryIO:
        """A file where the segment goes (replaced, not truncated in place), held open
        so that its inode cannot be reused meanwhile."""
        path.write_bytes(b"an old file")
        return path.open("rb")

    async def serve_at(path: Path, mode: int | None) -> None:
        old = await asyncio.to_thread(an_old_file, path)
        kwargs = {} if mode is None else {"mode": mode}
        previous = os.umask(0)
        try:
            server, svc, client = await _session_pair(str(path), **kwargs)
        finally:
            os.umask(previous)
        info = await asyncio.to_thread(os.stat, path)
        assert stat.S_IMODE(info.st_mode) == (0o600 if mode is None else mode)
        assert info.st_ino != os.fstat(old.fileno()).st_ino
        assert os.fstat(old.fileno()).st_nlink == 0 and old.read() == b"an old file"
        old.close()
        await wait_until(lambda: bool(svc.sessions), "the server's session")
        assert client.peer == rapace.Peer("shm", str(path))
        assert svc.sessions[0].peer == rapace.Peer("shm", str(path))
        await client.aclose()
        server.close()
        await server.wait_closed()

    async def main() -> None:
        await serve_at(tmp_path / "seg", None)
        await serve_at(tmp_path / "shared", 0o640)

    run(main())
