"""Who is on the other end of a connection: ``Peer``, built from the socket itself.

A server decides whom it serves from facts the kernel and the TLS layer vouch for, not
from anything the peer says in a frame: the peer's address, for a Unix socket the
process credentials the kernel records (``SO_PEERCRED``: pid, uid, gid), and for TLS the
certificate the handshake verified. ``serve(authorize=...)`` gets one before the session
reads a frame; ``RpcSession.peer`` keeps it for handlers.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = ["Peer", "PeerKind", "peer_of", "printable_address"]

PeerKind = Literal["unix", "tcp", "tls", "ws", "wss", "shm", "socket"]
"""How the peer is connected: the address kind, or ``"socket"`` for a stream socket of
another family (an inherited fd, say)."""

_CREDENTIALS: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Peer:
    """The other end of one connection, as the operating system and TLS saw it.

    ``address`` is printable (``"127.0.0.1:5000"``, ``"[::1]:5000"``, a Unix peer's own
    socket path, usually ``""`` as clients rarely bind one). ``pid``, ``uid`` and ``gid``
    are the Unix peer's credentials where the platform records them (Linux), else None.
    ``certificate`` is the peer's certificate as ``ssl.SSLSocket.getpeercert()`` decodes
    it, present only when the handshake verified it (a server with ``CERT_REQUIRED`` or
    ``CERT_OPTIONAL``, or a client); ``certificate_der`` is the same certificate's DER
    bytes, to hand to a full X.509 parser or to pin.
    """

    kind: PeerKind
    address: str
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    certificate: dict[str, Any] | None = None
    certificate_der: bytes | None = None

    @property
    def common_name(self) -> str | None:
        """The verified certificate's subject commonName (the usual name to authorize
        an mTLS client by), or None without one."""
        if self.certificate is None:
            return None
        for rdn in self.certificate.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return None

    def __str__(self) -> str:
        parts = [f"{self.kind} {self.address}" if self.address else self.kind]
        if self.pid is not None:
            parts.append(f"pid {self.pid} uid {self.uid}")
        if self.common_name is not None:
            parts.append(f"CN={self.common_name}")
        return " ".join(parts)


def peer_of(transport: Any, kind: PeerKind | None = None) -> Peer:
    """The ``Peer`` of a connected asyncio transport (asyncio's, uvloop's, or a TLS one
    over either). ``kind`` names the address kind when the caller knows it better than the
    socket does (``"ws"``); by default it follows the socket: Unix, TCP, or TLS on TCP."""
    sock = transport.get_extra_info("socket")
    family = getattr(sock, "family", None)
    ssl_object = transport.get_extra_info("ssl_object")
    certificate = der = None
    if ssl_object is not None:
        certificate = ssl_object.getpeercert() or None  # {} when it was not verified
        der = ssl_object.getpeercert(binary_form=True) if certificate is not None else None
    if kind is None:
        if family == socket.AF_UNIX:
            kind = "unix"
        elif family in (socket.AF_INET, socket.AF_INET6):
            kind = "tls" if ssl_object is not None else "tcp"
        else:
            kind = "socket"
    pid = uid = gid = None
    if family == socket.AF_UNIX:
        pid, uid, gid = _credentials(sock)
    return Peer(
        kind,
        printable_address(transport.get_extra_info("peername")),
        pid=pid,
        uid=uid,
        gid=gid,
        certificate=certificate,
        certificate_der=der,
    )


def _credentials(sock: Any) -> tuple[int | None, int | None, int | None]:
    """(pid, uid, gid) of a Unix socket's peer, from the kernel (None where unsupported)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None, None, None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, _CREDENTIALS.size)
    except (OSError, AttributeError):
        return None, None, None
    pid, uid, gid = _CREDENTIALS.unpack(raw)
    return pid, uid, gid


def printable_address(name: Any) -> str:
    """``host:port`` (IPv6 in brackets), a Unix path as it is, anything else as ``str``."""
    if isinstance(name, tuple) and len(name) >= 2:
        host = str(name[0])
        return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"
    if isinstance(name, bytes):  # an abstract Unix address
        return name.decode("utf-8", "backslashreplace")
    return "" if name is None else str(name)
