"""The demux (channel table + routing switch), run against each twin through ``twin``.

The compiled twin keeps its tables in C (open addressing, backward-shift deletion, strong
references held by hand), so beyond the routing rules of docs/protocol.md §5 this checks what
a hand-written table gets wrong: probing and deletion under many random inserts/removes,
keys 0 and 0xFFFFFFFF, reference counts, the cycle collector, and callbacks that change
the tables while a frame is being routed. The last tests run the same random operations
on both twins and compare every result.

Only the demux's real API is used: waiters are registered with ``start_call`` and frames
(always the twin's own) routed with ``route_many``.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import math
import random
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wire_helpers import HYPOTHESIS

from rapace.flags import NO_DEADLINE, FrameFlags

DATA = int(FrameFlags.DATA)
EOS = int(FrameFlags.EOS)
ERROR = int(FrameFlags.ERROR)
CONTROL = int(FrameFlags.CONTROL)
NO_REPLY = int(FrameFlags.NO_REPLY)
U32_MAX = 0xFFFFFFFF
METHOD = 0x3E895C50  # Echo.echo
REQUEST = DATA | EOS


# -- helpers ---------------------------------------------------------------------------


class Recorder:
    """A tunnel and a request callback that record what they get, with optional hooks."""

    def __init__(self, hook: Callable[[Any], None] | None = None) -> None:
        self.frames: list[Any] = []
        self.hook = hook

    def deliver(self, frame: Any) -> None:
        self.frames.append(frame)
        if self.hook is not None:
            self.hook(frame)

    def __call__(self, frame: Any) -> None:
        self.deliver(frame)


class FakeWaiter:
    """A future-like waiter that records ``set_result`` calls."""

    def __init__(self, done: bool = False, hook: Callable[[Any], None] | None = None) -> None:
        self._done = done
        self.results: list[Any] = []
        self.hook = hook

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        self._done = True
        self.results.append(result)
        if self.hook is not None:
            self.hook(result)


@pytest.fixture
def make_frame(twin: Any) -> Callable[..., Any]:
    """Frames of the twin's own codec: what each twin's demux routes."""
    build = twin.frame.build_frame

    def make(channel_id: int, method_id: int, flags: int, payload: bytes = b"") -> Any:
        return build(1, channel_id, method_id, flags, payload)

    return make


def call(demux: Any, channel_id: Any, waiter: Any) -> Any:
    """Register ``waiter`` as a pending unary call on ``channel_id``; returns its request."""
    return demux.start_call(channel_id, METHOD, b"", itertools.count(1), waiter, None)


def route(demux: Any, frame: Any) -> bool:
    """Route one frame through ``route_many``; True if it was dropped as unroutable."""
    dropped: list[Any] = []
    demux.route_many([frame], dropped.append)
    assert dropped in ([], [frame])
    return bool(dropped)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def new_demux(twin: Any, on_request: Callable[[Any], None] | None = None) -> Any:
    return twin.demux.Demux(on_request if on_request is not None else Recorder())


# -- names and construction --------------------------------------------------------------


def test_names(twin: Any) -> None:
    d = twin.demux
    assert d.__all__ == ["Demux"]
    for name in d.__all__:
        assert hasattr(d, name), name
    if twin.name == "cython":
        assert not d.__file__.endswith(".py")


def test_on_request_must_be_callable(twin: Any) -> None:
    with pytest.raises(TypeError, match=r"^on_request must be callable$"):
        twin.demux.Demux(42)
    twin.demux.Demux(on_request=print)


def test_on_control_must_be_callable_or_none(twin: Any) -> None:
    with pytest.raises(TypeError, match=r"^on_control must be callable or None$"):
        twin.demux.Demux(print, None, 42)
    twin.demux.Demux(print, on_control=None)


def test_clock_must_be_callable_or_none(twin: Any) -> None:
    with pytest.raises(TypeError, match=r"^clock must be callable or None$"):
        twin.demux.Demux(print, None, None, 42)
    demux = twin.demux.Demux(print, clock=None)
    assert demux.clock is None
    with pytest.raises(TypeError, match=r"^clock must be callable or None$"):
        demux.clock = "now"
    demux.clock = time.monotonic
    assert demux.clock is time.monotonic


def test_with_a_clock_requests_come_with_their_deadline(twin: Any, make_frame: Any) -> None:
    """``on_request(frame, when)``: None without a deadline, -inf for a spent budget, else
    the clock's reading plus ``deadline_ns`` in seconds; without a clock, the frame alone."""
    seen: list[tuple[Any, ...]] = []
    demux = twin.demux.Demux(lambda *args: seen.append(args), clock=lambda: 100.0)
    frames = [make_frame(1, METHOD, REQUEST) for _ in range(4)]
    for frame, budget in zip(frames, [NO_DEADLINE, 0, 2_500_000_000, 1], strict=True):
        frame.desc.deadline_ns = budget
    demux.route_many(frames, pytest.fail)
    assert [when for _, when in seen] == [None, -math.inf, 102.5, 100.0 + 1e-9]
    assert [frame for frame, _ in seen] == frames
    demux.clock = None
    demux.route_many([frames[2]], pytest.fail)
    assert seen[-1] == (frames[2],)


