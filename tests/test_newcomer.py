"""The newcomer's papercuts (issue 14), each pinned by a test: parameter defaults,
``register_services`` twice, ``connect(server.address)``, ``ConnectionFailed`` on every
loop, services installed by ``connect`` before the first frame, calls from inside an
async ``on_session``, ``Protocol`` declarations with plain-``def`` streams,
``with_timeout``, and running from the clone's parent directory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from net_helpers import KINDS, LOOPS, listen_address, run, short_tmpdir
from session_helpers import session_pair

import rapace

# -- services used below -------------------------------------------------------------------


@rapace.service
class Scaler(Protocol):
    async def scale(self, x: rapace.i32, factor: rapace.i32 = 2) -> rapace.i32: ...

    def count(self, start: rapace.u32, step: rapace.u32 = 1) -> AsyncIterator[rapace.u32]: ...


class ScalerImpl(Scaler):
    async def scale(self, x: int, factor: int = 2) -> int:
        return x * factor

    async def count(self, start: int, step: int = 1) -> AsyncIterator[int]:
        for n in range(start, 0, -step):
            yield n


@rapace.service
class Greeter:
    async def greet(self, name: str) -> str:
        raise NotImplementedError


class GreeterImpl(Greeter):
    async def greet(self, name: str) -> str:
        return f"hello {name}"


# -- parameter defaults --------------------------------------------------------------------


def test_defaults_are_sent_when_omitted(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as pair:
            client_session, server_session = pair.client, pair.server
            rapace.register_services(server_session, ScalerImpl())
            calc = rapace.client(Scaler, client_session, timeout=5.0)
            assert await calc.scale(21) == 42
            assert await calc.scale(5, 3) == 15
            assert await calc.scale(5, factor=4) == 20
            assert [n async for n in calc.count(5)] == [5, 4, 3, 2, 1]
            assert [n async for n in calc.count(5, step=2)] == [5, 3, 1]

    run(main(), loop="asyncio")


def test_a_default_the_codec_cannot_encode_is_refused_at_definition() -> None:
    with pytest.raises(TypeError, match=r"Bad\.f: the default of 'x' \(-1\) cannot be encoded"):

        @rapace.service
        class Bad:
            async def f(self, x: rapace.u8 = -1) -> None: ...


# -- register_services twice ---------------------------------------------------------------


def test_register_services_twice_adds(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as pair:
            client_session, server_session = pair.client, pair.server
            first = rapace.register_services(server_session, ScalerImpl())
            second = rapace.register_services(server_session, GreeterImpl())
            assert first is second is server_session.dispatcher
            assert await rapace.client(Scaler, client_session).scale(2) == 4
            assert await rapace.client(Greeter, client_session).greet("ann") == "hello ann"
            with pytest.raises(ValueError, match=r"Greeter\.greet\) is already served"):
                rapace.register_services(server_session, GreeterImpl())

    run(main(), loop="asyncio")


def test_register_services_refuses_to_replace_a_custom_dispatcher(twin: Any) -> None:
    async def mine(request: Any) -> bytes:
        return b""

    async def main() -> None:
        async with session_pair(twin) as pair:
            server_session = pair.server
            server_session.set_dispatcher(mine)
            with pytest.raises(ValueError, match="not a ServiceRouter"):
                rapace.register_services(server_session, GreeterImpl())
            assert server_session.dispatcher is mine

    run(main(), loop="asyncio")


# -- connect(): addresses, failures, services before the first frame ------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_connect_accepts_a_server_address(twin: Any, kind: str) -> None:
    async def main(directory: str) -> None:
        def on_session(session: rapace.RpcSession) -> object:
            return rapace.register_services(session, GreeterImpl())  # a result is ignored

        async with rapace.serve(on_session, listen_address(kind, directory)) as server:
            assert isinstance(server.address, rapace.Address)
            async with rapace.connect(server.address) as session:
                assert await rapace.client(Greeter, session).greet("bo") == "hello bo"

    with short_tmpdir() as directory:
        run(main(directory))


def _refused_tcp_address() -> str:
    with socket.socket() as probe:  # a port nobody listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", KINDS)
def test_connection_failures_are_connection_failed_naming_the_address(
    twin: Any, loop: str, kind: str
) -> None:
    async def main(address: str) -> None:
        with pytest.raises(rapace.ConnectionFailed) as caught:
            await rapace.connect(address)
        assert caught.value.address == address
        assert str(caught.value).startswith(f"cannot connect to {address}: ")
        assert isinstance(caught.value, ConnectionError)
        assert isinstance(caught.value.__cause__, OSError)

    with short_tmpdir() as directory:
        address = f"unix:{directory}/nobody.sock" if kind == "unix" else _refused_tcp_address()
        run(main(address), loop=loop)


@pytest.mark.parametrize("kind", KINDS)
def test_connect_installs_services_before_the_first_frame(twin: Any, kind: str) -> None:
    """The server calls the client from ``on_session``, before the client has done
    anything: the client's services are there (they would be ``Unimplemented`` if
    installed after ``connect`` returned), and the call from inside an async
    ``on_session`` completes instead of hanging until its timeout."""

    async def main(directory: str) -> None:
        greetings: list[str] = []

        async def on_session(session: rapace.RpcSession) -> None:
            greetings.append(await rapace.client(Greeter, session, timeout=5.0).greet("server"))
            rapace.register_services(session, ScalerImpl())

        async with rapace.serve(on_session, listen_address(kind, directory)) as server:
            async with rapace.connect(server.address, services=[GreeterImpl()]) as session:
                # Sent at once: it waits on the server until on_session has returned.
                assert await rapace.client(Scaler, session, timeout=5.0).scale(3) == 6
            assert greetings == ["hello server"]

    with short_tmpdir() as directory:
        run(main(directory))


def test_connect_with_an_async_on_session_may_call_the_server(twin: Any) -> None:
    async def main(directory: str) -> None:
        seen: list[int] = []

        async def client_setup(session: rapace.RpcSession) -> None:
            seen.append(await rapace.client(Scaler, session, timeout=5.0).scale(7))
            rapace.register_services(session, GreeterImpl())

        def server_setup(session: rapace.RpcSession) -> None:
            rapace.register_services(session, ScalerImpl())

        async with (
            rapace.serve(server_setup, listen_address("unix", directory)) as server,
            rapace.connect(server.address, on_session=client_setup) as session,
        ):
            assert seen == [14]
            assert session.dispatcher is not None

    with short_tmpdir() as directory:
        run(main(directory))


# -- typed clients ---------------------------------------------------------------------------


def test_with_timeout_is_a_view_with_its_own_deadline(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as pair:
            client_session, server_session = pair.client, pair.server
            rapace.register_services(server_session, ScalerImpl())
            calc = rapace.client(Scaler, client_session, timeout=5.0)
            quick = rapace.with_timeout(calc, 0.25)
            assert type(quick) is type(calc)
            assert quick._timeout == 0.25 and calc._timeout == 5.0  # type: ignore[attr-defined]
            assert await quick.scale(4) == 8
            with pytest.raises(TypeError, match=r"not a rapace\.client"):
                rapace.with_timeout(ScalerImpl(), 1.0)

    run(main(), loop="asyncio")


def test_a_stream_call_is_iterable_or_awaitable_once(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as pair:
            client_session, server_session = pair.client, pair.server
            rapace.register_services(server_session, ScalerImpl())
            calc = rapace.client(Scaler, client_session, timeout=5.0)
            call = calc.count(3)
            assert isinstance(call, rapace.StreamCall)
            stream = await call
            assert [n async for n in stream] == [3, 2, 1]
            with pytest.raises(RuntimeError, match="already started"):
                await call

    run(main(), loop="asyncio")


# -- installs -------------------------------------------------------------------------------


def test_running_from_the_clones_parent_directory_imports_the_package(tmp_path: Path) -> None:
    """With the clone's folder named ``rapace`` in the working directory, ``import
    rapace`` must still find the package (an editable install's import hook used to lose
    to the folder, a namespace package)."""
    root = Path(rapace.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").exists():
        pytest.skip("rapace is not an editable install of this clone")
    (tmp_path / "rapace").symlink_to(root, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", "import rapace; print(rapace.IMPLEMENTATION)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("cython", "python")
