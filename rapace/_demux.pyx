# cython: language_level=3
"""The demux, compiled: the twin of ``rapace/_demux_py.py`` (which documents the behaviour).

Sans-I/O: a channel table (channel id -> waiter or tunnel), the routing switch of the Rust
``RpcSession``'s receive loop (``docs/protocol.md`` §5) and ``start_call``. Same names, methods,
results, exceptions and messages as the pure twin; ``tests/test_demux.py`` runs both and
compares them.

The two tables are C hash tables over ``uint32`` keys: open addressing, linear probing,
Fibonacci hashing (channel ids step by 2, so the low bits alone would use half the
slots), backward-shift deletion (no tombstones), power-of-two capacity grown at 2/3 load
and halved below 1/8. A slot holds a strong reference (``Py_INCREF`` on insert,
``Py_DECREF`` on removal); ``NULL`` marks an empty slot, so channel 0 is a key like any
other. Each entry carries an insertion number so ``take_all`` returns the objects in
registration order, as the pure twin's dicts do.

Why not dicts held in typed fields (simpler, and no GC slot patch below): measured with the
paired session bench (64 in flight, 3 alternating runs per variant in one sitting), that
variant's compiled/pure ratio was 4-8% lower in all four groups (e.g. 1.61 against 1.73 for
1 KiB payloads on asyncio): boxing each channel id for the dict and a tuple per deadline
cost more than this table's code.

Re-entrancy: ``deliver``, ``done``, ``set_result``, ``on_request`` and the ``msg_ids``
iterator of ``start_call`` are Python code that may add or remove entries (and so move or
reallocate the slots). No slot pointer is held across such a call: an entry is copied into
a strong Python reference first, and removed from the table by key. The tables are visible
to the cycle collector (a session, its demux and the futures or tunnels in it form cycles).

Frames are the compiled ``Frame`` (``rapace/_frame.pxd``, final), routed on their
descriptor's C fields with no attribute lookup or int boxing; the selector never pairs
this demux with the pure twin's frames.
"""

cimport cython
from cpython.long cimport (
    PyLong_AsLongLongAndOverflow,
    PyLong_AsUnsignedLongLongMask,
    PyLong_Check,
)
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memmove, memset

from rapace cimport _flags
from rapace._frame cimport Frame, MsgDescHot, new_frame

from rapace._checks import (
    call_pending,
    check_int,
    check_number,
    clock_not_callable,
    on_control_not_callable,
    on_request_not_callable,
    reserved_method,
    tunnel_registered,
)

__all__ = ["Demux"]

cdef enum:
    _MIN_CAPACITY = 8

cdef object _SPENT = float("-inf")  # the deadline of a request whose budget is spent


_BUILT_FLAGS = {
    "DATA": _flags.DATA,
    "CONTROL": _flags.CONTROL,
    "EOS": _flags.EOS,
    "CANCEL": _flags.CANCEL,
    "ERROR": _flags.ERROR,
    "HIGH_PRIORITY": _flags.HIGH_PRIORITY,
    "CREDITS": _flags.CREDITS,
    "METADATA_ONLY": _flags.METADATA_ONLY,
    "NO_REPLY": _flags.NO_REPLY,
}
"""The flag values of ``rapace/_flags.pxd`` this module was compiled with (a test compares
them with ``rapace.flags.FrameFlags``)."""


# -- the table ---------------------------------------------------------------------------


cdef struct Slot:
    uint32_t key
    uint64_t seq          # insertion number: take_all returns registration order
    PyObject* value       # a strong reference; NULL marks an empty slot


cdef struct Table:
    Slot* slots           # NULL until the first insertion
    size_t mask           # capacity - 1 (capacity is a power of two)
    unsigned int shift    # 64 - log2(capacity), for Fibonacci hashing
    Py_ssize_t used
    uint64_t next_seq


cdef inline size_t _home(const Table* t, uint32_t key) noexcept nogil:
    return <size_t>((<uint64_t>key * <uint64_t>0x9E3779B97F4A7C15) >> t.shift)