def _record_when(seen: list[Any], frame: Any, when: float | None) -> None:
    seen.append(when)


def test_the_twins_compute_the_same_deadlines(both_twins: Any) -> None:
    rng = random.Random(3)
    budgets = [rng.randrange(1, 1 << 64) for _ in range(500)] + [1, NO_DEADLINE - 1]
    results = []
    for twin in both_twins:
        seen: list[Any] = []
        demux = twin.demux.Demux(functools.partial(_record_when, seen), clock=lambda: 12345.678)
        frames = []
        for budget in budgets:
            frame = twin.frame.build_frame(1, 1, METHOD, REQUEST, b"")
            frame.desc.deadline_ns = budget
            frames.append(frame)
        demux.route_many(frames, pytest.fail)
        results.append(seen)
    assert results[0] == results[1]


def test_control_frames_on_channel_0_go_to_on_control(twin: Any, make_frame: Any) -> None:
    """``CONTROL`` on channel 0 (method id = verb) goes to ``on_control``; a control-flagged
    frame elsewhere, or with no ``on_control``, is ignored as before; ``DATA`` still wins."""
    requests, controls = Recorder(), Recorder()
    demux = twin.demux.Demux(requests, None, controls)
    ping, elsewhere = make_frame(0, 5, CONTROL, b"12345678"), make_frame(7, 5, CONTROL)
    both = make_frame(0, 5, CONTROL | DATA)
    for frame in (ping, elsewhere, both):
        assert not route(demux, frame)
    assert controls.frames == [ping]
    assert requests.frames == [both]
    ignoring = twin.demux.Demux(requests)
    assert not route(ignoring, ping)
    assert controls.frames == [ping] and requests.frames == [both]


# -- waiters -------------------------------------------------------------------------------


def test_waiters_register_discard_duplicate(twin: Any) -> None:
    demux = new_demux(twin)
    a, b = FakeWaiter(), FakeWaiter()
    assert demux.waiter_ids() == []
    call(demux, 7, a)
    assert demux.waiter_ids() == [7]
    with pytest.raises(ValueError, match=r"^channel 7 already has a pending call$"):
        call(demux, 7, b)
    assert demux.waiter_ids() == [7]
    assert demux.discard_waiter(7, b) is False  # not the registered one
    assert demux.discard_waiter(9, a) is False  # nothing there
    assert demux.discard_waiter(7, a) is True
    assert demux.discard_waiter(7, a) is False
    assert demux.waiter_ids() == []
    call(demux, 7, b)  # the channel is free again
    assert demux.waiter_ids() == [7]


def test_waiters_and_tunnels_are_separate_tables(twin: Any) -> None:
    demux = new_demux(twin)
    call(demux, 3, FakeWaiter())
    demux.add_tunnel(3, Recorder())
    assert demux.waiter_ids() == [3]
    assert demux.tunnel_ids() == [3]
    assert demux.remove_tunnel(3) is not None
    assert demux.waiter_ids() == [3]


@pytest.mark.parametrize("method", ["start_call", "add_tunnel"])
@pytest.mark.parametrize(
    ("channel_id", "error", "message"),
    [
        ("3", TypeError, "channel_id must be an int, not str"),
        (3.0, TypeError, "channel_id must be an int, not float"),
        (None, TypeError, "channel_id must be an int, not NoneType"),
        (-1, ValueError, "channel_id must be in 0..4294967295, got -1"),
        (U32_MAX + 1, ValueError, "channel_id must be in 0..4294967295, got 4294967296"),
        (2**70, ValueError, f"channel_id must be in 0..4294967295, got {2**70}"),
    ],
)
def test_bad_channel_ids_are_refused(
    twin: Any, method: str, channel_id: Any, error: type[Exception], message: str
) -> None:
    demux = new_demux(twin)
    with pytest.raises(error) as info:
        if method == "start_call":
            call(demux, channel_id, FakeWaiter())
        else:
            demux.add_tunnel(channel_id, Recorder())
    assert str(info.value) == message
    assert demux.waiter_ids() == demux.tunnel_ids() == []


def test_tunnels_add_remove_discard_duplicate(twin: Any) -> None:
    demux = new_demux(twin)
    t1, t2 = Recorder(), Recorder()
    demux.add_tunnel(5, t1)
    with pytest.raises(ValueError, match=r"^tunnel already registered on channel 5$"):
        demux.add_tunnel(5, t2)
    assert demux.remove_tunnel(6) is None
    assert demux.tunnel_ids() == [5]
    assert demux.remove_tunnel(5) is t1  # the first one stayed registered
    assert demux.remove_tunnel(5) is None
    assert demux.tunnel_ids() == []
    demux.add_tunnel(5, t1)
    assert demux.discard_tunnel(5, t2) is False  # not the registered one
    assert demux.discard_tunnel(6, t1) is False  # nothing there
    assert demux.discard_tunnel(5, t1) is True
    assert demux.discard_tunnel(5, t1) is False
    assert demux.tunnel_ids() == []


