"""Typed services (issue 5; docs/protocol.md §6, §8, §9): ``@rapace.service``, the generated
client, ``register_services`` / ``ServiceRouter``, server streaming and its CANCEL
extension for an early stop.

Definition-time checks need no session. Everything else runs against both twins (the
``twin`` fixture: the sessions, ``serve`` and ``connect`` are built on it) and over
both a ``mem_pair`` and a real Unix socket (``KINDS``). Ordering is by events and futures;
``wait_until`` polls (bounded) only for state no event reports (tunnel tables).
"""

from __future__ import annotations

import asyncio
import enum
import gc
import importlib
import textwrap
import typing
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from net_helpers import wait_for, wait_until
from service_helpers import KINDS, Capture, Env, run_kind, service_env
from session_helpers import run, session_pair

import rapace
from rapace import (
    DeadlineExceeded,
    ErrorCode,
    Internal,
    InvalidArgument,
    NotFound,
    PostcardError,
    RpcError,
    Unimplemented,
)
from rapace.wire import FrameFlags, compute_method_id, parse_error_payload

DATA = int(FrameFlags.DATA)
EOS = int(FrameFlags.EOS)
ERROR = int(FrameFlags.ERROR)
NO_REPLY = int(FrameFlags.NO_REPLY)

# -- Rust-shaped types -------------------------------------------------------------------
#
#   struct Point { x: i32, y: i32 }
#   enum Color { Red, Green, Blue }
#   enum Shape { Circle { center: Point, radius: f64 }, Rect { min: Point, max: Point }, Blank }
#   struct Drawing {
#       name: String, shapes: Vec<Shape>, color: Option<Color>, tags: BTreeMap<String, u32>,
#       thumbnail: Option<Vec<u8>>, scale: f32, origin: (i16, i16), layers: Vec<Vec<u8>>,
#   }


@dataclass
class Point:
    x: rapace.i32
    y: rapace.i32


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Shape(rapace.DataEnum):
    pass


@dataclass
class Circle(Shape):
    center: Point
    radius: float


@dataclass
class Rect(Shape):
    min: Point
    max: Point


@dataclass
class Blank(Shape):
    pass


@dataclass
class Drawing:
    name: str
    shapes: list[Shape]
    color: Color | None
    tags: dict[str, rapace.u32]
    thumbnail: bytes | None
    scale: rapace.f32
    origin: tuple[rapace.i16, rapace.i16]
    layers: list[list[rapace.u8]]


class NotACodecType:
    """A plain class: postcard cannot encode it."""


# -- services ----------------------------------------------------------------------------


@rapace.service
class Calculator:
    async def add(self, a: rapace.i32, b: rapace.i32) -> rapace.i32: ...

    async def divide(self, a: rapace.i32, b: rapace.i32) -> float: ...

    async def countdown(self, start: rapace.u32) -> AsyncIterator[rapace.u32]: ...


@rapace.service
class Lab:
    """The workhorse of the end-to-end tests."""

    async def ping(self) -> None: ...

    async def echo(self, text: str) -> str: ...

    async def count(self, n: rapace.u32) -> AsyncIterator[rapace.u32]: ...

    async def fail_after(self, n: rapace.u32, kind: str) -> AsyncIterator[rapace.u32]: ...

    async def forever(self) -> AsyncIterator[rapace.u64]: ...

    async def stall(self) -> AsyncIterator[rapace.u32]: ...

    async def raise_status(self, code: rapace.u32, message: str) -> None: ...

    async def crash(self) -> rapace.i32: ...

    async def overflow(self) -> rapace.i32: ...

    async def hang(self) -> None: ...

    async def slow(self, seconds: float) -> str: ...

    async def relay(self, text: str) -> str: ...

    async def missing(self, x: rapace.i32) -> rapace.i32: ...

    async def missing_stream(self) -> AsyncIterator[rapace.i32]: ...


@rapace.service
class Echo:
    async def echo(self, text: str) -> str: ...


@rapace.service
class Other:
    """Never served: its ids are unknown to every server in these tests."""

    async def nothing(self) -> rapace.i32: ...

    async def nothing_stream(self) -> AsyncIterator[rapace.i32]: ...


@rapace.service
class Geometry:
    async def echo(self, drawing: Drawing) -> Drawing: ...

    async def paint(self, color: Color, point: Point | None) -> Color: ...

    async def lookup(self, names: list[str], table: dict[str, Point]) -> list[Point | None]: ...

    async def bounds(self, shapes: list[Shape]) -> tuple[Point, Point] | None: ...

    async def shapes(self, drawing: Drawing) -> AsyncIterator[Shape]: ...


class CalculatorImpl(Calculator):
    async def add(self, a: int, b: int) -> int:
        return a + b

    async def divide(self, a: int, b: int) -> float:
        if b == 0:
            raise InvalidArgument("division by zero")
        return a / b

    async def countdown(self, start: int) -> AsyncIterator[int]:
        for n in range(start, -1, -1):
            yield n


