"""Observability: per-session and per-server counters, the Prometheus exporter, child loggers.

Over real sockets (Unix, TCP, WebSocket) on both twins: what one end counts as sent the
other counts as received, calls are counted by ``Service.method`` and status on both
sides, a server adds up its closed sessions too, and a Prometheus scrape (from the loop
and from another thread) shows the same numbers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from net_helpers import run, run_program, short_tmpdir, wait_for, wait_until
from prometheus_client.parser import text_string_to_metric_families

import rapace
import rapace.asgi
from rapace.metrics import PrometheusCollector, snapshot
from rapace.stats import CallCounts, MetricsSnapshot, status_name
from rapace.wire import compute_method_id

UNKNOWN = compute_method_id("Calc", "no_such_method")
UNKNOWN_LABEL = f"{UNKNOWN:#010x}"


@rapace.service
class Calc:
    async def add(self, a: rapace.i32, b: rapace.i32) -> rapace.i32: ...
    async def missing(self, key: str) -> str: ...
    async def boom(self) -> None: ...
    async def hang(self) -> None: ...


class CalcImpl(Calc):
    def __init__(self) -> None:
        self.hanging = asyncio.Event()

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def missing(self, key: str) -> str:
        raise rapace.NotFound(f"no {key}")

    async def boom(self) -> None:
        raise ZeroDivisionError("a bug in the handler")

    async def hang(self) -> None:
        self.hanging.set()
        await asyncio.get_running_loop().create_future()


def address_of(kind: str, directory: str) -> str:
    return {
        "unix": f"unix:{directory}/m.sock",
        "tcp": "tcp://127.0.0.1:0",
        "ws": "ws://127.0.0.1:0/rapace",
    }[kind]


async def exercise(session: rapace.RpcSession, impl: CalcImpl) -> None:
    """Three calls that succeed, one of each failure, one the caller gives up on."""
    calc = rapace.client(Calc, session, timeout=5.0)
    assert [await calc.add(i, 1) for i in range(3)] == [1, 2, 3]
    with pytest.raises(rapace.NotFound):
        await calc.missing("x")
    with pytest.raises(rapace.Internal):
        await calc.boom()
    with pytest.raises(rapace.Unimplemented):
        await session.call(session.next_channel_id(), UNKNOWN, b"")
    hanging = asyncio.ensure_future(calc.hang())
    await wait_for(impl.hanging, "the hang handler to start")
    assert session.metrics().calls_pending == 1
    hanging.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hanging


EXPECTED_CALLS = {
    ("Calc.add", "Ok"): 3,
    ("Calc.missing", "NotFound"): 1,
    ("Calc.boom", "Internal"): 1,
    (UNKNOWN_LABEL, "Unimplemented"): 1,
    ("Calc.hang", "Cancelled"): 1,
}


async def quiet(a: rapace.RpcSession, b: rapace.RpcSession) -> None:
    """Wait until every frame either end sent has been counted by the other."""

    def settled() -> bool:
        ta, tb = a.stats.traffic, b.stats.traffic
        return (ta.frames_sent, ta.bytes_sent) == (tb.frames_received, tb.bytes_received) and (
            tb.frames_sent,
            tb.bytes_sent,
        ) == (ta.frames_received, ta.bytes_received)

    await wait_until(settled, "both ends to count the same traffic")


@pytest.mark.parametrize("kind", ["unix", "tcp", "ws"])
def test_both_ends_count_calls_by_method_and_status_and_the_same_traffic(
    twin: Any, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    if kind == "ws":
        pytest.importorskip("picows")
    impl = CalcImpl()

    async def main() -> None:
        with short_tmpdir() as directory:
            async with (
                rapace.serve(
                    lambda s: rapace.register_services(s, impl),
                    address_of(kind, directory),
                    keepalive=None,
                ) as server,
                rapace.connect(str(server.address), keepalive=None) as client,
            ):
                server.count_calls = client.count_calls = True  # (also the open session's)
                await exercise(client, impl)
                (accepted,) = server.sessions
                await wait_until(
                    lambda: accepted.metrics().calls_served.get(("Calc.hang", "Cancelled")) == 1,
                    "the server to count the cancelled call",
                )
                made, served = client.metrics(), accepted.metrics()
                assert made.calls_made == EXPECTED_CALLS
                assert served.calls_served == EXPECTED_CALLS
                assert made.calls_served == {} and served.calls_made == {}
                assert served.requests_admitted == 7 and served.requests_cancelled == 1
                assert served.requests_running == 0 and made.calls_pending == 0
                await quiet(client, accepted)
                sent = client.stats.traffic
                assert sent.frames_sent >= 7  # the requests, and the cancel
                assert sent.bytes_sent >= 7 * 64
                assert accepted.stats.traffic.frames_sent >= 6  # the answers
                assert (made.frames_sent, made.bytes_sent) == (sent.frames_sent, sent.bytes_sent)

    with caplog.at_level(logging.ERROR, logger="rapace"):
        run(main())
    (failure,) = [r for r in caplog.records if "handler for" in r.getMessage()]
    assert failure.name == "rapace.session"
    assert "Calc.boom (0x" in failure.getMessage()


def test_a_server_adds_up_its_sessions_closed_ones_included(twin: Any) -> None:
    impl = CalcImpl()

    async def main() -> None:
        async with rapace.serve(
            lambda s: rapace.register_services(s, impl), "tcp://127.0.0.1:0", keepalive=None
        ) as server:
            server.count_calls = True
            first = await rapace.connect(str(server.address), keepalive=None)
            async with rapace.connect(str(server.address), keepalive=None) as second:
                for session, calls in ((first, 2), (second, 3)):
                    calc = rapace.client(Calc, session)
                    for i in range(calls):
                        assert await calc.add(i, i) == 2 * i
                await wait_until(lambda: len(server.sessions) == 2, "two sessions")
                first_sent = first.stats.traffic.frames_sent
                await first.aclose()
                await wait_until(lambda: len(server.sessions) == 1, "the first session to end")
                total = server.metrics()
                assert total.calls_served == {("Calc.add", "Ok"): 5}
                assert (total.sessions, total.sessions_open) == (2, 1)
                assert total.requests_admitted == 5
                (open_one,) = server.sessions
                await quiet(second, open_one)
                # The closed session's traffic stays in the total.
                assert total.frames_received >= first_sent + open_one.stats.traffic.frames_received
            await wait_until(lambda: not server.sessions, "the second session to end")
            after = server.metrics()
            assert after.calls_served == {("Calc.add", "Ok"): 5}
            assert (after.sessions, after.sessions_open) == (2, 0)
            assert after.frames_received >= total.frames_received

    run(main())


def test_refused_requests_are_counted_with_their_status(twin: Any) -> None:
    """A session with no dispatcher refuses: counted as refused and by status."""

    async def main() -> None:
        async with (
            rapace.serve(lambda s: None, "tcp://127.0.0.1:0", keepalive=None) as server,
            rapace.connect(str(server.address), keepalive=None) as client,
        ):
            server.count_calls = True
            with pytest.raises(rapace.Unimplemented):
                await client.call(client.next_channel_id(), UNKNOWN, b"")
            total = server.metrics()
            assert total.requests_refused == 1 and total.requests_admitted == 0
            assert total.calls_served == {(UNKNOWN_LABEL, "Unimplemented"): 1}

    run(main())


def scrape(
    registry: prometheus_client.CollectorRegistry,
) -> dict[tuple[str, tuple[Any, ...]], float]:
    text = prometheus_client.generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_prometheus_exposition_from_the_loop_and_from_another_thread(twin: Any) -> None:
    impl = CalcImpl()

    async def main() -> None:
        registry = prometheus_client.CollectorRegistry()
        async with rapace.serve(
            lambda s: rapace.register_services(s, impl), "tcp://127.0.0.1:0", keepalive=None
        ) as server:
            PrometheusCollector(server, registry=registry)
            async with rapace.connect(str(server.address), keepalive=None) as client:
                await exercise(client, impl)
                await wait_until(
                    lambda: server.metrics().calls_served.get(("Calc.hang", "Cancelled")) == 1,
                    "the server to count the cancelled call",
                )
                (accepted,) = server.sessions
                await quiet(client, accepted)
                here = scrape(registry)
                there = await asyncio.to_thread(scrape, registry)  # (the loop answers it)
                assert there == here
                for (method, status), count in EXPECTED_CALLS.items():
                    key = ("rapace_calls_served_total", (("method", method), ("status", status)))
                    assert here[key] == count
                traffic = accepted.stats.traffic
                assert here[("rapace_frames_received_total", ())] == traffic.frames_received
                assert here[("rapace_bytes_sent_total", ())] == traffic.bytes_sent
                assert here[("rapace_requests_cancelled_total", ())] == 1
                assert here[("rapace_sessions_open", ())] == 1
                assert here[("rapace_requests_running", ())] == 0
                # A handler running now shows in the gauge.
                impl.hanging.clear()
                hanging = asyncio.ensure_future(rapace.client(Calc, client).hang())
                await wait_for(impl.hanging, "the second hang to start")
                assert (await asyncio.to_thread(scrape, registry))[
                    ("rapace_requests_running", ())
                ] == 1
                hanging.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await hanging
            await wait_until(lambda: not server.sessions, "the session to end")
            closed = scrape(registry)
            assert closed[("rapace_sessions_total", ())] == 1
            assert closed[("rapace_sessions_open", ())] == 0
            key = ("rapace_calls_served_total", (("method", "Calc.add"), ("status", "Ok")))
            assert closed[key] == 3

    run(main())


def test_a_session_collector_and_namespaces(twin: Any) -> None:
    """One session can be exported too; two collectors in one registry need two namespaces."""

    async def main() -> None:
        registry = prometheus_client.CollectorRegistry()
        impl = CalcImpl()
        async with (
            rapace.serve(
                lambda s: rapace.register_services(s, impl), "tcp://127.0.0.1:0", keepalive=None
            ) as server,
            rapace.connect(str(server.address), keepalive=None) as client,
        ):
            PrometheusCollector(client, registry=registry, namespace="client")
            with pytest.raises(ValueError, match="Duplicated"):
                PrometheusCollector(client, registry=registry, namespace="client")
            PrometheusCollector(server, registry=registry, namespace="server")
            assert await rapace.client(Calc, client).add(2, 3) == 5
            samples = scrape(registry)
            made = ("client_calls_made_total", (("method", "Calc.add"), ("status", "Ok")))
            served = ("server_calls_served_total", (("method", "Calc.add"), ("status", "Ok")))
            assert samples[made] == 1 and samples[served] == 1
            assert samples[("client_sessions_open", ())] == 1
        with pytest.raises(TypeError, match="something with metrics"):
            PrometheusCollector(object(), registry=None)  # type: ignore[arg-type]

    run(main())


def test_a_scrape_of_a_stopped_loop_reads_directly(twin: Any) -> None:
    """After the loop is gone (or before it runs) nothing races: the snapshot is direct."""
    impl = CalcImpl()
    holder: dict[str, rapace.Server] = {}

    async def main() -> None:
        async with rapace.serve(
            lambda s: rapace.register_services(s, impl), "tcp://127.0.0.1:0", keepalive=None
        ) as server:
            holder["server"] = server
            server.count_calls = True
            async with rapace.connect(str(server.address), keepalive=None) as client:
                assert await rapace.client(Calc, client).add(1, 1) == 2
            await wait_until(lambda: not server.sessions, "the session to end")

    run(main())
    assert snapshot(holder["server"]).calls_served == {("Calc.add", "Ok"): 1}


def test_the_child_loggers(twin: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Transport problems log under rapace.transport, server ones under rapace.server."""

    def logged(text: str) -> bool:
        return any(text in r.getMessage() for r in caplog.records)

    async def main() -> None:
        def refuse(session: rapace.RpcSession) -> None:
            raise RuntimeError("no sessions today")

        loop = asyncio.get_running_loop()
        async with (
            rapace.serve(lambda s: None, "tcp://127.0.0.1:0") as good,
            rapace.serve(refuse, "tcp://127.0.0.1:0") as refusing,
        ):
            sock = socket.create_connection((good.address.host, good.address.port))
            with sock:
                sock.setblocking(False)
                await loop.sock_sendall(sock, b"\xff" * 80)  # not a rapace stream
                await wait_until(lambda: logged("closing rapace"), "the stream error logged")
            # (a well-behaved client: garbage could end the connection before on_session)
            async with rapace.connect(refusing.address):
                await wait_until(lambda: logged("on_session failed"), "the failure logged")

    with caplog.at_level(logging.WARNING, logger="rapace"):
        run(main())
    names = {
        text: r.name
        for r in caplog.records
        for text in ("closing rapace", "on_session failed")
        if text in r.getMessage()
    }
    assert names == {"closing rapace": "rapace.transport", "on_session failed": "rapace.server"}


