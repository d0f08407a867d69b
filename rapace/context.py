"""The call context: what a handler (and an interceptor) knows about the call it serves.

``rapace.current_call()`` returns it inside a handler, in any code the handler calls, and
in tasks it starts (a contextvar, copied into them); the calls a handler makes inherit its
deadline from it (``docs/protocol.md`` §11). Interceptors receive one for each call, on
the serving side and on the calling side (``rapace.interceptors``).

Serving a request must stay cheap when nobody asks: the session stores a plain tuple
``(deadline, session, request, metadata)`` in the contextvar, and ``current_call()`` builds
the ``CallContext`` from it the first time it is asked for in a task.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from rapace.flags import FrameFlags
from rapace.metadata import MetadataValue

if TYPE_CHECKING:
    from rapace.peer import Peer
    from rapace.session import RpcSession

__all__ = ["CallContext", "CallKind", "current_call", "current_deadline", "serving_call"]

CallKind: TypeAlias = Literal["unary", "stream", "notification"]
"""A unary call (one answer), a server-streaming call, or a notification (no answer)."""

serving_call: contextvars.ContextVar[CallContext | tuple[Any, ...] | None] = contextvars.ContextVar(
    "rapace_serving_call", default=None
)
"""The call the current task serves: a ``CallContext``, or the session's state tuple it is
built from (``(deadline, session, request, metadata)``), or None."""

_NO_REPLY = int(FrameFlags.NO_REPLY)


class CallContext:
    """One call, as its handler or an interceptor sees it.

    - ``method``: ``"Service.method"`` (None when the id is not a typed service's), and
      ``method_id``, its id on the wire;
    - ``channel_id``: the call's channel (0 for a notification);
    - ``kind``: ``"unary"``, ``"stream"`` or ``"notification"``;
    - ``deadline``: when the call must be answered, on the session's clock
      (``time.monotonic()`` seconds unless its loop has another), or None;
      ``time_remaining()`` is what is left of it;
    - ``metadata``: the call's metadata, a dict of ``str`` keys to ``str`` values
      (``bytes`` under keys ending in ``-bin``): as received on the serving side (an
      interceptor may change it for the ones after it and the handler), to be sent on
      the calling side (a client interceptor may add to it);
    - ``session``: the ``RpcSession`` the call travels on, and ``peer``, who is on the
      other end of it (``rapace.Peer``: address, Unix credentials, TLS certificate; None
      for a session built on a transport that knows no peer, such as ``mem_pair()``).
    """

    __slots__ = ("channel_id", "deadline", "kind", "metadata", "method", "method_id", "session")

    def __init__(
        self,
        *,
        session: RpcSession,
        method_id: int,
        method: str | None,
        channel_id: int,
        kind: CallKind,
        deadline: float | None,
        metadata: dict[str, MetadataValue],
    ) -> None:
        self.session = session
        self.method_id = method_id
        self.method = method
        self.channel_id = channel_id
        self.kind: CallKind = kind
        self.deadline = deadline
        self.metadata = metadata

    @property
    def peer(self) -> Peer | None:
        """The session's peer (what ``serve(authorize=...)`` admitted)."""
        return self.session.peer

    def time_remaining(self) -> float | None:
        """Seconds left until the deadline (0 once it passed), or None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self.session._time())

    def __repr__(self) -> str:
        name = self.method or f"method {self.method_id:#010x}"
        return (
            f"<CallContext {name} {self.kind} on channel {self.channel_id}, "
            f"{len(self.metadata)} metadata keys>"
        )


def served_context(state: tuple[Any, ...]) -> CallContext:
    """The ``CallContext`` of a request the session serves, from its state tuple."""
    deadline, session, request, metadata = state
    desc = request.desc
    channel_id = desc.channel_id
    kind: CallKind = (
        "unary" if not desc.flags & _NO_REPLY else "stream" if channel_id else "notification"
    )
    return CallContext(
        session=session,
        method_id=desc.method_id,
        method=session._method_names.get(desc.method_id),
        channel_id=channel_id,
        kind=kind,
        deadline=deadline,
        metadata={} if metadata is None else metadata,
    )


def current_call() -> CallContext:
    """The call this task serves (a handler, code it calls, or a task it started).

    ``LookupError`` outside any call. The same context comes back on every call in one
    task, so a change to its ``metadata`` is seen by the code that asks next.
    """
    state = serving_call.get()
    if state is None:
        raise LookupError(
            "rapace.current_call(): this task serves no call (ask in a handler, in code "
            "it calls, or in a task it started)"
        )
    if type(state) is tuple:
        context = served_context(state)
        serving_call.set(context)
        return context
    assert isinstance(state, CallContext)
    return state


def current_deadline() -> float | None:
    """When the call this task serves must be answered (in ``time.monotonic()`` seconds),
    or None if its caller set no deadline (or this task serves no call).

    A handler reads its time left as ``rapace.current_deadline() - time.monotonic()``
    (or ``rapace.current_call().time_remaining()``); the calls it makes meanwhile inherit
    the deadline (they time out no later), as in gRPC. Past it, the handler is cancelled
    and its caller answered ``DeadlineExceeded``.
    """
    state = serving_call.get()
    if state is None:
        return None
    if type(state) is tuple:
        return state[0]  # type: ignore[no-any-return]
    assert isinstance(state, CallContext)
    return state.deadline
