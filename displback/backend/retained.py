"""Backend-allocated memory a guest may still map: granted from one gntdev per guest domain,
kept with its grants for that domain until the domain dies.

With ``be-alloc=1`` Dom0's pages are granted to the guest (``DMABUF_IMP_TO_REFS``), and
``DMABUF_IMP_RELEASE`` ends the grants *without* holding the pages while the guest still maps
them (reference §4.2, §11): freeing our dma-buf then would return memory to Dom0 that the
guest can still read and write. Linux's ``gnttab_end_foreign_access`` also leaves such a grant
entry in use until the guest unmaps: granting the same memory afresh would take new Dom0 grant
entries while the old ones stay taken. The Linux frontend unmaps before DBUF_DESTROY, but a
hostile one need not, ever. So memory once granted to a guest is never returned to Dom0,
never given to another guest and never granted twice while that domain lives:

* every be-alloc dma-buf is granted (:meth:`grant`) from a gntdev opened for the guest's
  *domain*, not its device or connection: gntdev releases a file's imports when the file
  closes, and a connection closes at every re-handshake;
* after DBUF_DESTROY or a teardown the buffer's dma-buf comes here with its import and refs
  (:meth:`keep`), still charged to the guest's account (``be_alloc_pages``, which are also
  the Dom0 grant entries it holds);
* the same guest's later be-alloc buffer reuses the smallest kept one that is large enough
  (:meth:`take`; zeroed by the caller, the same refs handed out again, the directory lists
  the first ones): a reuse takes no grant entry;
* when the domain is destroyed (:meth:`release_domain`, on ``@releaseDomain`` once
  ``/local/domain/<domid>`` is gone) every import is released (``DMABUF_IMP_RELEASE``), the
  domain's gntdev and the fds are closed.

A domain is known by its domid *and* its UUID (``/local/domain/<domid>/vm`` is
``/vm/<uuid>``, written by libxl; :meth:`identify`): memory is only reused by, and kept for,
the domain it was granted to, even if a new domain gets the same domid.

Across daemon restarts every kept fd is also handed to systemd's file-descriptor store under
a name carrying its domain, the domain's UUID and the size
(``displback-be-alloc.d<domid>.u<uuid>.p<npages>.<token>``); a restarted daemon adopts them
(:meth:`adopt`) and frees those whose domain has gone, or whose domid now names a domain with
another UUID. The imports themselves die with the old process (its gntdev closes): the old
grants are revoked lazily, and the first reuse of adopted memory grants it once more (at most
the guest's kept pages per restart; docs/security.md). Without systemd's store the memory is
freed when the daemon exits.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from displback.backend.deferred import Logger, default_logger
from displback.systemd.fdstore import FdStore
from displback.xen.interfaces import GrantDevice

__all__ = ["KeptMemory", "RetainedMemory", "fd_name", "parse_uuid"]

_PREFIX: Final = "displback-be-alloc"
_NAME = re.compile(
    rf"{_PREFIX}\.d(0|[1-9][0-9]{{0,4}})(?:\.u([0-9a-f]{{32}}))?"
    rf"\.p([1-9][0-9]{{0,9}})\.[0-9a-f]{{8,32}}"
)
_VM_PATH = re.compile(r"/vm/([0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
                      r"[0-9a-fA-F]{12})")


def parse_uuid(vm_path: str) -> str | None:
    """The domain UUID (32 lower-case hex digits) in libxl's ``/vm/<uuid>``, or None."""
    match = _VM_PATH.fullmatch(vm_path)
    return match[1].replace("-", "").lower() if match else None


def fd_name(domid: int, npages: int, uuid: str | None = None) -> str:
    """A new fd-store name for ``npages`` pages kept for domain ``domid`` (UUID ``uuid``)."""
    ident = f".u{uuid}" if uuid is not None else ""
    return f"{_PREFIX}.d{domid}{ident}.p{npages}.{secrets.token_hex(8)}"


@dataclass(eq=False, slots=True)
class KeptMemory:
    """One dma-buf of ``npages`` pages kept for domain ``domid`` with UUID ``uuid`` (None:
    unknown), ``name`` in the fd store. ``refs``: the refs of its import on ``device`` (the
    domain's gntdev), all ``npages`` of them; None if this run has not granted it."""

    domid: int
    fd: int
    npages: int
    name: str
    uuid: str | None = None
    refs: tuple[int, ...] | None = None
    device: GrantDevice | None = None


