"""The selector: picks the compiled or the pure twins once, at import.

Pure when ``RAPACE_NO_EXTENSIONS`` is set to a non-empty value, when the interpreter is
not CPython, or when a compiled module fails to import. Both twins are chosen together,
so a compiled demux never meets pure frames. Type checkers read the pure twins.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Literal, NamedTuple

__all__ = [
    "CORE",
    "IMPLEMENTATION",
    "Core",
    "demux_impl",
    "frame_impl",
    "load_core",
    "postcard_impl",
]


class Core(NamedTuple):
    """One twin set: its name and its frame, demux and postcard modules."""

    name: Literal["cython", "python"]
    frame: ModuleType
    demux: ModuleType
    postcard: ModuleType


def load_core(name: Literal["cython", "python"]) -> Core:
    """Import one twin set explicitly (tests and benchmarks compare them in one process)."""
    import importlib

    suffix = "" if name == "cython" else "_py"
    return Core(
        name,
        importlib.import_module(f"rapace._frame{suffix}"),
        importlib.import_module(f"rapace._demux{suffix}"),
        importlib.import_module(f"rapace._postcard{suffix}"),
    )


if TYPE_CHECKING:
    from rapace import _demux_py as demux_impl
    from rapace import _frame_py as frame_impl
    from rapace import _postcard_py as postcard_impl

    IMPLEMENTATION: Literal["cython", "python"]
else:

    def _select():
        if not os.environ.get("RAPACE_NO_EXTENSIONS") and sys.implementation.name == "cpython":
            try:
                from rapace import _demux, _frame, _postcard
            except ImportError:
                pass
            else:
                return "cython", _frame, _demux, _postcard
        from rapace import _demux_py, _frame_py, _postcard_py

        return "python", _frame_py, _demux_py, _postcard_py

    IMPLEMENTATION, frame_impl, demux_impl, postcard_impl = _select()

CORE = Core(IMPLEMENTATION, frame_impl, demux_impl, postcard_impl)
"""The twin set this process runs on."""
