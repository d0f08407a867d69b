"""``python -m rapace bench``: run as users run it, in a subprocess, with tiny counts.

The figures are not checked for speed here (that is the benchmark's job), only for being
there, positive, and measured on the cores their rows name.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import rapace
from rapace.benchmark import driver
from rapace.runner import uvloop_factory

# Enough to run every code path; the whole run takes a few seconds.
TINY = ["--calls=50", "--inflight-calls=640", "--tunnel-mib=2", "--rounds=1"]
TWO_ROUNDS = [*TINY[:-1], "--rounds=2"]
TRANSPORTS = (
    ({"unix", "tcp"} if hasattr(socket, "AF_UNIX") else {"tcp"})
    | ({"tls"} if importlib.util.find_spec("trustme") else set())
    | ({"ws"} if importlib.util.find_spec("picows") else set())
    | ({"shm"} if sys.platform == "linux" else set())
)


def run_cli(*args: str, tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m rapace ...`` importing the same rapace as this test process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(rapace.__file__).resolve().parent.parent)
    env["TMPDIR"] = str(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "rapace", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    """One quick two-round run with a JSON report: (report, stdout, its temp dir)."""
    tmp_path = tmp_path_factory.mktemp("bench")
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--quick", *TWO_ROUNDS, f"--json={out}", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result.stdout, tmp_path


def test_every_row_has_positive_figures(bench_run: tuple[dict[str, Any], str, Path]) -> None:
    report, _, _ = bench_run
    expected_builds = {"raw", "python"} | (
        {"cython"} if rapace.IMPLEMENTATION == "cython" else set()
    )
    rows = {(row["transport"], row["implementation"]): row for row in report["results"]}
    assert set(rows) == {(t, b) for t in TRANSPORTS for b in expected_builds}
    for (transport, build), row in rows.items():
        for name in ("p50_us", "p99_us", "calls_per_s", "tunnel_bytes_per_s"):
            assert row[name] > 0, (transport, build, name)
            assert row["ratio_to_floor"][name.removesuffix("_us")] > 0
        assert row["p99_us"] >= row["p50_us"]
        if build == "raw":
            assert set(row["ratio_to_floor"].values()) == {1.0}
        assert len(row["rounds"]) == 2
        for each_round in row["rounds"]:
            client = each_round["client"]
            assert client["sequential"]["calls"] == 50
            assert client["inflight"]["calls"] == 640
            assert client["tunnel"]["bytes"] == 2 * 1024 * 1024


def test_the_cost_of_tls_over_tcp_is_reported(
    bench_run: tuple[dict[str, Any], str, Path],
) -> None:
    """Each build's tls row over its tcp row, in the JSON and as the third table."""
    report, stdout, _ = bench_run
    if "tls" not in TRANSPORTS:
        assert report["tls_vs_tcp"] == []
        return
    rows = {(row["transport"], row["implementation"]): row for row in report["results"]}
    costs = {cost["implementation"]: cost for cost in report["tls_vs_tcp"]}
    assert set(costs) == {build for transport, build in rows if transport == "tls"}
    for build, cost in costs.items():
        tls, tcp = rows[("tls", build)], rows[("tcp", build)]
        assert cost["p50"] == pytest.approx(tls["p50_us"] / tcp["p50_us"])
        assert cost["calls_per_s"] == pytest.approx(tls["calls_per_s"] / tcp["calls_per_s"])
        assert cost["tunnel_bytes_per_s"] > 0
    third_table = stdout.split("\n\n")[3]
    assert third_table.startswith("tls vs tcp")
    assert len(third_table.splitlines()) == 2 + len(costs)


def test_children_report_the_core_their_row_names(
    bench_run: tuple[dict[str, Any], str, Path],
) -> None:
    report, _, _ = bench_run
    for row in report["results"]:
        if row["implementation"] == "raw":
            continue
        for pair in row["rounds"]:
            assert pair["server"]["implementation"] == row["implementation"]
            assert pair["client"]["implementation"] == row["implementation"]
            assert pair["server"]["pid"] != pair["client"]["pid"]


@pytest.mark.c_extensions
def test_compiled_rows_are_measured_when_compiled(
    bench_run: tuple[dict[str, Any], str, Path],
) -> None:
    report, stdout, _ = bench_run
    assert rapace.IMPLEMENTATION == "cython"
    compiled = [row for row in report["results"] if row["implementation"] == "cython"]
    assert {row["transport"] for row in compiled} == TRANSPORTS
    assert report["machine"]["compiled_available"] is True
    assert [t["target"] for t in report["targets"]]  # the targets were checked
    assert "cython, cython" in stdout


