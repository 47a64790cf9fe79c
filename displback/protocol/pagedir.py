"""The grant-reference page directory (displif §7): read, fill and build its page chain.

DBUF_CREATE and GET_EDID pass an arbitrary number of grant references through a chain of
directory pages. Each 4096-byte page holds ``gref_dir_next_page`` (u32, the grant ref of the
next directory page, 0 = end of list) followed by up to 1023 refs ``gref[k]``. The number of
refs is never sent: both sides derive it from ``buffer_sz``, so the chain has exactly
``ceil(nrefs / 1023)`` pages and the last one holds the remainder.

Everything here is sans-I/O. The backend maps one directory page at a time (the I/O layer's
job), hands the mapped bytes to :class:`DirectoryReader` (guest-allocated buffers: collect the
refs) or :class:`DirectoryFiller` (backend-allocated buffers: write our refs into the guest's
pages), unmaps it, and asks for :attr:`next_page_gref`. Both are driven by one
:class:`_ChainWalker`, which owns the rules about the chain itself:

* the first directory gref must be non-zero (when any ref is needed at all);
* while refs are still needed, ``gref_dir_next_page`` must be non-zero (a premature 0 is an
  error) and must not name a directory page already seen (a loop);
* the **last** page must say 0. Linux's frontend always writes ``XEN_GREF_LIST_END`` (0) there,
  in guest-allocated and backend-allocated mode alike (``xen-front-pgdir-shbuf.c``), so a
  non-zero value means a chain longer than ``ceil(n / 1023)`` pages: rejected, not ignored;
* the number of refs is bounded by a caller-given limit.

A directory page is guest memory the guest can change while we look at it, so each page is
read exactly once: the reader copies the next-page field and the refs it needs into private
memory in one go and validates only the copy; the filler reads the next-page field once and
then only writes. The reader additionally rejects a buffer gref of 0 and any gref seen twice
in the same directory (buffer refs and directory-page refs share one namespace, the guest's
grant table, so a repeat anywhere is aliasing). Every violation raises :class:`ProtocolError`
with ``errno`` EINVAL; after an error the object is spent and refuses further pages.

:func:`build_directory` is the frontend side (used by the guest simulator and tests).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from displback.protocol.constants import EINVAL, GREFS_PER_DIR_PAGE, PAGE_SIZE
from displback.protocol.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_REFS",
    "DirectoryFiller",
    "DirectoryReader",
    "build_directory",
    "dir_pages_for",
]

#: Default bound on refs per directory: gntdev maps at most 65536 grants per call.
DEFAULT_MAX_REFS: Final = 65536

_U32_MAX: Final = 0xFFFFFFFF
_NEXT: Final = struct.Struct("<I")
_REFS_OFS: Final = _NEXT.size  # gref[0] follows gref_dir_next_page


def dir_pages_for(npages: int) -> int:
    """How many directory pages list ``npages`` grant refs: ``ceil(npages / 1023)``."""
    if npages < 0:
        raise ValueError(f"negative page count {npages}")
    return -(-npages // GREFS_PER_DIR_PAGE)


def _error(message: str, what: str, value: object) -> ProtocolError:
    return ProtocolError(message, what=what, value=value, errno=EINVAL)


class _ChainWalker:
    """Walks the ``gref_dir_next_page`` chain: which page comes next, and is the link sane.

    ``nrefs`` refs need exactly ``dir_pages_for(nrefs)`` pages. :meth:`advance` takes the
    ``gref_dir_next_page`` value read (once) from the current page, plus the set of grefs the
    owner has already seen elsewhere, and either moves on or raises.
    """

    def __init__(self, first_gref: int, nrefs: int, max_refs: int) -> None:
        if max_refs < 0:
            raise ValueError(f"negative limit {max_refs}")
        if not 0 <= nrefs <= max_refs:
            raise _error(f"directory of {nrefs} grant refs (limit {max_refs})", "nrefs", nrefs)
        self.nrefs = nrefs
        self.npages = dir_pages_for(nrefs)
        self.page_index = 0
        self.dir_grefs: set[int] = set()
        if self.npages == 0:
            # Nothing to list, so no directory page exists; the first gref is not looked at.
            self.current: int | None = None
            return
        if not 0 < first_gref <= _U32_MAX:
            raise _error(f"first directory page gref {first_gref}", "gref_directory", first_gref)
        self.current = first_gref
        self.dir_grefs.add(first_gref)

    def refs_on_current_page(self) -> int:
        """How many ``gref[]`` entries the current page carries (1023 except on the last)."""
        if self.page_index + 1 < self.npages:
            return GREFS_PER_DIR_PAGE
        return self.nrefs - GREFS_PER_DIR_PAGE * self.page_index

    def check_next(self, next_gref: int, *taken: set[int]) -> None:
        """Validate the current page's ``gref_dir_next_page`` without moving; ``taken``:
        sets of grefs the owner already uses for something else."""
        last = self.page_index + 1 == self.npages
        if last:
            if next_gref != 0:
                raise _error(
                    f"directory longer than {self.npages} page(s): last page links to "
                    f"gref {next_gref}",
                    "gref_dir_next_page",
                    next_gref,
                )
            return
        if next_gref == 0:
            raise _error(
                f"directory ends after {self.page_index + 1} of {self.npages} pages",
                "gref_dir_next_page",
                next_gref,
            )
        if next_gref in self.dir_grefs:
            raise _error(
                f"directory page gref {next_gref} appears twice (loop)",
                "gref_dir_next_page",
                next_gref,
            )
        if any(next_gref in grefs for grefs in taken):
            raise _error(
                f"directory page gref {next_gref} is also a buffer gref",
                "gref_dir_next_page",
                next_gref,
            )

    def advance(self, next_gref: int) -> None:
        """Move to the next page (``next_gref`` already passed :meth:`check_next`)."""
        self.page_index += 1
        if self.page_index == self.npages:
            self.current = None
        else:
            self.current = next_gref
            self.dir_grefs.add(next_gref)


def _check_page_length(page: bytes | bytearray | memoryview) -> None:
    if len(page) != PAGE_SIZE:
        raise _error(f"directory page of {len(page)} bytes", "directory page", len(page))


class DirectoryReader:
    """Collects the buffer grant refs of a guest-written directory, one mapped page at a time.

    Use::

        reader = DirectoryReader(req.gref_directory, pages_for(req.buffer_sz))
        while (gref := reader.next_page_gref) is not None:
            with map_one_page(gref) as page:
                reader.feed(page)
        refs = reader.refs
    """

    def __init__(
        self,
        first_gref: int,
        nrefs: int,
        *,
        max_refs: int = DEFAULT_MAX_REFS,
        same_grant_table: bool = True,
    ) -> None:
        self._walker = _ChainWalker(first_gref, nrefs, max_refs)
        # Guest-allocated buffers: directory pages and buffer pages are all the guest's
        # grants, so one number used for both is aliasing. A guest reading a backend-allocated
        # directory holds the backend's refs in its own pages: two grant tables, no overlap
        # rule between them.
        self._same_table = same_grant_table
        self._refs: list[int] = []
        self._seen: set[int] = set()
        self._failed = False

    @property
    def next_page_gref(self) -> int | None:
        """Grant ref of the directory page to map and :meth:`feed` next; None when done."""
        return None if self._failed else self._walker.current

    @property
    def done(self) -> bool:
        """True once every ref has been collected."""
        return not self._failed and self._walker.current is None

    @property
    def dir_grefs(self) -> frozenset[int]:
        """Grant refs of the directory pages seen so far."""
        return frozenset(self._walker.dir_grefs)

    @property
    def refs(self) -> tuple[int, ...]:
        """The buffer's grant refs in page order; only once :attr:`done`."""
        if not self.done:
            raise RuntimeError("directory not completely read")
        return tuple(self._refs)

    def feed(self, page: bytes | bytearray | memoryview) -> None:
        """Take the mapped directory page :attr:`next_page_gref`: copy it once, validate, move on.

        Raises :class:`ProtocolError` for a bad page; the reader is then spent.
        """
        if self._walker.current is None or self._failed:
            raise RuntimeError("feed() without a pending directory page")
        try:
            self._feed(page)
        except ProtocolError:
            self._failed = True
            raise

    def _feed(self, page: bytes | bytearray | memoryview) -> None:
        _check_page_length(page)
        count = self._walker.refs_on_current_page()
        # The one read of guest memory for this page; everything below looks at the copy.
        copy = bytes(memoryview(page)[: _REFS_OFS + 4 * count])
        (next_gref,) = _NEXT.unpack_from(copy, 0)
        refs = struct.unpack_from(f"<{count}I", copy, _REFS_OFS)
        # The checks run in C, in one pass over the refs: they join the set of refs seen,
        # which grows by exactly ``count`` unless one repeats (a Python loop over the up to
        # 8187 refs of the largest buffer cost as much as the gntdev calls of its directory).
        # Only a bad page is walked ref by ref, to name the first offending one.
        seen = self._seen
        before = len(seen)
        seen.update(refs)
        if (
            len(seen) != before + count
            or 0 in seen
            or (self._same_table and not self._walker.dir_grefs.isdisjoint(refs))
        ):
            self._seen = set(self._refs)  # the refs of the pages accepted so far
            self._explain(refs)
        if self._same_table:
            self._walker.check_next(next_gref, seen)
        else:
            self._walker.check_next(next_gref)
        self._refs.extend(refs)
        self._walker.advance(next_gref)

    def _explain(self, refs: Sequence[int]) -> None:
        """Raise for the first ref of this (bad) page that is 0 or seen on an earlier page."""
        base = len(self._refs)
        fresh: set[int] = set()
        for k, ref in enumerate(refs):
            if ref == 0:
                raise _error(f"grant ref of buffer page {base + k} is 0", "gref", ref)
            if ref in fresh or ref in self._seen or (
                self._same_table and ref in self._walker.dir_grefs
            ):
                raise _error(f"grant ref {ref} appears twice (aliasing)", "gref", ref)
            fresh.add(ref)
        raise AssertionError("_explain() of a page without a bad ref")


