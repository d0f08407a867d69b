# cython: language_level=3
"""The shared-memory segment's per-frame core, compiled: the twin of ``rapace/_shm_py.py``.

Same class, same methods, same results; atomics are GCC/Clang ``__atomic`` builtins on
the mapping (the instructions the Rust peer uses), the futex is ``syscall(SYS_futex)``
with the GIL released. See the pure twin for what each method does.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from rapace import _shm_layout as L

__all__ = ["SEND_NO_SLOT", "SEND_OK", "SEND_RING_FULL", "SegmentCore"]

SEND_OK = 0
SEND_RING_FULL = 1
SEND_NO_SLOT = 2

cdef extern from *:
    """
    #include <stdint.h>
    #include <time.h>
    #include <unistd.h>
    #include <sys/syscall.h>
    #include <linux/futex.h>

    static inline uint64_t rp_load8(const void *p, int order) {
        return order ? __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE)
                     : __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED);
    }
    static inline uint32_t rp_load4(const void *p) {
        return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE);
    }
    static inline void rp_store8(void *p, uint64_t v) {
        __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE);
    }
    static inline uint32_t rp_add4(void *p, uint32_t v) {
        return __atomic_fetch_add((uint32_t *)p, v, __ATOMIC_ACQ_REL);
    }
    static inline uint64_t rp_add8_relaxed(void *p, uint64_t v) {
        return __atomic_fetch_add((uint64_t *)p, v, __ATOMIC_RELAXED);
    }
    static inline int rp_cas4(void *p, uint32_t expected, uint32_t desired) {
        return __atomic_compare_exchange_n((uint32_t *)p, &expected, desired, 0,
                                           __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    static inline int rp_cas8(void *p, uint64_t expected, uint64_t desired) {
        return __atomic_compare_exchange_n((uint64_t *)p, &expected, desired, 1,
                                           __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    static inline void rp_futex_wake(void *p) {
        syscall(SYS_futex, p, FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0);
    }
    static inline void rp_futex_wait_forever(void *p, uint32_t expected) {
        syscall(SYS_futex, p, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
    }
    static inline void rp_futex_wake_private(void *p) {
        syscall(SYS_futex, p, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
    }
    static inline void rp_store4(void *p, uint32_t v) {
        __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE);
    }
    static inline int rp_notify(int fd) {
        uint64_t one = 1;
        return (int)write(fd, &one, 8);
    }
    static inline void rp_futex_wait(void *p, uint32_t expected, long long ns) {
        struct timespec ts;
        ts.tv_sec = (time_t)(ns / 1000000000LL);
        ts.tv_nsec = (long)(ns % 1000000000LL);
        syscall(SYS_futex, p, FUTEX_WAIT, expected, &ts, NULL, 0);
    }
    """
    uint64_t rp_load8(const void *p, int order) nogil
    uint32_t rp_load4(const void *p) nogil
    void rp_store8(void *p, uint64_t v) nogil
    uint32_t rp_add4(void *p, uint32_t v) nogil
    uint64_t rp_add8_relaxed(void *p, uint64_t v) nogil
    bint rp_cas4(void *p, uint32_t expected, uint32_t desired) nogil
    bint rp_cas8(void *p, uint64_t expected, uint64_t desired) nogil
    void rp_futex_wake(void *p) nogil
    void rp_futex_wait(void *p, uint32_t expected, long long ns) nogil
    void rp_futex_wait_forever(void *p, uint32_t expected) nogil
    void rp_futex_wake_private(void *p) nogil
    void rp_store4(void *p, uint32_t v) nogil
    int rp_notify(int fd) nogil

cdef enum:
    FREE = 0
    ALLOCATED = 1
    IN_FLIGHT = 2

cdef uint32_t INLINE = 0xFFFFFFFF
cdef uint32_t EMPTY = 0xFFFFFFFF


cdef inline uint8_t *at(uint8_t *base, Py_ssize_t offset) noexcept:
    return base + offset


cdef class SegmentCore:
    """One peer's side of a mapped segment: ``peer_a`` selects the rings and words."""

    cdef object _mapping
    cdef uint8_t *_base
    cdef readonly uint32_t capacity
    cdef readonly uint32_t slot_size
    cdef readonly uint32_t slot_count
    cdef readonly Py_ssize_t max_outstanding
    cdef public object failure
    cdef uint8_t *_send_head
    cdef uint8_t *_send_tail
    cdef uint8_t *_send_entries
    cdef uint8_t *_recv_head
    cdef uint8_t *_recv_tail
    cdef uint8_t *_recv_entries
    cdef uint8_t *_send_data_word
    cdef uint8_t *_recv_space_word
    cdef uint8_t *_recv_data_word
    cdef uint8_t *_own_seen
    cdef uint8_t *_own_epoch
    cdef uint8_t *_peer_seen
    cdef uint8_t *_flags
    cdef uint8_t *_free_head
    cdef uint8_t *_slot_available
    cdef uint8_t *_meta
    cdef uint8_t *_data
    cdef uint64_t _local_head
    cdef list _outstanding
    cdef uint32_t _armed  # private futex words of the waiter thread
    cdef uint32_t _stop

    def __init__(self, mapping, config, bint peer_a):
        cdef Py_buffer view
        PyObject_GetBuffer(mapping, &view, PyBUF_WRITABLE)
        cdef uint8_t *base = <uint8_t *>view.buf
        PyBuffer_Release(&view)  # no export held: the owner may close the mapping later
        self._mapping = mapping
        self._base = base
        self.capacity = config.ring_capacity
        self.slot_size = config.slot_size
        self.slot_count = config.slot_count
        send_ring, recv_ring = (
            (config.a2b_ring, config.b2a_ring) if peer_a else (config.b2a_ring, config.a2b_ring)
        )
        self._send_head = at(base, send_ring + L.RING_HEAD)
        self._send_tail = at(base, send_ring + L.RING_TAIL)
        self._send_entries = at(base, send_ring + L.RING_HEADER_SIZE)
        self._recv_head = at(base, recv_ring + L.RING_HEAD)
        self._recv_tail = at(base, recv_ring + L.RING_TAIL)
        self._recv_entries = at(base, recv_ring + L.RING_HEADER_SIZE)
        if peer_a:
            self._send_data_word = at(base, L.OFF_A2B_DATA)
            self._recv_space_word = at(base, L.OFF_B2A_SPACE)
            self._recv_data_word = at(base, L.OFF_B2A_DATA)
            self._own_seen = at(base, L.OFF_A_SEEN)
            self._own_epoch = at(base, L.OFF_A_EPOCH)
            self._peer_seen = at(base, L.OFF_B_SEEN)
        else:
            self._send_data_word = at(base, L.OFF_B2A_DATA)
            self._recv_space_word = at(base, L.OFF_A2B_SPACE)
            self._recv_data_word = at(base, L.OFF_A2B_DATA)
            self._own_seen = at(base, L.OFF_B_SEEN)
            self._own_epoch = at(base, L.OFF_B_EPOCH)
            self._peer_seen = at(base, L.OFF_A_SEEN)
        self._flags = at(base, L.OFF_FLAGS)
        self._free_head = at(base, config.slab + L.SLAB_FREE_HEAD)
        self._slot_available = at(base, config.slab + L.SLAB_SLOT_AVAILABLE)
        self._meta = at(base, config.slot_meta)
        self._data = at(base, config.slot_data)
        self._local_head = rp_load8(self._send_head, 1)
        self._outstanding = []
        self.max_outstanding = max(1, self.slot_count // 2)
        self.failure = None
        self._armed = 0
        self._stop = 0

    # -- set-up and liveness ------------------------------------------------------------

    def publish_magic(self):
        cdef uint64_t magic
        memcpy(&magic, <const char *>L.MAGIC, 8)
        rp_store8(self._base, magic)

    def heartbeat(self, uint64_t now_ns):
        rp_store8(self._own_seen, now_ns)
        rp_add8_relaxed(self._own_epoch, 1)

    def peer_last_seen(self):
        return rp_load8(self._peer_seen, 1)

    def set_flags(self, uint32_t bits):
        cdef uint32_t old
        while True:
            old = rp_load4(self._flags)
            if rp_cas4(self._flags, old, old | bits):
                return

    def flags(self):
        return rp_load4(self._flags)

    def close(self):
        self._mapping = None
        self._base = NULL

    # -- sending ------------------------------------------------------------------------

    def signal_peer(self):
        rp_add4(self._send_data_word, 1)
        rp_futex_wake(self._send_data_word)

    def try_send(self, bytes desc not None, bytes payload not None, bint signal=True):
        cdef uint64_t head = self._local_head
        if head - rp_load8(self._send_tail, 1) >= self.capacity:
            return SEND_RING_FULL
        if PyBytes_GET_SIZE(desc) != 64:
            raise ValueError("a descriptor is 64 bytes")
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        cdef uint8_t *entry = self._send_entries + (head & (self.capacity - 1)) * 64
        cdef uint32_t location[4]
        cdef uint32_t index, generation
        if n <= 16:
            location[0] = INLINE
            location[1] = 0
            location[2] = 0
            location[3] = <uint32_t>n
            memcpy(entry, PyBytes_AS_STRING(desc), 16)
            memcpy(entry + 16, location, 16)
            memcpy(entry + 32, PyBytes_AS_STRING(desc) + 32, 16)
            memset(entry + 48, 0, 16)
            memcpy(entry + 48, PyBytes_AS_STRING(payload), n)
        else:
            if n > self.slot_size:
                raise ValueError(
                    f"a payload of {n} bytes does not fit a slot of {self.slot_size}"
                )
            if len(self._outstanding) >= self.max_outstanding and not self._sweep():
                return SEND_NO_SLOT
            if not self._allocate(&index, &generation):
                return SEND_NO_SLOT
            memcpy(self._data + <Py_ssize_t>index * self.slot_size, PyBytes_AS_STRING(payload), n)
            if rp_load4(self._meta + index * 8) != generation or not rp_cas4(
                self._meta + index * 8 + 4, ALLOCATED, IN_FLIGHT
            ):
                raise RuntimeError(f"slot {index} changed hands while it was being written")
            self._outstanding.append((<uint64_t>index << 32) | generation)
            location[0] = index
            location[1] = generation
            location[2] = 0
            location[3] = <uint32_t>n
            memcpy(entry, PyBytes_AS_STRING(desc), 16)
            memcpy(entry + 16, location, 16)
            memcpy(entry + 32, PyBytes_AS_STRING(desc) + 32, 16)
            memset(entry + 48, 0, 16)
        self._local_head = head + 1
        rp_store8(self._send_head, head + 1)
        if signal:
            rp_add4(self._send_data_word, 1)
            rp_futex_wake(self._send_data_word)
        return SEND_OK

    cdef bint _sweep(self):
        cdef list kept = []
        cdef uint64_t packed
        cdef uint32_t index
        for item in self._outstanding:
            packed = item
            index = <uint32_t>(packed >> 32)
            if (
                rp_load4(self._meta + index * 8 + 4) == IN_FLIGHT
                and rp_load4(self._meta + index * 8) == <uint32_t>packed
            ):
                kept.append(item)
        self._outstanding = kept
        return len(kept) < self.max_outstanding

    cdef bint _allocate(self, uint32_t *index_out, uint32_t *generation_out) except -1:
        cdef uint64_t old, new
        cdef uint32_t index, following
        while True:
            old = rp_load8(self._free_head, 1)
            index = <uint32_t>old
            if index == EMPTY:
                return False
            if index >= self.slot_count:
                self.failure = f"the free list names slot {index} of {self.slot_count}"
                return False
            memcpy(&following, self._data + <Py_ssize_t>index * self.slot_size, 4)
            new = ((((old >> 32) + 1) & 0xFFFFFFFF) << 32) | following
            if not rp_cas8(self._free_head, old, new):
                continue
            if not rp_cas4(self._meta + index * 8 + 4, FREE, ALLOCATED):
                if rp_load4(self._meta + index * 8 + 4) == FREE:
                    self._push(index)
                continue
            index_out[0] = index
            generation_out[0] = rp_add4(self._meta + index * 8, 1) + 1
            return True

    cdef void _push(self, uint32_t index) noexcept:
        cdef uint64_t old, new
        cdef uint32_t link
        cdef uint8_t *start = self._data + <Py_ssize_t>index * self.slot_size
        while True:
            old = rp_load8(self._free_head, 1)
            link = <uint32_t>old
            memcpy(start, &link, 4)
            new = ((((old >> 32) + 1) & 0xFFFFFFFF) << 32) | index
            if rp_cas8(self._free_head, old, new):
                return

    # -- receiving ----------------------------------------------------------------------

    def rx_ready(self):
        return rp_load8(self._recv_head, 1) != rp_load8(self._recv_tail, 0)

    def recv_word(self):
        return rp_load4(self._recv_data_word)

    def wait_recv(self, uint32_t expected, double timeout):
        cdef long long ns = <long long>(timeout * 1e9)
        cdef void *word = self._recv_data_word
        with nogil:
            rp_futex_wait(word, expected, ns)

    def run_waiter(self, int eventfd, double timeout):
        cdef long long ns = <long long>(timeout * 1e9)
        with nogil:
            self._waiter_loop(eventfd, ns)

    cdef void _waiter_loop(self, int eventfd, long long ns) noexcept nogil:
        cdef uint32_t word
        while True:
            while rp_load4(&self._armed) == 0 and rp_load4(&self._stop) == 0:
                rp_futex_wait_forever(&self._armed, 0)
            while rp_load4(&self._stop) == 0:
                word = rp_load4(self._recv_data_word)
                if rp_load8(self._recv_head, 1) != rp_load8(self._recv_tail, 0):
                    break
                rp_futex_wait(self._recv_data_word, word, ns)
            if rp_load4(&self._stop):
                return
            rp_store4(&self._armed, 0)
            rp_notify(eventfd)

    def arm_waiter(self):
        rp_store4(&self._armed, 1)
        rp_futex_wake_private(&self._armed)

    def stop_waiter(self):
        rp_store4(&self._stop, 1)
        rp_futex_wake_private(&self._armed)

    def receive(self, Py_ssize_t limit):
        if self.failure is not None:
            return []
        cdef uint64_t tail = rp_load8(self._recv_tail, 0)
        cdef uint64_t head = rp_load8(self._recv_head, 1)
        cdef uint64_t first = tail
        if head - tail > self.capacity:
            self.failure = (
                f"the receive ring's head ({head}) is more than its capacity "
                f"({self.capacity}) ahead of its tail ({tail})"
            )
            return []
        cdef list frames = []
        cdef bint freed = False
        cdef uint64_t mask = self.capacity - 1
        cdef uint8_t *entry
        cdef uint32_t location[4]
        cdef uint32_t index, generation, offset, n, actual, state
        cdef bytes desc, payload
        cdef uint8_t *meta
        while tail != head and len(frames) < limit:
            entry = self._recv_entries + (tail & mask) * 64
            desc = PyBytes_FromStringAndSize(<char *>entry, 64)
            tail += 1
            rp_store8(self._recv_tail, tail)
            memcpy(location, PyBytes_AS_STRING(desc) + 16, 16)
            index = location[0]
            generation = location[1]
            offset = location[2]
            n = location[3]
            if index == INLINE:
                if n > 16:
                    self.failure = f"an inline payload of {n} bytes (at most 16)"
                    break
                payload = PyBytes_FromStringAndSize(PyBytes_AS_STRING(desc) + 48, n)
            else:
                if index >= self.slot_count:
                    self.failure = f"a descriptor names slot {index} of {self.slot_count}"
                    break
                meta = self._meta + index * 8
                actual = rp_load4(meta)
                if actual != generation:
                    self.failure = (
                        f"a descriptor names slot {index} generation {generation}; "
                        f"it is at {actual}"
                    )
                    break
                state = rp_load4(meta + 4)
                if state != IN_FLIGHT:
                    self.failure = (
                        f"a descriptor names slot {index}, which is not in flight (state {state})"
                    )
                    break
                if <uint64_t>offset + n > self.slot_size:
                    self.failure = (
                        f"a descriptor's payload ({n} bytes at offset {offset}) overruns "
                        f"slot {index} of {self.slot_size} bytes"
                    )
                    break
                payload = PyBytes_FromStringAndSize(
                    <char *>(self._data + <Py_ssize_t>index * self.slot_size + offset), n
                )
                if not rp_cas4(meta + 4, IN_FLIGHT, FREE):
                    self.failure = f"slot {index} was freed while its payload was read"
                    break
                self._push(index)
                freed = True
            frames.append((desc, payload))
        if tail != first:
            rp_add4(self._recv_space_word, 1)
            rp_futex_wake(self._recv_space_word)
        if freed:
            rp_add4(self._slot_available, 1)
            rp_futex_wake(self._slot_available)
        return frames
