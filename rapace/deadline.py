"""Every call deadline of a session: the calls it makes, and the calls it serves.

Calls on the session's default timeout expire in call order, so their deadlines sit in
a FIFO in the demux (next to the waiters, in C for the compiled twin) behind one timer
(``SessionDeadlines``); an ended call needs no disarming. A call with its own
``timeout=`` gets a ``CallDeadline`` and a loop timer of its own. Either kind also covers
the time a send waits on a transport that holds it back: a peer that never reads must
not hang a caller.

A call's budget travels in its request's ``deadline_ns``: the nanoseconds left when it
is sent (``budget_ns``), so the peers' clocks need not agree. The serving side runs the
handler until its arrival time plus that budget (``HandlerDeadlines``: one timer for all
of them) and exposes the deadline to the handler (``current_deadline``, a view of the
call context of ``rapace.context``), whose own calls inherit it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from rapace.context import current_deadline
from rapace.errors import DeadlineExceeded
from rapace.flags import NO_DEADLINE

if TYPE_CHECKING:
    from rapace._frame_py import Frame
    from rapace.transport.base import Transport

__all__ = [
    "DEADLINE_PASSED",
    "CallDeadline",
    "HandlerDeadlines",
    "SessionDeadlines",
    "budget_ns",
    "current_deadline",
    "deadline_error",
    "stopped_by_deadline",
]

DEADLINE_PASSED: Final = "rapace: the call's deadline passed"
"""The message of the ``CancelledError`` that stops a handler whose call's deadline
passed: this side's sweep found it, or the caller gave up for it
(``CancelChannel(DeadlineExceeded)``), whichever came first."""


def stopped_by_deadline(exc: BaseException) -> bool:
    """Whether ``exc`` is the cancellation of a handler whose deadline passed (what an
    interceptor reports as ``DeadlineExceeded`` rather than ``Cancelled``)."""
    return isinstance(exc, asyncio.CancelledError) and exc.args[:1] == (DEADLINE_PASSED,)


SWEEP_INTERVAL: Final = 0.005
"""Seconds between two sweeps of the served calls' deadlines, at the most (their precision)."""


def budget_ns(delay: float) -> int:
    """``deadline_ns`` for a call that may take ``delay`` more seconds (inf: none)."""
    if delay == math.inf:
        return NO_DEADLINE
    return min(int(delay * 1e9), NO_DEADLINE - 1)


def deadline_error(
    channel_id: int, method_id: int, delay: float, names: Mapping[int, str]
) -> DeadlineExceeded:
    """What a call that got no response in time raises (naming the method if known)."""
    return DeadlineExceeded(
        f"{method_label(method_id, names)}: no response on channel {channel_id} within {delay:g} s"
    )


def method_label(method_id: int, names: Mapping[int, str]) -> str:
    """``Calculator.add (0x542faed4)`` where the name is known, else the id alone."""
    name = names.get(method_id)
    return f"{name} ({method_id:#010x})" if name else f"method {method_id:#010x}"


class CallDeadline:
    """One call's deadline: fails the call's waiter, or interrupts its send if the
    transport is still holding it back."""

    __slots__ = (
        "channel_id",
        "delay",
        "fired",
        "method_id",
        "names",
        "sending",
        "task",
        "waiter",
    )

    def __init__(
        self,
        waiter: asyncio.Future[Frame],
        channel_id: int,
        method_id: int,
        delay: float,
        names: Mapping[int, str] | None = None,
    ) -> None:
        self.names: Mapping[int, str] = {} if names is None else names
        self.waiter = waiter
        self.channel_id = channel_id
        self.method_id = method_id
        self.delay = delay
        self.task: asyncio.Task[Any] | None = None  # set while a send waits on the transport
        self.sending = False
        self.fired = False

    def expire(self) -> None:
        if self.fired:
            return
        self.fired = True
        if self.sending:
            if self.task is not None:
                self.task.cancel()
        elif not self.waiter.done():
            self.waiter.set_exception(self.error())

    def error(self) -> DeadlineExceeded:
        return deadline_error(self.channel_id, self.method_id, self.delay, self.names)


