"""The README's TLS snippet (``tests/test_readme.py`` checks the README shows it verbatim;
``.ci/run`` type-checks it with ``mypy --strict``)."""

from __future__ import annotations

import os
import ssl

import rapace


def on_session(session: rapace.RpcSession) -> None:
    """Install the services of each session here (rapace.register_services)."""


def authorize(peer: rapace.Peer) -> bool:
    """Runs before the session reads a frame: admit mTLS clients by certificate name."""
    return peer.common_name in {"billing", "reports"}


async def main() -> None:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain("server.pem")  # the server's key and certificate chain
    server_tls.load_verify_locations("clients-ca.pem")  # mutual TLS: the clients' CA
    server_tls.verify_mode = ssl.CERT_REQUIRED
    server = await rapace.serve(
        on_session, "tls://0.0.0.0:9000", ssl=server_tls, authorize=authorize
    )

    client_tls = ssl.create_default_context(cafile="server-ca.pem")
    client_tls.load_cert_chain("billing.pem")
    async with rapace.connect("tls://rpc.internal:9000", ssl=client_tls) as session:
        assert session.peer is not None and session.peer.certificate is not None  # verified

    # A Unix socket: its file is 0o600 unless mode= says otherwise; the kernel names the peer.
    local = await rapace.serve(
        on_session, "unix:/run/app/rpc.sock", mode=0o660, authorize=lambda p: p.uid == os.getuid()
    )
    for each in (server, local):
        await each.shutdown()