def test_only_ints_in_range_name_entries(twin: Any) -> None:
    """Lookups by anything but an int in 0..0xFFFFFFFF find nothing (never raise)."""
    demux = new_demux(twin)
    tunnel, waiter = Recorder(), FakeWaiter()
    demux.add_tunnel(3, tunnel)
    call(demux, 3, waiter)
    for key in (3.0, "3", b"3", -1, 2**32 + 3, 2**70, 3.5, None, [3]):
        assert demux.remove_tunnel(key) is None
        assert demux.discard_tunnel(key, tunnel) is False
        assert demux.discard_waiter(key, waiter) is False
    assert demux.remove_tunnel(True) is None  # True is channel 1: nothing there
    assert demux.waiter_ids() == demux.tunnel_ids() == [3]
    assert demux.remove_tunnel(3) is tunnel
    assert demux.discard_waiter(3, waiter) is True


def test_bool_channel_ids_are_ints(twin: Any) -> None:
    demux = new_demux(twin)
    call(demux, True, FakeWaiter())
    assert demux.waiter_ids() == [1]
    assert type(demux.waiter_ids()[0]) is int
    with pytest.raises(ValueError, match="already has a pending call"):
        call(demux, 1, FakeWaiter())


@pytest.mark.parametrize("channel_id", [0, 1, 2, U32_MAX, U32_MAX - 1, 0x80000000])
def test_edge_channel_ids_are_keys(twin: Any, make_frame: Any, channel_id: int) -> None:
    demux = new_demux(twin)
    waiter, tunnel = FakeWaiter(), Recorder()
    call(demux, channel_id, waiter)
    assert demux.waiter_ids() == [channel_id]
    frame = make_frame(channel_id, 0, DATA | EOS)
    assert route(demux, frame) is False
    assert waiter.results == [frame]
    assert demux.waiter_ids() == []
    demux.add_tunnel(channel_id, tunnel)
    assert demux.tunnel_ids() == [channel_id]
    data = make_frame(channel_id, 0, DATA)
    assert route(demux, data) is False
    assert tunnel.frames == [data]
    assert demux.remove_tunnel(channel_id) is tunnel


def test_id_lists_are_sorted(twin: Any) -> None:
    demux = new_demux(twin)
    ids = [*random.Random(7).sample(range(U32_MAX + 1), 300), 0, U32_MAX]
    for channel_id in ids:
        call(demux, channel_id, FakeWaiter())
        demux.add_tunnel(channel_id, Recorder())
    assert demux.waiter_ids() == sorted(ids)
    assert demux.tunnel_ids() == sorted(ids)
    assert all(type(i) is int for i in demux.waiter_ids())
    assert new_demux(twin).waiter_ids() == []
    assert new_demux(twin).tunnel_ids() == []


# -- take_all ----------------------------------------------------------------------------


def test_take_all_empties_in_registration_order(twin: Any) -> None:
    demux = new_demux(twin)
    waiters = [FakeWaiter() for _ in range(50)]
    tunnels = [Recorder() for _ in range(50)]
    channels = random.Random(3).sample(range(1, 10_000), 50)
    for channel_id, waiter, tunnel in zip(channels, waiters, tunnels, strict=True):
        call(demux, channel_id, waiter)
        demux.add_tunnel(channel_id + 1, tunnel)
    # A removed and re-added entry moves to the end, as in a dict.
    demux.discard_waiter(channels[0], waiters[0])
    call(demux, channels[0], waiters[0])
    got_waiters, got_tunnels = demux.take_all()
    assert got_waiters == [*waiters[1:], waiters[0]]
    assert got_tunnels == tunnels
    assert demux.waiter_ids() == demux.tunnel_ids() == []
    assert demux.take_all() == ([], [])
    call(demux, channels[0], waiters[0])  # still usable
    assert demux.waiter_ids() == [channels[0]]


# -- routing (docs/protocol.md §5) ---------------------------------------------------------


def test_tunnel_takes_every_frame_first(twin: Any, make_frame: Any) -> None:
    on_request = Recorder()
    demux = new_demux(twin, on_request)
    tunnel, waiter = Recorder(), FakeWaiter()
    demux.add_tunnel(9, tunnel)
    call(demux, 9, waiter)
    frames = [
        make_frame(9, 0, DATA, b"chunk"),
        make_frame(9, 0, 0),  # no DATA
        make_frame(9, METHOD, DATA),  # a method id: still the tunnel's
        make_frame(9, 0, CONTROL),
        make_frame(9, 0, ERROR),
    ]
    for frame in frames:
        assert route(demux, frame) is False
    assert tunnel.frames == frames
    assert waiter.results == []
    assert on_request.frames == []
    assert demux.tunnel_ids() == [9]
    assert demux.waiter_ids() == [9]


@pytest.mark.parametrize("flags", [EOS, DATA | EOS, ERROR | EOS, EOS | NO_REPLY | 0x8000_0000])
def test_eos_unregisters_the_tunnel_before_delivering(
    twin: Any, make_frame: Any, flags: int
) -> None:
    demux = new_demux(twin)
    seen: list[Any] = []
    tunnel = Recorder(lambda frame: seen.append(demux.tunnel_ids()))
    demux.add_tunnel(4, tunnel)
    frame = make_frame(4, 0, flags)
    assert route(demux, frame) is False
    assert tunnel.frames == [frame]
    assert seen == [[]]
    # The next frame on the channel is not the tunnel's any more.
    assert route(demux, make_frame(4, 0, DATA)) is True
    assert tunnel.frames == [frame]


