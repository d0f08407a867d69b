"""Server-streaming calls, both ends, over a ``ChannelPort``.

The wire shape (``docs/protocol.md`` §6): the request is ``DATA|EOS|NO_REPLY`` on a fresh
channel; items go back as ``DATA`` frames on that channel, the end as an ``EOS`` frame
without payload, a failure as one ``ERROR|EOS`` frame. **Extension:** a client that stops
iterating early sends ``CancelChannel`` on the control channel, and the server's session
cancels the task producing the stream, as it does a unary call's (a Rust server ignores
it and finishes the stream, whose remaining items the client drops).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, TypeAlias

from rapace.control import CancelReason
from rapace.errors import DeadlineExceeded, ErrorCode, parse_error_payload
from rapace.stats import failure_status

if TYPE_CHECKING:
    from rapace.channel import ChannelPort
    from rapace.tunnel import TunnelReceiver

__all__ = ["ItemStream", "StreamCall", "StreamEnd", "send_items"]

logger = logging.getLogger("rapace.session")


# -- server side ---------------------------------------------------------------------------


async def send_items(
    port: ChannelPort, channel_id: int, *, encode: Callable[[Any], bytes], items: Any
) -> None:
    """Send ``items`` (an async iterator, or an awaitable giving one) as the stream on
    ``channel_id``, then its end. What the handler raises comes out of here, unsent: the
    interceptors around the call see it, then the session ends the stream with it (one
    ``ERROR|EOS`` frame) and counts the call with its status, as it does a unary call's."""
    frames = port.frames
    if inspect.isawaitable(items):  # an `async def` returning an iterator
        items = await items
    async with contextlib.aclosing(items):
        async for item in items:
            await port.send(frames.chunk(channel_id, encode(item)))
    await port.send(frames.stream_end(channel_id))


# -- client side ---------------------------------------------------------------------------


StreamEnd: TypeAlias = Callable[[int, BaseException | None], None]
"""``callback(status, error)``, called once as an ``ItemStream`` ends: ``status`` 0 and
no error for a complete stream, else the status code and (when there is one) the error
the caller sees."""

_CANCELLED = int(ErrorCode.Cancelled)


class ItemStream:
    """The items of a server-streaming call, decoded.

    ``timeout`` (seconds) bounds each wait for the next item, not the whole stream: a
    live stream may run for as long as it keeps producing. ``aclose()`` (or leaving an
    ``async with``, or dropping the stream) stops it early and tells the server.
    """

    def __init__(
        self,
        receiver: TunnelReceiver,
        name: str,
        decode: Callable[[bytes], Any],
        timeout: float | None = None,
    ) -> None:
        self._receiver = receiver
        self._name = name
        self._decode = decode
        self._timeout = timeout
        self._done = False
        self._on_end: list[StreamEnd] | None = None
        self._status = 0  # how it ended, once it did
        self._error: BaseException | None = None

    def add_done_callback(self, callback: StreamEnd) -> None:
        """Call ``callback(status, error)`` once, as the stream ends: after its last
        item (status 0), with the error it ends with (its ``RpcError``'s code;
        ``DeadlineExceeded`` for an item that did not come in time; ``SessionClosed``
        for a connection lost), or ``Cancelled`` when the caller stops it early. What a
        client interceptor uses to see a streaming call to its end (its ``call_next()``
        returns as soon as the call is sent). A stream already over calls it at once."""
        if self._done:
            callback(self._status, self._error)
            return
        if self._on_end is None:
            self._on_end = []
        self._on_end.append(callback)

    def _end(self, status: int = 0, error: BaseException | None = None) -> None:
        """The stream is over: no more receiving; tell the callbacks how it ended."""
        self._done = True
        self._status = status
        self._error = error
        callbacks, self._on_end = self._on_end, None
        for callback in callbacks or ():
            try:
                callback(status, error)
            except Exception:
                logger.exception("a done callback of stream %s failed", self._name)

    def __aiter__(self) -> ItemStream:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._timeout is None:
                chunk = await self._receiver.recv()
            else:
                async with asyncio.timeout(self._timeout):
                    chunk = await self._receiver.recv()
        except TimeoutError:
            error = DeadlineExceeded(f"{self._name}: no stream item within {self._timeout:g} s")
            self._stop(CancelReason.DEADLINE_EXCEEDED, error)
            raise error from None
        except Exception as exc:  # the session died: the stream is cut short
            self._end(failure_status(exc), exc)
            raise
        if chunk is None:
            self._end()
            raise StopAsyncIteration
        if chunk.is_error:
            failure = parse_error_payload(chunk.payload)
            self._end(int(failure.code), failure)
            raise failure
        if chunk.payload or not chunk.is_eos:
            if chunk.is_eos:
                self._end()  # a DATA|EOS frame with a payload is the last item
            return self._decode(chunk.payload)
        self._end()
        raise StopAsyncIteration

    def _stop(
        self,
        reason: CancelReason = CancelReason.CLIENT_CANCEL,
        error: BaseException | None = None,
    ) -> None:
        """Stop receiving and ask the server to cancel the stream, without awaiting."""
        if self._done:
            return
        self._end(_CANCELLED if error is None else failure_status(error), error)
        receiver = self._receiver
        receiver.close()
        port = receiver.port
        port.send_soon(port.frames.cancel(receiver.channel_id, reason))

    async def aclose(self) -> None:
        """Stop early: stop receiving and tell the server (``CancelChannel``)."""
        self._stop()

    async def __aenter__(self) -> ItemStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped mid-stream (e.g. `break` out of `async for`): unread items must not
        # fill the receiver and stall the connection.
        if not getattr(self, "_done", True):
            try:
                self._stop()
            except Exception:  # interpreter shutdown or a loop already gone
                logger.debug("stream dropped during shutdown", exc_info=True)


class StreamCall:
    """What a typed client's streaming method returns: iterate it, or await it.

    ``async for n in calc.countdown(3)`` starts the call on the first item (this is what
    a declaration ``def countdown(...) -> AsyncIterator[u32]`` promises the type
    checker); ``stream = await calc.countdown(3)`` starts it and gives the
    ``ItemStream``, to hold and ``aclose()`` early. Either way, once.
    """

    __slots__ = ("_open", "_stream")

    def __init__(self, open_stream: Callable[[], Awaitable[ItemStream]]) -> None:
        self._open: Callable[[], Awaitable[ItemStream]] | None = open_stream
        self._stream: ItemStream | None = None

    async def _start(self) -> ItemStream:
        if self._open is None:
            raise RuntimeError("this streaming call was already started")
        opening, self._open = self._open, None
        self._stream = await opening()
        return self._stream

    def __await__(self) -> Generator[Any, None, ItemStream]:
        return self._start().__await__()

    def __aiter__(self) -> StreamCall:
        return self

    async def __anext__(self) -> Any:
        stream = self._stream
        if stream is None:
            stream = await self._start()
        return await stream.__anext__()

    async def aclose(self) -> None:
        """Stop the stream early (nothing to do if it never started)."""
        self._open = None
        if self._stream is not None:
            await self._stream.aclose()
