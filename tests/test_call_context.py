"""The call context and call metadata (issue 13, items 3; docs/protocol.md §10.6).

``rapace.current_call()`` inside handlers (typed and raw, unary, streaming, notification),
in nested code and tasks the handler starts; metadata from ``with_metadata``,
``client(metadata=)`` and the low-level ``call(metadata=)``; its wire form (a golden
vector), a peer that ignores it, and bad metadata from either side. Both twins; the typed
tests over a ``mem_pair`` and a real Unix socket.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from service_helpers import KINDS, run_kind, service_env
from session_helpers import (
    CONTROL,
    ECHO,
    NOTIFY,
    REQUEST,
    raw_peer,
    run,
    session_pair,
    until,
    wait_for,
)

import rapace
from rapace import InvalidArgument, ResourceExhausted
from rapace.control import CALL_METADATA, CallMetadata, ControlCodec
from rapace.metadata import PreparedMetadata, decode_pairs, encode_pairs, metadata_body
from rapace.session import METADATA_HELD_BYTES
from rapace.wire import FrameFlags, parse_error_payload

ERROR = int(FrameFlags.ERROR)


@rapace.service
class Probe:
    async def look(self, n: rapace.u32) -> str: ...

    async def items(self, n: rapace.u32) -> AsyncIterator[rapace.u32]: ...


class ProbeImpl(Probe):
    def __init__(self) -> None:
        self.seen: list[rapace.CallContext] = []
        self.nested: list[rapace.CallContext] = []

    async def look(self, n: int) -> str:
        call = rapace.current_call()
        self.seen.append(call)
        # Nested code and a task the handler starts see the same call.
        self.nested.append(await asyncio.create_task(_ask()))
        return f"{call.method} {n} {sorted(call.metadata.items())}"

    async def items(self, n: int) -> AsyncIterator[int]:
        self.seen.append(rapace.current_call())
        for i in range(n):
            yield i


def _serving(impl: ProbeImpl) -> Any:
    return lambda session: rapace.register_services(session, impl)


async def _ask() -> rapace.CallContext:
    return rapace.current_call()


# -- the context -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_handler_sees_its_call(twin: Any, kind: str) -> None:
    impl = ProbeImpl()

    async def main() -> None:
        async with service_env(
            twin, kind, serve=lambda s: rapace.register_services(s, impl)
        ) as env:
            probe = rapace.client(Probe, env.client, timeout=5.0)
            before = time.monotonic()
            assert await probe.look(7) == "Probe.look 7 []"
            (call,) = impl.seen
            assert call.method == "Probe.look"
            assert call.method_id == rapace.wire.compute_method_id("Probe", "look")
            assert call.kind == "unary"
            assert call.channel_id % 2 == 1  # opened by the client (odd ids)
            assert call.session is env.server
            assert call.metadata == {}
            assert call.deadline is not None
            assert before < call.deadline <= time.monotonic() + 5.0
            remaining = call.time_remaining()
            assert remaining is not None and 0 < remaining <= 5.0
            assert impl.nested == [call]  # the very same context, in a task it started
            assert "Probe.look" in repr(call)

            assert [n async for n in probe.items(3)] == [0, 1, 2]
            assert impl.seen[1].kind == "stream" and impl.seen[1].method == "Probe.items"

    run_kind(kind, main())


def test_outside_a_call_there_is_no_context(twin: Any) -> None:
    async def main() -> None:
        with pytest.raises(LookupError, match="serves no call"):
            rapace.current_call()
        assert rapace.current_deadline() is None

    run(main())


def test_raw_dispatcher_unnamed_method_and_notification(twin: Any) -> None:
    """A raw dispatcher's handlers have a context too: no name, the kind from the flags;
    a request without a deadline has none."""
    seen: list[rapace.CallContext] = []
    noted = asyncio.Event()

    async def dispatcher(frame: Any) -> bytes:
        call = rapace.current_call()
        seen.append(call)
        assert rapace.current_deadline() == call.deadline
        if call.kind == "notification":
            noted.set()
        return b"ok"

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=dispatcher) as pair:
            await pair.client.call(pair.client.next_channel_id(), ECHO, b"", timeout=math.inf)
            await pair.client.notify(ECHO, b"x")
            await wait_for(noted, "the notification")
        unary, note = seen
        assert (unary.method, unary.kind, unary.deadline, unary.time_remaining()) == (
            None,
            "unary",
            None,
            None,
        )
        assert (note.kind, note.channel_id) == ("notification", 0)
        assert "method 0x" in repr(unary)

    run(main())


# -- metadata ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_reaches_the_handler(twin: Any, kind: str) -> None:
    impl = ProbeImpl()

    async def main() -> None:
        async with service_env(
            twin, kind, serve=lambda s: rapace.register_services(s, impl)
        ) as env:
            plain = rapace.client(Probe, env.client, metadata={"tenant": "a"})
            more = rapace.with_metadata(plain, {"trace-bin": b"\x00\xff", "tenant": "b"})
            untyped: Any = plain
            assert (
                await more.look(1) == "Probe.look 1 [('tenant', 'b'), ('trace-bin', b'\\x00\\xff')]"
            )
            assert await plain.look(2) == "Probe.look 2 [('tenant', 'a')]"  # unchanged
            assert await untyped.with_metadata({"x": "y"}).look(3) == (
                "Probe.look 3 [('tenant', 'a'), ('x', 'y')]"
            )
            assert [n async for n in more.items(2)] == [0, 1]
            assert impl.seen[-1].metadata == {"tenant": "b", "trace-bin": b"\x00\xff"}
            # with_timeout keeps the metadata
            assert await rapace.with_timeout(more, 2.0).look(4) == (
                "Probe.look 4 [('tenant', 'b'), ('trace-bin', b'\\x00\\xff')]"
            )
            # Nothing is left held on the server once the requests came.
            assert not env.server._call_metadata

    run_kind(kind, main())


def test_low_level_call_carries_metadata(twin: Any) -> None:
    async def dispatcher(frame: Any) -> bytes:
        seen = repr(sorted(rapace.current_call().metadata.items()))
        if frame.desc.flags & int(FrameFlags.NO_REPLY):  # a stream: answered by its error
            raise rapace.NotFound(seen)
        return seen.encode()

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=dispatcher) as pair:
            client = pair.client
            response = await client.call(client.next_channel_id(), ECHO, metadata={"k": "v"})
            assert response.payload == b"[('k', 'v')]"
            plain = await client.call(client.next_channel_id(), ECHO)
            assert plain.payload == b"[]"
            receiver = await client.start_streaming_call(ECHO, metadata={"s": "1"})
            chunk = await receiver.recv()
            assert chunk is not None and chunk.is_error
            assert parse_error_payload(chunk.payload).message == "[('s', '1')]"

    run(main())


def test_metadata_wire_form_golden_vector(twin: Any) -> None:
    """``CallMetadata { channel_id: 3, metadata: [("k", b"v")] }`` is verb 8, payload
    ``03 01 01 6b 01 76`` (docs/protocol.md §10.6), sent just before the request."""
    codec = ControlCodec()
    assert codec.encode(CallMetadata(3, [("k", b"v")])) == (8, bytes.fromhex("0301016b0176"))

    async def main() -> None:
        async with raw_peer(twin) as setup:
            raw, session = setup.raw, setup.session
            call = asyncio.create_task(session.call(3, ECHO, b"hi", metadata={"k": "v"}))
            meta = await raw.recv()
            assert (meta.desc.channel_id, meta.desc.flags, meta.desc.method_id) == (
                0,
                CONTROL,
                CALL_METADATA,
            )
            assert meta.payload == bytes.fromhex("0301016b0176")
            request = await raw.recv()
            assert (request.desc.channel_id, request.desc.method_id) == (3, ECHO)
            assert request.payload == b"hi"
            # The raw peer ignores the metadata (as a peer that does not speak it does)
            # and answers the request: the call completes.
            await raw.send(3, 0, REQUEST, b"answer", msg_id=request.desc.msg_id)
            response = await wait_for(call, "the call answered by a peer ignoring metadata")
            assert response.payload == b"answer"

    run(main())


def test_the_caller_is_refused_bad_metadata_before_anything_is_sent(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, session_kwargs={"max_metadata_size": 64}) as setup:
            session = setup.session
            with pytest.raises(ValueError, match="'Tenant' is not made of"):
                await session.call(3, ECHO, metadata={"Tenant": "a"})
            with pytest.raises(ValueError, match="not made of"):
                await session.call(3, ECHO, metadata={"": "a"})
            with pytest.raises(TypeError, match="ends in -bin: its value is bytes"):
                await session.call(3, ECHO, metadata={"x-bin": "text"})
            with pytest.raises(TypeError, match="carries text"):
                await session.call(3, ECHO, metadata={"x": b"bytes"})
            with pytest.raises(TypeError, match="a mapping"):
                await session.call(3, ECHO, metadata=[("x", "y")])  # type: ignore[arg-type]
            with pytest.raises(
                ResourceExhausted, match=r"call metadata of \d+ bytes exceeds this session's "
            ):
                await session.call(3, ECHO, metadata={"big": "x" * 100})
            with pytest.raises(ResourceExhausted):
                await session.start_streaming_call(ECHO, metadata={"big": "x" * 100})
            assert session.pending_channel_ids() == []
            assert session.tunnel_channel_ids() == []
            # Nothing went out: the first frame the raw peer sees is a later good call's.
            call = asyncio.create_task(session.call(5, ECHO, b"", metadata={"ok": "1"}))
            meta = await setup.raw.recv()
            assert meta.desc.method_id == CALL_METADATA and meta.payload[0] == 5
            request = await setup.raw.recv()
            await setup.raw.send(5, 0, REQUEST, b"", msg_id=request.desc.msg_id)
            await wait_for(call, "the good call")
        with pytest.raises(TypeError, match="mapping of str keys"):
            rapace.with_metadata(rapace.client(Probe, session), "x")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_metadata_size"):
            rapace.RpcSession(rapace.mem_pair()[0], max_metadata_size=0)

    run(main())


def _metadata_payload(channel_id: int, pairs: list[tuple[str, bytes]]) -> bytes:
    _, payload = ControlCodec().encode(CallMetadata(channel_id, pairs))
    return payload


async def _answer_of(raw: Any, channel_id: int, payload: bytes | None) -> Any:
    """Send (if given) a CallMetadata payload, then a request on ``channel_id``; the answer."""
    if payload is not None:
        await raw.send(0, CALL_METADATA, CONTROL, payload)
    await raw.send(channel_id, ECHO, REQUEST, b"hello")
    answer = await raw.recv()
    assert answer.desc.channel_id == channel_id
    return answer


def test_bad_metadata_from_the_peer_refuses_only_its_call(twin: Any) -> None:
    seen: list[dict[str, Any]] = []

    async def dispatcher(frame: Any) -> bytes:
        seen.append(dict(rapace.current_call().metadata))
        return bytes(frame.payload)

    async def main() -> None:
        async with raw_peer(
            twin,
            start_channel_id=2,
            dispatcher=dispatcher,
            session_kwargs={"max_metadata_size": 64},
        ) as setup:
            raw = setup.raw

            async def refused(channel_id: int, payload: bytes) -> str:
                answer = await _answer_of(raw, channel_id, payload)
                assert answer.desc.flags & ERROR, answer
                error = parse_error_payload(answer.payload)
                return f"{type(error).__name__}: {error.message}"

            too_big = _metadata_payload(1, [("big", b"x" * 100)])
            assert await refused(1, too_big) == (
                f"ResourceExhausted: method {ECHO:#010x}: call metadata of {len(too_big)} "
                "bytes exceeds the server's maximum of 64 bytes"
            )
            assert "not UTF-8" in await refused(3, _metadata_payload(3, [("k", b"\xff")]))
            assert "'K' is not made of" in await refused(5, _metadata_payload(5, [("K", b"")]))
            twice = _metadata_payload(7, [("k", b"1"), ("k", b"2")])
            assert "'k' appears more than once" in await refused(7, twice)
            assert seen == []  # none of them ran

            # Undecodable metadata, or metadata for a channel that is not the peer's, is
            # ignored: the request runs without it.
            for channel_id, payload in [
                (9, b"\x09\x05"),  # a count larger than the bytes left
                (11, _metadata_payload(2, [("k", b"v")])),  # this side's parity
                (13, _metadata_payload(0, [("k", b"v")])),  # the control channel
            ]:
                answer = await _answer_of(raw, channel_id, payload)
                assert answer.payload == b"hello" and not answer.desc.flags & ERROR
            assert seen == [{}, {}, {}]

            # A good one still works; the session serves on.
            answer = await _answer_of(raw, 15, _metadata_payload(15, [("k", b"v")]))
            assert answer.payload == b"hello" and seen[-1] == {"k": "v"}
            assert not setup.session._call_metadata

    run(main())


def test_metadata_without_requests_is_bounded(twin: Any) -> None:
    """A peer sending metadata for requests that never come makes the session hold at
    most ``max_pending`` entries and ``METADATA_HELD_BYTES`` bytes; the oldest go."""

    async def main() -> None:
        async with raw_peer(
            twin,
            start_channel_id=2,
            dispatcher=_echo,
            session_kwargs={"max_pending": 8},
        ) as setup:
            raw, session = setup.raw, setup.session
            for channel_id in range(1, 2 * 40, 2):
                await raw.send(0, CALL_METADATA, CONTROL, _metadata_payload(channel_id, []))
            answer = await _answer_of(raw, 79, None)  # (all of them routed by now)
            assert answer.payload == b"hello"
            assert len(session._call_metadata) <= 8
            big = [("v-bin", b"x" * 8000)]
            payload = _metadata_payload(1001, big)
            count = METADATA_HELD_BYTES // len(payload) + 10
            session._max_metadata_size = len(payload)
            session._max_pending = count  # (only the byte bound is left to hold it)
            for channel_id in range(1001, 1001 + 2 * count, 2):
                payload = _metadata_payload(channel_id, big)  # (all of one size)
                await raw.send(0, CALL_METADATA, CONTROL, payload)
            answer = await _answer_of(raw, 3, None)
            assert answer.payload == b"hello"
            assert 0 < session._call_metadata_bytes <= METADATA_HELD_BYTES
            assert session._call_metadata_bytes == sum(
                s for _, s in session._call_metadata.values()
            )

    run(main())


async def _echo(frame: Any) -> bytes:
    return bytes(frame.payload)


def test_a_notification_with_metadata_for_channel_zero_is_not_mixed_up(twin: Any) -> None:
    """Notifications carry no metadata (``CallMetadata`` for channel 0 is ignored)."""
    seen: list[dict[str, Any]] = []
    noted = asyncio.Event()

    async def dispatcher(frame: Any) -> None:
        seen.append(dict(rapace.current_call().metadata))
        noted.set()

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2, dispatcher=dispatcher) as setup:
            raw = setup.raw
            await raw.send(0, CALL_METADATA, CONTROL, _metadata_payload(0, [("k", b"v")]))
            await raw.send(0, ECHO, NOTIFY, b"n")
            await wait_for(noted, "the notification")
        assert seen == [{}]

    run(main())


def test_invalid_argument_is_what_bad_peer_metadata_raises() -> None:
    with pytest.raises(InvalidArgument):
        decode_pairs([("a b", b"")])
    assert decode_pairs([("a-bin", b"\xff"), ("b", "é".encode())]) == {"a-bin": b"\xff", "b": "é"}


def test_a_request_waiting_for_a_handler_slot_keeps_its_metadata(twin: Any) -> None:
    release = asyncio.Event()
    started = asyncio.Event()
    seen: list[Any] = []

    async def dispatcher(frame: Any) -> bytes:
        seen.append(rapace.current_call().metadata.get("n"))
        started.set()
        await release.wait()
        return b""

    async def main() -> None:
        async with session_pair(
            twin, server_dispatcher=dispatcher, server_kwargs={"max_pending": 1}
        ) as pair:
            client = pair.client
            first = asyncio.create_task(
                client.call(client.next_channel_id(), ECHO, metadata={"n": "1"})
            )
            await wait_for(started, "the first handler")
            second = asyncio.create_task(
                client.call(client.next_channel_id(), ECHO, metadata={"n": "2"})
            )
            await until(lambda: pair.server.stats.requests_queued == 1, "the second to queue")
            release.set()
            await wait_for(asyncio.gather(first, second), "both calls")
        assert seen == ["1", "2"]

    run(main())


def test_a_session_that_ignores_metadata_still_answers(twin: Any) -> None:
    """A server that does not know ``CallMetadata`` (an older rapace-python ignores the
    unknown verb, as here) answers typed calls carrying metadata, without it."""
    impl = ProbeImpl()

    async def main() -> None:
        async with session_pair(twin) as pair:
            rapace.register_services(pair.server, impl)
            pair.server._on_call_metadata = lambda frame: None  # type: ignore[method-assign]
            probe = rapace.client(Probe, pair.client, metadata={"tenant": "a"})
            assert await probe.look(1) == "Probe.look 1 []"
            assert [n async for n in probe.items(2)] == [0, 1]

    run(main())


@pytest.mark.parametrize("channel_id", [1, 127, 128, 300, 1 << 21, 0xFFFFFFFF])
def test_the_metadata_frame_is_the_control_codec_encoding(twin: Any, channel_id: int) -> None:
    """The sender builds the payload as channel id varint + pre-encoded pairs: the same
    bytes as the control codec's ``CallMetadata`` (on either twin)."""
    metadata = {"a": "é", "b-bin": b"\x00" * 200, "c": ""}
    frames = rapace.RpcSession(rapace.mem_pair()[0]).frames
    for given in (metadata, PreparedMetadata(metadata)):
        body = given.body if isinstance(given, PreparedMetadata) else metadata_body(given)
        frame = frames.call_metadata(channel_id, body, 1 << 20)
        _, expected = ControlCodec().encode(CallMetadata(channel_id, encode_pairs(metadata)))
        assert frame.payload == expected
        assert frame.desc.method_id == CALL_METADATA and frame.desc.channel_id == 0