def test_response_resolves_the_waiter_once(twin: Any, make_frame: Any) -> None:
    demux = new_demux(twin)
    waiter = FakeWaiter()
    call(demux, 11, waiter)
    frame = make_frame(11, 0, DATA | EOS, b"result")
    assert route(demux, frame) is False
    assert waiter.results == [frame]
    assert demux.waiter_ids() == []
    assert route(demux, make_frame(11, 0, DATA | EOS)) is True
    assert waiter.results == [frame]


@pytest.mark.parametrize("flags", [DATA | EOS, ERROR | EOS, 0, CONTROL, DATA])
def test_method_zero_is_a_response_whatever_the_flags(
    twin: Any, make_frame: Any, flags: int
) -> None:
    on_request = Recorder()
    demux = new_demux(twin, on_request)
    waiter = FakeWaiter()
    call(demux, 13, waiter)
    frame = make_frame(13, 0, flags)
    assert route(demux, frame) is False
    assert waiter.results == [frame]
    assert on_request.frames == []


def test_done_waiter_is_removed_but_not_set(
    twin: Any, make_frame: Any, loop: asyncio.AbstractEventLoop
) -> None:
    demux = new_demux(twin)
    cancelled = loop.create_future()
    cancelled.cancel()
    call(demux, 15, cancelled)
    assert route(demux, make_frame(15, 0, DATA | EOS)) is False  # taken, not dropped
    assert cancelled.cancelled()
    assert demux.waiter_ids() == []
    live = loop.create_future()
    call(demux, 17, live)
    frame = make_frame(17, 0, DATA | EOS)
    assert route(demux, frame) is False
    assert live.result() is frame


def test_unroutable_response(twin: Any, make_frame: Any) -> None:
    on_request = Recorder()
    demux = new_demux(twin, on_request)
    waiter = FakeWaiter()
    call(demux, 21, waiter)
    assert route(demux, make_frame(19, 0, DATA | EOS)) is True
    assert demux.waiter_ids() == [21]
    assert waiter.results == []
    assert on_request.frames == []


@pytest.mark.parametrize("flags", [DATA | EOS, DATA, DATA | EOS | NO_REPLY])
def test_data_with_a_method_id_is_a_request(twin: Any, make_frame: Any, flags: int) -> None:
    on_request = Recorder()
    demux = new_demux(twin, on_request)
    waiter = FakeWaiter()
    call(demux, 23, waiter)  # a waiter does not take requests
    frame = make_frame(23, METHOD, flags, b"args")
    assert route(demux, frame) is False
    assert on_request.frames == [frame]
    assert waiter.results == []
    assert demux.waiter_ids() == [23]


@pytest.mark.parametrize("flags", [0, EOS, CONTROL, CONTROL | EOS, ERROR])
def test_non_data_with_a_method_id_is_ignored(twin: Any, make_frame: Any, flags: int) -> None:
    on_request = Recorder()
    demux = new_demux(twin, on_request)
    waiter = FakeWaiter()
    call(demux, 0, waiter)
    assert route(demux, make_frame(0, 5, flags)) is False  # ignored, not dropped
    assert on_request.frames == []
    assert waiter.results == []
    assert demux.waiter_ids() == [0]


def test_route_many(twin: Any, make_frame: Any) -> None:
    on_request, tunnel, dropped = Recorder(), Recorder(), Recorder()
    demux = new_demux(twin, on_request)
    waiter = FakeWaiter()
    call(demux, 1, waiter)
    demux.add_tunnel(3, tunnel)
    frames = [
        make_frame(1, 0, DATA | EOS),
        make_frame(5, 0, DATA | EOS),  # nobody waits
        make_frame(3, 0, DATA),
        make_frame(2, METHOD, DATA | EOS),
        make_frame(0, 4, CONTROL),  # ignored, not unroutable
        make_frame(1, 0, DATA | EOS),  # its waiter is gone now
    ]
    assert demux.route_many(frames, dropped) is None
    assert waiter.results == [frames[0]]
    assert tunnel.frames == [frames[2]]
    assert on_request.frames == [frames[3]]
    assert dropped.frames == [frames[1], frames[5]]
    late = make_frame(7, 0, 0)
    demux.route_many(iter([late]), dropped)  # any iterable
    assert dropped.frames == [frames[1], frames[5], late]
    demux.route_many([], dropped)
    assert len(dropped.frames) == 3


def test_route_many_sees_frames_appended_while_routing(twin: Any, make_frame: Any) -> None:
    frames: list[Any] = []
    extra = make_frame(8, METHOD, DATA)
    on_request = Recorder(lambda frame: frames.append(extra) if frame is not extra else None)
    demux = new_demux(twin, on_request)
    frames.append(make_frame(6, METHOD, DATA))
    demux.route_many(frames, Recorder())
    assert on_request.frames == [frames[0], extra]


