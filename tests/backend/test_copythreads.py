"""The native copy threads (displback.backend._copythreads) copy exactly what
``pixels.copy_frame`` copies, refuse what it refuses before anything is queued, hold both
buffers until a copy is reaped, run without the GIL, and end their threads on close, after
``idle_seconds`` and when dropped unclosed.

The file is skipped when the extension is not built, unless ``DISPLBACK_REQUIRE_NATIVE`` is
set to anything but ``0``: then the first test fails (and every other). Every wait is bounded
by :data:`WAIT` seconds: a broken module fails, it never hangs the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import mmap
import os
import select
import subprocess
import sys
import termios
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from displback.display.pixels import copy_frame

if TYPE_CHECKING:
    from displback.backend._copythreads import CopyThreads

_copythreads: ModuleType | None
try:
    from displback.backend import _copythreads
except ImportError as error:  # not built: no compiler or no Python headers at install
    _copythreads = None
    IMPORT_ERROR: ImportError | None = error
else:
    IMPORT_ERROR = None

REQUIRE_NATIVE = os.environ.get("DISPLBACK_REQUIRE_NATIVE", "") not in ("", "0")

pytestmark = pytest.mark.skipif(
    _copythreads is None and not REQUIRE_NATIVE,
    reason=f"displback.backend._copythreads is not built ({IMPORT_ERROR})",
)

WAIT = 10.0
MiB = 1 << 20


def native() -> ModuleType:
    """The extension; fails the test when it is required but not built."""
    if _copythreads is None:
        pytest.fail(f"displback.backend._copythreads cannot be imported: {IMPORT_ERROR!r}")
    return _copythreads


def pool(max_threads: int, idle_seconds: float = 10.0) -> CopyThreads:
    made: CopyThreads = native().CopyThreads(max_threads, idle_seconds)
    return made


@pytest.fixture
def ct() -> Iterator[CopyThreads]:
    with pool(4) as threads:
        yield threads


def wait_finished(ct: CopyThreads, count: int) -> list[tuple[int, int]]:
    """(job_id, errno) of ``count`` finished jobs, waiting on the eventfd (at most WAIT s)."""
    poller = select.poll()
    poller.register(ct.fileno(), select.POLLIN)
    done: list[tuple[int, int]] = []
    deadline = time.monotonic() + WAIT
    while len(done) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(done)} of {count} copies finished in {WAIT} s"
        if poller.poll(left * 1000):
            done += ct.finished()
    return done


def wait_ids(ct: CopyThreads, count: int) -> list[int]:
    """The ids of ``count`` finished copies without a flip (errno 0 each), as wait_finished."""
    done = wait_finished(ct, count)
    assert [error for _, error in done] == [0] * count
    return [job_id for job_id, _ in done]


def readable(fd: int | CopyThreads, timeout: float = 0.0) -> bool:
    return select.select([fd], [], [], timeout)[0] != []


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"not true after {WAIT} s"
        time.sleep(0.005)


def reference_copy(
    src: bytes, src_offset: int, src_pitch: int, dst: bytearray, dst_offset: int,
    dst_pitch: int, width: int, height: int,
) -> None:  # fmt: skip
    """Row slices, as the module documents it: one span (gaps too) when the pitches match."""
    if width == 0 or height == 0:
        return
    if src_pitch == dst_pitch:
        span = src_pitch * (height - 1) + width
        dst[dst_offset : dst_offset + span] = src[src_offset : src_offset + span]
        return
    for r in range(height):
        s, d = src_offset + r * src_pitch, dst_offset + r * dst_pitch
        dst[d : d + width] = src[s : s + width]


def pattern(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (size // 256) + bytes(size % 256)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def pipe_holding(count: int) -> Iterator[int]:
    """The read end of a pipe holding ``count`` bytes: FIONREAD on it writes ``count`` as a C
    int into its arg (a flip that succeeds), TCGETS fails with ENOTTY (one that fails; its arg
    is a struct termios all the same, :data:`TERMIOS`: the request encodes no size)."""
    r, w = os.pipe()
    try:
        os.write(w, b"x" * count)
        yield r
    finally:
        os.close(r)
        os.close(w)


TERMIOS = 64  # bytes, at least sizeof(struct termios), which TCGETS writes on a tty


def c_int(arg: bytes | bytearray | memoryview) -> int:
    return int.from_bytes(arg[:4], sys.byteorder, signed=True)


def test_the_extension_is_built_when_required() -> None:
    # make test sets DISPLBACK_REQUIRE_NATIVE: a tree whose extension did not build fails
    # here instead of silently testing (and shipping) the Python fallback only.
    assert _copythreads is not None, f"cannot import the extension: {IMPORT_ERROR!r}"


@pytest.mark.parametrize(
    ("src_offset", "src_pitch", "dst_offset", "dst_pitch", "width", "height"),
    [
        (0, 64, 0, 64, 64, 16),  # packed rows, same pitch: one span
        (5, 80, 3, 80, 64, 16),  # same pitch with gaps: the gaps are copied too
        (0, 80, 0, 96, 64, 16),  # wider destination pitch
        (7, 96, 11, 72, 64, 16),  # narrower destination pitch, odd offsets
        (0, 1000, 0, 3, 3, 1),  # one row: the pitches only place row 0
        (0, 64, 0, 64, 0, 16),  # nothing to copy
    ],
)
def test_copies_equal_copy_frame(
    ct: CopyThreads,
    src_offset: int, src_pitch: int, dst_offset: int, dst_pitch: int, width: int, height: int,
) -> None:  # fmt: skip
    src = pattern(src_offset + src_pitch * height + 13, seed=3)
    dst = bytearray(b"\xee") * (dst_offset + dst_pitch * height + 17)
    expected = bytearray(dst)
    copy_frame(src, src_offset, src_pitch, expected, dst_offset, dst_pitch, width, height)
    ct.submit(1, src, src_offset, src_pitch, dst, dst_offset, dst_pitch, width, height)
    assert wait_ids(ct, 1) == [1]
    assert dst == expected


SMALL = st.integers(-1, 24)


@settings(max_examples=300, deadline=None)
@given(
    src_size=st.integers(0, 96), dst_size=st.integers(0, 96),
    src_offset=SMALL, src_pitch=SMALL, dst_offset=SMALL, dst_pitch=SMALL,
    width=st.integers(-1, 12), height=st.integers(-1, 6),
)  # fmt: skip
def test_any_small_geometry_is_copied_or_refused_as_copy_frame_does(
    src_size: int, dst_size: int, src_offset: int, src_pitch: int, dst_offset: int,
    dst_pitch: int, width: int, height: int,
) -> None:  # fmt: skip
    src = pattern(src_size, seed=src_size)
    dst = bytearray(b"\xee") * dst_size
    geometry = (src_offset, src_pitch, dst, dst_offset, dst_pitch, width, height)
    expected = bytearray(dst)
    try:
        copy_frame(src, src_offset, src_pitch, expected, *geometry[3:])
    except ValueError:
        refused = True
    else:
        refused = False
        reference = bytearray(dst)
        reference_copy(src, src_offset, src_pitch, reference, *geometry[3:])
        assert reference == expected
    with pool(2) as ct:
        if refused:
            with pytest.raises(ValueError, match="CopyThreads.submit"):
                ct.submit(9, src, *geometry)
            assert (ct.queued, ct.running, ct.threads, ct.finished()) == (0, 0, 0, [])
            assert dst == b"\xee" * dst_size
        else:
            ct.submit(9, src, *geometry)
            assert wait_ids(ct, 1) == [9]
            assert dst == expected


HUGE = [2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100]


def invalid_geometries() -> Iterator[tuple[str, tuple[int, ...]]]:
    """(why, (src_offset, src_pitch, dst_offset, dst_pitch, width, height)) copy_frame refuses,
    for a 4096-byte source and destination."""
    good = (0, 64, 0, 64, 64, 16)
    names = ("src_offset", "src_pitch", "dst_offset", "dst_pitch", "width", "height")
    for i, name in enumerate(names):
        for bad in (-1, -(2**63), -(2**64)):
            yield f"{name} {bad}", good[:i] + (bad,) + good[i + 1 :]
    yield "source rows overlap", (0, 32, 0, 64, 64, 16)
    yield "destination rows overlap", (0, 64, 0, 63, 64, 16)
    yield "source ends beyond", (1, 64, 0, 64, 64, 64)
    yield "destination ends beyond", (0, 64, 0, 65, 64, 64)
    yield "source offset at its end", (4096, 64, 0, 64, 1, 1)
    for huge in HUGE:
        yield f"source offset {huge}", (huge, 64, 0, 64, 64, 16)
        yield f"destination offset {huge}", (0, 64, huge, 64, 64, 16)
        yield f"source pitch {huge}", (0, huge, 0, 64, 64, 16)
        yield f"destination pitch {huge}", (0, 64, 0, huge, 64, 16)
        yield f"height {huge}", (0, 64, 0, 64, 64, huge)
        yield f"width and pitches {huge}", (0, huge, 0, huge, huge, 2)
        yield f"width {huge}, one row", (0, 64, 0, 64, huge, 1)
    # offset + pitch*(h-1) overflows 64 bits, as does the sum with the width
    yield "product overflows", (0, 2**62, 0, 2**62, 64, 5)
    yield "sum overflows", (2**63 - 64, 64, 0, 64, 64, 2)


@pytest.mark.parametrize(("why", "geometry"), list(invalid_geometries()))
def test_every_geometry_copy_frame_refuses_is_refused_and_nothing_is_queued(
    ct: CopyThreads,
    why: str, geometry: tuple[int, ...],
) -> None:  # fmt: skip
    src_offset, src_pitch, dst_offset, dst_pitch, width, height = geometry
    src = pattern(4096)
    dst = bytearray(4096)
    with pytest.raises(ValueError):
        copy_frame(src, src_offset, src_pitch, dst, dst_offset, dst_pitch, width, height)
    with pytest.raises(ValueError, match="CopyThreads.submit (source|destination): "):
        ct.submit(1, src, src_offset, src_pitch, dst, dst_offset, dst_pitch, width, height)
    assert (ct.queued, ct.running, ct.threads) == (0, 0, 0)
    assert ct.finished() == []
    assert dst == bytes(4096)
    assert select.select([ct], [], [], 0)[0] == []


def test_a_one_row_frame_ignores_its_pitches_however_large(
    ct: CopyThreads,
) -> None:
    # (copy_frame raises numpy's OverflowError for such a pitch; no caller passes one.)
    dst = bytearray(8)
    ct.submit(1, b"abcdefgh", 2, 2**64, dst, 1, 2**70, 5, 1)
    assert wait_ids(ct, 1) == [1]
    assert dst == b"\0cdefg\0\0"


def test_a_read_only_destination_is_refused(
    ct: CopyThreads,
) -> None:
    src = pattern(256)
    for read_only in (bytes(256), memoryview(bytearray(256)).toreadonly()):
        with pytest.raises(ValueError, match="read-only"):
            ct.submit(1, src, 0, 16, read_only, 0, 16, 16, 16)
    with (
        mmap.mmap(-1, 256, access=mmap.ACCESS_READ) as mapped,
        pytest.raises(ValueError, match="read-only"),
    ):
        ct.submit(1, src, 0, 16, mapped, 0, 16, 16, 16)
    assert (ct.queued, ct.threads, ct.finished()) == (0, 0, [])


def test_arguments_of_the_wrong_kind_are_type_or_overflow_errors(
    ct: CopyThreads,
) -> None:
    src, dst = pattern(256), bytearray(256)
    number: Any = 42
    text: Any = "not a buffer"
    nothing: Any = None
    real: Any = 0.0
    with pytest.raises(TypeError):
        ct.submit(1, number, 0, 16, dst, 0, 16, 16, 16)
    with pytest.raises(TypeError):
        ct.submit(1, src, 0, 16, text, 0, 16, 16, 16)
    with pytest.raises(TypeError):
        ct.submit(1, src, 0, 16, nothing, 0, 16, 16, 16)
    with pytest.raises(TypeError):
        ct.submit(1, src, real, 16, dst, 0, 16, 16, 16)
    with pytest.raises(TypeError):
        ct.submit(text, src, 0, 16, dst, 0, 16, 16, 16)
    for bad_id in (-1, 2**64):
        with pytest.raises(OverflowError):
            ct.submit(bad_id, src, 0, 16, dst, 0, 16, 16, 16)
    with pytest.raises(TypeError):
        ct.submit(1, src, 0, 16, dst, 0, 16, 16)  # type: ignore[call-arg]
    assert (ct.queued, ct.threads, ct.finished()) == (0, 0, [])
    assert dst == bytes(256)
    # The largest id, by keyword.
    ct.submit(
        job_id=2**64 - 1, src=src, src_offset=0, src_pitch=16, dst=dst, dst_offset=0,
        dst_pitch=16, width_bytes=16, height=16,
    )  # fmt: skip
    assert wait_ids(ct, 1) == [2**64 - 1]
    assert dst == src


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((0,), ValueError), ((257,), ValueError), ((-1,), ValueError), ((2**70,), ValueError),
        ((1, 0.0), ValueError), ((1, -1.0), ValueError), ((1, float("nan")), ValueError),
        (("2",), TypeError), ((2.0,), TypeError),
    ],
)  # fmt: skip
def test_a_pool_is_made_with_1_to_256_threads_and_a_positive_idle_time(
    args: tuple[object, ...], error: type[Exception]
) -> None:
    with pytest.raises(error):
        pool(*args)  # type: ignore[arg-type]


def test_many_copies_across_threads_come_back_once_each_within_max_threads() -> None:
    jobs = 400
    src = pattern(64 * 1024, seed=1)
    dst = bytearray(jobs * 1024)
    expected = bytearray(dst)
    most = 0
    with pool(3) as ct:
        assert ct.threads == 0  # started by submit, not before
        for i in range(jobs):
            # every fourth copy is empty: its id comes back all the same
            height = 0 if i % 4 == 0 else 8
            ct.submit(i, src, (i * 97) % 4096, 1024, dst, i * 1024, 128, 128, height)
            reference_copy(src, (i * 97) % 4096, 1024, expected, i * 1024, 128, 128, height)
            most = max(most, ct.threads)
        ids = wait_ids(ct, jobs)
        assert ct.finished() == []
        assert 1 <= most <= 3
        assert ct.threads <= 3
    assert sorted(ids) == list(range(jobs))
    assert dst == expected


def test_zero_sized_copies_come_back(ct: CopyThreads) -> None:
    dst = bytearray(16)
    ct.submit(1, b"", 0, 0, dst, 0, 0, 0, 0)
    ct.submit(2, b"abcd", 4, 0, dst, 16, 0, 0, 5)  # offsets at the very end: touch nothing
    ct.submit(3, b"abcd", 0, 4, dst, 0, 4, 4, 0)
    assert sorted(wait_ids(ct, 3)) == [1, 2, 3]
    assert dst == bytes(16)


def test_a_copy_holds_its_source_until_finished_returns_its_id(
    ct: CopyThreads,
) -> None:
    mapped = mmap.mmap(-1, 4 * MiB)
    mapped.write(pattern(4 * MiB))
    view = memoryview(bytearray(pattern(MiB, seed=5)))
    dst = bytearray(5 * MiB)
    ct.submit(1, mapped, 0, MiB, dst, 0, MiB, MiB, 4)
    ct.submit(2, view, 0, MiB, dst, 4 * MiB, MiB, MiB, 1)
    with pytest.raises(BufferError):
        mapped.close()
    with pytest.raises(BufferError):
        view.release()
    # Finished, but not reaped: still held.
    wait_until(lambda: ct.queued == 0 and ct.running == 0)
    assert select.select([ct], [], [], WAIT)[0] == [ct]
    with pytest.raises(BufferError):
        mapped.close()
    with pytest.raises(BufferError):
        view.release()
    assert sorted(wait_ids(ct, 2)) == [1, 2]
    assert dst[: 4 * MiB] == mapped[:] and dst[4 * MiB :] == view
    mapped.close()
    view.release()


def test_a_copy_holds_its_destination_until_finished_returns_its_id(
    ct: CopyThreads,
) -> None:
    dst = bytearray(MiB)
    ct.submit(1, pattern(MiB), 0, 1024, dst, 0, 1024, 1024, 1024)
    with pytest.raises(BufferError):
        dst.extend(b"x")  # a bytearray cannot move while exported
    assert wait_ids(ct, 1) == [1]
    dst.extend(b"x")
    assert dst == pattern(MiB) + b"x"


def test_close_copies_every_queued_job_then_ends_the_threads() -> None:
    jobs = 8
    src = mmap.mmap(-1, 8 * MiB)
    src.write(pattern(8 * MiB, seed=9))
    dst = bytearray(jobs * 8 * MiB)
    fds = open_fds()
    ct = pool(1)
    for i in range(jobs):
        ct.submit(i, src, 0, 4096, dst, i * 8 * MiB, 4096, 4096, 2048)
    # Every job finished and none was reaped: close() returns them all.
    assert sorted(ct.close()) == [(i, 0) for i in range(jobs)]
    assert all(dst[i * 8 * MiB : (i + 1) * 8 * MiB] == src[:] for i in range(jobs))
    assert (ct.threads, ct.queued, ct.running, ct.finished()) == (0, 0, 0, [])
    src.close()  # every export released
    dst.extend(b"x")
    with pytest.raises(ValueError):
        ct.fileno()
    with pytest.raises(RuntimeError):
        ct.submit(99, b"ab", 0, 2, dst, 0, 2, 2, 1)
    assert ct.close() == []
    assert open_fds() == fds


def test_close_returns_the_jobs_finished_returned_not_in_finish_order() -> None:
    dst = bytearray(5)
    ct = pool(1)  # one thread: jobs finish in the order given
    ct.submit(0, b"a", 0, 1, dst, 0, 1, 1, 1)
    ct.submit(1, b"b", 0, 1, dst, 1, 1, 1, 1)
    wait_until(lambda: ct.queued == 0 and ct.running == 0)
    assert ct.finished() == [(0, 0), (1, 0)]
    for i in (4, 2, 3):
        ct.submit(i, b"cde"[i - 2 : i - 1], 0, 1, dst, i, 1, 1, 1)
    assert ct.close() == [(4, 0), (2, 0), (3, 0)]
    assert dst == b"abcde"
    assert ct.close() == []
    dst.extend(b"x")  # every export released


def test_a_closed_pool_refuses_work_and_returns_no_ids() -> None:
    with pool(2) as ct:
        pass
    with pytest.raises(RuntimeError):
        ct.submit(1, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1)
    with pytest.raises(ValueError):
        ct.fileno()
    assert ct.finished() == []


def test_idle_threads_end_after_idle_seconds_and_new_ones_start() -> None:
    with pool(2, idle_seconds=0.05) as ct:
        dst = bytearray(4096)
        for i in range(4):
            ct.submit(i, pattern(4096), 0, 64, dst, 0, 64, 64, 64)
        assert sorted(wait_ids(ct, 4)) == [0, 1, 2, 3]
        wait_until(lambda: ct.threads == 0)
        ct.submit(5, b"abcd", 0, 4, dst, 0, 4, 4, 1)
        assert ct.threads == 1
        assert wait_ids(ct, 1) == [5]
        assert dst[:4] == b"abcd"
        wait_until(lambda: ct.threads == 0)


def test_a_pool_dropped_unclosed_finishes_its_copies_and_leaks_nothing() -> None:
    fds = open_fds()
    src = mmap.mmap(-1, 4 * MiB)
    src.write(pattern(4 * MiB, seed=2))
    dst = bytearray(16 * MiB)
    ct = pool(2)
    for i in range(4):
        ct.submit(i, src, 0, 2048, dst, i * 4 * MiB, 2048, 2048, 2048)
    del ct
    gc.collect()
    assert all(dst[i * 4 * MiB : (i + 1) * 4 * MiB] == src[:] for i in range(4))
    src.close()  # the exports were released
    assert open_fds() == fds


@pytest.mark.parametrize("held_as", ["destination", "flip arg"])
def test_a_cycle_through_a_finished_copy_is_collected(held_as: str) -> None:
    class Frame(ctypes.Structure):
        _fields_ = [("pixels", ctypes.c_char * 64)]

    def copy_into(frame: Frame, fd: int) -> None:
        ct = pool(1)
        frame.pool = ct  # the frame is a job's buffer: a cycle
        if held_as == "destination":
            ct.submit(1, b"x" * 64, 0, 64, frame, 0, 64, 64, 1)
        else:
            ct.submit(1, b"x" * 64, 0, 64, bytearray(64), 0, 64, 64, 1,
                      flip=(fd, termios.FIONREAD, frame))  # fmt: skip
        wait_until(lambda: ct.queued == 0 and ct.running == 0)

    frame = Frame()
    with pipe_holding(3) as fd:
        copy_into(frame, fd)
    gone = weakref.ref(frame)
    del frame
    gc.collect()
    assert gone() is None


def test_a_copy_runs_while_python_holds_the_gil() -> None:
    # Were a worker to need the GIL it would wait for this thread to offer it: with a 1000 s
    # switch interval, never within WAIT. The loop below only reads counters (no GIL release).
    src = bytes(range(256)) * (64 * MiB // 256)
    dst = bytearray(64 * MiB)
    interval = sys.getswitchinterval()
    with pool(1) as ct:
        sys.setswitchinterval(1000)
        try:
            ct.submit(1, src, 0, MiB, dst, 0, MiB, MiB, 64)
            deadline = time.monotonic() + WAIT
            while (ct.queued or ct.running) and time.monotonic() < deadline:
                pass
            done = ct.queued == 0 and ct.running == 0
        finally:
            sys.setswitchinterval(interval)
        assert done, f"a 64 MiB copy did not finish in {WAIT} s of Python holding the GIL"
        assert wait_ids(ct, 1) == [1]
    assert dst == src


# In a process of its own: address space limited to what it uses, so that a thread's stack
# cannot be mapped and pthread_create fails (EAGAIN), as it does for root too.
THREAD_START_FAILS = """
import resource, select
from displback.backend._copythreads import CopyThreads

