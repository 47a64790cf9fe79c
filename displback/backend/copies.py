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
* **Global**: ``total`` worker threads (default: the CPUs this process may use) take copies
  from one FIFO queue, so at most ``total`` run at once — more threads than cores only share
  memory bandwidth worse.
* **Per guest**: a guest domain runs at most ``per_guest`` copies at once (default 1), whatever
  its number of devices and connectors. Its other copies wait in its own list, outside the
  queue, and the one that takes a freed slot goes to the queue's end: the queue holds at most
  ``per_guest`` copies of each guest and the threads serve guests in turn. A copy waits at
  most for one round of the other guests' copies, however many connectors a guest floods.

The hand-off
------------
Each frame of a copy-mode connector is one hand-off, and its cost on the event loop is the
loop's share of every copy: with ``trio.to_thread.run_sync`` (a limiter, trio's thread cache,
the result sent back through the entry queue) ≈ 45 µs per copy on the development VM, which
on 2 cores left the second copy thread too little of the machine to copy 1.7 × the frames
of one (issue 12 goal 4). Here the loop puts the job in a :class:`queue.SimpleQueue` and
parks the task; the worker runs the copy and reschedules the task with
``TrioToken.run_sync_soon``: ≈ 15 µs. The caller sleeps once per copy: the guest's turn is
kept by plain counters under the workers' lock (a worker that ends a copy queues the
guest's next one itself), not by a ``trio.CapacityLimiter``, whose acquisition costs the
loop a scheduling pass of its own. A copy-mode frame does not even park a task:
:meth:`CopyWorkers.submit` hands the outcome to a callback on the loop, which flips to the
copy in that same hand-back (:mod:`displback.backend.connector`). Threads start when there
is work no idle thread will take and end after :data:`IDLE_SECONDS` without work, or when
the daemon stops (:meth:`CopyWorkers.close`). A copy whose thread cannot be started fails
its caller and is never made later.