def test_callback_errors_propagate_and_stop_the_batch(twin: Any, make_frame: Any) -> None:
    def fail(frame: Any) -> None:
        raise RuntimeError("boom")

    demux = new_demux(twin, fail)
    tunnel = Recorder()
    demux.add_tunnel(3, tunnel)
    with pytest.raises(RuntimeError, match="boom"):
        demux.route_many([make_frame(2, METHOD, DATA), make_frame(3, 0, DATA)], Recorder())
    assert tunnel.frames == []

    exploding = Recorder(fail)
    demux.add_tunnel(5, exploding)
    with pytest.raises(RuntimeError, match="boom"):
        route(demux, make_frame(5, 0, DATA | EOS))
    assert demux.tunnel_ids() == [3]  # 5 was unregistered before deliver raised


def test_each_twin_routes_its_own_frames_only(both_twins: Any) -> None:
    """The selector pairs a demux with its own twin's frames; the compiled demux reads a
    compiled Frame's C fields, so anything else is refused, not misread."""
    compiled, pure = both_twins
    demux = compiled.demux.Demux(Recorder())
    with pytest.raises(TypeError, match=r"^Cannot convert Frame to rapace\._frame\.Frame$"):
        demux.route_many([pure.frame.build_frame(1, 3, 0, DATA, b"")], Recorder())
    for twin in both_twins:
        demux = twin.demux.Demux(Recorder())
        with pytest.raises(AttributeError, match=r"^'NoneType' object has no attribute 'desc'$"):
            demux.route_many([None], Recorder())
        # (3.13 names the class with its module: 'rapace._frame_py.Frame' object ...)
        no_desc = r"^'(rapace\._frame_py\.)?Frame' object has no attribute '_desc'$"
        with pytest.raises(AttributeError, match=no_desc):
            demux.route_many([twin.frame.Frame.__new__(twin.frame.Frame)], Recorder())


# -- re-entrancy: callbacks that change the tables ---------------------------------------


def test_deliver_removes_its_own_tunnel(twin: Any, make_frame: Any) -> None:
    demux = new_demux(twin)
    tunnel = Recorder(lambda frame: demux.remove_tunnel(9))
    demux.add_tunnel(9, tunnel)
    del_ref = weakref.ref(tunnel)
    del tunnel  # the table holds the only reference while deliver() runs
    assert route(demux, make_frame(9, 0, DATA)) is False
    assert demux.tunnel_ids() == []
    gc.collect()
    assert del_ref() is None


def test_eos_deliver_registers_the_channel_again(twin: Any, make_frame: Any) -> None:
    demux = new_demux(twin)
    successor = Recorder()
    first = Recorder(lambda frame: demux.add_tunnel(9, successor))
    demux.add_tunnel(9, first)
    route(demux, make_frame(9, 0, DATA | EOS))
    assert demux.tunnel_ids() == [9]
    route(demux, make_frame(9, 0, DATA))
    assert len(first.frames) == 1
    assert len(successor.frames) == 1
    assert demux.remove_tunnel(9) is successor


def test_deliver_grows_and_shrinks_the_tables(twin: Any, make_frame: Any) -> None:
    """The slots move (reallocation, backward shifts) while the routed entry is in use."""
    demux = new_demux(twin)
    many = range(1000, 3000)

    def churn(frame: Any) -> None:
        for channel_id in many:
            demux.add_tunnel(channel_id, Recorder())
            call(demux, channel_id, FakeWaiter())
        for channel_id in many:
            demux.remove_tunnel(channel_id)

    tunnel = Recorder(churn)
    demux.add_tunnel(0, tunnel)
    ref = weakref.ref(tunnel)
    del tunnel
    assert route(demux, make_frame(0, 0, EOS)) is False
    assert ref() is None  # delivered, unregistered, and released afterwards
    assert demux.tunnel_ids() == []
    assert demux.waiter_ids() == list(many)


def test_set_result_changes_the_waiter_table(twin: Any, make_frame: Any) -> None:
    demux = new_demux(twin)
    others = {channel_id: FakeWaiter() for channel_id in range(101, 301, 2)}
    for channel_id, waiter in others.items():
        call(demux, channel_id, waiter)
    replacement = FakeWaiter()

    def hook(frame: Any) -> None:
        call(demux, 99, replacement)  # the channel being routed: already free
        for channel_id, waiter in others.items():
            assert demux.discard_waiter(channel_id, waiter)

    waiter = FakeWaiter(hook=hook)
    call(demux, 99, waiter)
    ref = weakref.ref(waiter)
    frame = make_frame(99, 0, DATA | EOS)
    assert route(demux, frame) is False
    assert waiter.results == [frame]
    del waiter
    gc.collect()
    assert ref() is None
    assert demux.waiter_ids() == [99]
    assert route(demux, make_frame(99, 0, DATA | EOS)) is False
    assert len(replacement.results) == 1


def test_on_request_registers_and_routes_reentrantly(twin: Any, make_frame: Any) -> None:
    demux: Any = None
    nested: list[Any] = []

    def on_request(frame: Any) -> None:
        channel_id = frame.desc.channel_id
        waiter, tunnel = FakeWaiter(), Recorder()
        call(demux, channel_id, waiter)
        demux.add_tunnel(channel_id + 1, tunnel)
        response, last = make_frame(channel_id, 0, DATA | EOS), make_frame(channel_id + 1, 0, EOS)
        nested.append((route(demux, response), waiter.results == [response]))
        nested.append((route(demux, last), tunnel.frames == [last]))

    demux = new_demux(twin, on_request)
    assert route(demux, make_frame(40, METHOD, DATA)) is False
    assert nested == [(False, True), (False, True)]
    assert demux.waiter_ids() == demux.tunnel_ids() == []


