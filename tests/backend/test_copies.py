"""The copy workers: copies in threads, bounded and fair, never abandoned once started; and
through the daemon, copy mode's frames copied off the event loop.

Slow copies are stubs blocked on a ``threading.Event``: every wait is for an event, the only
time bounds are generous ``fail_after`` guards.
"""

from __future__ import annotations

import errno
import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import outcome
import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from displback.backend import copies as copies_module
from displback.backend.buffers import BufferKind
from displback.backend.copies import (
    CopyWorkers,
    FrameCopy,
    available_cores,
    native_copies_built,
)
from displback.backend.device import BackendSettings
from displback.display.interface import DisplayError, NativeFlip
from displback.sim.guest import FlipOutcome
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import sim_machine
from tests.backend.support import (
    PipeFlip,
    copy_frames_with,
    flip_frame,
    paint,
    release,
    show,
    shown,
    store_of,
    wait_until,
)


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


async def test_a_submitted_copy_hands_its_outcome_to_a_callback_on_the_event_loop() -> None:
    """``submit`` parks no task: the copy runs in a worker thread and its outcome (a value or
    the error it raised) is handed to the callback, which runs on the event loop's thread."""
    workers = CopyWorkers(2)
    results: list[tuple[int, Any]] = []
    done = trio.Event()

    def callback(result: Any) -> None:
        results.append((threading.get_ident(), result))
        if len(results) == 2:
            done.set()

    def fails() -> None:
        raise ValueError("bad geometry")

    with trio.fail_after(30):
        workers.submit(1, threading.get_ident, callback)
        workers.submit(2, fails, callback)
        await done.wait()
    loop_thread = threading.get_ident()
    assert [thread for thread, _ in results] == [loop_thread, loop_thread]
    values = [r.unwrap() for _, r in results if not isinstance(r, outcome.Error)]
    errors = [r.error for _, r in results if isinstance(r, outcome.Error)]
    assert len(values) == 1 and values[0] != loop_thread  # copied off the loop's thread
    assert len(errors) == 1 and str(errors[0]) == "bad geometry"


async def test_a_submitted_copy_takes_its_guests_turn_like_an_awaited_one() -> None:
    """One thread, one copy per guest at a time: guest 1's submitted copy waits behind its
    running awaited one, and guest 2's goes first."""
    workers = CopyWorkers(1)
    first = Blocked()
    order: list[int] = []
    done = trio.Event()

    def callback(result: Any) -> None:
        result.unwrap()
        if len(order) == 2:
            done.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workers.run, 1, first)
            await first.wait_started()
            workers.submit(1, lambda: order.append(1), callback)
            workers.submit(2, lambda: order.append(2), callback)
            first.release.set()
            await done.wait()
    assert order == [2, 1]


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
            await until(lambda: sum(c.started.is_set() for c in copies.values()) == 2)
            await trio.testing.wait_all_tasks_blocked()
            running = [key for key, copy in copies.items() if copy.started.is_set()]
            assert len(running) == 2 and running[0][0] != running[1][0]
            assert workers.threads == 2
            # The third guest's copy is next in a thread's line; each guest has one slot.
            assert workers.stats.running == 3
            for copy in copies.values():
                copy.release.set()
    assert all(c.finished for c in copies.values())
    assert workers.stats.most_running == 3 and workers.stats.most_running_per_guest == 1
    assert workers.stats.copies == 6


async def test_a_guest_flooding_copies_gets_one_turn_in_each_round_of_the_guests() -> None:
    """One thread: guest 1 asks for four copies, then guests 2 and 3 for one each. Guest 1's
    copies beyond its share wait outside the queue and go to its end one at a time, so the
    others are served after at most one more of guest 1's."""
    workers = CopyWorkers(1)
    first = Blocked()
    order: list[tuple[int, int]] = []

    def copy(domid: int, n: int) -> None:
        order.append((domid, n))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workers.run, 1, first)
            await first.wait_started()
            for n in (1, 2, 3):
                nursery.start_soon(workers.run, 1, functools.partial(copy, 1, n))
                await trio.testing.wait_all_tasks_blocked()
            for domid in (2, 3):
                nursery.start_soon(workers.run, domid, functools.partial(copy, domid, 0))
                await trio.testing.wait_all_tasks_blocked()
            first.release.set()
    assert order == [(2, 0), (3, 0), (1, 1), (1, 2), (1, 3)]
    assert workers.stats.most_running_per_guest == 1


