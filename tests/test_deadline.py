"""Call deadlines: the demux's FIFO behind the session's default timeout (both twins), and
``CallDeadline`` for calls with their own timeout."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from rapace.deadline import CallDeadline
from rapace.errors import DeadlineExceeded


class Waiter:
    """A stand-in for the future a call waits on (the demux only keeps it)."""

    def done(self) -> bool:
        return False

    def set_result(self, result: Any) -> None:
        raise AssertionError("not routed in these tests")


def _demux(twin: Any) -> Any:
    return twin.demux.Demux(lambda frame: None)


def test_expired_calls_come_out_in_order_and_ended_ones_never(twin: Any) -> None:
    demux = _demux(twin)
    waiters = {channel: Waiter() for channel in (1, 3, 5, 7)}
    for when, (channel, waiter) in enumerate(waiters.items()):
        demux.add_waiter(channel, waiter)
        demux.arm_deadline(channel, float(when), 100 + channel)
    assert demux.discard_waiter(3, waiters[3])  # answered in time
    assert demux.pop_expired(0.5) == [(1, 101, waiters[1])]
    assert demux.next_deadline() == 2.0  # channel 3's entry is gone: it ended
    assert demux.pop_expired(10) == [(5, 105, waiters[5]), (7, 107, waiters[7])]
    assert demux.next_deadline() is None
    assert demux.deadline_count == 0
    assert demux.waiter_ids() == [1, 5, 7]  # expiring leaves the waiters to their calls


def test_a_later_call_on_the_same_channel_is_not_expired_by_the_earlier_deadline(
    twin: Any,
) -> None:
    demux = _demux(twin)
    first, second = Waiter(), Waiter()
    demux.add_waiter(9, first)
    demux.arm_deadline(9, 1.0, 1)
    demux.discard_waiter(9, first)
    demux.add_waiter(9, second)  # the channel is reused by a new call
    demux.arm_deadline(9, 5.0, 2)
    assert demux.pop_expired(2.0) == []
    assert demux.pop_expired(5.0) == [(9, 2, second)]


def test_calls_ending_out_of_order_behind_a_long_one_do_not_pile_up(twin: Any) -> None:
    demux = _demux(twin)
    keep = Waiter()
    demux.add_waiter(1, keep)
    demux.arm_deadline(1, 0.0, 1)
    for i in range(10_000):
        channel = 3 + 2 * i
        waiter = Waiter()
        demux.add_waiter(channel, waiter)
        demux.arm_deadline(channel, float(i), 1)
        demux.discard_waiter(channel, waiter)
    assert demux.deadline_count <= 4 * 1 + 64 + 1
    assert demux.pop_expired(0.0) == [(1, 1, keep)]


def test_arming_needs_a_pending_call_and_valid_numbers(twin: Any) -> None:
    demux = _demux(twin)
    with pytest.raises(ValueError, match="channel 5 has no pending call"):
        demux.arm_deadline(5, 1.0, 1)
    demux.add_waiter(5, Waiter())
    with pytest.raises(ValueError, match=r"method_id must be in 0\.\.4294967295, got -1"):
        demux.arm_deadline(5, 1.0, -1)
    with pytest.raises(TypeError, match="when must be a number"):
        demux.arm_deadline(5, "soon", 1)
    with pytest.raises(TypeError, match="now must be a number"):
        demux.pop_expired(None)
    demux.arm_deadline(5, 1, 1)
    demux.take_all()
    assert demux.deadline_count == 0 and demux.next_deadline() is None


def test_twins_agree_on_random_deadline_traffic(both_twins: Any) -> None:
    compiled, pure = (_demux(t) for t in both_twins)
    rng = random.Random(7)
    waiters: dict[int, Waiter] = {}
    clock = 0.0
    for _ in range(5_000):
        action = rng.random()
        if action < 0.5:
            channel = rng.randrange(0, 200)
            if channel in waiters:
                continue
            waiters[channel] = waiter = Waiter()
            clock += rng.random()
            for demux in (compiled, pure):
                demux.add_waiter(channel, waiter)
                demux.arm_deadline(channel, clock + 5.0, channel * 3)
        elif action < 0.85 and waiters:
            channel = rng.choice(list(waiters))
            waiter = waiters.pop(channel)
            assert compiled.discard_waiter(channel, waiter) == pure.discard_waiter(channel, waiter)
        else:
            now = clock + rng.random() * 3
            assert compiled.pop_expired(now) == pure.pop_expired(now)
        assert compiled.next_deadline() == pure.next_deadline()
        assert compiled.deadline_count == pure.deadline_count


def test_a_call_deadline_fails_its_waiter_once() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadline = CallDeadline(loop.create_future(), 3, 7, 0.5)
        deadline.expire()
        deadline.expire()  # a second firing changes nothing
        expected = r"channel 3 for method 0x00000007 within 0\.5 s"
        with pytest.raises(DeadlineExceeded, match=expected):
            await deadline.waiter

    asyncio.run(main())
