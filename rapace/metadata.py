"""Call metadata: the key/value pairs a call carries next to its arguments.

On the wire (``docs/protocol.md`` §10.6) the pairs travel in a ``CallMetadata`` control
frame sent just before the request, on the control channel: a peer that does not speak it
ignores it and answers the request as usual. This module holds the rules both ends apply:

- keys are non-empty strings of ``0-9 a-z _ . -`` (lowercase, as in gRPC and HTTP/2,
  so that two spellings of one header cannot both arrive); no key twice;
- a key ending in ``-bin`` carries bytes; any other key carries text (UTF-8 on the wire);
- the encoded ``CallMetadata`` payload is at most ``max_metadata_size`` bytes
  (``DEFAULT_MAX_METADATA_SIZE``: 8 KiB, gRPC's default): checked by the sender before
  anything is written, and by the receiver before it decodes anything.

Sending something else is the caller's mistake (``TypeError``/``ValueError``, or
``ResourceExhausted`` for the size, as an oversized payload is); receiving it is the
peer's, and that one call is refused with an error naming the problem.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, TypeAlias

from rapace import postcard
from rapace.errors import InvalidArgument, ResourceExhausted

__all__ = [
    "DEFAULT_MAX_METADATA_SIZE",
    "MetadataValue",
    "PreparedMetadata",
    "check_metadata_size",
    "decode_pairs",
    "encode_pairs",
    "merge_metadata",
    "metadata_body",
]

DEFAULT_MAX_METADATA_SIZE: Final = 8192
"""Bytes of encoded metadata one call may carry (gRPC's default limit, 8 KiB)."""

MetadataValue: TypeAlias = str | bytes
"""A metadata value: ``bytes`` under a key ending in ``-bin``, ``str`` under any other."""

_KEY: Final = re.compile(r"[0-9a-z_.\-]+")
_BIN_SUFFIX: Final = "-bin"


def _key_problem(key: object) -> str | None:
    if not isinstance(key, str):
        return f"a metadata key must be a str, not {type(key).__name__}"
    if not _KEY.fullmatch(key):
        return f"metadata key {key!r} is not made of 0-9 a-z _ . - (lowercase, non-empty)"
    return None


def encode_pairs(metadata: Mapping[str, MetadataValue]) -> list[tuple[str, bytes]]:
    """The wire pairs of ``metadata``, checked (``TypeError``/``ValueError`` naming the key)."""
    if not isinstance(metadata, Mapping):
        raise TypeError(f"call metadata is a mapping of str keys, not {type(metadata).__name__}")
    pairs: list[tuple[str, bytes]] = []
    for key, value in metadata.items():
        problem = _key_problem(key)
        if problem is not None:
            raise (TypeError if not isinstance(key, str) else ValueError)(problem)
        if key.endswith(_BIN_SUFFIX):
            if not isinstance(value, bytes | bytearray | memoryview):
                raise TypeError(
                    f"metadata key {key!r} ends in -bin: its value is bytes, "
                    f"not {type(value).__name__}"
                )
            pairs.append((key, bytes(value)))
        else:
            if not isinstance(value, str):
                raise TypeError(
                    f"metadata key {key!r} carries text: its value is a str, not "
                    f"{type(value).__name__} (binary values go under keys ending in -bin)"
                )
            pairs.append((key, value.encode()))
    return pairs


def metadata_body(metadata: Mapping[str, MetadataValue]) -> bytes:
    """The wire bytes of ``metadata`` as ``CallMetadata`` carries them after its channel
    id (the postcard ``Vec<(String, Vec<u8>)>``), checked as ``encode_pairs`` checks."""
    return postcard.codec_for(list[tuple[str, bytes]]).dumps(encode_pairs(metadata))


class PreparedMetadata:
    """Metadata checked and encoded once, for a client that sends the same metadata with
    every call (``session.call(metadata=...)`` takes it as it takes a mapping)."""

    __slots__ = ("body", "values")

    def __init__(self, metadata: Mapping[str, MetadataValue]) -> None:
        self.values: Mapping[str, MetadataValue] = dict(metadata)
        self.body = metadata_body(self.values)


def merge_metadata(
    base: Mapping[str, MetadataValue] | None, extra: Mapping[str, MetadataValue]
) -> dict[str, MetadataValue]:
    """``base`` updated with ``extra`` (checked), as a new dict."""
    encode_pairs(extra)  # a bad key or value fails here, where it was given
    merged = dict(base or {})
    merged.update(extra)
    return merged


def check_metadata_size(size: int, limit: int, whose: str) -> None:
    """Refuse encoded metadata of ``size`` bytes over ``limit`` (``ResourceExhausted``)."""
    if size > limit:
        raise ResourceExhausted(
            f"call metadata of {size} bytes exceeds {whose} maximum of {limit} bytes"
        )


def decode_pairs(pairs: list[tuple[str, bytes]]) -> dict[str, MetadataValue]:
    """The metadata a peer sent, from its wire pairs; ``InvalidArgument`` naming what is
    wrong (a bad or repeated key, text that is not UTF-8)."""
    metadata: dict[str, MetadataValue] = {}
    for key, value in pairs:
        problem = _key_problem(key)
        if problem is not None:
            raise InvalidArgument(problem)
        if key in metadata:
            raise InvalidArgument(f"metadata key {key!r} appears more than once")
        if key.endswith(_BIN_SUFFIX):
            metadata[key] = value
            continue
        try:
            metadata[key] = value.decode()
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"the value of metadata key {key!r} is not UTF-8 text (binary values go "
                "under keys ending in -bin)"
            ) from None
    return metadata
