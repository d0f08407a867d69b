"""Interceptors: code that runs around every call, on the serving side and the calling side.

An interceptor is an async callable ``interceptor(call, call_next)``: ``call`` is the
call's ``CallContext`` (method, channel, deadline, metadata, session), ``call_next()``
runs the rest of the chain (the next interceptor, then the call itself) and returns its
result. An interceptor may look at the context, change ``call.metadata`` before
``call_next()``, refuse the call by raising an ``RpcError`` instead of calling it, time
it, or look at what it returned or raised::

    async def require_token(call: rapace.CallContext, call_next: rapace.CallNext) -> Any:
        if call.metadata.get("authorization") != "Bearer s3cret":
            raise rapace.PermissionDenied("a valid token is required")
        return await call_next()

Order: the first interceptor of the list is the outermost. It sees the call first and
its result (or error) last: ``[a, b]`` runs ``a`` before, ``b`` before, the call, ``b``
after, ``a`` after.

What ``call_next()`` returns: on the serving side, what the handler returned (a unary
call's result before it is encoded; None for a streaming call, once every item is sent);
on the calling side, the call's decoded result (for a streaming call, the ``ItemStream``
once the call is sent: the items come later, outside the chain).

On the serving side an interceptor that raises anything but an ``RpcError`` (its own
bug) fails that call with ``Internal`` naming the interceptor, logged with its
traceback; the session serves on. On the calling side its exception reaches the caller
as it is (it is the caller's own code).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeAlias

from rapace.context import CallContext
from rapace.errors import Internal, RpcError

__all__ = ["CallNext", "Interceptor", "check_interceptors", "run_intercepted"]

logger = logging.getLogger("rapace")

CallNext: TypeAlias = Callable[[], Awaitable[Any]]
"""What an interceptor calls to run the rest of the chain, and the call."""

Interceptor: TypeAlias = Callable[[CallContext, CallNext], Awaitable[Any]]
"""``async def interceptor(call: CallContext, call_next: CallNext) -> Any``."""


def check_interceptors(interceptors: Iterable[Interceptor] | None) -> tuple[Interceptor, ...]:
    """``interceptors`` as a tuple, each checked to be callable (``TypeError`` if not)."""
    if interceptors is None:
        return ()
    if callable(interceptors):
        raise TypeError("interceptors is a list of interceptors, not one interceptor")
    checked = tuple(interceptors)
    for interceptor in checked:
        if not callable(interceptor):
            raise TypeError(
                "an interceptor is an async callable (call, call_next), not "
                f"{type(interceptor).__name__}"
            )
    return checked


def _name(interceptor: Interceptor) -> str:
    name = getattr(interceptor, "__qualname__", None)
    return name if isinstance(name, str) else type(interceptor).__qualname__


def run_intercepted(
    interceptors: tuple[Interceptor, ...],
    call: CallContext,
    innermost: CallNext,
    *,
    serving: bool,
) -> Awaitable[Any]:
    """Run ``innermost`` (the call itself) inside ``interceptors``, the first outermost.

    ``serving``: an interceptor's own non-``RpcError`` failure becomes ``Internal`` naming
    it (the answer the peer gets), and is logged.
    """
    if not interceptors:
        return innermost()
    return _step(interceptors, 0, call, innermost, serving)


async def _step(
    interceptors: tuple[Interceptor, ...],
    index: int,
    call: CallContext,
    innermost: CallNext,
    serving: bool,
) -> Any:
    """Run ``interceptors[index]``, its ``call_next`` running the ones after it."""
    interceptor = interceptors[index]
    following = index + 1
    last = following == len(interceptors)
    inner_failures: list[BaseException] = []

    async def call_next() -> Any:
        try:
            if last:
                return await innermost()
            return await _step(interceptors, following, call, innermost, serving)
        except BaseException as exc:
            inner_failures.append(exc)  # (passed on as it is, not blamed on this one)
            raise

    if not serving:
        return await interceptor(call, call_next)
    try:
        return await interceptor(call, call_next)
    except Exception as exc:
        if isinstance(exc, RpcError) or any(exc is failure for failure in inner_failures):
            raise
        name = call.method or f"method {call.method_id:#010x}"
        logger.error("interceptor %s failed on %s", _name(interceptor), name, exc_info=exc)
        detail = f": {exc}" if str(exc) else ""
        raise Internal(
            f"interceptor {_name(interceptor)} raised {type(exc).__name__}{detail}"
        ) from exc
