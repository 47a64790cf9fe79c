"""The simulated Xen: one process holding domains' RAM, grant tables, event channels, dma-bufs.

Theory of operation
-------------------
Clients (the backend's :class:`~displback.sim.platform.SimPlatform` and the simulated guest,
in this process or others) connect to a UNIX socket, say which domain they are, and send
requests (framing in :mod:`displback.sim.hvwire`). Each connection plays one open device file
(``/dev/xen/evtchn``, ``/dev/xen/gntdev``) or one domain's memory handle: when it closes —
politely or because its process died — everything it held is released, as the kernel does
when a process exits.

- **RAM**: each domain has one memfd; pages are allocated by page frame number (pfn =
  offset / 4096) and zeroed on allocation. Clients receive the memfd with ``SCM_RIGHTS`` and
  map pages themselves (:mod:`displback.sim.memmap`), so memory is really shared.
- **Grants**: a domain's grant table maps gref → (pfn, granted-to domid, readonly); it holds
  :data:`GRANT_ENTRIES` entries (Xen's default; another size may be given, None for
  unbounded), granting beyond is ``ENOSPC`` (grefs below :data:`FIRST_GREF` are reserved as
  Linux reserves them). Each page a domain maps (gntdev map or
  dma-buf export) takes one of its :data:`MAPTRACK_ENTRIES`; beyond, the map fails. Mapping
  checks the gref exists, is not being revoked, is granted to the mapper, and is writable if
  mapped writable; otherwise ``EINVAL`` as gntdev reports a failed map. A grant copy
  (gntdev ``GRANT_COPY``) checks the same as a read-only map and sends the page's bytes
  back, mapping nothing. Live mappings are
  counted per grant; ending access to a mapped grant is refused (``EBUSY``) so leaks show.
  Grants of a connection that dies, or of a released dma-buf import, are revoked lazily: no
  new mappings, and the grant ends when its last mapping goes. A page is freed once nothing
  holds it and no grant refers to it.
- **Event channels**: a channel between two ports is a pair of eventfds. The port that
  allocates it (``bind_unbound_port``) receives both: one to poll (its incoming side) and one
  to write to notify the peer. A port that binds to it receives the same pair swapped, so a
  notify is a direct ``eventfd_write`` with no hop through the hypervisor. Notifications to a
  port whose peer left simply go unread; Xen's conservative "set the new local port pending"
  at ``bind_interdomain`` is reproduced by writing 1 to the binder's incoming side.
- **dma-bufs**: a dma-buf fd is one end of a socketpair; the hypervisor holds the other and
  sees end-of-file exactly when every copy of the fd in every process is closed — that is
  the release. Exported buffers (gntdev ``DMABUF_EXP_FROM_REFS``) then drop their grant
  mappings and wake ``DMABUF_EXP_WAIT_RELEASED`` waiters; allocated Dom0 buffers (a KMS dumb
  buffer exported with PRIME) free their pages. A dma-buf is recognised by the inode of the
  client's end, so a process can name one it received from anywhere.

:class:`Machine` holds the state and answers requests; :func:`serve` runs it on a socket with
trio; :class:`HypervisorThread` runs it on a background thread for in-process tests (the
clients are blocking, like the ioctls they mirror, so the server cannot share their trio
loop). Run standalone with ``python -m displback.sim.hypervisor --socket PATH``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import heapq
import itertools
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from displback.protocol.constants import PAGE_SIZE
from displback.sim.hvwire import (
    Message,
    recv_message,
    send_message,
    trio_recv_message,
    trio_send_message,
)
from displback.xen.interfaces import (
    GNTDEV_DMA_FLAG_COHERENT,
    GNTDEV_DMA_FLAG_WC,
    GNTDEV_MAX_GRANTS,
)

__all__ = [
    "DOMID_MAX",
    "EVTCHN_MAX_PORTS",
    "FIRST_GREF",
    "GRANT_ENTRIES",
    "MAPTRACK_ENTRIES",
    "HypervisorProcess",
    "HypervisorThread",
    "Machine",
    "main",
    "query_counters",
    "serve",
]

#: Linux reserves the first grant entries (GNTTAB_NR_RESERVED_ENTRIES); ours start here too.
FIRST_GREF = 8
#: Ports of the FIFO event-channel ABI: 2**17.
EVTCHN_MAX_PORTS = 1 << 17
#: Highest ordinary domain id (DOMID_FIRST_RESERVED - 1).
DOMID_MAX = 0x7FEF
#: Largest simulated allocation in one request, to keep a confused client from filling /tmp.
MAX_ALLOC_PAGES = 1 << 18
#: Entries of a domain's grant table with Xen 4.17's defaults: ``gnttab_max_frames`` 64
#: frames of 4096 / 8 version-1 entries (xen/common/grant_table.c ``opt_max_grant_frames``).
GRANT_ENTRIES = 64 * PAGE_SIZE // 8
#: Grant mappings a domain may hold at once with Xen 4.17's defaults:
#: ``gnttab_max_maptrack_frames`` 1024 frames of 4096 / 16 ``struct grant_mapping``.
MAPTRACK_ENTRIES = 1024 * PAGE_SIZE // 16


class HvError(Exception):
    """A request failed with ``errno``; sent back to the client as an OSError."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message


