"""rapace: multiplexed binary RPC for asyncio, wire-compatible with the Rust implementation.

``rapace.IMPLEMENTATION`` says which core is running: ``"cython"`` (the compiled twins)
or ``"python"`` (the pure twins, selected by ``RAPACE_NO_EXTENSIONS=1`` or when no
compiled module could be built). This namespace holds what a user of the library needs;
the wire core (descriptors, frames, the codec) is public under ``rapace.wire``.
"""

from __future__ import annotations

from rapace import postcard, wire
from rapace._impl import IMPLEMENTATION
from rapace.connection import Address, Server, connect, serve
from rapace.context import CallContext, CallKind, current_call, current_deadline
from rapace.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    ConnectionFailed,
    DataLoss,
    DeadlineExceeded,
    ErrorCode,
    FailedPrecondition,
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
    TunnelAborted,
    Unavailable,
    Unimplemented,
    ValidationFailed,
)
from rapace.interceptors import CallNext, Interceptor
from rapace.keepalive import PeerUnresponsive
from rapace.metadata import DEFAULT_MAX_METADATA_SIZE, MetadataValue
from rapace.peer import Peer
from rapace.runner import run
from rapace.service import (
    ServiceRouter,
    client,
    register_services,
    service,
    with_metadata,
    with_timeout,
)
from rapace.session import DEFAULT_CALL_TIMEOUT, DEFAULT_MAX_PENDING, Dispatcher, RpcSession
from rapace.stats import CallCounts, MetricsSnapshot, SessionStats, TrafficStats
from rapace.streaming import ItemStream, StreamCall
from rapace.transport import Transport, TransportClosed, mem_pair
from rapace.transport.shm import ShmError
from rapace.tunnel import Tunnel, TunnelChunk, TunnelReceiver, TunnelStream
from rapace.types import DataEnum, PostcardError, f32, i8, i16, i32, i64, u8, u16, u32, u64

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_MAX_METADATA_SIZE",
    "DEFAULT_MAX_PENDING",
    "IMPLEMENTATION",
    "Aborted",
    "Address",
    "AlreadyExists",
    "CallContext",
    "CallCounts",
    "CallKind",
    "CallNext",
    "Cancelled",
    "ConnectionFailed",
    "DataEnum",
    "DataLoss",
    "DeadlineExceeded",
    "Dispatcher",
    "ErrorCode",
    "FailedPrecondition",
    "Interceptor",
    "Internal",
    "InvalidArgument",
    "ItemStream",
    "MetadataValue",
    "MetricsSnapshot",
    "NotFound",
    "OutOfRange",
    "Peer",
    "PeerDied",
    "PeerUnresponsive",
    "PermissionDenied",
    "PostcardError",
    "ResourceExhausted",
    "RpcError",
    "RpcSession",
    "Server",
    "ServiceRouter",
    "SessionClosed",
    "SessionStats",
    "ShmError",
    "StaleGeneration",
    "StreamCall",
    "TrafficStats",
    "Transport",
    "TransportClosed",
    "Tunnel",
    "TunnelAborted",
    "TunnelChunk",
    "TunnelReceiver",
    "TunnelStream",
    "Unavailable",
    "Unimplemented",
    "ValidationFailed",
    "__version__",
    "client",
    "connect",
    "current_call",
    "current_deadline",
    "f32",
    "i8",
    "i16",
    "i32",
    "i64",
    "mem_pair",
    "postcard",
    "register_services",
    "run",
    "serve",
    "service",
    "u8",
    "u16",
    "u32",
    "u64",
    "wire",
    "with_metadata",
    "with_timeout",
]