class LabImpl(Lab):
    """Records what happened to its generators; ``session`` is the one it is served on."""

    def __init__(self, session: rapace.RpcSession | None = None) -> None:
        self.session = session
        self.forever_started = asyncio.Event()
        self.forever_closed = asyncio.Event()
        self.forever_sent = 0
        self.stall_closed = asyncio.Event()
        self.hang_cancelled = asyncio.Event()
        self.fail_closed = asyncio.Event()

    async def ping(self) -> None:
        return None

    async def echo(self, text: str) -> str:
        return text

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def fail_after(self, n: int, kind: str) -> AsyncIterator[int]:
        try:
            for i in range(n):
                yield i
            if kind == "status":
                raise NotFound("item gone")
            raise ValueError("mid-stream boom")
        finally:
            self.fail_closed.set()

    async def forever(self) -> AsyncIterator[int]:
        self.forever_started.set()
        try:
            i = 0
            while True:
                yield i
                self.forever_sent = i = i + 1
        finally:
            self.forever_closed.set()

    async def stall(self) -> AsyncIterator[int]:
        try:
            await asyncio.get_running_loop().create_future()
            yield 0
        finally:
            self.stall_closed.set()

    async def raise_status(self, code: int, message: str) -> None:
        raise RpcError(code, message)

    async def crash(self) -> int:
        raise ValueError("boom")

    async def overflow(self) -> int:
        return 2**31  # does not fit the declared i32

    async def hang(self) -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            self.hang_cancelled.set()
            raise

    async def slow(self, seconds: float) -> str:
        await asyncio.sleep(seconds)  # a duration to exceed, not an ordering device
        return "done"

    async def relay(self, text: str) -> str:
        assert self.session is not None
        back = rapace.client(Echo, self.session, timeout=5.0)
        return "relayed:" + await back.echo(text)


class EchoImpl(Echo):
    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    async def echo(self, text: str) -> str:
        return self.prefix + text


class GeometryImpl(Geometry):
    async def echo(self, drawing: Drawing) -> Drawing:
        assert isinstance(drawing, Drawing)
        return drawing

    async def paint(self, color: Color, point: Point | None) -> Color:
        return color

    async def lookup(self, names: list[str], table: dict[str, Point]) -> list[Point | None]:
        return [table.get(name) for name in names]

    async def bounds(self, shapes: list[Shape]) -> tuple[Point, Point] | None:
        points: list[Point] = []
        for shape in shapes:
            if isinstance(shape, Circle):
                r = int(shape.radius)
                c = shape.center
                points += [Point(c.x - r, c.y - r), Point(c.x + r, c.y + r)]
            elif isinstance(shape, Rect):
                points += [shape.min, shape.max]
        if not points:
            return None
        return (
            Point(min(p.x for p in points), min(p.y for p in points)),
            Point(max(p.x for p in points), max(p.y for p in points)),
        )

    async def shapes(self, drawing: Drawing) -> AsyncIterator[Shape]:
        for shape in drawing.shapes:
            yield shape


def mid(service: type, method: str) -> int:
    return typing.cast(int, service.__rapace_service__.methods[method].method_id)  # type: ignore[attr-defined]


def serve_lab(session: rapace.RpcSession) -> None:
    rapace.register_services(session, LabImpl(session))


def lab_of(env: Env) -> LabImpl:
    """The ``LabImpl`` served on ``env.server`` (set up by ``serve_lab``)."""
    router = env.server._dispatcher
    while isinstance(router, Capture):
        router = router.inner
    assert isinstance(router, rapace.ServiceRouter)
    _, handler = router._routes[mid(Lab, "ping")]
    impl = handler.__self__
    assert isinstance(impl, LabImpl)
    return impl


def define(service_name: str, body: str, *, name: str | None = None) -> type:
    """Build ``class <service_name>: <body>`` in this module's namespace and decorate it."""
    namespace: dict[str, Any] = {}
    source = f"class {service_name}:\n" + textwrap.indent(textwrap.dedent(body), "    ")
    exec(source, globals(), namespace)
    cls = namespace[service_name]
    return rapace.service(cls) if name is None else rapace.service(name=name)(cls)


DRAWING = Drawing(
    name="héllo wörld",
    shapes=[Circle(Point(0, 0), 2.5), Rect(Point(-3, -4), Point(5, 6)), Blank()],
    color=Color.GREEN,
    tags={"a": 1, "zz": 2**32 - 1, "": 0},
    thumbnail=b"\x00\xff\x10",
    scale=0.5,
    origin=(-32768, 32767),
    layers=[[], [0, 255], [7]],
)


# == definition time ======================================================================


def test_method_ids_follow_wire_section_8() -> None:
    assert mid(Calculator, "add") == 0x193FA158
    assert mid(Calculator, "add") == 423600472
    assert mid(Echo, "echo") == 0x3E895C50
    info = Calculator.__rapace_service__  # type: ignore[attr-defined]
    assert info.name == "Calculator"
    assert set(info.methods) == {"add", "divide", "countdown"}
    for name, method in info.methods.items():
        assert method.method_id == compute_method_id("Calculator", name)
        assert info.by_id[method.method_id] is method
    assert info.methods["countdown"].streaming
    assert not info.methods["add"].streaming


def test_service_name_override_changes_the_ids() -> None:
    calc = define(
        "Calc",
        "async def add(self, a: rapace.i32, b: rapace.i32) -> rapace.i32: ...",
        name="Calculator",
    )
    info = calc.__rapace_service__  # type: ignore[attr-defined]
    assert info.name == "Calculator"
    assert info.methods["add"].method_id == 0x193FA158
    plain = define("Calc", "async def add(self, a: rapace.i32, b: rapace.i32) -> rapace.i32: ...")
    assert plain.__rapace_service__.methods["add"].method_id == compute_method_id("Calc", "add")  # type: ignore[attr-defined]
    assert plain.__rapace_service__.methods["add"].method_id != 0x193FA158  # type: ignore[attr-defined]


# Found by a brute-force search over generated names (verified again by each test).
COLLIDING = ("Clash", "m52919", "m133851")
ZERO = ("Zero", "m_699txj")


