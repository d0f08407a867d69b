"""The calculator example (``examples/``) run as a reader would: the server in one process,
the client in another, over a Unix socket, on each twin (``RAPACE_NO_EXTENSIONS=1`` for
the pure one).
"""

from __future__ import annotations

import contextlib
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from net_helpers import child_env, short_tmpdir

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

READY_TIMEOUT = 15.0
CLIENT_TIMEOUT = 30.0


@contextlib.contextmanager
def calculator_server(
    address: str, env: dict[str, str], cwd: Path = EXAMPLES
) -> Iterator[tuple[str, Any]]:
    """Start ``calculator_server.py``; yield its "serving" line and process; always kill it."""
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "calculator_server.py"), address],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        line = b""
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
            if not ready:
                break
            chunk = proc.stdout.readline()
            if not chunk:  # the server exited
                break
            line += chunk
        if b"serving" not in line:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"the server did not start: {line!r}\n{err.decode()[-3000:]}")
        yield line.decode().strip(), proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def run_client(address: str, env: dict[str, str], cwd: Path = EXAMPLES) -> list[str]:
    """Run ``calculator_client.py`` to the end; its output lines (trailing spaces cut)."""
    client = subprocess.run(
        [sys.executable, str(EXAMPLES / "calculator_client.py"), address],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert client.returncode == 0, client.stderr.decode()[-3000:]
    return [line.rstrip() for line in client.stdout.decode().splitlines()]


EXPECTED = [
    "2 + 3 = 5",
    "7 / 2 = 3.5",
    "1 / 0 -> InvalidArgument: division by zero",
    "countdown: 5 4 3 2 1 0",
]


def test_calculator_example(twin: Any) -> None:
    env = child_env(twin.name)
    with short_tmpdir() as directory:
        address = f"unix:{directory}/calc.sock"
        with calculator_server(address, env) as (serving, server):
            assert serving == f"calculator serving on {address} ({twin.name} core)"
            assert run_client(address, env) == EXPECTED
            assert server.poll() is None, "the server exited after its client left"
            assert run_client(address, env) == EXPECTED  # a second client, same server


def test_calculator_example_run_from_another_directory(tmp_path: Path) -> None:
    """The scripts find ``calculator`` next to them whatever the working directory."""
    env = child_env("python")
    with short_tmpdir() as directory:
        address = f"unix:{directory}/calc.sock"
        with calculator_server(address, env, cwd=tmp_path):
            assert run_client(address, env, cwd=tmp_path) == EXPECTED


def test_two_way_example(twin: Any) -> None:
    """``examples/two_way.py``: callbacks, a notification, a tunnel, a graceful shutdown."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "two_way.py")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=child_env(twin.name),
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    lines = done.stdout.decode().splitlines()
    assert lines[:7] == [
        "client: progress 1/3",
        "client: progress 2/3",
        "client: progress 3/3",
        "client: ran 3 steps",
        "server: notified by two_way.py",
        "client: tunnel says ECHO ME",
        lines[6],
    ]
    assert lines[6] in (
        "client: after shutdown: Unavailable",
        "client: after shutdown: SessionClosed",
    )
    assert len(lines) == 7


def test_interceptors_example(twin: Any) -> None:
    """``examples/readme_interceptors.py``: an auth interceptor refuses a call without the
    token and admits one with it; the logging interceptors time both, on both sides."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "readme_interceptors.py")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=child_env(twin.name),
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    lines = [
        re.sub(r"in \d+\.\d ms$", "in N ms", line) for line in done.stdout.decode().splitlines()
    ]
    assert lines == [
        "server: Greeter.greet PermissionDenied in N ms",
        "client: Greeter.greet PermissionDenied in N ms",
        "refused: Greeter.greet: a valid token is required",
        "server: Greeter.greet ok in N ms",
        "client: Greeter.greet ok in N ms",
        "hello ann, you are ann",
    ]