def test_take_all_inside_a_callback(twin: Any, make_frame: Any) -> None:
    demux = new_demux(twin)
    taken: list[Any] = []
    tunnel = Recorder(lambda frame: taken.append(demux.take_all()))
    demux.add_tunnel(1, tunnel)
    waiter = FakeWaiter()
    call(demux, 2, waiter)
    assert route(demux, make_frame(1, 0, DATA)) is False
    assert taken == [([waiter], [tunnel])]
    assert waiter.done() is False
    assert demux.waiter_ids() == demux.tunnel_ids() == []


# -- the table under churn ---------------------------------------------------------------


def check_against_model(demux: Any, waiters: dict[int, Any], tunnels: dict[int, Any]) -> None:
    assert demux.waiter_ids() == sorted(waiters)
    assert demux.tunnel_ids() == sorted(tunnels)


def test_thousands_of_random_cycles_match_a_dict(twin: Any) -> None:
    rng = random.Random(20240601)
    demux = new_demux(twin)
    waiters: dict[int, Any] = {}
    tunnels: dict[int, Any] = {}
    # Mostly a narrow pool (long probe runs, wrap-around, repeated grow/shrink), some
    # wide-range and edge ids.
    pool = [*range(64), *range(U32_MAX - 64, U32_MAX + 1), *rng.sample(range(U32_MAX), 64)]
    for step in range(30_000):
        channel_id = rng.choice(pool)
        op = rng.random()
        if op < 0.3:
            waiter = FakeWaiter()
            if channel_id in waiters:
                with pytest.raises(ValueError):
                    call(demux, channel_id, waiter)
            else:
                call(demux, channel_id, waiter)
                waiters[channel_id] = waiter
        elif op < 0.55:
            expected = waiters.get(channel_id)
            guess = expected if expected is not None and rng.random() < 0.8 else FakeWaiter()
            removed = demux.discard_waiter(channel_id, guess)
            assert removed == (guess is expected)
            if removed:
                del waiters[channel_id]
        elif op < 0.75:
            tunnel = Recorder()
            if channel_id in tunnels:
                with pytest.raises(ValueError):
                    demux.add_tunnel(channel_id, tunnel)
            else:
                demux.add_tunnel(channel_id, tunnel)
                tunnels[channel_id] = tunnel
        elif op < 0.85:
            assert demux.remove_tunnel(channel_id) is tunnels.pop(channel_id, None)
        elif op < 0.95:
            expected = tunnels.get(channel_id)
            guess = expected if expected is not None and rng.random() < 0.8 else Recorder()
            removed = demux.discard_tunnel(channel_id, guess)
            assert removed == (guess is expected)
            if removed:
                del tunnels[channel_id]
        else:
            assert (channel_id in demux.tunnel_ids()) == (channel_id in tunnels)
        if step % 97 == 0:
            check_against_model(demux, waiters, tunnels)
            for key, value in waiters.items():
                assert demux.discard_waiter(key, FakeWaiter()) is False
                assert value is not None
            for key in list(tunnels):  # each entry is the very object (moved to the end)
                assert demux.remove_tunnel(key) is tunnels[key]
                demux.add_tunnel(key, tunnels[key])
                tunnels[key] = tunnels.pop(key)
    check_against_model(demux, waiters, tunnels)
    assert demux.take_all() == (list(waiters.values()), list(tunnels.values()))


def test_grow_to_many_and_back_to_empty(twin: Any) -> None:
    demux = new_demux(twin)
    entries = {channel_id: FakeWaiter() for channel_id in range(1, 40_001, 2)}
    for channel_id, waiter in entries.items():
        call(demux, channel_id, waiter)
    assert len(demux.waiter_ids()) == len(entries)
    order = list(entries)
    random.Random(5).shuffle(order)
    for i, channel_id in enumerate(order):
        assert demux.discard_waiter(channel_id, entries[channel_id])
        if i % 1000 == 0:  # what is left is still all findable after the shrinks
            rest = order[i + 1 :: 97]
            assert all(demux.discard_waiter(c, FakeWaiter()) is False for c in rest)
    assert demux.waiter_ids() == []


ops = st.lists(
    st.tuples(
        st.sampled_from(["add_w", "discard_w", "add_t", "remove_t", "route_resp", "route_t"]),
        st.one_of(st.integers(0, 40), st.integers(U32_MAX - 8, U32_MAX), st.integers(0, U32_MAX)),
        st.booleans(),
    ),
    max_size=400,
)


