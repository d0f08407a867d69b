"""rapace: multiplexed binary RPC for asyncio, wire-compatible with the Rust implementation.

``rapace.IMPLEMENTATION`` says which core is running: ``"cython"`` (the compiled twins)
or ``"python"`` (the pure twins, selected by ``RAPACE_NO_EXTENSIONS=1`` or when no
compiled module could be built).
"""

from __future__ import annotations

from rapace import postcard
from rapace._impl import IMPLEMENTATION, frame_impl
from rapace.connection import Address, Server, connect, parse_address, serve
from rapace.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    ErrorCode,
    FailedPrecondition,
    FrameError,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PeerDied,
    PermissionDenied,
    ResourceExhausted,
    RpcError,
    SessionClosed,
    StaleGeneration,
    Unavailable,
    Unimplemented,
    ValidationFailed,
    encode_error_payload,
    parse_error_payload,
)
from rapace.flags import (
    DESC_SIZE,
    INLINE_PAYLOAD_SIZE,
    INLINE_PAYLOAD_SLOT,
    NO_DEADLINE,
    FrameFlags,
)
from rapace.method_id import compute_method_id
from rapace.runner import run
from rapace.service import ItemStream, ServiceRouter, client, register_services, service
from rapace.session import DEFAULT_CALL_TIMEOUT, DEFAULT_MAX_PENDING, Dispatcher, RpcSession
from rapace.transport import MemTransport, Transport, TransportClosed, mem_pair
from rapace.transport.stream import StreamTransport
from rapace.tunnel import TunnelChunk, TunnelReceiver, TunnelStream
from rapace.types import DataEnum, PostcardError, f32, i8, i16, i32, i64, u8, u16, u32, u64

MsgDescHot = frame_impl.MsgDescHot
Frame = frame_impl.Frame
FrameDecoder = frame_impl.FrameDecoder
encode_frame = frame_impl.encode_frame
validate_descriptor = frame_impl.validate_descriptor
DEFAULT_MAX_PAYLOAD_SIZE = frame_impl.DEFAULT_MAX_PAYLOAD_SIZE

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_MAX_PAYLOAD_SIZE",
    "DEFAULT_MAX_PENDING",
    "DESC_SIZE",
    "IMPLEMENTATION",
    "INLINE_PAYLOAD_SIZE",
    "INLINE_PAYLOAD_SLOT",
    "NO_DEADLINE",
    "Aborted",
    "Address",
    "AlreadyExists",
    "Cancelled",
    "DataEnum",
    "DataLoss",
    "DeadlineExceeded",
    "Dispatcher",
    "ErrorCode",
    "FailedPrecondition",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameFlags",
    "Internal",
    "InvalidArgument",
    "ItemStream",
    "MemTransport",
    "MsgDescHot",
    "NotFound",
    "OutOfRange",
    "PeerDied",
    "PermissionDenied",
    "PostcardError",
    "ResourceExhausted",
    "RpcError",
    "RpcSession",
    "Server",
    "ServiceRouter",
    "SessionClosed",
    "StaleGeneration",
    "StreamTransport",
    "Transport",
    "TransportClosed",
    "TunnelChunk",
    "TunnelReceiver",
    "TunnelStream",
    "Unavailable",
    "Unimplemented",
    "ValidationFailed",
    "__version__",
    "client",
    "compute_method_id",
    "connect",
    "encode_error_payload",
    "encode_frame",
    "f32",
    "i8",
    "i16",
    "i32",
    "i64",
    "mem_pair",
    "parse_address",
    "parse_error_payload",
    "postcard",
    "register_services",
    "run",
    "serve",
    "service",
    "u8",
    "u16",
    "u32",
    "u64",
    "validate_descriptor",
]
