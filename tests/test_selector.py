"""Guard tests for the selector (DESIGN.md, "Twin implementations").

Each import runs in a fresh interpreter, since the choice is made once per process. The
subprocesses run from a temporary directory, so ``rapace`` comes from the installation
(editable or not), never from the current directory by accident.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import rapace
from rapace import _impl

PROBE = """
import json, rapace
from rapace import _frame_py
print(json.dumps({
    "implementation": rapace.IMPLEMENTATION,
    "pure_classes": rapace.MsgDescHot is _frame_py.MsgDescHot
        and rapace.Frame is _frame_py.Frame
        and rapace.FrameDecoder is _frame_py.FrameDecoder
        and rapace.encode_frame is _frame_py.encode_frame,
    "frame_module": rapace.MsgDescHot.__module__,
    "frame_file": __import__(rapace.MsgDescHot.__module__, fromlist=["x"]).__file__,
}))
"""


def probe(tmp_path: Path, no_extensions: str | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "RAPACE_NO_EXTENSIONS"}
    if no_extensions is not None:
        env["RAPACE_NO_EXTENSIONS"] = no_extensions
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.c_extensions
@pytest.mark.parametrize("no_extensions", [None, ""])
def test_default_import_is_compiled(tmp_path: Path, no_extensions: str | None) -> None:
    """Unset (or empty) RAPACE_NO_EXTENSIONS: the compiled twin, or the build is broken."""
    info = probe(tmp_path, no_extensions)
    assert info["implementation"] == "cython", info
    assert info["frame_module"] == "rapace._frame"
    assert not info["pure_classes"]
    assert not info["frame_file"].endswith(".py"), info["frame_file"]


@pytest.mark.parametrize("value", ["1", "yes", "0"])
def test_env_var_selects_pure(tmp_path: Path, value: str) -> None:
    """Any non-empty value selects the pure twin (even "0": the rule is "non-empty")."""
    info = probe(tmp_path, value)
    assert info["implementation"] == "python", info
    assert info["pure_classes"]
    assert info["frame_module"] == "rapace._frame_py"


def test_implementation_is_one_of_two() -> None:
    assert rapace.IMPLEMENTATION in ("cython", "python")
    if os.environ.get("RAPACE_NO_EXTENSIONS"):
        assert rapace.IMPLEMENTATION == "python"


def test_every_exported_name_exists() -> None:
    assert len(rapace.__all__) == len(set(rapace.__all__))
    missing = [name for name in rapace.__all__ if not hasattr(rapace, name)]
    assert missing == []


def test_star_import() -> None:
    namespace: dict[str, Any] = {}
    exec("from rapace import *", namespace)
    for name in rapace.__all__:
        assert namespace[name] is getattr(rapace, name)


def test_wire_core_is_exported() -> None:
    for name in (
        "MsgDescHot",
        "Frame",
        "FrameDecoder",
        "FrameError",
        "FrameFlags",
        "encode_frame",
        "validate_descriptor",
        "compute_method_id",
        "encode_error_payload",
        "parse_error_payload",
        "RpcError",
        "ErrorCode",
        "IMPLEMENTATION",
        "DEFAULT_MAX_PAYLOAD_SIZE",
    ):
        assert name in rapace.__all__, name


def test_exports_come_from_the_selected_twin() -> None:
    frame = _impl.frame_impl
    assert rapace.MsgDescHot is frame.MsgDescHot
    assert rapace.Frame is frame.Frame
    assert rapace.FrameDecoder is frame.FrameDecoder
    assert rapace.encode_frame is frame.encode_frame
    assert rapace.validate_descriptor is frame.validate_descriptor
    expected = "rapace._frame" if rapace.IMPLEMENTATION == "cython" else "rapace._frame_py"
    assert frame.__name__ == expected
