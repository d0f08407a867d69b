"""Error codes, the ``RpcError`` hierarchy, error payloads and ``FrameError``.

Every status a peer can send (``docs/protocol.md`` §7) has its own ``RpcError`` subclass, so
callers write ``except rapace.NotFound`` instead of comparing codes. ``RpcError(code,
message)`` on the base class builds the subclass that belongs to ``code``; a subclass is
built from its message alone: ``NotFound("no such user")``.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, ClassVar

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "ConnectionFailed",
    "DataLoss",
    "DeadlineExceeded",
    "ErrorCode",
    "FailedPrecondition",
    "FrameError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PeerDied",
    "PermissionDenied",
    "ResourceExhausted",
    "RpcError",
    "SessionClosed",
    "StaleGeneration",
    "TunnelAborted",
    "Unavailable",
    "Unimplemented",
    "ValidationFailed",
    "encode_error_payload",
    "parse_error_payload",
]


class ErrorCode(enum.IntEnum):
    """Status codes on the wire; 0-14 are aligned with gRPC, 100+ are rapace's own."""

    Ok = 0
    Cancelled = 1
    DeadlineExceeded = 2
    InvalidArgument = 3
    NotFound = 4
    AlreadyExists = 5
    PermissionDenied = 6
    ResourceExhausted = 7
    FailedPrecondition = 8
    Aborted = 9
    OutOfRange = 10
    Unimplemented = 11
    Internal = 12
    Unavailable = 13
    DataLoss = 14
    PeerDied = 100
    SessionClosed = 101
    ValidationFailed = 102
    StaleGeneration = 103


class FrameError(ValueError):
    """The byte stream or a descriptor breaks the framing rules (``docs/protocol.md`` §3-4).

    A connection that raises it cannot be trusted to stay in sync and is closed. When
    ``FrameDecoder.feed`` raises it, ``frames`` holds the good frames that came before the
    bad bytes in the same input, so they can still be delivered.
    """

    frames: list[Any]

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.frames = []


_BY_CODE: dict[int, type[RpcError]] = {}


class RpcError(Exception):
    """An RPC failed with a status: ``.code`` (an ``ErrorCode``) and ``.message``."""

    code: ErrorCode = ErrorCode.Internal
    message: str
    _default_code: ClassVar[ErrorCode | None] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> RpcError:
        # RpcError(code, message) on the base class yields the code's own subclass.
        target = _BY_CODE.get(_coerce_code(args[0]), RpcError) if cls is RpcError and args else cls
        # super(RpcError, target): DeadlineExceeded's other base (OSError) needs its own __new__.
        return super(RpcError, target).__new__(target)

    def __init__(self, *args: Any) -> None:
        default = type(self)._default_code
        if default is not None and (not args or not isinstance(args[0], int | ErrorCode)):
            # Subclass form: NotFound("message").
            if len(args) > 1:
                raise TypeError(f"{type(self).__name__} takes one argument, the message")
            code, message = default, (args[0] if args else "")
        else:
            # Base form: RpcError(code, message); also accepted by subclasses.
            if not 1 <= len(args) <= 2:
                raise TypeError("RpcError takes (code, message)")
            code = _coerce_code(args[0])
            message = args[1] if len(args) == 2 else ""
            if default is not None and code != default:
                raise ValueError(f"{type(self).__name__} has code {default.name}, not {code.name}")
        if not isinstance(message, str):
            raise TypeError(f"the message must be str, not {type(message).__name__}")
        super().__init__(code, message)
        self.args = (code, message)  # OSError (DeadlineExceeded's base) sets args in __new__
        self.code = code
        self.message = message

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls._default_code is not None:
            cls.code = cls._default_code
            _BY_CODE.setdefault(int(cls._default_code), cls)

    def __str__(self) -> str:
        # The message alone, as for any exception: a traceback (or f"{type(e).__name__}:
        # {e}") already names the class, which names the code.
        return self.message or self.code.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (RpcError, (int(self.code), self.message))


def _coerce_code(value: object) -> ErrorCode:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"an error code must be an int or ErrorCode, not {type(value).__name__}")
    try:
        return ErrorCode(value)
    except ValueError:
        raise ValueError(f"unknown error code {value}") from None


class Cancelled(RpcError):
    """The call was cancelled (by the caller, or the handler was cancelled)."""

    _default_code = ErrorCode.Cancelled


