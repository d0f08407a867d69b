"""Who a server lets in: TLS handshakes, the ``authorize`` hook, Unix socket permissions,
and a warning for a server anyone on the network can reach.

``serve()`` does the TLS handshake of each accepted connection itself (``loop.start_tls``)
rather than letting the event loop do it, so that a failed or stalled handshake (a
plain client, garbage, an untrusted client certificate, a peer that sends nothing) is
logged with its reason and the peer's address, rate-limited, where the loop would drop
it silently. Nothing of a connection reaches a session before it is admitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, cast

from rapace.peer import Peer, printable_address
from rapace.ratelimit import RateLimitedLog

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_SOCKET_MODE",
    "Authorize",
    "TlsAccepting",
    "bind_unix_socket",
    "check_authorize",
    "client_tls",
    "log_refusal",
    "server_tls",
    "tls_handshake",
    "tls_hint",
    "warn_if_exposed",
]

logger = logging.getLogger("rapace")

DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
"""Seconds a TLS handshake may take, and then ``authorize`` to answer, before the
connection is closed (asyncio's own handshake default is 60 s: long for a peer that
holds a connection without saying anything)."""

DEFAULT_SOCKET_MODE: Final = 0o600
"""Permissions of a Unix socket file ``serve()`` creates: its owner only (connecting
needs write permission on the file; under the usual umask anyone could)."""

Authorize = Callable[[Peer], bool | Awaitable[bool]]
"""``serve(authorize=...)``: plain or async, gets the connection's ``Peer`` before its
session reads a frame; anything but ``True`` (False, or raising) refuses it."""

_handshake_log = RateLimitedLog()
"""Failed TLS handshakes, at most one line a second (a scanner must not flood the log)."""

_refused_log = RateLimitedLog()
"""Connections ``authorize`` refused, at most one line a second."""


class TlsAccepting(asyncio.Protocol):
    """The protocol of a TCP connection a TLS server accepted: it takes the socket out
    of the loop's plain transport before that reads a byte (reading starts only after
    ``connection_made``, on asyncio's loop and on uvloop), and hands it to
    ``on_connected`` for the handshake (``tls_handshake``)."""

    def __init__(self, on_connected: Callable[[socket.socket], None]) -> None:
        self._on_connected = on_connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        try:
            own: socket.socket = transport.get_extra_info("socket").dup()
        except OSError as exc:  # out of file descriptors, say
            _handshake_log("cannot take a TLS connection: %s", exc)
            transport.abort()
            return
        transport.abort()  # closes the loop's copy only: the connection lives on in ours
        own.setblocking(False)
        self._on_connected(own)


async def tls_handshake(
    sock: socket.socket,
    protocol: asyncio.Protocol,
    context: ssl.SSLContext,
    timeout: float,
) -> bool:
    """The server side of a TLS handshake on ``sock``, then ``protocol`` on top of it
    (its ``connection_made`` called): True, or False (logged, closed) if it failed."""
    try:
        peer = printable_address(sock.getpeername())
    except OSError as exc:  # gone already
        peer = f"a peer that went away ({exc})"
    loop = asyncio.get_running_loop()
    try:
        await loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=context, ssl_handshake_timeout=timeout
        )
    except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
        _handshake_log("TLS handshake with %s failed: %s", peer, _describe(exc))
        sock.close()
        return False
    return True


async def check_authorize(authorize: Authorize, peer: Peer, timeout: float) -> str | None:
    """Ask ``authorize`` about ``peer``: None if admitted, else why not (for the log)."""
    try:
        async with asyncio.timeout(timeout):
            verdict = authorize(peer)
            if inspect.isawaitable(verdict):
                verdict = await verdict
    except TimeoutError:
        return f"authorize did not answer within {timeout:g} s"
    except Exception as exc:
        return f"authorize raised {exc!r}"
    if verdict is not True:
        return f"authorize returned {verdict!r}"
    return None


def log_refusal(peer: Peer, reason: str) -> None:
    """Log (rate-limited) that ``peer`` was refused, and why."""
    _refused_log("refused rapace connection from %s: %s", peer, reason)


def bind_unix_socket(path: str, mode: int) -> socket.socket:
    """A Unix socket bound at ``path`` with permissions ``mode``, not yet listening.

    The mode is set between ``bind`` and ``listen``: a connection attempt meanwhile is
    refused, so no client can get in while the file still has the umask's permissions.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    try:
        os.chmod(path, mode)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)  # ours, just made: no file with the wrong mode is left behind
        raise
    sock.setblocking(False)
    return sock


