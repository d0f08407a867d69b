"""Transports: how frames move between two peers.

A transport sends frames (``await send_frame(frame)``) and receives them. The session is
its only receiver (as in the Rust implementation). Receiving comes in two shapes:

- pull: ``await recv_frame()``, one frame at a time, raising ``TransportClosed`` at the end;
- push (optional): ``attach(sink)`` hands the session every frame as it arrives, in
  batches, from the event loop's own callbacks, so the receive path costs no ``await``
  per frame. A transport that offers it returns True from ``attach``.
"""

from __future__ import annotations

from rapace.transport.base import FrameSink, Transport, TransportClosed
from rapace.transport.mem import MemTransport, mem_pair

__all__ = ["FrameSink", "MemTransport", "Transport", "TransportClosed", "mem_pair"]
