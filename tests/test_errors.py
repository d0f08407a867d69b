"""Error codes and payloads (docs/protocol.md §6-7), flags and constants (section 1-2),
method ids (section 8). These modules have no twins: plain tests.
"""

from __future__ import annotations

import pickle
import struct
import traceback

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wire_helpers import HYPOTHESIS

import rapace
from rapace import errors
from rapace.errors import (
    DeadlineExceeded,
    ErrorCode,
    FrameError,
    Internal,
    NotFound,
    RpcError,
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

WIRE_CODES = {
    "Ok": 0,
    "Cancelled": 1,
    "DeadlineExceeded": 2,
    "InvalidArgument": 3,
    "NotFound": 4,
    "AlreadyExists": 5,
    "PermissionDenied": 6,
    "ResourceExhausted": 7,
    "FailedPrecondition": 8,
    "Aborted": 9,
    "OutOfRange": 10,
    "Unimplemented": 11,
    "Internal": 12,
    "Unavailable": 13,
    "DataLoss": 14,
    "PeerDied": 100,
    "SessionClosed": 101,
    "ValidationFailed": 102,
    "StaleGeneration": 103,
}
ERROR_CODES = [name for name in WIRE_CODES if name != "Ok"]


# ---------------------------------------------------------------------------------------
# ErrorCode and the RpcError hierarchy


def test_error_code_values() -> None:
    assert {code.name: code.value for code in ErrorCode} == WIRE_CODES
    assert all(isinstance(code, int) for code in ErrorCode)


@pytest.mark.parametrize("name", ERROR_CODES)
def test_each_code_has_its_subclass(name: str) -> None:
    cls = getattr(errors, name)
    assert getattr(rapace, name) is cls
    assert issubclass(cls, RpcError)
    assert issubclass(cls, Exception)
    assert cls.code == ErrorCode[name]
    err = cls("it went wrong")
    assert err.code is ErrorCode[name]
    assert err.message == "it went wrong"
    # The message alone: a traceback line reads "rapace.errors.NotFound: it went wrong",
    # the code named once (by the class), as for any exception.
    assert str(err) == "it went wrong"
    (line,) = traceback.format_exception_only(err)
    assert line == f"rapace.errors.{name}: it went wrong\n"
    assert line.count(name) == 1
    assert f"{type(err).__name__}: {err}" == f"{name}: it went wrong"
    assert cls().message == ""
    assert str(cls()) == name  # no message: the code still says what failed


@pytest.mark.parametrize("name", ERROR_CODES)
def test_base_constructor_builds_the_subclass(name: str) -> None:
    cls = getattr(errors, name)
    for code in (ErrorCode[name], WIRE_CODES[name]):
        err = RpcError(code, "msg")
        assert type(err) is cls
        assert err.code is ErrorCode[name]
        assert err.message == "msg"
        assert isinstance(err, RpcError)


def test_subclass_accepts_its_own_code_only() -> None:
    assert NotFound(ErrorCode.NotFound, "x").message == "x"
    with pytest.raises(ValueError):
        NotFound(ErrorCode.Internal, "x")


def test_rpc_error_argument_errors() -> None:
    with pytest.raises(ValueError, match="999"):
        RpcError(999, "x")
    with pytest.raises(TypeError):
        RpcError("NotFound", "x")
    with pytest.raises(TypeError):
        RpcError(4, b"bytes message")
    with pytest.raises(TypeError):
        NotFound("a", "b")


def test_deadline_exceeded_is_a_timeout_error() -> None:
    assert issubclass(DeadlineExceeded, TimeoutError)
    with pytest.raises(TimeoutError):
        raise RpcError(ErrorCode.DeadlineExceeded, "deadline exceeded")
    assert not issubclass(NotFound, TimeoutError)


def test_catch_by_subclass() -> None:
    with pytest.raises(NotFound) as info:
        raise RpcError(4, "no such user")
    assert info.value.message == "no such user"


@pytest.mark.parametrize("name", ERROR_CODES)
def test_pickle_round_trip(name: str) -> None:
    err = getattr(errors, name)("über message")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err)
    assert again.code is err.code
    assert again.message == err.message
    assert str(again) == str(err)


def test_frame_error_is_not_an_rpc_error() -> None:
    assert issubclass(FrameError, ValueError)
    assert not issubclass(FrameError, RpcError)


# ---------------------------------------------------------------------------------------
# error payloads


def test_encode_error_payload_layout() -> None:
    payload = encode_error_payload(ErrorCode.NotFound, "héllo")
    assert payload == struct.pack("<II", 4, 6) + "héllo".encode()
    assert encode_error_payload(12, "") == b"\x0c\0\0\0\0\0\0\0"
    assert encode_error_payload(103, "x") == b"\x67\0\0\0\x01\0\0\0x"


def test_encode_error_payload_refuses_unknown_codes() -> None:
    with pytest.raises(ValueError, match="999"):
        encode_error_payload(999, "x")


@pytest.mark.parametrize("name", ERROR_CODES)
def test_error_payload_round_trip(name: str) -> None:
    err = parse_error_payload(encode_error_payload(WIRE_CODES[name], "why: ünïcode"))
    assert type(err) is getattr(errors, name)
    assert err.code == WIRE_CODES[name]
    assert err.message == "why: ünïcode"


