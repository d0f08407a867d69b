"""The README's Python snippets are files that are type-checked: each ```python block is,
verbatim, the body of one ``examples/readme_*.py`` (``.ci/run`` runs ``mypy --strict``
on ``examples/``), and a user program touching every public API type-checks too."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = (
    "readme_quickstart.py",
    "readme_interceptors.py",
    "readme_metrics.py",
    "readme_tunnels.py",
    "readme_websocket.py",
    "readme_tls.py",
    "readme_wire.py",
)


def _body(path: Path) -> str:
    """The file without its module docstring and ``from __future__`` line."""
    text = re.sub(r'^""".*?"""\n\n', "", path.read_text(), flags=re.S)
    return text.replace("from __future__ import annotations\n\n", "")


def test_the_readme_shows_the_checked_snippets() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks == [_body(ROOT / "examples" / name) for name in SNIPPETS]


def test_a_user_program_type_checks() -> None:
    if shutil.which("mypy") is None and not _has_mypy():
        pytest.fail("mypy is a test dependency: install '.[test]'")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "tests/typing/user_program.py", "examples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _has_mypy() -> bool:
    try:
        import mypy  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def test_the_api_reference_covers_every_public_name() -> None:
    """Each name in ``rapace.__all__`` is in docs/reference.md: a class or function as a
    mkdocstrings entry under its own module, anything else named in the text."""
    import rapace  # noqa: PLC0415

    reference = (ROOT / "docs" / "reference.md").read_text()
    entries = set(re.findall(r"^::: ([\w.]+)$", reference, flags=re.M))
    missing = []
    for name in rapace.__all__:
        obj = getattr(rapace, name)
        if isinstance(obj, type) or inspect.isfunction(obj):
            if f"{obj.__module__}.{name}" not in entries:
                missing.append(f"::: {obj.__module__}.{name}")
        elif f"`{name}`" not in reference:
            missing.append(f"`{name}`")
    assert not missing, f"docs/reference.md lacks {missing}"
