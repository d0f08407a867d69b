"""The flag values and sizes compiled into the twins are the ones in ``rapace.flags``.

The compiled twins take them from ``rapace/_flags.pxd`` as C constants; a stale build, or
an edit to one file and not the other, fails here instead of misrouting frames.
"""

from __future__ import annotations

import importlib

import pytest

from rapace.flags import DESC_SIZE, INLINE_PAYLOAD_SIZE, FrameFlags


@pytest.mark.c_extensions
def test_compiled_flags_match_frame_flags() -> None:
    built = importlib.import_module("rapace._demux")._BUILT_FLAGS
    assert built == {flag.name: flag.value for flag in FrameFlags}
    assert all(type(value) is int for value in built.values())


@pytest.mark.c_extensions
def test_compiled_sizes_match_the_wire_sizes() -> None:
    built = importlib.import_module("rapace._frame")._BUILT_SIZES
    assert built == {"DESC_SIZE": DESC_SIZE, "INLINE_PAYLOAD_SIZE": INLINE_PAYLOAD_SIZE}
