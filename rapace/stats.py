"""``SessionStats``: what one session did with the work its peer sent it, counted.

Plain integers, updated as frames are routed; read them for diagnostics, tests and
metrics. ``notifications_dropped`` stays 0 unless a peer overruns every bound while this
side cannot stop reading (it has calls of its own waiting for answers).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SessionStats"]


@dataclass(slots=True)
class SessionStats:
    """Counters of one session (requests include notifications)."""

    requests_admitted: int = 0
    """Requests whose handler started (at once or after waiting their turn)."""
    requests_queued: int = 0
    """Requests that waited for a free handler slot before they started."""
    requests_refused: int = 0
    """Requests answered with an error without running (overload, shutdown, no dispatcher)."""
    requests_cancelled: int = 0
    """Requests the peer cancelled (``CancelChannel``) while they ran or waited to run."""
    requests_expired: int = 0
    """Requests whose deadline passed before or while they ran (answered ``DeadlineExceeded``)."""
    notifications_dropped: int = 0
    """Notifications that could be neither run nor queued (never silently: logged)."""
    frames_skipped_oversized: int = 0
    """Incoming frames over the maximum payload size, skipped without being buffered."""
    pings_dropped: int = 0
    """Pings of the peer left unanswered: too many pongs already waited for it to read."""
