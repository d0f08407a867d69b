"""``python -m rapace bench``: run every (transport, build) pair in its own processes.

For each transport (Unix socket, TCP loopback, TLS on TCP loopback with ``rapace[bench]``'s
``trustme``, WebSocket with ``rapace[ws]``) and each build (the raw floor, the compiled
core, the pure core) the driver starts a server process, then a client process that
measures against it, each as ``python -m rapace bench-server|bench-client``. Separate
processes, as in production: a client and a server sharing one process (and one GIL and
one loop) would measure a different thing. The pure build runs in processes started with
``RAPACE_NO_EXTENSIONS=1``; each child reports the core it really runs, and a child that
is not running the build its row claims fails the run rather than mislabel a figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import socket
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import rapace
from rapace.benchmark import tls
from rapace.benchmark.children import Kind
from rapace.benchmark.workload import CHUNK_SIZE, CONCURRENCY, PAYLOAD_SIZE, BenchError, Workload

__all__ = ["FULL", "QUICK", "BenchOptions", "run_bench"]

QUICK: Final = Workload(calls=2000, inflight_calls=20000, tunnel_mib=64)
"""``--quick``: the whole run stays well under 30 s on a 2-core machine."""

FULL: Final = Workload(calls=20000, inflight_calls=200000, tunnel_mib=512)
"""The default run: ten times the samples, steadier figures."""

_STOP_GRACE: Final = 5.0
"""Seconds a server gets to exit after its stdin closes, before it is killed."""

_STDERR_TAIL: Final = 2000
"""Characters of a failed child's stderr quoted in the error message."""


SPREAD_LIMIT: Final = 0.25
"""Rounds of one figure that disagree by more than this share of the best are marked."""


@dataclass(frozen=True)
class BenchOptions:
    workload: Workload
    quick: bool
    json_path: Path | None
    timeout: float
    """Seconds any one child may take to report before the run is abandoned."""
    rounds: int
    """How many times every row is measured; the table shows each figure's best round."""
    show_targets: bool = False
    """Print the project's targets (met / missed) after the table (``--targets``)."""


@dataclass(frozen=True)
class _Build:
    """One row kind: the floor, or rapace on one core."""

    key: Literal["raw", "cython", "python"]
    label: str
    kind: Kind


_FLOOR = _Build("raw", "raw floor", "floor")
_COMPILED = _Build("cython", "compiled", "rpc")
_PURE = _Build("python", "pure", "rpc")


@dataclass
class _Row:
    """One (transport, build) row: every round's reports, and the figures of its best round.

    Another process on the machine can only slow a round down, never speed it up, so each
    figure is the best any round achieved (the reasoning behind ``timeit``'s minimum).
    """

    transport: str
    build: _Build
    rounds: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    """(server report, client report) per round."""
    ratios: dict[str, float] = field(default_factory=dict)

    def _figures(self, section: str, name: str) -> list[float]:
        return [float(client[section][name]) for _, client in self.rounds]

    def spreads(self) -> list[tuple[float, float]]:
        """(lowest, highest) over the rounds of each figure, in the table's column order."""
        figures = [
            self._figures("sequential", "p50_us"),
            self._figures("sequential", "p99_us"),
            self._figures("inflight", "calls_per_s"),
            self._figures("tunnel", "bytes_per_s"),
        ]
        return [(min(f), max(f)) for f in figures]

    def unreliable(self) -> list[bool]:
        """Per figure: whether its rounds disagree by more than ``SPREAD_LIMIT`` of the
        best. A quiet machine repeats itself; a spread that wide means load elsewhere."""
        if len(self.rounds) < 2:
            return [False] * 4
        return [
            (high - low) / (low if i < 2 else high) > SPREAD_LIMIT
            for i, (low, high) in enumerate(self.spreads())
        ]

    @property
    def p50_us(self) -> float:
        return min(self._figures("sequential", "p50_us"))

    @property
    def p99_us(self) -> float:
        return min(self._figures("sequential", "p99_us"))

    @property
    def calls_per_s(self) -> float:
        return max(self._figures("inflight", "calls_per_s"))

    @property
    def tunnel_bytes_per_s(self) -> float:
        return max(self._figures("tunnel", "bytes_per_s"))

    @property
    def cores(self) -> str:
        """The cores the children reported (checked to be the row's own in every round)."""
        server, client = self.rounds[0]
        return f"{server['implementation']}, {client['implementation']}"

    def to_json(self) -> dict[str, Any]:
        return {
            "transport": self.transport,
            "implementation": self.build.key,
            "label": self.build.label,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "calls_per_s": self.calls_per_s,
            "tunnel_bytes_per_s": self.tunnel_bytes_per_s,
            "ratio_to_floor": self.ratios,
            "spread": dict(
                zip(
                    ("p50_us", "p99_us", "calls_per_s", "tunnel_bytes_per_s"),
                    ([low, high] for low, high in self.spreads()),
                    strict=True,
                )
            ),
            "unreliable": any(self.unreliable()),
            "rounds": [{"server": server, "client": client} for server, client in self.rounds],
        }


