"""The shared-memory segment's file format, shared by both ``_shm`` twins.

Offsets, the configuration and its limits, creating a segment file (peer A) and opening
and validating one (peer B), exactly as the Rust implementation lays it out
(``docs/protocol.md`` "Shared memory"). Everything here runs once per segment, so it is
plain Python for both twins; the twins (``rapace/_shm.pyx``, ``rapace/_shm_py.py``) do the
per-frame work with real atomic instructions on the mapping this module makes.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_SHM_CONFIG",
    "MAGIC",
    "ShmConfig",
    "ShmError",
    "ShmNotReady",
    "create_segment",
    "open_segment",
]

MAGIC: Final = b"RAPACE\x00\x00"
VERSION: Final = 0x0001_0000
MAX_BYTES_DEFAULT: Final = 512 * 1024 * 1024
MAX_BYTES_ENV: Final = "RAPACE_SHM_MAX_BYTES"

HEADER_SIZE: Final = 128
RING_HEADER_SIZE: Final = 192
ENTRY_SIZE: Final = 64
SLAB_HEADER_SIZE: Final = 64
SLOT_META_SIZE: Final = 8
EMPTY_INDEX: Final = 0xFFFFFFFF

# Segment header fields (absolute offsets).
OFF_MAGIC: Final = 0
OFF_VERSION: Final = 8
OFF_FLAGS: Final = 12
OFF_CAPACITY: Final = 16
OFF_SLOT_SIZE: Final = 20
OFF_SLOT_COUNT: Final = 24
OFF_A_EPOCH: Final = 32
OFF_B_EPOCH: Final = 40
OFF_A_SEEN: Final = 48
OFF_B_SEEN: Final = 56
OFF_A2B_DATA: Final = 64
OFF_A2B_SPACE: Final = 68
OFF_B2A_DATA: Final = 72
OFF_B2A_SPACE: Final = 76
# Ring header fields (relative to the ring header).
RING_HEAD: Final = 0
RING_TAIL: Final = 64
RING_CAPACITY: Final = 128
# Slab header fields (relative to the slab header).
SLAB_SLOT_SIZE: Final = 0
SLAB_SLOT_COUNT: Final = 4
SLAB_MAX_FRAME: Final = 8
SLAB_FREE_HEAD: Final = 16
SLAB_SLOT_AVAILABLE: Final = 24

FLAG_A_LOCKS: Final = 0x1
"""Header ``flags`` bit set by a rapace-python peer A: it holds an OFD lock on byte 0 of
the file for as long as it lives (upstream writes and reads no flag)."""
FLAG_B_LOCKS: Final = 0x2
"""The same for peer B, on byte 1."""


class ShmError(ValueError):
    """A segment that cannot be created or opened, or one found corrupt."""


class ShmNotReady(ShmError):
    """The file is empty or its magic still zero: its creator may not have finished."""


@dataclass(frozen=True, slots=True)
class ShmConfig:
    """A segment's geometry: ``ring_capacity`` descriptors per direction (a power of
    two), ``slot_count`` shared payload slots of ``slot_size`` bytes each."""

    ring_capacity: int = 256
    slot_size: int = 65536
    slot_count: int = 128

    def __post_init__(self) -> None:
        for name in ("ring_capacity", "slot_size", "slot_count"):
            value = getattr(self, name)
            if type(value) is not int or not 0 < value <= 0xFFFFFFFF:
                raise ShmError(f"{name} must be an integer in 1..2**32-1, got {value!r}")
        if self.ring_capacity & (self.ring_capacity - 1):
            raise ShmError(f"ring_capacity must be a power of two, got {self.ring_capacity}")

    @property
    def size(self) -> int:
        """The file's exact size in bytes."""
        return self.slot_data + self.slot_size * self.slot_count

    # Region offsets (absolute).
    @property
    def a2b_ring(self) -> int:
        return HEADER_SIZE

    @property
    def b2a_ring(self) -> int:
        return HEADER_SIZE + RING_HEADER_SIZE + ENTRY_SIZE * self.ring_capacity

    @property
    def slab(self) -> int:
        return HEADER_SIZE + 2 * (RING_HEADER_SIZE + ENTRY_SIZE * self.ring_capacity)

    @property
    def slot_meta(self) -> int:
        return self.slab + SLAB_HEADER_SIZE

    @property
    def slot_data(self) -> int:
        return self.slot_meta + SLOT_META_SIZE * self.slot_count


DEFAULT_SHM_CONFIG: Final = ShmConfig()
"""Upstream ``rapace-cell``'s host-to-cell configuration: 256 descriptors, 128 slots of
64 KiB (8 422 976 bytes), so that a 64 KiB tunnel chunk fits one slot."""


def max_bytes() -> int:
    """The size limit: ``RAPACE_SHM_MAX_BYTES`` if it is a positive integer, else 512 MiB."""
    text = os.environ.get(MAX_BYTES_ENV, "")
    if text.isascii() and text.isdigit() and int(text) > 0:
        return int(text)
    return MAX_BYTES_DEFAULT


