"""Zero-copy buffers whose DBUF_DESTROY timed out: retried until the importer lets go.

Why this list exists
--------------------
DBUF_DESTROY is synchronous (reference §4.2): once the backend answers, the guest ends grant
access and reuses its pages. For a zero-copy buffer the backend drops its dma-buf reference
and waits (``IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED``) until every importer is gone and gntdev
has unmapped the grants. If an importer holds on beyond the wait (a compositor, a KMS driver
that keeps the last frame), the backend answers anyway — the guest cannot wait longer than its
3 s timeout — and the buffer lands here. The guest meanwhile keeps retrying to end access
once a second; the grants stay mapped until the importer releases them. :meth:`run` retries
the wait every ``retry_interval`` seconds and forgets each entry once its buffer is released.
The list is bounded per guest by the guest's account (``deferred`` in
:mod:`displback.backend.quotas`): the buffer store answers DBUF_CREATE with ``-ENOMEM`` while
the guest is at its limit, so a guest whose buffers never drain cannot pile up Dom0 mappings
without limit. :meth:`add` itself never refuses: a destroy must always be answered and its fd
number must stay reserved. Each entry's ``on_done`` gives its share back to the account once
the entry is released or abandoned.

The fd-number reservation
-------------------------
``DMABUF_EXP_WAIT_RELEASED`` finds the export by the **fd number** returned at export time
(reference §11): if our fd is closed and a later export — of this guest or any other using
the same gntdev — reuses the number, a wait on that number waits on the *new* buffer, and
the old one can never be waited for again. So an entry never closes its number while it may
still wait: before the first wait the buffer store replaces its dma-buf reference with
``/dev/null`` by ``dup2`` (atomic: the number is never free for an instant). Our reference
to the dma-buf is gone — the importer's is the only one left, as the wait requires — yet no
export can be given that number until this list closes the placeholder, which it does only
after the wait has succeeded (or the daemon exits and will wait no more). Each entry holds
the :class:`GrantDevice` that exported it, because a wait is only meaningful on that device.

A grant device that has pending entries must stay open: the device lifecycle hands its
device over with :meth:`close_device_when_drained` instead of closing it itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from displback.xen.interfaces import GrantDevice

__all__ = ["DeferredRelease", "DeferredReleases", "DeferredStats", "Logger"]


class Logger(Protocol):
    """What the buffer code logs through: a structlog BoundLogger or a stdlib Logger."""

    def debug(self, msg: str, /) -> object: ...

    def info(self, msg: str, /) -> object: ...

    def warning(self, msg: str, /) -> object: ...


def default_logger(name: str) -> Logger:
    """The structlog logger used when the caller passes none."""
    import structlog

    logger: Logger = structlog.get_logger(name)
    return logger


@dataclass(eq=False, slots=True)
class DeferredRelease:
    """One destroyed zero-copy buffer still waited for.

    ``fd`` is the reserved number: it refers to ``/dev/null`` (no longer to the dma-buf) and
    is closed only when the entry is done.
    """

    domid: int
    grants: GrantDevice
    fd: int
    dbuf_cookie: int
    npages: int
    since: float
    attempts: int = 0
    on_done: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class DeferredStats:
    """Counters since the list was created; ``pending`` is the current length."""

    pending: int
    deferred: int
    released: int
    abandoned: int


class DeferredReleases:
    """Destroyed zero-copy buffers of every guest whose importers still hold them.

    Run :meth:`run` in the daemon's nursery; call :meth:`aclose` when the daemon exits.
    """

    def __init__(
        self,
        *,
        retry_interval: float = 1.0,
        log: Logger | None = None,
    ) -> None:
        if not retry_interval > 0:
            raise ValueError("retry_interval must be positive")
        self.retry_interval = retry_interval
        self._log = log if log is not None else default_logger("displback.deferred")
        self._entries: list[DeferredRelease] = []
        self._close_on_drain: list[GrantDevice] = []
        self._added = trio.Event()
        self._changed = trio.Event()
        self._round = trio.Lock()
        self._closed = False
        self._deferred = 0
        self._released = 0
        self._abandoned = 0

    # -- state ---------------------------------------------------------------------------

    @property
    def stats(self) -> DeferredStats:
        """How many entries are pending and how many were ever deferred/released/abandoned."""
        return DeferredStats(
            pending=len(self._entries),
            deferred=self._deferred,
            released=self._released,
            abandoned=self._abandoned,
        )

    def pending(self, domid: int | None = None) -> int:
        """Entries still waited for, of guest ``domid`` or of all guests."""
        if domid is None:
            return len(self._entries)
        return sum(1 for entry in self._entries if entry.domid == domid)

    def entries(self, domid: int | None = None) -> list[DeferredRelease]:
        """A snapshot of the pending entries (of one guest or all)."""
        return [e for e in self._entries if domid is None or e.domid == domid]

    # -- changes -------------------------------------------------------------------------

    def add(
        self,
        *,
        domid: int,
        grants: GrantDevice,
        fd: int,
        dbuf_cookie: int,
        npages: int,
        on_done: Callable[[], None] | None = None,
    ) -> DeferredRelease:
        """Take over the reserved number ``fd`` (already ``dup2``'d to ``/dev/null``).

        Never refuses (see the module docstring): the bound is enforced at DBUF_CREATE.
        After :meth:`aclose` the number is closed at once, as nothing would wait on it.
        ``on_done`` runs once when the entry is released or abandoned.
        """
        entry = DeferredRelease(
            domid, grants, fd, dbuf_cookie, npages, trio.current_time(), on_done=on_done
        )
        self._deferred += 1
        if self._closed:
            self._abandon(entry, "the deferred-release list is closed")
            return entry
        self._entries.append(entry)
        self._log.warning(
            f"dom{domid}: dma-buf of buffer 0x{dbuf_cookie:x} ({npages} pages, fd {fd}) is "
            f"still imported after DBUF_DESTROY; retrying every {self.retry_interval:g}s "
            f"({self.pending(domid)} pending for this guest)"
        )
        self._added.set()
        self._notify()
        return entry

    def close_device_when_drained(self, grants: GrantDevice) -> None:
        """Close ``grants`` now if no entry needs it, else once its last entry is done."""
        if any(entry.grants is grants for entry in self._entries):
            if all(device is not grants for device in self._close_on_drain):
                self._close_on_drain.append(grants)
        else:
            grants.close()

    async def wait_drained(self, domid: int | None = None) -> None:
        """Return once no entry (of ``domid``, or at all) is pending."""
        while self.pending(domid):
            await self._changed.wait()

    # -- the retry task ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Retry every pending entry each ``retry_interval`` until it is released."""
        task_status.started()
        while not self._closed:
            if not self._entries:
                self._added = trio.Event()
                await self._added.wait()
                continue
            await trio.sleep(self.retry_interval)
            async with self._round:
                for entry in list(self._entries):
                    await self._retry(entry)

    async def _retry(self, entry: DeferredRelease) -> None:
        if entry not in self._entries:
            return
        entry.attempts += 1
        try:
            released = await trio.to_thread.run_sync(
                entry.grants.dmabuf_wait_released, entry.fd, 0
            )
        except OSError as exc:
            self._remove(entry)
            self._abandon(entry, f"waiting failed: {exc}")
            return
        if not released or entry not in self._entries:
            return
        self._remove(entry)
        self._close_placeholder(entry)
        self._released += 1
        waited = trio.current_time() - entry.since
        self._log.info(
            f"dom{entry.domid}: dma-buf of buffer 0x{entry.dbuf_cookie:x} released after "
            f"{waited:.1f}s more ({entry.attempts} retries); its grants are unmapped"
        )
        self._done(entry)

    async def aclose(self) -> None:
        """Daemon exit: try each entry once more, then give up on the rest (logged)."""
        if self._closed:
            return
        self._closed = True
        self._added.set()
        async with self._round:
            for entry in list(self._entries):
                await self._retry(entry)
            for entry in list(self._entries):
                self._remove(entry)
                self._abandon(entry, "the daemon is exiting")
        for grants in self._close_on_drain:
            grants.close()
        self._close_on_drain.clear()

    # -- internals -----------------------------------------------------------------------

    def _remove(self, entry: DeferredRelease) -> None:
        self._entries.remove(entry)
        devices = [d for d in self._close_on_drain if d is entry.grants]
        if devices and not any(e.grants is entry.grants for e in self._entries):
            self._close_on_drain.remove(devices[0])
            entry.grants.close()
        self._notify()

    def _abandon(self, entry: DeferredRelease, reason: str) -> None:
        self._close_placeholder(entry)
        self._abandoned += 1
        self._log.warning(
            f"dom{entry.domid}: giving up on the dma-buf of buffer 0x{entry.dbuf_cookie:x} "
            f"({entry.npages} pages, after {entry.attempts} retries): {reason}; its grants "
            f"stay mapped until the importer lets go"
        )
        self._done(entry)

    @staticmethod
    def _done(entry: DeferredRelease) -> None:
        on_done, entry.on_done = entry.on_done, None
        if on_done is not None:
            on_done()

    @staticmethod
    def _close_placeholder(entry: DeferredRelease) -> None:
        with contextlib.suppress(OSError):
            os.close(entry.fd)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
