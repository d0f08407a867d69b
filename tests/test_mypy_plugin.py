"""``rapace.mypy_plugin``: typed clients take ``timeout=`` per call, and nothing else does.

One mypy run over a small program; the lines marked ``# E`` are the only ones that may
(and must) fail, so a plugin that adds nothing, or adds the keyword everywhere, fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PROGRAM = """
from collections.abc import AsyncIterator
from typing import Protocol

import rapace


@rapace.service
class Calc(Protocol):
    async def add(self, a: rapace.i32, b: rapace.i32) -> rapace.i32: ...
    def count(self, n: rapace.u16) -> AsyncIterator[rapace.u16]: ...


@rapace.service(name="Named")
class Named(Protocol):
    async def hello(self, who: str) -> str: ...


class CalcImpl(Calc):
    async def add(self, a: int, b: int) -> int:
        return a + b

    async def count(self, n: int) -> AsyncIterator[int]:
        yield n


class NotAService:
    async def add(self, a: int, b: int) -> int:
        return a + b


async def main(session: rapace.RpcSession) -> None:
    calc = rapace.client(Calc, session)
    total: int = await calc.add(1, 2, timeout=0.5)
    total = await calc.add(1, 2, timeout=None)
    total = await calc.add(1, 2)
    async for item in calc.count(3, timeout=1.0):
        total += item
    await rapace.client(Named, session).hello("you", timeout=2.0)
    await calc.add(1, 2, timeout="soon")  # E
    await calc.add(1, 2, deadline=1.0)  # E
    await CalcImpl().add(1, 2, timeout=0.5)  # E
    await NotAService().add(1, 2, timeout=0.5)  # E
    print(total)
"""


def test_only_typed_clients_take_a_per_call_timeout(tmp_path: Path) -> None:
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nstrict = True\nplugins = rapace.mypy_plugin\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--no-incremental", program],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    failing = {int(n) for n in re.findall(r"program\.py:(\d+): error", result.stdout)}
    expected = {n for n, line in enumerate(PROGRAM.splitlines(), 1) if line.endswith("# E")}
    assert failing == expected, result.stdout + result.stderr
