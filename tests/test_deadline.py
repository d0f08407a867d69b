"""The shared deadline queue behind default call timeouts (rapace/deadline.py)."""

from __future__ import annotations

import asyncio

import pytest

from rapace.deadline import CallDeadline, DeadlineQueue
from rapace.errors import DeadlineExceeded


def _deadline(loop: asyncio.AbstractEventLoop, when: float, channel_id: int = 1) -> CallDeadline:
    return CallDeadline(loop.create_future(), channel_id, 7, 1.0, when)


def test_expired_deadlines_fail_their_waiters_in_order_and_finished_ones_stay_quiet() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = DeadlineQueue()
        queue.bind(loop)
        now = loop.time()
        first, second, third = (_deadline(loop, now + 0.01 * i, i) for i in (1, 2, 3))
        for deadline in (first, second, third):
            queue.add(deadline)
        queue.finish(second)  # answered in time
        with pytest.raises(DeadlineExceeded, match="channel 1"):
            await first.waiter
        with pytest.raises(DeadlineExceeded, match="channel 3"):
            await third.waiter
        assert not second.waiter.done()
        for deadline in (first, third):
            queue.finish(deadline)
        assert len(queue) == 0

    asyncio.run(main())


def test_finishing_everything_cancels_the_timer_and_entries_do_not_pile_up() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = DeadlineQueue()
        queue.bind(loop)
        keep = _deadline(loop, loop.time() + 60)
        queue.add(keep)  # one long-lived call at the front
        for i in range(10_000):  # many short calls that end out of order behind it
            deadline = _deadline(loop, loop.time() + 60, i)
            queue.add(deadline)
            queue.finish(deadline)
        assert len(queue) == 1
        assert len(queue._queue) <= 4 * 1 + 64
        queue.finish(keep)
        assert queue._timer is None
        assert not queue._queue

    asyncio.run(main())


def test_close_disarms_every_deadline() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = DeadlineQueue()
        queue.bind(loop)
        deadline = _deadline(loop, loop.time())
        queue.add(deadline)
        queue.close()
        assert queue._timer is None  # nothing left that could fire
        deadline.expire()  # even a stray call to it is a no-op once disarmed
        queue.finish(deadline)  # the call's own cleanup afterwards is harmless
        assert not deadline.waiter.done()
        assert len(queue) == 0

    asyncio.run(main())
