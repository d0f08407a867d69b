"""A small user program touching every public API, for ``mypy --strict`` (run by
``tests/test_readme.py::test_a_user_program_type_checks``; never imported by pytest).

It is what a newcomer writes: a Protocol declaration with a default and a stream, an
implementation, a tunnel method, a data enum, both ways to connect, typed clients with
their own timeouts, errors caught by class, the wire core and the codec.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import rapace
from rapace.tunnel import forward


class Shape(rapace.DataEnum):
    pass


@dataclass
class Circle(Shape):
    radius: float


@dataclass
class Point:
    x: rapace.i32
    y: rapace.i32


@rapace.service
class Geometry(Protocol):
    async def area(self, shape: Shape, scale: rapace.f32 = 1.0) -> float: ...
    async def origin(self) -> Point: ...
    def walk(self, steps: rapace.u16) -> AsyncIterator[Point]: ...
    async def shell(self) -> rapace.Tunnel: ...


class GeometryImpl(Geometry):
    async def area(self, shape: Shape, scale: float = 1.0) -> float:
        if not isinstance(shape, Circle):
            raise rapace.InvalidArgument("only circles")
        deadline: float | None = rapace.current_deadline()
        call: rapace.CallContext = rapace.current_call()
        left: float | None = call.time_remaining()
        tenant: str | bytes | None = call.metadata.get("tenant")
        del deadline, left, tenant
        return 3.14159 * shape.radius**2 * scale

    async def origin(self) -> Point:
        return Point(0, 0)

    async def walk(self, steps: int) -> AsyncIterator[Point]:
        for i in range(steps):
            yield Point(i, i)

    async def shell(self, tunnel: rapace.Tunnel) -> None:  # type: ignore[override]
        async for data in tunnel:
            tunnel.write(data)


async def audit(call: rapace.CallContext, call_next: rapace.CallNext) -> object:
    if call.method is None or call.kind == "notification":
        raise rapace.PermissionDenied("unnamed")
    return await call_next()


interceptor: rapace.Interceptor = audit


async def in_memory() -> None:
    a, b = rapace.mem_pair()
    async with rapace.RpcSession(a, 1) as client_session, rapace.RpcSession(b, 2) as server:
        router: rapace.ServiceRouter = rapace.register_services(
            server, GeometryImpl(), interceptors=[audit]
        )
        del router
        geo = rapace.client(Geometry, client_session, timeout=5.0, interceptors=[audit])
        geo = rapace.with_metadata(geo, {"tenant": "a", "trace-bin": b"\x01"})
        area: float = await geo.area(Circle(1.0))
        area = await rapace.with_timeout(geo, 0.5).area(Circle(2.0), 0.5)
        area = await geo.area(Circle(3.0), timeout=0.25)  # rapace.mypy_plugin
        del area
        point: Point = await geo.origin()
        del point
        async for p in geo.walk(3, timeout=1.0):
            print(p.x + p.y)
        stream = geo.walk(2)
        assert isinstance(stream, rapace.StreamCall)
        tunnel: rapace.TunnelStream = await geo.shell()
        tunnel.write(b"hi")
        await tunnel.drain()
        tunnel.abort("done")
        rtt: float = await client_session.ping()
        stats: rapace.SessionStats = server.stats
        traffic: rapace.TrafficStats = stats.traffic
        calls: rapace.CallCounts = stats.calls_served
        print(rtt, stats, traffic.bytes_sent, calls.total())


async def over_sockets() -> None:
    async def on_session(session: rapace.RpcSession) -> None:
        rapace.register_services(session, GeometryImpl())

    server: rapace.Server
    async with rapace.serve(on_session, "tcp://127.0.0.1:0") as server:
        address: rapace.Address = server.address
        try:
            async with rapace.connect(address, services=[GeometryImpl()]) as session:
                geo = rapace.client(Geometry, session)
                print(await geo.origin())
            totals: rapace.MetricsSnapshot = server.metrics()
            print(totals.calls_served, totals.sessions_open)
        except rapace.ConnectionFailed as exc:
            print(exc.address)
        except (rapace.DeadlineExceeded, rapace.Unavailable, rapace.SessionClosed) as exc:
            print(exc.code, exc.message)
        except rapace.RpcError as exc:
            print(rapace.ErrorCode(exc.code).name)
        await server.shutdown(grace=1.0)


async def over_tls(context: ssl.SSLContext, client_context: ssl.SSLContext) -> None:
    async def authorize(peer: rapace.Peer) -> bool:
        return peer.kind == "tls" and peer.common_name == "client-1"

    def same_user(peer: rapace.Peer) -> bool:
        return peer.uid == 1000

    async with (
        rapace.serve(print, "tls://127.0.0.1:0", ssl=context, authorize=authorize) as server,
        rapace.serve(print, "unix:/tmp/x.sock", authorize=same_user, mode=0o660),
        rapace.connect(
            server.address, ssl=client_context, server_hostname="localhost", handshake_timeout=5
        ) as session,
    ):
        peer: rapace.Peer | None = session.peer
        if peer is not None and peer.certificate is not None:
            der: bytes | None = peer.certificate_der
            print(peer.address, peer.pid, peer.uid, peer.gid, der)


async def local_forwarding(stream: rapace.TunnelStream) -> None:
    import asyncio  # noqa: PLC0415

    reader, writer = await asyncio.open_connection("127.0.0.1", 22)
    await forward(stream, reader, writer)


def codec() -> None:
    data = rapace.postcard.dumps(Point(1, 2), Point)
    back: Point = rapace.postcard.loads(data, Point)
    assert back == Point(1, 2)
    desc = rapace.wire.MsgDescHot(msg_id=1, channel_id=1, flags=rapace.wire.FrameFlags.DATA)
    frame = rapace.wire.Frame.with_payload(desc, data)
    assert rapace.wire.FrameDecoder().feed(rapace.wire.encode_frame(frame))
    print(rapace.IMPLEMENTATION, rapace.__version__)


def main() -> None:
    rapace.run(in_memory())
    rapace.run(over_sockets())