def test_mem_transport_counts_frames_not_bytes(twin: Any) -> None:
    async def main() -> None:
        a, b = rapace.mem_pair()
        client, server = rapace.RpcSession(a, 1), rapace.RpcSession(b, 2)

        async def echo(frame: Any) -> bytes:
            return frame.payload  # type: ignore[no-any-return]

        server.set_dispatcher(echo)
        client.count_calls = True
        async with client, server:
            for i in range(5):
                await client.call(client.next_channel_id(), UNKNOWN, b"%d" % i)
            assert client.stats.traffic.frames_sent == 5
            assert server.stats.traffic.frames_received == 5
            assert server.stats.traffic.frames_sent == 5  # (delivered: the calls returned)
            assert client.stats.traffic.bytes_sent == 0
            assert client.metrics().calls_made == {(UNKNOWN_LABEL, "Ok"): 5}

    run(main())


def test_counts_add_up_and_name_their_statuses() -> None:
    counts = CallCounts()
    for method_id, code in ((7, 0), (7, 0), (7, 5), (8, 999)):
        counts.add(method_id, code)
    assert counts.total() == 4
    assert counts.named({7: "S.m"}) == {
        ("S.m", "Ok"): 2,
        ("S.m", "AlreadyExists"): 1,
        ("0x00000008", "999"): 1,
    }
    assert status_name(0) == "Ok" and status_name(2) == "DeadlineExceeded"
    one = MetricsSnapshot(frames_sent=2, calls_served={("S.m", "Ok"): 1}, sessions=1)
    two = one.copy()
    two += one
    assert (two.frames_sent, two.calls_served, two.sessions) == (4, {("S.m", "Ok"): 2}, 2)
    assert (one.frames_sent, one.calls_served) == (2, {("S.m", "Ok"): 1})  # a real copy


