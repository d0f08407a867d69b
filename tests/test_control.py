"""The control channel's messages: their bytes, and what a session does with bad ones.

The byte examples are the ones ``docs/protocol.md`` gives; bad payloads (truncated,
overlong varints, bad UTF-8, counts past the bytes left, unknown verbs) are ignored by
``ControlCodec.decode`` and, sent to a session, change nothing: it answers the next call.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from net_helpers import listen_address, read_raw_frame, short_tmpdir
from session_helpers import CONTROL, ECHO, REQUEST, raw_peer, run, wait_for

import rapace
from rapace import ResourceExhausted, _impl
from rapace._impl import Twin
from rapace.control import (
    CancelChannel,
    CancelReason,
    CloseChannel,
    CloseError,
    CloseNormal,
    ControlCodec,
    GrantCredits,
    OpenChannel,
    Ping,
    Pong,
    Settings,
)

EXAMPLES = [
    (CancelChannel(5, CancelReason.DEADLINE_EXCEEDED), 3, b"\x05\x01"),
    (CloseChannel(0, CloseNormal()), 2, b"\x00\x00"),
    (CloseChannel(7, CloseError("bad")), 2, b"\x07\x01\x03bad"),
    (GrantCredits(1, 300), 4, b"\x01\xac\x02"),
    (OpenChannel(3, "Svc", "m", [("k", b"\x00\xff")]), 1, b"\x03\x03Svc\x01m\x01\x01k\x02\x00\xff"),
    (Ping(b"12345678"), 5, b"12345678"),
    (Pong(b"\x00" * 8), 6, b"\x00" * 8),
    (Settings(65536), 7, b"\x80\x80\x04"),
]


@pytest.mark.parametrize(("message", "verb", "payload"), EXAMPLES)
def test_the_documented_bytes(twin: Any, message: Any, verb: int, payload: bytes) -> None:
    codec = ControlCodec()
    assert codec.encode(message) == (verb, payload)
    assert codec.decode(verb, payload) == (message, "")


BAD = [
    (3, b"", "truncated"),
    (3, b"\x05", "truncated"),
    (3, b"\x05\x03", "unknown reason"),
    (3, b"\x05\x00\x00", "trailing"),
    (3, b"\xff\xff\xff\xff\x7f\x00", "u32 overflow"),
    (3, b"\x80\x80\x80\x80\x80\x80\x00", "overlong varint"),
    (2, b"\x01\x01\x02\xc3\x28", "bad UTF-8"),
    (2, b"\x01\x02", "unknown close reason"),
    (1, b"\x01\x00\x00\xff\xff\xff\xff\x0f", "a Vec longer than the bytes left"),
    (1, b"\x01\xff\xff\xff\xff\x0f", "a String longer than the bytes left"),
    (4, b"\x01", "truncated"),
    (5, b"1234567", "short ping"),
    (6, b"123456789", "long pong"),
    (0, b"", "verb 0"),
    (7, b"", "truncated settings"),
    (8, b"\x00", "unknown verb"),
    (0xFFFFFFFF, b"", "unknown verb"),
]


@pytest.mark.parametrize(("verb", "payload", "what"), BAD, ids=[b[2] for b in BAD])
def test_bad_payloads_decode_to_nothing(twin: Any, verb: int, payload: bytes, what: str) -> None:
    message, problem = ControlCodec().decode(verb, payload)
    assert message is None
    assert problem


def test_the_twins_agree_on_random_payloads(both_twins: tuple[Twin, Twin]) -> None:
    rng = random.Random(11)
    with _impl.using(both_twins[0]):
        compiled = ControlCodec()
    with _impl.using(both_twins[1]):
        pure = ControlCodec()
    for _ in range(3000):
        verb = rng.randrange(0, 9)
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 24)))
        a, b = compiled.decode(verb, payload), pure.decode(verb, payload)
        assert a[0] == b[0], (verb, payload, a, b)
        assert bool(a[1]) == bool(b[1])


def test_a_session_ignores_garbage_on_the_control_channel(twin: Any) -> None:
    rng = random.Random(5)

    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2) as s:

            async def echo(frame: Any) -> bytes:
                return bytes(frame.payload)

            s.session.set_dispatcher(echo)
            for verb, payload, _ in BAD:
                await s.raw.send(0, verb, CONTROL, payload)
            for _ in range(300):
                verb = rng.randrange(0, 9)
                size = rng.choice([0, 1, 2, 8, 16, 40, 300])
                await s.raw.send(0, verb, CONTROL, bytes(rng.randrange(256) for _ in range(size)))
            await s.raw.send(1, ECHO, REQUEST, b"alive")
            # Garbage that happens to decode is answered on the control channel (a Pong for
            # a Ping, its own Settings once, a refusal for an OpenChannel): then the echo.
            for _ in range(400):
                frame = await s.raw.recv()
                if frame.desc.flags != CONTROL:
                    break
                assert frame.desc.channel_id == 0
            assert (frame.desc.channel_id, frame.payload) == (1, b"alive")
            assert not s.session.is_closed

    run(main())


# -- Settings: each side's maximum payload ---------------------------------------------------


def test_a_session_with_the_default_maximum_announces_nothing(twin: Any) -> None:
    async def main() -> None:
        async with raw_peer(twin, start_channel_id=2) as s:

            async def echo(frame: Any) -> bytes:
                return bytes(frame.payload)

            s.session.set_dispatcher(echo)
            await s.raw.send(1, ECHO, REQUEST, b"first")
            frame = await s.raw.recv()  # the answer is the first frame it writes
            assert (frame.desc.channel_id, frame.payload) == (1, b"first")

    run(main())


@pytest.mark.parametrize(
    ("announced", "limit"),
    [(4096, 4096), (8 << 20, 8 << 20), (0, 16), (3, 16), (0xFFFFFFFF, 0xFFFFFFFF - 64)],
)
def test_the_peers_settings_set_the_sending_limit(twin: Any, announced: int, limit: int) -> None:
    """What the peer announces is what this side sends it, clamped to an inline payload at
    least and to what a frame holds at most; a default session answers with its own."""

    async def main() -> None:
        async with raw_peer(twin) as s:
            verb, payload = ControlCodec().encode(Settings(announced))
            await s.raw.send(0, verb, CONTROL, payload)
            answer = await s.raw.recv()
            assert (answer.desc.channel_id, answer.desc.method_id) == (0, verb)
            assert ControlCodec().decode(verb, answer.payload)[0] == Settings(1 << 20)
            assert s.session.frames.max_payload == limit
            if limit < 1 << 20:
                with pytest.raises(ResourceExhausted, match=f"the peer's maximum of {limit}"):
                    await s.session.call(1, ECHO, bytes(limit + 1))
            # a second announcement is taken too, and answered no more
            await s.raw.send(0, verb, CONTROL, ControlCodec().encode(Settings(5000))[1])
            call = asyncio.create_task(s.session.call(3, ECHO, b"x"))
            request = await s.raw.recv()
            assert request.desc.channel_id == 3
            assert s.session.frames.max_payload == 5000
            await s.raw.send(3, 0, REQUEST, b"x", msg_id=request.desc.msg_id)
            await call

    run(main())


def test_a_server_with_its_own_maximum_announces_it(twin: Any) -> None:
    async def main() -> None:
        with short_tmpdir() as directory:
            address = listen_address("unix", directory)
            async with rapace.serve(lambda session: None, address, max_payload_size=4096) as server:
                reader, writer = await asyncio.open_unix_connection(server.address.path)
                try:
                    frame = await wait_for(read_raw_frame(reader, settings=True), "Settings")
                    assert (frame.channel_id, frame.flags, frame.method_id) == (0, CONTROL, 7)
                    assert frame.payload == b"\x80\x20"  # 4096, a varint
                finally:
                    writer.close()

    run(main())
