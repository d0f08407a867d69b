"""The frame codec, compiled: the twin of ``rapace/_frame_py.py``, which is the reference.

Same API, bytes, frames and exceptions as the pure twin (``docs/protocol.md`` §1-4). It is
faster because a descriptor is a C struct filled and emptied with one memcpy, and the
decoder parses frames straight out of the caller's buffer. Error paths call the checks
both twins share (``rapace/_checks.py``), so the two twins' messages cannot drift apart;
this module never imports its pure twin.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_Check,
    PyByteArray_CheckExact,
    PyByteArray_GET_SIZE,
)
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_Check,
    PyBytes_CheckExact,
    PyBytes_FromObject,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong, PyLong_Check
from cpython.memoryview cimport PyMemoryView_Check
from cpython.number cimport PyNumber_Index
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport UINT32_MAX, UINT64_MAX, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcmp, memcpy, memset

from rapace._flags cimport DESC_SIZE, INLINE_PAYLOAD_SIZE

from rapace._checks import (
    DEFAULT_MAX_PAYLOAD_SIZE,
    DESC_FIELDS,
    as_bytes,
    bad_inline_location,
    byte_view,
    check_inline,
    check_int,
    check_offset,
    decoder_failed,
    decoder_state,
    decoder_state_parts,
    desc_repr,
    frame_too_short,
    inline_len_too_long,
    inline_payload_too_long,
    message_too_short,
    missing_payload,
    not_a_desc,
    not_a_frame,
    over_max_payload,
    payload_too_long,
)
from rapace.errors import FrameError
from rapace.flags import INLINE_PAYLOAD_SLOT, NO_DEADLINE

__all__ = [
    "DEFAULT_MAX_PAYLOAD_SIZE",
    "Frame",
    "FrameDecoder",
    "MsgDescHot",
    "build_frame",
    "encode_frame",
    "encode_message",
    "reply_frame",
    "validate_descriptor",
]

cdef enum:
    PREFIX_SIZE = 4
    MIN_BUFFER = 256          # smallest allocation for a decoder's pending frame
    IDLE_BUFFER_MAX = 65536   # an idle decoder frees a larger buffer

_BUILT_SIZES = {"DESC_SIZE": DESC_SIZE, "INLINE_PAYLOAD_SIZE": INLINE_PAYLOAD_SIZE}
"""The sizes of ``rapace/_flags.pxd`` this module was compiled with (a test compares them
with ``rapace.flags``)."""

cdef bytes _ZERO_INLINE = bytes(INLINE_PAYLOAD_SIZE)
cdef object _U64_MAX = UINT64_MAX


# ---------------------------------------------------------------------------------------
# Byte order. The wire is little-endian; RawDesc holds host order, so that the demux can
# read fields directly. -DRAPACE_BIG_ENDIAN=1 forces the swapping path, to test it on a
# little-endian host.

cdef extern from *:
    """
    #ifndef RAPACE_BIG_ENDIAN
    #define RAPACE_BIG_ENDIAN PY_BIG_ENDIAN
    #endif
    #if RAPACE_BIG_ENDIAN
    static inline uint32_t rapace_le32(uint32_t x) {
        return (x >> 24) | ((x >> 8) & 0xff00u) | ((x << 8) & 0xff0000u) | (x << 24);
    }
    static inline uint64_t rapace_le64(uint64_t x) {
        return ((uint64_t)rapace_le32((uint32_t)x) << 32) | rapace_le32((uint32_t)(x >> 32));
    }
    #else
    #define rapace_le32(x) (x)
    #define rapace_le64(x) (x)
    #endif
    """
    const bint RAPACE_BIG_ENDIAN
    uint32_t rapace_le32(uint32_t x) noexcept nogil
    uint64_t rapace_le64(uint64_t x) noexcept nogil


cdef inline void _swap(RawDesc* d) noexcept nogil:
    d.msg_id = rapace_le64(d.msg_id)
    d.channel_id = rapace_le32(d.channel_id)
    d.method_id = rapace_le32(d.method_id)
    d.payload_slot = rapace_le32(d.payload_slot)
    d.payload_generation = rapace_le32(d.payload_generation)
    d.payload_offset = rapace_le32(d.payload_offset)
    d.payload_len = rapace_le32(d.payload_len)
    d.flags = rapace_le32(d.flags)
    d.credit_grant = rapace_le32(d.credit_grant)
    d.deadline_ns = rapace_le64(d.deadline_ns)


cdef inline void _load(RawDesc* d, const unsigned char* src) noexcept nogil:
    memcpy(d, src, DESC_SIZE)
    if RAPACE_BIG_ENDIAN:
        _swap(d)


cdef inline void _store(const RawDesc* d, unsigned char* dst) noexcept nogil:
    memcpy(dst, d, DESC_SIZE)
    if RAPACE_BIG_ENDIAN:
        _swap(<RawDesc*>dst)


cdef inline uint32_t _load_u32(const unsigned char* src) noexcept nogil:
    cdef uint32_t value
    memcpy(&value, src, PREFIX_SIZE)
    return rapace_le32(value)


cdef inline void _store_u32(unsigned char* dst, uint32_t value) noexcept nogil:
    value = rapace_le32(value)
    memcpy(dst, &value, PREFIX_SIZE)


# ---------------------------------------------------------------------------------------
# Argument checks: a C fast path for the values the pure twin accepts; anything else goes
# to the shared check, which raises the pure twin's exact error.

cdef inline uint64_t _uint(str name, object value, uint64_t maximum) except? 0:
    """``value`` as a C integer when it is an int in 0..maximum."""
    cdef int overflow = 0
    cdef long long v
    if PyLong_Check(value):
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0:
            if v >= 0 and <uint64_t>v <= maximum:
                return <uint64_t>v
        elif overflow > 0 and maximum == UINT64_MAX and value <= _U64_MAX:
            return PyLong_AsUnsignedLongLong(value)
    return check_int(name, value, maximum)


cdef Py_ssize_t _offset(object offset, Py_ssize_t size) except -1:
    """``offset`` as a C index when a whole descriptor follows it in ``size`` bytes."""
    cdef int overflow = 0
    cdef long long v
    if PyLong_Check(offset):
        v = PyLong_AsLongLongAndOverflow(offset, &overflow)
        if overflow == 0 and 0 <= v <= size - DESC_SIZE:
            return <Py_ssize_t>v
    check_offset(offset, size)
    # Only an int-like the pure check passes gets here; its plain value decides.
    return _offset(PyNumber_Index(offset), size)


cdef inline void _copy_inline(RawDesc* d, const char* src, Py_ssize_t n) noexcept nogil:
    memcpy(d.inline_payload, src, n)
    memset(d.inline_payload + n, 0, INLINE_PAYLOAD_SIZE - n)


cdef int _set_inline(RawDesc* d, object value) except -1:
    cdef bytes padded
    if PyBytes_CheckExact(value) and PyBytes_GET_SIZE(value) <= INLINE_PAYLOAD_SIZE:
        _copy_inline(d, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))
    elif PyByteArray_CheckExact(value) and PyByteArray_GET_SIZE(value) <= INLINE_PAYLOAD_SIZE:
        _copy_inline(d, PyByteArray_AS_STRING(value), PyByteArray_GET_SIZE(value))
    else:  # too long, not bytes-like, or a memoryview or subclass: the shared check decides
        padded = check_inline(value)
        memcpy(d.inline_payload, PyBytes_AS_STRING(padded), INLINE_PAYLOAD_SIZE)
    return 0


cdef inline bytes _payload_bytes(object data):
    """``as_bytes`` with a C path: bytes kept as they are, other bytes-likes copied."""
    if PyBytes_CheckExact(data):
        return <bytes>data
    if PyByteArray_CheckExact(data) or PyMemoryView_Check(data):
        return PyBytes_FromObject(data)  # what bytes(data) does for these types
    return as_bytes(data)


cdef inline void _place_raw(RawDesc* d, const char* src, uint32_t n) noexcept nogil:
    """Set the location fields for ``n`` payload bytes at ``src`` (``docs/protocol.md`` §3)."""
    d.payload_generation = 0
    d.payload_offset = 0
    d.payload_len = n
    if n <= INLINE_PAYLOAD_SIZE:
        d.payload_slot = UINT32_MAX
        _copy_inline(d, src, n)
    else:
        d.payload_slot = 0
        memset(d.inline_payload, 0, INLINE_PAYLOAD_SIZE)


cdef inline int _place(RawDesc* d, bytes payload) except -1:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
    if <uint64_t>n > UINT32_MAX - DESC_SIZE:  # the stream's u32 length prefix covers the descriptor
        raise payload_too_long(n)
    _place_raw(d, PyBytes_AS_STRING(payload), <uint32_t>n)
    return 0


cdef int _validate(const RawDesc* d, uint64_t max_payload, object max_payload_size) except -1:
    """The inline rules and the size limit; ``max_payload_size`` as given, for the message."""
    cdef uint32_t n = d.payload_len
    if d.payload_slot == UINT32_MAX:
        if n > INLINE_PAYLOAD_SIZE:
            raise inline_len_too_long(n)
        if d.payload_generation or d.payload_offset:
            raise bad_inline_location(d.payload_generation, d.payload_offset)
    if n > max_payload:
        raise over_max_payload(n, max_payload_size)
    return 0


# ---------------------------------------------------------------------------------------

@cython.freelist(1024)  # one 64 KiB read's worth of the smallest frames
cdef class MsgDescHot:
    """The 64-byte message descriptor (``docs/protocol.md`` §1), field names as in Rust.

    Mutable, like the Rust struct; every setter checks its field's range so a bad value
    fails where it is assigned, not later when the descriptor is packed.
    """

    def __init__(
        self,
        *,
        msg_id=0,
        channel_id=0,
        method_id=0,
        payload_slot=INLINE_PAYLOAD_SLOT,
        payload_generation=0,
        payload_offset=0,
        payload_len=0,
        flags=0,
        credit_grant=0,
        deadline_ns=NO_DEADLINE,
        inline_payload=_ZERO_INLINE,
    ):
        self.raw.msg_id = _uint("msg_id", msg_id, UINT64_MAX)
        self.raw.channel_id = <uint32_t>_uint("channel_id", channel_id, UINT32_MAX)
        self.raw.method_id = <uint32_t>_uint("method_id", method_id, UINT32_MAX)
        self.raw.payload_slot = <uint32_t>_uint("payload_slot", payload_slot, UINT32_MAX)
        self.raw.payload_generation = <uint32_t>_uint(
            "payload_generation", payload_generation, UINT32_MAX
        )
        self.raw.payload_offset = <uint32_t>_uint("payload_offset", payload_offset, UINT32_MAX)
        self.raw.payload_len = <uint32_t>_uint("payload_len", payload_len, UINT32_MAX)
        self.raw.flags = <uint32_t>_uint("flags", flags, UINT32_MAX)
        self.raw.credit_grant = <uint32_t>_uint("credit_grant", credit_grant, UINT32_MAX)
        self.raw.deadline_ns = _uint("deadline_ns", deadline_ns, UINT64_MAX)
        _set_inline(&self.raw, inline_payload)

    @property
    def msg_id(self):
        """Sender's message number, from 1 upward."""
        return self.raw.msg_id

    @msg_id.setter
    def msg_id(self, value):
        self.raw.msg_id = _uint("msg_id", value, UINT64_MAX)

    @property
    def channel_id(self):
        """Logical channel; 0 is notifications and control."""
        return self.raw.channel_id

    @channel_id.setter
    def channel_id(self, value):
        self.raw.channel_id = <uint32_t>_uint("channel_id", value, UINT32_MAX)

    @property
    def method_id(self):
        """FNV-1a method id; 0 for responses and tunnel data."""
        return self.raw.method_id

    @method_id.setter
    def method_id(self, value):
        self.raw.method_id = <uint32_t>_uint("method_id", value, UINT32_MAX)

    @property
    def payload_slot(self):
        """0xFFFFFFFF when the payload is inline."""
        return self.raw.payload_slot

    @payload_slot.setter
    def payload_slot(self, value):
        self.raw.payload_slot = <uint32_t>_uint("payload_slot", value, UINT32_MAX)

    @property
    def payload_generation(self):
        """Shared-memory slot generation."""
        return self.raw.payload_generation

    @payload_generation.setter
    def payload_generation(self, value):
        self.raw.payload_generation = <uint32_t>_uint("payload_generation", value, UINT32_MAX)

    @property
    def payload_offset(self):
        """Offset of the payload in its slot."""
        return self.raw.payload_offset

    @payload_offset.setter
    def payload_offset(self, value):
        self.raw.payload_offset = <uint32_t>_uint("payload_offset", value, UINT32_MAX)

    @property
    def payload_len(self):
        """Payload length in bytes."""
        return self.raw.payload_len

    @payload_len.setter
    def payload_len(self, value):
        self.raw.payload_len = <uint32_t>_uint("payload_len", value, UINT32_MAX)

    @property
    def flags(self):
        """FrameFlags bits, as a plain int."""
        return self.raw.flags

    @flags.setter
    def flags(self, value):
        self.raw.flags = <uint32_t>_uint("flags", value, UINT32_MAX)

    @property
    def credit_grant(self):
        """Flow-control credits granted."""
        return self.raw.credit_grant

    @credit_grant.setter
    def credit_grant(self, value):
        self.raw.credit_grant = <uint32_t>_uint("credit_grant", value, UINT32_MAX)

    @property
    def deadline_ns(self):
        """The call's deadline (on byte streams its budget in ns); 2**64-1: none."""
        return self.raw.deadline_ns

    @deadline_ns.setter
    def deadline_ns(self, value):
        self.raw.deadline_ns = _uint("deadline_ns", value, UINT64_MAX)

    @property
    def inline_payload(self):
        """The 16 inline payload bytes (zero padded)."""
        return PyBytes_FromStringAndSize(<const char*>self.raw.inline_payload, INLINE_PAYLOAD_SIZE)

    @inline_payload.setter
    def inline_payload(self, value):
        _set_inline(&self.raw, value)

    def pack(self):
        """The descriptor's 64 wire bytes."""
        cdef bytes out = PyBytes_FromStringAndSize(NULL, DESC_SIZE)
        _store(&self.raw, <unsigned char*>PyBytes_AS_STRING(out))
        return out

    @classmethod
    def unpack(cls, buffer, offset=0):
        """Read a descriptor from 64 bytes of ``buffer`` starting at ``offset``."""
        cdef Py_buffer view
        cdef const unsigned char* src
        if PyBytes_CheckExact(buffer):  # the usual case: no buffer to acquire
            src = <const unsigned char*>PyBytes_AS_STRING(buffer)
            return _unpack_at(src + _offset(offset, PyBytes_GET_SIZE(buffer)))
        if not (PyBytes_Check(buffer) or PyByteArray_Check(buffer) or PyMemoryView_Check(buffer)):
            buffer = byte_view(buffer)
        try:
            PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
        except BufferError:  # a strided view: read a compact copy, as the pure twin does
            buffer = byte_view(buffer)
            PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
        try:
            src = <const unsigned char*>view.buf
            return _unpack_at(src + _offset(offset, view.len))
        finally:
            PyBuffer_Release(&view)

    def copy(self):
        """An independent copy (the Rust descriptor is ``Copy``)."""
        cdef MsgDescHot desc = MsgDescHot.__new__(MsgDescHot)
        desc.raw = self.raw
        return desc

    def __eq__(self, other):
        if not isinstance(other, MsgDescHot):
            return NotImplemented
        return memcmp(&self.raw, &(<MsgDescHot>other).raw, DESC_SIZE) == 0

    def __repr__(self):
        return desc_repr(self)

    def __reduce__(self):
        # Pickling, copy.copy and deepcopy work as on the pure twin (Frame's are Cython's).
        return (type(self).unpack, (self.pack(),))

    def __delattr__(self, name):
        # Without this, deleting a field raises NotImplementedError; the pure twin's
        # properties raise this AttributeError.
        if name in DESC_FIELDS:
            raise AttributeError(
                f"property {name!r} of {type(self).__name__!r} object has no deleter"
            )
        object.__delattr__(self, name)


