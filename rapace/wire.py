"""The public wire core: descriptors, frames, the stream codec, flags, sizes, ids, errors.

For tools and peers that speak rapace frames directly (proxies, test harnesses, other
transports). The names come from the selected twin (``rapace.IMPLEMENTATION``), so a
compiled ``Frame`` is what a session built here sends and receives.
"""

from __future__ import annotations

from rapace._impl import (
    DEFAULT_MAX_PAYLOAD_SIZE,
    Frame,
    FrameDecoder,
    MsgDescHot,
    encode_frame,
    encode_message,
    validate_descriptor,
)
from rapace.errors import FrameError, encode_error_payload, parse_error_payload
from rapace.flags import (
    DESC_SIZE,
    INLINE_PAYLOAD_SIZE,
    INLINE_PAYLOAD_SLOT,
    NO_DEADLINE,
    FrameFlags,
)
from rapace.method_id import compute_method_id

__all__ = [
    "DEFAULT_MAX_PAYLOAD_SIZE",
    "DESC_SIZE",
    "INLINE_PAYLOAD_SIZE",
    "INLINE_PAYLOAD_SLOT",
    "NO_DEADLINE",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameFlags",
    "MsgDescHot",
    "compute_method_id",
    "encode_error_payload",
    "encode_frame",
    "encode_message",
    "parse_error_payload",
    "validate_descriptor",
]
