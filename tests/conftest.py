"""One fixture runs every twin-sensitive test against both twins.

``--no-c-extensions`` deselects the compiled side (for pure builds, where it does not
exist); ``--compiled-twin-only`` deselects the pure side of twin-parametrized tests (CI's
runs on extra Python versions, where the compiled build is what may differ: the pure
twins are plain Python, run in full on the main version and in the pure build). Without
``--no-c-extensions`` a compiled twin that fails to import is a test failure, never a
skip: a broken build must not pass quietly.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from types import ModuleType

import pytest

from rapace import _impl, keepalive, security
from rapace.transport import stream

TWINS = {
    "cython": {"frame": "rapace._frame", "demux": "rapace._demux", "postcard": "rapace._postcard"},
    "python": {
        "frame": "rapace._frame_py",
        "demux": "rapace._demux_py",
        "postcard": "rapace._postcard_py",
    },
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-c-extensions",
        action="store_true",
        default=False,
        help="deselect the tests of the compiled twin (for pure builds)",
    )
    parser.addoption(
        "--compiled-twin-only",
        action="store_true",
        default=False,
        help="deselect the pure twin's runs of twin-parametrized tests",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "both_twins" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.c_extensions)
    no_compiled = config.getoption("--no-c-extensions")
    no_pure = config.getoption("--compiled-twin-only")
    if no_compiled and no_pure:
        raise pytest.UsageError("--no-c-extensions and --compiled-twin-only leave no twin")
    if not (no_compiled or no_pure):
        return
    kept, deselected = [], []
    for item in items:
        if no_compiled:
            drop = item.get_closest_marker("c_extensions") is not None
        else:
            callspec = getattr(item, "callspec", None)
            drop = callspec is not None and callspec.params.get("twin") == "python"
        (deselected if drop else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


class Twin:
    """A twin: ``.name`` and its modules (``.frame``, ``.demux``) imported on first use.

    A test that takes the ``twin`` fixture builds its sessions, transports and servers on
    that twin (``rapace._impl.using``, entered for the whole test)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, role: str) -> ModuleType:
        if role not in TWINS[self.name]:
            raise AttributeError(role)
        module = importlib.import_module(TWINS[self.name][role])
        setattr(self, role, module)
        return module

    def __repr__(self) -> str:
        return f"Twin({self.name!r})"


def load_twin(name: str) -> Twin:
    return Twin(name)


@pytest.fixture(
    scope="session",
    params=[pytest.param("cython", marks=pytest.mark.c_extensions), "python"],
)
def twin(request: pytest.FixtureRequest) -> Twin:
    """The twin under test: ``twin.name`` and its modules (``twin.frame``, ...)."""
    return load_twin(request.param)


@pytest.fixture(scope="session")
def both_twins(request: pytest.FixtureRequest) -> tuple[Twin, Twin]:
    """(compiled, pure), for differential tests; deselected with the compiled side."""
    return load_twin("cython"), load_twin("python")


@pytest.fixture(autouse=True)
def _fresh_log_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Some log lines are rate-limited for the whole process: each test sees its own."""
    for log in (
        keepalive._dead_log,
        keepalive._idle_log,
        keepalive._slow_log,
        stream._closing_log,
        security._handshake_log,
        security._refused_log,
    ):
        monkeypatch.setattr(log, "_last", -math.inf)


@pytest.fixture(autouse=True)
def _build_on_the_twin(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests that take ``twin`` build everything on it; the others on the selected twin."""
    if "twin" not in request.fixturenames:
        yield
        return
    twin: Twin = request.getfixturevalue("twin")
    with _impl.using(twin.name):  # type: ignore[arg-type]
        yield