class DirectoryFiller:
    """Writes the backend's grant refs into guest-provided, guest-chained directory pages.

    Backend-allocated mode (``XENDISPL_DBUF_FLG_REQ_ALLOC``): the guest granted the directory
    pages read-write and wrote only the chain; we write ``gref[]``. ``refs`` are ours (from
    gntdev), so bad values there are a bug on our side (``ValueError``); the chain is the
    guest's and is validated exactly as :class:`DirectoryReader` does. Use::

        filler = DirectoryFiller(req.gref_directory, our_refs)
        while (gref := filler.next_page_gref) is not None:
            with map_one_page_writable(gref) as page:
                filler.fill(page)
    """

    def __init__(
        self, first_gref: int, refs: Sequence[int], *, max_refs: int = DEFAULT_MAX_REFS
    ) -> None:
        if len(set(refs)) != len(refs) or any(not 0 < r <= _U32_MAX for r in refs):
            raise ValueError("backend grant refs must be unique non-zero u32 values")
        self._refs = tuple(refs)
        self._walker = _ChainWalker(first_gref, len(self._refs), max_refs)
        self._failed = False

    @property
    def next_page_gref(self) -> int | None:
        """Grant ref of the directory page to map (writable) and :meth:`fill` next."""
        return None if self._failed else self._walker.current

    @property
    def done(self) -> bool:
        """True once every ref has been written."""
        return not self._failed and self._walker.current is None

    def fill(self, page: bytearray | memoryview) -> None:
        """Write this page's share of the refs into ``page`` (writable, 4096 bytes).

        Reads ``gref_dir_next_page`` once and validates it before writing anything; raises
        :class:`ProtocolError` for a bad chain, after which the filler is spent.
        """
        if self._walker.current is None or self._failed:
            raise RuntimeError("fill() without a pending directory page")
        try:
            self._fill(page)
        except ProtocolError:
            self._failed = True
            raise

    def _fill(self, page: bytearray | memoryview) -> None:
        _check_page_length(page)
        view = memoryview(page)
        if view.readonly:
            raise ValueError("directory page must be writable")
        (next_gref,) = _NEXT.unpack_from(view, 0)
        self._walker.check_next(next_gref)
        count = self._walker.refs_on_current_page()
        start = GREFS_PER_DIR_PAGE * self._walker.page_index
        struct.pack_into(f"<{count}I", view, _REFS_OFS, *self._refs[start : start + count])
        self._walker.advance(next_gref)