def test_serving_without_the_exporter_never_imports_prometheus_client(tmp_path: Path) -> None:
    """The exporter costs nothing unless imported: a server and a call do not load it."""
    program = """
import asyncio, sys
import rapace
import rapace.asgi

async def main():
    async def echo(frame):
        return frame.payload

    async with rapace.serve(lambda s: s.set_dispatcher(echo), "tcp://127.0.0.1:0") as server:
        server.count_calls = True
        async with rapace.connect(str(server.address)) as client:
            await client.call(client.next_channel_id(), 7, b"x")
        assert server.metrics().calls_served == {("0x00000007", "Ok"): 1}

asyncio.run(main())
print("prometheus_client" in sys.modules)
"""
    assert run_program(program, tmp_path) == "False"


def test_an_asgi_endpoint_adds_up_its_sessions_too(twin: Any) -> None:
    """``rapace.asgi``'s endpoint, served by uvicorn in this process, over a real socket."""
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("picows")
    impl = CalcImpl()

    async def main() -> None:
        app = rapace.asgi.endpoint(lambda s: rapace.register_services(s, impl))
        app.count_calls = True
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, ws="websockets-sansio", log_level="error"
        )
        server = uvicorn.Server(config)
        serving = asyncio.ensure_future(server.serve())
        try:
            await wait_until(lambda: server.started, "uvicorn to start")
            port = server.servers[0].sockets[0].getsockname()[1]
            async with rapace.connect(f"ws://127.0.0.1:{port}/rapace", keepalive=None) as client:
                assert await rapace.client(Calc, client).add(20, 22) == 42
                registry = prometheus_client.CollectorRegistry()
                PrometheusCollector(app, registry=registry)
                open_now = scrape(registry)
                assert open_now[("rapace_sessions_open", ())] == 1
            await wait_until(lambda: not app.sessions, "the endpoint's session to end")
            total = app.metrics()
            assert total.calls_served == {("Calc.add", "Ok"): 1}
            assert (total.sessions, total.sessions_open) == (1, 0)
            assert total.frames_received >= 1 and total.bytes_received >= 64
        finally:
            server.should_exit = True
            await wait_for(serving, "uvicorn to stop")

    run(main())


