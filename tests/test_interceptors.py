"""Interceptors (issue 13, item 4): around every call on the serving side
(``ServiceRouter(interceptors=)``, ``register_services(interceptors=)``) and the calling
side (``client(interceptors=)``): their order, reading the context, refusing, timing,
changing metadata, streaming calls, and interceptors that raise. Both twins, over a
``mem_pair`` and a real Unix socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from net_helpers import short_tmpdir
from service_helpers import KINDS, run_kind, service_env
from session_helpers import REQUEST, raw_peer, run, session_pair

import rapace
from rapace import Internal, NotFound, PermissionDenied


@rapace.service
class Greeter:
    async def greet(self, name: str) -> str: ...

    async def fail(self) -> None: ...

    async def count(self, n: rapace.u32) -> AsyncIterator[rapace.u32]: ...


class GreeterImpl(Greeter):
    def __init__(self) -> None:
        self.ran: list[str] = []

    async def greet(self, name: str) -> str:
        self.ran.append("greet")
        user = rapace.current_call().metadata.get("user", "nobody")
        return f"hello {name} from {user}"

    async def fail(self) -> None:
        self.ran.append("fail")
        raise NotFound("no such thing")

    async def count(self, n: int) -> AsyncIterator[int]:
        self.ran.append("count")
        for i in range(n):
            yield i
        if n > 2:
            raise NotFound("too many")


def recorder(log: list[str], name: str) -> rapace.Interceptor:
    async def intercept(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
        log.append(f"{name} before {call.method} {call.kind}")
        try:
            result = await call_next()
        except rapace.RpcError as exc:
            log.append(f"{name} saw {type(exc).__name__}")
            raise
        log.append(f"{name} after {result!r}")
        return result

    return intercept


@pytest.mark.parametrize("kind", KINDS)
def test_server_interceptors_run_around_every_call_in_order(twin: Any, kind: str) -> None:
    log: list[str] = []
    impl = GreeterImpl()

    def serve(session: rapace.RpcSession) -> None:
        router = rapace.register_services(session, impl, interceptors=[recorder(log, "a")])
        router.add_interceptors([recorder(log, "b")])

    async def main() -> None:
        async with service_env(twin, kind, serve=serve) as env:
            greeter = rapace.client(Greeter, env.client)
            assert await greeter.greet("ann") == "hello ann from nobody"
            assert log == [
                "a before Greeter.greet unary",
                "b before Greeter.greet unary",
                "b after 'hello ann from nobody'",
                "a after 'hello ann from nobody'",
            ]
            log.clear()
            with pytest.raises(NotFound):
                await greeter.fail()
            assert log == [
                "a before Greeter.fail unary",
                "b before Greeter.fail unary",
                "b saw NotFound",
                "a saw NotFound",
            ]
            log.clear()
            assert [n async for n in greeter.count(2)] == [0, 1]
            assert log == [
                "a before Greeter.count stream",
                "b before Greeter.count stream",
                "b after None",  # once every item was sent
                "a after None",
            ]
            log.clear()
            items: list[int] = []
            with pytest.raises(NotFound, match="too many"):
                async for n in greeter.count(3):
                    items.append(n)
            assert items == [0, 1, 2]
            assert log[-2:] == ["b saw NotFound", "a saw NotFound"]
            assert len(env.server.dispatcher.interceptors) == 2  # type: ignore[union-attr]

    run_kind(kind, main())


async def require_token(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
    if call.metadata.get("authorization") != "Bearer s3cret":
        raise PermissionDenied(f"{call.method}: a valid token is required")
    call.metadata["user"] = "ann"  # what the handler (and inner interceptors) see
    return await call_next()


@pytest.mark.parametrize("kind", KINDS)
def test_an_interceptor_refuses_or_admits_and_changes_metadata(twin: Any, kind: str) -> None:
    impl = GreeterImpl()

    def serve(session: rapace.RpcSession) -> None:
        session.set_dispatcher(rapace.ServiceRouter(session, interceptors=[require_token]))
        session.dispatcher.add(impl)  # type: ignore[union-attr]

    async def main() -> None:
        async with service_env(twin, kind, serve=serve) as env:
            anonymous = rapace.client(Greeter, env.client)
            with pytest.raises(PermissionDenied, match=r"Greeter\.greet: a valid token"):
                await anonymous.greet("x")
            with pytest.raises(PermissionDenied):
                async for _ in anonymous.count(1):
                    pass
            assert impl.ran == []  # refused before the handler ran
            authed = rapace.with_metadata(anonymous, {"authorization": "Bearer s3cret"})
            assert await authed.greet("x") == "hello x from ann"
            assert [n async for n in authed.count(2)] == [0, 1]

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_an_interceptor_that_raises_fails_only_that_call(
    twin: Any, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
        if call.metadata.get("break") == "before":
            raise ValueError("boom")
        result = await call_next()
        if call.metadata.get("break") == "after":
            raise KeyError("late")
        return result

    impl = GreeterImpl()

    def serve(session: rapace.RpcSession) -> None:
        rapace.register_services(session, impl, interceptors=[broken])

    async def main() -> None:
        async with service_env(twin, kind, serve=serve) as env:
            greeter = rapace.client(Greeter, env.client)
            before = rapace.with_metadata(greeter, {"break": "before"})
            after = rapace.with_metadata(greeter, {"break": "after"})
            with pytest.raises(Internal, match=r"interceptor .*broken raised ValueError: boom"):
                await before.greet("x")
            with pytest.raises(Internal, match="raised KeyError: 'late'"):
                await after.greet("x")
            with pytest.raises(Internal, match="raised ValueError: boom"):
                async for _ in before.count(1):
                    pass
            # The handler's own error passes through as it is, and the session serves on.
            with pytest.raises(NotFound):
                await greeter.fail()
            assert await greeter.greet("y") == "hello y from nobody"

    with caplog.at_level(logging.ERROR, logger="rapace"):
        run_kind(kind, main())
    failures = [r for r in caplog.records if "interceptor" in r.getMessage()]
    assert len(failures) == 3 and all(r.exc_info for r in failures)


def test_other_connections_are_unaffected(twin: Any) -> None:
    """A connection whose calls break the server's interceptor, next to one whose calls
    do not, on one server over a Unix socket."""

    async def broken(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
        if call.metadata.get("break"):
            raise RuntimeError("broken interceptor")
        return await call_next()

    async def main() -> None:
        with short_tmpdir() as directory:
            address = f"unix:{directory}/s.sock"
            on_session = lambda s: rapace.register_services(  # noqa: E731
                s, GreeterImpl(), interceptors=[broken]
            )
            async with (
                rapace.serve(on_session, address),
                rapace.connect(address) as bad,
                rapace.connect(address) as good,
            ):
                breaking = rapace.client(Greeter, bad, metadata={"break": "1"})
                fine = rapace.client(Greeter, good)
                results = await asyncio.gather(
                    *(breaking.greet(str(i)) for i in range(20)),
                    *(fine.greet(str(i)) for i in range(20)),
                    return_exceptions=True,
                )
                assert all(isinstance(r, Internal) for r in results[:20])
                assert results[20:] == [f"hello {i} from nobody" for i in range(20)]
                assert await fine.greet("again") == "hello again from nobody"
                assert not bad.is_closed and not good.is_closed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logging.getLogger("rapace"), "disabled", True)  # 20 expected tracebacks
        run_kind("unix", main())


def test_interceptors_must_be_callables(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as pair:
            with pytest.raises(TypeError, match="a list of interceptors"):
                rapace.ServiceRouter(pair.server, interceptors=require_token)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="async callable"):
                rapace.client(Greeter, pair.client, interceptors=["x"])  # type: ignore[list-item]

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_client_interceptors(twin: Any, kind: str) -> None:
    log: list[str] = []
    impl = GreeterImpl()
    calls: list[rapace.CallContext] = []

    async def add_user(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
        calls.append(call)
        call.metadata["user"] = "bob"
        return await call_next()

    async def retry_once(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
        try:
            return await call_next()
        except NotFound:
            log.append(f"retrying {call.method} after channel {call.channel_id}")
            return await call_next()

    async def refuse_count(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
        if call.kind == "stream" and call.metadata.get("no-streams"):
            raise PermissionDenied("no streams from this client")
        return await call_next()

    def serve(session: rapace.RpcSession) -> None:
        rapace.register_services(session, impl)

    async def main() -> None:
        async with service_env(twin, kind, serve=serve) as env:
            greeter = rapace.client(
                Greeter,
                env.client,
                timeout=5.0,
                interceptors=[recorder(log, "a"), add_user, retry_once, refuse_count],
            )
            assert await greeter.greet("x") == "hello x from bob"
            assert log == [
                "a before Greeter.greet unary",
                "a after 'hello x from bob'",
            ]
            (call,) = calls
            assert (
                call.session is env.client
                and call.method_id == Greeter.__rapace_service__.methods["greet"].method_id
            )  # type: ignore[attr-defined]
            assert call.deadline is not None and 0 < (call.time_remaining() or 0) <= 5.0
            log.clear()
            with pytest.raises(NotFound):
                await greeter.fail()
            assert impl.ran.count("fail") == 2  # tried twice, on two channels
            assert log[1].startswith("retrying Greeter.fail after channel ")
            assert log[-1] == "a saw NotFound"
            stream = await greeter.count(2)
            assert isinstance(stream, rapace.ItemStream)
            assert [n async for n in stream] == [0, 1]
            assert calls[-1].kind == "stream" and calls[-1].deadline is None
            ran = len(impl.ran)
            with pytest.raises(PermissionDenied, match="no streams"):
                await rapace.with_metadata(greeter, {"no-streams": "1"}).count(1)
            assert len(impl.ran) == ran  # refused before anything was sent
            # An interceptor's own failure reaches the caller as it is.
            broken: Any = rapace.client(Greeter, env.client, interceptors=[_raise_value_error])
            with pytest.raises(ValueError, match="client side"):
                await broken.greet("x")
            assert env.client.pending_channel_ids() == []

    run_kind(kind, main())


async def _raise_value_error(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
    raise ValueError("client side")


def test_a_client_interceptor_that_outlives_the_deadline(twin: Any) -> None:
    """Time spent in interceptors counts against the call's deadline."""
    impl = GreeterImpl()

    async def main() -> None:
        async with session_pair(twin) as pair:
            rapace.register_services(pair.server, impl)
            gate = asyncio.Event()

            async def slow(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
                assert call.deadline is not None
                passed = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().call_at(call.deadline + 0.01, passed.set_result, None)
                await passed  # (the deadline passing is what is tested)
                gate.set()
                return await call_next()

            greeter = rapace.client(Greeter, pair.client, timeout=0.05, interceptors=[slow])
            with pytest.raises(rapace.DeadlineExceeded, match="deadline passed before it was sent"):
                await greeter.greet("x")
            assert gate.is_set() and impl.ran == []

    run(main())


def test_a_client_context_inherits_the_served_deadline(twin: Any) -> None:
    """A call made while serving another gets no later deadline than the served one, in
    the interceptors' context as on the wire."""
    seen: list[rapace.CallContext] = []

    async def look(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
        seen.append(call)
        return await call_next()

    async def main() -> None:
        async with session_pair(twin) as pair:
            rapace.register_services(pair.server, GreeterImpl())
            greeter = rapace.client(Greeter, pair.client, timeout=30.0, interceptors=[look])
            served = time.monotonic() + 2.0
            token = rapace.context.serving_call.set((served, None, None, None))
            try:
                assert await greeter.greet("x") == "hello x from nobody"
            finally:
                rapace.context.serving_call.reset(token)
            assert await greeter.greet("y") == "hello y from nobody"
        assert seen[0].deadline == served
        assert seen[1].deadline is not None and seen[1].deadline > served + 20

    run(main())


def test_a_fast_client_interceptor_keeps_the_session_default_deadline(twin: Any) -> None:
    """Interceptors that send at once leave the call on the session's default deadline
    (its exact budget on the wire, the shared timer), not a deadline of its own."""

    async def main() -> None:
        async with raw_peer(twin, session_kwargs={"call_timeout": 7.0}) as setup:
            greeter = rapace.client(Greeter, setup.session, interceptors=[_pass])
            call = asyncio.create_task(greeter.greet("x"))
            request = await setup.raw.recv()
            assert request.desc.deadline_ns == 7_000_000_000
            reply = rapace.postcard.dumps("hi", str)
            await setup.raw.send(request.desc.channel_id, 0, REQUEST, reply, request.desc.msg_id)
            assert await call == "hi"

    run(main())


async def _pass(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
    return await call_next()