def limit_address_space():
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size * 1024 + (4 << 20), hard))

src, dst, small = bytes(64 << 20), bytearray(64 << 20), bytearray(2)
ct = CopyThreads(2)
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
limit_address_space()
try:
    ct.submit(1, b"ab", 0, 2, small, 0, 2, 2, 1)
except OSError as error:
    print("refused", error.errno, ct.queued, ct.threads, ct.finished(), bytes(small))
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
ct.submit(2, src, 0, 1 << 20, dst, 0, 1 << 20, 1 << 20, 64)
limit_address_space()
ct.submit(3, b"ab", 0, 2, small, 0, 2, 2, 1)  # a second thread cannot start: queued
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
ids = []
while len(ids) < 2 and select.select([ct], [], [], 10)[0]:
    ids += [job_id for job_id, error in ct.finished()]
print("copied", sorted(ids), bytes(small))
"""


def test_a_copy_no_thread_can_be_started_for_is_refused_with_oserror() -> None:
    native()
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", THREAD_START_FAILS],
        capture_output=True, text=True, timeout=3 * WAIT, cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"refused {errno.EAGAIN} 0 0 [] b'\\x00\\x00'",
        "copied [2, 3] b'ab'",
    ]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_pool_used_in_a_forked_child_raises_and_does_not_crash() -> None:
    ct = pool(1)
    dst = bytearray(4)
    ct.submit(1, b"abcd", 0, 4, dst, 0, 4, 4, 1)
    pid = os.fork()
    if pid == 0:  # the child: no thread of the pool lives here
        code = 1
        with contextlib.suppress(BaseException):
            try:
                ct.submit(2, b"abcd", 0, 4, dst, 0, 4, 4, 1)
            except RuntimeError:
                code = 0
            ct.close()
            del ct
            gc.collect()
        os._exit(code)
    deadline = time.monotonic() + WAIT
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        assert time.monotonic() < deadline, "the forked child hangs"
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert wait_ids(ct, 1) == [1]
    ct.close()
    assert dst == b"abcd"


# ---- flips: an ioctl on the copy's thread right after the copy ----

BAD_FD = 2**31 - 1  # beyond any RLIMIT_NOFILE: EBADF
DRM_IOCTL_MODE_PAGE_FLIP = 0xC01864B0  # _IOWR('d', 0xB0, 24 bytes): top bit set


def test_a_flip_runs_after_the_copy_on_its_thread_and_its_result_lands_in_arg(
    ct: CopyThreads,
) -> None:
    # arg is the copy's first 4 bytes: the ioctl ran after the copy, or the copy would have
    # overwritten its result.
    dst = bytearray(8)
    with pipe_holding(4321) as fd:
        ct.submit(1, b"\xff" * 8, 0, 8, dst, 0, 8, 8, 1,
                  flip=(fd, termios.FIONREAD, memoryview(dst)[:4]))  # fmt: skip
        assert wait_finished(ct, 1) == [(1, 0)]
    assert c_int(dst) == 4321
    assert dst[4:] == b"\xff" * 4


def test_each_job_reports_its_own_errno_in_finish_order() -> None:
    args = [bytearray(4), bytearray(TERMIOS), bytearray(4)]
    dst = bytearray(16)
    with pool(1) as ct, pipe_holding(77) as fd:  # one thread: jobs finish in the order given
        ct.submit(1, b"abcd", 0, 4, dst, 0, 4, 4, 1)
        ct.submit(2, b"efgh", 0, 4, dst, 4, 4, 4, 1, flip=(fd, termios.FIONREAD, args[0]))
        ct.submit(3, b"ijkl", 0, 4, dst, 8, 4, 4, 1, flip=(fd, termios.TCGETS, args[1]))
        ct.submit(4, b"mnop", 0, 4, dst, 12, 4, 4, 1, flip=(BAD_FD, termios.FIONREAD, args[2]))
        # The largest request is taken; the kernel sees its low 32 bits, a request that
        # encodes 16383 bytes: arg holds them.
        ct.submit(5, b"", 0, 0, dst, 0, 0, 0, 0, flip=(fd, 2**64 - 1, bytearray(16383)))
        assert wait_finished(ct, 5) == [
            (1, 0), (2, 0), (3, errno.ENOTTY), (4, errno.EBADF), (5, errno.ENOTTY),
        ]  # fmt: skip
    assert dst == b"abcdefghijklmnop"
    assert [c_int(arg) for arg in args] == [77, 0, 0]


def test_a_quiet_flip_that_succeeds_leaves_the_eventfd_unreadable_until_quiet_is_unset(
    ct: CopyThreads,
) -> None:
    assert ct.quiet is False
    ct.quiet = True
    assert ct.quiet is True
    arg = bytearray(4)
    with pipe_holding(9) as fd:
        ct.submit(1, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1, flip=(fd, termios.FIONREAD, arg))
        wait_until(lambda: ct.queued == 0 and ct.running == 0)
        assert not readable(ct, 0.05)
        ct.quiet = True  # setting it again wakes nothing
        assert not readable(ct, 0.05)
        ct.quiet = False  # a job finished quietly waits: the loop's reaper is woken
        assert readable(ct, WAIT)
        assert ct.finished() == [(1, 0)]
        assert c_int(arg) == 9
        ct.quiet = False  # nothing waits: nothing to wake
        assert not readable(ct, 0.05)


def test_a_quiet_pool_is_woken_by_a_flip_that_fails_or_a_job_without_one(
    ct: CopyThreads,
) -> None:
    ct.quiet = True
    with pipe_holding(9) as fd:
        for job_id, flip, error in [
            (1, (fd, termios.TCGETS, bytearray(TERMIOS)), errno.ENOTTY),
            (2, (BAD_FD, termios.FIONREAD, bytearray(4)), errno.EBADF),
            (3, None, 0),
        ]:
            ct.submit(job_id, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1, flip=flip)
            assert readable(ct, WAIT), f"job {job_id} finished without waking the loop"
            assert ct.finished() == [(job_id, error)]


def test_a_pool_that_is_not_quiet_is_woken_by_every_job(ct: CopyThreads) -> None:
    with pipe_holding(9) as fd:
        for job_id, flip, error in [
            (1, (fd, termios.FIONREAD, bytearray(4)), 0),
            (2, (fd, termios.TCGETS, bytearray(TERMIOS)), errno.ENOTTY),
            (3, None, 0),
        ]:
            ct.submit(job_id, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1, flip=flip)
            assert readable(ct, WAIT), f"job {job_id} finished without waking the loop"
            assert ct.finished() == [(job_id, error)]


def test_wait_for_returns_a_quiet_flip_finished_meanwhile(ct: CopyThreads) -> None:
    ct.quiet = True
    with pipe_holding(5) as fd:
        ct.submit(1, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1,
                  flip=(fd, termios.FIONREAD, bytearray(4)))  # fmt: skip
        wait_until(lambda: ct.queued == 0 and ct.running == 0)
        assert not readable(ct, 0.05)
        assert ct.finished() == [(1, 0)]  # without wait_for too: the loop reaps at will
        ct.submit(2, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1,
                  flip=(fd, termios.FIONREAD, bytearray(4)))  # fmt: skip
        wait_until(lambda: ct.queued == 0 and ct.running == 0)
        assert ct.finished(wait_for=2) == [(2, 0)]
        assert not readable(ct, 0.05)


def test_wait_for_clears_the_eventfd_a_job_signalled_and_a_later_job_signals_again(
    ct: CopyThreads,
) -> None:
    """finished(wait_for=) reads the eventfd only when a job signalled it since it was last
    cleared (it skips the system call on every quiet flip it settles); when one did, it
    clears it like the reaper's call, and a job finished after that makes it readable
    again: no wake-up is lost, none is left over."""
    ct.quiet = True
    with pipe_holding(5) as fd:
        ct.submit(1, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1)  # no flip: it signals
        assert readable(ct, WAIT)
        ct.submit(2, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1,
                  flip=(fd, termios.FIONREAD, bytearray(4)))  # fmt: skip (quiet)
        assert ct.finished(wait_for=2) == [(1, 0), (2, 0)]
        assert not readable(ct, 0.05)  # cleared: the reaper is not woken for nothing
        ct.submit(3, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1,
                  flip=(fd, termios.FIONREAD, bytearray(4)))  # fmt: skip (quiet)
        assert ct.finished(wait_for=3) == [(3, 0)]  # nothing signalled: no read, none needed
        assert not readable(ct, 0.05)
        ct.submit(4, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1)
        assert readable(ct, WAIT)
        assert ct.finished() == [(4, 0)]
        assert not readable(ct, 0.05)


def test_wait_for_a_job_still_copying_returns_once_it_and_those_before_it_finished() -> None:
    src = bytes(range(256)) * (64 * MiB // 256)
    dst = bytearray(64 * MiB)
    args = [bytearray(4) for _ in range(3)]
    with pool(1) as ct, pipe_holding(123) as fd:  # one thread: 3 x 64 MiB one after another
        ct.quiet = True
        for i, arg in enumerate(args):
            ct.submit(i, src, 0, MiB, dst, 0, MiB, MiB, 64, flip=(fd, termios.FIONREAD, arg))
        done = ct.finished(wait_for=2)
        assert done == [(0, 0), (1, 0), (2, 0)]
        assert [c_int(arg) for arg in args] == [123] * 3
        assert dst == src
        assert (ct.queued, ct.running) == (0, 0)
        assert not readable(ct, 0.05)  # all quiet: woken by nothing


def call_within_wait(call: Callable[[], object]) -> object:
    """``call()`` in a thread, failing the test when it does not return within WAIT s."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), f"still blocked after {WAIT} s"
    return result[0]