class SessionDeadlines:
    """The default-timeout deadlines of one session: one timer over the demux's FIFO, and
    the sends it must interrupt when their call expires while the transport holds them."""

    __slots__ = ("_clock", "_demux", "_names", "_sending", "_timed_out", "delay", "timer")

    def __init__(self, demux: Any, delay: float, names: Mapping[int, str]) -> None:
        self._demux = demux
        self._names = names
        self.delay = delay
        self.timer: asyncio.TimerHandle | None = None
        """The one wake-up of the FIFO; ``start`` it when it is None."""
        self._clock: Callable[[], float] | None = None
        self._sending: dict[asyncio.Future[Frame], asyncio.Task[Any] | None] = {}
        self._timed_out: dict[asyncio.Future[Frame], tuple[int, int]] = {}

    def start(
        self, loop: asyncio.AbstractEventLoop, when: float, clock: Callable[[], float]
    ) -> None:
        """Wake up at ``when`` (on the clock the deadlines were computed with)."""
        self._clock = clock
        self.timer = loop.call_at(when, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the calls whose default timeout has passed; sleep until the next one."""
        self.timer = None
        clock = self._clock
        if clock is None:
            return
        now = clock()
        for channel_id, method_id, waiter in self._demux.pop_expired(now):
            task = self._sending.pop(waiter, None)
            if task is not None:  # still held back by the transport: interrupt the send
                self._timed_out[waiter] = (channel_id, method_id)
                task.cancel()
            elif not waiter.done():
                waiter.set_exception(deadline_error(channel_id, method_id, self.delay, self._names))
        following = self._demux.next_deadline()
        if following is not None:
            # At most one wake-up per millisecond, however many calls are in flight.
            self.timer = loop.call_at(max(following, now + 0.001), self._expire, loop)

    async def send_held(
        self,
        transport: Transport,
        frame: Frame,
        waiter: asyncio.Future[Frame],
        deadline: CallDeadline | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Send a request the transport cannot take at once; its deadline (``deadline``,
        or the session's when None) covers the wait and raises ``DeadlineExceeded``."""
        task = asyncio.current_task(loop)
        if deadline is not None:
            deadline.task = task
            deadline.sending = True
        else:
            self._sending[waiter] = task
        try:
            await transport.send_frame(frame)
        except asyncio.CancelledError:
            if deadline is not None:
                error = deadline.error() if deadline.fired else None
            else:
                info = self._timed_out.pop(waiter, None)
                error = deadline_error(*info, self.delay, self._names) if info is not None else None
            if error is not None and task is not None and task.uncancel() == 0:
                raise error from None
            raise
        finally:
            if deadline is not None:
                deadline.sending = False
            else:
                self._sending.pop(waiter, None)

    def close(self) -> None:
        """The session closed: no deadline fires any more."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._clock = None
        self._timed_out.clear()


class HandlerDeadlines:
    """The deadlines of the calls a session serves: one timer, waking at the earliest
    (at most every ``SWEEP_INTERVAL``), hands the handlers past theirs to ``expired``.

    ``by_key`` maps a running handler's key to its deadline; the session adds and removes
    entries itself (inline, on every request) and calls ``arm`` when a deadline falls
    before ``wake_at``. A sweep looks at every entry, so its cost follows the handlers
    running, not the requests served.
    """

    __slots__ = ("_clock", "_expired", "_loop", "_timer", "by_key", "wake_at")

    def __init__(self, expired: Callable[[int], None]) -> None:
        self.by_key: dict[int, float] = {}
        self.wake_at = math.inf
        """When the timer fires (inf: it is not armed)."""
        self._expired = expired
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock: Callable[[], float] | None = None

    def arm(self, when: float, loop: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> None:
        """Wake up at ``when`` (on ``clock``, the one the deadlines were computed with)."""
        self._loop, self._clock = loop, clock
        if self._timer is not None:
            self._timer.cancel()
        self.wake_at = when
        self._timer = loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        self.wake_at = math.inf
        if self._clock is None or self._loop is None:
            return
        now = self._clock()
        expired = [key for key, when in self.by_key.items() if when <= now]
        for key in expired:
            del self.by_key[key]
        if self.by_key:
            earliest = min(self.by_key.values())
            self.arm(max(earliest, now + SWEEP_INTERVAL), self._loop, self._clock)
        for key in expired:
            self._expired(key)

    def close(self) -> None:
        """The session closed: no deadline fires any more."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.wake_at = math.inf
        self._clock = None
        self.by_key.clear()
