"""Message limits fail one call, never the connection: the sender refuses a payload the
peer would not take before writing anything, and a handler whose answer is too large gets
its call answered with an error instead. Both twins, through the fixture."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from session_helpers import ECHO, run, session_pair, wait_for

import rapace

MAX = 1 << 20
BIG = rapace.wire.compute_method_id("Test", "big")


def test_five_calls_in_flight_survive_an_oversized_request_and_response(twin: Any) -> None:
    release = asyncio.Event()

    async def handler(frame: Any) -> bytes:
        if frame.desc.method_id == BIG:
            return bytes(MAX + 1)  # more than the peer takes
        await release.wait()
        return bytes(frame.payload)

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=handler) as p:
            client = p.client
            calls = [
                asyncio.create_task(client.call(client.next_channel_id(), ECHO, b"%d" % i))
                for i in range(5)
            ]
            with pytest.raises(rapace.ResourceExhausted, match="exceeds the peer's maximum"):
                await client.call(client.next_channel_id(), ECHO, bytes(MAX + 1))
            with pytest.raises(rapace.ResourceExhausted, match=r"response of 1048577 bytes"):
                await client.call(client.next_channel_id(), BIG, b"")
            for refused in (
                client.notify(ECHO, bytes(MAX + 1)),
                client.send_chunk(client.next_channel_id(), bytes(MAX + 1)),
                client.start_streaming_call(ECHO, bytes(MAX + 1)),
            ):
                with pytest.raises(rapace.ResourceExhausted):
                    await refused
            assert client.tunnel_channel_ids() == []  # the refused stream left nothing
            release.set()
            results = await wait_for(asyncio.gather(*calls), "the five calls")
            assert [r.payload for r in results] == [b"%d" % i for i in range(5)]
            assert not client.is_closed and not p.server.is_closed
            assert (await client.call(client.next_channel_id(), ECHO, bytes(MAX))).payload == bytes(
                MAX
            )

    run(main())
