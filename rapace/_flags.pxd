# FrameFlags and the fixed sizes of the wire protocol (rapace/flags.py, docs/protocol.md
# §1-3) for the compiled twins, declared once: every .pyx that needs one cimports it from
# here, so the values are C constants. tests/test_flags_pxd.py checks them against
# rapace.flags through rapace._demux._BUILT_FLAGS and rapace._frame._BUILT_SIZES.

cdef enum FrameFlag:
    DATA = 0x01
    CONTROL = 0x02
    EOS = 0x04
    CANCEL = 0x08
    ERROR = 0x10
    HIGH_PRIORITY = 0x20
    CREDITS = 0x40
    METADATA_ONLY = 0x80
    NO_REPLY = 0x100

cdef enum WireSize:
    DESC_SIZE = 64              # a packed MsgDescHot
    INLINE_PAYLOAD_SIZE = 16    # payloads up to this many bytes travel in the descriptor