async def test_a_copy_cancelled_while_waiting_for_its_guests_turn_never_runs() -> None:
    workers = CopyWorkers(2)
    first, second, third = Blocked(), Blocked(), Blocked()
    scope = trio.CancelScope()

    async def waits_for_its_turn() -> None:
        with scope:
            await workers.run(1, second)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workers.run, 1, first)
            await first.wait_started()
            nursery.start_soon(waits_for_its_turn)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(workers.run, 1, third)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            first.release.set()
            await third.wait_started()  # the next one takes the turn
            third.release.set()
    assert scope.cancelled_caught and not second.started.is_set()
    assert workers.stats.copies == 2


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


async def test_closed_workers_make_the_copies_queued_before_and_then_their_threads_end() -> None:
    workers = CopyWorkers(1)
    slow = Blocked()
    results: list[str] = []

    async def queued() -> None:
        results.append(await workers.run(2, lambda: "queued"))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workers.run, 1, slow)
            await slow.wait_started()
            nursery.start_soon(queued)
            await trio.testing.wait_all_tasks_blocked()
            workers.close()
            slow.release.set()
        assert results == ["queued"]
        with trio.fail_after(5):  # (idle, it would live IDLE_SECONDS on)
            await until(lambda: workers.threads == 0)
        assert await workers.run(3, lambda: "after") == "after"  # a thread starts again
    assert workers.stats.copies == 3


async def test_a_copy_whose_thread_cannot_start_fails_its_caller_and_never_runs_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The caller of a copy whose thread could not start gets the error and may unmap its
    memory: no thread started later for another copy may make that copy."""
    workers = CopyWorkers(2)
    lost = Blocked()
    real_start = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with trio.fail_after(30):
        monkeypatch.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            await workers.run(1, lost)
        monkeypatch.setattr(threading.Thread, "start", real_start)
        assert workers.threads == 0
        assert await workers.run(2, lambda: "next") == "next"  # the new thread skips it
    assert not lost.started.is_set() and workers.stats.copies == 1


async def test_a_copy_nobody_wants_when_its_turn_comes_is_not_made() -> None:
    """``skip`` is asked when a thread would take the copy, on the loop: a frame released
    while its copy waited behind the guest's running one is never copied."""
    workers = CopyWorkers(1)
    first = Blocked()
    made: list[str] = []
    gone = False
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workers.run, 1, first)
            await first.wait_started()
            results: list[Any] = []
            workers.submit(1, lambda: made.append("late"), results.append, skip=lambda: gone)
            gone = True  # (the framebuffer went while its copy waited)
            first.release.set()
            await until(lambda: bool(results))
        assert results[0].unwrap() is None
        assert await workers.run(2, lambda: "wanted", skip=lambda: False) == "wanted"
    assert made == [] and workers.stats.copies == 3


def frame_copy(width: int, height: int, fill: int, dst_pitch: int | None = None) -> FrameCopy:
    """A copy of a ``width`` x ``height`` byte frame filled with ``fill`` into zeroes."""
    dst_pitch = width if dst_pitch is None else dst_pitch
    return FrameCopy(bytes([fill]) * width * height, 0, width, bytearray(dst_pitch * height), 0,
                     dst_pitch, width, height)


ENGINES = [
    pytest.param(False, id="python"),
    pytest.param(True, id="native", marks=pytest.mark.skipif(
        not native_copies_built(), reason="the native copy threads are not built")),
]


@pytest.mark.parametrize("native", ENGINES)
async def test_frame_copies_are_made_by_either_kind_of_thread_alike(native: bool) -> None:
    """The same frame copies, the same results: rows copied, padding left alone, bad
    geometry refused as ``copy_frame`` refuses it, handed back as the copy's outcome."""
    workers = CopyWorkers(2, native=native)
    assert workers.native is native
    with trio.fail_after(30):
        same = frame_copy(64, 8, 7)
        await workers.run(1, same)
        assert same.dst == bytes([7]) * 64 * 8
        strided = frame_copy(5, 3, 9, dst_pitch=8)
        await workers.run(2, strided)
        assert strided.dst == (bytes([9]) * 5 + bytes(3)) * 3
        too_wide = FrameCopy(bytes(10), 0, 10, bytearray(10), 0, 10, 11, 1)
        with pytest.raises(ValueError, match="holds 10 bytes"):
            await workers.run(1, too_wide)
        results: list[Any] = []
        workers.submit(3, FrameCopy(bytes(4), 0, 4, bytes(4), 0, 4, 4, 1), results.append)
        await until(lambda: bool(results))
        with pytest.raises(ValueError, match="read-only"):
            results[0].unwrap()
    assert workers.stats.copies == 4
    workers.close()
    assert workers.threads == 0 or not native  # (native threads end within close)