@dataclass
class Reply:
    """What a request handler answers: a JSON object and fds to attach (then closed if owned)."""

    body: Message = field(default_factory=dict)
    fds: list[int] = field(default_factory=list)
    close_after_send: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Page:
    """One allocated page frame: who holds it and how many grants refer to it."""

    pfn: int
    held: bool = True
    grants: int = 0


@dataclass(eq=False)
class Grant:
    """One grant-table entry of ``domain``."""

    domain: Domain
    gref: int
    page: Page
    to_domid: int
    readonly: bool
    maps: int = 0
    revoking: bool = False


@dataclass(eq=False)
class Domain:
    """A simulated domain: its RAM file, page frames, grant table and event-channel ports."""

    domid: int
    ram_fd: int
    npages: int = 0
    free_pfns: list[int] = field(default_factory=list)
    pages: dict[int, Page] = field(default_factory=dict)
    grants: dict[int, Grant] = field(default_factory=dict)
    ports: dict[int, Port] = field(default_factory=dict)
    next_gref: int = FIRST_GREF
    free_grefs: list[int] = field(default_factory=list)  # a heap: lowest freed gref first
    maptrack: int = 0  # grant pages this domain maps now (its maptrack entries in use)


@dataclass(eq=False)
class ChannelPair:
    """The two eventfds of one event channel; side 0 is the allocating port's incoming one."""

    fds: tuple[int, int]
    users: int = 0


@dataclass(eq=False)
class Port:
    """A port of ``domain``: unbound (waiting for ``remote_domid``) or connected to ``peer``."""

    domain: Domain
    port: int
    remote_domid: int
    pair: ChannelPair
    side: int
    conn: Conn
    peer: Port | None = None

    @property
    def incoming(self) -> int:
        return self.pair.fds[self.side]

    @property
    def outgoing(self) -> int:
        return self.pair.fds[1 - self.side]


@dataclass(eq=False)
class Mapping:
    """Grants mapped by a connection (a gntdev mapping)."""

    ident: int
    conn: Conn
    grants: list[Grant]


@dataclass(eq=False)
class DmaBuf:
    """A dma-buf: exported from grants (``grants``) or allocated in Dom0 RAM (``pages``)."""

    ident: int
    owner: Domain
    source: Domain
    pfns: list[int]
    ino: tuple[int, int]
    sock: socket.socket
    grants: list[Grant] = field(default_factory=list)
    pages: list[Page] = field(default_factory=list)
    released: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class Import:
    """A ``DMABUF_IMP_TO_REFS`` import: grants of an allocated dma-buf's pages."""

    ident: int
    buf: DmaBuf
    grants: list[Grant]


@dataclass(eq=False)
class Conn:
    """One client connection and everything released when it goes."""

    ident: int
    domain: Domain
    pages: dict[int, Page] = field(default_factory=dict)
    grants: dict[int, Grant] = field(default_factory=dict)
    mappings: dict[int, Mapping] = field(default_factory=dict)
    ports: dict[int, Port] = field(default_factory=dict)
    imports: dict[int, Import] = field(default_factory=dict)


def _int(message: Message, key: str, lo: int = 0, hi: int = 0xFFFFFFFF) -> int:
    value = message.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise HvError(errno.EINVAL, f"{key} must be an integer in [{lo}, {hi}], not {value!r}")
    return value


def _ints(message: Message, key: str) -> list[int]:
    value = message.get(key)
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0xFFFFFFFF for v in value
    ):
        raise HvError(errno.EINVAL, f"{key} must be a list of u32")
    return value


def _grant_count(count: int) -> None:
    if not 1 <= count <= GNTDEV_MAX_GRANTS:
        raise HvError(errno.EINVAL, f"grant count {count} not in 1..{GNTDEV_MAX_GRANTS}")


