"""The deadline of a call with its own ``timeout=``: its own loop timer.

Calls on the session's default timeout do not use this: their deadlines expire in call
order, so the demux keeps them in a FIFO behind one session timer (``RpcSession``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from rapace.errors import DeadlineExceeded

if TYPE_CHECKING:
    from rapace._frame_py import Frame

__all__ = ["CallDeadline"]


class CallDeadline:
    """One call's deadline: fails the call's waiter, or interrupts its send if the
    transport is still holding it back (a peer that never reads must not hang a caller)."""

    __slots__ = (
        "channel_id",
        "delay",
        "fired",
        "method_id",
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
    ) -> None:
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
        return DeadlineExceeded(
            f"no response on channel {self.channel_id} for method {self.method_id:#010x} "
            f"within {self.delay:g} s"
        )