def warn_if_exposed(address: object, socknames: Iterable[Any], *, protected: bool) -> bool:
    """Warn once (per server) when it listens beyond loopback with neither TLS nor an
    ``authorize`` hook (``protected``): every service on it is open to the network.
    Returns whether it warned."""
    if protected:
        return False
    exposed = [name for name in socknames if not _is_loopback(name)]
    if not exposed:
        return False
    logger.warning(
        "rapace server %s listens on %s without TLS or an authorize hook: anyone who "
        "can reach it may call every service on it (pass ssl= and/or authorize= to "
        "serve(), or listen on 127.0.0.1)",
        address,
        ", ".join(printable_address(name) for name in exposed),
    )
    return True


def client_tls(
    kind: str, context: ssl.SSLContext | None, server_hostname: str | None
) -> ssl.SSLContext | None:
    """The context a client handshakes with on an address of ``kind`` (None: plain TCP,
    or not ours to do), checked before connecting."""
    if kind in ("ws", "wss"):
        if server_hostname is not None:
            raise ValueError("server_hostname is for tls:// (a wss:// URL names its host)")
        return None
    if kind in ("unix", "socket"):
        if context is not None or server_hostname is not None:
            raise ValueError("TLS (ssl=, server_hostname=) is for tcp:// and tls:// addresses")
        return None
    if kind == "tls" and context is None:
        return ssl.create_default_context()
    if context is None and server_hostname is not None:
        raise ValueError("server_hostname needs TLS: a tls:// address or ssl=SSLContext")
    _check_context(context, server=False)
    return context


def tls_hint(exc: OSError, tls: ssl.SSLContext | None) -> OSError:
    """A handshake the server cut short says nothing by itself: say what it means."""
    if tls is not None and isinstance(exc, ConnectionResetError | ssl.SSLEOFError):
        return ConnectionResetError(
            errno.ECONNRESET,
            "the server closed the connection during the TLS handshake (a server without "
            "TLS on this port does, or one that refused this client's certificate)",
        )
    return exc


def server_tls(kind: str, context: ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The context a server on an address of ``kind`` handshakes with (None: plain TCP,
    or not ours to do), checked before listening."""
    if kind in ("ws", "wss"):
        return None  # the WebSocket server checks its own
    if kind == "unix" and context is not None:
        raise ValueError("ssl= is for tcp:// and tls:// servers, not unix: ones")
    if kind == "tls" and context is None:
        raise ValueError("a tls:// server needs ssl=SSLContext (with its certificate chain)")
    _check_context(context, server=True)
    return context


def _check_context(context: object, *, server: bool) -> None:
    """Refuse, before listening or connecting, a context for the other side (every
    handshake would fail with it)."""
    if context is None:
        return
    if not isinstance(context, ssl.SSLContext):
        raise TypeError(f"ssl= must be an ssl.SSLContext, not {type(context).__name__}")
    wrong = ssl.PROTOCOL_TLS_CLIENT if server else ssl.PROTOCOL_TLS_SERVER
    if context.protocol == wrong:
        purpose = "CLIENT_AUTH" if server else "SERVER_AUTH"
        side = "server" if server else "client"
        raise ValueError(
            f"ssl= is a context for the other side: a {side} needs one made by "
            f"ssl.create_default_context(ssl.Purpose.{purpose})"
        )


def _is_loopback(sockname: Any) -> bool:
    if not isinstance(sockname, tuple):
        return True  # not an IP socket
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(str(sockname[0]).partition("%")[0]).is_loopback
    return False


def _describe(exc: BaseException) -> str:
    """An SSL error's own words (its reason code and text); a bare reset as what it
    usually means here."""
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ssl.SSLEOFError):
        return (
            "the client closed the connection in the middle of the handshake (a client "
            "that does not trust this server's certificate does)"
        )
    return str(exc) or type(exc).__name__