class DeadlineExceeded(RpcError, TimeoutError):
    """The call's deadline passed; also a ``TimeoutError`` so generic timeout handling works."""

    _default_code = ErrorCode.DeadlineExceeded


class InvalidArgument(RpcError):
    """The arguments were malformed or failed to decode."""

    _default_code = ErrorCode.InvalidArgument


class NotFound(RpcError):
    _default_code = ErrorCode.NotFound


class AlreadyExists(RpcError):
    _default_code = ErrorCode.AlreadyExists


class PermissionDenied(RpcError):
    _default_code = ErrorCode.PermissionDenied


class ResourceExhausted(RpcError):
    """A limit was hit, e.g. too many pending calls on one session."""

    _default_code = ErrorCode.ResourceExhausted


class FailedPrecondition(RpcError):
    _default_code = ErrorCode.FailedPrecondition


class Aborted(RpcError):
    _default_code = ErrorCode.Aborted


class TunnelAborted(Aborted):
    """The peer aborted the tunnel (``CloseChannel(Error(reason))``): the bytes read so far
    are not the whole stream. A reader sees this instead of a clean end of stream.

    ``reason`` is the peer's text. It is an ``Aborted`` status (code 9), so ``except
    rapace.Aborted`` catches it too.
    """

    @property
    def reason(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (TunnelAborted, (self.message,))


class OutOfRange(RpcError):
    _default_code = ErrorCode.OutOfRange


class Unimplemented(RpcError):
    """The peer has no handler for the method (or no dispatcher at all)."""

    _default_code = ErrorCode.Unimplemented


class Internal(RpcError):
    """The peer failed in a way it did not describe more precisely (e.g. a handler crashed)."""

    _default_code = ErrorCode.Internal


class Unavailable(RpcError):
    _default_code = ErrorCode.Unavailable


class DataLoss(RpcError):
    _default_code = ErrorCode.DataLoss


class PeerDied(RpcError):
    _default_code = ErrorCode.PeerDied


class SessionClosed(RpcError):
    """The session's transport closed or failed before the call could complete."""

    _default_code = ErrorCode.SessionClosed


class ValidationFailed(RpcError):
    _default_code = ErrorCode.ValidationFailed


class StaleGeneration(RpcError):
    _default_code = ErrorCode.StaleGeneration


class ConnectionFailed(ConnectionError):
    """``connect()`` could not reach ``address``: the message names the address and the
    cause (``__cause__`` is the ``OSError``), the same on asyncio's loop and on uvloop,
    whose bare ``ConnectionRefusedError`` / ``FileNotFoundError`` name no address.

    A ``ConnectionError`` (an ``OSError``), so code catching those still catches it;
    not an ``RpcError``: no call was made.
    """

    def __init__(self, address: str, cause: BaseException) -> None:
        detail = cause.strerror if isinstance(cause, OSError) and cause.strerror else cause
        super().__init__(
            getattr(cause, "errno", None) or 0, f"cannot connect to {address}: {detail}"
        )
        self.address = address
        """The address as given (``str(Address)`` for an ``Address``)."""

    def __str__(self) -> str:
        return str(self.strerror)


_ERROR_HEADER = struct.Struct("<II")


def encode_error_payload(code: int, message: str) -> bytes:
    """``[code: u32 LE][message_len: u32 LE][message: UTF-8]`` (``docs/protocol.md`` §6)."""
    code = int(_coerce_code(code))
    data = message.encode("utf-8", "surrogatepass")
    return _ERROR_HEADER.pack(code, len(data)) + data


def parse_error_payload(payload: bytes | bytearray | memoryview) -> RpcError:
    """Decode an error payload as the Rust peer does.

    Malformed input is not an exception here: it becomes ``Internal("malformed error
    response")``; an unknown code becomes ``Internal``; invalid UTF-8 is decoded leniently.
    """
    view = memoryview(payload).cast("B")
    if len(view) < _ERROR_HEADER.size:
        return Internal("malformed error response")
    code, message_len = _ERROR_HEADER.unpack_from(view)
    end = _ERROR_HEADER.size + message_len
    if len(view) < end:
        return Internal("malformed error response")
    message = bytes(view[_ERROR_HEADER.size : end]).decode("utf-8", "replace")
    if code == ErrorCode.Ok:
        return RpcError(ErrorCode.Ok, message)
    return _BY_CODE.get(code, Internal)(message)