class Machine:
    """The state of the simulated machine and the request handlers; used from one trio task
    context only. ``spawn`` starts the release watcher of a new dma-buf."""

    def __init__(
        self,
        *,
        grant_entries: int | None = GRANT_ENTRIES,
        maptrack_entries: int = MAPTRACK_ENTRIES,
    ) -> None:
        # grant_entries None: unbounded (for tests that want no such limit).
        if (grant_entries is not None and grant_entries <= FIRST_GREF) or maptrack_entries < 1:
            raise ValueError("grant table or maptrack too small")
        self.grant_entries = grant_entries
        self.maptrack_entries = maptrack_entries
        self.domains: dict[int, Domain] = {}
        self.conns: dict[int, Conn] = {}
        self.dmabufs: dict[int, DmaBuf] = {}
        self.imports: dict[int, Import] = {}
        self._ids = itertools.count(1)
        self.spawn: Callable[[DmaBuf], None] = lambda buf: None
        self.domain(0)

    # -- domains and connections --------------------------------------------------------

    def domain(self, domid: int) -> Domain:
        """The domain ``domid``, created (with empty RAM) on first use."""
        dom = self.domains.get(domid)
        if dom is None:
            dom = Domain(domid, os.memfd_create(f"xen-dom{domid}-ram", os.MFD_CLOEXEC))
            self.domains[domid] = dom
        return dom

    def connect(self, domid: int) -> Conn:
        """A new client connection speaking for domain ``domid``."""
        if not 0 <= domid <= DOMID_MAX:
            raise HvError(errno.EINVAL, f"bad domain id {domid}")
        conn = Conn(next(self._ids), self.domain(domid))
        self.conns[conn.ident] = conn
        return conn

    def disconnect(self, conn: Conn) -> None:
        """Release everything ``conn`` held, as when a process closes a device or exits."""
        if self.conns.pop(conn.ident, None) is None:
            return
        for mapping in list(conn.mappings.values()):
            self._unmap(mapping)
        for port in list(conn.ports.values()):
            self._unbind(port)
        for imp in list(conn.imports.values()):
            self._release_import(conn, imp)
        for grant in list(conn.grants.values()):
            self._revoke(grant)
        conn.grants.clear()
        for page in list(conn.pages.values()):
            page.held = False
            self._maybe_free(conn.domain, page)
        conn.pages.clear()

    def close(self) -> None:
        """Close every fd the machine holds (at shutdown)."""
        for conn in list(self.conns.values()):
            self.disconnect(conn)
        for buf in list(self.dmabufs.values()):
            buf.sock.close()
        for dom in self.domains.values():
            os.close(dom.ram_fd)
            for port in dom.ports.values():
                self._drop_pair(port.pair)

    def counters(self) -> dict[str, Any]:
        """Live resources: ``connections`` and per domain ``pages``, ``grants``,
        ``mappings`` (grant pages mapped by the domain, including dma-buf exports), ``dmabufs``
        (owned, not yet released) and ``ports``. All zero when nothing leaked."""
        per: dict[int, dict[str, int]] = {}
        for dom in self.domains.values():
            per[dom.domid] = {
                "pages": len(dom.pages),
                "grants": len(dom.grants),
                "mappings": 0,
                "dmabufs": 0,
                "ports": len(dom.ports),
            }
        for conn in self.conns.values():
            for mapping in conn.mappings.values():
                per[conn.domain.domid]["mappings"] += len(mapping.grants)
        for buf in self.dmabufs.values():
            per[buf.owner.domid]["dmabufs"] += 1
            per[buf.owner.domid]["mappings"] += len(buf.grants)
        return {"connections": len(self.conns), "domains": per}

    # -- request dispatch ---------------------------------------------------------------

    def handle(self, conn: Conn, message: Message) -> Reply:
        """Answer one synchronous request of ``conn`` (raises :class:`HvError`)."""
        op = message.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            raise HvError(errno.ENOSYS, f"unknown request {op!r}")
        reply: Reply = handler(conn, message)
        return reply

    # -- RAM -----------------------------------------------------------------------------

    def op_alloc_pages(self, conn: Conn, message: Message) -> Reply:
        """Allocate ``count`` zeroed pages; reply ``pfns`` and the domain's RAM fd."""
        count = _int(message, "count", 1, MAX_ALLOC_PAGES)
        pfns = self._alloc(conn.domain, count)
        for pfn in pfns:
            conn.pages[pfn] = conn.domain.pages[pfn]
        return Reply({"pfns": pfns}, [conn.domain.ram_fd])

    def op_free_pages(self, conn: Conn, message: Message) -> Reply:
        """Free pages this connection allocated; ``EBUSY`` if a grant still refers to one."""
        pfns = _ints(message, "pfns")
        for pfn in pfns:
            page = conn.pages.get(pfn)
            if page is None:
                raise HvError(errno.EINVAL, f"pfn {pfn} was not allocated by this client")
            if page.grants:
                raise HvError(errno.EBUSY, f"pfn {pfn} is still granted")
        for pfn in pfns:
            page = conn.pages.pop(pfn)
            page.held = False
            self._maybe_free(conn.domain, page)
        return Reply()

    def op_ram_fd(self, conn: Conn, message: Message) -> Reply:
        """This domain's RAM file."""
        return Reply({}, [conn.domain.ram_fd])

    def _alloc(self, dom: Domain, count: int) -> list[int]:
        pfns: list[int] = []
        dom.free_pfns.sort(reverse=True)
        while dom.free_pfns and len(pfns) < count:
            pfns.append(dom.free_pfns.pop())
        if len(pfns) < count:
            first = dom.npages
            dom.npages += count - len(pfns)
            os.ftruncate(dom.ram_fd, dom.npages * PAGE_SIZE)
            pfns.extend(range(first, dom.npages))
        zero = bytes(PAGE_SIZE)
        for pfn in pfns:
            os.pwrite(dom.ram_fd, zero, pfn * PAGE_SIZE)
            dom.pages[pfn] = Page(pfn)
        return pfns

    def _maybe_free(self, dom: Domain, page: Page) -> None:
        if not page.held and page.grants == 0 and dom.pages.get(page.pfn) is page:
            del dom.pages[page.pfn]
            dom.free_pfns.append(page.pfn)

    # -- grants --------------------------------------------------------------------------

    def op_grant(self, conn: Conn, message: Message) -> Reply:
        """Grant page ``pfn`` (allocated by this client) to ``to_domid``; reply ``gref``."""
        pfn = _int(message, "pfn")
        to_domid = _int(message, "to_domid", 0, DOMID_MAX)
        readonly = bool(message.get("readonly", False))
        page = conn.pages.get(pfn)
        if page is None:
            raise HvError(errno.EINVAL, f"pfn {pfn} was not allocated by this client")
        self._room_for_grants(conn.domain, 1)
        grant = self._new_grant(conn.domain, page, to_domid, readonly)
        conn.grants[grant.gref] = grant
        return Reply({"gref": grant.gref})

    def op_grant_many(self, conn: Conn, message: Message) -> Reply:
        """Grant each of ``pfns`` to ``to_domid``; reply ``grefs`` (all or nothing)."""
        pfns = _ints(message, "pfns")
        to_domid = _int(message, "to_domid", 0, DOMID_MAX)
        readonly = bool(message.get("readonly", False))
        pages = [conn.pages.get(pfn) for pfn in pfns]
        if None in pages:
            raise HvError(errno.EINVAL, "a pfn was not allocated by this client")
        self._room_for_grants(conn.domain, len(pages))
        grants = [self._new_grant(conn.domain, p, to_domid, readonly) for p in pages if p]
        conn.grants.update((g.gref, g) for g in grants)
        return Reply({"grefs": [g.gref for g in grants]})

    def op_end_access_many(self, conn: Conn, message: Message) -> Reply:
        """End each of ``grefs`` (all or nothing: EINVAL/EBUSY as :meth:`op_end_access`)."""
        grefs = _ints(message, "grefs")
        for gref in grefs:
            grant = conn.grants.get(gref)
            if grant is None:
                raise HvError(errno.EINVAL, f"gref {gref} is not an active grant of this client")
            if grant.maps:
                raise HvError(errno.EBUSY, f"gref {gref} is still mapped {grant.maps} time(s)")
        for gref in grefs:
            grant = conn.grants.pop(gref, None)
            if grant is not None:
                self._end(grant)
        return Reply()

    def op_end_access(self, conn: Conn, message: Message) -> Reply:
        """End a grant of this client; refused with ``EBUSY`` while it is mapped."""
        gref = _int(message, "gref")
        grant = conn.grants.get(gref)
        if grant is None:
            raise HvError(errno.EINVAL, f"gref {gref} is not an active grant of this client")
        if grant.maps:
            raise HvError(errno.EBUSY, f"gref {gref} is still mapped {grant.maps} time(s)")
        del conn.grants[gref]
        self._end(grant)
        return Reply()

    def _room_for_grants(self, dom: Domain, count: int) -> None:
        """``ENOSPC`` (Linux's ``gnttab_alloc_grant_references``) unless ``count`` more
        entries fit in ``dom``'s grant table; checked before any is made (all or nothing)."""
        if self.grant_entries is None:
            return
        free = len(dom.free_grefs) + max(0, self.grant_entries - dom.next_gref)
        if count > free:
            raise HvError(
                errno.ENOSPC,
                f"grant table of domain {dom.domid} full: {count} entries asked, {free} free "
                f"of {self.grant_entries}",
            )

    def _track(self, mapper: Domain, count: int) -> None:
        """Take ``count`` maptrack entries of ``mapper``; when they run out Xen fails the map
        (``GNTST_no_device_space``) and gntdev reports ``EINVAL`` as for any failed map."""
        if mapper.maptrack + count > self.maptrack_entries:
            raise HvError(
                errno.EINVAL,
                f"maptrack of domain {mapper.domid} full: {mapper.maptrack} of "
                f"{self.maptrack_entries} mappings in use, {count} more asked",
            )
        mapper.maptrack += count

    def _new_grant(self, dom: Domain, page: Page, to_domid: int, readonly: bool) -> Grant:
        if dom.free_grefs:
            gref = heapq.heappop(dom.free_grefs)
        else:
            gref, dom.next_gref = dom.next_gref, dom.next_gref + 1
        grant = Grant(dom, gref, page, to_domid, readonly)
        dom.grants[gref] = grant
        page.grants += 1
        return grant

    def _end(self, grant: Grant) -> None:
        dom = grant.domain
        if dom.grants.get(grant.gref) is grant:
            del dom.grants[grant.gref]
            heapq.heappush(dom.free_grefs, grant.gref)
            grant.page.grants -= 1
            self._maybe_free(dom, grant.page)

    def _revoke(self, grant: Grant) -> None:
        grant.revoking = True
        if grant.maps == 0:
            self._end(grant)

    def _check_grants(
        self, mapper: Domain, domid: int, refs: list[int], writable: bool
    ) -> tuple[Domain, list[Grant]]:
        _grant_count(len(refs))
        dom = self.domains.get(domid)
        if dom is None:
            raise HvError(errno.EINVAL, f"domain {domid} does not exist")
        grants: list[Grant] = []
        for ref in refs:
            grant = dom.grants.get(ref)
            if grant is None or grant.revoking:
                raise HvError(errno.EINVAL, f"gref {ref} of domain {domid} is not granted")
            if grant.to_domid != mapper.domid:
                raise HvError(
                    errno.EINVAL, f"gref {ref} of domain {domid} is granted to another domain"
                )
            if writable and grant.readonly:
                raise HvError(errno.EINVAL, f"gref {ref} of domain {domid} is read-only")
            grants.append(grant)
        return dom, grants

    def op_map(self, conn: Conn, message: Message) -> Reply:
        """Map ``refs`` of ``domid``; reply ``map_id``, ``pfns`` and that domain's RAM fd."""
        domid = _int(message, "domid", 0, DOMID_MAX)
        refs = _ints(message, "refs")
        dom, grants = self._check_grants(
            conn.domain, domid, refs, bool(message.get("writable", True))
        )
        self._track(conn.domain, len(grants))
        for grant in grants:
            grant.maps += 1
        mapping = Mapping(next(self._ids), conn, grants)
        conn.mappings[mapping.ident] = mapping
        pfns = [g.page.pfn for g in grants]
        return Reply({"map_id": mapping.ident, "pfns": pfns}, [dom.ram_fd])

    def op_grant_copy(self, conn: Conn, message: Message) -> Reply:
        """``GNTTABOP_copy`` from grant ``ref`` of ``domid`` (offset 0, ``length`` bytes) to
        the caller; reply the bytes (base64). Nothing stays mapped or tracked."""
        domid = _int(message, "domid", 0, DOMID_MAX)
        length = _int(message, "length", 1, PAGE_SIZE)
        _, (grant,) = self._check_grants(conn.domain, domid, [_int(message, "ref")], False)
        data = os.pread(grant.domain.ram_fd, length, grant.page.pfn * PAGE_SIZE)
        return Reply({"data": base64.b64encode(data).decode("ascii")})

    def op_unmap(self, conn: Conn, message: Message) -> Reply:
        """Forget mapping ``map_id`` (the client has unmapped it)."""
        mapping = conn.mappings.get(_int(message, "map_id", 0, 1 << 62))
        if mapping is None:
            raise HvError(errno.ENOENT, "no such mapping")
        self._unmap(mapping)
        return Reply()

    def _unmap(self, mapping: Mapping) -> None:
        del mapping.conn.mappings[mapping.ident]
        mapping.conn.domain.maptrack -= len(mapping.grants)
        self._drop_maps(mapping.grants)

    def _drop_maps(self, grants: list[Grant]) -> None:
        for grant in grants:
            grant.maps -= 1
            if grant.revoking and grant.maps == 0:
                self._end(grant)

    # -- event channels ------------------------------------------------------------------

    def _new_port(self, dom: Domain, remote_domid: int, pair: ChannelPair, side: int,
                  conn: Conn) -> Port:
        number = 1
        while number in dom.ports:
            number += 1
        if number >= EVTCHN_MAX_PORTS:
            raise HvError(errno.ENOSPC, "no free event-channel port")
        port = Port(dom, number, remote_domid, pair, side, conn)
        dom.ports[number] = port
        conn.ports[number] = port
        pair.users += 1
        return port

    def op_evtchn_alloc_unbound(self, conn: Conn, message: Message) -> Reply:
        """``EVTCHNOP_alloc_unbound``: reply ``port`` and fds [incoming, outgoing]."""
        remote = _int(message, "remote_domid", 0, DOMID_MAX)
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        pair = ChannelPair((os.eventfd(0, flags), os.eventfd(0, flags)))
        port = self._new_port(conn.domain, remote, pair, 0, conn)
        return Reply({"port": port.port}, [port.incoming, port.outgoing])

    def op_evtchn_bind_interdomain(self, conn: Conn, message: Message) -> Reply:
        """``EVTCHNOP_bind_interdomain``: reply ``port`` and fds [incoming, outgoing]."""
        remote_domid = _int(message, "remote_domid", 0, DOMID_MAX)
        remote_port = _int(message, "remote_port")
        rdom = self.domains.get(remote_domid)
        if rdom is None:
            raise HvError(errno.ESRCH, f"domain {remote_domid} does not exist")
        rport = rdom.ports.get(remote_port)
        if rport is None or rport.peer is not None or rport.remote_domid != conn.domain.domid:
            raise HvError(
                errno.EINVAL,
                f"port {remote_port} of domain {remote_domid} is not unbound for this domain",
            )
        port = self._new_port(conn.domain, remote_domid, rport.pair, 1 - rport.side, conn)
        port.peer, rport.peer = rport, port
        os.eventfd_write(port.incoming, 1)
        return Reply({"port": port.port}, [port.incoming, port.outgoing])

    def op_evtchn_unbind(self, conn: Conn, message: Message) -> Reply:
        """``EVTCHNOP_close`` of a port this client bound."""
        port = conn.ports.get(_int(message, "port"))
        if port is None:
            raise HvError(errno.ENOTCONN, "port not bound by this client")
        self._unbind(port)
        return Reply()

    def _unbind(self, port: Port) -> None:
        del port.conn.ports[port.port]
        del port.domain.ports[port.port]
        if port.peer is not None:
            port.peer.peer = None
            port.peer.remote_domid = port.domain.domid
        port.pair.users -= 1
        if port.pair.users == 0:
            self._drop_pair(port.pair)

    @staticmethod
    def _drop_pair(pair: ChannelPair) -> None:
        for fd in pair.fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- dma-bufs ------------------------------------------------------------------------

    def _new_dmabuf(self, owner: Domain, source: Domain, pfns: list[int]) -> tuple[DmaBuf, int]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        st = os.fstat(theirs.fileno())
        buf = DmaBuf(next(self._ids), owner, source, pfns, (st.st_dev, st.st_ino), ours)
        self.dmabufs[buf.ident] = buf
        return buf, theirs.detach()

    def op_dmabuf_export(self, conn: Conn, message: Message) -> Reply:
        """``DMABUF_EXP_FROM_REFS``: reply ``export_id`` and the dma-buf fd."""
        flags = _int(message, "flags")
        if flags & GNTDEV_DMA_FLAG_WC and flags & GNTDEV_DMA_FLAG_COHERENT:
            raise HvError(errno.EINVAL, "GNTDEV_DMA_FLAG_WC and _COHERENT are exclusive")
        domid = _int(message, "domid", 0, DOMID_MAX)
        dom, grants = self._check_grants(conn.domain, domid, _ints(message, "refs"), True)
        self._track(conn.domain, len(grants))
        for grant in grants:
            grant.maps += 1
        buf, fd = self._new_dmabuf(conn.domain, dom, [g.page.pfn for g in grants])
        buf.grants = grants
        self.spawn(buf)
        return Reply({"export_id": buf.ident}, [fd], [fd])

    def op_dmabuf_alloc(self, conn: Conn, message: Message) -> Reply:
        """A zeroed dma-buf of ``pages`` pages in this domain's RAM; reply its fd."""
        count = _int(message, "pages", 1, MAX_ALLOC_PAGES)
        pfns = self._alloc(conn.domain, count)
        buf, fd = self._new_dmabuf(conn.domain, conn.domain, pfns)
        buf.pages = [conn.domain.pages[pfn] for pfn in pfns]
        self.spawn(buf)
        return Reply({"export_id": buf.ident}, [fd], [fd])

    def _find_dmabuf(self, message: Message) -> DmaBuf:
        key = (_int(message, "dev", 0, 1 << 63), _int(message, "ino", 0, 1 << 63))
        for buf in self.dmabufs.values():
            if buf.ino == key:
                return buf
        raise HvError(errno.EINVAL, "not a dma-buf")

    def op_dmabuf_lookup(self, conn: Conn, message: Message) -> Reply:
        """The memory of the dma-buf whose fd has inode (``dev``, ``ino``): ``pfns`` + RAM fd."""
        buf = self._find_dmabuf(message)
        return Reply({"pfns": buf.pfns, "domid": buf.source.domid}, [buf.source.ram_fd])

    def op_dmabuf_import(self, conn: Conn, message: Message) -> Reply:
        """``DMABUF_IMP_TO_REFS``: grant an allocated dma-buf's pages to ``domid``."""
        count = _int(message, "count")
        _grant_count(count)
        domid = _int(message, "domid", 0, DOMID_MAX)
        buf = self._find_dmabuf(message)
        if buf.owner is not conn.domain or not buf.pages:
            raise HvError(errno.EINVAL, "dma-buf pages are not this domain's own memory")
        if len(buf.pfns) != count:
            raise HvError(
                errno.EINVAL, f"dma-buf has {len(buf.pfns)} pages, import asked for {count}"
            )
        self._room_for_grants(conn.domain, len(buf.pages))
        grants = [self._new_grant(conn.domain, page, domid, False) for page in buf.pages]
        imp = Import(next(self._ids), buf, grants)
        conn.imports[imp.ident] = imp
        return Reply({"import_id": imp.ident, "refs": [g.gref for g in grants]})

    def op_dmabuf_import_release(self, conn: Conn, message: Message) -> Reply:
        """``DMABUF_IMP_RELEASE``: revoke the import's grants (deferred while mapped)."""
        imp = conn.imports.get(_int(message, "import_id", 0, 1 << 62))
        if imp is None:
            raise HvError(errno.ENOENT, "no such import")
        self._release_import(conn, imp)
        return Reply()

    def _release_import(self, conn: Conn, imp: Import) -> None:
        del conn.imports[imp.ident]
        for grant in imp.grants:
            self._revoke(grant)

    def released(self, buf: DmaBuf) -> None:
        """Every fd of ``buf`` is closed: drop its mappings or free its pages."""
        if self.dmabufs.pop(buf.ident, None) is None:
            return
        buf.sock.close()
        buf.owner.maptrack -= len(buf.grants)
        self._drop_maps(buf.grants)
        for page in buf.pages:
            page.held = False
            self._maybe_free(buf.owner, page)
        buf.released.set()

    def live_export(self, domain: Domain, ids: list[int]) -> DmaBuf | None:
        """The first of ``ids`` (newest first) that is a live export of ``domain``.

        A buffer whose every fd is already closed counts as released even if its watcher
        has not run yet: in the kernel the last ``close`` releases synchronously.
        """
        for ident in ids:
            buf = self.dmabufs.get(ident)
            if buf is None or buf.owner is not domain or not buf.grants:
                continue
            if _hung_up(buf.sock):
                self.released(buf)
                continue
            return buf
        return None