@HYPOTHESIS
@given(ops)
def test_random_operations_match_a_dict_model(twin: Any, operations: Any) -> None:
    demux = new_demux(twin)
    waiters: dict[int, FakeWaiter] = {}
    tunnels: dict[int, Recorder] = {}
    for op, channel_id, flag in operations:
        if op == "add_w" and channel_id not in waiters:
            waiters[channel_id] = FakeWaiter()
            call(demux, channel_id, waiters[channel_id])
        elif op == "discard_w":
            waiter = waiters.get(channel_id) if flag else FakeWaiter()
            if waiter is not None:
                removed = demux.discard_waiter(channel_id, waiter)
                assert removed == (waiters.get(channel_id) is waiter)
                if removed:
                    del waiters[channel_id]
        elif op == "add_t" and channel_id not in tunnels:
            tunnels[channel_id] = Recorder()
            demux.add_tunnel(channel_id, tunnels[channel_id])
        elif op == "remove_t":
            assert demux.remove_tunnel(channel_id) is tunnels.pop(channel_id, None)
        elif op in ("route_resp", "route_t"):
            frame = twin.frame.build_frame(1, channel_id, 0, EOS if flag else DATA)
            dropped = route(demux, frame)
            if channel_id in tunnels:
                assert not dropped
                assert tunnels[channel_id].frames[-1] is frame
                if flag:
                    del tunnels[channel_id]
            elif channel_id in waiters:
                assert not dropped
                assert waiters.pop(channel_id).results == [frame]
            else:
                assert dropped
    check_against_model(demux, waiters, tunnels)


# -- references ----------------------------------------------------------------------------


def test_references_are_released(twin: Any, make_frame: Any) -> None:
    sentinel = FakeWaiter()
    base = sys.getrefcount(sentinel)
    demux = new_demux(twin)

    call(demux, 1, sentinel)
    assert sys.getrefcount(sentinel) == base + 1
    demux.discard_waiter(1, sentinel)
    assert sys.getrefcount(sentinel) == base

    demux.add_tunnel(0, sentinel)
    demux.add_tunnel(U32_MAX, sentinel)
    assert sys.getrefcount(sentinel) == base + 2
    assert demux.remove_tunnel(0) is sentinel
    assert sys.getrefcount(sentinel) == base + 1

    with pytest.raises(ValueError):
        demux.add_tunnel(U32_MAX, sentinel)  # refused: no reference taken
    assert sys.getrefcount(sentinel) == base + 1

    demux.add_tunnel(3, sentinel)
    assert demux.discard_tunnel(3, sentinel) is True
    assert sys.getrefcount(sentinel) == base + 1

    call(demux, 5, sentinel)
    waiters, tunnels = demux.take_all()
    assert waiters == [sentinel]
    assert tunnels == [sentinel]
    assert sys.getrefcount(sentinel) == base + 2  # the two lists
    del waiters, tunnels
    assert sys.getrefcount(sentinel) == base

    call(demux, 7, sentinel)
    route(demux, make_frame(7, 0, DATA | EOS))
    sentinel.results.clear()
    assert sys.getrefcount(sentinel) == base

    tunnel = Recorder()
    tunnel_base = sys.getrefcount(tunnel)
    demux.add_tunnel(8, tunnel)
    route(demux, make_frame(8, 0, DATA))
    assert sys.getrefcount(tunnel) == tunnel_base + 1
    route(demux, make_frame(8, 0, DATA | EOS))
    assert sys.getrefcount(tunnel) == tunnel_base

    frame = make_frame(9, 0, DATA | EOS)
    frame_base = sys.getrefcount(frame)
    for _ in range(100):
        demux.route_many([frame], lambda f: None)
        demux.route_many([frame, frame], lambda f: None)
    assert sys.getrefcount(frame) == frame_base

    for channel_id in range(1000):  # grow, then drop the whole demux
        call(demux, channel_id + 100, sentinel)
    assert sys.getrefcount(sentinel) == base + 1000
    del demux
    assert sys.getrefcount(sentinel) == base


def test_reference_cycles_through_the_tables_are_collected(twin: Any) -> None:
    class Owner:
        def __init__(self) -> None:
            self.demux = twin.demux.Demux(self.on_request)

        def on_request(self, frame: Any) -> None:
            pass

        def deliver(self, frame: Any) -> None:
            pass

        def done(self) -> bool:
            return False

        def set_result(self, result: Any) -> None:
            pass

    owner = Owner()
    owner.demux.add_tunnel(1, owner)  # owner -> demux -> table -> owner
    call(owner.demux, 2, owner)
    ref = weakref.ref(owner)
    del owner
    gc.collect()
    assert ref() is None


def test_reinit_clears_the_tables(twin: Any) -> None:
    demux = new_demux(twin)
    sentinel = FakeWaiter()
    base = sys.getrefcount(sentinel)
    call(demux, 1, sentinel)
    demux.add_tunnel(1, sentinel)
    demux.__init__(Recorder())
    assert demux.waiter_ids() == demux.tunnel_ids() == []
    assert sys.getrefcount(sentinel) == base


# -- differential: the same operations on both twins --------------------------------------


def outcome(call: Callable[..., Any], *args: Any) -> Any:
    try:
        return ("ok", call(*args))
    except Exception as exc:
        return ("error", type(exc), str(exc))


