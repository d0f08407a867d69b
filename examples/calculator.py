"""The Calculator service, shared by the example server and client.

Declared as a ``typing.Protocol``: ``...`` bodies pass ``mypy --strict`` there, and the
implementation (``calculator_server.py``) subclasses it. A streaming method is a plain
``def`` returning ``AsyncIterator[T]``: an ``async def`` with ``yield`` implements it, and
the client iterates it with ``async for n in calc.countdown(5)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import rapace


@rapace.service
class Calculator(Protocol):
    async def add(self, a: rapace.i32, b: rapace.i32) -> rapace.i32: ...

    async def divide(self, a: rapace.i32, b: rapace.i32) -> float: ...

    def countdown(self, start: rapace.u32) -> AsyncIterator[rapace.u32]: ...


ADDRESS = "unix:/tmp/rapace-calculator.sock"
