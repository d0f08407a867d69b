"""Log lines a peer can trigger, at most one per second per kind, counting what was skipped.

A peer that floods bad frames, or opens many bad connections, must not control the log
volume of the process it talks to.
"""

from __future__ import annotations

import logging
import math
from time import monotonic as _clock  # tests replace it

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """One kind of log line: logged at most once per ``interval`` seconds, to ``logger``
    (the logger of the module that owns it: ``rapace.session``, ``rapace.transport``...;
    ``rapace`` itself if none is given)."""

    __slots__ = ("_interval", "_last", "_level", "_logger", "_skipped")

    def __init__(
        self,
        level: int = logging.WARNING,
        interval: float = 1.0,
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        self._logger = logger if logger is not None else logging.getLogger("rapace")
        self._level = level
        self._interval = interval
        self._last = -math.inf
        self._skipped = 0

    def __call__(self, message: str, *args: object) -> bool:
        """Log ``message % args`` unless one was logged less than ``interval`` ago; say
        whether it was (a caller may tell the peer at the same pace)."""
        now = _clock()
        if now - self._last < self._interval:
            self._skipped += 1
            return False
        skipped, self._skipped = self._skipped, 0
        self._last = now
        logger = self._logger
        if logger.isEnabledFor(self._level):
            suffix = f" ({skipped} more since the last warning)" if skipped else ""
            logger.log(self._level, message + "%s", *args, suffix)
        return True