def compiled_status() -> tuple[bool, str]:
    """Whether children can run the compiled core, and why not when they cannot.

    The driver's own selection decides: ``RAPACE_NO_EXTENSIONS`` in its environment, a
    non-CPython interpreter or a compiled module that does not import all mean pure only.
    """
    if rapace.IMPLEMENTATION == "cython":
        return True, "available"
    if os.environ.get("RAPACE_NO_EXTENSIONS"):
        return False, "disabled by RAPACE_NO_EXTENSIONS"
    if sys.implementation.name != "cpython":
        return False, f"not available on {sys.implementation.name}"
    try:
        for module in ("rapace._frame", "rapace._demux"):
            importlib.import_module(module)
    except ImportError as exc:
        return False, f"not available in this install ({exc})"
    return False, "not selected by rapace._impl"


def _child_env(build: _Build) -> dict[str, str]:
    """The environment of a child: the driver's, importing the very same rapace package."""
    env = dict(os.environ)
    package_root = str(Path(rapace.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    if build.key == "python":
        env["RAPACE_NO_EXTENSIONS"] = "1"
    elif build.key == "cython":
        env.pop("RAPACE_NO_EXTENSIONS", None)
    return env


class _Child:
    """One child process; its stderr goes to a file, quoted if it fails."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, stderr: Path) -> None:
        self.name = name
        self.process = process
        self.stderr = stderr

    async def read_report(self, timeout: float) -> dict[str, Any]:
        """The child's one JSON line; a child that dies or stalls first is a failure."""
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            raise BenchError(f"{self.name} did not report within {timeout:g} s") from None
        if not line:
            await self.process.wait()
            raise self.failure("exited without reporting")
        try:
            report: dict[str, Any] = json.loads(line)
        except ValueError:
            raise self.failure(f"reported something that is not JSON: {line[:200]!r}") from None
        return report

    async def wait_ok(self, timeout: float) -> None:
        """Wait for a clean exit (status 0); anything else is a failure."""
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise BenchError(f"{self.name} did not exit within {timeout:g} s") from None
        if code != 0:
            raise self.failure(f"exited with status {code}")

    def stderr_text(self) -> str:
        try:
            return self.stderr.read_text(errors="replace").strip()
        except OSError:
            return ""

    def failure(self, what: str) -> BenchError:
        text = self.stderr_text()
        if len(text) > _STDERR_TAIL:
            text = "..." + text[-_STDERR_TAIL:]
        detail = f"; its stderr:\n{text}" if text else " (no stderr output)"
        return BenchError(f"{self.name} {what}{detail}")

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


class _Children:
    """Starts children and guarantees none outlives the run, whatever ends it."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._started: list[_Child] = []
        self._paths = 0
        self.env: dict[str, str] = {}
        """Added to every child's environment (the tls row's certificate files)."""

    def new_path(self, suffix: str) -> Path:
        """A fresh name for a socket or a stderr file, in a directory removed at the end."""
        self._paths += 1
        return self._directory / f"{self._paths:03d}{suffix}"

    def new_segment_path(self) -> Path:
        """A fresh shared-memory segment name: on tmpfs (``/dev/shm``) where there is one.
        The server that creates it removes it."""
        self._paths += 1
        shm = Path("/dev/shm")
        if shm.is_dir() and os.access(shm, os.W_OK):
            return shm / f"rapace-bench-{os.getpid()}-{self._paths:03d}.shm"
        return self._directory / f"{self._paths:03d}.shm"

    async def start(
        self, name: str, args: list[str], env: dict[str, str], *, stdin_pipe: bool
    ) -> _Child:
        stderr_path = self.new_path(".stderr")
        with stderr_path.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rapace",
                *args,
                stdin=asyncio.subprocess.PIPE if stdin_pipe else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env=env,
                # Its own session: a Ctrl-C reaches the driver only, which then cleans up.
                start_new_session=True,
            )
        child = _Child(name, process, stderr_path)
        self._started.append(child)
        return child

    async def kill_all(self) -> None:
        for child in self._started:
            await child.kill()


@contextlib.asynccontextmanager
async def _child_processes() -> AsyncIterator[_Children]:
    with tempfile.TemporaryDirectory(prefix="rapace-bench-") as directory:
        children = _Children(Path(directory))
        try:
            yield children
        finally:
            await children.kill_all()


def _check_core(child: _Child, report: dict[str, Any], build: _Build) -> None:
    if build.kind == "rpc" and report.get("implementation") != build.key:
        raise BenchError(
            f"{child.name} runs the {report.get('implementation')!r} core, not {build.key!r}: "
            "refusing to report it under the wrong label"
        )


async def _run_pair(
    children: _Children, transport: str, build: _Build, options: BenchOptions
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One server and one client for one row of the table."""
    env = {**_child_env(build), **children.env}
    where = f"{transport}/{build.key}"
    address = {
        "unix": f"unix:{children.new_path('.sock')}",
        "tcp": "tcp://127.0.0.1:0",
        "tls": "tls://127.0.0.1:0",
        "ws": "ws://127.0.0.1:0/rapace",
        "shm": f"shm:{children.new_segment_path()}",
    }[transport]
    server = await children.start(
        f"the {where} server",
        ["bench-server", f"--kind={build.kind}", f"--address={address}"],
        env,
        stdin_pipe=True,
    )
    server_report = await server.read_report(options.timeout)
    _check_core(server, server_report, build)
    client = await children.start(
        f"the {where} client",
        [
            "bench-client",
            f"--kind={build.kind}",
            f"--address={server_report['address']}",
            *options.workload.to_args(),
        ],
        env,
        stdin_pipe=False,
    )
    client_report = await client.read_report(options.timeout)
    _check_core(client, client_report, build)
    await client.wait_ok(options.timeout)
    assert server.process.stdin is not None
    server.process.stdin.close()
    await server.wait_ok(_STOP_GRACE)
    for child in (server, client):
        if noise := child.stderr_text():
            print(f"note: {child.name} wrote to stderr:\n{noise}", file=sys.stderr)
    return server_report, client_report


def _add_ratios(rows: list[_Row]) -> None:
    """Each figure over the same transport's floor figure."""
    floors = {row.transport: row for row in rows if row.build is _FLOOR}
    for row in rows:
        floor = floors[row.transport]
        row.ratios = {
            "p50": row.p50_us / floor.p50_us,
            "p99": row.p99_us / floor.p99_us,
            "calls_per_s": row.calls_per_s / floor.calls_per_s,
            "tunnel_bytes_per_s": row.tunnel_bytes_per_s / floor.tunnel_bytes_per_s,
        }


@dataclass(frozen=True)
class _Target:
    """One of the project's targets for the compiled core over a Unix socket."""

    text: str
    value: Callable[[_Row], float]
    limit: float
    at_most: bool
    shown: Callable[[float], str]

    def check(self, row: _Row) -> dict[str, Any]:
        value = self.value(row)
        met = value <= self.limit if self.at_most else value >= self.limit
        return {
            "target": self.text,
            "value": value,
            "limit": self.limit,
            "met": met,
            "shown": self.shown(value),
        }


_TARGETS: Final = (
    _Target(
        "sequential p50 at most 1.25x the floor's",
        lambda row: row.ratios["p50"],
        1.25,
        True,
        "{:.2f}x".format,
    ),
    _Target(
        "at least 100,000 calls/s with 64 in flight",
        lambda row: row.calls_per_s,
        100_000.0,
        False,
        "{:,.0f} calls/s".format,
    ),
    _Target(
        "calls/s at least 30% of the floor's",
        lambda row: row.ratios["calls_per_s"],
        0.30,
        False,
        "{:.0%}".format,
    ),
    _Target(
        "tunnel at least 1 GB/s",
        lambda row: row.tunnel_bytes_per_s,
        1e9,
        False,
        lambda value: f"{value / 1e9:.2f} GB/s",
    ),
    _Target(
        "tunnel at least 40% of the floor's bytes/s",
        lambda row: row.ratios["tunnel_bytes_per_s"],
        0.40,
        False,
        "{:.0%}".format,
    ),
)


_WS_TARGETS: Final = (
    _Target(
        "ws: sequential p50 at most 1.3x the raw WebSocket floor's",
        lambda row: row.ratios["p50"],
        1.3,
        True,
        "{:.2f}x".format,
    ),
    _Target(
        "ws: calls/s at least 40% of the raw WebSocket floor's",
        lambda row: row.ratios["calls_per_s"],
        0.40,
        False,
        "{:.0%}".format,
    ),
)


def _find(rows: list[_Row], transport: str, build: _Build) -> _Row | None:
    return next((r for r in rows if r.transport == transport and r.build is build), None)


def _targets(rows: list[_Row]) -> list[dict[str, Any]]:
    """The targets checked, or nothing when the compiled core was not measured."""
    checked: list[dict[str, Any]] = []
    for transport, targets in (("unix", _TARGETS), ("ws", _WS_TARGETS)):
        row = _find(rows, transport, _COMPILED)
        if row is not None:
            checked += [target.check(row) for target in targets]
    return checked + _shm_targets(rows)


def pipe_p50_us(floor: _Row) -> float:
    """The blocking pipe ping-pong's p50 (the shm floor reports it), best round."""
    return min(float(client["pipe_p50_us"]) for _, client in floor.rounds)


def _shm_targets(rows: list[_Row]) -> list[dict[str, Any]]:
    """Shared memory against the Unix socket and the pipe floor of the same run."""
    shm = _find(rows, "shm", _COMPILED)
    unix = _find(rows, "unix", _COMPILED)
    floor = _find(rows, "shm", _FLOOR)
    if shm is None or unix is None or floor is None:
        return []
    checks = (
        ("shm: sequential p50 at most 0.5x the Unix socket's", shm.p50_us / unix.p50_us, 0.5),
        (
            "shm: sequential p50 at most 3x the blocking pipe ping-pong's",
            shm.p50_us / pipe_p50_us(floor),
            3.0,
        ),
        ("shm: calls/s at least 1.5x the Unix socket's", shm.calls_per_s / unix.calls_per_s, -1.5),
    )
    return [
        {
            "target": text,
            "value": value,
            "limit": abs(limit),
            "met": value >= -limit if limit < 0 else value <= limit,
            "shown": f"{value:.2f}x",
        }
        for text, value, limit in checks
    ]


def _tls_costs(rows: list[_Row]) -> list[dict[str, Any]]:
    """What TLS costs each build: its tls row's figures over its tcp row's (same run)."""
    costs = []
    for row in rows:
        if row.transport != "tls":
            continue
        plain = next((r for r in rows if r.transport == "tcp" and r.build is row.build), None)
        if plain is None:
            continue
        costs.append(
            {
                "implementation": row.build.key,
                "label": row.build.label,
                "p50": row.p50_us / plain.p50_us,
                "p99": row.p99_us / plain.p99_us,
                "calls_per_s": row.calls_per_s / plain.calls_per_s,
                "tunnel_bytes_per_s": row.tunnel_bytes_per_s / plain.tunnel_bytes_per_s,
                "unreliable": any(row.unreliable()) or any(plain.unreliable()),
            }
        )
    return costs


def _tls_table(rows: list[_Row]) -> list[str]:
    """The cost of TLS, as the third table (nothing without a tls row)."""
    costs = _tls_costs(rows)
    if not costs:
        return []
    lines: list[tuple[str, ...]] = [("tls vs tcp", "build", "p50", "p99", "calls/s", "tunnel", "")]
    for cost in costs:
        lines.append(
            (
                "tls",
                cost["label"],
                f"{cost['p50']:.2f}x",
                f"{cost['p99']:.2f}x",
                f"{cost['calls_per_s']:.0%}",
                f"{cost['tunnel_bytes_per_s']:.0%}",
                "unreliable (it or its tcp row): rerun" if cost["unreliable"] else "",
            )
        )
    return ["", *_render(lines, {2, 3, 4, 5})]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _machine(rows: list[_Row], compiled: tuple[bool, str]) -> dict[str, Any]:
    loops = sorted({report["loop"] for row in rows for pair in row.rounds for report in pair})
    return {
        "cpu_model": _cpu_model(),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "loop": ", ".join(loops),
        "implementation": rapace.IMPLEMENTATION,
        "compiled_available": compiled[0],
        "compiled_note": compiled[1],
        "rapace_version": rapace.__version__,
    }


def _render(lines: list[tuple[str, ...]], numeric: set[int]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def render(line: tuple[str, ...]) -> str:
        return "  ".join(
            text.rjust(w) if i in numeric else text.ljust(w)
            for i, (text, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [render(lines[0]), rule, *(render(line) for line in lines[1:])]


def _table(rows: list[_Row]) -> str:
    """The figures, each with its spread over the rounds; then the ratios to the floor."""
    header = (
        "transport",
        "build",
        "p50 µs",
        "p99 µs",
        f"calls/s ({CONCURRENCY} in flight)",
        "tunnel MB/s",
        "core (server, client)",
    )
    lines: list[tuple[str, ...]] = [header]
    scales = (1.0, 1.0, 1.0, 1e-6)
    formats = ("{:.1f}", "{:.1f}", "{:,.0f}", "{:,.0f}")
    best_of = (
        lambda r: r.p50_us,
        lambda r: r.p99_us,
        lambda r: r.calls_per_s,
        lambda r: r.tunnel_bytes_per_s,
    )
    for row in rows:
        cells = []
        for i, (low, high) in enumerate(row.spreads()):
            text = formats[i].format(best_of[i](row) * scales[i])
            if len(row.rounds) > 1:
                lo, hi = (formats[i].format(v * scales[i]) for v in (low, high))
                text += f" [{lo}\u2013{hi}]"  # an en dash
            if row.unreliable()[i]:
                text += " ?"
            cells.append(text)
        core = "-" if row.build is _FLOOR else row.cores
        lines.append((row.transport, row.build.label, *cells, core))
    out = _render(lines, {2, 3, 4, 5})

    ratio_lines: list[tuple[str, ...]] = [
        ("vs floor", "build", "p50", "p99", "calls/s", "tunnel", "")
    ]
    floors = {row.transport: row for row in rows if row.build is _FLOOR}
    for row in rows:
        if row.build is _FLOOR:
            continue
        r = row.ratios
        shaky = any(row.unreliable()) or any(floors[row.transport].unreliable())
        flag = "unreliable (it or its floor): rerun" if shaky else ""
        ratio_lines.append(
            (
                row.transport,
                row.build.label,
                f"{r['p50']:.2f}x",
                f"{r['p99']:.2f}x",
                f"{r['calls_per_s']:.0%}",
                f"{r['tunnel_bytes_per_s']:.0%}",
                flag,
            )
        )
    return "\n".join([*out, "", *_render(ratio_lines, {2, 3, 4, 5}), *_tls_table(rows)])


def _report(rows: list[_Row], options: BenchOptions, compiled: tuple[bool, str]) -> str:
    machine = _machine(rows, compiled)
    w = options.workload
    out = [
        f"rapace {machine['rapace_version']} bench{' --quick' if options.quick else ''}: "
        "server and client in separate processes",
        f"machine: {machine['cpu_model']}, {machine['nproc']} CPUs, {machine['python']}, "
        f"loop: {machine['loop']}",
        "compiled core: "
        + ("measured" if compiled[0] else f"{compiled[1]}: NOT MEASURED, pure build only"),
        f"workload: {w.calls:,} sequential calls and {w.inflight_calls:,} calls "
        f"{CONCURRENCY} in flight ({PAYLOAD_SIZE}-byte payloads), {w.tunnel_mib} MiB in "
        f"{CHUNK_SIZE // 1024} KiB chunks",
        "",
        _table(rows),
        "",
        *_shm_floors(rows),
        *_legend(options.rounds, tls=any(row.transport == "tls" for row in rows)),
    ]
    if not options.show_targets:
        return "\n".join(out)
    out.append("")
    targets = _targets(rows)
    if not targets:
        out.append(
            "targets (compiled, Unix socket): not checked, the compiled core was not measured"
        )
    else:
        out.append("targets (compiled; Unix socket unless marked ws or shm):")
        for t in targets:
            status = "met" if t["met"] else "MISSED"
            out.append(f"  {status:6}  {t['target']}: {t['shown']}")
    return "\n".join(out)


def _shm_floors(rows: list[_Row]) -> list[str]:
    """What the shm row's floor is, with the pipe's figure next to it."""
    floor = _find(rows, "shm", _FLOOR)
    if floor is None:
        return []
    text = (
        "The shm raw floor is two blocking processes over the segment (futex waits, no "
        f"event loop): p50 {floor.p50_us:.1f} µs; two blocking processes over a pipe: "
        f"p50 {pipe_p50_us(floor):.1f} µs."
    )
    return [*textwrap.wrap(text, 88), ""]


def _legend(rounds: int, *, tls: bool) -> list[str]:
    spread = (
        f"Each figure is the best of {rounds} interleaved rounds; in square brackets, the "
        f"lowest and highest round. A figure whose rounds differ by more than "
        f"{SPREAD_LIMIT:.0%} is marked '?', and its row is unreliable: the machine was "
        "busy, so rerun on a quieter one (or with more --rounds) before comparing it."
        if rounds > 1
        else "One round: no spread is shown, so nothing says whether the machine was "
        "quiet; use --rounds 3 or more before comparing figures."
    )
    text = (
        "The raw floor is an asyncio.Protocol length-prefixed echo with the same payloads "
        "on the same loop: what the machine costs without rapace. p50/p99: sequential "
        "call latency (lower is better); calls/s and tunnel MB/s (10^6 bytes): throughput "
        "(higher is better). " + spread + " The second table is each row over its "
        "transport's floor: latency as a multiple (1.00x is the floor), throughput as a "
        "share; ratios move less between machines than the figures do. "
        + (
            "The tls rows run over TLS on TCP loopback (certificates made for the run, "
            "verified as usual); the third table is what TLS costs each build: its tls "
            "row over its tcp row. "
            if tls
            else ""
        )
        + "--targets also prints the project's own goals for the compiled core."
    )
    return textwrap.wrap(text, 88)


def _transports() -> list[str]:
    """Unix sockets where the platform has them, TCP, TLS when certificates can be made
    (``trustme``), WebSocket with rapace[ws], and shared memory on Linux (futexes,
    eventfd)."""
    transports = ["unix", "tcp"] if hasattr(socket, "AF_UNIX") else ["tcp"]
    if tls.available():
        transports.append("tls")
    if importlib.util.find_spec("picows") is not None:
        transports.append("ws")
    if sys.platform == "linux":
        transports.append("shm")
    return transports


async def _bench(options: BenchOptions) -> int:
    compiled = compiled_status()
    builds = [_FLOOR, _COMPILED, _PURE] if compiled[0] else [_FLOOR, _PURE]
    if not compiled[0]:
        print(
            f"rapace bench: compiled core {compiled[1]}; measuring the pure build only",
            file=sys.stderr,
        )
    transports = _transports()
    if "tls" not in transports:
        print(
            "rapace bench: no tls row (it needs trustme: pip install 'rapace[bench]')",
            file=sys.stderr,
        )
    rows = [_Row(transport, build) for transport in transports for build in builds]
    async with _child_processes() as children:
        if "tls" in transports:
            certificates = children.new_path("-tls")
            certificates.mkdir()
            children.env = tls.make_certificates(certificates)
        # Rounds interleave the rows, so a burst of load elsewhere hits one round of each.
        for round_number in range(1, options.rounds + 1):
            for row in rows:
                print(
                    f"rapace bench: round {round_number}/{options.rounds}: "
                    f"{row.transport} {row.build.label}",
                    file=sys.stderr,
                )
                row.rounds.append(await _run_pair(children, row.transport, row.build, options))
    _add_ratios(rows)
    print(_report(rows, options, compiled))
    if options.json_path is not None:
        document = {
            "machine": _machine(rows, compiled),
            "workload": {
                **asdict(options.workload),
                "quick": options.quick,
                "rounds": options.rounds,
                "payload_size": PAYLOAD_SIZE,
                "concurrency": CONCURRENCY,
                "chunk_size": CHUNK_SIZE,
            },
            "results": [row.to_json() for row in rows],
            "tls_vs_tcp": _tls_costs(rows),
            "targets": _targets(rows),
        }
        _write_json(options.json_path, document)
    return 0


def _write_json(path: Path, document: dict[str, Any]) -> None:
    with path.open("w") as out:
        json.dump(document, out, indent=2)
        out.write("\n")


def run_bench(options: BenchOptions) -> int:
    """Run the whole benchmark; 0 on success, 1 (with a message) when anything failed."""
    try:
        return asyncio.run(_bench(options))
    except (BenchError, OSError) as exc:
        print(f"rapace bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rapace bench: interrupted; every child was stopped", file=sys.stderr)
        return 130
