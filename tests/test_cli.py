"""``python -m rapace call`` / ``ping`` and the JSON conversion behind them
(``rapace.cli``, ``rapace.jsonvalues``): in process on each twin, and once end to end
against the example calculator server, as a shell user would run it."""

from __future__ import annotations

import enum
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
from net_helpers import child_env, run, short_tmpdir
from test_examples import EXAMPLES, calculator_server

import rapace
from rapace import cli
from rapace.__main__ import main
from rapace.jsonvalues import from_json, to_json


class Shape(rapace.DataEnum):
    pass


@dataclass
class Circle(Shape):
    radius: float


@dataclass
class Empty(Shape):
    pass


class Color(enum.Enum):
    Red = 0
    Green = 1


@dataclass
class Point:
    x: rapace.i32
    y: rapace.i32


@rapace.service
class Tools(Protocol):
    async def add(self, a: rapace.i32, b: rapace.i32 = 1) -> rapace.i32: ...
    async def move(self, p: Point, by: list[rapace.i32]) -> Point: ...
    async def describe(self, shape: Shape, color: Color | None) -> dict[str, bytes]: ...
    async def fail(self) -> None: ...
    def count(self, n: rapace.u8) -> AsyncIterator[Point]: ...


class ToolsImpl(Tools):
    async def add(self, a: int, b: int = 1) -> int:
        return a + b

    async def move(self, p: Point, by: list[int]) -> Point:
        return Point(p.x + by[0], p.y + by[1])

    async def describe(self, shape: Shape, color: Color | None) -> dict[str, bytes]:
        name = color.name if color else "none"
        return {type(shape).__name__: name.encode()}

    async def fail(self) -> None:
        raise rapace.NotFound("nothing here")

    async def count(self, n: int) -> AsyncIterator[Point]:
        for i in range(n):
            yield Point(i, -i)


def _call(name: str, args: str) -> list[Any]:
    """Serve ``ToolsImpl`` on a Unix socket and ``cli.call`` it; the JSON lines printed."""

    async def main(directory: str) -> list[Any]:
        def on_session(session: rapace.RpcSession) -> None:
            rapace.register_services(session, ToolsImpl())

        out = io.StringIO()
        async with rapace.serve(on_session, f"unix:{directory}/t.sock") as server:
            await cli.call(str(server.address), [Tools], name, args, timeout=5.0, out=out)
        return [json.loads(line) for line in out.getvalue().splitlines()]

    with short_tmpdir() as directory:
        return run(main(directory))


def test_call_unary_by_name_by_position_and_with_a_default(twin: Any) -> None:
    assert _call("Tools.add", '{"a": 2, "b": 3}') == [5]
    assert _call("add", "[2, 5]") == [7]
    assert _call("Tools.add", '{"a": 41}') == [42]


def test_call_converts_structs_enums_options_and_bytes(twin: Any) -> None:
    assert _call("Tools.move", '{"p": {"x": 1, "y": 2}, "by": [10, 20]}') == [{"x": 11, "y": 22}]
    assert _call("Tools.describe", '{"shape": {"Circle": {"radius": 1}}, "color": "Green"}') == [
        {"Circle": list(b"Green")}
    ]
    assert _call("Tools.describe", '{"shape": "Empty", "color": null}') == [
        {"Empty": list(b"none")}
    ]


def test_call_streams_one_line_per_item(twin: Any) -> None:
    assert _call("Tools.count", "3") == [{"x": 0, "y": 0}, {"x": 1, "y": -1}, {"x": 2, "y": -2}]


def test_call_errors() -> None:
    with pytest.raises(rapace.NotFound, match="nothing here"):
        _call("Tools.fail", "{}")
    with pytest.raises(cli.UsageError, match=r"Tools\.add: missing argument 'a'"):
        _call("Tools.add", "{}")
    with pytest.raises(cli.UsageError, match=r"p\.x: expected an integer, got 'one'"):
        _call("Tools.move", '{"p": {"x": "one", "y": 2}, "by": []}')
    with pytest.raises(cli.UsageError, match=r"no method 'Tools\.nope'"):
        _call("Tools.nope", "{}")
    with pytest.raises(cli.UsageError, match="has no variant 'Square'"):
        _call("Tools.describe", '{"shape": "Square", "color": null}')


def test_json_round_trips_through_the_type_hints() -> None:
    value = from_json({"base64": "AQI="}, bytes)
    assert value == b"\x01\x02" and to_json(value) == [1, 2]
    assert from_json({"1": "a"}, dict[int, str]) == {1: "a"}
    assert from_json([1, "x"], tuple[int, str]) == (1, "x")
    assert to_json(Circle(2.0)) == {"Circle": {"radius": 2.0}}
    assert to_json(Empty()) == "Empty"
    with pytest.raises(ValueError, match="value: expected true or false"):
        from_json(1, bool)


def test_ping_prints_round_trips(twin: Any) -> None:
    async def main(directory: str) -> str:
        out = io.StringIO()
        async with rapace.serve(lambda s: None, f"unix:{directory}/p.sock") as server:
            await cli.ping(str(server.address), count=2, timeout=5.0, out=out)
        return out.getvalue()

    with short_tmpdir() as directory:
        lines = run(main(directory)).splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"pong from unix:{directory}/p.sock: ") for line in lines)


def test_main_reports_usage_and_connection_errors(capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"{EXAMPLES / 'calculator.py'}:Calculator"
    with short_tmpdir() as directory:
        address = f"unix:{directory}/nobody.sock"
        assert main(["call", address, "Calculator.add", "--service", spec, "--json", "[1, 2]"]) == 2
        assert f"error: cannot connect to {address}" in capsys.readouterr().err
        assert main(["ping", address]) == 2
    assert main(["call", address, "X.add", "--service", "no_such_module:X"]) == 2
    assert "cannot import no_such_module" in capsys.readouterr().err


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    for command in ("call", "ping", "bench", "bench-server", "bench-client"):
        assert f"    {command}" in listing


def test_call_from_the_shell_against_the_example_server() -> None:
    env = child_env("python")
    spec = f"{EXAMPLES / 'calculator.py'}:Calculator"
    with short_tmpdir() as directory:
        address = f"unix:{directory}/calc.sock"
        with calculator_server(address, env):

            def shell(*args: str) -> subprocess.CompletedProcess[str]:
                command = [sys.executable, "-m", "rapace", "call", address, *args]
                return subprocess.run(
                    [*command, "--service", spec],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=30,
                    check=False,
                )

            done = shell("Calculator.add", "--json", '{"a": 2, "b": 3}')
            assert (done.returncode, done.stdout) == (0, "5\n"), done.stderr
            done = shell("Calculator.countdown", "--json", "2")
            assert (done.returncode, done.stdout) == (0, "2\n1\n0\n"), done.stderr
            done = shell("Calculator.divide", "--json", "[1, 0]")
            assert done.returncode == 1
            assert done.stderr == "error: InvalidArgument: division by zero\n"
