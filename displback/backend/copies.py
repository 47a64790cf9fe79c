"""Copy-mode frame copies in worker threads: bounded for the daemon, shared fairly by guests.

Why threads
-----------
In copy mode every SET_CONFIG and PG_FLIP copies the guest's frame into a display-owned
buffer: up to 32 MiB (4095×2047×32 bpp) per flip, a guest's choice. Run on the event loop, one
guest flipping such frames on several connectors delays every other guest's flips (measured:
an honest guest's flip rate cut by 42 %). numpy releases the GIL while it copies, so the copy
runs in a worker thread and the loop goes on serving everyone else meanwhile.

Bounds and fairness
-------------------
* **Global**: at most ``total`` copies run at once (default: the CPUs this process may use),
  through one :class:`trio.CapacityLimiter` — more threads than cores only share memory
  bandwidth worse.
* **Per guest**: a guest domain runs at most ``per_guest`` copies at once (default 1), whatever
  its number of devices and connectors. Its other copies wait on its own limiter and do not
  queue for the global one, so the global queue holds at most ``per_guest`` copies of each
  guest; trio's limiters wake their waiters in FIFO order, so the global slots go round-robin
  between guests. A copy waits at most for one round of the other guests' copies, however
  many connectors a guest floods.

Cancellation
------------
A copy that has started is never abandoned: ``trio.to_thread.run_sync`` keeps the caller
waiting until its thread returns, even when the caller is cancelled. The caller keeps the
source and target memory mapped until :meth:`CopyWorkers.run` returns (see
``GuestFramebuffer`` in :mod:`displback.backend.buffers`), so no thread ever touches memory
that was unmapped under it. A copy still waiting for its slot is simply not started.

One :class:`CopyWorkers` serves the whole daemon: the backend makes it with the configured
``copy_workers`` threads (default: the CPUs this process may use) and hands it to every
guest's buffer store. A store made without one (tests of the store alone) takes
:func:`default_copy_workers`, one per trio run.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

__all__ = [
    "CopyStats",
    "CopyWorkers",
    "available_cores",
    "default_copy_workers",
    "set_default_copy_workers",
]

T = TypeVar("T")


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class CopyStats:
    """Copies done since start, and the most that ran at once for one guest and in all."""

    copies: int
    running: int
    most_running: int
    most_running_per_guest: int


class _Guest:
    """One guest domain's share: its limiter and how many copies it has running or waiting."""

    __slots__ = ("limiter", "running", "users")

    def __init__(self, slots: int) -> None:
        self.limiter = trio.CapacityLimiter(slots)
        self.users = 0  # copies of this guest running or waiting (the entry lives while > 0)
        self.running = 0


class CopyWorkers:
    """Runs copies in worker threads: ``total`` at once, ``per_guest`` of them per guest."""

    def __init__(self, total: int | None = None, *, per_guest: int = 1) -> None:
        total = available_cores() if total is None else total
        if total < 1 or per_guest < 1:
            raise ValueError(f"copy slots must be at least 1, not {total} (per guest {per_guest})")
        self.total = total
        self.per_guest = min(per_guest, total)
        self._limiter = trio.CapacityLimiter(total)
        self._guests: dict[int, _Guest] = {}
        self._copies = 0
        self._running = 0
        self._most_running = 0
        self._most_per_guest = 0
        self._counting = threading.Lock()  # the counters change in the worker threads

    @property
    def stats(self) -> CopyStats:
        return CopyStats(self._copies, self._running, self._most_running, self._most_per_guest)

    async def run(self, domid: int, copy: Callable[[], T]) -> T:
        """Run ``copy()`` in a worker thread on behalf of guest ``domid``; return its result.

        Waits for a slot of the guest, then for a global one. Cancelled while waiting, the
        copy does not run; once running it is waited for (see the module docstring).
        """
        guest = self._guests.get(domid)
        if guest is None:
            guest = self._guests[domid] = _Guest(self.per_guest)
        guest.users += 1
        try:
            async with guest.limiter:
                return await trio.to_thread.run_sync(
                    self._counted, guest, copy, limiter=self._limiter
                )
        finally:
            guest.users -= 1
            if guest.users == 0:
                del self._guests[domid]

    def _counted(self, guest: _Guest, copy: Callable[[], T]) -> T:
        with self._counting:
            guest.running += 1
            self._running += 1
            self._most_running = max(self._most_running, self._running)
            self._most_per_guest = max(self._most_per_guest, guest.running)
        try:
            return copy()
        finally:
            with self._counting:
                self._running -= 1
                guest.running -= 1
                self._copies += 1


_WORKERS: trio.lowlevel.RunVar[CopyWorkers] = trio.lowlevel.RunVar("displback_copy_workers")


def default_copy_workers() -> CopyWorkers:
    """The daemon's copy workers: one per trio run, sized to the CPUs (made on first use)."""
    try:
        return _WORKERS.get()
    except LookupError:
        workers = CopyWorkers()
        _WORKERS.set(workers)
        return workers


def set_default_copy_workers(workers: CopyWorkers) -> None:
    """Make ``workers`` the daemon's copy workers for the rest of this trio run (before any
    copy: buffer stores take the default on their first copy)."""
    _WORKERS.set(workers)