def test_wait_for_a_job_not_queued_or_running_returns_at_once(ct: CopyThreads) -> None:
    assert call_within_wait(lambda: ct.finished(wait_for=7)) == []  # never given
    ct.submit(7, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1)
    assert wait_ids(ct, 1) == [7]
    assert call_within_wait(lambda: ct.finished(wait_for=7)) == []  # reaped
    ct.quiet = True
    with pipe_holding(1) as fd:
        ct.submit(8, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1,
                  flip=(fd, termios.FIONREAD, bytearray(4)))  # fmt: skip
        wait_until(lambda: ct.queued == 0 and ct.running == 0)
    # Finished, not reaped: returned at once, with the ids of jobs not waited for.
    assert call_within_wait(lambda: ct.finished(wait_for=2**64 - 1)) == [(8, 0)]
    ct.close()
    assert call_within_wait(lambda: ct.finished(wait_for=8)) == []


def test_wait_for_refuses_what_is_not_a_job_id(ct: CopyThreads) -> None:
    text: Any = "1"
    with pytest.raises(TypeError):
        ct.finished(wait_for=text)
    for bad in (-1, 2**64):
        with pytest.raises(OverflowError):
            ct.finished(wait_for=bad)


def test_wait_for_waits_with_the_gil_released() -> None:
    # With a 1000 s switch interval another Python thread runs only when this one releases
    # the GIL: the ticker, let go just before the wait, ticks during it, not after it.
    src = bytes(range(256)) * (64 * MiB // 256)
    dst = bytearray(64 * MiB)
    go = threading.Event()
    order: list[str] = []

    def tick() -> None:
        go.wait(WAIT)
        order.append("ticked")

    ticker = threading.Thread(target=tick, daemon=True)
    interval = sys.getswitchinterval()
    with pool(1) as ct:  # one thread: 8 x 64 MiB, the wait lasts
        for i in range(8):
            ct.submit(i, src, 0, MiB, dst, 0, MiB, MiB, 64)
        sys.setswitchinterval(1000)
        try:
            ticker.start()
            go.set()
            done = ct.finished(wait_for=7)
            order.append("waited")
        finally:
            sys.setswitchinterval(interval)
        ticker.join(WAIT)
    assert order == ["ticked", "waited"]
    assert [job_id for job_id, _ in done] == list(range(8))


@pytest.mark.parametrize(
    ("flip", "error"),
    [
        ([3, termios.FIONREAD, "arg"], TypeError),  # not a tuple
        ((3, termios.FIONREAD), TypeError),  # too short
        ((3, termios.FIONREAD, "arg", None), TypeError),  # too long
        (("3", termios.FIONREAD, "arg"), TypeError),
        ((3, float(termios.FIONREAD), "arg"), TypeError),
        ((-1, termios.FIONREAD, "arg"), ValueError),
        ((-(2**70), termios.FIONREAD, "arg"), ValueError),
        ((2**31, termios.FIONREAD, "arg"), OverflowError),
        ((3, -1, "arg"), OverflowError),
        ((3, 2**64, "arg"), OverflowError),
        ((3, termios.FIONREAD, b"read"), BufferError),  # read-only
        ((3, termios.FIONREAD, "read-only view"), BufferError),
        ((3, termios.FIONREAD, 42), TypeError),  # not a buffer
        ((3, DRM_IOCTL_MODE_PAGE_FLIP, "arg"), ValueError),  # 4 bytes: it moves 24
    ],
)  # fmt: skip
def test_a_bad_flip_is_refused_nothing_is_queued_and_no_export_is_held(
    ct: CopyThreads, flip: Any, error: type[Exception]
) -> None:
    arg = bytearray(4)
    src, dst = bytearray(b"abcd"), bytearray(4)
    held = memoryview(bytearray(4)).toreadonly()
    if isinstance(flip, tuple | list):
        flip = type(flip)(
            {"arg": arg, "read-only view": held}.get(x, x) if isinstance(x, str) else x
            for x in flip
        )
    refs = sys.getrefcount(arg)
    with pytest.raises(error):
        ct.submit(1, src, 0, 4, dst, 0, 4, 4, 1, flip=flip)
    assert (ct.queued, ct.running, ct.threads, ct.finished()) == (0, 0, 0, [])
    assert not readable(ct)
    assert sys.getrefcount(arg) == refs
    for buffer in (arg, src, dst):
        buffer.extend(b"x")  # no export left: each can be resized
    held.release()
    assert dst == bytes(4) + b"x"


def test_the_flips_arg_is_held_until_the_job_is_reaped(ct: CopyThreads) -> None:
    arg = bytearray(4)
    with pipe_holding(11) as fd:
        ct.quiet = True
        ct.submit(1, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1, flip=(fd, termios.FIONREAD, arg))
        wait_until(lambda: ct.queued == 0 and ct.running == 0)
        with pytest.raises(BufferError):
            arg.extend(b"x")  # finished, not reaped: still exported
        assert ct.finished(wait_for=1) == [(1, 0)]
    arg.extend(b"x")
    assert c_int(arg) == 11 and len(arg) == 5


def test_close_returns_quiet_flips_not_reaped_with_their_errno_and_releases_them() -> None:
    args = [bytearray(4), bytearray(TERMIOS)]
    ct = pool(1)
    ct.quiet = True
    with pipe_holding(3) as fd:
        ct.submit(1, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1, flip=(fd, termios.FIONREAD, args[0]))
        ct.submit(2, b"ab", 0, 2, bytearray(2), 0, 2, 2, 1, flip=(fd, termios.TCGETS, args[1]))
        assert ct.close() == [(1, 0), (2, errno.ENOTTY)]
    assert ct.close() == []
    for arg in args:
        arg.extend(b"x")
    assert c_int(args[0]) == 3


def test_quiet_is_a_bool_and_may_be_set_once_closed() -> None:
    ct = pool(1)
    number: Any = 1
    with pytest.raises(TypeError):
        ct.quiet = number
    with pytest.raises(TypeError):
        del ct.quiet
    assert ct.quiet is False
    ct.close()
    ct.quiet = True
    ct.quiet = False
    assert ct.quiet is False
