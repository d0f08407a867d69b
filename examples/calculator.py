"""The Calculator service, shared by the example server and client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import rapace


@rapace.service
class Calculator:
    async def add(self, a: rapace.i32, b: rapace.i32) -> rapace.i32: ...

    async def divide(self, a: rapace.i32, b: rapace.i32) -> float: ...

    async def countdown(self, start: rapace.u32) -> AsyncIterator[rapace.u32]: ...


ADDRESS = "unix:/tmp/rapace-calculator.sock"
