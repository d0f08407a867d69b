"""The control channel's messages: their verbs, their payloads, and how they are read.

A control frame is a frame on channel 0 with the ``CONTROL`` flag (and not ``DATA``); its
``method_id`` is the verb and its payload the postcard encoding of that verb's fields in
order (no enum tag: the verb is the tag). Peers that do not speak it ignore it (``docs/protocol.md``
§5), so everything sent here is an extension that stays invisible to them. The
verbs (``docs/protocol.md`` has the bytes):

1. ``OpenChannel { channel_id: u32, service_name: String, method_name: String,
   metadata: Vec<(String, Vec<u8>)> }``: open a named tunnel on ``channel_id``.
2. ``CloseChannel { channel_id: u32, reason: CloseReason }``: the channel is closed, or
   aborted with ``Error(message)``; channel 0 with ``Normal``: the peer is going away.
3. ``CancelChannel { channel_id: u32, reason: CancelReason }``: stop the call on that
   channel; channel 0 with ``ResourceExhausted``: work the peer sent was dropped.
4. ``GrantCredits { channel_id: u32, bytes: u32 }``: the peer may send that many more
   tunnel bytes on the channel; channel 0: the sender speaks credits, ``bytes`` being the
   window every channel starts with.
5. ``Ping { payload: [u8; 8] }`` and 6. ``Pong { payload: [u8; 8] }`` (the ping's bytes).
7. ``Settings { max_payload: u32 }`` (this implementation's own verb): sent once as a
   session starts, the largest payload the sender takes in one frame.
8. ``CallMetadata { channel_id: u32, metadata: Vec<(String, Vec<u8>)> }`` (this
   implementation's own verb): the metadata of the request that follows on
   ``channel_id`` (``rapace.metadata``; a peer that ignores it answers the request).

``ControlCodec.decode`` never raises for what a peer sent: an unknown verb or a payload
that does not decode is ``None`` and a reason, for the session to log and ignore.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Final, TypeAlias

from rapace import postcard
from rapace.types import DataEnum, PostcardError, u32

__all__ = [
    "CallMetadata",
    "CancelChannel",
    "CancelReason",
    "CloseChannel",
    "CloseError",
    "CloseNormal",
    "CloseReason",
    "ControlCodec",
    "ControlMessage",
    "GrantCredits",
    "OpenChannel",
    "Ping",
    "Pong",
    "Settings",
]

OPEN_CHANNEL: Final = 1
CLOSE_CHANNEL: Final = 2
CANCEL_CHANNEL: Final = 3
GRANT_CREDITS: Final = 4
PING: Final = 5
PONG: Final = 6
SETTINGS: Final = 7
CALL_METADATA: Final = 8

PING_SIZE: Final = 8
"""``Ping`` and ``Pong`` carry exactly this many raw bytes (a ``[u8; 8]``: no length)."""


@dataclasses.dataclass(frozen=True, slots=True)
class OpenChannel:
    channel_id: u32
    service_name: str
    method_name: str
    metadata: list[tuple[str, bytes]]


class CloseReason(DataEnum):
    """Why a channel closed: ``CloseNormal()`` (0) or ``CloseError(message)`` (1)."""


@dataclasses.dataclass(frozen=True, slots=True)
class CloseNormal(CloseReason):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class CloseError(CloseReason):
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class CloseChannel:
    channel_id: u32
    reason: CloseReason


class CancelReason(enum.IntEnum):
    CLIENT_CANCEL = 0
    DEADLINE_EXCEEDED = 1
    RESOURCE_EXHAUSTED = 2


@dataclasses.dataclass(frozen=True, slots=True)
class CancelChannel:
    channel_id: u32
    reason: CancelReason


@dataclasses.dataclass(frozen=True, slots=True)
class GrantCredits:
    channel_id: u32
    bytes: u32


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    max_payload: u32


@dataclasses.dataclass(frozen=True, slots=True)
class CallMetadata:
    channel_id: u32
    metadata: list[tuple[str, bytes]]


ControlMessage: TypeAlias = (
    OpenChannel
    | CloseChannel
    | CancelChannel
    | GrantCredits
    | Ping
    | Pong
    | Settings
    | CallMetadata
)

_STRUCTS: Final[dict[int, type]] = {
    OPEN_CHANNEL: OpenChannel,
    CLOSE_CHANNEL: CloseChannel,
    CANCEL_CHANNEL: CancelChannel,
    GRANT_CREDITS: GrantCredits,
    SETTINGS: Settings,
    CALL_METADATA: CallMetadata,
}
_VERBS: Final[dict[type, int]] = {
    **{cls: verb for verb, cls in _STRUCTS.items()},
    Ping: PING,
    Pong: PONG,
}


class ControlCodec:
    """Reads and writes control payloads on the twin current when it was made (a session
    makes one, so its control frames use the same twin as the rest of its frames)."""

    __slots__ = ("_codecs",)

    def __init__(self) -> None:
        self._codecs: dict[int, postcard.Codec[Any]] = {
            verb: postcard.codec_for(cls) for verb, cls in _STRUCTS.items()
        }

    def encode(self, message: ControlMessage) -> tuple[int, bytes]:
        """The verb and payload of ``message`` (``PostcardError`` for a field out of range)."""
        verb = _VERBS[type(message)]
        if isinstance(message, Ping | Pong):
            if len(message.payload) != PING_SIZE:
                raise ValueError(f"a ping carries {PING_SIZE} bytes, not {len(message.payload)}")
            return verb, bytes(message.payload)
        return verb, self._codecs[verb].dumps(message)

    def decode(self, verb: int, payload: bytes) -> tuple[ControlMessage | None, str]:
        """The message a control frame carries, or ``None`` and why it is ignored."""
        if verb in (PING, PONG):
            if len(payload) != PING_SIZE:
                return None, f"a ping or pong of {len(payload)} bytes, not {PING_SIZE}"
            return (Ping if verb == PING else Pong)(bytes(payload)), ""
        codec = self._codecs.get(verb)
        if codec is None:
            return None, f"unknown control verb {verb}"
        try:
            message: ControlMessage = codec.loads(payload)
        except PostcardError as exc:
            return None, f"undecodable {_STRUCTS[verb].__name__}: {exc}"
        return message, ""
