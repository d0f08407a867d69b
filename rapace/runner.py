"""``rapace.run()``: run a service's main coroutine, on uvloop when it is installed, and stop
it gracefully on SIGTERM or SIGINT.

A deploy sends SIGTERM and expects the process to finish what it is doing: calls in
flight complete, new ones are refused with ``Unavailable`` (which a retrying client acts
on), the Unix socket file goes away. The first signal drains every server of this
process; a second one stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from rapace.connection import DEFAULT_SHUTDOWN_GRACE, _live_servers

__all__ = ["run", "uvloop_factory"]

T = TypeVar("T")

logger = logging.getLogger("rapace.server")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None where uvloop is not installed."""
    try:
        import uvloop  # noqa: PLC0415  (optional dependency)
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(
    main: Coroutine[Any, Any, T],
    *,
    debug: bool | None = None,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
) -> T:
    """Like ``asyncio.run(main)``, on uvloop when available (the library works on any loop).

    On the first SIGTERM or SIGINT every server the process runs shuts down gracefully
    (``Server.shutdown(shutdown_grace)``); ``main`` is cancelled once they have, if it has
    not returned by then (a ``main`` awaiting ``server.serve_forever()`` simply returns).
    A second signal cancels ``main`` at once. A ``main`` cancelled this way ends the
    process as the signal would: ``KeyboardInterrupt`` for SIGINT, exit status 143 for
    SIGTERM.
    """
    stop = _GracefulStop(shutdown_grace)

    async def supervised() -> T:
        loop = asyncio.get_running_loop()
        stop.main = asyncio.current_task()
        installed = []
        for signum in _SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stop.on_signal, signum)
                installed.append(signum)
        try:
            return await main
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    with asyncio.Runner(debug=debug, loop_factory=uvloop_factory()) as runner:
        try:
            return runner.run(supervised())
        except asyncio.CancelledError:
            if stop.signum is None:
                raise
            if stop.signum == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise SystemExit(128 + stop.signum) from None


class _GracefulStop:
    """What the first and the second signal do to one ``run()``."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.main: asyncio.Task[Any] | None = None
        self.signum: int | None = None
        self.draining: asyncio.Task[None] | None = None  # held: a task nobody holds may vanish

    def on_signal(self, signum: int) -> None:
        main = self.main
        if main is None or main.done():
            return
        if self.signum is not None:  # the second signal: stop now
            logger.warning("%s again: stopping at once", signal.Signals(signum).name)
            main.cancel()
            return
        self.signum = signum
        servers = list(_live_servers)
        logger.warning(
            "%s: shutting down %d rapace servers (grace %g s)",
            signal.Signals(signum).name,
            len(servers),
            self.grace,
        )
        self.draining = asyncio.get_running_loop().create_task(self._drain(servers, main))

    async def _drain(self, servers: list[Any], main: asyncio.Task[Any]) -> None:
        await asyncio.gather(*(s.shutdown(self.grace) for s in servers), return_exceptions=True)
        if not main.done():
            main.cancel()