def check_limit(config: ShmConfig) -> None:
    """Refuse a segment over the size limit (read when a segment is made or opened)."""
    limit = max_bytes()
    if config.size > limit:
        raise ShmError(
            f"a segment of {config.size} bytes is over the limit of {limit} bytes "
            f"(set {MAX_BYTES_ENV} to raise it)"
        )


def create_segment(path: str, config: ShmConfig, mode: int = 0o600) -> mmap.mmap:
    """Create ``path`` (replacing any file there) and lay out a fresh segment, all but its
    magic. The file gets permissions ``mode`` whatever the umask: by default only its
    owner's processes may map it, since whoever can read it reads every payload, and
    whoever can write it can forge frames. A new file each time (``O_EXCL``), so a peer
    still attached to an old segment keeps that one, and a symlink planted there is not
    followed.

    The caller stores the magic last, with a release store, once it holds the mapping
    (the twin's ``publish_magic``): an opener polling the file never sees a half-made
    segment as valid (upstream writes the magic first).
    """
    check_limit(config)
    if config.slot_size % 4:
        # A free slot starts with a u32 link; upstream's own sizes are multiples of 64.
        raise ShmError(
            f"slot_size must be a multiple of 4 to create a segment, got {config.slot_size}"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
        os.ftruncate(fd, config.size)
        mapping = mmap.mmap(fd, config.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    c, s, n = config.ring_capacity, config.slot_size, config.slot_count
    struct.pack_into("<IIIII", mapping, OFF_VERSION, VERSION, 0, c, s, n)
    for ring in (config.a2b_ring, config.b2a_ring):
        struct.pack_into("<I", mapping, ring + RING_CAPACITY, c)
    struct.pack_into("<III", mapping, config.slab, s, n, s)
    data = config.slot_data
    for i in range(n):
        struct.pack_into("<I", mapping, data + i * s, i + 1 if i + 1 < n else EMPTY_INDEX)
    # free_head = index 0, tag 0: already zero, stored before the magic is.
    return mapping


def read_config(header: bytes, what: str) -> ShmConfig:
    """Validate a segment header (as upstream's opener does, in its order) and return the
    configuration it describes."""
    if len(header) < HEADER_SIZE:
        raise ShmError(f"{what} is too short for a segment header ({len(header)} bytes)")
    magic = header[OFF_MAGIC : OFF_MAGIC + 8]
    if magic == bytes(8):
        raise ShmNotReady(f"{what} is not initialised (its magic is zero)")
    if magic != MAGIC:
        raise ShmError(f"{what} is not a rapace segment (bad magic {magic.hex(' ')})")
    version, _flags, c, s, n = struct.unpack_from("<IIIII", header, OFF_VERSION)
    if version >> 16 != VERSION >> 16:
        raise ShmError(
            f"{what} has segment version {version >> 16}.{version & 0xFFFF}; "
            f"this peer speaks {VERSION >> 16}.x"
        )
    try:
        config = ShmConfig(c, s, n)
        check_limit(config)
    except ShmError as exc:
        raise ShmError(f"{what}: {exc}") from None
    return config


def open_segment(path: str) -> tuple[mmap.mmap, ShmConfig]:
    """Map an existing, initialised segment (peer B), configuration read from its header.

    ``ShmError`` names what is wrong: too short, bad magic (also: not initialised yet),
    wrong major version, a bad geometry, over the size limit, or ring or slab headers
    that disagree with the segment header.
    """
    what = f"shared-memory segment {path}"
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise ShmNotReady(f"{what} is empty (not initialised)")
        if size < HEADER_SIZE:
            raise ShmError(f"{what} is too short for a segment header ({size} bytes)")
        header = os.pread(fd, HEADER_SIZE, 0)
        config = read_config(header, what)
        if size < config.size:
            raise ShmError(f"{what} is too short: {size} bytes, its header describes {config.size}")
        mapping = mmap.mmap(fd, config.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        _check_regions(mapping, config, what)
    except ShmError:
        mapping.close()
        raise
    return mapping, config


def _check_regions(mapping: mmap.mmap, config: ShmConfig, what: str) -> None:
    for name, ring in (("A->B", config.a2b_ring), ("B->A", config.b2a_ring)):
        (capacity,) = struct.unpack_from("<I", mapping, ring + RING_CAPACITY)
        if capacity != config.ring_capacity:
            raise ShmError(
                f"{what}: the {name} ring says capacity {capacity}, "
                f"the header {config.ring_capacity}"
            )
    s, n = struct.unpack_from("<II", mapping, config.slab)
    if (s, n) != (config.slot_size, config.slot_count):
        raise ShmError(
            f"{what}: the slab header says {n} slots of {s} bytes, "
            f"the header {config.slot_count} of {config.slot_size}"
        )
