"""Copy-mode frame copies on native threads that never take the GIL (_copythreads.c).

Built by setup.py when a compiler and Python's headers are there; without it the backend
copies in Python worker threads (displback.backend.copies).
"""

from types import TracebackType
from typing import Self, final

from _typeshed import ReadableBuffer, WriteableBuffer

@final
class CopyThreads:
    """Up to ``max_threads`` (1 to 256) native threads copying rows between buffers, each
    copy optionally followed by a KMS page flip on the same thread.

    A thread starts when a job finds no idle one and ends after ``idle_seconds`` without a
    job. :meth:`fileno` is an eventfd, readable when :meth:`finished` has jobs to return (but
    those whose flip succeeded while :attr:`quiet`: the loop reaps them on the flip's event).
    """

    def __init__(self, max_threads: int, idle_seconds: float = 10.0) -> None: ...
    def fileno(self) -> int:
        """The eventfd; ValueError once closed."""
    def submit(
        self,
        job_id: int,
        src: ReadableBuffer,
        src_offset: int,
        src_pitch: int,
        dst: WriteableBuffer,
        dst_offset: int,
        dst_pitch: int,
        width_bytes: int,
        height: int,
        flip: tuple[int, int, WriteableBuffer] | None = None,
    ) -> None:
        """Queue a copy of ``height`` rows of ``width_bytes`` bytes (row r from
        ``src[src_offset + r*src_pitch]`` to ``dst[dst_offset + r*dst_pitch]``), checked
        first with ``pixels.copy_frame``'s rules; the exports are held until reaped.

        ``flip=(fd, request, arg)``: then ``ioctl(fd, request, arg)`` on the copy's thread,
        so a page flip waits for no event-loop pass (tried up to 100 times while EINTR or
        EAGAIN). ``arg`` is writable (BufferError) and at least the size ``request`` encodes
        (ValueError); ``request`` is 0 to 2**64-1."""
    def finished(self, wait_for: int | None = None) -> list[tuple[int, int]]:
        """``(job_id, errno)`` of the copies finished since the last call, in finish order
        (errno of the job's flip; 0 when it succeeded or there was none). Never blocks but
        while the job ``wait_for`` is queued or running: then it waits (GIL released)."""
    def close(self) -> list[tuple[int, int]]:
        """Copy every queued job, end the threads, release every export; returns
        ``(job_id, errno)`` of the jobs :meth:`finished` has not returned ([] once closed)."""
    @property
    def threads(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def quiet(self) -> bool:
        """True: a job whose flip succeeded does not make :meth:`fileno` readable. Set
        False, :meth:`fileno` is made readable if such a job waits. False at first."""
    @quiet.setter
    def quiet(self, value: bool) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
