"""``python -m rapace``: the command line.

``call`` calls a method of a running service (``rapace.cli``), ``ping`` measures a round
trip, ``bench`` runs the cross-process benchmark and prints its table. ``bench-server``
and ``bench-client`` are the benchmark's child processes, started by ``bench`` itself
(listed as internal; run by hand to profile one side).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import rapace
from rapace import cli
from rapace.benchmark import children
from rapace.benchmark.driver import FULL, QUICK, BenchOptions, run_bench
from rapace.benchmark.workload import Workload

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _add_workload_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=_positive_int, metavar="N", help="sequential calls to time")
    parser.add_argument(
        "--inflight-calls",
        type=_positive_int,
        metavar="N",
        help="calls to make with 64 in flight",
    )
    parser.add_argument(
        "--tunnel-mib", type=_positive_int, metavar="M", help="MiB to send through the tunnel"
    )


def _workload(args: argparse.Namespace, base: Workload) -> Workload:
    return Workload(
        calls=args.calls or base.calls,
        inflight_calls=args.inflight_calls or base.inflight_calls,
        tunnel_mib=args.tunnel_mib or base.tunnel_mib,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rapace", description="rapace: multiplexed binary RPC for asyncio."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    call = commands.add_parser(
        "call",
        help="call a method of a running service and print the result as JSON",
        description=(
            "Call SERVICE.METHOD at ADDRESS. The service's declaration is imported from "
            "--service (its type hints convert --json to the wire's postcard and the "
            "answer back to JSON). A unary result is printed as one JSON line, a "
            "streaming method's items one JSON line each. Exit status: 0 done, 1 the "
            "peer answered an error, 2 a usage or connection problem."
        ),
        epilog=(
            "example: python -m rapace call unix:/tmp/rapace-calculator.sock "
            "Calculator.add --service examples/calculator.py:Calculator --json "
            '\'{"a": 2, "b": 3}\''
        ),
    )
    call.add_argument("address", metavar="ADDRESS", help="unix:/path or tcp://host:port")
    call.add_argument("method", metavar="SERVICE.METHOD", help="e.g. Calculator.add")
    call.add_argument(
        "--service",
        action="append",
        required=True,
        metavar="MODULE:CLASS",
        help="the @rapace.service declaration: pkg.mod:Class or path/file.py:Class (repeatable)",
    )
    call.add_argument(
        "--json",
        default="{}",
        metavar="JSON",
        help="the arguments: an object by name, an array in order, or a one-parameter "
        "method's value (default: {})",
    )
    call.add_argument(
        "--timeout", type=_positive_float, default=10.0, metavar="SECONDS", help="(default: 10)"
    )

    ping = commands.add_parser(
        "ping",
        help="measure round trips to a rapace peer (control-channel Ping/Pong)",
        description="Connect to ADDRESS, send Ping, print the round trip of each Pong.",
    )
    ping.add_argument("address", metavar="ADDRESS", help="unix:/path or tcp://host:port")
    ping.add_argument("--count", type=_positive_int, default=1, metavar="N", help="(default: 1)")
    ping.add_argument(
        "--timeout", type=_positive_float, default=5.0, metavar="SECONDS", help="(default: 5)"
    )

    bench = commands.add_parser(
        "bench",
        help="benchmark rapace against a raw asyncio echo, across processes",
        description=(
            "Start a server process and a client process for each transport (Unix socket, "
            "TCP loopback, TLS on TCP loopback, WebSocket) and each build (raw asyncio "
            "floor, compiled core, pure core); measure sequential call latency, calls/s "
            "with 64 in flight and tunnel throughput; print one table with every figure's "
            "ratio to the floor, and what TLS costs over plain TCP."
        ),
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help=(
            f"fewer samples, under 30 s: {QUICK.calls} sequential calls, "
            f"{QUICK.inflight_calls} in flight, {QUICK.tunnel_mib} MiB"
        ),
    )
    bench.add_argument("--json", type=Path, metavar="PATH", help="also write every figure here")
    bench.add_argument(
        "--targets",
        action="store_true",
        help="also print the project's performance targets for the compiled core, met or missed",
    )
    _add_workload_options(bench)
    bench.add_argument(
        "--rounds",
        type=_positive_int,
        metavar="N",
        help=(
            "measure every row N times, interleaved; show the best and the spread "
            "(default: 2 quick, 3 full)"
        ),
    )
    bench.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="how long one child may take before the run fails (default: 60 quick, 600 full)",
    )

    # The children, started by `bench` (listed, so that the error text's choices match).
    for name in ("bench-server", "bench-client"):
        child = commands.add_parser(
            name, help=f"(internal) the benchmark's {name.removeprefix('bench-')} process"
        )
        child.add_argument("--kind", choices=("floor", "rpc"), required=True)
        child.add_argument("--address", required=True)
        if name == "bench-client":
            _add_workload_options(child)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        options = BenchOptions(
            workload=_workload(args, QUICK if args.quick else FULL),
            quick=args.quick,
            json_path=args.json,
            timeout=args.timeout or (60.0 if args.quick else 600.0),
            rounds=args.rounds or (2 if args.quick else 3),
            show_targets=args.targets,
        )
        return run_bench(options)

    if args.command in ("call", "ping"):
        try:
            if args.command == "call":
                services = [cli.load_service(spec) for spec in args.service]
                coro = cli.call(
                    args.address, services, args.method, args.json, timeout=args.timeout
                )
            else:
                coro = cli.ping(args.address, count=args.count, timeout=args.timeout)
            rapace.run(coro)
        except (cli.UsageError, rapace.ConnectionFailed, rapace.RpcError) as exc:
            return cli.report(exc)
        return 0

    if args.command == "bench-server":
        rapace.run(children.run_server(args.kind, args.address))
    else:
        rapace.run(children.run_client(args.kind, args.address, _workload(args, QUICK)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
