"""``rapace.run()``: run a coroutine on uvloop when it is installed, else on asyncio's loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["run", "uvloop_factory"]

T = TypeVar("T")


def uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None where uvloop is not installed."""
    try:
        import uvloop  # noqa: PLC0415  (optional dependency)
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """Like ``asyncio.run(main)``, on uvloop when available (the library works on any loop)."""
    with asyncio.Runner(debug=debug, loop_factory=uvloop_factory()) as runner:
        return runner.run(main)