cdef MsgDescHot _unpack_at(const unsigned char* src):
    cdef MsgDescHot desc = MsgDescHot.__new__(MsgDescHot)
    _load(&desc.raw, src)
    return desc


# ---------------------------------------------------------------------------------------

cdef inline object _unset(object obj, str name):
    """The pure twin's error for a frame made with ``Frame.__new__`` alone."""
    return AttributeError(f"'{type(obj).__name__}' object has no attribute '{name}'")


cdef int _adopt(Frame frame, object desc, object data) except -1:
    """Fill ``frame``: ``desc`` is adopted and its location fields set to match the payload."""
    cdef bytes payload
    if not isinstance(desc, MsgDescHot):
        raise not_a_desc(desc)
    payload = _payload_bytes(data)
    _place(&(<MsgDescHot>desc).raw, payload)
    frame._desc = desc
    frame._payload = payload
    return 0


cdef Frame _make_frame(object desc, object data):
    cdef Frame frame = Frame.__new__(Frame)
    _adopt(frame, desc, data)
    return frame


# Untracked by the cyclic GC (decoding is ~30% faster): a frame holds only a descriptor
# and bytes, which cannot point back to it (both classes are final).
@cython.no_gc
@cython.freelist(1024)  # one 64 KiB read's worth of the smallest frames
cdef class Frame:
    """A descriptor and its payload bytes.

    The descriptor passed to a constructor is adopted, not copied: its location fields
    (``payload_slot``, ``payload_generation``, ``payload_offset``, ``payload_len`` and
    ``inline_payload``) are set to match the payload, as ``docs/protocol.md`` §3 says.
    """

    def __init__(self, desc, payload=b""):
        _adopt(self, desc, payload)

    @classmethod
    def with_inline_payload(cls, desc, data):
        """A frame whose payload travels inside the descriptor; more than 16 bytes raises."""
        cdef bytes payload = _payload_bytes(data)
        if PyBytes_GET_SIZE(payload) > INLINE_PAYLOAD_SIZE:
            raise inline_payload_too_long(len(payload))
        return _make_frame(desc, payload)

    @classmethod
    def with_payload(cls, desc, data):
        """A frame placed by size: inline up to 16 bytes, out of line beyond."""
        return _make_frame(desc, data)

    @property
    def desc(self):
        if self._desc is None:
            raise _unset(self, "_desc")
        return self._desc

    @property
    def payload(self):
        """The payload bytes, wherever they travel."""
        if self._payload is None:
            raise _unset(self, "_payload")
        return self._payload

    def __eq__(self, other):
        if not isinstance(other, Frame):
            return NotImplemented
        return self.payload == other.payload and self.desc == other.desc

    def __repr__(self):
        return f"Frame(desc={self.desc!r}, payload={self.payload!r})"


