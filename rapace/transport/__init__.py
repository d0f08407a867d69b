"""Transports: how frames move between two peers.

A transport sends frames (``await send_frame(frame)``, or ``try_send_frame`` when that
needs no waiting) and pushes every frame it receives to its one sink (the session, as in
the Rust implementation) in batches, from the event loop's own callbacks, so the receive
path costs no ``await`` per frame (``attach(sink)``).
"""

from __future__ import annotations

from rapace.transport.base import FrameSink, Transport, TransportClosed
from rapace.transport.mem import MemTransport, mem_pair

__all__ = ["FrameSink", "MemTransport", "Transport", "TransportClosed", "mem_pair"]