def test_calls_by_method_are_counted_only_when_asked(twin: Any) -> None:
    """``count_calls`` is off by default (a dict update per call); the rest always counts."""
    impl = CalcImpl()

    async def main() -> None:
        async with rapace.serve(
            lambda s: rapace.register_services(s, impl), "tcp://127.0.0.1:0", keepalive=None
        ) as server:
            assert not server.count_calls
            async with rapace.connect(str(server.address), keepalive=None) as client:
                assert not client.count_calls
                calc = rapace.client(Calc, client)
                assert await calc.add(1, 2) == 3
                with pytest.raises(rapace.NotFound):
                    await calc.missing("x")
                (accepted,) = server.sessions
                off = server.metrics()
                assert off.calls_served == {} and client.metrics().calls_made == {}
                assert off.requests_admitted == 2 and off.frames_received >= 2
                client.count_calls = True
                PrometheusCollector(server, registry=None)  # turns the server's on
                assert server.count_calls and accepted.count_calls
                assert await calc.add(1, 2) == 3
                assert server.metrics().calls_served == {("Calc.add", "Ok"): 1}
                assert client.metrics().calls_made == {("Calc.add", "Ok"): 1}
                client.count_calls = False
                assert await calc.add(1, 2) == 3
                assert client.metrics().calls_made == {("Calc.add", "Ok"): 1}  # (kept)

    run(main())