cdef Frame new_frame(
    uint64_t msg_id, uint32_t channel_id, uint32_t method_id, uint32_t flags, object payload
):
    """A frame from fields already in range: ``build_frame`` and the demux build with it."""
    cdef MsgDescHot desc = MsgDescHot.__new__(MsgDescHot)
    cdef Frame frame
    cdef bytes data = _payload_bytes(payload)
    desc.raw.msg_id = msg_id
    desc.raw.channel_id = channel_id
    desc.raw.method_id = method_id
    desc.raw.flags = flags
    desc.raw.credit_grant = 0
    desc.raw.deadline_ns = UINT64_MAX
    _place(&desc.raw, data)
    frame = Frame.__new__(Frame)
    frame._desc = desc
    frame._payload = data
    return frame


def build_frame(msg_id, channel_id, method_id, flags, payload=b""):
    """A new frame in one call: the session's hot path for outgoing frames."""
    cdef uint64_t msg = _uint("msg_id", msg_id, UINT64_MAX)
    cdef uint32_t channel = <uint32_t>_uint("channel_id", channel_id, UINT32_MAX)
    cdef uint32_t method = <uint32_t>_uint("method_id", method_id, UINT32_MAX)
    cdef uint32_t bits = <uint32_t>_uint("flags", flags, UINT32_MAX)
    return new_frame(msg, channel, method, bits, payload)


