"""Copy-mode frame copies in worker threads: bounded for the daemon, shared fairly by guests.

Why threads
-----------
In copy mode every SET_CONFIG and PG_FLIP copies the guest's frame into a display-owned
buffer: up to 32 MiB (4095×2047×32 bpp) per flip, a guest's choice. Run on the event loop, one
guest flipping such frames on several connectors delays every other guest's flips (measured:
an honest guest's flip rate cut by 42 %). So copies run in worker threads and the loop goes on
serving everyone else meanwhile.

Bounds and fairness
-------------------
Decided on the event loop alone, so the bookkeeping takes no lock:

* **Global**: at most ``total`` copies (default: the CPUs this process may use) run at once —
  more than cores only share memory bandwidth worse. Each thread also holds the next copy
  in its line, so it never idles waiting for the loop to hand it one (at most 2 × ``total``
  copies are given to threads); the others wait in one FIFO.
* **Per guest**: a guest domain has at most ``per_guest`` copies (default 1) running or in
  that FIFO, whatever its number of devices and connectors. Its other copies wait in its own
  list, and the one that takes a freed slot goes to the FIFO's end: the guests are served in
  turn, and a copy waits at most for one round of the other guests' copies, however many
  connectors a guest floods.

Two kinds of thread
-------------------
* A frame copy (:class:`FrameCopy`: :func:`~displback.display.pixels.copy_frame`'s arguments
  as data) goes to the native copy threads of :mod:`displback.backend._copythreads`, a small
  C extension, when it is built: they never take the GIL, and hand a finished copy back
  through an eventfd that one system task per trio run waits on. Measured in the nested Xen
  VM (a PV Dom0 under TCG, where a system call costs ~100× native and every lock acquisition
  reads the clock through Xen), a Python copy thread cost the flip ~20 futex calls, ~12 clock
  reads and ~0.4 ms of thread round trip, and its Python 0.7–1 ms more than the C++ peer's
  whole copy (docs/benchmarks.md).
* Any other copy (a callable: a guest buffer's grant mapping, a frame an output keeps), and
  every copy where the extension is not built (no compiler or Python headers where displback
  was installed), runs in Python worker threads (numpy releases the GIL while it copies),
  which hand the outcome back with ``TrioToken.run_sync_soon``.

Either way the caller sleeps once per copy, or not at all: :meth:`CopyWorkers.submit` hands
the outcome to a callback on the loop, which flips to the copy in that same wake-up
(:mod:`displback.backend.connector`). Threads start when there is work no idle thread will
take and end after :data:`IDLE_SECONDS` without work, or once idle after
:meth:`CopyWorkers.close`. A copy whose thread cannot be started fails its caller and is
never made later.

The flip after the copy
-----------------------
A frame copy may come with its flip (``submit(..., flip=)``): asked when a native thread
takes the copy, the output may hand out the flip as one ioctl
(:meth:`~displback.display.interface.Output.native_flip`: a KMS plain flip), which the thread
issues right after the copy, as the C++ peer displ_be does. Then nobody needs the copy's end
at once: the thread wakes the loop only if the flip failed, or if copies are waiting for a
thread or a guest's slot (``quiet``); otherwise the copy is handed back when the flip's event
arrives (the output *settles* it first), so a copied flip costs the loop the request's
wake-up and the flip event's, not one more between them.

Cancellation
------------
A copy that has started is never abandoned: its caller waits until the thread returns, even
when cancelled (the cancellation is delivered at the caller's next checkpoint). The caller
keeps the source and target memory mapped until :meth:`CopyWorkers.run` returns (see
``GuestFramebuffer`` in :mod:`displback.backend.buffers`), so no thread ever touches memory
that was unmapped under it (a native copy also holds both buffers' exports until it is
handed back). A copy still waiting for its guest's slot or in the FIFO is simply not started.

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

from displback.display.interface import NativeFlip
from displback.display.pixels import copy_frame

try:
    from displback.backend._copythreads import CopyThreads as NativeCopyThreads
except ImportError:  # not built where displback was installed: Python threads copy frames too
    NativeCopyThreads = None  # type: ignore[assignment,misc]

__all__ = [
    "CopyStats",
    "CopyWorkers",
    "FrameCopy",
    "available_cores",
    "default_copy_workers",
    "native_copies_built",
    "native_flips_wanted",
    "set_default_copy_workers",
]

T = TypeVar("T")


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def native_copies_built() -> bool:
    """Whether the native copy threads (the C extension) are there to copy frames."""
    return NativeCopyThreads is not None


def native_copies_wanted() -> bool:
    """Whether frame copies go to the native threads by default: when they are built, unless
    ``DISPLBACK_COPY_THREADS=python`` (to compare the two, or to rule the extension out)."""
    return NativeCopyThreads is not None and os.environ.get("DISPLBACK_COPY_THREADS") != "python"


def native_flips_wanted() -> bool:
    """Whether the native threads issue the flip after a frame's copy where its output hands
    it out, unless ``DISPLBACK_COPY_THREADS=native-no-flip`` (the loop flips after the copy,
    as before: to compare the two)."""
    return os.environ.get("DISPLBACK_COPY_THREADS") != "native-no-flip"


@dataclass(frozen=True, slots=True)
class FrameCopy:
    """``copy_frame(src, src_offset, src_pitch, dst, dst_offset, dst_pitch, width_bytes,
    height)`` as data: a copy the native threads can make without Python; called, it is made
    by :func:`~displback.display.pixels.copy_frame` (the same checks and result)."""

    src: Any
    src_offset: int
    src_pitch: int
    dst: Any
    dst_offset: int
    dst_pitch: int
    width_bytes: int
    height: int

    def __call__(self) -> None:
        copy_frame(
            self.src, self.src_offset, self.src_pitch, self.dst, self.dst_offset,
            self.dst_pitch, self.width_bytes, self.height,
        )


@dataclass(frozen=True, slots=True)
class CopyStats:
    """Copies done since start, and those given to threads now (copying, or next in a
    thread's line: at most 2 × ``total``), and the most given at once for one guest and in
    all."""

    copies: int
    running: int
    most_running: int
    most_running_per_guest: int


class _Guest:
    """One guest domain's share: its jobs in the FIFO or running (at most ``per_guest``), and
    its jobs waiting for one of those slots, in order."""

    __slots__ = ("active", "running", "waiting")

    def __init__(self) -> None:
        self.active = 0  # jobs in the FIFO or running (each holds one of the guest's slots)
        self.running = 0
        self.waiting: collections.deque[_Job] = collections.deque()


class _Job:
    """One copy: waiting for its guest's slot, in the FIFO, given to a thread, running, or
    cancelled; ``done`` is called with its outcome on the event loop (of the run ``token``
    names)."""

    __slots__ = ("copy", "domid", "done", "flip", "guest", "native_flip", "skip", "state", "token")

    def __init__(
        self,
        copy: Callable[[], Any],
        domid: int,
        guest: _Guest,
        done: Callable[[outcome.Outcome[Any]], object],
        skip: Callable[[], bool] | None,
        flip: Callable[[], NativeFlip | None] | None = None,
    ) -> None:
        self.copy = copy
        self.domid = domid
        self.guest = guest
        self.done = done
        self.skip = skip
        self.flip = flip  # asked for the flip after the copy when a native thread takes it
        self.native_flip: NativeFlip | None = None  # the flip the thread issues after it
        self.token = trio.lowlevel.current_trio_token()
        self.state = _WAITING


_WAITING, _READY, _GIVEN, _RUNNING, _CANCELLED = (
    "waiting", "ready", "given", "running", "cancelled"
)


#: A worker thread ends after this long without a copy to make.
IDLE_SECONDS = 10.0


class CopyWorkers:
    """Runs copies in worker threads: ``total`` at once, ``per_guest`` of them per guest.

    ``native``: frame copies in the native threads (None: when they are built, unless the
    environment says ``DISPLBACK_COPY_THREADS=python``; True raises :class:`RuntimeError` if
    they are not built; False: Python threads for every copy). ``flips``: whether those
    threads flip after a copy submitted with its flip (None: :func:`native_flips_wanted`).
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        per_guest: int = 1,
        native: bool | None = None,
        flips: bool | None = None,
    ) -> None:
        total = available_cores() if total is None else total
        if total < 1 or per_guest < 1:
            raise ValueError(f"copy slots must be at least 1, not {total} (per guest {per_guest})")
        if native and NativeCopyThreads is None:
            raise RuntimeError("the native copy threads (displback.backend._copythreads) "
                               "are not built")
        self.total = total
        self.per_guest = min(per_guest, total)
        self._in_flight = 2 * total  # each thread copying one and holding the next
        self._guests: dict[int, _Guest] = {}
        self._ready: collections.deque[_Job] = collections.deque()  # the FIFO
        self._waiting = 0  # jobs waiting for their guest's slot
        self._running = 0
        self._copies = 0
        self._most_running = 0
        self._most_per_guest = 0
        self._python = _PythonThreads(total, self._finished)
        self._native = (
            _NativeThreads(
                total, self._finished, native_flips_wanted() if flips is None else flips
            )
            if (native_copies_wanted() if native is None else native)
            else None
        )

    @property
    def stats(self) -> CopyStats:
        return CopyStats(self._copies, self._running, self._most_running, self._most_per_guest)

    @property
    def threads(self) -> int:
        """Worker threads alive now (at most ``total`` of each kind)."""
        native = self._native.threads if self._native is not None else 0
        return self._python.threads + native

    @property
    def native(self) -> bool:
        """Whether frame copies (:class:`FrameCopy`) run in the native threads."""
        return self._native is not None

    @property
    def flips(self) -> bool:
        """Whether the native threads issue the flips handed to them after their copies."""
        return self._native is not None and self._native.flips

    async def run(
        self, domid: int, copy: Callable[[], T], *, skip: Callable[[], bool] | None = None
    ) -> T:
        """Run ``copy()`` in a worker thread on behalf of guest ``domid``; return its result.

        The calling task sleeps once, until the copy is done: a slot of its guest and a
        thread are found for it without waking it. Cancelled before a thread took it, the
        copy does not run; once running it is waited for (see the module docstring). If
        ``skip()`` is true when a thread would take it, the copy is not made and None is
        returned (nobody wants it any more).
        """
        task = trio.lowlevel.current_task()
        job = self._put(domid, copy, lambda result: trio.lowlevel.reschedule(task, result), skip)

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.SUCCEEDED if self._withdraw(job) else (
                trio.lowlevel.Abort.FAILED  # running: wait for it
            )

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def submit(
        self,
        domid: int,
        copy: Callable[[], T],
        done: Callable[[outcome.Outcome[T]], object],
        *,
        skip: Callable[[], bool] | None = None,
        flip: Callable[[], NativeFlip | None] | None = None,
    ) -> None:
        """Run ``copy()`` in a worker thread on behalf of guest ``domid``, without a task
        waiting for it: ``done(outcome)`` is called on the event loop once it ran (or was
        skipped, as in :meth:`run`).

        For a caller that goes on in a callback (a copy-mode frame's flip is started by the
        copy's own wake-up, no task hop). ``done`` runs in trio's callback context and must
        not raise; it is never called before ``submit`` returned, and a copy submitted is
        never withdrawn (its caller keeps what it reads and writes until ``done``). Raises
        if no thread could be started: the copy never runs.

        ``flip``: for a :class:`FrameCopy`, asked on the loop when a native thread takes the
        copy (not when it is skipped); a :class:`NativeFlip` it returns is issued by that
        thread right after the copy, and ``done`` then gets ``Value(True)``, or the error of
        ``NativeFlip.failed``; ``Value(None)`` when no flip was issued.
        """
        self._put(domid, copy, done, skip, flip)

    def _put(
        self,
        domid: int,
        copy: Callable[[], Any],
        done: Callable[[outcome.Outcome[Any]], object],
        skip: Callable[[], bool] | None,
        flip: Callable[[], NativeFlip | None] | None = None,
    ) -> _Job:
        """A job for ``copy``: started, in the FIFO or waiting for its guest's slot; raises
        (the job withdrawn) when no thread could be started for it."""
        guest = self._guests.get(domid)
        if guest is None:
            guest = self._guests[domid] = _Guest()
        job = _Job(copy, domid, guest, done, skip, flip)
        if guest.active < self.per_guest:
            guest.active += 1
            job.state = _READY
            self._ready.append(job)
            self._tell_threads()
            self._dispatch(job)
        else:
            guest.waiting.append(job)
            self._waiting += 1
            self._tell_threads()
        return job

    def _tell_threads(self) -> None:
        """The native threads must wake the loop at every copy's end while copies wait for a
        thread or a slot (the end frees one); else a copy whose flip they issued can wait
        until that flip lands. Told before a dispatch (what will still wait once the FIFO's
        head went to the threads), so a thread never ends the copy just given to it under the
        previous answer; a dispatch that fails leaves at most a needless wake-up."""
        native = self._native
        if native is not None:
            quiet = len(self._ready) <= self._in_flight - self._running and not self._waiting
            if quiet is not native.quiet:
                native.quiet = quiet

    def _dispatch(self, caller: _Job | None = None) -> None:
        """Give jobs from the FIFO to threads while fewer than 2 × ``total`` are. A job whose
        thread could not be started never runs: for ``caller``'s job the error is raised
        here (after the others were started), any other job's ``done`` gets it."""
        failure: BaseException | None = None
        while self._ready and self._running < self._in_flight:
            job = self._ready.popleft()
            try:
                self._start(job)
            except BaseException as exc:  # (no thread: the caller may unmap its memory)
                job.state = _CANCELLED
                self._slot_freed(job)
                self._forget_if_idle(job)
                if job is caller:
                    failure = exc
                else:
                    job.token.run_sync_soon(job.done, outcome.Error(exc))
        if failure is not None:
            raise failure

    def _start(self, job: _Job) -> None:
        """Hand ``job`` to a thread (raises if none could be started)."""
        if job.skip is not None and job.skip():
            job.token.run_sync_soon(self._finished, job, outcome.Value(None))
            job.state = _RUNNING  # (handed back as if made: no longer withdrawn)
        elif self._native is not None and type(job.copy) is FrameCopy:
            self._native.start(job)
            job.state = _RUNNING  # (the native threads' queue cannot give it back)
        else:
            job.state = _GIVEN
            self._python.start(job)
        guest = job.guest
        guest.running += 1
        self._running += 1
        self._most_running = max(self._most_running, self._running)
        self._most_per_guest = max(self._most_per_guest, guest.running)

    def _finished(self, job: _Job, result: outcome.Outcome[Any]) -> None:
        """On the event loop: ``job``'s copy ran. The next copies start before its ``done``
        is called, so the threads copy while the loop goes on."""
        self._running -= 1
        job.guest.running -= 1
        self._copies += 1
        self._slot_freed(job)
        self._forget_if_idle(job)
        self._tell_threads()
        try:
            self._dispatch()
        finally:
            job.done(result)

    def _withdraw(self, job: _Job) -> bool:
        """Cancel ``job`` unless a thread took it; True if cancelled (it will never run)."""
        if job.state is _WAITING:
            job.guest.waiting.remove(job)
            self._waiting -= 1
        elif job.state is _READY:
            self._ready.remove(job)
            self._slot_freed(job)
        elif job.state is _GIVEN and self._python.take_back(job):
            self._running -= 1
            job.guest.running -= 1
            self._slot_freed(job)
            self._dispatch()  # (the FIFO's next job takes its place)
        else:
            return False
        job.state = _CANCELLED
        self._forget_if_idle(job)
        self._tell_threads()
        return True

    def _slot_freed(self, job: _Job) -> None:
        """``job`` no longer holds its guest's slot: the guest's next waiting job takes it
        (at the end of the FIFO: the guests are served in turn)."""
        guest = job.guest
        guest.active -= 1
        if guest.waiting:
            guest.active += 1
            self._waiting -= 1
            waiting = guest.waiting.popleft()
            waiting.state = _READY
            self._ready.append(waiting)

    def _forget_if_idle(self, job: _Job) -> None:
        guest = job.guest
        if guest.active == 0 and not guest.waiting and self._guests.get(job.domid) is guest:
            del self._guests[job.domid]

    def close(self) -> None:
        """The daemon stops: every thread ends once the copies it was given are made (run
        after the last caller is gone; a later :meth:`run` starts threads again, which end
        as soon as they are idle)."""
        self._python.close()
        if self._native is not None:
            self._native.close()