cdef inline Slot* _find_slot(const Table* t, uint32_t key) noexcept nogil:
    cdef Slot* slots = t.slots
    cdef size_t i, mask = t.mask
    if slots == NULL:
        return NULL
    i = _home(t, key)
    while slots[i].value != NULL:
        if slots[i].key == key:
            return &slots[i]
        i = (i + 1) & mask
    return NULL


cdef inline PyObject* _find(const Table* t, uint32_t key) noexcept nogil:
    """The borrowed value stored under ``key``, or NULL."""
    cdef Slot* slot = _find_slot(t, key)
    return slot.value if slot != NULL else NULL


cdef inline void _place(Slot* slots, size_t mask, unsigned int shift, Slot entry) noexcept nogil:
    cdef size_t i = <size_t>((<uint64_t>entry.key * <uint64_t>0x9E3779B97F4A7C15) >> shift)
    while slots[i].value != NULL:
        i = (i + 1) & mask
    slots[i] = entry


cdef int _resize(Table* t, size_t capacity) noexcept:
    """Rehash into ``capacity`` slots (a power of two >= 2 * used); -1 if out of memory."""
    cdef Slot* new_slots = <Slot*>PyMem_Malloc(capacity * sizeof(Slot))
    cdef Slot* old = t.slots
    cdef size_t i, old_capacity = t.mask + 1 if old != NULL else 0
    cdef unsigned int bits = 0
    if new_slots == NULL:
        return -1
    memset(new_slots, 0, capacity * sizeof(Slot))
    while (<size_t>1 << bits) < capacity:
        bits += 1
    t.slots = new_slots
    t.mask = capacity - 1
    t.shift = 64 - bits
    for i in range(old_capacity):
        if old[i].value != NULL:
            _place(new_slots, t.mask, t.shift, old[i])
    PyMem_Free(old)
    return 0


cdef int _insert(Table* t, uint32_t key, object value) except -1:
    """Store a new reference to ``value`` under ``key``, which must be absent."""
    cdef Slot entry
    cdef size_t capacity = t.mask + 1 if t.slots != NULL else 0
    if (<size_t>t.used + 1) * 3 > capacity * 2:  # keep the load at most 2/3
        if _resize(t, capacity * 2 if capacity else _MIN_CAPACITY) < 0:
            raise MemoryError()
    entry.key = key
    entry.seq = t.next_seq
    entry.value = <PyObject*>value
    t.next_seq += 1
    Py_INCREF(value)
    _place(t.slots, t.mask, t.shift, entry)
    t.used += 1
    return 0