def reply_frame(request, flags, payload=b""):
    """A frame answering ``request``: on its channel, echoing its ``msg_id``, method id 0.

    The session answers every request with one (``docs/protocol.md`` §6; the ``msg_id`` echo is
    this project's extension). A compiled ``Frame`` is read in C; any other frame-like
    object through ``request.desc``, as the pure twin does.
    """
    cdef MsgDescHot req
    if type(request) is Frame and (<Frame>request)._desc is not None:
        req = (<Frame>request)._desc
        return new_frame(
            req.raw.msg_id, req.raw.channel_id, 0, <uint32_t>_uint("flags", flags, UINT32_MAX),
            payload,
        )
    desc = request.desc
    return build_frame(desc.msg_id, desc.channel_id, 0, flags, payload)


def encode_frame(frame):
    """``[frame_len u32][descriptor][payload]``, as the Rust sender writes it.

    The payload follows the descriptor even when it is also inline (``docs/protocol.md`` §4).
    """
    return _encode(frame, PREFIX_SIZE)


def encode_message(frame):
    """``[descriptor][payload]``: ``encode_frame`` without the length prefix, for a
    transport whose messages carry their own length (WebSocket, Rust framing)."""
    return _encode(frame, 0)


cdef bytes _encode(object frame, Py_ssize_t prefix):
    """The frame's bytes after ``prefix`` bytes (0, or the 4-byte length prefix)."""
    cdef Frame f
    cdef Py_ssize_t n
    cdef bytes out
    cdef unsigned char* dst
    if not isinstance(frame, Frame):
        raise not_a_frame(frame)
    f = <Frame>frame
    if f._payload is None:
        raise _unset(f, "_payload")
    if f._desc is None:
        raise _unset(f, "_desc")
    n = PyBytes_GET_SIZE(f._payload)
    # Every way to make a Frame keeps n <= UINT32_MAX - DESC_SIZE (_place checks it).
    out = PyBytes_FromStringAndSize(NULL, prefix + DESC_SIZE + n)
    dst = <unsigned char*>PyBytes_AS_STRING(out)
    if prefix:
        _store_u32(dst, <uint32_t>(DESC_SIZE + n))
    _store(&f._desc.raw, dst + prefix)
    memcpy(dst + prefix + DESC_SIZE, PyBytes_AS_STRING(f._payload), n)
    return out