Cancellation
------------
A copy that has started is never abandoned: its caller waits until the thread returns, even
when cancelled (the cancellation is delivered at the caller's next checkpoint). The caller
keeps the source and target memory mapped until :meth:`CopyWorkers.run` returns (see
``GuestFramebuffer`` in :mod:`displback.backend.buffers`), so no thread ever touches memory
that was unmapped under it. A copy still waiting for its guest's slot or in the queue is
simply not started.

One :class:`CopyWorkers` serves the whole daemon: the backend makes it with the configured
``copy_workers`` threads (default: the CPUs this process may use) and hands it to every
guest's buffer store. A store made without one (tests of the store alone) takes
:func:`default_copy_workers`, one per trio run.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import outcome
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
    """One guest domain's share: its jobs in the queue or running (at most ``per_guest``),
    and its jobs waiting for one of those slots, in order."""

    __slots__ = ("active", "running", "waiting")

    def __init__(self) -> None:
        self.active = 0  # jobs queued or running (each holds one of the guest's slots)
        self.running = 0
        self.waiting: collections.deque[_Job] = collections.deque()


class _Job:
    """One copy: waiting for its guest's slot, queued, running, done or cancelled; ``done``
    is called with its outcome on the event loop."""

    __slots__ = ("copy", "domid", "done", "guest", "state", "token")

    def __init__(
        self,
        copy: Callable[[], Any],
        domid: int,
        guest: _Guest,
        done: Callable[[outcome.Outcome[Any]], object],
    ) -> None:
        self.copy = copy
        self.domid = domid
        self.guest = guest
        self.done = done
        self.token = trio.lowlevel.current_trio_token()
        self.state = _WAITING


_WAITING, _QUEUED, _RUNNING, _CANCELLED = "waiting", "queued", "running", "cancelled"

#: Put in the queue by :meth:`CopyWorkers.close`: the thread that takes it ends.
_STOP: Any = object()

#: A worker thread ends after this long without a copy to make.
IDLE_SECONDS = 10.0


class CopyWorkers:
    """Runs copies in worker threads: ``total`` at once, ``per_guest`` of them per guest."""

    def __init__(self, total: int | None = None, *, per_guest: int = 1) -> None:
        total = available_cores() if total is None else total
        if total < 1 or per_guest < 1:
            raise ValueError(f"copy slots must be at least 1, not {total} (per guest {per_guest})")
        self.total = total
        self.per_guest = min(per_guest, total)
        # Everything below changes in the worker threads too: under the lock.
        self._lock = threading.Lock()
        self._guests: dict[int, _Guest] = {}
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0  # threads waiting for a job
        self._queued = 0  # jobs put but not yet taken by a thread
        self._copies = 0
        self._running = 0
        self._most_running = 0
        self._most_per_guest = 0

    @property
    def stats(self) -> CopyStats:
        return CopyStats(self._copies, self._running, self._most_running, self._most_per_guest)

    @property
    def threads(self) -> int:
        """Worker threads alive now (at most ``total``)."""
        return self._threads

    async def run(self, domid: int, copy: Callable[[], T]) -> T:
        """Run ``copy()`` in a worker thread on behalf of guest ``domid``; return its result.

        The calling task sleeps once, until the copy is done: a slot of its guest and a
        thread are found for it without waking it. Cancelled before a thread took it, the
        copy does not run; once running it is waited for (see the module docstring).
        """
        task = trio.lowlevel.current_task()
        job = self._put(domid, copy, functools.partial(trio.lowlevel.reschedule, task))

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.SUCCEEDED if self._withdraw(job) else (
                trio.lowlevel.Abort.FAILED  # running: wait for it
            )

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def submit(
        self, domid: int, copy: Callable[[], T], done: Callable[[outcome.Outcome[T]], object]
    ) -> None:
        """Run ``copy()`` in a worker thread on behalf of guest ``domid``, without a task
        waiting for it: ``done(outcome)`` is called on the event loop once it ran.

        For a caller that goes on in a callback (a copy-mode frame's flip is started by the
        copy's own wake-up, no task hop). ``done`` runs in trio's callback context and must
        not raise; a copy submitted is never withdrawn (its caller keeps what it reads and
        writes until ``done``). Raises if no thread could be started: the copy never runs.
        """
        self._put(domid, copy, done)

    def _put(
        self, domid: int, copy: Callable[[], Any], done: Callable[[outcome.Outcome[Any]], object]
    ) -> _Job:
        """A job for ``copy``, queued or waiting for its guest's slot, with a thread for it;
        raises (the job withdrawn) when no thread could be started for it."""
        with self._lock:
            guest = self._guests.get(domid)
            if guest is None:
                guest = self._guests[domid] = _Guest()
            job = _Job(copy, domid, guest, done)
            if guest.active < self.per_guest:
                guest.active += 1
                self._enqueue(job)
            else:
                guest.waiting.append(job)
        try:
            self._start_threads()
        except BaseException:
            # The caller gets the error and goes on: its copy must never run later.
            if self._withdraw(job):
                raise
            # (Already taken by a thread alive before: it completes as usual.)
        return job

    def _enqueue(self, job: _Job) -> None:
        """Put ``job``, holding a slot of its guest, in the threads' queue (lock held)."""
        job.state = _QUEUED
        self._queued += 1
        self._queue.put(job)

    def _withdraw(self, job: _Job) -> bool:
        """Cancel ``job`` unless a thread took it; True if cancelled (it will never run)."""
        with self._lock:
            if job.state is _WAITING:
                job.guest.waiting.remove(job)
            elif job.state is _QUEUED:
                self._slot_freed(job)  # the thread that takes it skips it
            else:
                return False
            job.state = _CANCELLED
            self._forget_if_idle(job)
        return True

    def _slot_freed(self, job: _Job) -> None:
        """``job`` no longer holds its guest's slot: the guest's next waiting job takes it
        (at the end of the queue: the guests are served in turn). Lock held."""
        guest = job.guest
        guest.active -= 1
        if guest.waiting:
            guest.active += 1
            self._enqueue(guest.waiting.popleft())

    def _forget_if_idle(self, job: _Job) -> None:
        guest = job.guest
        if guest.active == 0 and not guest.waiting and self._guests.get(job.domid) is guest:
            del self._guests[job.domid]

    def _start_threads(self) -> None:
        """Start threads while queued jobs outnumber idle threads, up to ``total``."""
        while True:
            with self._lock:
                if self._queued <= self._idle or self._threads >= self.total:
                    return
                self._threads += 1
                self._idle += 1  # counted idle until it takes a job: one thread per job
            try:
                threading.Thread(target=self._work, name="displback-copy", daemon=True).start()
            except BaseException:
                with self._lock:
                    self._threads -= 1
                    self._idle -= 1
                raise

    def close(self) -> None:
        """The daemon stops: every thread ends once the copies queued before are made (run
        after the last caller is gone; a later :meth:`run` would start threads again)."""
        with self._lock:
            threads = self._threads
        for _ in range(threads):
            self._queue.put(_STOP)

    def _work(self) -> None:
        """A worker thread: take jobs until none came for :data:`IDLE_SECONDS` or
        :meth:`close` asked it to end."""
        while True:
            try:
                job: _Job | None = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                job = None
            with self._lock:
                if job is None or job is _STOP:
                    if self._queued > self._idle - 1:
                        continue  # a job was put counting on this thread: take it
                    self._idle -= 1
                    self._threads -= 1
                    return
                self._queued -= 1
                if job.state is _CANCELLED:
                    continue
                self._idle -= 1
                job.state = _RUNNING
                guest = job.guest
                guest.running += 1
                self._running += 1
                self._most_running = max(self._most_running, self._running)
                self._most_per_guest = max(self._most_per_guest, guest.running)
            result = outcome.capture(job.copy)
            with self._lock:
                self._running -= 1
                guest.running -= 1
                self._copies += 1
                self._idle += 1
                self._slot_freed(job)
                self._forget_if_idle(job)
            # (RunFinishedError: the run ended under the copy; nobody waits for it.)
            with contextlib.suppress(trio.RunFinishedError):
                job.token.run_sync_soon(job.done, result)


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