def test_parse_ok_code_keeps_it() -> None:
    """0 is a known code (docs/protocol.md §7): only unknown codes map to Internal."""
    err = parse_error_payload(struct.pack("<II", 0, 2) + b"ok")
    assert err.message == "ok"
    assert err.code == ErrorCode.Ok


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_parse_accepts_bytes_like(kind: type) -> None:
    err = parse_error_payload(kind(struct.pack("<II", 11, 3) + b"abc"))
    assert type(err) is errors.Unimplemented
    assert err.message == "abc"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x04",
        b"\x04\0\0\0\x05\0\0",  # 7 bytes
        struct.pack("<II", 4, 5) + b"abcd",  # message truncated by one byte
        struct.pack("<II", 4, 0xFFFFFFFF),
        struct.pack("<II", 4, 1),
    ],
)
def test_parse_malformed(payload: bytes) -> None:
    err = parse_error_payload(payload)
    assert type(err) is Internal
    assert err.code is ErrorCode.Internal
    assert err.message == "malformed error response"


@pytest.mark.parametrize("code", [15, 99, 104, 0xFFFFFFFF])
def test_parse_unknown_code_is_internal(code: int) -> None:
    err = parse_error_payload(struct.pack("<II", code, 3) + b"why")
    assert type(err) is Internal
    assert err.message == "why"


def test_parse_invalid_utf8_is_lenient() -> None:
    err = parse_error_payload(struct.pack("<II", 3, 4) + b"a\xffb\xc3")
    assert type(err) is errors.InvalidArgument
    assert err.message == "a\ufffdb\ufffd"


def test_parse_ignores_bytes_after_the_message() -> None:
    err = parse_error_payload(struct.pack("<II", 4, 2) + b"hi, and more")
    assert type(err) is NotFound
    assert err.message == "hi"


@HYPOTHESIS
@given(st.binary(max_size=40))
def test_parse_never_raises(payload: bytes) -> None:
    err = parse_error_payload(payload)
    assert isinstance(err, RpcError)
    assert isinstance(err.message, str)


@HYPOTHESIS
@given(code=st.sampled_from(ERROR_CODES), message=st.text(max_size=30))
def test_error_payload_round_trip_property(code: str, message: str) -> None:
    encoded = encode_error_payload(WIRE_CODES[code], message)
    assert struct.unpack_from("<II", encoded) == (WIRE_CODES[code], len(encoded) - 8)
    err = parse_error_payload(encoded)
    assert err.code == WIRE_CODES[code]
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        return  # lone surrogates are not UTF-8; the peer decodes them leniently
    assert err.message == message


# ---------------------------------------------------------------------------------------
# flags and constants


def test_flag_values() -> None:
    assert {flag.name: flag.value for flag in FrameFlags} == {
        "DATA": 0x01,
        "CONTROL": 0x02,
        "EOS": 0x04,
        "CANCEL": 0x08,
        "ERROR": 0x10,
        "HIGH_PRIORITY": 0x20,
        "CREDITS": 0x40,
        "METADATA_ONLY": 0x80,
        "NO_REPLY": 0x100,
    }
    assert FrameFlags.DATA | FrameFlags.EOS == 5
    assert FrameFlags.DATA | FrameFlags.EOS | FrameFlags.NO_REPLY == 0x105
    assert FrameFlags.ERROR | FrameFlags.EOS == 0x14


def test_unknown_flag_bits_are_kept() -> None:
    flags = FrameFlags(0x10001)
    assert int(flags) == 0x10001
    assert FrameFlags.DATA in flags


def test_constants() -> None:
    assert DESC_SIZE == 64
    assert INLINE_PAYLOAD_SIZE == 16
    assert INLINE_PAYLOAD_SLOT == 0xFFFFFFFF
    assert NO_DEADLINE == 0xFFFFFFFFFFFFFFFF
    assert rapace.wire.DESC_SIZE == DESC_SIZE
    assert rapace.wire.INLINE_PAYLOAD_SIZE == INLINE_PAYLOAD_SIZE
    assert rapace.wire.INLINE_PAYLOAD_SLOT == INLINE_PAYLOAD_SLOT
    assert rapace.wire.NO_DEADLINE == NO_DEADLINE
    assert rapace.wire.DEFAULT_MAX_PAYLOAD_SIZE == 1 << 20


# ---------------------------------------------------------------------------------------
# method ids


def reference_fnv1a_64(data: bytes) -> int:
    """FNV-1a 64 written out from its definition, independent of rapace.method_id."""
    h = 14695981039346656037  # 0xcbf29ce484222325
    for octet in data:
        h ^= octet
        h = (h * 1099511628211) % (1 << 64)  # 0x100000001b3
    return h


def reference_method_id(service: str, method: str) -> int:
    h = reference_fnv1a_64((service + "." + method).encode("utf-8"))
    return ((h >> 32) ^ h) & 0xFFFFFFFF


def test_reference_fnv_matches_published_vectors() -> None:
    # Published FNV-1a 64 test vectors, so the reference itself is known good.
    assert reference_fnv1a_64(b"") == 0xCBF29CE484222325
    assert reference_fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
    assert reference_fnv1a_64(b"foobar") == 0x85944171F73967E8


def test_method_id_vectors() -> None:
    assert compute_method_id("Calculator", "add") == 0x193FA158
    assert compute_method_id("Calculator", "add") == 423600472
    assert compute_method_id("Echo", "echo") == 0x3E895C50
    assert rapace.wire.compute_method_id is compute_method_id


def test_method_id_is_a_u32() -> None:
    value = compute_method_id("Service", "méthode")
    assert type(value) is int
    assert 0 <= value <= 0xFFFFFFFF
    assert value == reference_method_id("Service", "méthode")


def test_method_id_type_errors() -> None:
    with pytest.raises(TypeError):
        compute_method_id(b"Calculator", "add")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        compute_method_id("Calculator", None)  # type: ignore[arg-type]


names = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)


@HYPOTHESIS
@given(service=names, method=names)
def test_method_id_matches_reference(service: str, method: str) -> None:
    assert compute_method_id(service, method) == reference_method_id(service, method)
