"""The ``tls`` row's certificates: made for each run (``trustme``), handed to the children.

The driver makes a throwaway CA and a server certificate for 127.0.0.1 in the run's
temporary directory and names the files in the children's environment; the server
loads its certificate, the client trusts the CA, as a real deployment would, with the
usual ciphers and full verification. Nothing about TLS is switched off to flatter it.
"""

from __future__ import annotations

import importlib.util
import os
import ssl
from pathlib import Path
from typing import Final

from rapace.benchmark.workload import BenchError

__all__ = ["available", "client_context", "make_certificates", "server_context"]

_CERT_ENV: Final = "RAPACE_BENCH_TLS_CERT"
"""The server's key and certificate chain (PEM), for the children."""

_CA_ENV: Final = "RAPACE_BENCH_TLS_CA"
"""The CA certificate the client trusts (PEM)."""


def available() -> bool:
    """Whether this install can make certificates (``trustme``, in ``rapace[bench]``)."""
    return importlib.util.find_spec("trustme") is not None


def make_certificates(directory: Path) -> dict[str, str]:
    """A fresh CA and server certificate in ``directory``: the children's environment."""
    import trustme  # noqa: PLC0415  (an optional dependency, checked by available())

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", common_name="rapace-bench")
    cert_path = directory / "tls-server.pem"
    ca_path = directory / "tls-ca.pem"
    server.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return {_CERT_ENV: str(cert_path), _CA_ENV: str(ca_path)}


def server_context() -> ssl.SSLContext:
    """The benchmark server's context, from the certificate the driver made."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(_path(_CERT_ENV))
    return context


def client_context() -> ssl.SSLContext:
    """The benchmark client's context: it trusts the driver's CA, and verifies."""
    return ssl.create_default_context(cafile=_path(_CA_ENV))


def _path(name: str) -> str:
    path = os.environ.get(name)
    if not path:
        raise BenchError(f"a tls:// benchmark child needs {name} (set by `python -m rapace bench`)")
    return path
