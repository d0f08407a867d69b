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
    "pure_classes": rapace.wire.MsgDescHot is _frame_py.MsgDescHot
        and rapace.wire.Frame is _frame_py.Frame
        and rapace.wire.FrameDecoder is _frame_py.FrameDecoder
        and rapace.wire.encode_frame is _frame_py.encode_frame,
    "frame_module": rapace.wire.MsgDescHot.__module__,
    "frame_file": __import__(rapace.wire.MsgDescHot.__module__, fromlist=["x"]).__file__,
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


def test_wire_core_is_public_under_rapace_wire() -> None:
    """The user API is ``rapace``; the wire core is ``rapace.wire``, not mixed into it."""
    wire_names = (
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
        "DEFAULT_MAX_PAYLOAD_SIZE",
        "DESC_SIZE",
    )
    for name in wire_names:
        assert name in rapace.wire.__all__, name
        assert hasattr(rapace.wire, name), name
        assert name not in rapace.__all__, name
    for name in ("RpcError", "ErrorCode", "IMPLEMENTATION", "RpcSession", "connect", "serve"):
        assert name in rapace.__all__, name
    assert "wire" in rapace.__all__


def test_exports_come_from_the_selected_twin() -> None:
    twin = _impl.current()
    assert twin.name == rapace.IMPLEMENTATION
    assert rapace.wire.MsgDescHot is twin.MsgDescHot is _impl.MsgDescHot
    assert rapace.wire.Frame is twin.Frame is _impl.Frame
    assert rapace.wire.FrameDecoder is twin.FrameDecoder
    assert rapace.wire.encode_frame is twin.encode_frame
    assert rapace.wire.validate_descriptor is twin.validate_descriptor
    expected = "rapace._frame" if rapace.IMPLEMENTATION == "cython" else "rapace._frame_py"
    assert twin.Frame.__module__ == expected


def test_using_picks_a_twin_for_what_is_built_inside_it_only() -> None:
    """The one seam between the layers and the twins: ``_impl.using``."""
    a, _b = rapace.mem_pair()
    with _impl.using("python") as pure:
        assert _impl.current() is pure
        assert pure.Frame.__module__ == "rapace._frame_py"
        session = rapace.RpcSession(a)
    assert _impl.current().name == rapace.IMPLEMENTATION
    assert type(session.frames.chunk(1, b"x")) is pure.Frame
    assert isinstance(session._demux, pure.Demux)
    session.close()
