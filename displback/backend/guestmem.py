"""Guest memory through gntdev: page directories read or filled one page at a time, buffers mapped.

The grant-reference page directory (reference §7) is guest memory. The sans-I/O
:mod:`displback.protocol.pagedir` knows its rules; this module does the I/O around it, one
directory page at a time (the next page's gref is on the current one), none read twice:

* reading: Xen copies the page into private memory (gntdev ``GRANT_COPY``), which is handed
  over. One gntdev call per page, where map + unmap took two and an ``munmap``: the
  directory of the largest buffer (9 pages) cost as much as mapping all its 8187 grefs;
* filling (be-alloc): the page is mapped writable, filled, unmapped; at most one directory
  page is mapped at a time.

Every failure becomes a :class:`RequestError` with the errno the guest's request is answered
with, and nothing stays mapped after one:

* a malformed directory (:class:`ProtocolError`) → its errno (``EINVAL``);
* a grant the platform refuses to map (``EINVAL``: unknown, revoked, granted to someone else
  or read-only where we need to write) → ``EINVAL``;
* running out of mappings (``ENOMEM``, ``ENOSPC``) → ``ENOMEM``; anything else → ``EIO``.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable, Sequence

from displback.backend.errors import RequestError
from displback.protocol.constants import EINVAL, EIO, ENOMEM, PAGE_SIZE
from displback.protocol.errors import ProtocolError
from displback.protocol.pagedir import DEFAULT_MAX_REFS, DirectoryFiller, DirectoryReader
from displback.xen.interfaces import GrantDevice, GrantMapping

__all__ = ["errno_for_os_error", "fill_directory", "map_buffer", "read_directory"]


def errno_for_os_error(exc: OSError) -> int:
    """The response errno for a platform failure while touching guest memory."""
    if exc.errno == _errno.EINVAL:
        return EINVAL
    if exc.errno in (_errno.ENOMEM, _errno.ENOSPC):
        return ENOMEM
    return EIO


def _map(
    grants: GrantDevice, domid: int, refs: Sequence[int], *, writable: bool, what: str
) -> GrantMapping:
    try:
        return grants.map_grants(domid, list(refs), writable=writable)
    except OSError as exc:
        raise RequestError(
            errno_for_os_error(exc),
            f"cannot map {what} ({len(refs)} grant(s) of dom{domid}, "
            f"{'writable' if writable else 'read-only'}): {exc}",
        ) from exc


def _on_page(mapping: GrantMapping, use: Callable[[memoryview], None]) -> None:
    """Run ``use`` on the mapped page, then unmap it, even when ``use`` refuses the page.

    A refused page raises :class:`ProtocolError` from frames that may still hold views of the
    mapping; the traceback is dropped before unmapping so those views die first (the mapping
    refuses to close while views of it exist).
    """
    error: ProtocolError | None = None
    with mapping:
        try:
            use(mapping.buffer)
        except ProtocolError as exc:
            exc.__traceback__ = None
            error = exc
    if error is not None:
        raise error


def read_directory(
    grants: GrantDevice,
    domid: int,
    gref_directory: int,
    nrefs: int,
    *,
    max_refs: int = DEFAULT_MAX_REFS,
) -> tuple[int, ...]:
    """The ``nrefs`` buffer grant refs listed by the guest's directory at ``gref_directory``.

    Each directory page is copied out of guest memory by Xen (one ``GRANT_COPY``), then
    validated by :class:`DirectoryReader`: the guest cannot change what is being checked.
    """
    try:
        reader = DirectoryReader(gref_directory, nrefs, max_refs=max_refs)
        while (gref := reader.next_page_gref) is not None:
            try:
                page = grants.copy_from_grant(domid, gref, PAGE_SIZE)
            except OSError as exc:
                raise RequestError(
                    errno_for_os_error(exc),
                    f"cannot read directory page gref {gref} of dom{domid}: {exc}",
                ) from exc
            reader.feed(page)
        return reader.refs
    except ProtocolError as exc:
        raise RequestError(exc.errno or EINVAL, f"bad page directory: {exc}") from exc


def fill_directory(
    grants: GrantDevice,
    domid: int,
    gref_directory: int,
    refs: Sequence[int],
    *,
    max_refs: int = DEFAULT_MAX_REFS,
) -> None:
    """Write our grant ``refs`` into the guest-chained directory at ``gref_directory``.

    Backend-allocated buffers: each directory page is mapped writable (the guest must have
    granted it read-write), filled by :class:`DirectoryFiller` and unmapped.
    """
    try:
        filler = DirectoryFiller(gref_directory, refs, max_refs=max_refs)
        while (gref := filler.next_page_gref) is not None:
            page = _map(grants, domid, [gref], writable=True, what="a directory page")
            _on_page(page, filler.fill)
    except ProtocolError as exc:
        raise RequestError(exc.errno or EINVAL, f"bad page directory: {exc}") from exc


def map_buffer(
    grants: GrantDevice, domid: int, refs: Sequence[int], *, writable: bool
) -> GrantMapping:
    """Map a buffer's pages as one contiguous span (the copy path's view of them)."""
    return _map(grants, domid, refs, writable=writable, what="the buffer")
