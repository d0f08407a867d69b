"""The demux in pure Python: the reference twin of ``rapace/_demux.pyx``.

Sans-I/O: a channel table (channel id -> waiter or tunnel), the routing switch of the Rust
``RpcSession``'s receive loop (``docs/protocol.md`` §5), and what a unary call needs before
it is sent (``start_call``: its request frame, its waiter, its deadline). It never awaits; it calls
the objects it holds:

- a *waiter* is a future-like object (``done()``, ``set_result(frame)``): the caller of a
  unary call awaits it;
- a *tunnel* is any object with ``deliver(frame)``; the demux unregisters it after it
  delivers a frame carrying ``EOS``;
- requests go to the ``on_request(frame)`` callback given at construction.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Protocol, final

from rapace._checks import (
    U32_MAX,
    U64_MAX,
    call_pending,
    check_int,
    check_number,
    clock_not_callable,
    on_control_not_callable,
    on_request_not_callable,
    reserved_method,
    tunnel_registered,
)
from rapace._frame_py import Frame, build_frame
from rapace.flags import FrameFlags

__all__ = ["Demux"]

_ABSENT: Final = object()
_SPENT: Final = -math.inf
_DATA: Final = int(FrameFlags.DATA)
_EOS: Final = int(FrameFlags.EOS)
_CONTROL: Final = int(FrameFlags.CONTROL)
_REQUEST: Final = _DATA | _EOS


class _Waiter(Protocol):
    def done(self) -> bool: ...
    def set_result(self, result: Any, /) -> None: ...


class _Tunnel(Protocol):
    def deliver(self, frame: Any, /) -> None: ...


@final
class Demux:
    """Routes incoming frames by channel: tunnel first, then response, then request.

    Channel ids are ints in 0..0xFFFFFFFF: registering anything else is refused, and a
    lookup by anything else finds nothing (the compiled twin's table has ``uint32`` keys).
    """

    __slots__ = (
        "_clock",
        "_deadlines",
        "_max_calls",
        "_on_control",
        "_on_request",
        "_tunnels",
        "_waiters",
    )

    def __init__(
        self,
        on_request: Any,
        max_calls: int | None = None,
        on_control: Any = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not callable(on_request):
            raise on_request_not_callable()
        if on_control is not None and not callable(on_control):
            raise on_control_not_callable()
        if clock is not None and not callable(clock):
            raise clock_not_callable()
        self._clock = clock
        self._on_control = on_control
        if max_calls is not None:
            max_calls = check_int("max_calls", max_calls, U32_MAX)
        self._on_request = on_request
        self._max_calls = max_calls
        self._waiters: dict[int, _Waiter] = {}
        self._tunnels: dict[int, _Tunnel] = {}
        # Armed deadlines in expiry order: (when, channel_id, method_id, waiter).
        self._deadlines: collections.deque[tuple[float, int, int, _Waiter]] = collections.deque()

    @property
    def clock(self) -> Callable[[], float] | None:
        """What request deadlines are read on (None: ``on_request(frame)`` alone)."""
        return self._clock

    @clock.setter
    def clock(self, clock: Callable[[], float] | None) -> None:
        if clock is not None and not callable(clock):
            raise clock_not_callable()
        self._clock = clock

    def _deadline_of(self, budget: int) -> float | None:
        """A request's deadline on the clock: None (it has none), -inf (its budget is
        spent), or now plus its budget of nanoseconds."""
        if budget == U64_MAX:
            return None
        if budget == 0:
            return _SPENT
        assert self._clock is not None
        return float(self._clock()) + budget * 1e-9

    # -- deadlines of pending calls -----------------------------------------------------

    def _push_deadline(self, when: float, channel_id: int, method_id: int, waiter: _Waiter) -> None:
        self._trim_deadlines()
        self._deadlines.append((when, channel_id, method_id, waiter))

    def _live(self, entry: tuple[float, int, int, _Waiter]) -> bool:
        return self._waiters.get(entry[1]) is entry[3]

    def _trim_deadlines(self) -> None:
        """Drop ended calls from the front; compact when ended ones pile up behind it."""
        deadlines = self._deadlines
        while deadlines and not self._live(deadlines[0]):
            deadlines.popleft()
        if len(deadlines) > 64 and len(deadlines) > 4 * len(self._waiters):
            self._deadlines = collections.deque(e for e in deadlines if self._live(e))

    def pop_expired(self, now: float) -> list[tuple[int, int, _Waiter]]:
        """Deadlines due at ``now``: (channel_id, method_id, waiter) of calls still pending."""
        check_number("now", now)
        self._trim_deadlines()
        deadlines = self._deadlines
        expired = []
        while deadlines and deadlines[0][0] <= now:
            entry = deadlines.popleft()
            if self._live(entry):
                expired.append((entry[1], entry[2], entry[3]))
        return expired

    def next_deadline(self) -> float | None:
        """When the earliest pending call's deadline falls, or None."""
        self._trim_deadlines()
        return self._deadlines[0][0] if self._deadlines else None

    def start_call(  # noqa: PLR0917  (one positional call on the hot path, as the compiled twin)
        self,
        channel_id: int,
        method_id: int,
        payload: bytes,
        msg_ids: Iterator[int],
        waiter: _Waiter,
        deadline: float | None,
        deadline_ns: int = U64_MAX,
    ) -> Frame | None:
        """Register a unary call and return its request frame (``DATA|EOS``) to send.

        ``deadline_ns`` goes into the frame as it is (the call's budget on the wire).
        What a call needs before it is sent, in one step, checked in this order: the
        fields and payload (as ``build_frame`` checks them), ``deadline_ns``, a ``method_id`` of 0
        (refused), ``deadline`` (None or a number); then, when ``max_calls`` calls are
        pending, None is returned and nothing done; a channel with a pending call is
        refused. Only then is the frame's ``msg_id`` taken from the iterator ``msg_ids``
        (ids are spent on sent frames only), ``waiter`` registered and, unless
        ``deadline`` is None, the call's deadline armed. Deadlines must come in expiry
        order (the session gives every call the same delay); an ended call needs no
        disarming: its entry is dropped once its waiter is no longer registered.
        """
        frame = build_frame(0, channel_id, method_id, _REQUEST, payload)  # its msg_id comes last
        frame.desc.deadline_ns = deadline_ns  # (the setter checks it)
        if method_id == 0:
            raise reserved_method()
        if deadline is not None:
            check_number("when", deadline)
            deadline = float(deadline)
        if self._max_calls is not None and len(self._waiters) >= self._max_calls:
            return None
        if channel_id in self._waiters:
            raise call_pending(channel_id)
        frame.desc.msg_id = next(msg_ids)
        if channel_id in self._waiters:  # next() ran code that registered it
            raise call_pending(channel_id)
        channel_id = int(channel_id)
        self._waiters[channel_id] = waiter
        if deadline is not None:
            self._push_deadline(deadline, channel_id, int(method_id), waiter)
        return frame

    @property
    def max_calls(self) -> int | None:
        """Pending calls beyond which ``start_call`` refuses (None: no limit)."""
        return self._max_calls

    def discard_waiter(self, channel_id: int, waiter: _Waiter) -> bool:
        """Remove ``waiter`` if it is still the one registered on ``channel_id``."""
        if isinstance(channel_id, int) and self._waiters.get(channel_id, _ABSENT) is waiter:
            del self._waiters[channel_id]
            return True
        return False

    def waiter_ids(self) -> list[int]:
        return sorted(self._waiters)

    # -- tunnels -----------------------------------------------------------------------

    def add_tunnel(self, channel_id: int, tunnel: _Tunnel) -> None:
        """Register a tunnel on ``channel_id``; registering a channel twice is refused."""
        check_int("channel_id", channel_id, U32_MAX)
        if channel_id in self._tunnels:
            raise tunnel_registered(channel_id)
        self._tunnels[channel_id] = tunnel

    def remove_tunnel(self, channel_id: int) -> Any:
        """Unregister the tunnel on ``channel_id``; returns it, or None if there was none."""
        return self._tunnels.pop(channel_id, None) if isinstance(channel_id, int) else None

    def discard_tunnel(self, channel_id: int, tunnel: _Tunnel) -> bool:
        """Remove ``tunnel`` if it is still the one registered on ``channel_id``."""
        if isinstance(channel_id, int) and self._tunnels.get(channel_id, _ABSENT) is tunnel:
            del self._tunnels[channel_id]
            return True
        return False

    def tunnel_ids(self) -> list[int]:
        return sorted(self._tunnels)

    # -- shutdown ----------------------------------------------------------------------

    def take_all(self) -> tuple[list[Any], list[Any]]:
        """Empty both tables and return (waiters, tunnels), so the owner can fail them."""
        waiters = list(self._waiters.values())
        tunnels = list(self._tunnels.values())
        self._waiters.clear()
        self._tunnels.clear()
        self._deadlines.clear()
        return waiters, tunnels

    # -- the switch --------------------------------------------------------------------

    def _route(self, frame: Frame) -> bool:
        """Route one frame (``docs/protocol.md`` §5); True if it is a response nobody waits for.

        Tunnel first (any frame on its channel), then response (method id 0), then
        request (``DATA`` with a method id), then a control frame (``CONTROL`` on channel
        0, method id = verb) to ``on_control``; anything else is ignored.
        """
        desc = frame.desc
        channel_id = desc.channel_id
        tunnel = self._tunnels.get(channel_id)
        if tunnel is not None:
            if desc.flags & _EOS:
                del self._tunnels[channel_id]
            tunnel.deliver(frame)
            return False
        if desc.method_id == 0:
            waiter = self._waiters.pop(channel_id, None)
            if waiter is None:
                return True
            if not waiter.done():
                waiter.set_result(frame)
        elif desc.flags & _DATA:
            if self._clock is None:
                self._on_request(frame)
            else:
                self._on_request(frame, self._deadline_of(desc.deadline_ns))
        elif desc.flags & _CONTROL and channel_id == 0 and self._on_control is not None:
            self._on_control(frame)
        return False

    def route_many(self, frames: Iterable[Frame], on_unroutable: Any) -> None:
        """Route a batch of pure frames; each dropped response goes to
        ``on_unroutable(frame)``."""
        route = self._route
        for frame in frames:
            if route(frame):
                on_unroutable(frame)