def validate_descriptor(desc, max_payload_size=DEFAULT_MAX_PAYLOAD_SIZE):
    """Raise ``FrameError`` if ``desc`` breaks the inline rules or the size limit."""
    if not isinstance(desc, MsgDescHot):
        raise not_a_desc(desc)
    cdef uint64_t max_payload = _uint(
        "max_payload_size", max_payload_size, UINT32_MAX - DESC_SIZE
    )
    _validate(&(<MsgDescHot>desc).raw, max_payload, max_payload)


# ---------------------------------------------------------------------------------------

cdef class FrameDecoder:
    """Incremental stream decoder: feed it bytes split anywhere, get whole frames back.

    The length prefix is checked as soon as its four bytes arrive. A frame whose payload
    would exceed ``max_payload_size`` is skipped, not buffered: the decoder collects its
    64-byte descriptor, reports it through ``take_skipped()`` (so the session can answer
    or fail the one call it belonged to) and then discards the rest of its body as it
    arrives, however many feeds that takes, holding none of it. One oversized message
    must fail one call, not the whole connection; a 4 GiB length prefix costs nothing
    but the time to read past it.

    A frame shorter than its descriptor, or a normal-sized frame whose descriptor breaks
    the inline rules, raises ``FrameError``; after that the decoder refuses all further
    input: a stream that lost sync cannot be trusted again.

    Whole frames are parsed in place from the bytes fed; only an incomplete frame is
    copied into the decoder's own buffer, which never holds more than that one frame.
    """

    def __init__(self, max_payload_size=DEFAULT_MAX_PAYLOAD_SIZE):
        self._max_payload = <uint32_t>_uint(
            "max_payload_size", max_payload_size, UINT32_MAX - DESC_SIZE
        )
        self._max_payload_size = self._max_payload
        self._max_frame_len = self._max_payload + DESC_SIZE
        self._error = None
        self._skip = 0
        self._skipped = None
        _drop_buffer(self)

    def __dealloc__(self):
        free(self._buf)

    @property
    def max_payload_size(self):
        return self._max_payload_size

    def __reduce__(self):
        # Written out: Cython's automatic pickling would take _buf for a C string.
        held = PyBytes_FromStringAndSize(<const char*>self._buf, self._len)
        return (type(self), (self._max_payload_size,), decoder_state(
            held, self._error, self._skip, self._skipped
        ))

    def __setstate__(self, state):
        cdef bytes held
        held, self._error, skip, skipped = decoder_state_parts(state)
        self._skip = skip
        self._skipped = skipped
        _drop_buffer(self)
        _hold(self, <const unsigned char*>PyBytes_AS_STRING(held), len(held), MIN_BUFFER)

    @property
    def buffered(self):
        """Bytes held of a frame not yet complete (non-zero at EOF means a truncated frame).

        A partial descriptor of a frame to be skipped counts; its discarded body does not.
        """
        return self._len

    @property
    def skipping(self):
        """Body bytes of an oversized frame still to discard (0 when none is being skipped;
        non-zero at EOF means a truncated frame too)."""
        return self._skip

    @property
    def has_skipped(self):
        """Whether ``take_skipped()`` has anything: cheap enough to test after every feed."""
        return self._skipped is not None

    def take_skipped(self):
        """The oversized frames skipped since the last call, in arrival order, as
        ``(descriptor, payload_len)`` pairs; clears the list.

        Each descriptor is as it arrived (not checked against the inline rules) and
        ``payload_len`` is ``frame_len - 64``, the size of the body being discarded. A frame
        is listed as soon as its descriptor is complete, before its body has gone by.
        """
        skipped = self._skipped
        self._skipped = None
        return [] if skipped is None else skipped

    def feed(self, data):
        """Consume ``data`` and return every frame it completes, in order (oversized frames
        are skipped and listed by ``take_skipped()`` instead)."""
        cdef Py_buffer view
        if self._error is not None:
            raise decoder_failed(self._error)
        if PyBytes_CheckExact(data):
            return _feed(self, <const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        _get_buffer(data, &view)
        try:
            return _feed(self, <const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    def decode_message(self, message):
        """One frame that arrived whole, without its length prefix: the WebSocket Rust
        framing's message (the descriptor, then the payload). ``None`` when its payload is
        over ``max_payload_size``: the frame is then listed by ``take_skipped()``, as
        ``feed`` lists the frames it skips. A message cannot lose sync, so this neither
        reads nor changes what ``feed`` holds; a bad one raises ``FrameError``.
        """
        cdef Py_buffer view
        if PyBytes_CheckExact(message):
            return _decode_message(
                self, <const unsigned char*>PyBytes_AS_STRING(message), PyBytes_GET_SIZE(message)
            )
        _get_buffer(message, &view)
        try:
            return _decode_message(self, <const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)


cdef int _get_buffer(object data, Py_buffer* view) except -1:
    """Fill ``view`` with the bytes of any bytes-like ``data`` (a strided view is read as
    a compact copy, as the pure twin does); the caller releases it."""
    if not (PyBytes_Check(data) or PyByteArray_Check(data) or PyMemoryView_Check(data)):
        data = byte_view(data)
    try:
        PyObject_GetBuffer(data, view, PyBUF_SIMPLE)
    except BufferError:
        data = byte_view(data)
        PyObject_GetBuffer(data, view, PyBUF_SIMPLE)
    return 0


cdef object _decode_message(FrameDecoder decoder, const unsigned char* src, Py_ssize_t size):
    if size < DESC_SIZE:
        raise message_too_short(size)
    if <uint64_t>(size - DESC_SIZE) > decoder._max_payload:
        _list_skipped(decoder, src, <uint64_t>(size - DESC_SIZE))
        return None
    return _decode(decoder, src, <uint32_t>size)


cdef list _feed(FrameDecoder decoder, const unsigned char* src, Py_ssize_t size):
    cdef list frames = []
    cdef Py_ssize_t pos = 0
    cdef uint32_t frame_len = 0
    try:
        if decoder._skip:
            pos = _discard(decoder, size)
        if decoder._len:  # never while skipping: nothing is held then, so pos is 0 here
            pos = _complete(decoder, src, size, frames)
            if decoder._len:
                return frames
        while size - pos >= PREFIX_SIZE:
            frame_len = _load_u32(src + pos)
            if frame_len < DESC_SIZE or frame_len > decoder._max_frame_len:
                if frame_len < DESC_SIZE:
                    raise frame_too_short(frame_len)
                if size - pos - PREFIX_SIZE < DESC_SIZE:
                    break  # its descriptor is incomplete: held below, like any frame's
                _skip_frame(decoder, src + pos + PREFIX_SIZE, frame_len)
                pos += PREFIX_SIZE + DESC_SIZE
                pos += _discard(decoder, size - pos)
                continue
            if size - pos - PREFIX_SIZE < frame_len:
                break
            frames.append(_decode(decoder, src + pos + PREFIX_SIZE, frame_len))
            pos += PREFIX_SIZE + <Py_ssize_t>frame_len
        if pos < size:
            # An incomplete frame; if its prefix is here, frame_len is its checked length
            # (for a frame to skip, _hold grows the buffer with what arrived: its descriptor).
            _hold(decoder, src + pos, size - pos,
                  PREFIX_SIZE + <uint64_t>frame_len if size - pos >= PREFIX_SIZE else MIN_BUFFER)
    except FrameError as exc:
        decoder._error = str(exc)
        decoder._skip = 0
        _drop_buffer(decoder)
        exc.frames = frames  # the good frames before the bad bytes, for the caller to deliver
        raise
    return frames


cdef inline Py_ssize_t _discard(FrameDecoder decoder, Py_ssize_t size) noexcept:
    """Drop up to ``size`` bytes of the body being skipped; returns how many it dropped."""
    cdef Py_ssize_t n = size
    if <uint64_t>n > decoder._skip:
        n = <Py_ssize_t>decoder._skip
    decoder._skip -= <uint64_t>n
    return n


cdef int _skip_frame(FrameDecoder decoder, const unsigned char* desc, uint32_t frame_len) except -1:
    """Start skipping an oversized frame whose descriptor is at ``desc``: report it."""
    _list_skipped(decoder, desc, frame_len - DESC_SIZE)
    decoder._skip = frame_len - DESC_SIZE
    return 0


cdef int _list_skipped(FrameDecoder decoder, const unsigned char* desc, uint64_t size) except -1:
    """Report an oversized frame (its descriptor at ``desc``) for ``take_skipped()``."""
    if decoder._skipped is None:
        decoder._skipped = []
    decoder._skipped.append((_unpack_at(desc), size))
    return 0


cdef Py_ssize_t _complete(
    FrameDecoder decoder, const unsigned char* src, Py_ssize_t size, list frames
) except -1:
    """Continue the frame begun in an earlier feed; returns how many bytes of src it took."""
    cdef Py_ssize_t used = 0
    cdef Py_ssize_t missing
    cdef uint64_t frame_size
    cdef uint32_t frame_len
    if decoder._len < PREFIX_SIZE:
        used = min(PREFIX_SIZE - decoder._len, size)
        _hold(decoder, src, used, MIN_BUFFER)
        if decoder._len < PREFIX_SIZE:
            return used
        frame_len = _load_u32(decoder._buf)
        if frame_len < DESC_SIZE:
            raise frame_too_short(frame_len)
    frame_len = _load_u32(decoder._buf)
    if frame_len > decoder._max_frame_len:
        return _complete_skipped(decoder, src, size, used, frame_len)
    frame_size = PREFIX_SIZE + <uint64_t>frame_len
    if <uint64_t>(decoder._len + size - used) < frame_size:
        _hold(decoder, src + used, size - used, frame_size)
        return size
    missing = <Py_ssize_t>(frame_size - <uint64_t>decoder._len)
    _hold(decoder, src + used, missing, frame_size)
    frames.append(_decode(decoder, decoder._buf + PREFIX_SIZE, frame_len))
    decoder._len = 0
    if decoder._cap > IDLE_BUFFER_MAX:
        _drop_buffer(decoder)
    return used + missing


cdef Py_ssize_t _complete_skipped(
    FrameDecoder decoder, const unsigned char* src, Py_ssize_t size, Py_ssize_t used,
    uint32_t frame_len
) except -1:
    """Continue the descriptor of an oversized frame, then skip the frame's body."""
    cdef Py_ssize_t missing = PREFIX_SIZE + DESC_SIZE - decoder._len
    if size - used < missing:
        _hold(decoder, src + used, size - used, PREFIX_SIZE + DESC_SIZE)
        return size
    _hold(decoder, src + used, missing, PREFIX_SIZE + DESC_SIZE)
    _skip_frame(decoder, decoder._buf + PREFIX_SIZE, frame_len)
    decoder._len = 0
    used += missing
    return used + _discard(decoder, size - used)


cdef int _hold(FrameDecoder decoder, const unsigned char* src, Py_ssize_t count,
               uint64_t limit) except -1:
    """Append ``count`` bytes of the incomplete frame. The buffer grows with the bytes that
    arrived (doubling, but not past ``limit``, the frame's size once known), never with the
    length a peer claims: a bare prefix must not reserve a maximum-size frame."""
    cdef Py_ssize_t needed = decoder._len + count
    cdef uint64_t cap
    cdef unsigned char* buf
    if needed > decoder._cap:
        cap = min(max(2 * <uint64_t>decoder._cap, <uint64_t>MIN_BUFFER), limit)
        if cap < <uint64_t>needed or cap > <uint64_t>PY_SSIZE_T_MAX:
            cap = <uint64_t>needed
        buf = <unsigned char*>realloc(decoder._buf, <size_t>cap)
        if buf == NULL:
            raise MemoryError()
        decoder._buf = buf
        decoder._cap = <Py_ssize_t>cap
    if count:
        memcpy(decoder._buf + decoder._len, src, count)
        decoder._len = needed
    return 0


cdef void _drop_buffer(FrameDecoder decoder) noexcept:
    free(decoder._buf)
    decoder._buf = NULL
    decoder._cap = 0
    decoder._len = 0


cdef Frame _decode(FrameDecoder decoder, const unsigned char* src, uint32_t frame_len):
    """One frame from its descriptor and trailing bytes, normalised as ``docs/protocol.md`` §4 says."""
    cdef MsgDescHot desc = MsgDescHot.__new__(MsgDescHot)
    cdef Frame frame
    cdef bytes payload
    cdef uint32_t n = frame_len - DESC_SIZE
    _load(&desc.raw, src)
    if n:
        # Trailing bytes are authoritative, whatever the descriptor said.
        payload = PyBytes_FromStringAndSize(<const char*>src + DESC_SIZE, n)
        _place_raw(&desc.raw, <const char*>src + DESC_SIZE, n)
    elif desc.raw.payload_slot == UINT32_MAX:
        # Inline-only convention: the bytes live in the descriptor.
        _validate(&desc.raw, decoder._max_payload, decoder._max_payload_size)
        n = desc.raw.payload_len
        payload = PyBytes_FromStringAndSize(<const char*>desc.raw.inline_payload, n)
        memset(desc.raw.inline_payload + n, 0, INLINE_PAYLOAD_SIZE - n)
    elif desc.raw.payload_len:
        raise missing_payload(desc.raw.payload_len)
    else:
        payload = b""
        _place_raw(&desc.raw, "", 0)
    frame = Frame.__new__(Frame)
    frame._desc = desc
    frame._payload = payload
    return frame