def _hung_up(sock: socket.socket) -> bool:
    """Whether every copy of the peer end of ``sock`` is closed (EOF is readable)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def _watch_dmabuf(machine: Machine, buf: DmaBuf) -> None:
    sock = trio.socket.from_stdlib_socket(buf.sock)
    with contextlib.suppress(OSError):
        while await sock.recv(4096):
            pass
    machine.released(buf)


async def _wait_released(machine: Machine, conn: Conn, message: Message) -> Reply:
    ids = _ints(message, "ids")
    timeout_ms = _int(message, "timeout_ms")
    buf = machine.live_export(conn.domain, ids)
    result = "unknown"
    if buf is not None:
        result = "timeout"
        with trio.move_on_after(timeout_ms / 1000):
            await buf.released.wait()
            result = "released"
    dead = [ident for ident in ids if ident not in machine.dmabufs]
    return Reply({"result": result, "dead": dead})


async def _serve_client(machine: Machine, sock: trio.socket.SocketType) -> None:
    conn: Conn | None = None
    try:
        with sock:
            while True:
                received = await trio_recv_message(sock)
                if received is None:
                    return
                message, fds = received
                for fd in fds:
                    os.close(fd)
                try:
                    if message.get("op") == "counters":
                        reply = Reply(machine.counters())
                    elif conn is None:
                        if message.get("op") != "hello":
                            raise HvError(errno.EPROTO, "say hello first")
                        conn = machine.connect(_int(message, "domid", 0, DOMID_MAX))
                        reply = Reply({"conn": conn.ident})
                    elif message.get("op") == "bye":
                        machine.disconnect(conn)
                        await trio_send_message(sock, {})
                        return
                    elif message.get("op") == "dmabuf_wait":
                        reply = await _wait_released(machine, conn, message)
                    else:
                        reply = machine.handle(conn, message)
                except HvError as exc:
                    reply = Reply({"errno": exc.errno, "message": exc.message})
                try:
                    await trio_send_message(sock, reply.body, reply.fds)
                finally:
                    for fd in reply.close_after_send:
                        os.close(fd)
    except (ConnectionError, OSError):
        pass
    finally:
        if conn is not None:
            machine.disconnect(conn)


async def serve(
    socket_path: str,
    machine: Machine | None = None,
    *,
    task_status: trio.TaskStatus[Machine] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the simulated hypervisor on ``socket_path`` until cancelled."""
    machine = machine if machine is not None else Machine()
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
            os.unlink(socket_path)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        async with trio.open_nursery() as nursery:
            machine.spawn = lambda buf: nursery.start_soon(_watch_dmabuf, machine, buf)
            await listener.bind(socket_path)
            listener.listen(64)
            task_status.started(machine)
            while True:
                client, _ = await listener.accept()
                nursery.start_soon(_serve_client, machine, client)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        machine.close()


