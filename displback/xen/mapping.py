"""Memory mappings that can only close when no view of them is left, for every platform.

Grant and dma-buf mappings, real (``/dev/xen/gntdev``) or simulated (:mod:`displback.sim`),
hand out one :class:`memoryview` of an ``mmap``; Python refuses to close an ``mmap`` while a
view of it is exported, so closing must release our view first and make a fresh one if
someone else still holds theirs. :class:`MappedMemory` does that once for all of them, and
:class:`ClosesOnExit` gives each mapping its ``with`` block.
"""

from __future__ import annotations

import abc
import mmap
from types import TracebackType
from typing import Self

__all__ = ["ClosesOnExit", "MappedMemory"]


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