def test_table_and_machine_info(bench_run: tuple[dict[str, Any], str, Path]) -> None:
    report, stdout, tmp_path = bench_run
    for label in ("raw floor", "pure", "p50 µs", "calls/s (64 in flight)", "tunnel MB/s"):
        assert label in stdout
    machine = report["machine"]
    assert machine["nproc"] >= 1
    assert machine["python"] == f"{platform.python_implementation()} {platform.python_version()}"
    assert machine["implementation"] == rapace.IMPLEMENTATION
    assert machine["loop"] == ("uvloop" if uvloop_factory() is not None else "asyncio")
    # Sockets and stderr files lived in a temporary directory that is gone now.
    assert not list(tmp_path.glob("rapace-bench-*"))


def test_help(tmp_path: Path) -> None:
    result = run_cli("bench", "--help", tmp_path=tmp_path)
    assert result.returncode == 0
    for option in ("--quick", "--json", "--calls", "--tunnel-mib", "--rounds"):
        assert option in result.stdout
    top = run_cli("--help", tmp_path=tmp_path)
    assert top.returncode == 0
    assert "bench" in top.stdout
    assert "(internal) the benchmark's server process" in top.stdout  # listed as internal


@pytest.mark.parametrize(
    "args",
    [["bench", "--no-such-option"], ["bench", "--calls=0"], ["bench", "--rounds=x"], []],
)
def test_bad_usage_exits_non_zero(args: list[str], tmp_path: Path) -> None:
    result = run_cli(*args, tmp_path=tmp_path)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_a_failed_child_fails_the_run_and_is_cleaned_up(tmp_path: Path) -> None:
    # No server can start and report within a microsecond.
    result = run_cli("bench", "--quick", *TINY, "--timeout=0.000001", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "rapace bench: error:" in result.stderr
    assert "did not report within" in result.stderr
    assert not list(tmp_path.glob("rapace-bench-*"))


def test_the_table_shows_spreads_and_hides_the_targets(
    bench_run: tuple[dict[str, Any], str, Path],
) -> None:
    """Two rounds: every figure has its [lowest, highest] round next to it, a legend says
    how to read them, and the project's targets are not printed unless asked for."""
    report, stdout, _ = bench_run
    assert "MISSED" not in stdout and "targets (compiled" not in stdout
    assert "in square brackets, the lowest and highest round" in " ".join(stdout.split())
    for row in report["results"]:
        for name, (low, high) in row["spread"].items():
            assert low <= high
            best = row[name]
            assert best == (low if name.endswith("_us") else high)
        assert isinstance(row["unreliable"], bool)
    table = stdout.split("\n\n")[1]
    assert table.count("\u2013") == 4 * len(report["results"])


def test_targets_are_printed_when_asked(bench_run: tuple[dict[str, Any], str, Path]) -> None:
    """``--targets``: the report (rebuilt from the run's rounds, without rerunning it)
    ends with the targets; one round shows no spread and says so."""
    report, _, _ = bench_run
    builds = {b.key: b for b in (driver._FLOOR, driver._COMPILED, driver._PURE)}
    rows = []
    for result in report["results"]:
        row = driver._Row(result["transport"], builds[result["implementation"]])
        row.rounds = [(r["server"], r["client"]) for r in result["rounds"][:1]]
        rows.append(row)
    driver._add_ratios(rows)
    options = driver.BenchOptions(
        driver.QUICK, quick=True, json_path=None, timeout=60, rounds=1, show_targets=True
    )
    compiled = (rapace.IMPLEMENTATION == "cython", "")
    text = driver._report(rows, options, compiled)
    assert "\u2013" not in text.split("\n\n")[1]  # one round: no [lowest-highest]
    assert "One round: no spread is shown" in " ".join(text.split())
    if compiled[0]:
        assert "targets (compiled; Unix socket unless marked ws or shm):" in text
        assert "shm: calls/s at least 1.5x the Unix socket's" in text
    else:  # a pure build: no compiled row to check
        assert "not checked, the compiled core was not measured" in text


@pytest.mark.skipif(sys.platform != "linux", reason="shared memory: Linux only")
def test_shm_row_has_its_blocking_floors(bench_run: tuple[dict[str, Any], str, Path]) -> None:
    """The shm floor is two blocking processes over the segment; the pipe's p50 is
    reported with it."""
    report, stdout, _ = bench_run
    floor = next(
        r for r in report["results"] if r["transport"] == "shm" and r["implementation"] == "raw"
    )
    for pair in floor["rounds"]:
        assert pair["client"]["pipe_p50_us"] > 0
    assert "two blocking processes over a pipe" in " ".join(stdout.split())


def test_the_legend_explains_the_tls_rows_only_when_there_are_some() -> None:
    """A newcomer's ``pip install -e .`` has no trustme, so no tls row: no word of one."""
    assert "tls rows" in " ".join(driver._legend(2, tls=True))
    assert "tls" not in " ".join(driver._legend(2, tls=False)).lower()
