"""The README's "Typed services" snippet, verbatim (``tests/test_readme.py`` checks that
the README shows exactly this file, and ``.ci/run`` type-checks it with ``mypy --strict``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import rapace


@rapace.service
class Calculator(Protocol):
    async def add(self, a: rapace.i32, b: rapace.i32) -> rapace.i32: ...
    def countdown(self, start: rapace.u32) -> AsyncIterator[rapace.u32]: ...


class CalculatorImpl(Calculator):
    async def add(self, a: int, b: int) -> int:
        return a + b

    async def countdown(self, start: int) -> AsyncIterator[int]:
        for n in range(start, 0, -1):
            yield n


async def main() -> None:
    def on_session(session: rapace.RpcSession) -> None:
        rapace.register_services(session, CalculatorImpl())

    async with (
        rapace.serve(on_session, "unix:/tmp/calc.sock"),
        rapace.connect("unix:/tmp/calc.sock") as session,
    ):
        calc = rapace.client(Calculator, session, timeout=5.0)
        print(await calc.add(2, 3))
        print(await rapace.with_timeout(calc, 0.5).add(1, 1))  # one call's own deadline
        async for n in calc.countdown(3):
            print(n)


if __name__ == "__main__":
    rapace.run(main())  # on uvloop when installed
