"""The in-memory transport: bounded inboxes, close semantics, push delivery to one sink.

Frames are read one at a time through the tests' ``pull(transport)`` queue where that
reads better than a recording sink.

Frames are built with each twin's ``build_frame`` (the transport carries frame objects,
so it must work with both twins' ``Frame`` types).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from session_helpers import DATA, pull, run, settle, wait_for

import rapace
from rapace.transport import MemTransport, TransportClosed, mem_pair
from rapace.transport.mem import DEFAULT_MAX_IN_FLIGHT


def frames(twin: Any, n: int, start: int = 1) -> list[Any]:
    return [
        twin.frame.build_frame(i, 1, 0, DATA, i.to_bytes(4, "little"))
        for i in range(start, start + n)
    ]


def ids(received: list[Any]) -> list[int]:
    return [f.desc.msg_id for f in received]


class Sink:
    """A recording ``FrameSink``."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.lost: list[BaseException | None] = []
        self.got_frames = asyncio.Event()
        self.got_lost = asyncio.Event()

    def frames_received(self, batch: list[Any]) -> None:
        self.batches.append(list(batch))
        self.got_frames.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)
        self.got_lost.set()

    @property
    def received(self) -> list[Any]:
        return [f for batch in self.batches for f in batch]


def test_mem_pair_is_a_transport(twin: Any) -> None:
    a, b = mem_pair()
    assert isinstance(a, rapace.Transport)
    assert isinstance(b, MemTransport)
    assert not a.is_closed
    assert DEFAULT_MAX_IN_FLIGHT == 64
    with pytest.raises(ValueError):
        mem_pair(0)