def test_two_methods_with_the_same_id_are_refused_at_definition() -> None:
    service_name, first, second = COLLIDING
    assert compute_method_id(service_name, first) == compute_method_id(service_name, second)
    body = f"""
        async def {first}(self) -> None: ...
        async def {second}(self) -> None: ...
    """
    with pytest.raises(TypeError) as info:
        define(service_name, body)
    message = str(info.value)
    assert first in message and second in message
    assert f"{compute_method_id(service_name, first):#010x}" in message
    # The same names in another service do not collide.
    assert define("NoClash", body).__rapace_service__.methods.keys() == {first, second}  # type: ignore[attr-defined]
    # ... unless the other service is *named* like the colliding one.
    with pytest.raises(TypeError, match="same method id"):
        define("NoClash", body, name=service_name)


def test_a_method_hashing_to_zero_is_refused_at_definition() -> None:
    service_name, method = ZERO
    assert compute_method_id(service_name, method) == 0
    body = f"async def {method}(self) -> None: ..."
    with pytest.raises(TypeError, match=rf"{service_name}\.{method}.*method id 0.*reserved"):
        define(service_name, body)
    with pytest.raises(TypeError, match="reserved"):
        define("Innocent", body, name=service_name)
    define("Innocent", body)  # fine under its own name


def test_zero_and_collision_checks_use_compute_method_id(monkeypatch: pytest.MonkeyPatch) -> None:
    # Method ids are computed at definition time, in ``rapace.methods``.
    service_module = importlib.import_module("rapace.methods")
    real = service_module.compute_method_id

    def fake(service: str, method: str) -> int:
        if method == "zero":
            return 0
        if method in ("twin_a", "twin_b"):
            return 0x12345678
        return real(service, method)

    monkeypatch.setattr(service_module, "compute_method_id", fake)
    with pytest.raises(TypeError, match=r"Fake\.zero.*0.*reserved"):
        define("Fake", "async def zero(self) -> None: ...")
    with pytest.raises(TypeError, match=r"twin_b.*twin_a|twin_a.*twin_b"):
        define(
            "Fake",
            """
            async def twin_a(self) -> None: ...
            async def twin_b(self) -> None: ...
            """,
        )


UNSUPPORTED = [
    "set[int]",
    "frozenset[int]",
    "object",
    "typing.Any",
    "int | str",
    "list",
    "dict",
    "NotACodecType",
    "dict[list[int], int]",
    "complex",
]


@pytest.mark.parametrize("tp", UNSUPPORTED)
@pytest.mark.parametrize("where", ["argument", "second argument", "result", "stream item"])
def test_unsupported_types_are_refused_at_definition(tp: str, where: str) -> None:
    signature = {
        "argument": f"async def frob(self, x: {tp}) -> None: ...",
        "second argument": f"async def frob(self, a: rapace.u8, x: {tp}) -> None: ...",
        "result": f"async def frob(self) -> {tp}: ...",
        "stream item": f"async def frob(self) -> AsyncIterator[{tp}]: ...",
    }[where]
    with pytest.raises(TypeError) as info:
        define("Bad", signature)
    assert "Bad.frob" in str(info.value), str(info.value)


def test_an_unsupported_field_deep_in_a_dataclass_is_refused_at_definition() -> None:
    with pytest.raises(TypeError, match=r"Bad\.frob.*Holder.*bad"):
        define("Bad", "async def frob(self, h: list[Holder]) -> None: ...")


@dataclass
class Holder:
    ok: rapace.u32
    bad: set[int]


@pytest.mark.parametrize(
    "body",
    [
        "def add(self, a: rapace.i32) -> rapace.i32: ...",
        "def gen(self) -> typing.Iterator[rapace.i32]:\n    yield 1",
    ],
    ids=["plain def", "sync generator"],
)
def test_non_async_methods_are_refused(body: str) -> None:
    with pytest.raises(TypeError, match="async def"):
        define("Sync", body)


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ("async def f(self, a) -> None: ...", r"Miss\.f.*'a'.*annotation"),
        ("async def f(self, a: rapace.u8, b) -> None: ...", r"Miss\.f.*'b'.*annotation"),
        ("async def f(self, a: rapace.u8): ...", r"Miss\.f.*return annotation"),
        ("async def f(self, *args: int) -> None: ...", r"Miss\.f.*'args'"),
        ("async def f(self, **kw: int) -> None: ...", r"Miss\.f.*'kw'"),
        ("async def f(self, *, a: int) -> None: ...", r"Miss\.f.*'a'"),
        ("async def f(self) -> AsyncIterator: ...", r"Miss\.f"),
        ("async def f(self, a: Undefined) -> None: ...", r"Miss\.f"),
    ],
    ids=[
        "param",
        "second param",
        "return",
        "varargs",
        "varkw",
        "kwonly",
        "bare AsyncIterator",
        "unresolvable",
    ],
)
def test_missing_or_unusable_annotations_are_refused(body: str, pattern: str) -> None:
    with pytest.raises(TypeError, match=pattern):
        define("Miss", body)


def test_a_class_without_methods_is_refused() -> None:
    with pytest.raises(TypeError, match="no 'async def' methods"):
        define("Empty", "x = 1\ndef _private(self) -> None: ...")


def test_async_generator_annotation_is_a_stream_of_its_first_argument() -> None:
    """``AsyncGenerator[T, None]`` is listed as a streaming annotation: its item is T."""
    svc = define("Gen", "async def items(self) -> AsyncGenerator[rapace.u32, None]: ...")
    method = svc.__rapace_service__.methods["items"]  # type: ignore[attr-defined]
    assert method.streaming
    assert method.result_codec.dumps(300) == b"\xac\x02"