cdef PyObject* _pop(Table* t, uint32_t key) noexcept:
    """Remove ``key``; returns the reference the table held (now the caller's), or NULL.

    Backward-shift deletion: the entries after the hole that may move into it (their home
    is not cyclically within (hole, position]) are shifted back, so lookups never need
    tombstones. Pure C: no Python code runs while slots are being moved.
    """
    cdef Slot* slots = t.slots
    cdef size_t i, j, home, mask = t.mask, capacity
    cdef PyObject* value
    if slots == NULL:
        return NULL
    i = _home(t, key)
    while True:
        if slots[i].value == NULL:
            return NULL
        if slots[i].key == key:
            break
        i = (i + 1) & mask
    value = slots[i].value
    j = i
    while True:
        j = (j + 1) & mask
        if slots[j].value == NULL:
            break
        home = _home(t, slots[j].key)
        if ((j - home) & mask) >= ((j - i) & mask):
            slots[i] = slots[j]
            i = j
    slots[i].value = NULL
    t.used -= 1
    capacity = mask + 1
    if capacity > _MIN_CAPACITY and <size_t>t.used * 8 < capacity:
        _resize(t, capacity // 2)  # best effort: a failed shrink leaves a valid table
    return value


cdef void _detach(Table* t, Table* out) noexcept nogil:
    """Move ``t``'s entries into ``out`` and leave ``t`` empty (no reference changes)."""
    out[0] = t[0]
    t.slots = NULL
    t.mask = 0
    t.shift = 64
    t.used = 0


cdef void _release(Table* t) noexcept:
    """Drop every reference of a detached table and free it.

    A ``Py_DECREF`` may run arbitrary code (finalizers); ``t`` is no longer reachable from
    any demux by then, so that code cannot disturb this loop.
    """
    cdef size_t i
    cdef PyObject* value
    if t.slots == NULL:
        return
    for i in range(t.mask + 1):
        value = t.slots[i].value
        if value != NULL:
            t.slots[i].value = NULL
            Py_XDECREF(value)
    PyMem_Free(t.slots)
    t.slots = NULL
    t.used = 0


cdef int _cmp_u32(const void* a, const void* b) noexcept nogil:
    cdef uint32_t x = (<const uint32_t*>a)[0], y = (<const uint32_t*>b)[0]
    return (x > y) - (x < y)


cdef int _cmp_seq(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const Slot*>a).seq, y = (<const Slot*>b).seq
    return (x > y) - (x < y)


cdef list _sorted_keys(const Table* t):
    cdef Py_ssize_t n = t.used, k = 0
    cdef size_t i
    cdef uint32_t* keys
    cdef list result
    cdef object item
    if n == 0:
        return []
    keys = <uint32_t*>PyMem_Malloc(n * sizeof(uint32_t))
    if keys == NULL:
        raise MemoryError()
    try:
        for i in range(t.mask + 1):
            if t.slots[i].value != NULL:
                keys[k] = t.slots[i].key
                k += 1
        qsort(keys, n, sizeof(uint32_t), _cmp_u32)
        result = PyList_New(n)
        for k in range(n):
            item = keys[k]
            Py_INCREF(item)
            PyList_SET_ITEM(result, k, item)
        return result
    finally:
        PyMem_Free(keys)


cdef list _values_in_order(const Table* t):
    """New references to the values, in insertion order (as ``dict.values()``)."""
    cdef Py_ssize_t n = t.used, k = 0
    cdef size_t i
    cdef Slot* entries
    cdef list result
    if n == 0:
        return []
    entries = <Slot*>PyMem_Malloc(n * sizeof(Slot))
    if entries == NULL:
        raise MemoryError()
    try:
        for i in range(t.mask + 1):
            if t.slots[i].value != NULL:
                entries[k] = t.slots[i]
                k += 1
        qsort(entries, n, sizeof(Slot), _cmp_seq)
        result = PyList_New(n)
        for k in range(n):
            Py_INCREF(<object>entries[k].value)
            PyList_SET_ITEM(result, k, <object>entries[k].value)
        return result
    finally:
        PyMem_Free(entries)


# -- channel ids as keys -----------------------------------------------------------------


cdef inline bint _as_key(object channel_id, uint32_t* key) except -1:
    """Whether ``channel_id`` names a possible table entry (stored in ``key``): an int in
    0..0xFFFFFFFF. Anything else names no entry, as in the pure twin."""
    cdef long long value
    cdef int overflow = 0
    if not PyLong_Check(channel_id):
        return False
    value = PyLong_AsLongLongAndOverflow(channel_id, &overflow)
    if overflow or value < 0 or value > 0xFFFFFFFF:
        return False
    key[0] = <uint32_t>value
    return True


cdef bint _discard(Table* t, object channel_id, object value) except -1:
    """Remove the entry of ``channel_id`` if it is ``value`` itself (an identity check)."""
    cdef uint32_t key
    cdef PyObject* found = NULL
    if _as_key(channel_id, &key):
        found = _find(t, key)
    if found == NULL or found != <PyObject*>value:
        return False
    Py_XDECREF(_pop(t, key))  # the caller's `value` keeps the object alive
    return True


# -- call deadlines ----------------------------------------------------------------------


cdef struct Deadline:
    double when
    uint64_t seq          # the waiter's insertion number: identifies that very call
    uint32_t channel_id
    uint32_t method_id


cdef inline bint _is_live(const Table* waiters, const Deadline* d) noexcept nogil:
    """The call is still pending: its own waiter (not a later one) is registered."""
    cdef Slot* slot = _find_slot(waiters, d.channel_id)
    return slot != NULL and slot.seq == d.seq


cdef inline uint32_t _u32_arg(str name, object value) except? 0xFFFFFFFF:
    """``value`` as a C integer; anything but an int in range gets the shared check's error."""
    cdef int overflow = 0
    cdef long long v
    if PyLong_Check(value):
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if not overflow and 0 <= v <= 0xFFFFFFFF:
            return <uint32_t>v
    return <uint32_t>check_int(name, value, 0xFFFFFFFF)


cdef inline uint64_t _u64_arg(str name, object value) except? 0xFFFFFFFFFFFFFFFF:
    """As ``_u32_arg``, for a u64 field."""
    cdef int overflow = 0
    cdef long long v
    if PyLong_Check(value):
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if not overflow and v >= 0:
            return <uint64_t>v
    return PyLong_AsUnsignedLongLongMask(check_int(name, value, 0xFFFFFFFFFFFFFFFF))


cdef inline int _number_arg(str name, object value) except -1:
    """``check_number`` with a C fast path for what the session passes (a float)."""
    if type(value) is not float:
        check_number(name, value)  # ints pass too; anything else raises its message
    return 0


# -- the demux ---------------------------------------------------------------------------


@cython.final
@cython.auto_pickle(False)
cdef class Demux:
    """Routes incoming frames by channel: tunnel first, then response, then request.

    Channel ids are ints in 0..0xFFFFFFFF: registering anything else is refused, and a
    lookup by anything else finds nothing (the tables have ``uint32`` keys).
    """

    cdef object _on_request
    cdef object _on_control  # None: control frames are ignored
    cdef object _clock  # None: a request comes alone; else with its deadline on this clock
    cdef long long _max_calls  # -1: no limit
    cdef Table _waiters
    cdef Table _tunnels
    cdef Deadline* _deadlines  # FIFO [_dl_head, _dl_end) of armed deadlines, expiry order
    cdef Py_ssize_t _dl_head
    cdef Py_ssize_t _dl_end
    cdef Py_ssize_t _dl_cap

    def __cinit__(self, *args, **kwargs):
        memset(&self._waiters, 0, sizeof(Table))
        memset(&self._tunnels, 0, sizeof(Table))
        self._waiters.shift = 64
        self._tunnels.shift = 64

    def __init__(self, on_request, max_calls=None, on_control=None, clock=None):
        if not callable(on_request):
            raise on_request_not_callable()
        if on_control is not None and not callable(on_control):
            raise on_control_not_callable()
        if clock is not None and not callable(clock):
            raise clock_not_callable()
        self._max_calls = -1 if max_calls is None else _u32_arg("max_calls", max_calls)
        self._on_request = on_request
        self._on_control = on_control
        self._clock = clock
        self._clear_tables()

    @property
    def clock(self):
        """What request deadlines are read on (None: ``on_request(frame)`` alone)."""
        return self._clock

    @clock.setter
    def clock(self, clock):
        if clock is not None and not callable(clock):
            raise clock_not_callable()
        self._clock = clock

    cdef object _deadline_of(self, uint64_t budget):
        """A request's deadline on the clock: None (it has none), -inf (its budget is
        spent), or now plus its budget of nanoseconds."""
        if budget == 0xFFFFFFFFFFFFFFFF:
            return None
        if budget == 0:
            return _SPENT
        return <double>self._clock() + budget * 1e-9

    def __dealloc__(self):
        self._clear_tables()
        PyMem_Free(self._deadlines)
        self._deadlines = NULL

    cdef void _clear_tables(self) noexcept:
        cdef Table waiters, tunnels
        _detach(&self._waiters, &waiters)
        _detach(&self._tunnels, &tunnels)
        _release(&waiters)
        _release(&tunnels)

    # -- deadlines of pending calls -----------------------------------------------------

    cdef int _push_deadline(
        self, double when, uint64_t seq, uint32_t key, uint32_t method
    ) except -1:
        """Append a deadline to the FIFO (the call's waiter has insertion number ``seq``)."""
        cdef Py_ssize_t cap
        cdef Deadline* grown
        self._trim_deadlines()
        if self._dl_end == self._dl_cap:
            if self._dl_head:
                memmove(self._deadlines, self._deadlines + self._dl_head,
                        (self._dl_end - self._dl_head) * sizeof(Deadline))
                self._dl_end -= self._dl_head
                self._dl_head = 0
            else:
                cap = self._dl_cap * 2 if self._dl_cap else 64
                grown = <Deadline*>PyMem_Realloc(self._deadlines, cap * sizeof(Deadline))
                if grown == NULL:
                    raise MemoryError()
                self._deadlines = grown
                self._dl_cap = cap
        cdef Deadline* d = &self._deadlines[self._dl_end]
        d.when = when
        d.seq = seq
        d.channel_id = key
        d.method_id = method
        self._dl_end += 1
        return 0

    cdef void _trim_deadlines(self) noexcept:
        """Drop ended calls from the front; compact when ended ones pile up behind it."""
        cdef Deadline* dl = self._deadlines
        cdef Py_ssize_t i, kept
        while self._dl_head < self._dl_end and not _is_live(&self._waiters, &dl[self._dl_head]):
            self._dl_head += 1
        if self._dl_head == self._dl_end:
            self._dl_head = self._dl_end = 0
        elif (self._dl_end - self._dl_head > 64
              and self._dl_end - self._dl_head > 4 * self._waiters.used):
            kept = 0
            for i in range(self._dl_head, self._dl_end):
                if _is_live(&self._waiters, &dl[i]):
                    dl[kept] = dl[i]
                    kept += 1
            self._dl_head = 0
            self._dl_end = kept

    def pop_expired(self, now):
        """Deadlines due at ``now``: (channel_id, method_id, waiter) of calls still pending."""
        _number_arg("now", now)
        cdef double limit = now
        cdef list expired = []
        cdef Deadline d
        cdef Slot* slot
        self._trim_deadlines()
        while self._dl_head < self._dl_end and self._deadlines[self._dl_head].when <= limit:
            d = self._deadlines[self._dl_head]
            self._dl_head += 1
            slot = _find_slot(&self._waiters, d.channel_id)
            if slot != NULL and slot.seq == d.seq:
                expired.append((d.channel_id, d.method_id, <object>slot.value))
        if self._dl_head == self._dl_end:
            self._dl_head = self._dl_end = 0
        return expired

    def next_deadline(self):
        """When the earliest pending call's deadline falls, or None."""
        self._trim_deadlines()
        if self._dl_head < self._dl_end:
            return self._deadlines[self._dl_head].when
        return None

    def start_call(
        self, channel_id, method_id, payload, msg_ids, waiter, deadline, deadline_ns=0xFFFFFFFFFFFFFFFF
    ):
        """Register a unary call and return its request frame (``DATA|EOS``) to send.

        ``deadline_ns`` goes into the frame as it is (the call's budget on the wire).
        What a call needs before it is sent, in one step, checked in this order: the
        fields and payload (as ``build_frame`` checks them), ``deadline_ns``, a ``method_id`` of 0
        (refused), ``deadline`` (None or a number); then, when ``max_calls`` calls are
        pending, None is returned and nothing done; a channel with a pending call is
        refused. Only then is the frame's ``msg_id`` taken from the iterator ``msg_ids``
        (ids are spent on sent frames only), ``waiter`` registered and, unless
        ``deadline`` is None, the call's deadline armed. Deadlines must come in expiry
        order (the session gives every call the same delay); an ended call needs no
        disarming: its entry is dropped once its waiter is no longer registered.
        """
        cdef uint32_t key = _u32_arg("channel_id", channel_id)
        cdef uint32_t method = _u32_arg("method_id", method_id)
        cdef double when = 0.0
        cdef uint64_t seq
        # The frame's msg_id comes last, once every check has passed.
        cdef Frame frame = new_frame(0, key, method, _flags.DATA | _flags.EOS, payload)
        frame._desc.raw.deadline_ns = _u64_arg("deadline_ns", deadline_ns)
        if method == 0:
            raise reserved_method()
        if deadline is not None:
            _number_arg("when", deadline)
            when = deadline
        if self._max_calls >= 0 and self._waiters.used >= self._max_calls:
            return None
        if _find(&self._waiters, key) != NULL:
            raise call_pending(channel_id)
        frame._desc.raw.msg_id = _u64_arg("msg_id", next(msg_ids))
        if _find(&self._waiters, key) != NULL:  # next() ran Python code that registered it
            raise call_pending(channel_id)
        seq = self._waiters.next_seq
        _insert(&self._waiters, key, waiter)
        if deadline is not None:
            try:
                self._push_deadline(when, seq, key, method)
            except MemoryError:  # leave nothing behind
                Py_XDECREF(_pop(&self._waiters, key))
                raise
        return frame

    @property
    def max_calls(self):
        """Pending calls beyond which ``start_call`` refuses (None: no limit)."""
        return None if self._max_calls < 0 else self._max_calls

    def discard_waiter(self, channel_id, waiter):
        """Remove ``waiter`` if it is still the one registered on ``channel_id``."""
        return _discard(&self._waiters, channel_id, waiter)

    def waiter_ids(self):
        return _sorted_keys(&self._waiters)

    # -- tunnels -----------------------------------------------------------------------

    def add_tunnel(self, channel_id, tunnel):
        """Register a tunnel on ``channel_id``; registering a channel twice is refused."""
        cdef uint32_t key = _u32_arg("channel_id", channel_id)
        if _find(&self._tunnels, key) != NULL:
            raise tunnel_registered(channel_id)
        _insert(&self._tunnels, key, tunnel)

    def remove_tunnel(self, channel_id):
        """Unregister the tunnel on ``channel_id``; returns it, or None if there was none."""
        cdef uint32_t key
        cdef PyObject* value
        if not _as_key(channel_id, &key):
            return None
        value = _pop(&self._tunnels, key)
        if value == NULL:
            return None
        tunnel = <object>value  # a new reference ...
        Py_DECREF(tunnel)       # ... replacing the table's
        return tunnel

    def discard_tunnel(self, channel_id, tunnel):
        """Remove ``tunnel`` if it is still the one registered on ``channel_id``."""
        return _discard(&self._tunnels, channel_id, tunnel)

    def tunnel_ids(self):
        return _sorted_keys(&self._tunnels)

    # -- shutdown ----------------------------------------------------------------------

    def take_all(self):
        """Empty both tables and return (waiters, tunnels), so the owner can fail them."""
        cdef Table waiters, tunnels
        # Detach first: building the lists allocates, which may run the cycle collector
        # and finalizers that call back into this demux; they find it already empty.
        _detach(&self._waiters, &waiters)
        _detach(&self._tunnels, &tunnels)
        self._dl_head = self._dl_end = 0
        try:
            return _values_in_order(&waiters), _values_in_order(&tunnels)
        finally:
            _release(&waiters)  # the lists hold their own references
            _release(&tunnels)

    # -- the switch --------------------------------------------------------------------

    cdef bint _route(self, Frame frame) except -1:
        """Route one frame (``docs/protocol.md`` §5); True if it is a response nobody waits for.

        Tunnel first (any frame on its channel), then response (method id 0), then
        request (``DATA`` with a method id), then a control frame (``CONTROL`` on channel
        0, method id = verb) to ``on_control``; anything else is ignored.
        """
        cdef MsgDescHot desc
        cdef uint32_t key
        cdef PyObject* found
        cdef PyObject* taken
        if frame is None or frame._desc is None:
            getattr(frame, "desc")  # no frame, or one never filled: the pure twin's error
        desc = frame._desc
        key = desc.raw.channel_id
        if self._tunnels.used:
            found = _find(&self._tunnels, key)
            if found != NULL and <object>found is not None:
                tunnel = <object>found  # a strong reference for the call below
                if desc.raw.flags & _flags.EOS:
                    # Unregister before delivering: deliver() may register the channel again.
                    Py_XDECREF(_pop(&self._tunnels, key))
                tunnel.deliver(frame)
                return False
        if desc.raw.method_id == 0:
            taken = _pop(&self._waiters, key)
            if taken == NULL:
                return True
            waiter = <object>taken
            Py_DECREF(waiter)  # `waiter` now holds the table's reference
            if waiter is None:
                return True
            if not waiter.done():
                waiter.set_result(frame)
        elif desc.raw.flags & _flags.DATA:
            if self._clock is None:
                self._on_request(frame)
            else:
                self._on_request(frame, self._deadline_of(desc.raw.deadline_ns))
        elif desc.raw.flags & _flags.CONTROL and key == 0 and self._on_control is not None:
            self._on_control(frame)
        return False

    def route_many(self, frames, on_unroutable):
        """Route a batch of compiled frames; each dropped response goes to
        ``on_unroutable(frame)``."""
        cdef Py_ssize_t i = 0
        if type(frames) is list:
            # As list iteration does: re-read the length each step (a callback may append).
            while i < PyList_GET_SIZE(frames):
                frame = <object>PyList_GET_ITEM(frames, i)
                i += 1
                if self._route(frame):
                    on_unroutable(frame)
        else:
            for frame in frames:
                if self._route(frame):
                    on_unroutable(frame)


# -- the cycle collector sees the tables ---------------------------------------------------
#
# Cython generates tp_traverse/tp_clear for the ``object`` fields only, and has no
# directive or special method for adding references it cannot see (those in the C
# tables). They are added by wrapping those slots once, at import, before any instance
# exists: a session, its demux and the futures/tunnels in the tables form reference
# cycles that must stay collectable, as they are with the pure twin's dicts.

cdef extern from "Python.h":
    ctypedef int (*_visitproc "visitproc")(PyObject*, void*) noexcept
    ctypedef int (*_traverseproc "traverseproc")(PyObject*, _visitproc, void*) noexcept
    ctypedef int (*_inquiry "inquiry")(PyObject*) noexcept

    ctypedef struct _GcTypeObject "PyTypeObject":
        _traverseproc tp_traverse
        _inquiry tp_clear


cdef _traverseproc _cython_traverse = NULL
cdef _inquiry _cython_clear = NULL


cdef int _visit_table(const Table* t, _visitproc visit, void* arg) noexcept:
    cdef size_t i
    cdef int result
    if t.slots == NULL:
        return 0
    for i in range(t.mask + 1):
        if t.slots[i].value != NULL:
            result = visit(t.slots[i].value, arg)
            if result:
                return result
    return 0


cdef int _demux_traverse(PyObject* o, _visitproc visit, void* arg) noexcept:
    cdef int result = _cython_traverse(o, visit, arg) if _cython_traverse != NULL else 0
    if result:
        return result
    result = _visit_table(&(<Demux>o)._waiters, visit, arg)
    if result:
        return result
    return _visit_table(&(<Demux>o)._tunnels, visit, arg)


cdef int _demux_clear(PyObject* o) noexcept:
    (<Demux>o)._clear_tables()
    return _cython_clear(o) if _cython_clear != NULL else 0


cdef _GcTypeObject* _demux_type = <_GcTypeObject*>Demux
_cython_traverse = _demux_type.tp_traverse
_cython_clear = _demux_type.tp_clear
_demux_type.tp_traverse = _demux_traverse
_demux_type.tp_clear = _demux_clear