class Trace:
    """Objects shared by both runs, with a log of the callbacks they get."""

    def __init__(self) -> None:
        self.log: list[Any] = []

    def waiter(self, name: int, done: bool) -> Any:
        trace = self

        class W:
            def done(self) -> bool:
                trace.log.append(("done", name))
                return done

            def set_result(self, result: Any) -> None:
                trace.log.append(("set_result", name, result.desc.channel_id))

            def __repr__(self) -> str:
                return f"W{name}"

        return W()

    def tunnel(self, name: int) -> Any:
        trace = self

        class T:
            def deliver(self, frame: Any) -> None:
                trace.log.append(("deliver", name, frame.desc.channel_id, frame.desc.flags))

            def __repr__(self) -> str:
                return f"T{name}"

        return T()


channel_ids = st.one_of(
    st.integers(0, 12),
    st.sampled_from([U32_MAX, U32_MAX - 1, -1, U32_MAX + 1, True]),
    st.sampled_from(["3", 3.0, 2.5, None, b"1"]),
)
diff_ops = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "add_w",
                "discard_w",
                "discard_other",
                "add_t",
                "remove_t",
                "discard_t",
                "discard_t_other",
                "route",
            ]
        ),
        channel_ids,
        st.integers(0, 4),
        st.sampled_from([0, 0, METHOD]),
        st.sampled_from([DATA, EOS, DATA | EOS, ERROR | EOS, CONTROL, 0]),
        st.booleans(),
    ),
    max_size=120,
)


def run_ops(twin: Any, operations: Any) -> Any:
    trace = Trace()
    demux = twin.demux.Demux(lambda frame: trace.log.append(("request", frame.desc.channel_id)))
    ids = itertools.count(1)
    waiters = [trace.waiter(i, done=i == 4) for i in range(5)]
    tunnels = [trace.tunnel(i) for i in range(5)]
    names = {id(o): repr(o) for o in (*waiters, *tunnels)}
    results = []

    def name(value: Any) -> Any:
        if isinstance(value, list):
            return [name(v) for v in value]
        if isinstance(value, tuple):
            return tuple(name(v) for v in value)
        if isinstance(value, twin.frame.Frame):
            return twin.frame.encode_frame(value)
        return names.get(id(value), value)

    for op, channel_id, index, method_id, flags, flag in operations:
        other = None if flag else object()
        if op == "add_w":
            result = outcome(demux.start_call, channel_id, METHOD, b"", ids, waiters[index], None)
        elif op == "discard_w":
            result = outcome(demux.discard_waiter, channel_id, waiters[index])
        elif op == "discard_other":
            result = outcome(demux.discard_waiter, channel_id, other)
        elif op == "add_t":
            result = outcome(demux.add_tunnel, channel_id, tunnels[index])
        elif op == "remove_t":
            result = outcome(demux.remove_tunnel, channel_id)
        elif op == "discard_t":
            result = outcome(demux.discard_tunnel, channel_id, tunnels[index])
        elif op == "discard_t_other":
            result = outcome(demux.discard_tunnel, channel_id, other)
        else:
            routed = channel_id
            if not isinstance(routed, int) or not 0 <= routed <= U32_MAX:
                routed = index
            frame = twin.frame.build_frame(1, routed, method_id, flags, b"")
            dropped: list[Any] = []
            batch = [frame] if flag else [frame, frame]
            result = (outcome(demux.route_many, batch, dropped.append), len(dropped))
        results.append(name(result))
        results.append((demux.waiter_ids(), demux.tunnel_ids()))
    results.append(name(outcome(demux.take_all)))
    return results, trace.log


@HYPOTHESIS
@given(diff_ops)
def test_both_twins_agree_on_random_operations(both_twins: Any, operations: Any) -> None:
    compiled, pure = both_twins
    assert run_ops(compiled, operations) == run_ops(pure, operations)


def test_both_twins_agree_on_a_long_run(both_twins: Any) -> None:
    """Thousands of operations on few channels: long-lived entries, many re-registrations."""
    compiled, pure = both_twins
    rng = random.Random(11)
    operations = [
        (
            rng.choice(["add_w", "add_t", "route", "route", "remove_t", "discard_w", "discard_t"]),
            rng.randrange(8),
            rng.randrange(5),
            rng.choice([0, METHOD]),
            rng.choice([DATA, EOS, DATA | EOS, ERROR | EOS, CONTROL, 0]),
            rng.random() < 0.5,
        )
        for _ in range(3000)
    ]
    expected = run_ops(pure, operations)
    assert len(expected[1]) > 500  # the callbacks ran: a real comparison
    assert run_ops(compiled, operations) == expected


def test_both_twins_have_the_same_api(both_twins: Any) -> None:
    """A method added to one twin and not the other fails here, not in a session test."""
    compiled, pure = both_twins

    def public(obj: Any) -> set[str]:
        return {name for name in dir(obj) if not name.startswith("_")}

    assert public(compiled.demux.Demux) == public(pure.demux.Demux)
    assert set(compiled.demux.__all__) == set(pure.demux.__all__)
    assert all(hasattr(compiled.demux, name) for name in pure.demux.__all__)


def test_discarding_none_from_an_empty_channel_is_a_no_op(twin: Any) -> None:
    demux = twin.demux.Demux(lambda frame: None)
    assert demux.discard_waiter(5, None) is False
    assert demux.discard_tunnel(5, None) is False
    assert demux.waiter_ids() == [] and demux.tunnel_ids() == []