class HypervisorThread:
    """A hypervisor serving ``socket_path`` from a background thread with its own trio loop.

    For tests in one process: the platform clients block on the socket like ioctls, so the
    server must not share their event loop. Use as a context manager or call :meth:`stop`.
    """

    def __init__(
        self,
        socket_path: str,
        *,
        grant_entries: int | None = GRANT_ENTRIES,
        maptrack_entries: int = MAPTRACK_ENTRIES,
    ) -> None:
        self.socket_path = socket_path
        self._grant_entries = grant_entries
        self._maptrack_entries = maptrack_entries
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._machine: Machine | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sim-hypervisor", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._cancel = scope
            async with trio.open_nursery() as nursery:
                self._machine = await nursery.start(
                    serve,
                    self.socket_path,
                    Machine(
                        grant_entries=self._grant_entries,
                        maptrack_entries=self._maptrack_entries,
                    ),
                )
                self._ready.set()

    def counters(self) -> dict[str, Any]:
        """:meth:`Machine.counters`, read safely from another thread."""
        assert self._token is not None and self._machine is not None
        return trio.from_thread.run_sync(self._machine.counters, trio_token=self._token)

    def stop(self) -> None:
        """Stop serving and close everything the hypervisor holds."""
        if self._thread.is_alive() and self._cancel is not None and self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join()

    def __enter__(self) -> HypervisorThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def query_counters(socket_path: str) -> dict[str, Any]:
    """:meth:`Machine.counters` of the hypervisor serving ``socket_path`` (any process)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(socket_path)
        send_message(sock, {"op": "counters"})
        reply, fds = recv_message(sock)
    for fd in fds:
        os.close(fd)
    return reply


class HypervisorProcess:
    """A hypervisor in a child process (``python -m displback.sim.hypervisor``).

    Its fds do not share this process's table, so fd numbers behave as on a real Dom0.
    """

    def __init__(
        self, socket_path: str, *, timeout: float = 10.0, grant_entries: int = GRANT_ENTRIES
    ) -> None:
        self.socket_path = socket_path
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "displback.sim.hypervisor", "--socket", socket_path,
             "--grant-entries", str(grant_entries)]
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                query_counters(socket_path)
                return
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("simulated hypervisor did not start") from None
                time.sleep(0.02)

    @property
    def pid(self) -> int:
        """The child's process id (the benchmark reads its CPU time)."""
        return self._proc.pid

    def counters(self) -> dict[str, Any]:
        """:meth:`Machine.counters` of the child."""
        return query_counters(self.socket_path)

    def stop(self) -> None:
        """Interrupt the child (it cleans up its socket) and reap it."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> HypervisorProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class HasCounters(Protocol):
    """A running hypervisor (thread or process) whose resource counters can be read."""

    def counters(self) -> dict[str, Any]: ...


def live_resources(counters: dict[str, Any]) -> dict[str, Any]:
    """What :meth:`Machine.counters` shows as still held: connections and, per domain, every
    non-zero counter (``{"dom5": {"grants": 2}}``); empty when nothing is held."""
    live: dict[str, Any] = {}
    if counters["connections"]:
        live["connections"] = counters["connections"]
    for domid, values in counters["domains"].items():
        held = {k: v for k, v in values.items() if v}
        if held:
            live[f"dom{domid}"] = held
    return live


def wait_for_no_leaks(
    hv: HasCounters, timeout: float = 5.0, *, expected: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Poll ``hv`` until only ``expected`` (default: nothing) is held, or ``timeout`` seconds
    pass (releases by closing peers are asynchronous); return what is held."""
    deadline = time.monotonic() + timeout
    while True:
        live = live_resources(hv.counters())
        if live == (expected or {}) or time.monotonic() > deadline:
            return live
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    """``python -m displback.sim.hypervisor --socket PATH``: serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--socket", required=True, help="UNIX socket path to listen on")
    parser.add_argument("--grant-entries", type=int, default=GRANT_ENTRIES,
                        help="each domain's grant table size (xl.cfg max_grant_frames × 512; "
                             f"default {GRANT_ENTRIES}, Xen's)")
    args = parser.parse_args(argv)
    trio.run(_serve_until_signal, args.socket, args.grant_entries)
    return 0


async def _serve_until_signal(socket_path: str, grant_entries: int = GRANT_ENTRIES) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, socket_path, Machine(grant_entries=grant_entries))
            async for _signum in signals:
                nursery.cancel_scope.cancel()
                return


if __name__ == "__main__":
    raise SystemExit(main())