@pytest.mark.parametrize("native", ENGINES)
async def test_many_guests_frame_copies_come_back_each_once_in_their_guests_turn(
    native: bool,
) -> None:
    """Forty copies of four guests on two threads: each handed back once, to its own
    callback, never more than one per guest at a time."""
    workers = CopyWorkers(2, native=native)
    copies = {(domid, n): frame_copy(256, 64, domid * 16 + n) for domid in range(4)
              for n in range(10)}
    results: dict[tuple[int, int], list[Any]] = {key: [] for key in copies}
    with trio.fail_after(30):
        for (domid, n), copy in copies.items():
            workers.submit(domid, copy, results[domid, n].append)
        await until(lambda: all(results.values()))
        await trio.testing.wait_all_tasks_blocked()
    assert all(len(r) == 1 and r[0].unwrap() is None for r in results.values())
    assert all(c.dst == bytes([c.src[0]]) * len(c.dst) for c in copies.values())
    stats = workers.stats
    assert stats.copies == 40 and stats.running == 0
    assert stats.most_running <= 4 and stats.most_running_per_guest == 1
    workers.close()


@pytest.mark.skipif(not native_copies_built(), reason="the native copy threads are not built")
def test_frame_copies_go_to_the_native_threads_unless_the_environment_says_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DISPLBACK_COPY_THREADS", raising=False)
    assert CopyWorkers(1).native
    monkeypatch.setenv("DISPLBACK_COPY_THREADS", "python")
    assert not CopyWorkers(1).native
    assert CopyWorkers(1, native=True).native  # (asked for by the caller)
    monkeypatch.setenv("DISPLBACK_COPY_THREADS", "native-no-flip")
    workers = CopyWorkers(1)
    assert workers.native and not workers.flips
    monkeypatch.delenv("DISPLBACK_COPY_THREADS")
    assert CopyWorkers(1).flips and not CopyWorkers(1, native=False).flips


@pytest.mark.skipif(not native_copies_built(), reason="the native copy threads are not built")
async def test_native_frame_copies_hold_their_memory_until_handed_back() -> None:
    """The native thread copies without the GIL, so the memory it reads must not go before
    the copy is handed back to the loop: releasing the source's view fails until then."""
    workers = CopyWorkers(1, native=True)
    with trio.fail_after(30):
        source = memoryview(bytearray(32 << 20))
        copy = FrameCopy(source, 0, 4096, bytearray(32 << 20), 0, 4096, 4096, 8192)
        results: list[Any] = []
        workers.submit(1, copy, results.append)
        with pytest.raises(BufferError):
            source.release()
        await until(lambda: bool(results))
    source.release()  # handed back: the export is gone
    workers.close()


# --- the flip after the copy -----------------------------------------------------------------

native_only = pytest.mark.skipif(
    not native_copies_built(), reason="the native copy threads are not built"
)


@native_only
async def test_a_frame_copys_flip_is_issued_by_its_thread_and_handed_back_when_settled() -> None:
    """With nothing else waiting, the thread flips after the copy and wakes nobody: the copy
    comes back when the output settles it (its flip's event), as Value(True)."""
    workers = CopyWorkers(1, native=True)
    pipe = PipeFlip()
    copy = frame_copy(4096, 256, 3)
    results: list[Any] = []
    with trio.fail_after(30):
        workers.submit(1, copy, results.append, flip=lambda: pipe.flip)
        assert pipe.flip.settle is not None  # asked when the thread took the copy
        await until(lambda: pipe.issued)
        await trio.sleep(0.05)
        await trio.testing.wait_all_tasks_blocked()
        assert results == []  # the thread's end woke no one
        pipe.flip.settle()
        assert len(results) == 1 and results[0].unwrap() is True  # handed back in settle
        assert copy.dst == bytes([3]) * len(copy.dst)
        pipe.flip.settle()  # idempotent
    assert len(results) == 1 and workers.stats.copies == 1 and workers.stats.running == 0
    workers.close()
    pipe.close()


