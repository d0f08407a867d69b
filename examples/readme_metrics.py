"""The README's observability snippet (``tests/test_readme.py`` checks the README shows it
verbatim; ``.ci/run`` type-checks it with ``mypy --strict``)."""

from __future__ import annotations

import logging

import prometheus_client

import rapace
from rapace.metrics import PrometheusCollector


def on_session(session: rapace.RpcSession) -> None:
    """Install the services of each session here (rapace.register_services)."""


async def main() -> None:
    logging.getLogger("rapace.transport").setLevel(logging.ERROR)  # quieter bad peers
    server = await rapace.serve(on_session, "tcp://127.0.0.1:7000")
    PrometheusCollector(server)  # rapace_calls_served_total{method,status}, ...
    prometheus_client.start_http_server(9100)  # scrapes from its own thread: fine
    totals = server.metrics()  # the same numbers as a plain object
    print(totals.calls_served.get(("Calculator.add", "Ok"), 0), totals.sessions_open)
    await server.shutdown()