def test_the_interface_methods_raise_unimplemented() -> None:
    async def main() -> None:
        with pytest.raises(Unimplemented, match=r"Calculator\.add"):
            await Calculator().add(2, 3)
        with pytest.raises(Unimplemented, match=r"Calculator\.countdown"):
            async for _ in Calculator().countdown(3):  # type: ignore[attr-defined]
                pass

    run(main())


def test_client_requires_a_service_class_and_is_typed_as_it() -> None:
    async def main() -> None:
        a, _b = rapace.mem_pair()
        session = rapace.RpcSession(a)
        calc = rapace.client(Calculator, session)
        assert isinstance(calc, Calculator)
        assert calc.add.__name__ == "add"
        with pytest.raises(TypeError):
            rapace.client(NotACodecType, session)
        with pytest.raises(TypeError):
            rapace.register_services(session, NotACodecType())
        session.close()

    run(main())


# == payload encoding on the wire (docs/protocol.md §9) ====================================


def test_argument_payloads_on_the_wire(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            capture = Capture(rapace.register_services(p.server, LabImpl(), CalculatorImpl()))
            p.server.set_dispatcher(capture)
            calc = rapace.client(Calculator, p.client, timeout=5.0)
            lab = rapace.client(Lab, p.client, timeout=5.0)

            assert await lab.ping() is None  # no argument: an empty payload
            assert await lab.echo("héllo") == "héllo"  # one: the value itself
            assert await calc.add(2, 3) == 5  # two: the tuple
            assert await calc.add(a=2, b=3) == 5
            assert await calc.add(2, b=3) == 5
            assert await calc.add(b=3, a=2) == 5
            assert await calc.add(-300, 300) == 0
            items = [n async for n in await calc.countdown(300)]
            assert items == list(range(300, -1, -1))

            assert capture.payloads == [
                b"",
                b"\x06h\xc3\xa9llo",
                b"\x04\x06",
                b"\x04\x06",
                b"\x04\x06",
                b"\x04\x06",
                b"\xd7\x04\xd8\x04",
                b"\xac\x02",
            ]
            ids = [f.method_id for f in capture.frames]
            assert ids == [
                mid(Lab, "ping"),
                mid(Lab, "echo"),
                *[0x193FA158] * 5,
                mid(Calculator, "countdown"),
            ]
            unary, stream = capture.frames[0], capture.frames[-1]
            assert unary.flags == DATA | EOS
            assert stream.flags == DATA | EOS | NO_REPLY
            assert unary.channel_id % 2 == stream.channel_id % 2 == 1

    run(main())


def test_results_and_stream_items_on_the_wire(twin: Any) -> None:
    """The server's bytes, read with raw session calls: the value; items one per frame."""

    async def main() -> None:
        async with session_pair(twin) as p:
            rapace.register_services(p.server, CalculatorImpl(), LabImpl())
            client = p.client
            response = await client.call(client.next_channel_id(), 0x193FA158, b"\x04\x06")
            assert response.payload == b"\x0a"
            assert response.desc.method_id == 0
            divide = await client.call(
                client.next_channel_id(), mid(Calculator, "divide"), b"\x0e\x04"
            )
            assert divide.payload == b"\x00\x00\x00\x00\x00\x00\x0c\x40"  # 3.5 as f64 LE
            ping = await client.call(client.next_channel_id(), mid(Lab, "ping"), b"")
            assert ping.payload == b""

            receiver = await client.start_streaming_call(mid(Calculator, "countdown"), b"\x02")
            chunks = [chunk async for chunk in receiver]
            assert [c.payload for c in chunks] == [b"\x02", b"\x01", b"\x00", b""]
            for chunk in chunks[:-1]:
                assert chunk.frame.desc.flags == DATA
                assert chunk.frame.desc.method_id == 0
            end = chunks[-1].frame.desc
            assert end.flags & EOS and not end.flags & (DATA | ERROR)
            assert client.tunnel_channel_ids() == []

    run(main())


def test_rich_argument_bytes_match_the_rust_layout(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            capture = Capture(rapace.register_services(p.server, GeometryImpl()))
            p.server.set_dispatcher(capture)
            geo = rapace.client(Geometry, p.client, timeout=5.0)
            assert await geo.paint(Color.BLUE, Point(1, -1)) is Color.BLUE
            assert await geo.paint(Color.RED, None) is Color.RED
            assert await geo.lookup(["a"], {"a": Point(2, 3)}) == [Point(2, 3)]
            assert capture.payloads == [
                b"\x02\x01\x02\x01",  # (Color::Blue, Some(Point { x: 1, y: -1 }))
                b"\x00\x00",  # (Color::Red, None)
                b"\x01\x01a\x01\x01a\x04\x06",  # (vec!["a"], {"a": Point { x: 2, y: 3 }})
            ]

    run(main())


def test_client_side_argument_errors_send_nothing(twin: Any) -> None:
    async def main() -> None:
        async with session_pair(twin) as p:
            capture = Capture(rapace.register_services(p.server, CalculatorImpl()))
            p.server.set_dispatcher(capture)
            calc = rapace.client(Calculator, p.client, timeout=5.0)
            with pytest.raises(TypeError):
                await calc.add(1)  # type: ignore[call-arg]
            with pytest.raises(TypeError):
                await calc.add(1, 2, 3)  # type: ignore[call-arg]
            with pytest.raises(TypeError):
                await calc.add(1, c=2)  # type: ignore[call-arg]
            with pytest.raises(PostcardError):
                await calc.add(2**31, 0)  # out of i32's range
            with pytest.raises(PostcardError):
                await calc.countdown(-1)
            assert await calc.add(1, 1) == 2
            assert capture.payloads == [b"\x02\x02"]
            assert p.client.pending_channel_ids() == []
            assert p.client.tunnel_channel_ids() == []

    run(main())


# == end to end: unary ====================================================================


@pytest.mark.parametrize("kind", KINDS)
def test_unary_calls(twin: Any, kind: str) -> None:
    async def main() -> None:
        async with service_env(
            twin, kind, serve=lambda s: rapace.register_services(s, CalculatorImpl())
        ) as env:
            calc = rapace.client(Calculator, env.client, timeout=5.0)
            assert await calc.add(2, 3) == 5
            assert await calc.add(-(2**31), 2**31 - 1) == -1
            assert await calc.divide(7, 2) == 3.5
            assert await calc.add(b=40, a=2) == 42
            with pytest.raises(InvalidArgument) as info:
                await calc.divide(1, 0)
            assert info.value.code == ErrorCode.InvalidArgument
            assert info.value.message == "division by zero"
            results = await asyncio.gather(*(calc.add(i, i) for i in range(200)))
            assert results == [2 * i for i in range(200)]
            assert env.client.pending_channel_ids() == []

    run_kind(kind, main())


# == end to end: streaming ================================================================


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("count", [0, 1, 1000])
def test_streaming_items(twin: Any, kind: str, count: int) -> None:
    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            lab = rapace.client(Lab, env.client, timeout=5.0)
            stream = await lab.count(count)
            assert isinstance(stream, rapace.ItemStream)
            items = [n async for n in stream]
            assert items == list(range(count))
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()  # stays ended
            await stream.aclose()  # a no-op after the end
            await env.no_tunnels_left()

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_streams_and_unary_calls_interleave(twin: Any, kind: str) -> None:
    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            lab = rapace.client(Lab, env.client, timeout=5.0)

            async def drain(n: int) -> list[int]:
                return [i async for i in await lab.count(n)]

            streams = [drain(n) for n in (0, 5, 300, 700)]
            echoes = [lab.echo(str(i)) for i in range(100)]
            results = await asyncio.gather(*streams, *echoes)
            assert results[:4] == [list(range(n)) for n in (0, 5, 300, 700)]
            assert results[4:] == [str(i) for i in range(100)]
            await env.no_tunnels_left()

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("items", [0, 3])
def test_error_mid_stream_is_raised_by_the_iteration(twin: Any, kind: str, items: int) -> None:
    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            lab = rapace.client(Lab, env.client, timeout=5.0)
            received: list[int] = []
            with pytest.raises(NotFound) as info:
                async for n in await lab.fail_after(items, "status"):
                    received.append(n)
            assert received == list(range(items))
            assert info.value.code == ErrorCode.NotFound
            assert info.value.message == "item gone"

            received = []
            with pytest.raises(Internal) as crash:
                async for n in await lab.fail_after(items, "crash"):
                    received.append(n)
            assert received == list(range(items))
            assert "ValueError" in crash.value.message
            assert "mid-stream boom" in crash.value.message
            assert lab_of(env).fail_closed.is_set()
            await env.no_tunnels_left()
            assert await lab.echo("still up") == "still up"

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_a_busy_stream_does_not_starve_unary_calls(twin: Any, kind: str) -> None:
    """While the client consumes a never-ending stream as fast as it can, unary calls on
    the same session still get answered: the stream's producer must not keep the
    connection to itself."""

    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            impl = lab_of(env)
            lab = rapace.client(Lab, env.client, timeout=5.0)
            stream = await lab.forever()
            consumed = 0

            async def consume() -> None:
                nonlocal consumed
                async for _ in stream:
                    consumed += 1

            consumer = asyncio.get_running_loop().create_task(consume())
            try:
                await wait_until(lambda: consumed > 500, "the stream to flow")
                for i in range(5):
                    try:
                        assert await lab.echo(str(i), timeout=2.0) == str(i)
                    except DeadlineExceeded:
                        pytest.fail(
                            f"a unary call starved behind the stream ({consumed} items read)"
                        )
            finally:
                consumer.cancel()
                await asyncio.gather(consumer, return_exceptions=True)
                await stream.aclose()
            await wait_for(impl.forever_closed, "the server's generator to be closed")

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("read", [3, 200])
def test_client_stopping_early_closes_the_server_generator(twin: Any, kind: str, read: int) -> None:
    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            impl = lab_of(env)
            lab = rapace.client(Lab, env.client, timeout=5.0)
            stream = await lab.forever()
            received = []
            async for n in stream:
                received.append(n)
                if len(received) == read:
                    break
            assert received == list(range(read))
            await stream.aclose()
            await wait_for(impl.forever_closed, "the server's generator to be closed")
            await env.no_tunnels_left()
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
            # The session goes on, and a new stream works.
            assert await lab.echo("after") == "after"
            assert [n async for n in await lab.count(3)] == [0, 1, 2]
            await env.no_tunnels_left()

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_client_stopping_with_async_with(twin: Any, kind: str) -> None:
    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            impl = lab_of(env)
            lab = rapace.client(Lab, env.client, timeout=5.0)
            async with await lab.forever() as stream:
                assert await stream.__anext__() == 0
            await wait_for(impl.forever_closed, "the server's generator to be closed")
            await env.no_tunnels_left()

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_client_stopping_before_the_first_item(twin: Any, kind: str) -> None:
    """aclose() right after the call: the CANCEL may reach the server before its
    handler has started; the generator must still be stopped."""

    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            impl = lab_of(env)
            lab = rapace.client(Lab, env.client, timeout=5.0)
            stream = await lab.forever()
            await stream.aclose()
            # The stream's handler task was started before the ping's: once the ping is
            # answered, the server has begun the stream (or decided not to run it at all).
            await lab.ping()
            if impl.forever_started.is_set():
                await wait_for(
                    impl.forever_closed, "the server's generator to be closed", timeout=2.0
                )
            await env.no_tunnels_left()
            assert await lab.echo("after") == "after"
            assert impl.forever_closed.is_set() or not impl.forever_started.is_set()

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_client_stopping_a_stalled_stream(twin: Any, kind: str) -> None:
    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            impl = lab_of(env)
            lab = rapace.client(Lab, env.client, timeout=5.0)
            stream = await lab.stall()
            # The request is on its way; the ping's answer proves the server has it.
            await lab.ping()
            await stream.aclose()
            await wait_for(impl.stall_closed, "the stalled generator to be closed")
            await env.no_tunnels_left()

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_a_dropped_stream_does_not_stall_the_session(twin: Any, kind: str) -> None:
    """Breaking out of ``async for`` and dropping the stream (no aclose) must neither
    leave the channel registered nor let the unread items block the connection."""

    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            impl = lab_of(env)
            lab = rapace.client(Lab, env.client, timeout=5.0)
            async for n in await lab.forever():
                assert n == 0
                break
            gc.collect()
            # Unless the drop stopped it, the server sends more than a tunnel buffers (64).
            await wait_until(
                lambda: impl.forever_sent >= 100 or impl.forever_closed.is_set(),
                "the server to send on or stop",
            )
            try:
                answer = await lab.echo("not stalled", timeout=2.0)
            except DeadlineExceeded:
                pytest.fail("the unread items of a dropped stream stalled the connection")
            assert answer == "not stalled"
            await wait_for(
                impl.forever_closed, "the dropped stream's generator to be closed", timeout=2.0
            )
            await env.no_tunnels_left()

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_client_session_closing_mid_stream_stops_the_generator_quietly(
    twin: Any, kind: str
) -> None:
    """The client goes away mid-stream: the server's generator is closed, and no task
    fails unobserved ("Task exception was never retrieved" fails the run helper)."""

    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            impl = lab_of(env)
            lab = rapace.client(Lab, env.client, timeout=5.0)
            stream = await lab.forever()
            assert [await stream.__anext__() for _ in range(3)] == [0, 1, 2]
            env.client.close()
            await wait_for(impl.forever_closed, "the server's generator to be closed")
            with pytest.raises(rapace.SessionClosed):
                async for _ in stream:
                    pass
            await wait_until(lambda: env.server.is_closed, "the server session to close")
            gc.collect()
            await asyncio.sleep(0)

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_client_session_closing_during_a_stalled_stream(twin: Any, kind: str) -> None:
    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            impl = lab_of(env)
            lab = rapace.client(Lab, env.client, timeout=5.0)
            stream = await lab.stall()
            await lab.ping()  # the server has started the stream
            env.client.close()
            await wait_for(impl.stall_closed, "the stalled generator to be closed")
            await wait_until(lambda: env.server.is_closed, "the server session to close")
            with pytest.raises(rapace.SessionClosed):
                await stream.__anext__()
            gc.collect()
            await asyncio.sleep(0)

    run_kind(kind, main())


# == end to end: errors ===================================================================


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_method_is_unimplemented(twin: Any, kind: str) -> None:
    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            other = rapace.client(Other, env.client, timeout=5.0)
            with pytest.raises(Unimplemented) as info:
                await other.nothing()
            assert info.value.code == ErrorCode.Unimplemented
            assert info.value.message == f"unknown method_id: {mid(Other, 'nothing')}"

            stream = await other.nothing_stream()
            with pytest.raises(Unimplemented) as streamed:
                async for _ in stream:
                    pass
            assert streamed.value.message == f"unknown method_id: {mid(Other, 'nothing_stream')}"
            await env.no_tunnels_left()
            assert await rapace.client(Lab, env.client).echo("ok") == "ok"

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_interface_methods_not_overridden_are_unimplemented_end_to_end(
    twin: Any, kind: str
) -> None:
    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            lab = rapace.client(Lab, env.client, timeout=5.0)
            with pytest.raises(Unimplemented) as info:
                await lab.missing(1)
            assert info.value.message == "Lab.missing is not implemented"
            with pytest.raises(Unimplemented) as streamed:
                async for _ in await lab.missing_stream():
                    pass
            assert streamed.value.message == "Lab.missing_stream is not implemented"
            await env.no_tunnels_left()

    run_kind(kind, main())


BAD_PAYLOADS = [
    ("add", Calculator, b"\x04", "truncated"),
    ("add", Calculator, b"\x04\x06\x00", "trailing byte"),
    ("add", Calculator, b"\x04\xff\xff\xff\xff\x7f", "i32 overflow"),
    ("add", Calculator, b"\x04" + b"\x80" * 11 + b"\x00", "over-long varint"),
    ("echo", Lab, b"\x02\xff\xfe", "invalid UTF-8"),
    ("echo", Lab, b"\x05ab", "string past the end"),
    ("ping", Lab, b"\x00", "payload for no arguments"),
]


@pytest.mark.parametrize("kind", KINDS)
def test_arguments_that_fail_to_decode_are_invalid_argument(twin: Any, kind: str) -> None:
    def serve(session: rapace.RpcSession) -> None:
        rapace.register_services(session, LabImpl(session), CalculatorImpl())

    async def main() -> None:
        async with service_env(twin, kind, serve=serve) as env:
            client = env.client
            for method, service, payload, what in BAD_PAYLOADS:
                with pytest.raises(InvalidArgument) as info:
                    await client.call(client.next_channel_id(), mid(service, method), payload)
                assert method in info.value.message, (what, info.value.message)
            # A streaming call with a bad payload ends with the error frame.
            receiver = await client.start_streaming_call(mid(Lab, "count"), b"\xff\xff\xff\xff\x1f")
            chunk = await wait_for(receiver.recv(), "the streaming call's error")
            assert chunk is not None and chunk.is_error and chunk.is_eos
            assert isinstance(parse_error_payload(chunk.payload), InvalidArgument)
            assert await receiver.recv() is None
            await env.no_tunnels_left()
            # The session goes on.
            assert await rapace.client(Calculator, client).add(2, 3) == 5

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_handler_errors(twin: Any, kind: str) -> None:
    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            lab = rapace.client(Lab, env.client, timeout=5.0)
            for code in (ErrorCode.NotFound, ErrorCode.Aborted, ErrorCode.PermissionDenied):
                with pytest.raises(RpcError) as info:
                    await lab.raise_status(int(code), f"{code.name} says x")
                assert info.value.code == code
                assert info.value.message == f"{code.name} says x"
                assert type(info.value) is type(RpcError(code, ""))

            with pytest.raises(NotFound) as nf:
                await lab.raise_status(int(ErrorCode.NotFound), "x")
            assert nf.value.message == "x"

            with pytest.raises(Internal) as crash:
                await lab.crash()
            assert "ValueError" in crash.value.message and "boom" in crash.value.message

            # A result that does not fit its declared type is the server's fault.
            with pytest.raises(Internal) as overflow:
                await lab.overflow()
            assert "PostcardError" in overflow.value.message or "i32" in overflow.value.message

            assert await lab.echo("alive") == "alive"

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_item_that_does_not_encode_fails_the_stream(twin: Any, kind: str) -> None:
    @rapace.service(name="Lab")
    class WideLab:  # the same ids as Lab, but the client decodes count's items as u64
        async def count(self, n: rapace.u32) -> AsyncIterator[rapace.u64]: ...

    class Negative(WideLab):
        async def count(self, n: int) -> AsyncIterator[int]:
            yield 1
            yield -1  # not a u64

    async def main() -> None:
        async with service_env(
            twin, kind, serve=lambda s: rapace.register_services(s, Negative())
        ) as env:
            lab = rapace.client(Lab, env.client, timeout=5.0)
            received = []
            with pytest.raises(Internal):
                async for n in await lab.count(5):
                    received.append(n)
            assert received == [1]
            await env.no_tunnels_left()

    run_kind(kind, main())


def test_a_response_that_does_not_decode_raises_postcard_error(twin: Any) -> None:
    async def liar(frame: Any) -> bytes:
        return b"\x04\x06"  # two values where one i32 is declared

    async def main() -> None:
        async with session_pair(twin, server_dispatcher=liar) as p:
            calc = rapace.client(Calculator, p.client, timeout=5.0)
            with pytest.raises(PostcardError):
                await calc.add(1, 2)
            assert p.client.pending_channel_ids() == []

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_per_call_and_client_timeouts(twin: Any, kind: str) -> None:
    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            lab = rapace.client(Lab, env.client)
            with pytest.raises(DeadlineExceeded):
                await lab.hang(timeout=0.05)

            impatient = rapace.client(Lab, env.client, timeout=0.05)
            with pytest.raises(DeadlineExceeded):
                await impatient.hang()
            with pytest.raises(DeadlineExceeded):
                await impatient.slow(0.5)
            # The per-call timeout overrides the client's, both ways.
            assert await impatient.slow(0.1, timeout=5.0) == "done"
            patient = rapace.client(Lab, env.client, timeout=5.0)
            with pytest.raises(DeadlineExceeded):
                await patient.slow(0.5, timeout=0.05)
            assert env.client.pending_channel_ids() == []
            assert await patient.echo("alive") == "alive"

    run_kind(kind, main())


async def drain_expecting_deadline(stream: Any) -> None:
    with pytest.raises(DeadlineExceeded):
        async for _ in stream:
            pass


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_methods_take_a_per_call_timeout(twin: Any, kind: str) -> None:
    """The client docstring: "Each method also takes ``timeout=``"; a stream whose
    server never sends anything must end with ``DeadlineExceeded``, not hang."""

    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            lab = rapace.client(Lab, env.client)
            assert [n async for n in await lab.count(3, timeout=5.0)] == [0, 1, 2]
            stream = await lab.stall(timeout=0.05)
            await wait_for(drain_expecting_deadline(stream), "the stream's deadline", 3.0)

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_the_client_timeout_covers_streams(twin: Any, kind: str) -> None:
    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            lab = rapace.client(Lab, env.client, timeout=0.05)
            stream = await lab.stall()
            await wait_for(drain_expecting_deadline(stream), "the stream's deadline", 3.0)

    run_kind(kind, main())


# == several services, callbacks, rich types ==============================================


@pytest.mark.parametrize("kind", KINDS)
def test_two_services_on_one_session(twin: Any, kind: str) -> None:
    def serve(session: rapace.RpcSession) -> None:
        rapace.register_services(session, CalculatorImpl(), EchoImpl("echo:"))

    async def main() -> None:
        async with service_env(twin, kind, serve=serve) as env:
            calc = rapace.client(Calculator, env.client, timeout=5.0)
            echo = rapace.client(Echo, env.client, timeout=5.0)
            got = await asyncio.gather(calc.add(1, 2), echo.echo("x"), calc.divide(1, 4))
            assert got == [3, "echo:x", 0.25]
            assert [n async for n in await calc.countdown(2)] == [2, 1, 0]
            with pytest.raises(Unimplemented):
                await rapace.client(Lab, env.client, timeout=5.0).ping()

    run_kind(kind, main())


class CalcAndEcho(CalculatorImpl, EchoImpl):
    """One object implementing two services."""

    def __init__(self) -> None:
        EchoImpl.__init__(self, "both:")


@pytest.mark.parametrize("kind", KINDS)
def test_one_implementation_of_two_services(twin: Any, kind: str) -> None:
    async def main() -> None:
        async with service_env(
            twin, kind, serve=lambda s: rapace.register_services(s, CalcAndEcho())
        ) as env:
            assert await rapace.client(Calculator, env.client).add(20, 22) == 42
            assert await rapace.client(Echo, env.client).echo("y") == "both:y"

    run_kind(kind, main())


def test_a_method_id_served_twice_on_a_session_is_refused() -> None:
    async def main() -> None:
        a, _b = rapace.mem_pair()
        session = rapace.RpcSession(a)
        with pytest.raises(ValueError, match=f"{0x193FA158:#010x}"):
            rapace.register_services(session, CalculatorImpl(), CalculatorImpl())
        router = rapace.ServiceRouter(session)
        router.add(EchoImpl())
        with pytest.raises(ValueError, match="already served"):
            router.add(CalcAndEcho())
        session.close()

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_callback_from_server_to_client_over_the_same_connection(twin: Any, kind: str) -> None:
    async def main() -> None:
        async with service_env(
            twin,
            kind,
            serve=serve_lab,
            client_serve=lambda s: rapace.register_services(s, EchoImpl("client:")),
        ) as env:
            lab = rapace.client(Lab, env.client, timeout=5.0)
            assert await lab.relay("hi") == "relayed:client:hi"
            results = await asyncio.gather(*(lab.relay(str(i)) for i in range(50)))
            assert results == [f"relayed:client:{i}" for i in range(50)]
            assert env.client.pending_channel_ids() == []
            assert env.server.pending_channel_ids() == []

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_callback_to_a_client_that_serves_nothing_is_unimplemented(twin: Any, kind: str) -> None:
    async def main() -> None:
        async with service_env(twin, kind, serve=serve_lab) as env:
            lab = rapace.client(Lab, env.client, timeout=5.0)
            with pytest.raises(Unimplemented):
                await lab.relay("hi")

    run_kind(kind, main())


@pytest.mark.parametrize("kind", KINDS)
def test_rich_types_round_trip(twin: Any, kind: str) -> None:
    async def main() -> None:
        async with service_env(
            twin, kind, serve=lambda s: rapace.register_services(s, GeometryImpl())
        ) as env:
            geo = rapace.client(Geometry, env.client, timeout=5.0)
            back = await geo.echo(DRAWING)
            assert back == DRAWING
            assert back is not DRAWING
            assert isinstance(back.shapes[0], Circle) and isinstance(back.shapes[2], Blank)
            assert back.color is Color.GREEN
            assert tuple(back.origin) == (-32768, 32767)

            bare = Drawing("", [], None, {}, None, 0.0, (0, 0), [])
            assert await geo.echo(bare) == bare

            assert await geo.paint(Color.BLUE, None) is Color.BLUE
            table = {"a": Point(1, 2), "b": Point(-1, -2)}
            assert await geo.lookup(["b", "x", "a"], table) == [Point(-1, -2), None, Point(1, 2)]
            assert await geo.lookup([], {}) == []
            bounds = await geo.bounds(DRAWING.shapes)
            assert bounds is not None and tuple(bounds) == (Point(-3, -4), Point(5, 6))
            assert await geo.bounds([Blank()]) is None
            assert [s async for s in await geo.shapes(DRAWING)] == DRAWING.shapes

            with pytest.raises(PostcardError):
                await geo.echo(Drawing("x", [], None, {}, None, 0.0, (40000, 0), []))

    run_kind(kind, main())


def test_session_core_is_the_twin(twin: Any) -> None:
    """Sanity: the sessions the end-to-end tests build run on the twin under test."""

    async def main() -> None:
        async with session_pair(twin) as p:
            assert type(p.client.frames.chunk(1, b"")) is twin.frame.Frame
            assert isinstance(p.server._demux, twin.demux.Demux)
            assert isinstance(p.client._demux, twin.demux.Demux)

    run(main())


# Names only the exec'd definitions (``define``) use.
_USED_IN_DEFINITIONS = (AsyncGenerator,)


def test_errors_name_the_method_by_service_and_method(twin: Any) -> None:
    """Typed clients and routers name their methods in the session's errors and logs."""

    @rapace.service
    class Slow:
        async def wait(self) -> None: ...
        async def take(self, n: rapace.u8) -> None: ...

    stuck = asyncio.Event()

    class SlowImpl(Slow):
        async def wait(self) -> None:
            await stuck.wait()

        async def take(self, n: int) -> None:
            return None

    async def main() -> None:
        async with session_pair(twin) as p:
            rapace.register_services(p.server, SlowImpl())
            slow = rapace.client(Slow, p.client, timeout=0.05)
            with pytest.raises(rapace.DeadlineExceeded) as timed_out:
                await slow.wait()
            assert str(timed_out.value).startswith("Slow.wait (0x")
            method_id = compute_method_id("Slow", "take")
            with pytest.raises(rapace.InvalidArgument, match=r"^Slow\.take: "):
                await p.client.call(p.client.next_channel_id(), method_id, b"\xff\xff")
            stuck.set()

    run(main())