@native_only
async def test_a_flip_its_thread_could_not_issue_wakes_the_loop_with_the_outputs_error() -> None:
    workers = CopyWorkers(1, native=True)
    pipe = PipeFlip(fails=True)
    results: list[Any] = []
    with trio.fail_after(30):
        workers.submit(1, frame_copy(64, 4, 1), results.append, flip=lambda: pipe.flip)
        await until(lambda: bool(results))  # woken without any settle
    assert pipe.failures == [errno.ENOTTY] and not pipe.issued
    with pytest.raises(DisplayError, match="flip failed"):
        results[0].unwrap()
    workers.close()
    pipe.close()


@native_only
async def test_copies_waiting_for_a_slot_make_the_threads_wake_the_loop_after_a_flip() -> None:
    """A guest's second copy waits for its slot: the first copy's end must wake the loop
    (not wait for its flip's event); once nothing waits, the threads are quiet again."""
    workers = CopyWorkers(2, native=True)
    pipes = [PipeFlip(), PipeFlip(), PipeFlip()]
    results: list[list[Any]] = [[], [], []]

    def submit(n: int) -> None:
        workers.submit(1, frame_copy(4096, 64, n), results[n].append,
                       flip=lambda: pipes[n].flip)

    with trio.fail_after(30):
        submit(0)
        submit(1)
        await until(lambda: bool(results[0]) and pipes[1].issued)
        assert results[0][0].unwrap() is True  # woken: the guest's next copy went on
        settle = pipes[1].flip.settle
        assert settle is not None
        settle()  # (its end may have woken the loop too: quiet only once it was dispatched)
        await until(lambda: bool(results[1]))
        submit(2)
        await until(lambda: pipes[2].issued)
        await trio.sleep(0.05)
        await trio.testing.wait_all_tasks_blocked()
        assert results[2] == []  # nothing waited: its end woke no one
        settle = pipes[2].flip.settle
        assert settle is not None
        settle()
        assert results[2][0].unwrap() is True
    workers.close()
    for pipe in pipes:
        pipe.close()


@native_only
async def test_a_flip_is_not_asked_for_a_skipped_copy_and_cancelled_for_a_refused_one() -> None:
    workers = CopyWorkers(1, native=True)
    asked: list[int] = []
    pipe = PipeFlip()
    results: list[Any] = []

    def flip() -> NativeFlip:
        asked.append(1)
        return pipe.flip

    with trio.fail_after(30):
        workers.submit(1, frame_copy(8, 1, 1), results.append, skip=lambda: True, flip=flip)
        refused = FrameCopy(bytes(10), 0, 10, bytearray(10), 0, 10, 11, 1)  # too wide
        workers.submit(2, refused, results.append, flip=flip)
        await until(lambda: len(results) == 2)
    assert asked == [1] and pipe.cancelled == 1 and not pipe.issued
    assert results[0].unwrap() is None
    with pytest.raises(ValueError):
        results[1].unwrap()
    workers.close()
    pipe.close()


@pytest.mark.parametrize("native", ENGINES)
async def test_a_copy_the_python_threads_make_asks_for_no_flip(native: bool) -> None:
    """Python threads (and callables that are not frame copies) flip on the loop, as before."""
    workers = CopyWorkers(1, native=native)
    results: list[Any] = []
    with trio.fail_after(30):
        workers.submit(1, lambda: None, results.append, flip=lambda: pytest.fail("asked"))
        await until(lambda: bool(results))
    assert results[0].unwrap() is None
    workers.close()


@native_only
async def test_native_threads_told_not_to_flip_ask_for_no_flip() -> None:
    workers = CopyWorkers(1, native=True, flips=False)
    results: list[Any] = []
    with trio.fail_after(30):
        workers.submit(1, frame_copy(8, 1, 1), results.append,
                       flip=lambda: pytest.fail("asked"))
        await until(lambda: bool(results))
    assert results[0].unwrap() is None
    workers.close()


@native_only
async def test_closed_workers_hand_back_a_quiet_copy_with_its_flips_result() -> None:
    workers = CopyWorkers(1, native=True)
    pipe = PipeFlip()
    results: list[Any] = []
    with trio.fail_after(30):
        workers.submit(1, frame_copy(64, 4, 1), results.append, flip=lambda: pipe.flip)
        await until(lambda: pipe.issued)
        workers.close()
        await until(lambda: bool(results))
    assert results[0].unwrap() is True
    pipe.close()


@native_only
async def test_workers_closed_before_their_reaper_first_ran_end_quietly() -> None:
    """The reaper of new threads is a system task that runs at the loop's next turn; the
    daemon may close the workers before that turn (a guest gone at once). The reaper then
    finds its threads closed and returns, where it used to crash the run."""
    workers = CopyWorkers(1, native=True)
    results: list[Any] = []
    with trio.fail_after(30):
        workers.submit(1, frame_copy(64, 4, 1), results.append)
        workers.close()  # (no checkpoint since the submit: the reaper has not run yet)
        await until(lambda: bool(results))
        await trio.sleep(0.05)  # the reaper's turn
    assert results[0].unwrap() is None


