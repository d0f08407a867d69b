"""Call deadlines: the demux's FIFO behind the session's default timeout (both twins), and
``CallDeadline`` for calls with their own timeout."""

from __future__ import annotations

import asyncio
import random
import tracemalloc
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


def _call(demux: Any, channel: int, method: int, waiter: Waiter, when: Any) -> None:
    """A pending call on ``channel`` whose deadline falls at ``when``."""
    assert demux.start_call(channel, method, b"", iter([1]), waiter, when) is not None


def test_expired_calls_come_out_in_order_and_ended_ones_never(twin: Any) -> None:
    demux = _demux(twin)
    waiters = {channel: Waiter() for channel in (1, 3, 5, 7)}
    for when, (channel, waiter) in enumerate(waiters.items()):
        _call(demux, channel, 100 + channel, waiter, float(when))
    assert demux.discard_waiter(3, waiters[3])  # answered in time
    assert demux.pop_expired(0.5) == [(1, 101, waiters[1])]
    assert demux.next_deadline() == 2.0  # channel 3's entry is gone: it ended
    assert demux.pop_expired(10) == [(5, 105, waiters[5]), (7, 107, waiters[7])]
    assert demux.next_deadline() is None
    assert demux.pop_expired(float("inf")) == []
    assert demux.waiter_ids() == [1, 5, 7]  # expiring leaves the waiters to their calls


def test_a_later_call_on_the_same_channel_is_not_expired_by_the_earlier_deadline(
    twin: Any,
) -> None:
    demux = _demux(twin)
    first, second = Waiter(), Waiter()
    _call(demux, 9, 1, first, 1.0)
    demux.discard_waiter(9, first)
    _call(demux, 9, 2, second, 5.0)  # the channel is reused by a new call
    assert demux.pop_expired(2.0) == []
    assert demux.pop_expired(5.0) == [(9, 2, second)]


def test_calls_ending_out_of_order_behind_a_long_one_do_not_pile_up(twin: Any) -> None:
    """Ended calls behind a pending one are compacted away: memory stays flat (an entry
    per ended call would be 10,000 entries, hundreds of KiB, in either twin)."""
    demux = _demux(twin)
    keep = Waiter()
    _call(demux, 1, 1, keep, 0.0)

    def churn(calls: range) -> None:
        for i in calls:
            channel = 3 + 2 * i
            waiter = Waiter()
            _call(demux, channel, 1, waiter, float(i))
            demux.discard_waiter(channel, waiter)

    tracemalloc.start()
    try:
        churn(range(1_000))  # reach the steady state (table and buffer sizes)
        before = tracemalloc.get_traced_memory()[0]
        churn(range(1_000, 11_000))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024
    assert demux.pop_expired(0.0) == [(1, 1, keep)]
    assert demux.next_deadline() is None


def test_deadlines_are_numbers(twin: Any) -> None:
    demux = _demux(twin)
    with pytest.raises(ValueError, match=r"^method_id must be in 0\.\.4294967295, got -1$"):
        _call(demux, 5, -1, Waiter(), 1.0)
    with pytest.raises(TypeError, match=r"^when must be a number, not str$"):
        _call(demux, 5, 1, Waiter(), "soon")
    with pytest.raises(TypeError, match=r"^now must be a number, not NoneType$"):
        demux.pop_expired(None)
    assert demux.waiter_ids() == [] and demux.next_deadline() is None
    _call(demux, 5, 1, Waiter(), 1)
    assert demux.next_deadline() == 1.0 and type(demux.next_deadline()) is float
    demux.take_all()
    assert demux.next_deadline() is None and demux.pop_expired(2) == []


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
                _call(demux, channel, channel * 3 + 1, waiter, clock + 5.0)
        elif action < 0.85 and waiters:
            channel = rng.choice(list(waiters))
            waiter = waiters.pop(channel)
            assert compiled.discard_waiter(channel, waiter) == pure.discard_waiter(channel, waiter)
        else:
            now = clock + rng.random() * 3
            assert compiled.pop_expired(now) == pure.pop_expired(now)
        assert compiled.next_deadline() == pure.next_deadline()
        assert compiled.waiter_ids() == pure.waiter_ids()


def test_a_call_deadline_fails_its_waiter_once() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadline = CallDeadline(loop.create_future(), 3, 7, 0.5)
        deadline.expire()
        deadline.expire()  # a second firing changes nothing
        expected = r"^method 0x00000007: no response on channel 3 within 0\.5 s$"
        with pytest.raises(DeadlineExceeded, match=expected):
            await deadline.waiter
        named = CallDeadline(loop.create_future(), 5, 7, 2, {7: "Calc.add"})
        named.expire()
        expected = r"^Calc\.add \(0x00000007\): no response on channel 5 within 2 s$"
        with pytest.raises(DeadlineExceeded, match=expected):
            await named.waiter

    asyncio.run(main())
