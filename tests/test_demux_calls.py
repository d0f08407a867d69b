"""``Demux.start_call``: a unary call's request frame, waiter and deadline in one step.

Run against each twin through ``twin``; the last tests run the same call traffic on both
twins and compare every result. What matters beyond the happy path: a refused or failed
call leaves nothing behind (no waiter, no deadline, no msg_id spent), and the checks come
in the documented order with the same messages in both twins.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest

from rapace.flags import INLINE_PAYLOAD_SLOT, FrameFlags

DATA_EOS = int(FrameFlags.DATA | FrameFlags.EOS)
ERROR_EOS = int(FrameFlags.ERROR | FrameFlags.EOS)
METHOD = 0x3E895C50  # Echo.echo
U32_MAX = 0xFFFFFFFF


class Waiter:
    """A future-like waiter that records what it is resolved with."""

    def __init__(self) -> None:
        self.results: list[Any] = []

    def done(self) -> bool:
        return bool(self.results)

    def set_result(self, result: Any) -> None:
        self.results.append(result)


def new_demux(twin: Any, max_calls: int | None = None) -> Any:
    return twin.demux.Demux(lambda frame: None, max_calls)


def route(demux: Any, frame: Any) -> bool:
    """Route one frame through ``route_many``; True if it was dropped as unroutable."""
    dropped: list[Any] = []
    demux.route_many([frame], dropped.append)
    return bool(dropped)


def assert_no_deadline_armed(twin: Any, demux: Any) -> None:
    """No deadline is pending, and none left behind fires for the next call either: a
    stale entry must never expire a later call that reuses its channel or its place."""
    assert demux.next_deadline() is None
    probe = Waiter()
    channel = 0xFFFFFFF1
    assert demux.start_call(channel, METHOD, b"", iter([1]), probe, None) is not None
    assert demux.pop_expired(float("inf")) == []
    assert demux.next_deadline() is None
    assert demux.discard_waiter(channel, probe)


def wire(twin: Any, frame: Any) -> bytes:
    """A frame as the bytes it travels as (compares frames across twins)."""
    return twin.frame.encode_frame(frame)  # type: ignore[no-any-return]


def test_start_call_builds_the_request_registers_and_arms(twin: Any) -> None:
    demux = new_demux(twin)
    ids = itertools.count(7)
    waiter = Waiter()
    frame = demux.start_call(3, METHOD, b"\x04\x06", ids, waiter, 12.5)
    assert type(frame) is twin.frame.Frame
    desc = frame.desc
    assert (desc.msg_id, desc.channel_id, desc.method_id, desc.flags) == (7, 3, METHOD, DATA_EOS)
    assert (desc.payload_slot, desc.payload_len, frame.payload) == (
        INLINE_PAYLOAD_SLOT,
        2,
        b"\x04\x06",
    )
    assert wire(twin, frame) == wire(
        twin, twin.frame.build_frame(7, 3, METHOD, DATA_EOS, b"\x04\x06")
    )
    assert next(ids) == 8  # exactly one id spent
    assert demux.waiter_ids() == [3]
    assert demux.next_deadline() == 12.5
    assert demux.pop_expired(12.5) == [(3, METHOD, waiter)]


def test_without_a_deadline_nothing_is_armed(twin: Any) -> None:
    demux = new_demux(twin)
    big = bytes(range(256)) * 4
    frame = demux.start_call(5, METHOD, bytearray(big), itertools.count(1), Waiter(), None)
    assert frame.payload == big and type(frame.payload) is bytes
    assert frame.desc.payload_slot == 0  # out of line
    assert demux.waiter_ids() == [5]
    assert_no_deadline_armed(twin, demux)


def test_the_response_resolves_the_call_and_its_deadline_dies(twin: Any) -> None:
    demux = new_demux(twin)
    waiter = Waiter()
    demux.start_call(9, METHOD, b"", itertools.count(1), waiter, 1.0)
    response = twin.frame.build_frame(1, 9, 0, DATA_EOS, b"ok")
    assert route(demux, response) is False
    assert waiter.results == [response]
    assert demux.waiter_ids() == []
    assert demux.pop_expired(5.0) == []  # an ended call never expires
    assert demux.next_deadline() is None


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("3", METHOD, b""), TypeError, "channel_id must be an int, not str"),
        ((-1, METHOD, b""), ValueError, "channel_id must be in 0..4294967295, got -1"),
        (
            (U32_MAX + 1, METHOD, b""),
            ValueError,
            "channel_id must be in 0..4294967295, got 4294967296",
        ),
        ((3, None, b""), TypeError, "method_id must be an int, not NoneType"),
        ((3, 2**40, b""), ValueError, f"method_id must be in 0..4294967295, got {2**40}"),
        ((3, METHOD, "text"), TypeError, "a payload must be bytes-like, not str"),
        # The fields and the payload come before the method id 0 check ...
        (("3", 0, b""), TypeError, "channel_id must be an int, not str"),
        ((3, 0, "text"), TypeError, "a payload must be bytes-like, not str"),
        (
            (3, 0, b""),
            ValueError,
            "method_id 0 is reserved for responses; a request needs a method id",
        ),
    ],
)
def test_bad_arguments_are_refused_and_leave_nothing(
    twin: Any, args: tuple[Any, ...], error: type[Exception], message: str
) -> None:
    demux = new_demux(twin)
    ids = itertools.count(1)
    with pytest.raises(error) as info:
        demux.start_call(*args, ids, Waiter(), 1.0)
    assert str(info.value) == message
    assert demux.waiter_ids() == []
    assert_no_deadline_armed(twin, demux)
    assert next(ids) == 1  # no msg_id spent


def test_a_bad_deadline_is_refused_and_leaves_nothing(twin: Any) -> None:
    demux = new_demux(twin)
    ids = itertools.count(1)
    with pytest.raises(ValueError, match="method_id 0 is reserved"):
        demux.start_call(3, 0, b"", ids, Waiter(), "soon")  # the method id is checked first
    with pytest.raises(TypeError, match=r"^when must be a number, not str$"):
        demux.start_call(3, METHOD, b"", ids, Waiter(), "soon")
    assert demux.waiter_ids() == []
    assert_no_deadline_armed(twin, demux)
    assert next(ids) == 1


def test_a_channel_with_a_pending_call_is_refused(twin: Any) -> None:
    demux = new_demux(twin)
    ids = itertools.count(1)
    first = Waiter()
    demux.start_call(3, METHOD, b"", ids, first, 1.0)
    with pytest.raises(ValueError, match=r"^channel 3 already has a pending call$"):
        demux.start_call(3, METHOD, b"", ids, Waiter(), 2.0)
    assert next(ids) == 2  # the refused call spent no id
    assert demux.next_deadline() == 1.0  # the first call's, not the refused one's 2.0
    assert demux.pop_expired(10.0) == [(3, METHOD, first)]
    assert demux.discard_waiter(3, first)
    assert_no_deadline_armed(twin, demux)


def test_max_calls_refuses_without_side_effects(twin: Any) -> None:
    demux = new_demux(twin, max_calls=2)
    assert demux.max_calls == 2
    ids = itertools.count(1)
    first, second = Waiter(), Waiter()
    demux.start_call(1, METHOD, b"", ids, first, None)
    demux.start_call(3, METHOD, b"", ids, second, 1.0)
    # Full: None, before the busy-channel check, with no id spent and nothing armed.
    assert demux.start_call(5, METHOD, b"", ids, Waiter(), 2.0) is None
    assert demux.start_call(3, METHOD, b"", ids, Waiter(), 2.0) is None
    assert next(ids) == 3
    assert demux.waiter_ids() == [1, 3]
    assert demux.next_deadline() == 1.0
    assert demux.pop_expired(2.0) == [(3, METHOD, second)]  # the refused calls armed none
    assert demux.next_deadline() is None
    # The limit counts pending calls: an answered call (success or error) frees its place.
    assert route(demux, twin.frame.build_frame(1, 1, 0, DATA_EOS, b"")) is False
    assert first.results
    assert demux.start_call(7, METHOD, b"", ids, Waiter(), None) is not None
    assert demux.start_call(5, METHOD, b"", ids, Waiter(), None) is None
    assert route(demux, twin.frame.build_frame(1, 7, 0, ERROR_EOS, b"")) is False
    assert demux.start_call(5, METHOD, b"", ids, Waiter(), None) is not None
    assert demux.waiter_ids() == [3, 5]


def test_max_calls_is_kept_as_an_int(twin: Any) -> None:
    assert type(new_demux(twin, max_calls=True).max_calls) is int
    assert (
        new_demux(twin, max_calls=0).start_call(1, METHOD, b"", iter([1]), Waiter(), None) is None
    )


def test_no_max_calls_means_no_limit(twin: Any) -> None:
    demux = new_demux(twin)
    assert demux.max_calls is None
    ids = itertools.count(1)
    for channel in range(1, 20_000, 2):
        assert demux.start_call(channel, METHOD, b"", ids, Waiter(), None) is not None
    assert len(demux.waiter_ids()) == 10_000


@pytest.mark.parametrize(
    ("max_calls", "error", "message"),
    [
        ("8", TypeError, "max_calls must be an int, not str"),
        (1.5, TypeError, "max_calls must be an int, not float"),
        (-1, ValueError, "max_calls must be in 0..4294967295, got -1"),
    ],
)
def test_bad_max_calls_are_refused(
    twin: Any, max_calls: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        twin.demux.Demux(lambda frame: None, max_calls)
    assert str(info.value) == message


def test_msg_ids_come_from_the_iterator_and_are_checked(twin: Any) -> None:
    demux = new_demux(twin)
    frame = demux.start_call(1, METHOD, b"", iter([2**64 - 1]), Waiter(), None)
    assert frame.desc.msg_id == 2**64 - 1
    with pytest.raises(ValueError, match=r"^msg_id must be in 0\.\.18446744073709551615, got -5$"):
        demux.start_call(3, METHOD, b"", iter([-5]), Waiter(), 1.0)
    with pytest.raises(StopIteration):
        demux.start_call(3, METHOD, b"", iter([]), Waiter(), 1.0)
    assert demux.waiter_ids() == [1]
    assert_no_deadline_armed(twin, demux)


# -- both twins, same traffic ------------------------------------------------------------


def _outcome(twin: Any, call: Callable[..., Any], *args: Any) -> Any:
    try:
        result = call(*args)
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc))
    if result is not None and hasattr(result, "desc"):
        return ("frame", wire(twin, result))
    return ("ok", result)


def _traffic(twin: Any, seed: int) -> list[Any]:
    rng = random.Random(seed)
    demux = new_demux(twin, max_calls=[None, 4, 16][seed % 3])
    ids = itertools.count(1)
    waiters: dict[int, Waiter] = {}
    log: list[Any] = []
    clock = 0.0
    for _ in range(2_000):
        action = rng.random()
        channel = rng.randrange(0, 40) if rng.random() < 0.9 else rng.choice([-1, U32_MAX, "7"])
        if action < 0.45:
            waiter = Waiter()
            clock += rng.random()
            deadline = rng.choice([None, clock + 3.0, clock + 3.0, clock + 3.0, "later"])
            method = rng.choice([METHOD] * 8 + [0, -2])
            payload = rng.choice([b"", b"abc", b"x" * 40, b"y" * 16, "str"])
            result = _outcome(
                twin, demux.start_call, channel, method, payload, ids, waiter, deadline
            )
            if result[0] == "frame" and isinstance(channel, int):
                waiters[channel] = waiter
            log.append(result)
        elif action < 0.75 and waiters:
            channel = rng.choice(sorted(waiters))
            flags = rng.choice([DATA_EOS, ERROR_EOS])
            response = twin.frame.build_frame(1, channel, 0, flags, b"r")
            log.append(("route", route(demux, response), waiters.pop(channel).done()))
        elif action < 0.85 and waiters:
            channel = rng.choice(sorted(waiters))
            log.append(("discard", demux.discard_waiter(channel, waiters.pop(channel))))
        else:
            now = clock + rng.random() * 3
            expired = demux.pop_expired(now)
            log.append(("expired", [(c, m, w is waiters.get(c)) for c, m, w in expired]))
        log.append((demux.waiter_ids(), demux.next_deadline()))
    log.append(("next id", next(ids)))
    return log


@pytest.mark.parametrize("seed", range(6))
def test_both_twins_agree_on_random_call_traffic(both_twins: Any, seed: int) -> None:
    compiled, pure = both_twins
    assert _traffic(compiled, seed) == _traffic(pure, seed)


def test_a_msg_ids_iterator_that_registers_the_channel_itself_is_refused(twin: Any) -> None:
    """``next(msg_ids)`` is Python code: it may register the very channel (the compiled
    table must never hold a key twice)."""
    demux = new_demux(twin)
    squatter = Waiter()

    def ids() -> Any:
        assert demux.start_call(3, METHOD, b"", iter([9]), squatter, None) is not None
        yield 1

    with pytest.raises(ValueError, match=r"^channel 3 already has a pending call$"):
        demux.start_call(3, METHOD, b"", ids(), Waiter(), 1.0)
    assert demux.waiter_ids() == [3]
    assert demux.next_deadline() is None  # the squatter has none, the refused call armed none
    assert demux.discard_waiter(3, squatter) and demux.waiter_ids() == []
    assert_no_deadline_armed(twin, demux)
