# FrameFlags (rapace/flags.py, WIRE.md section 2) for the compiled twins, declared once:
# every .pyx that needs a flag cimports it from here, so the values are C constants.
# tests/test_flags_pxd.py checks them against rapace.flags.FrameFlags through
# rapace._demux._BUILT_FLAGS.

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
