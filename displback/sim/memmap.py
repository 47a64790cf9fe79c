"""Contiguous mappings of scattered pages of a domain's RAM file, the way gntdev maps grants.

A simulated domain's RAM is one memfd; its pages are addressed by page frame number (pfn =
offset / 4096). Mapping a list of pfns reserves one anonymous span with Python's ``mmap``
(which keeps count of exported buffers and refuses to close while views exist), then
replaces each run of consecutive pfns in it with a ``MAP_SHARED | MAP_FIXED`` mapping of the
memfd through libc. The result is real shared memory: another process that maps the same
pages sees every store.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os

from displback.mapping import MappedMemory, MappedRegion
from displback.protocol.constants import PAGE_SIZE

__all__ = ["PageMapping", "runs_of"]

_MAP_FIXED = 0x10
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]


def runs_of(pfns: list[int]) -> list[tuple[int, int, int]]:
    """Split ``pfns`` into ``(index, first_pfn, length)`` runs of consecutive frames."""
    runs: list[tuple[int, int, int]] = []
    for index, pfn in enumerate(pfns):
        if runs and runs[-1][1] + runs[-1][2] == pfn:
            start, first, length = runs[-1]
            runs[-1] = (start, first, length + 1)
        else:
            runs.append((index, pfn, 1))
    return runs


def map_pages(fd: int, pfns: list[int], *, writable: bool) -> MappedMemory:
    """``pfns`` of the RAM file ``fd`` mapped contiguously (``fd`` may be closed afterwards:
    the mapping keeps the file)."""
    if not pfns:
        raise OSError(errno.EINVAL, "no pages to map")
    size = len(pfns) * PAGE_SIZE
    mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
    anchor = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(anchor)
    del anchor
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        for index, first, length in runs_of(pfns):
            addr = _libc.mmap(
                base + index * PAGE_SIZE,
                length * PAGE_SIZE,
                prot,
                mmap.MAP_SHARED | _MAP_FIXED,
                fd,
                first * PAGE_SIZE,
            )
            if addr == _MAP_FAILED:
                err = ctypes.get_errno()
                raise OSError(err, f"mmap of pfn {first}: {os.strerror(err)}")
    except BaseException:
        mm.close()
        raise
    return MappedMemory(mm, writable)


class PageMapping(MappedRegion):
    """``pfns`` of the RAM file ``fd`` mapped contiguously; ``buffer`` is read-only unless
    ``writable``. ``fd`` may be closed by the caller afterwards (the mapping keeps the file).
    """

    def __init__(self, fd: int, pfns: list[int], *, writable: bool) -> None:
        super().__init__(map_pages(fd, pfns, writable=writable))
        self.pfns = list(pfns)
        self.writable = writable
