"""Memory mappings that can only close when no view of them is left, for every layer.

Grant and dma-buf mappings, real (``/dev/xen/gntdev``) or simulated (:mod:`displback.sim`),
and the displays' CPU mappings of imported dma-bufs hand out one :class:`memoryview` of an
``mmap``; Python refuses to close an ``mmap`` while a view of it is exported, so closing must
release our view first and make a fresh one if someone else still holds theirs.
:class:`MappedMemory` does that once for all of them, :class:`MappedRegion` is the one base
class of every mapping object (``buffer``, ``closed``, ``close`` and what else closing
undoes), :class:`ClosesOnExit` gives each its ``with`` block, and :class:`DmabufMapping` is
the one interface of a dma-buf mapped for the CPU, whoever mapped it. Every layer may import
it.

May import: nothing of displback.
"""

from __future__ import annotations

import abc
import mmap
from collections.abc import Callable
from types import TracebackType
from typing import Protocol, Self

__all__ = [
    "ClosesOnExit",
    "DmabufImporter",
    "DmabufMapping",
    "MappedMemory",
    "MappedRegion",
    "MemoryMapping",
]


class ClosesOnExit(abc.ABC):
    """Mixin: ``with mapping:`` calls :meth:`close` when the block ends."""

    __slots__ = ()

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class MappedMemory:
    """An ``mmap`` with one memoryview of it that can be closed only when no view is left."""

    def __init__(self, mm: mmap.mmap, writable: bool) -> None:
        self._mmap: mmap.mmap | None = mm
        self._writable = writable
        self._view = self._new_view()

    def _new_view(self) -> memoryview:
        assert self._mmap is not None
        view = memoryview(self._mmap)
        return view if self._writable else view.toreadonly()

    @property
    def closed(self) -> bool:
        return self._mmap is None

    @property
    def buffer(self) -> memoryview:
        if self._mmap is None:
            raise ValueError("mapping is closed")
        return self._view

    def close(self) -> bool:
        """``munmap``; False if already closed. ``BufferError`` while views are held."""
        if self._mmap is None:
            return False
        self._view.release()
        try:
            self._mmap.close()
        except BufferError:
            self._view = self._new_view()
            raise
        self._mmap = None
        return True


class MappedRegion(ClosesOnExit):
    """A mapping object over one :class:`MappedMemory`: ``buffer``, ``closed``, ``close``.

    A subclass says in :meth:`_unmapped` what else closing undoes (unmap the grants in the
    kernel, drop a dma-buf reference); it runs once, after the memory is unmapped.
    """

    def __init__(self, memory: MappedMemory) -> None:
        self._memory = memory

    @property
    def buffer(self) -> memoryview:
        """The mapped memory, format ``B`` (read-only unless mapped writable)."""
        return self._memory.buffer

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has unmapped the memory."""
        return self._memory.closed

    def close(self) -> None:
        """Unmap; ``BufferError`` (and nothing unmapped) while other views of it are alive."""
        if self._memory.close():
            self._unmapped()

    def _unmapped(self) -> None:
        """What closing undoes besides the mapping (nothing here)."""


class MemoryMapping(Protocol):
    """What every mapping hands its user: the memory, ``close``, and a ``with`` block."""

    @property
    def buffer(self) -> memoryview:
        """The mapped memory, format ``B``."""
        ...

    def close(self) -> None:
        """Unmap (and undo what mapping did); ``BufferError`` while views of it are held."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class DmabufMapping(MemoryMapping, Protocol):
    """A dma-buf mapped for CPU access (a platform's import, or a display's ``mmap``).

    It holds its own reference to the dma-buf, so the fd it came from may be closed at once;
    closing it drops that reference.
    """


DmabufImporter = Callable[[int], DmabufMapping]
"""Maps a dma-buf fd; raises OSError when it cannot. Closing the fd must not end the mapping."""
