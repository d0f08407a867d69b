"""Frame flags and the fixed sizes of the wire protocol (``docs/protocol.md`` §1-3)."""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "DESC_SIZE",
    "INLINE_PAYLOAD_SIZE",
    "INLINE_PAYLOAD_SLOT",
    "NO_DEADLINE",
    "FrameFlags",
]

DESC_SIZE: Final = 64
"""Size in bytes of a packed ``MsgDescHot``."""

INLINE_PAYLOAD_SIZE: Final = 16
"""Payloads up to this many bytes travel inside the descriptor."""

INLINE_PAYLOAD_SLOT: Final = 0xFFFFFFFF
"""``payload_slot`` value meaning "the payload is inline"."""

NO_DEADLINE: Final = 0xFFFFFFFFFFFFFFFF
"""``deadline_ns`` value meaning "no deadline"."""


class FrameFlags(enum.IntFlag):
    """The ``flags`` bit set of a descriptor. Unknown bits are preserved, not rejected."""

    DATA = 0x01
    CONTROL = 0x02
    EOS = 0x04
    CANCEL = 0x08
    ERROR = 0x10
    HIGH_PRIORITY = 0x20
    CREDITS = 0x40
    METADATA_ONLY = 0x80
    NO_REPLY = 0x100