def build_directory(buffer_grefs: Sequence[int], dir_grefs: Sequence[int]) -> list[bytes]:
    """Frontend side: the directory pages listing ``buffer_grefs``, chained via ``dir_grefs``.

    ``dir_grefs[i]`` is the grant ref under which page ``i`` is shared; there must be exactly
    ``dir_pages_for(len(buffer_grefs))`` of them. Page ``i`` links to ``dir_grefs[i + 1]`` and
    the last page links to 0, as Linux writes it. Unused slots of the last page are zero.
    Pass ``buffer_grefs`` of zeros to get the chain-only directory of backend-allocated mode.
    """
    npages = dir_pages_for(len(buffer_grefs))
    if len(dir_grefs) != npages:
        raise ValueError(f"{len(buffer_grefs)} refs need {npages} directory page(s)")
    pages = []
    for i in range(npages):
        page = bytearray(PAGE_SIZE)
        next_gref = dir_grefs[i + 1] if i + 1 < npages else 0
        chunk = buffer_grefs[GREFS_PER_DIR_PAGE * i : GREFS_PER_DIR_PAGE * (i + 1)]
        _NEXT.pack_into(page, 0, next_gref)
        struct.pack_into(f"<{len(chunk)}I", page, _REFS_OFS, *chunk)
        pages.append(bytes(page))
    return pages
