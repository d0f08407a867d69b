"""The package's layering (DESIGN.md, "Layers"): no import cycle, one job per module.

Each module is imported first in a fresh interpreter, so an import cycle that only bites
when a module is the first one loaded shows up; the import graph is read from the source
with ``ast``, so a cycle hidden behind a lazy import order shows up too.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rapace

PACKAGE = Path(rapace.__file__).parent
MODULES = sorted(
    ".".join(("rapace", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py")
)


def _imports(module: str) -> set[str]:
    """The ``rapace`` modules ``module`` imports at run time (not under TYPE_CHECKING)."""
    parts = module.split(".")
    path = PACKAGE.joinpath(*parts[1:])
    source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(source.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("rapace"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "rapace":
                    found.update(f"rapace.{a.name}" for a in node.names)
                elif node.module.startswith("rapace."):
                    found.add(node.module)
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    visit([n for n in inner if isinstance(n, ast.stmt | ast.ExceptHandler)])  # type: ignore[misc]

    visit(tree.body)
    return {name for name in found if name in MODULES and name != module}


def test_the_import_graph_has_no_cycle() -> None:
    graph = {module: _imports(module) for module in MODULES}
    state: dict[str, str] = {}
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        path.pop()
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            walk(module)


def test_tunnels_and_streams_do_not_import_the_session() -> None:
    """They reach the session through ``ChannelPort`` only (``rapace.channel``)."""
    for module in (
        "rapace.tunnel",
        "rapace.streaming",
        "rapace.channel",
        "rapace.frames",
        "rapace.named",
    ):
        assert "rapace.session" not in _imports(module), module
    for module in MODULES:
        if "rapace.session" in _imports(module):
            assert module not in ("rapace.tunnel", "rapace.streaming"), module


def test_the_graph_reader_sees_real_imports() -> None:
    """Guard for the two tests above: the reader finds known edges."""
    assert "rapace.tunnel" in _imports("rapace.session")
    assert "rapace._impl" in _imports("rapace.session")
    assert "rapace.streaming" in _imports("rapace.service")


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_first_in_a_fresh_interpreter(module: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", MODULES)
def test_each_module_says_its_job(module: str) -> None:
    loaded = __import__(module, fromlist=["_"])
    doc = (loaded.__doc__ or "").strip()
    assert len(doc) > 20, f"{module} has no docstring saying what it is for"


SOURCES = sorted(p for ext in ("*.py", "*.pyx", "*.pxd", "*.pxi") for p in PACKAGE.rglob(ext))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_source_speaks_of_this_project_only(path: Path) -> None:
    """Docstrings and comments name the protocol and this project, not its tracker."""
    text = path.read_text().lower()
    for phrase in ("the seed", "seed's", "the issue", "issue's"):
        assert phrase not in text, f"{path.name} speaks of {phrase!r}"
