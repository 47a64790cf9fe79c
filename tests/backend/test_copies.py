"""The copy workers: copies in threads, bounded and fair, never abandoned once started.

Slow copies are stubs blocked on a ``threading.Event``: every wait is for an event, the only
time bounds are generous ``fail_after`` guards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import trio
import trio.testing

from displback.backend import copies as copies_module
from displback.backend.copies import CopyWorkers


class Blocked:
    """A copy that says when it started and runs until released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = False
        self.thread: int | None = None

    def __call__(self) -> str:
        self.thread = threading.get_ident()
        self.started.set()
        if not self.release.wait(timeout=30):
            raise TimeoutError("never released")
        self.finished = True
        return "copied"

    async def wait_started(self) -> None:
        await trio.to_thread.run_sync(self.started.wait, 30)


async def until(condition: Callable[[], bool]) -> None:
    """Return once ``condition()`` holds (the caller bounds the wait with ``fail_after``)."""
    while not condition():
        await trio.sleep(0.01)


async def test_a_copy_runs_in_a_worker_thread_and_returns_its_result_or_raises() -> None:
    workers = CopyWorkers(2)
    with trio.fail_after(30):
        assert await workers.run(1, threading.get_ident) != threading.get_ident()

        def fails() -> None:
            raise ValueError("bad geometry")

        with pytest.raises(ValueError, match="bad geometry"):
            await workers.run(1, fails)
    assert workers.stats.copies == 2 and workers.threads <= 2


async def test_another_guests_copy_completes_while_a_slow_copy_runs() -> None:
    """The event loop does not wait for a copy: with two threads, guest 2's copy is made
    and returned while guest 1's is still running."""
    workers = CopyWorkers(2)
    slow = Blocked()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workers.run, 1, slow)
            await slow.wait_started()
            assert await workers.run(2, lambda: "quick") == "quick"
            assert not slow.finished
            slow.release.set()
    assert slow.finished and workers.stats.most_running == 2


async def test_at_most_total_copies_run_and_one_per_guest() -> None:
    workers = CopyWorkers(2, per_guest=1)
    copies = {(domid, n): Blocked() for domid in (1, 2, 3) for n in (0, 1)}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for (domid, _), copy in copies.items():
                nursery.start_soon(workers.run, domid, copy)
            await until(lambda: workers.stats.running == 2)  # (trio starts tasks in any order)
            await trio.testing.wait_all_tasks_blocked()
            running = [key for key, copy in copies.items() if copy.started.is_set()]
            assert len(running) == 2 and running[0][0] != running[1][0]
            assert workers.threads == 2
            for copy in copies.values():
                copy.release.set()
    assert all(c.finished for c in copies.values())
    assert workers.stats.most_running == 2 and workers.stats.most_running_per_guest == 1
    assert workers.stats.copies == 6


async def test_a_copy_cancelled_before_a_thread_takes_it_never_runs() -> None:
    workers = CopyWorkers(1)
    slow = Blocked()
    queued = Blocked()
    scope = trio.CancelScope()

    async def waits_in_the_queue() -> None:
        with scope:
            await workers.run(2, queued)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workers.run, 1, slow)
            await slow.wait_started()
            nursery.start_soon(waits_in_the_queue)
            await trio.testing.wait_all_tasks_blocked()  # its job is queued behind ``slow``
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            slow.release.set()
        assert scope.cancelled_caught
        assert await workers.run(3, lambda: "next") == "next"  # the thread skipped it
    assert not queued.started.is_set() and workers.stats.copies == 2


async def test_a_caller_cancelled_while_its_copy_runs_waits_for_the_copy() -> None:
    """The caller's memory must stay mapped while the thread reads it: run() returns only
    once the copy has ended, and the cancellation arrives after."""
    workers = CopyWorkers(1)
    slow = Blocked()
    returned_after: list[bool] = []

    async def caller(scope_box: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_box.append(scope)
            try:
                await workers.run(1, slow)
            finally:
                returned_after.append(slow.finished)
            await trio.lowlevel.checkpoint()
        assert scope.cancelled_caught

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            box: list[trio.CancelScope] = []
            nursery.start_soon(caller, box)
            await slow.wait_started()
            box[0].cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert returned_after == []  # still waiting for the running copy
            slow.release.set()
    assert returned_after == [True]


async def test_idle_threads_end_and_new_work_starts_them_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(copies_module, "IDLE_SECONDS", 0.05)
    workers = CopyWorkers(2)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for domid in (1, 2):
                nursery.start_soon(workers.run, domid, lambda: None)
        await until(lambda: workers.threads == 0)
        assert await workers.run(1, lambda: "again") == "again"
    assert workers.stats.copies == 3
