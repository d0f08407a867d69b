# The compiled frame codec's C-level layout, so another compiled module (the demux) can
# cimport Frame and MsgDescHot, read descriptor fields without boxing them, and build frames.

cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from rapace._flags cimport INLINE_PAYLOAD_SIZE


# The 64 wire bytes of docs/protocol.md §1, held in host byte order (``_frame.pyx`` swaps
# on big-endian hosts when it loads or stores wire bytes).
ctypedef packed struct RawDesc:
    uint64_t msg_id
    uint32_t channel_id
    uint32_t method_id
    uint32_t payload_slot
    uint32_t payload_generation
    uint32_t payload_offset
    uint32_t payload_len
    uint32_t flags
    uint32_t credit_grant
    uint64_t deadline_ns
    uint8_t inline_payload[INLINE_PAYLOAD_SIZE]


# Final: no subclass can override what the demux and the codec read in C, so they never
# need a slower path for one.
@cython.final
cdef class MsgDescHot:
    cdef RawDesc raw


@cython.final
cdef class Frame:
    cdef MsgDescHot _desc
    cdef bytes _payload


cdef Frame new_frame(
    uint64_t msg_id, uint32_t channel_id, uint32_t method_id, uint32_t flags, object payload
)


cdef class FrameDecoder:
    cdef unsigned char* _buf        # the bytes of one incomplete frame (or of an oversized
                                    # frame's prefix and descriptor), from its prefix
    cdef Py_ssize_t _len            # bytes held in _buf
    cdef Py_ssize_t _cap            # bytes allocated for _buf
    cdef uint32_t _max_frame_len
    cdef uint32_t _max_payload
    cdef object _max_payload_size   # as given: the pure twin reports and returns it as is
    cdef object _error              # None, or the message of the error that stopped it
    cdef uint64_t _skip             # body bytes of an oversized frame still to discard
    cdef list _skipped              # None, or the (descriptor, payload length) of skipped frames