def test_frames_arrive_in_order_both_ways(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        sent = frames(twin, 10)
        for f in sent:
            await a.send_frame(f)
        got = [await pull(b).recv_frame() for _ in range(10)]
        assert [g is s for g, s in zip(got, sent, strict=True)] == [True] * 10
        back = frames(twin, 3, start=100)
        for f in back:
            await b.send_frame(f)
        assert ids([await pull(a).recv_frame() for _ in range(3)]) == [100, 101, 102]

    run(main())


def test_recv_frame_waits_for_a_frame(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        receiving = asyncio.create_task(pull(b).recv_frame())
        await settle()
        assert not receiving.done()
        (f,) = frames(twin, 1)
        await a.send_frame(f)
        assert await wait_for(receiving, "the frame") is f

    run(main())


def test_64_frame_bound_blocks_the_sender_until_the_peer_reads(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        sent = frames(twin, 66)
        for f in sent[:64]:
            await a.send_frame(f)  # never blocks: the peer's inbox holds 64
        blocked = asyncio.create_task(a.send_frame(sent[64]))
        also_blocked = asyncio.create_task(a.send_frame(sent[65]))
        await settle()
        assert not blocked.done() and not also_blocked.done()
        assert len(b._inbox) == 64  # white-box: the bound itself
        assert (await pull(b).recv_frame()) is sent[0]
        await wait_for(blocked, "the first blocked sender to be released")
        assert len(b._inbox) <= 64
        assert (await pull(b).recv_frame()) is sent[1]
        await wait_for(also_blocked, "the second blocked sender to be released")
        rest = [await pull(b).recv_frame() for _ in range(64)]
        assert ids(rest) == list(range(3, 67))  # order kept across the blocked sends

    run(main())


def test_try_send_frame_takes_what_fits_and_declines_the_rest(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair(max_in_flight=3)
        sink = Sink()
        b.attach(sink)
        sent = frames(twin, 5)
        assert [a.try_send_frame(f) for f in sent[:4]] == [True, True, True, False]
        assert len(b._inbox) == 3  # white-box: a declined frame is not queued
        await wait_for(sink.got_frames, "the frames that fit")
        assert ids(sink.received) == [1, 2, 3] and len(sink.batches) == 1  # one delivery
        # While the peer does not read, the inbox fills up and stays full.
        b.pause_reading()
        for f in frames(twin, 3, start=10):
            assert a.try_send_frame(f)
        waiting = asyncio.create_task(a.send_frame(sent[3]))
        await settle()
        assert not waiting.done()
        assert not a.try_send_frame(sent[4])
        b.resume_reading()
        await wait_for(waiting, "the waiting sender")
        assert a.try_send_frame(sent[4])
        while len(sink.received) < 8:
            sink.got_frames.clear()
            await wait_for(sink.got_frames, "the rest")
        assert ids(sink.received) == [1, 2, 3, 10, 11, 12, 4, 5]

    run(main())


def test_try_send_frame_does_not_overtake_waiting_senders(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair(max_in_flight=1)
        f1, f2, f3, f4 = frames(twin, 4)
        at_first_delivery: list[tuple[int, bool, bool]] = []

        class Checking(Sink):
            def frames_received(self, batch: list[Any]) -> None:
                super().frames_received(batch)
                if batch[0] is f1:  # room again, and the woken sender has not run yet
                    at_first_delivery.append(
                        (len(b._inbox), bool(b._space_waiters), a.try_send_frame(f4))
                    )

        sink = Checking()
        b.pause_reading()
        b.attach(sink)
        assert a.try_send_frame(f1)
        first = asyncio.create_task(a.send_frame(f2))
        second = asyncio.create_task(a.send_frame(f3))
        await settle()
        assert not first.done() and not second.done()
        b.resume_reading()
        await wait_for(first, "the first waiter")
        await wait_for(second, "the second waiter")
        while len(sink.received) < 3:
            sink.got_frames.clear()
            await wait_for(sink.got_frames, "the waiters' frames")
        # Room for one, a sender still waiting: the no-wait send was declined.
        assert at_first_delivery == [(0, True, False)]
        assert [x is y for x, y in zip(sink.received, (f1, f2, f3), strict=True)] == [True] * 3

    run(main())


def test_try_send_frame_declines_once_either_end_is_closed(twin: Any) -> None:
    async def main() -> None:
        (f,) = frames(twin, 1)
        a, b = mem_pair()
        b.close()
        assert not a.try_send_frame(f)
        with pytest.raises(TransportClosed):
            await a.send_frame(f)  # what a declined sender does next tells why
        a, b = mem_pair()
        a.close()
        assert not a.try_send_frame(f)
        assert len(b._inbox) == 0
        c, d = mem_pair()  # a peer with no sink yet takes no-wait sends too
        assert c.try_send_frame(f)
        assert await wait_for(pull(d).recv_frame(), "the frame") is f

    run(main())


def test_custom_bound(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair(max_in_flight=2)
        sent = frames(twin, 3)
        await a.send_frame(sent[0])
        await a.send_frame(sent[1])
        blocked = asyncio.create_task(a.send_frame(sent[2]))
        await settle()
        assert not blocked.done()
        await pull(b).recv_frame()
        await wait_for(blocked, "the blocked sender")

    run(main())


def test_cancelled_blocked_sender_does_not_block_others(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair(max_in_flight=1)
        f1, f2, f3 = frames(twin, 3)
        await a.send_frame(f1)
        cancelled = asyncio.create_task(a.send_frame(f2))
        waiting = asyncio.create_task(a.send_frame(f3))
        await settle()
        cancelled.cancel()
        await settle()
        assert (await pull(b).recv_frame()) is f1
        await wait_for(waiting, "the sender behind a cancelled one")
        assert (await pull(b).recv_frame()) is f3

    run(main())


def test_close_peer_drains_then_sees_transport_closed(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        sent = frames(twin, 3)
        for f in sent:
            await a.send_frame(f)
        a.close()
        assert a.is_closed and not b.is_closed
        assert ids([await pull(b).recv_frame() for _ in range(3)]) == [1, 2, 3]
        with pytest.raises(TransportClosed):
            await pull(b).recv_frame()
        with pytest.raises(TransportClosed):
            await pull(b).recv_frame()  # stays closed
        with pytest.raises(TransportClosed):
            await b.send_frame(sent[0])  # nobody to send to
        with pytest.raises(TransportClosed):
            await a.send_frame(sent[0])
        with pytest.raises(TransportClosed):
            await pull(a).recv_frame()
        a.close()  # idempotent
        b.close()
        assert b.is_closed

    run(main())


def test_transport_closed_is_a_connection_error(twin: Any) -> None:
    assert issubclass(TransportClosed, ConnectionError)


def test_close_wakes_a_waiting_receiver_on_either_side(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        peer_waiting = asyncio.create_task(pull(b).recv_frame())
        own_waiting = asyncio.create_task(pull(a).recv_frame())
        await settle()
        a.close()
        with pytest.raises(TransportClosed):
            await wait_for(peer_waiting, "the peer's receiver to see the close")
        with pytest.raises(TransportClosed):
            await wait_for(own_waiting, "the closing side's receiver to see the close")

    run(main())


@pytest.mark.parametrize("closer", ["sender side", "receiver side"])
def test_close_releases_a_blocked_sender_with_transport_closed(twin: Any, closer: str) -> None:
    async def main() -> None:
        a, b = mem_pair(max_in_flight=1)
        f1, f2 = frames(twin, 2)
        await a.send_frame(f1)
        blocked = asyncio.create_task(a.send_frame(f2))
        await settle()
        assert not blocked.done()
        (a if closer == "sender side" else b).close()
        with pytest.raises(TransportClosed):
            await wait_for(blocked, "the blocked sender to fail")

    run(main())


def test_pause_reading_holds_frames_back(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        (f,) = frames(twin, 1)
        b.pause_reading()
        await a.send_frame(f)
        receiving = asyncio.create_task(pull(b).recv_frame())
        await settle()
        assert not receiving.done()
        b.resume_reading()
        assert await wait_for(receiving, "the frame after resume") is f

    run(main())


def test_push_mode_delivers_one_batch_per_loop_iteration(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        sink = Sink()
        b.attach(sink)
        sent = frames(twin, 5)
        for f in sent:
            await a.send_frame(f)  # all in one iteration: no await suspends
        assert sink.batches == []  # delivered from the loop, not inside send_frame
        await wait_for(sink.got_frames, "a batch")
        assert len(sink.batches) == 1
        assert [x is y for x, y in zip(sink.batches[0], sent, strict=True)] == [True] * 5
        assert len(b._inbox) == 0  # white-box: handed over, not kept

    run(main())


def test_push_mode_frames_sent_before_attach_are_delivered(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        for f in frames(twin, 3):
            await a.send_frame(f)
        sink = Sink()
        b.attach(sink)
        await wait_for(sink.got_frames, "the frames queued before attach")
        assert ids(sink.received) == [1, 2, 3]

    run(main())


def test_a_second_sink_is_refused(twin: Any) -> None:
    async def main() -> None:
        _a, b = mem_pair()
        b.attach(Sink())
        with pytest.raises(RuntimeError, match="already attached"):
            b.attach(Sink())

    run(main())


def test_push_mode_releases_blocked_senders(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        sink = Sink()
        b.attach(sink)
        sent = frames(twin, 200)

        async def send_all() -> None:
            for f in sent:
                await a.send_frame(f)

        await wait_for(asyncio.create_task(send_all()), "200 frames through a 64-frame inbox")
        while len(sink.received) < 200:
            sink.got_frames.clear()
            await wait_for(sink.got_frames, "the last batches")
        assert ids(sink.received) == list(range(1, 201))
        assert max(len(batch) for batch in sink.batches) <= 64

    run(main())


def test_push_mode_pause_and_resume(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        sink = Sink()
        b.attach(sink)
        b.pause_reading()
        for f in frames(twin, 3):
            await a.send_frame(f)
        await settle()
        assert sink.batches == []
        b.resume_reading()
        await wait_for(sink.got_frames, "frames after resume")
        assert ids(sink.received) == [1, 2, 3]

    run(main())


def test_push_mode_peer_close_delivers_queued_frames_then_connection_lost(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        sink = Sink()
        b.attach(sink)
        for f in frames(twin, 3):
            await a.send_frame(f)
        a.close()
        await wait_for(sink.got_lost, "connection_lost")
        assert ids(sink.received) == [1, 2, 3]
        assert sink.lost == [None]
        await settle()
        assert sink.lost == [None]  # reported once

    run(main())


def test_push_mode_paused_peer_close_waits_for_the_queue(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        sink = Sink()
        b.attach(sink)
        b.pause_reading()
        for f in frames(twin, 2):
            await a.send_frame(f)
        a.close()
        await settle()
        assert sink.lost == []  # the queued frames come first, as on a socket
        b.resume_reading()
        await wait_for(sink.got_lost, "connection_lost after the queue drained")
        assert ids(sink.received) == [1, 2]
        assert sink.lost == [None]

    run(main())


def test_push_mode_own_close_reports_connection_lost(twin: Any) -> None:
    async def main() -> None:
        a, b = mem_pair()
        sink_a, sink_b = Sink(), Sink()
        a.attach(sink_a)
        b.attach(sink_b)
        a.close()
        assert sink_a.lost == [None]  # synchronously, on the closing side
        await wait_for(sink_b.got_lost, "the peer's connection_lost")
        assert sink_b.lost == [None]
        a.close()
        b.close()
        await settle()
        assert sink_a.lost == [None] and sink_b.lost == [None]

    run(main())