class _PythonThreads:
    """Python worker threads: take jobs from a queue, run their copy (any callable) and hand
    the outcome back to the loop with ``run_sync_soon``. At most ``total`` of them start, as
    needed, and they end when idle."""

    def __init__(
        self, total: int, finished: Callable[[_Job, outcome.Outcome[Any]], None]
    ) -> None:
        self._total = total
        self._finished = finished
        # Thread accounting changes in the threads too: under the lock.
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0  # threads waiting for a job
        self._pending = 0  # jobs put but not yet taken by a thread
        self._closing = False  # after close(): threads end as soon as they are idle

    @property
    def threads(self) -> int:
        return self._threads

    def start(self, job: _Job) -> None:
        """Queue ``job`` with a thread for it; raises (nothing queued) if none could start."""
        with self._lock:
            start = self._pending >= self._idle and self._threads < self._total
            if start:
                self._threads += 1
                self._idle += 1  # counted idle until it takes a job: one thread per job
            self._pending += 1
            self._queue.put(job)
        if start:
            try:
                threading.Thread(target=self._work, name="displback-copy", daemon=True).start()
            except BaseException:
                with self._lock:
                    self._threads -= 1
                    self._idle -= 1
                    alone = self._threads == 0
                if alone:
                    # Nobody takes it: the caller marks it cancelled, and the thread that
                    # one day takes it from the queue skips it.
                    raise
                # (A thread alive takes it and makes the copy.)

    def take_back(self, job: _Job) -> bool:
        """Cancel ``job`` unless a thread took it (True: the thread that takes it from the
        queue skips it)."""
        with self._lock:
            if job.state is not _GIVEN:
                return False
            job.state = _CANCELLED
            return True

    def close(self) -> None:
        with self._lock:
            self._closing = True
            threads = self._threads
        for _ in range(threads):
            self._queue.put(None)

    def _work(self) -> None:
        """A worker thread: take jobs until none came for :data:`IDLE_SECONDS`, or none is
        there after :meth:`close`."""
        while True:
            try:
                job = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                job = None
            with self._lock:
                if job is None:
                    if self._pending > self._idle - 1:
                        continue  # a job was put counting on this thread: take it
                    self._idle -= 1
                    self._threads -= 1
                    return
                self._pending -= 1
                if job.state is _CANCELLED:  # taken back, or its thread could not start
                    continue
                job.state = _RUNNING
                self._idle -= 1
            result = outcome.capture(job.copy)
            with self._lock:
                self._idle += 1
                leave = self._closing and self._pending <= self._idle - 1
                if leave:
                    self._idle -= 1
                    self._threads -= 1
            # (RunFinishedError: the run ended under the copy; nobody waits for it.)
            with contextlib.suppress(trio.RunFinishedError):
                job.token.run_sync_soon(self._finished, job, result)
            if leave:
                return


