"""Backend-allocated memory a guest may still map: kept for its domain until the domain dies.

With ``be-alloc=1`` Dom0's pages are granted to the guest (``DMABUF_IMP_TO_REFS``), and
``DMABUF_IMP_RELEASE`` ends the grants *without* holding the pages while the guest still maps
them (reference §4.2, §11): freeing our dma-buf then would return memory to Dom0 that the
guest can still read and write. The Linux frontend unmaps before DBUF_DESTROY, but a hostile
one need not, ever. So memory once granted to a guest is never returned to Dom0 or given to
another guest while that domain lives:

* after DBUF_DESTROY or a teardown the buffer's dma-buf comes here (:meth:`keep`), still
  charged to the guest's account (``be_alloc_pages``);
* the same guest's later be-alloc buffer reuses the smallest kept one that is large enough
  (:meth:`take`; zeroed by the caller, all its pages granted again, the directory lists the
  first ones);
* it is closed when the domain is destroyed (:meth:`release_domain`, on ``@releaseDomain``
  once ``/local/domain/<domid>`` is gone).

Across daemon restarts every kept fd is also handed to systemd's file-descriptor store under
a name carrying its domain and size (``displback-be-alloc.d<domid>.p<npages>.<token>``); a
restarted daemon adopts them (:meth:`adopt`) and frees those whose domain has gone meanwhile.
Without systemd's store the memory is freed when the daemon exits (see docs/security.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from dataclasses import dataclass
from typing import Final

from displback.backend.deferred import Logger, default_logger
from displback.systemd.fdstore import FdStore

__all__ = ["KeptMemory", "RetainedMemory", "fd_name"]

_PREFIX: Final = "displback-be-alloc"
_NAME = re.compile(rf"{_PREFIX}\.d(0|[1-9][0-9]{{0,4}})\.p([1-9][0-9]{{0,9}})\.[0-9a-f]{{8,32}}")


def fd_name(domid: int, npages: int) -> str:
    """A new fd-store name for ``npages`` pages kept for domain ``domid``."""
    return f"{_PREFIX}.d{domid}.p{npages}.{secrets.token_hex(8)}"


@dataclass(eq=False, slots=True)
class KeptMemory:
    """One dma-buf of ``npages`` pages kept for domain ``domid`` (``name`` in the fd store)."""

    domid: int
    fd: int
    npages: int
    name: str


class RetainedMemory:
    """The daemon's kept be-alloc memory of every guest domain."""

    def __init__(self, *, fdstore: FdStore | None = None, log: Logger | None = None) -> None:
        self._fdstore = fdstore
        self._log = log if log is not None else default_logger("displback.retained")
        self._kept: dict[int, list[KeptMemory]] = {}

    # -- state ---------------------------------------------------------------------------

    def domains(self) -> list[int]:
        """Domains memory is kept for."""
        return sorted(self._kept)

    def pages(self, domid: int | None = None) -> int:
        """Pages kept for ``domid`` (or for every domain)."""
        return sum(k.npages for k in self.entries(domid))

    def entries(self, domid: int | None = None) -> list[KeptMemory]:
        """A snapshot of what is kept (for one domain or all)."""
        if domid is not None:
            return list(self._kept.get(domid, ()))
        return [k for kept in self._kept.values() for k in kept]

    # -- changes -------------------------------------------------------------------------

    def keep(self, domid: int, fd: int, npages: int) -> None:
        """Take over ``fd`` (a dma-buf of ``npages`` pages the guest may still map)."""
        kept = KeptMemory(domid, fd, npages, fd_name(domid, npages))
        self._kept.setdefault(domid, []).append(kept)
        stored = self._fdstore is not None and self._fdstore.enabled
        if stored and not self._fdstore.add(kept.name, fd):  # type: ignore[union-attr]
            self._log.warning(
                f"dom{domid}: cannot hand {npages} kept pages to systemd's fd store; "
                "they are freed if the daemon exits"
            )

    def take(self, domid: int, npages: int) -> KeptMemory | None:
        """The smallest kept dma-buf of ``domid`` with at least ``npages`` pages, now the
        caller's (it stays charged to the guest), or None."""
        kept = self._kept.get(domid, [])
        fitting = [k for k in kept if k.npages >= npages]
        if not fitting:
            return None
        best = min(fitting, key=lambda k: k.npages)
        kept.remove(best)
        if not kept:
            del self._kept[domid]
        self._unstore(best)
        return best

    def release_domain(self, domid: int) -> int:
        """Domain ``domid`` is gone: free everything kept for it; return its pages."""
        kept = self._kept.pop(domid, [])
        for entry in kept:
            self._unstore(entry)
            with contextlib.suppress(OSError):
                os.close(entry.fd)
        pages = sum(k.npages for k in kept)
        if kept:
            self._log.info(
                f"dom{domid}: domain gone; freed {len(kept)} kept backend-allocated "
                f"buffer(s), {pages} pages"
            )
        return pages

    def adopt(self, named_fds: list[tuple[str, int]]) -> list[KeptMemory]:
        """Take back what a previous run stored (``(FDNAME, fd)`` pairs); fds that are not
        ours are closed and dropped from the store."""
        adopted = []
        for name, fd in named_fds:
            match = _NAME.fullmatch(name)
            if match is None:
                self._log.warning(f"closing an inherited fd that is not ours: {name!r}")
                with contextlib.suppress(OSError):
                    os.close(fd)
                if self._fdstore is not None and self._fdstore.enabled and name != "unknown":
                    with contextlib.suppress(ValueError):
                        self._fdstore.remove(name)
                continue
            kept = KeptMemory(int(match[1]), fd, int(match[2]), name)
            self._kept.setdefault(kept.domid, []).append(kept)
            adopted.append(kept)
        if adopted:
            self._log.info(
                f"took back {len(adopted)} kept backend-allocated buffer(s) from systemd's "
                f"fd store, {sum(k.npages for k in adopted)} pages"
            )
        return adopted

    def close(self) -> None:
        """Daemon exit: close our fds (systemd's store keeps its copies, if there is one)."""
        kept, self._kept = self._kept, {}
        pages = sum(k.npages for entries in kept.values() for k in entries)
        if pages and not (self._fdstore is not None and self._fdstore.enabled):
            self._log.warning(
                f"exiting without systemd's fd store: {pages} pages of backend-allocated "
                "memory that guests may still map are freed"
            )
        for entries in kept.values():
            for entry in entries:
                with contextlib.suppress(OSError):
                    os.close(entry.fd)

    def _unstore(self, entry: KeptMemory) -> None:
        if self._fdstore is not None and self._fdstore.enabled:
            self._fdstore.remove(entry.name)