@rapace.service
class Counter:
    async def count(self, n: rapace.u32) -> AsyncIterator[rapace.u32]: ...


class CounterImpl(Counter):
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        if n == 3:
            raise rapace.NotFound("no fourth item")
        if n == 4:
            raise ZeroDivisionError("a bug in the stream")
        if n == 1:
            try:
                await asyncio.get_running_loop().create_future()  # until the client stops
            except asyncio.CancelledError:
                self.cancelled.set()
                raise


async def _pass(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
    return await call_next()


@pytest.mark.parametrize("interceptors", ["none", "one"])
def test_streams_are_counted_with_how_they_ended_on_both_sides(
    twin: Any, interceptors: str
) -> None:
    """An error item counts its error (not ``Ok``) where it is sent and where it arrives,
    a stream stopped early ``Cancelled``; with and without an interceptor (two paths)."""
    impl = CounterImpl()
    chain = [_pass] if interceptors == "one" else []

    async def main() -> None:
        async with (
            rapace.serve(
                lambda s: rapace.register_services(s, impl, interceptors=chain),
                "tcp://127.0.0.1:0",
                keepalive=None,
            ) as server,
            rapace.connect(str(server.address), keepalive=None) as client,
        ):
            server.count_calls = client.count_calls = True
            counter = rapace.client(Counter, client, interceptors=chain)
            assert [n async for n in counter.count(2)] == [0, 1]
            with pytest.raises(rapace.NotFound):
                _ = [n async for n in counter.count(3)]
            with pytest.raises(rapace.Internal):
                _ = [n async for n in counter.count(4)]
            stream = await counter.count(1)
            assert await stream.__anext__() == 0
            assert client.metrics().calls_made == {
                ("Counter.count", "Ok"): 1,
                ("Counter.count", "NotFound"): 1,
                ("Counter.count", "Internal"): 1,
            }
            await stream.aclose()
            await wait_for(impl.cancelled, "the server to cancel the stopped stream")
            expected = {
                ("Counter.count", "Ok"): 1,
                ("Counter.count", "NotFound"): 1,
                ("Counter.count", "Internal"): 1,
                ("Counter.count", "Cancelled"): 1,
            }
            assert client.metrics().calls_made == expected
            await wait_until(
                lambda: server.metrics().calls_served == expected,
                "the server to count the cancelled stream",
            )

    run(main())


def test_a_stream_callback_sees_the_end_once_even_if_added_late(
    twin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Each callback is called once; one that raises is logged, not raised into the
    caller's iteration, and the others still run."""
    impl = CounterImpl()

    async def main() -> None:
        async with (
            rapace.serve(
                lambda s: rapace.register_services(s, impl), "tcp://127.0.0.1:0", keepalive=None
            ) as server,
            rapace.connect(str(server.address), keepalive=None) as client,
        ):
            ends: list[tuple[int, type[BaseException] | None]] = []

            def record(status: int, error: BaseException | None) -> None:
                ends.append((status, None if error is None else type(error)))

            def broken(status: int, error: BaseException | None) -> None:
                raise RuntimeError("a bug in a callback")

            stream = await rapace.client(Counter, client).count(3)
            stream.add_done_callback(broken)
            stream.add_done_callback(record)
            with pytest.raises(rapace.NotFound):
                _ = [n async for n in stream]
            await stream.aclose()  # (over already: nothing more)
            stream.add_done_callback(record)  # added once it ended: at once
            assert ends == [(int(rapace.ErrorCode.NotFound), rapace.NotFound)] * 2

    with caplog.at_level(logging.ERROR, logger="rapace"):
        run(main())
    (failure,) = [r for r in caplog.records if "done callback" in r.getMessage()]
    assert failure.getMessage() == "a done callback of stream Counter.count failed"
