"""The clock of the backend's per-request bookkeeping: cheap to read where a clock is dear.

A request's rate limit and a flip's age need a monotonic clock read for every request and
every flip, for which a few milliseconds of resolution are plenty (a guest's request rate;
its 3 s frame-done timeout). ``time.monotonic`` reads ``CLOCK_MONOTONIC``, which the vDSO serves
without a system call only when the kernel's clock source allows it; in a Xen PV Dom0 (the
``xen`` clock source) every read is a system call, a trap through the hypervisor. Measured
in the nested Dom0 of ``make bench-vm``, a system call inside a wake-up costs as much as
about a hundred Python calls (bench/vm_costs.py). ``CLOCK_MONOTONIC_COARSE`` is the same
clock at the kernel tick's resolution (1–10 ms), read from the vDSO's data page by every
kernel, whatever its clock source: no system call anywhere.

Timeouts and deadlines stay on trio's clock (its ``current_time``): this is only for counts
and rates that a tick of error does not change.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

__all__ = ["coarse_monotonic"]

#: ``CLOCK_MONOTONIC_COARSE`` of Linux (the ``time`` module has no name for it).
CLOCK_MONOTONIC_COARSE = 6


def _pick() -> Callable[[], float]:
    try:
        time.clock_gettime(CLOCK_MONOTONIC_COARSE)
    except OSError:  # not Linux: the fine clock, which is what there is
        return time.monotonic
    return functools.partial(time.clock_gettime, CLOCK_MONOTONIC_COARSE)  # (no Python frame)


#: Seconds on the monotonic clock, read without a system call (see the module docstring).
coarse_monotonic: Callable[[], float] = _pick()