class RetainedMemory:
    """The daemon's be-alloc grants and kept memory of every guest domain.

    ``open_grants`` opens a gntdev (the platform's); None: nothing can be granted (tests of
    kept fds alone).
    """

    def __init__(
        self,
        *,
        open_grants: Callable[[], GrantDevice] | None = None,
        fdstore: FdStore | None = None,
        log: Logger | None = None,
    ) -> None:
        self._open_grants = open_grants
        self._fdstore = fdstore
        self._log = log if log is not None else default_logger("displback.retained")
        self._kept: dict[int, list[KeptMemory]] = {}
        self._devices: dict[int, GrantDevice] = {}
        self._uuids: dict[int, str | None] = {}

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

    def uuid(self, domid: int) -> str | None:
        """The UUID domain ``domid`` is known by (None: not known)."""
        return self._uuids.get(domid)

    # -- identity ------------------------------------------------------------------------

    def identify(self, domid: int, uuid: str | None) -> list[KeptMemory]:
        """Domain ``domid`` has UUID ``uuid`` (None: could not be read, nothing changes).
        Memory kept for another UUID of that domid belonged to a domain that is gone: it is
        freed; returned so that the caller gives back its charge."""
        if uuid is None:
            return []
        self._uuids[domid] = uuid
        kept = self._kept.get(domid, [])
        stale = [k for k in kept if k.uuid is not None and k.uuid != uuid]
        for entry in stale:
            kept.remove(entry)
            self._free(entry)
        if not kept:
            self._kept.pop(domid, None)
        if stale:
            self._log.info(
                f"dom{domid}: freed {len(stale)} kept backend-allocated buffer(s) of an earlier "
                f"domain with this id, {sum(k.npages for k in stale)} pages"
            )
        return stale

    # -- grants --------------------------------------------------------------------------

    def grant(self, domid: int, fd: int, npages: int) -> tuple[tuple[int, ...], GrantDevice]:
        """Grant dma-buf ``fd`` of ``npages`` pages to ``domid`` from the domain's gntdev
        (opened on first use); its refs and the device. ``OSError`` if that fails."""
        device = self._devices.get(domid)
        if device is None:
            if self._open_grants is None:
                raise OSError(95, "no gntdev to grant from")  # EOPNOTSUPP
            device = self._open_grants()
            self._devices[domid] = device
        refs = device.dmabuf_import_to_refs(fd, npages, domid)
        return tuple(refs), device

    # -- changes -------------------------------------------------------------------------

    def keep(
        self,
        domid: int,
        fd: int,
        npages: int,
        refs: tuple[int, ...] | None = None,
        device: GrantDevice | None = None,
    ) -> None:
        """Take over ``fd`` (a dma-buf of ``npages`` pages the guest may still map), with the
        import ``refs`` it has on ``device`` if it is granted."""
        if device is not None and self._devices.get(domid) is not device:
            refs, device = None, None  # that gntdev is closed: the domain went meanwhile
        uuid = self._uuids.get(domid)
        kept = KeptMemory(domid, fd, npages, fd_name(domid, npages, uuid), uuid, refs, device)
        self._kept.setdefault(domid, []).append(kept)
        stored = self._fdstore is not None and self._fdstore.enabled
        if stored and not self._fdstore.add(kept.name, fd):  # type: ignore[union-attr]
            self._log.warning(
                f"dom{domid}: cannot hand {npages} kept pages to systemd's fd store; "
                "they are freed if the daemon exits"
            )

    def take(self, domid: int, npages: int) -> KeptMemory | None:
        """The smallest kept dma-buf of ``domid`` with at least ``npages`` pages, now the
        caller's (it stays charged to the guest, its import with it), or None. Only memory
        kept for the domain's UUID as known now is taken (see :meth:`identify`)."""
        kept = self._kept.get(domid, [])
        uuid = self._uuids.get(domid)
        fitting = [k for k in kept if k.npages >= npages and k.uuid == uuid]
        if not fitting:
            return None
        best = min(fitting, key=lambda k: k.npages)
        kept.remove(best)
        if not kept:
            del self._kept[domid]
        self._unstore(best)
        return best

    def release_domain(self, domid: int) -> list[KeptMemory]:
        """Domain ``domid`` is gone: release its grants, free everything kept for it and
        close its gntdev; return what was kept."""
        kept = self._kept.pop(domid, [])
        for entry in kept:
            self._free(entry)
        device = self._devices.pop(domid, None)
        if device is not None:
            with contextlib.suppress(OSError):
                device.close()
        self._uuids.pop(domid, None)
        if kept:
            self._log.info(
                f"dom{domid}: domain gone; freed {len(kept)} kept backend-allocated "
                f"buffer(s), {sum(k.npages for k in kept)} pages"
            )
        return kept

    def adopt(self, named_fds: list[tuple[str, int]]) -> list[KeptMemory]:
        """Take back what a previous run stored (``(FDNAME, fd)`` pairs); fds that are not
        ours are closed and dropped from the store. Adopted memory is not granted by this
        run (the old run's gntdev closed): its first reuse grants it again."""
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
            kept = KeptMemory(int(match[1]), fd, int(match[3]), name, match[2])
            self._kept.setdefault(kept.domid, []).append(kept)
            adopted.append(kept)
        if adopted:
            self._log.info(
                f"took back {len(adopted)} kept backend-allocated buffer(s) from systemd's "
                f"fd store, {sum(k.npages for k in adopted)} pages"
            )
        return adopted

    def close(self) -> None:
        """Daemon exit: close our fds and gntdevs (systemd's store keeps its copies of the
        fds, if there is one; the imports die with the gntdevs)."""
        kept, self._kept = self._kept, {}
        devices, self._devices = self._devices, {}
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
        for device in devices.values():
            with contextlib.suppress(OSError):
                device.close()

    def _free(self, entry: KeptMemory) -> None:
        """Release ``entry``'s import (if it has one on an open gntdev) and close its fd."""
        self._unstore(entry)
        if entry.device is not None and self._devices.get(entry.domid) is entry.device:
            try:
                entry.device.dmabuf_import_release(entry.fd)
            except OSError as exc:
                self._log.warning(f"dom{entry.domid}: revoking the grants of fd {entry.fd}: {exc}")
        with contextlib.suppress(OSError):
            os.close(entry.fd)

    def _unstore(self, entry: KeptMemory) -> None:
        if self._fdstore is not None and self._fdstore.enabled:
            self._fdstore.remove(entry.name)
