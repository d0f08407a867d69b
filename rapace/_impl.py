"""The selector: picks the compiled or the pure twins once, at import, and hands out names.

Pure when ``RAPACE_NO_EXTENSIONS`` is set to a non-empty value, when the interpreter is
not CPython, or when a compiled module fails to import. All twins are chosen together, so
a compiled demux never meets pure frames. Type checkers read the pure twins.

The layers above import the selected names from here (``from rapace._impl import
Frame``). Tests and benchmarks that compare both twins in one process pick one with
``using("python")``: sessions, transports and servers read ``current()`` when they are
built, so that one context manager is the only seam between the layers and the twins.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Callable

    from rapace import _demux_py, _frame_py, _shm_py

__all__ = [
    "DEFAULT_MAX_PAYLOAD_SIZE",
    "IMPLEMENTATION",
    "Demux",
    "Frame",
    "FrameDecoder",
    "MsgDescHot",
    "Twin",
    "build_frame",
    "current",
    "encode_frame",
    "encode_message",
    "load_twin",
    "reply_frame",
    "using",
    "validate_descriptor",
]

TwinName = Literal["cython", "python"]


@dataclass(frozen=True, slots=True, eq=False)
class Twin:
    """The names one twin set gives the layers above it."""

    name: TwinName
    Frame: type[_frame_py.Frame]
    MsgDescHot: type[_frame_py.MsgDescHot]
    FrameDecoder: type[_frame_py.FrameDecoder]
    build_frame: Callable[[int, int, int, int, bytes], _frame_py.Frame]
    reply_frame: Callable[[_frame_py.Frame, int, bytes], _frame_py.Frame]
    encode_frame: Callable[[_frame_py.Frame], bytes]
    encode_message: Callable[[_frame_py.Frame], bytes]
    validate_descriptor: Callable[[_frame_py.MsgDescHot, int], None]
    DEFAULT_MAX_PAYLOAD_SIZE: int
    Demux: type[_demux_py.Demux]
    postcard: ModuleType  # the codec nodes, read by ``rapace.postcard``'s compiler
    SegmentCore: type[_shm_py.SegmentCore]  # the shared-memory transport's per-frame core


_loaded: dict[str, Twin] = {}


def load_twin(name: TwinName) -> Twin:
    """One twin set by name (an ``ImportError`` if the compiled one was not built)."""
    twin = _loaded.get(name)
    if twin is None:
        suffix = "" if name == "cython" else "_py"
        frame = importlib.import_module(f"rapace._frame{suffix}")
        demux = importlib.import_module(f"rapace._demux{suffix}")
        postcard = importlib.import_module(f"rapace._postcard{suffix}")
        shm = importlib.import_module(f"rapace._shm{suffix}")
        twin = _loaded[name] = Twin(
            name,
            frame.Frame,
            frame.MsgDescHot,
            frame.FrameDecoder,
            frame.build_frame,
            frame.reply_frame,
            frame.encode_frame,
            frame.encode_message,
            frame.validate_descriptor,
            frame.DEFAULT_MAX_PAYLOAD_SIZE,
            demux.Demux,
            postcard,
            shm.SegmentCore,
        )
    return twin


def _select() -> Twin:
    if not os.environ.get("RAPACE_NO_EXTENSIONS") and sys.implementation.name == "cpython":
        with contextlib.suppress(ImportError):
            return load_twin("cython")
    return load_twin("python")


_SELECTED: Twin = _select()
_current: contextvars.ContextVar[Twin] = contextvars.ContextVar("rapace_twin", default=_SELECTED)


def current() -> Twin:
    """The twin set that what is being built now should use (the selected one by default)."""
    return _current.get()


@contextlib.contextmanager
def using(twin: TwinName | Twin) -> Iterator[Twin]:
    """Build sessions, transports and servers on ``twin`` inside this block (tests, benchmarks)."""
    chosen = load_twin(twin) if isinstance(twin, str) else twin
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        _current.reset(token)


if TYPE_CHECKING:
    from rapace._demux_py import Demux
    from rapace._frame_py import (
        DEFAULT_MAX_PAYLOAD_SIZE,
        Frame,
        FrameDecoder,
        MsgDescHot,
        build_frame,
        encode_frame,
        encode_message,
        reply_frame,
        validate_descriptor,
    )

    IMPLEMENTATION: TwinName
else:
    IMPLEMENTATION = _SELECTED.name
    Frame = _SELECTED.Frame
    MsgDescHot = _SELECTED.MsgDescHot
    FrameDecoder = _SELECTED.FrameDecoder
    build_frame = _SELECTED.build_frame
    reply_frame = _SELECTED.reply_frame
    encode_frame = _SELECTED.encode_frame
    encode_message = _SELECTED.encode_message
    validate_descriptor = _SELECTED.validate_descriptor
    DEFAULT_MAX_PAYLOAD_SIZE = _SELECTED.DEFAULT_MAX_PAYLOAD_SIZE
    Demux = _SELECTED.Demux
