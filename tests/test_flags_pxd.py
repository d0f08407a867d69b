"""The flag values compiled into the twins are the ones in ``rapace.flags``.

The compiled twins take their flags from ``rapace/_flags.pxd`` as C constants; a stale
build, or an edit to one file and not the other, fails here instead of misrouting frames.
"""

from __future__ import annotations

import importlib

import pytest

from rapace.flags import FrameFlags


@pytest.mark.c_extensions
def test_compiled_flags_match_frame_flags() -> None:
    built = importlib.import_module("rapace._demux")._BUILT_FLAGS
    assert built == {flag.name: flag.value for flag in FrameFlags}
    assert all(type(value) is int for value in built.values())
