"""The shared-memory segment's per-frame core in pure Python: the twin of ``rapace/_shm.pyx``.

One ``SegmentCore`` is one peer's view of a mapped segment (``rapace._shm_layout`` makes
the mapping): it sends frames on its ring (allocating slots from the shared pool for
payloads over 16 bytes), receives from the other ring (copying each payload out and
freeing its slot at once), heartbeats, and waits on the receive futex word.

Python has no atomic instructions, but the C runtime does: every CAS and fetch-add goes
through ``libatomic``'s ``__atomic_*`` functions called with ``ctypes`` on addresses inside
the mapping, the same instructions the compiler emits for the compiled twin (and for the
Rust peer), so this twin is correct under concurrency, only slower. Plain 8-byte loads
and stores of ring counters go through ``__atomic_load_8``/``__atomic_store_8`` too (a
``struct`` read may tear). The futex is the raw system call through ``libc.syscall``.
ctypes releases the GIL around each foreign call, so a thread blocked in ``FUTEX_WAIT``
does not stop the event loop.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
from typing import Any, Final

from rapace import _shm_layout as L

__all__ = ["SEND_NO_SLOT", "SEND_OK", "SEND_RING_FULL", "SegmentCore"]

SEND_OK: Final = 0
SEND_RING_FULL: Final = 1
SEND_NO_SLOT: Final = 2

_RELAXED, _ACQUIRE, _RELEASE, _ACQ_REL = 0, 2, 3, 4
_FREE, _ALLOCATED, _IN_FLIGHT = 0, 1, 2
_INLINE = 0xFFFFFFFF
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_WAKE_ALL = 0x7FFFFFFF
_SYS_FUTEX: Final = {"x86_64": 202, "aarch64": 98}.get(platform.machine(), 202)

_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64
_ptr = ctypes.c_void_p

_atomic = ctypes.CDLL("libatomic.so.1")


def _fn(name: str, restype: object, *argtypes: object) -> Any:
    function = getattr(_atomic, name)
    function.restype = restype
    function.argtypes = argtypes
    return function


_load4 = _fn("__atomic_load_4", _u32, _ptr, ctypes.c_int)
_load8 = _fn("__atomic_load_8", _u64, _ptr, ctypes.c_int)
_store4 = _fn("__atomic_store_4", None, _ptr, _u32, ctypes.c_int)
_store8 = _fn("__atomic_store_8", None, _ptr, _u64, ctypes.c_int)
_add4 = _fn("__atomic_fetch_add_4", _u32, _ptr, _u32, ctypes.c_int)
_add8 = _fn("__atomic_fetch_add_8", _u64, _ptr, _u64, ctypes.c_int)
_cas4 = _fn(
    "__atomic_compare_exchange_4", ctypes.c_bool, _ptr, _ptr, _u32, ctypes.c_int, ctypes.c_int
)
_cas8 = _fn(
    "__atomic_compare_exchange_8", ctypes.c_bool, _ptr, _ptr, _u64, ctypes.c_int, ctypes.c_int
)

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_DESC_LOCATION = struct.Struct("<IIII")  # payload_slot, generation, offset, len at 16
_ZERO16 = bytes(16)


def _futex_wake(addr: int) -> None:
    _syscall(_SYS_FUTEX, _ptr(addr), _FUTEX_WAKE, _WAKE_ALL, None, None, 0)


class SegmentCore:
    """One peer's side of a mapped segment: ``peer_a`` selects the rings and words."""

    def __init__(self, mapping: mmap.mmap, config: L.ShmConfig, peer_a: bool) -> None:
        anchor = ctypes.c_char.from_buffer(mapping)
        base = ctypes.addressof(anchor)
        del anchor  # no buffer export held: the owner may close the mapping later
        self._mapping: mmap.mmap | None = mapping
        self._base = base
        self.capacity = config.ring_capacity
        self.slot_size = config.slot_size
        self.slot_count = config.slot_count
        send_ring, recv_ring = (
            (config.a2b_ring, config.b2a_ring) if peer_a else (config.b2a_ring, config.a2b_ring)
        )
        self._send_head = base + send_ring + L.RING_HEAD
        self._send_tail = base + send_ring + L.RING_TAIL
        self._send_entries = send_ring + L.RING_HEADER_SIZE  # offsets into the mapping
        self._recv_head = base + recv_ring + L.RING_HEAD
        self._recv_tail = base + recv_ring + L.RING_TAIL
        self._recv_entries = recv_ring + L.RING_HEADER_SIZE
        words = (L.OFF_A2B_DATA, L.OFF_B2A_SPACE, L.OFF_B2A_DATA, L.OFF_A2B_SPACE)
        if not peer_a:
            words = (L.OFF_B2A_DATA, L.OFF_A2B_SPACE, L.OFF_A2B_DATA, L.OFF_B2A_SPACE)
        send_data, recv_space, recv_data, _send_space = words
        self._send_data_word = base + send_data
        self._recv_space_word = base + recv_space
        self._recv_data_word = base + recv_data
        self._own_seen = base + (L.OFF_A_SEEN if peer_a else L.OFF_B_SEEN)
        self._own_epoch = base + (L.OFF_A_EPOCH if peer_a else L.OFF_B_EPOCH)
        self._peer_seen = base + (L.OFF_B_SEEN if peer_a else L.OFF_A_SEEN)
        self._flags = base + L.OFF_FLAGS
        self._free_head = base + config.slab + L.SLAB_FREE_HEAD
        self._slot_available = base + config.slab + L.SLAB_SLOT_AVAILABLE
        self._meta = base + config.slot_meta
        self._data = config.slot_data  # offset into the mapping
        # Resume from the published head (upstream restarts at 0, which only works on a
        # fresh segment, where the two agree).
        self._local_head = _load8(self._send_head, _ACQUIRE)
        self._outstanding: list[tuple[int, int]] = []
        self.max_outstanding = max(1, self.slot_count // 2)
        self.failure: str | None = None
        self._expected = _u64()
        self._expected4 = _u32()
        self._armed = _u32()  # private futex words of the waiter thread
        self._stop = _u32()

    # -- set-up and liveness ------------------------------------------------------------

    def publish_magic(self) -> None:
        """Creator only: make the laid-out segment valid, last (release store)."""
        (magic,) = struct.unpack("<Q", L.MAGIC)
        _store8(self._base + L.OFF_MAGIC, magic, _RELEASE)

    def heartbeat(self, now_ns: int) -> None:
        """Stamp our ``last_seen`` (release) and bump our epoch, as upstream does."""
        _store8(self._own_seen, now_ns, _RELEASE)
        _add8(self._own_epoch, 1, _RELAXED)

    def peer_last_seen(self) -> int:
        return int(_load8(self._peer_seen, _ACQUIRE))

    def set_flags(self, bits: int) -> None:
        """OR ``bits`` into the header's ``flags`` word (a fetch-or done as a CAS loop)."""
        expected = self._expected4
        expected.value = _load4(self._flags, _ACQUIRE)
        while not _cas4(
            self._flags, ctypes.byref(expected), expected.value | bits, _ACQ_REL, _ACQUIRE
        ):
            pass

    def flags(self) -> int:
        return int(_load4(self._flags, _ACQUIRE))

    def close(self) -> None:
        """Forget the mapping (its owner unmaps it); no call may follow."""
        self._mapping = None

    # -- sending ------------------------------------------------------------------------

    def signal_peer(self) -> None:
        """Signal the send-data word (atomic add, ``FUTEX_WAKE``): the peer may be waiting."""
        _add4(self._send_data_word, 1, _RELEASE)
        _futex_wake(self._send_data_word)

    def try_send(self, desc: bytes, payload: bytes, signal: bool = True) -> int:
        """Publish one frame (``desc``: its 64 packed bytes) if that needs no waiting;
        ``signal=False`` leaves the peer's wake-up to a later ``signal_peer``."""
        mapping = self._mapping
        assert mapping is not None
        head = self._local_head
        if head - _load8(self._send_tail, _ACQUIRE) >= self.capacity:
            return SEND_RING_FULL
        n = len(payload)
        entry = self._send_entries + (head & (self.capacity - 1)) * L.ENTRY_SIZE
        if n <= 16:
            location = _DESC_LOCATION.pack(_INLINE, 0, 0, n)
            inline = payload + _ZERO16[n:]
        else:
            if n > self.slot_size:
                raise ValueError(f"a payload of {n} bytes does not fit a slot of {self.slot_size}")
            if len(self._outstanding) >= self.max_outstanding and not self._sweep():
                return SEND_NO_SLOT
            slot = self._allocate()
            if slot is None:
                return SEND_NO_SLOT
            index, generation = slot
            start = self._data + index * self.slot_size
            mapping[start : start + n] = payload
            self._mark_in_flight(index, generation)
            self._outstanding.append(slot)
            location = _DESC_LOCATION.pack(index, generation, 0, n)
            inline = _ZERO16
        mapping[entry : entry + 64] = desc[:16] + location + desc[32:48] + inline
        self._local_head = head + 1
        _store8(self._send_head, head + 1, _RELEASE)
        if signal:
            self.signal_peer()
        return SEND_OK

    def _sweep(self) -> bool:
        """Forget our slots the peer has freed; whether we are under the cap again."""
        meta = self._meta
        self._outstanding = [
            (index, generation)
            for index, generation in self._outstanding
            if _load4(meta + index * 8 + 4, _ACQUIRE) == _IN_FLIGHT
            and _load4(meta + index * 8, _ACQUIRE) == generation
        ]
        return len(self._outstanding) < self.max_outstanding

    def _allocate(self) -> tuple[int, int] | None:
        mapping = self._mapping
        assert mapping is not None
        expected = self._expected
        expected4 = self._expected4
        while True:
            old = _load8(self._free_head, _ACQUIRE)
            index = old & 0xFFFFFFFF
            if index == L.EMPTY_INDEX:
                return None
            if index >= self.slot_count:
                self.failure = f"the free list names slot {index} of {self.slot_count}"
                return None
            start = self._data + index * self.slot_size
            (following,) = struct.unpack_from("<I", mapping, start)
            expected.value = old
            new = (((old >> 32) + 1) & 0xFFFFFFFF) << 32 | following
            if not _cas8(self._free_head, ctypes.byref(expected), new, _ACQ_REL, _ACQUIRE):
                continue
            state = self._meta + index * 8 + 4
            expected4.value = _FREE
            if not _cas4(state, ctypes.byref(expected4), _ALLOCATED, _ACQ_REL, _ACQUIRE):
                if _load4(state, _ACQUIRE) == _FREE:  # as upstream: put it back, or drop it
                    self._push(index)
                continue
            generation = (_add4(self._meta + index * 8, 1, _ACQ_REL) + 1) & 0xFFFFFFFF
            return index, generation

    def _mark_in_flight(self, index: int, generation: int) -> None:
        expected4 = self._expected4
        expected4.value = _ALLOCATED
        if _load4(self._meta + index * 8, _ACQUIRE) != generation or not _cas4(
            self._meta + index * 8 + 4, ctypes.byref(expected4), _IN_FLIGHT, _ACQ_REL, _ACQUIRE
        ):
            raise RuntimeError(f"slot {index} changed hands while it was being written")

    def _push(self, index: int) -> None:
        mapping = self._mapping
        assert mapping is not None
        expected = self._expected
        start = self._data + index * self.slot_size
        while True:
            old = _load8(self._free_head, _ACQUIRE)
            struct.pack_into("<I", mapping, start, old & 0xFFFFFFFF)
            expected.value = old
            new = (((old >> 32) + 1) & 0xFFFFFFFF) << 32 | index
            if _cas8(self._free_head, ctypes.byref(expected), new, _ACQ_REL, _ACQUIRE):
                return

    # -- receiving ----------------------------------------------------------------------

    def rx_ready(self) -> bool:
        """Whether a frame waits in our receive ring."""
        return bool(_load8(self._recv_head, _ACQUIRE) != _load8(self._recv_tail, _RELAXED))

    def recv_word(self) -> int:
        """The receive-data futex word (load it before looking at the ring, then wait)."""
        return int(_load4(self._recv_data_word, _ACQUIRE))

    def wait_recv(self, expected: int, timeout: float) -> None:
        """Block (GIL released) in ``FUTEX_WAIT`` on the receive-data word while it still
        holds ``expected`` (read it with ``recv_word`` before checking the ring), at most
        ``timeout`` seconds: for a blocking peer (the benchmark's floor)."""
        seconds = int(timeout)
        spec = _Timespec(seconds, int((timeout - seconds) * 1e9))
        word = _ptr(self._recv_data_word)
        _syscall(_SYS_FUTEX, word, _FUTEX_WAIT, _u32(expected), ctypes.byref(spec), None, 0)

    def run_waiter(self, eventfd: int, timeout: float) -> None:
        """The waiter thread's body, until ``stop_waiter``: each time ``arm_waiter`` arms
        it, wait (``FUTEX_WAIT`` on the receive-data word, loaded before the ring is
        checked, ``timeout`` at most per wait) until a frame is in the ring, disarm, and
        write ``eventfd``. The compiled twin runs this whole loop without the GIL."""
        armed, stop = self._armed, self._stop
        armed_addr = ctypes.addressof(armed)
        seconds = int(timeout)
        spec = _Timespec(seconds, int((timeout - seconds) * 1e9))
        word_addr = _ptr(self._recv_data_word)
        while True:
            while _load4(armed_addr, _ACQUIRE) == 0 and not stop.value:
                _syscall(_SYS_FUTEX, _ptr(armed_addr), _FUTEX_WAIT, _u32(0), None, None, 0)
            while not stop.value:
                word = _load4(self._recv_data_word, _ACQUIRE)
                if self.rx_ready():
                    break
                _syscall(
                    _SYS_FUTEX, word_addr, _FUTEX_WAIT, _u32(word), ctypes.byref(spec), None, 0
                )
            if stop.value:
                return
            _store4(armed_addr, 0, _RELEASE)
            os.eventfd_write(eventfd, 1)

    def arm_waiter(self) -> None:
        """Loop side: ask the waiter thread for one wake-up when a frame arrives."""
        _store4(ctypes.addressof(self._armed), 1, _RELEASE)
        _futex_wake(ctypes.addressof(self._armed))

    def stop_waiter(self) -> None:
        """Make ``run_waiter`` return (within one futex timeout)."""
        _store4(ctypes.addressof(self._stop), 1, _RELEASE)
        _futex_wake(ctypes.addressof(self._armed))

    def receive(self, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` frames as ``(descriptor bytes, payload)``, each slot freed as
        soon as its payload is copied. A descriptor that breaks the rules stops the batch
        (it is consumed, its slot left alone) and sets ``failure`` to the reason."""
        mapping = self._mapping
        assert mapping is not None
        if self.failure is not None:
            return []
        tail = _load8(self._recv_tail, _RELAXED)
        head = _load8(self._recv_head, _ACQUIRE)
        if head - tail > self.capacity:
            self.failure = (
                f"the receive ring's head ({head}) is more than its capacity "
                f"({self.capacity}) ahead of its tail ({tail})"
            )
            return []
        frames: list[tuple[bytes, bytes]] = []
        first = tail
        freed = False
        mask = self.capacity - 1
        while tail != head and len(frames) < limit:
            entry = self._recv_entries + (tail & mask) * L.ENTRY_SIZE
            desc = mapping[entry : entry + 64]
            tail += 1
            _store8(self._recv_tail, tail, _RELEASE)
            index, generation, offset, n = _DESC_LOCATION.unpack_from(desc, 16)
            if index == _INLINE:
                if n > 16:
                    self.failure = f"an inline payload of {n} bytes (at most 16)"
                    break
                payload = desc[48 : 48 + n]
            else:
                problem = self._check_slot(index, generation, offset, n)
                if problem is not None:
                    self.failure = problem
                    break
                start = self._data + index * self.slot_size + offset
                payload = mapping[start : start + n]
                if not self._free(index):
                    self.failure = f"slot {index} was freed while its payload was read"
                    break
                freed = True
            frames.append((desc, payload))
        if tail != first:
            _add4(self._recv_space_word, 1, _RELEASE)
            _futex_wake(self._recv_space_word)
        if freed:
            _add4(self._slot_available, 1, _RELEASE)
            _futex_wake(self._slot_available)
        return frames

    def _check_slot(self, index: int, generation: int, offset: int, n: int) -> str | None:
        if index >= self.slot_count:
            return f"a descriptor names slot {index} of {self.slot_count}"
        meta = self._meta + index * 8
        actual = _load4(meta, _ACQUIRE)
        if actual != generation:
            return f"a descriptor names slot {index} generation {generation}; it is at {actual}"
        state = _load4(meta + 4, _ACQUIRE)
        if state != _IN_FLIGHT:
            return f"a descriptor names slot {index}, which is not in flight (state {state})"
        if offset + n > self.slot_size:
            return (
                f"a descriptor's payload ({n} bytes at offset {offset}) overruns "
                f"slot {index} of {self.slot_size} bytes"
            )
        return None

    def _free(self, index: int) -> bool:
        expected4 = self._expected4
        expected4.value = _IN_FLIGHT
        if not _cas4(
            self._meta + index * 8 + 4, ctypes.byref(expected4), _FREE, _ACQ_REL, _ACQUIRE
        ):
            return False
        self._push(index)
        return True
