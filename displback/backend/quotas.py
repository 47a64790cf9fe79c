"""Per-guest resource limits, so one guest cannot exhaust Dom0's memory, grants or CPU.

Every DBUF_CREATE charges buffers, mapped pages and directory pages against its guest's
:class:`Quota`; every request draws from a token bucket. Exceeding a limit answers that one
request with an error (``-ENOMEM`` for resources, ``-EINVAL`` for shapes no quota could
allow) and the guest keeps working. Defaults derive from the guest's connectors: enough for
triple buffering at every connector's resolution plus one framebuffer of the largest size
the Linux frontend can create.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from displback.protocol.constants import (
    EINVAL,
    ENOMEM,
    LINUX_MAX_HEIGHT,
    LINUX_MAX_WIDTH,
    pages_for,
)
from displback.protocol.pagedir import dir_pages_for

__all__ = ["Limits", "Quota", "QuotaExceeded", "TokenBucket"]

_MAX_BPP = 32
MIN_REQUESTS_PER_SECOND = 20.0


class QuotaExceeded(Exception):
    """A request would pass a limit: ``errno`` is what to answer (positive), ``limit`` which."""

    def __init__(self, limit: str, message: str, errno: int = ENOMEM) -> None:
        super().__init__(message)
        self.limit = limit
        self.errno = errno


@dataclass(frozen=True, slots=True)
class Limits:
    """What one guest may hold at once, and how fast it may ask."""

    max_buffers: int
    max_pages_per_buffer: int
    max_total_pages: int
    max_dir_pages: int
    requests_per_second: float
    request_burst: int

    def __post_init__(self) -> None:
        for name in ("max_buffers", "max_pages_per_buffer", "max_total_pages", "request_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"limit {name} must be at least 1")
        if self.max_dir_pages < 1:
            raise ValueError("limit max_dir_pages must be at least 1")
        # The guest waits 3 s per request and may queue up to 32 on a ring: a slower rate
        # would time out requests of a guest that did nothing wrong.
        if not self.requests_per_second >= MIN_REQUESTS_PER_SECOND:
            raise ValueError(
                f"requests_per_second must be at least {MIN_REQUESTS_PER_SECOND} "
                "(32 queued requests within the guest's 3 s timeout)"
            )

    @classmethod
    def for_connectors(cls, resolutions: Iterable[tuple[int, int]]) -> Limits:
        """Safe defaults for a guest whose connectors have these resolutions."""
        sizes = list(resolutions) or [(LINUX_MAX_WIDTH, LINUX_MAX_HEIGHT)]
        largest_fb = pages_for(LINUX_MAX_WIDTH * LINUX_MAX_HEIGHT * _MAX_BPP // 8)
        per_screen = [pages_for(w * h * _MAX_BPP // 8) for w, h in sizes]
        total = 3 * sum(per_screen) + largest_fb
        return cls(
            max_buffers=max(16, 8 * len(sizes)),
            max_pages_per_buffer=largest_fb,
            max_total_pages=total,
            max_dir_pages=dir_pages_for(largest_fb),
            requests_per_second=2000.0,
            request_burst=400,
        )


class Quota:
    """Accounting of one guest's buffers against its :class:`Limits`."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.buffers = 0
        self.pages = 0

    def check_buffer(self, npages: int) -> None:
        """Raise :class:`QuotaExceeded` unless a buffer of ``npages`` pages may be created."""
        lim = self.limits
        if dir_pages_for(npages) > lim.max_dir_pages:
            raise QuotaExceeded(
                "max_dir_pages",
                f"buffer needs {dir_pages_for(npages)} directory pages, limit {lim.max_dir_pages}",
                EINVAL,
            )
        if npages > lim.max_pages_per_buffer:
            raise QuotaExceeded(
                "max_pages_per_buffer",
                f"buffer of {npages} pages exceeds the per-buffer limit {lim.max_pages_per_buffer}",
                EINVAL,
            )
        if self.buffers + 1 > lim.max_buffers:
            raise QuotaExceeded(
                "max_buffers", f"guest already holds {self.buffers} buffers (limit)"
            )
        if self.pages + npages > lim.max_total_pages:
            raise QuotaExceeded(
                "max_total_pages",
                f"{self.pages} + {npages} pages exceed the guest's limit {lim.max_total_pages}",
            )

    def charge(self, npages: int) -> None:
        """Account a created buffer (after :meth:`check_buffer` passed)."""
        self.check_buffer(npages)
        self.buffers += 1
        self.pages += npages

    def release(self, npages: int) -> None:
        """Give back a destroyed buffer's share."""
        if self.buffers < 1 or self.pages < npages:
            raise RuntimeError("quota released more than it was charged")
        self.buffers -= 1
        self.pages -= npages


class TokenBucket:
    """Requests per second with a burst allowance; the clock is injectable for tests."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def take(self) -> bool:
        """Spend one token if there is one; ``False`` means: refuse this request."""
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def seconds_until_token(self) -> float:
        """How long until :meth:`take` would succeed (0 if now)."""
        missing = 1.0 - self._tokens
        return 0.0 if missing <= 0 else math.ceil(missing / self.rate * 1000) / 1000