# --- through the daemon ---------------------------------------------------------------------

_COPY_MODE = {"dmabuf_export_supported": False}


class HeldCopies:
    """Stands in for ``copy_frame`` in the buffer store: copies of frames ``row_bytes`` wide
    wait in their worker thread, once :meth:`hold` was called, until released; the others,
    and the held ones once released, are made by the real ``copy_frame``. Records what the
    real copies raised."""

    def __init__(self, row_bytes: int) -> None:
        self.row_bytes = row_bytes
        self.held = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.release_timed_out = False
        self.errors: list[BaseException] = []
        self.threads: set[int] = set()

    def __call__(self, *args: Any) -> None:
        from displback.display.pixels import copy_frame

        self.threads.add(threading.get_ident())
        if args[6] == self.row_bytes:
            self.held.set()
            self.release_timed_out = not self.release.wait(timeout=60)
        try:
            copy_frame(*args)
        except BaseException as exc:
            self.errors.append(exc)
            raise

    def hold(self) -> None:
        self.held.clear()
        self.release.clear()

    async def wait_held(self) -> None:
        await trio.to_thread.run_sync(self.held.wait, 60)


async def test_a_copy_held_in_a_worker_thread_stops_no_other_guests_flips(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copy mode: while guest 1's frame is being copied (held in its worker thread), the
    event loop goes on serving guest 2, whose frames are copied by the other thread and
    shown; guest 1's flip completes once its copy ends. The threads end with the daemon."""
    held = HeldCopies(320 * 4)
    copy_frames_with(monkeypatch, held)
    settings = BackendSettings(copy_workers=2)
    with trio.fail_after(60):
        async with sim_machine(hypervisor, tmp_path, settings=settings,
                               platform_options=_COPY_MODE) as w:
            assert w.backend.copies.total == 2
            await w.add_guest(1, "connectors=c0:320x240")
            await w.add_guest(2, "connectors=c0:160x120")
            async with w.guest(1) as g1, w.guest(2) as g2:
                await g1.wait_connected()  # output A
                await g2.wait_connected()  # output B
                bufs1, fbs1 = await show(g1, 0, 320, 240)  # (copies before the hold)
                bufs2, fbs2 = await show(g2, 0, 160, 120)
                assert store_of(w, 1).buffer_info(bufs1[0].cookie).kind is BufferKind.COPY
                paint(bufs1[1], fbs1[1], connector=0, frame=2)
                flipped: list[FlipOutcome] = []
                async with trio.open_nursery() as nursery:

                    async def flip_guest_1() -> None:
                        flipped.append(await g1.page_flip(0, fbs1[1]))

                    held.hold()
                    nursery.start_soon(flip_guest_1)
                    await held.wait_held()
                    with trio.fail_after(20):  # (a blocked loop would only wake after 60 s)
                        for frame in range(2, 8):
                            await flip_frame(g2, 0, bufs2[frame % 2], fbs2[frame % 2], frame)
                            assert shown(w.output("B"), 160, 120) == (0, frame)
                    assert flipped == [] and shown(w.output("A"), 320, 240) == (0, 1)
                    held.release.set()
                assert flipped == [FlipOutcome.DONE]
                assert shown(w.output("A"), 320, 240) == (0, 2)
                await release(g1, 0, bufs1, fbs1)
                await release(g2, 0, bufs2, fbs2)
        with trio.fail_after(5):  # (an idle thread would otherwise live IDLE_SECONDS on)
            await wait_until(lambda: w.backend.copies.threads == 0)  # the daemon stopped
    assert not held.release_timed_out and held.errors == []
    assert threading.get_ident() not in held.threads  # every copy ran off the event loop
    assert w.backend.copies.stats.copies >= 10


async def dom0_mappings(hypervisor: HypervisorThread) -> int:
    """Grant pages Dom0 (the daemon) has mapped now."""
    counters = await trio.to_thread.run_sync(hypervisor.counters)
    return int(counters["domains"][0]["mappings"])


async def test_a_guest_destroyed_while_its_copy_runs_is_unmapped_only_after_the_copy(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``xl destroy`` while a worker thread copies the guest's frame: the teardown waits for
    the copy (a real one takes milliseconds), which reads still-mapped pages into a live copy
    buffer (no error); then the removal completes and every mapping and grant goes (the
    fixture checks that the hypervisor holds nothing)."""
    held = HeldCopies(320 * 4)
    copy_frames_with(monkeypatch, held)
    destroyed: list[bool] = []
    with trio.fail_after(60), capture_logs() as logs:
        async with sim_machine(hypervisor, tmp_path, platform_options=_COPY_MODE) as w:
            await w.add_guest(1, "connectors=c0:320x240")
            async with w.guest(1) as guest:
                await guest.wait_connected()
                bufs, fbs = await show(guest, 0, 320, 240)
                held.hold()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(guest.page_flip, 0, fbs[1])
                    await held.wait_held()

                    async def destroy() -> None:
                        destroyed.append(await w.toolstack.destroy_domain(1))

                    nursery.start_soon(destroy)
                    await wait_until(lambda: any(e["event"] == "tearing down" for e in logs))
                    await trio.testing.wait_all_tasks_blocked()
                    # The copy still reads the guest's pages: they stay mapped meanwhile.
                    assert await dom0_mappings(hypervisor) > 0
                    assert destroyed == []
                    held.release.set()
                    await wait_until(lambda: destroyed != [])
                    guest.crash()
                    nursery.cancel_scope.cancel()
                await wait_until(lambda: not w.backend.devices)
                while await dom0_mappings(hypervisor):
                    await trio.sleep(0.01)
                # The copy's buffer, filled after its connector was gone, went too.
                assert w.output("A").owned_bytes == 0
    assert destroyed == [True]
    assert not held.release_timed_out and held.errors == []


class TaskSteps(trio.abc.Instrument):
    """Counts task steps by task name."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        name = task.name.rsplit(".", 2)[-2:]
        key = ".".join(name)
        self.steps[key] = self.steps.get(key, 0) + 1


@pytest.mark.parametrize("native", ENGINES)
async def test_a_copy_mode_flip_is_started_by_the_copys_hand_back_not_by_a_task(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """Copy mode: the reader's wake-up hands the copy to a worker thread, and the thread's
    hand-back to the loop (trio's ``run_sync_soon`` task for a Python thread, the reaper
    task waiting on the eventfd for a native one) starts the flip: the connector's scanout
    task is never stepped for a frame, and its ring task neither."""
    if not native:
        monkeypatch.setattr(copies_module, "NativeCopyThreads", None)
    hand_back = "displback copy reaper" if native else "<TrioToken.run_sync_soon task>"
    with trio.fail_after(60):
        async with sim_machine(hypervisor, tmp_path, platform_options=_COPY_MODE) as w:
            await w.add_guest(1, "connectors=c0:320x240")
            async with w.guest(1) as guest:
                await guest.wait_connected()
                bufs, fbs = await show(guest, 0, 320, 240)
                await flip_frame(guest, 0, bufs[1], fbs[1], 2)
                counter = TaskSteps()
                trio.lowlevel.add_instrument(counter)
                try:
                    for frame in range(3, 9):
                        await flip_frame(guest, 0, bufs[frame % 2], fbs[frame % 2], frame)
                        assert shown(w.output("A"), 320, 240) == (0, frame)
                finally:
                    trio.lowlevel.remove_instrument(counter)
                await release(guest, 0, bufs, fbs)
    assert counter.steps.get("Connector._scanout", 0) == 0, counter.steps
    assert counter.steps.get("Connector._serve_ring", 0) == 0, counter.steps
    assert counter.steps.get(hand_back, 0) >= 6, counter.steps
    assert w.backend.copies.native is native


async def test_the_daemon_runs_copies_on_as_many_threads_as_copy_workers_says(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    from displback.app.run import RunConfig, serve
    from displback.display.virtual import OutputConfig
    from displback.sim.platform import SimPlatform
    from displback.sim.xenstored import running_xenstored

    with trio.fail_after(30):
        async with running_xenstored(str(tmp_path)) as xs:
            platform = SimPlatform(hypervisor.socket_path, xs.socket_path)
            try:
                for configured, threads in ((3, 3), (None, available_cores())):
                    config = RunConfig(virtual_outputs=[OutputConfig("A", 320, 240)],
                                       copy_workers=configured)
                    async with trio.open_nursery() as nursery:
                        backend = await nursery.start(
                            functools.partial(serve, config, platform=platform))
                        assert backend.copies.total == threads
                        nursery.cancel_scope.cancel()
            finally:
                platform.close()