class _NativeThreads:
    """The native copy threads for :class:`FrameCopy` jobs and the system task that hands
    their finished copies back to the loop: made on the first copy of a trio run, and closed
    when that run ends (the task is cancelled) or by :meth:`close`, so that neither their
    eventfd nor a buffer they hold outlives the run."""

    def __init__(
        self, total: int, finished: Callable[[_Job, outcome.Outcome[Any]], None], flips: bool
    ) -> None:
        self._total = total
        self._finished = finished
        self.flips = flips
        self._threads: Any = None  # NativeCopyThreads of the run ``_run``
        self._run: trio.lowlevel.TrioToken | None = None
        self._jobs: dict[int, _Job] = {}
        self._next_id = 0
        self._quiet = False

    @property
    def threads(self) -> int:
        return self._threads.threads if self._threads is not None else 0

    @property
    def quiet(self) -> bool:
        """Whether a copy whose flip the thread issued may end without waking the loop."""
        return self._quiet

    @quiet.setter
    def quiet(self, quiet: bool) -> None:
        if quiet != self._quiet:
            self._quiet = quiet
            if self._threads is not None:
                self._threads.quiet = quiet  # (False: wakes the loop for those ended quietly)

    def start(self, job: _Job) -> None:
        """Give ``job`` to a native thread. Its geometry errors come back as its outcome,
        like a Python copy's; raises if no thread could be started."""
        threads = self._threads
        if threads is None or self._run is not job.token:
            if threads is not None:  # (a run that ended without cancelling its task)
                self._shut(hand_back=False)
            threads = NativeCopyThreads(self._total, IDLE_SECONDS)
            try:
                trio.lowlevel.spawn_system_task(self._reap, threads, name="displback copy reaper")
            except BaseException:
                threads.close()
                raise
            threads.quiet = self._quiet
            self._threads, self._run = threads, job.token
        copy: FrameCopy = job.copy  # type: ignore[assignment]
        job_id = self._next_id
        self._next_id += 1
        flip = job.flip() if job.flip is not None and self.flips else None
        try:
            threads.submit(
                job_id, copy.src, copy.src_offset, copy.src_pitch, copy.dst, copy.dst_offset,
                copy.dst_pitch, copy.width_bytes, copy.height,
                None if flip is None else (flip.fd, flip.request, flip.arg),
            )
        except (ValueError, TypeError, BufferError, OverflowError) as exc:  # as copy_frame
            if flip is not None:
                flip.cancel()
            job.token.run_sync_soon(self._finished, job, outcome.Error(exc))
            return
        except BaseException:
            if flip is not None:
                flip.cancel()
            raise
        if flip is not None:
            job.native_flip = flip
            flip.settle = functools.partial(self._settle, threads, job_id)
        self._jobs[job_id] = job

    async def _reap(self, threads: Any) -> None:
        """Hand each finished copy back to the loop, until ``threads`` are closed or the run
        ends (then they are closed here)."""
        if self._threads is not threads:  # closed before this task's first turn
            return
        fd = threads.fileno()
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                for job_id, code in threads.finished():
                    self._hand_back(job_id, code)
                if self._threads is not threads:  # closed while this task was woken
                    return
        except trio.ClosedResourceError:  # closed while it waited
            return
        finally:
            if self._threads is threads:  # the run ends: nobody is left to hand back to
                self._shut(hand_back=False)

    def _hand_back(self, job_id: int, code: int) -> None:
        """On the loop: copy ``job_id`` ended, its flip (if any) failed with errno ``code``
        (0: issued, or none asked)."""
        job = self._jobs.pop(job_id)
        self._finished(job, self._result(job, code))

    @staticmethod
    def _result(job: _Job, code: int) -> outcome.Outcome[bool | None]:
        flip = job.native_flip
        if flip is None:
            return outcome.Value(None)
        if code:
            return outcome.Error(flip.failed(code))
        return outcome.Value(True)

    def _settle(self, threads: Any, job_id: int) -> None:
        """The output lands (or drops) the flip of copy ``job_id``: hand that copy back now,
        waiting the moment its thread may still need between its ioctl and its hand-back
        (the copy itself is over: the flip's event came, or its output is closing)."""
        if self._threads is threads and job_id in self._jobs:
            for done_id, code in threads.finished(wait_for=job_id):
                self._hand_back(done_id, code)

    def _shut(self, *, hand_back: bool) -> None:
        """Close the threads once the copies given are made (the loop blocks meanwhile),
        releasing the memory they held; ``hand_back``: their callers are still waiting."""
        threads, self._threads, self._run = self._threads, None, None
        jobs, self._jobs = self._jobs, {}
        codes = dict(threads.close())  # the copies made but not handed back: all of jobs
        if hand_back:
            for job_id, job in jobs.items():
                with contextlib.suppress(trio.RunFinishedError):
                    job.token.run_sync_soon(
                        self._finished, job, self._result(job, codes.get(job_id, 0))
                    )

    def close(self) -> None:
        """The daemon stops: wait for the copies given, end the threads, hand the copies not
        yet handed back to the loop."""
        if self._threads is None:
            return
        with contextlib.suppress(RuntimeError):  # (outside the run: its task is gone)
            if trio.lowlevel.current_trio_token() is self._run:
                trio.lowlevel.notify_closing(self._threads.fileno())
        self._shut(hand_back=True)


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
