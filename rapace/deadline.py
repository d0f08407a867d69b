"""Call timeouts without a timer per call.

Most calls use their session's one default timeout, so their deadlines expire in the
order the calls started: a FIFO queue behind a single loop timer replaces a timer per
call (a ``call_later`` and its cancel were the largest cost of a call on uvloop). Calls
with their own ``timeout=`` get their own timer.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any

from rapace.errors import DeadlineExceeded

if TYPE_CHECKING:
    from rapace._frame_py import Frame

__all__ = ["CallDeadline", "DeadlineQueue"]

_RESOLUTION = 0.001
"""The shared timer wakes at most this often (seconds): deadlines may fire up to 1 ms late."""


class CallDeadline:
    """One call's deadline: fails the call's waiter, or interrupts its send if the
    transport is still holding it back (a peer that never reads must not hang a caller)."""

    __slots__ = (
        "channel_id",
        "delay",
        "finished",
        "fired",
        "method_id",
        "sending",
        "task",
        "waiter",
        "when",
    )

    def __init__(
        self,
        waiter: asyncio.Future[Frame],
        channel_id: int,
        method_id: int,
        delay: float,
        when: float,
    ) -> None:
        self.waiter = waiter
        self.channel_id = channel_id
        self.method_id = method_id
        self.delay = delay
        self.when = when
        self.task: asyncio.Task[Any] | None = None  # set while a send waits on the transport
        self.sending = False
        self.fired = False
        self.finished = False

    def expire(self) -> None:
        if self.finished or self.fired:
            return
        self.fired = True
        if self.sending:
            if self.task is not None:
                self.task.cancel()
        elif not self.waiter.done():
            self.waiter.set_exception(self.error())

    def error(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"no response on channel {self.channel_id} for method {self.method_id:#010x} "
            f"within {self.delay:g} s"
        )


class DeadlineQueue:
    """Deadlines that all share one delay, in expiry order, behind one timer."""

    __slots__ = ("_live", "_loop", "_queue", "_timer")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[CallDeadline] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._live = 0

    def __len__(self) -> int:
        """Deadlines still armed (diagnostics and tests)."""
        return self._live

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Use ``loop``'s clock and timers (the session's loop, known once it runs)."""
        self._loop = loop

    def add(self, deadline: CallDeadline) -> None:
        self._queue.append(deadline)
        self._live += 1
        if self._timer is None:
            assert self._loop is not None, "bind() the queue to a loop first"
            self._timer = self._loop.call_at(deadline.when, self._fire)

    def finish(self, deadline: CallDeadline) -> None:
        """The call ended: its deadline is disarmed (and dropped once it reaches the front)."""
        if deadline.finished:
            return
        deadline.finished = True
        self._live -= 1
        queue = self._queue
        while queue and queue[0].finished:
            queue.popleft()
        if len(queue) > 64 and len(queue) > 4 * self._live:
            # Calls that ended out of order left finished entries behind the front.
            self._queue = collections.deque(d for d in queue if not d.finished)
        if not self._queue and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        queue = self._queue
        loop = self._loop
        assert loop is not None
        now = loop.time()
        while queue and (queue[0].finished or queue[0].when <= now):
            deadline = queue.popleft()
            if not deadline.finished:
                deadline.expire()
        if queue:
            self._timer = loop.call_at(max(queue[0].when, now + _RESOLUTION), self._fire)

    def close(self) -> None:
        """Disarm everything (the session closed: its calls fail another way)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for deadline in self._queue:
            deadline.finished = True
        self._queue.clear()
        self._live = 0
