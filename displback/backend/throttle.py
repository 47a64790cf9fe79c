"""How a warning a guest can cause over and over is kept to one line per interval.

A :class:`LogThrottle` lets one line through per interval and says, in the next line it lets
through, how many it held back: a flooding guest costs Dom0's log one line per interval.
May touch: nothing of displback.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["LogThrottle"]


class LogThrottle:
    """Lets one line through per ``interval`` seconds and counts the ones it held back."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = -float("inf")
        self._suppressed = 0

    def allow(self) -> int | None:
        """None: do not log now. Else log, saying how many were not logged since the last."""
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return None
        suppressed, self._suppressed = self._suppressed, 0
        self._next = now + self.interval
        return suppressed
