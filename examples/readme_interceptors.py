"""The README's "Call context, metadata and interceptors" snippet, verbatim, and a program:
``python examples/readme_interceptors.py`` (``tests/test_examples.py`` runs it and checks
what it prints; ``.ci/run`` type-checks it with ``mypy --strict``)."""

from __future__ import annotations

import time
from typing import Any, Protocol

import rapace


@rapace.service
class Greeter(Protocol):
    async def greet(self, name: str) -> str: ...


class GreeterImpl(Greeter):
    async def greet(self, name: str) -> str:
        call = rapace.current_call()  # method, channel, deadline, metadata, session
        user = call.metadata["user"]  # a str (bytes only under keys ending in -bin)
        assert isinstance(user, str)
        return f"hello {name}, you are {user}"


async def authenticate(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
    """Refuse calls without the token; tell the handler (and later interceptors) who called."""
    if call.metadata.get("authorization") != "Bearer s3cret":
        raise rapace.PermissionDenied(f"{call.method}: a valid token is required")
    call.metadata["user"] = "ann"
    return await call_next()


def logged(side: str) -> rapace.Interceptor:
    """Log each call's method and outcome, and time it."""

    async def log(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
        started, outcome = time.perf_counter(), "failed"
        try:
            result = await call_next()
            outcome = "ok"
            return result
        except rapace.RpcError as exc:
            outcome = type(exc).__name__
            raise
        finally:
            took = (time.perf_counter() - started) * 1000
            print(f"{side}: {call.method} {outcome} in {took:.1f} ms")

    return log


async def main() -> None:
    def on_session(session: rapace.RpcSession) -> None:
        # The first interceptor is the outermost: it logs the refusals too.
        interceptors = [logged("server"), authenticate]
        rapace.register_services(session, GreeterImpl(), interceptors=interceptors)

    server = await rapace.serve(on_session, "tcp://127.0.0.1:0")
    async with server, rapace.connect(server.address) as session:
        greeter = rapace.client(Greeter, session, timeout=5.0, interceptors=[logged("client")])
        try:
            await greeter.greet("stranger")
        except rapace.PermissionDenied as exc:
            print("refused:", exc.message)
        authed = rapace.with_metadata(greeter, {"authorization": "Bearer s3cret"})
        print(await authed.greet("ann"))


if __name__ == "__main__":
    rapace.run(main())
