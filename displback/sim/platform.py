"""The platform devices over the simulated hypervisor: Dom0's backend view and the guest's.

:class:`SimPlatform` implements :class:`displback.xen.interfaces.Platform` for the backend
(domain 0 by default). :class:`SimDomain` is the handle the simulated guest (frontend) uses:
its own RAM pages, grants, and the same event-channel and gntdev devices (a guest maps Dom0's
grants when the backend allocates buffers). Every device open is its own connection to the
hypervisor, so closing it — or the process dying — releases what it held, as with the real
device files. All calls block briefly on the hypervisor socket, like the ioctls they mirror;
they are thread-safe.

Live client-side resources (connections, mappings, eventfds, held dma-buf fds) are counted in
:func:`client_resources` for leak checks.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import errno
import os
import select
import socket
import stat
import threading
from typing import TYPE_CHECKING, Any

from displback.mapping import ClosesOnExit, MappedMemory, MappedRegion
from displback.protocol.constants import pages_for
from displback.sim.hvwire import Message, recv_message, send_message
from displback.sim.hypervisor import EVTCHN_MAX_PORTS
from displback.sim.memmap import PageMapping, map_pages

if TYPE_CHECKING:
    from displback.mapping import DmabufMapping
    from displback.xen.interfaces import (
        DmaBufs,
        EventChannels,
        GrantDevice,
        GrantMapping,
        Platform,
    )

__all__ = [
    "SimDmabufMapping",
    "SimDomain",
    "SimEventChannels",
    "SimGrantDevice",
    "SimGrantMapping",
    "SimPlatform",
    "client_resources",
]

_resources: collections.Counter[str] = collections.Counter()
_resources_lock = threading.Lock()


def _count(kind: str, delta: int) -> None:
    with _resources_lock:
        _resources[kind] += delta


def client_resources() -> dict[str, int]:
    """Open client-side resources of this process: ``connections``, ``mappings``,
    ``eventfds``, ``dmabuf_refs`` (fds held by dma-buf mappings and imports). Zero = no leak."""
    with _resources_lock:
        return {k: _resources[k] for k in ("connections", "mappings", "eventfds", "dmabuf_refs")}


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _HypervisorLink:
    """One hello'd connection to the hypervisor speaking for ``domid``."""

    def __init__(self, socket_path: str, domid: int) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._lock = threading.Lock()
        try:
            self._sock.connect(socket_path)
        except BaseException:
            self._sock.close()
            raise
        self.closed = False
        _count("connections", 1)
        try:
            self.call("hello", domid=domid)
        except BaseException:
            self.abandon()
            raise

    def call_fds(self, op: str, **args: Any) -> tuple[Message, list[int]]:
        """Send ``op`` and return the reply and its fds (the caller closes them)."""
        with self._lock:
            if self.closed:
                raise OSError(errno.EBADF, "device is closed")
            send_message(self._sock, {"op": op, **args})
            reply, fds = recv_message(self._sock)
        if "errno" in reply:
            _close_fds(fds)
            raise OSError(int(reply["errno"]), str(reply.get("message", "")))
        return reply, fds

    def call(self, op: str, **args: Any) -> Message:
        """Send ``op`` expecting no fds back."""
        reply, fds = self.call_fds(op, **args)
        _close_fds(fds)
        return reply

    def close(self) -> None:
        """Say bye (the hypervisor releases what this connection held) and close."""
        if self.closed:
            return
        with contextlib.suppress(OSError, ConnectionError):
            self.call("bye")
        self.abandon()

    def abandon(self) -> None:
        """Close the socket without a goodbye, as a dying process would."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._sock.close()
        _count("connections", -1)


class SimGrantMapping(MappedRegion):
    """Grants mapped from a :class:`SimGrantDevice` (implements ``GrantMapping``): contiguous,
    read-only unless mapped writable; closing also tells Xen."""

    def __init__(self, device: SimGrantDevice, map_id: int, memory: MappedMemory) -> None:
        super().__init__(memory)
        self._device = device
        self._map_id = map_id
        _count("mappings", 1)

    def _unmapped(self) -> None:
        _count("mappings", -1)
        self._device._unmapped(self._map_id)


class SimDmabufMapping(MappedRegion):
    """A dma-buf's memory mapped for CPU access; holds a dup of the fd (``DmabufMapping``)."""

    def __init__(self, fd: int, memory: MappedMemory) -> None:
        super().__init__(memory)
        self._fd = fd
        _count("dmabuf_refs", 1)
        _count("mappings", 1)

    def _unmapped(self) -> None:
        os.close(self._fd)
        _count("mappings", -1)
        _count("dmabuf_refs", -1)


def _dmabuf_key(fd: int) -> dict[str, int]:
    st = os.fstat(fd)
    if not stat.S_ISSOCK(st.st_mode):  # simulated dma-bufs are socket ends
        raise OSError(errno.EINVAL, "not a dma-buf")
    return {"dev": st.st_dev, "ino": st.st_ino}


class _Port:
    __slots__ = ("incoming", "outgoing", "enabled")

    def __init__(self, incoming: int, outgoing: int) -> None:
        self.incoming = incoming
        self.outgoing = outgoing
        self.enabled = True


_ARMED = select.EPOLLIN | select.EPOLLONESHOT


class SimEventChannels:
    """One simulated ``/dev/xen/evtchn`` open (implements ``EventChannels``).

    An epoll set holds each bound port's incoming eventfd with ``EPOLLONESHOT``: its fd is
    :meth:`fileno`; a port that fires is disarmed (masked) until :meth:`unmask` re-arms it,
    and the eventfd counter keeps notifications that arrive meanwhile.
    """

    def __init__(self, socket_path: str, domid: int) -> None:
        self._conn = _HypervisorLink(socket_path, domid)
        self._epoll = select.epoll()
        self._ports: dict[int, _Port] = {}
        self._by_fd: dict[int, int] = {}
        self._lock = threading.Lock()

    def _bound(self, op: str, **args: Any) -> int:
        reply, fds = self._conn.call_fds(op, **args)
        if len(fds) != 2:
            _close_fds(fds)
            raise ConnectionError("hypervisor sent no event-channel fds")
        _count("eventfds", 2)
        number = int(reply["port"])
        with self._lock:
            self._ports[number] = _Port(fds[0], fds[1])
            self._by_fd[fds[0]] = number
            self._epoll.register(fds[0], _ARMED)
        return number

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """Bind to ``remote_port`` of ``remote_domid``; the new port starts pending once."""
        return self._bound(
            "evtchn_bind_interdomain", remote_domid=remote_domid, remote_port=remote_port
        )

    def bind_unbound_port(self, remote_domid: int) -> int:
        """Allocate a port that ``remote_domid`` may bind to."""
        return self._bound("evtchn_alloc_unbound", remote_domid=remote_domid)

    def _port(self, local_port: int) -> _Port:
        if not 0 <= local_port < EVTCHN_MAX_PORTS:
            raise OSError(errno.EINVAL, f"port {local_port} out of range")
        port = self._ports.get(local_port)
        if port is None:
            raise OSError(errno.ENOTCONN, f"port {local_port} is not bound here")
        return port

    def notify(self, local_port: int) -> None:
        """Signal the peer: one write to its eventfd."""
        with self._lock:
            os.eventfd_write(self._port(local_port).outgoing, 1)

    def unbind(self, local_port: int) -> None:
        """Close ``local_port``; its peer becomes unbound."""
        with self._lock:
            self._port(local_port)
        self._conn.call("evtchn_unbind", port=local_port)
        with self._lock:
            self._forget(local_port)

    def _forget(self, number: int) -> None:
        port = self._ports.pop(number)
        del self._by_fd[port.incoming]
        self._epoll.unregister(port.incoming)
        _close_fds([port.incoming, port.outgoing])
        _count("eventfds", -2)

    def fileno(self) -> int:
        """The epoll fd: readable while an unmasked port is pending."""
        return self._epoll.fileno()

    def read_pending(self) -> list[int]:
        """Ports that fired since last read, each left masked; [] when none."""
        fired: list[int] = []
        with self._lock:
            for fd, _events in self._epoll.poll(0):
                number = self._by_fd.get(fd)
                if number is None:
                    continue
                port = self._ports[number]
                try:
                    os.eventfd_read(port.incoming)
                except BlockingIOError:
                    self._epoll.modify(fd, _ARMED)
                    continue
                port.enabled = False
                fired.append(number)
        return fired

    def unmask(self, ports: list[int]) -> None:
        """Re-enable ``ports``; a notification that came while masked fires again now."""
        with self._lock:
            for number in ports:
                port = self._ports.get(number)
                if port is not None and not port.enabled:
                    port.enabled = True
                    self._epoll.modify(port.incoming, _ARMED)

    def reset(self) -> None:
        """Drop what is pending; those ports stay masked (unmask them after rescanning)."""
        self.read_pending()

    def close(self) -> None:
        """Unbind every port and close the device."""
        self._conn.close()
        with self._lock:
            for number in list(self._ports):
                self._forget(number)
            self._epoll.close()

    def abandon(self) -> None:
        """Drop the hypervisor connection without unbinding (as a crashing process would)."""
        self._conn.abandon()
        with self._lock:
            for number in list(self._ports):
                self._forget(number)
            self._epoll.close()


class SimGrantDevice:
    """One simulated ``/dev/xen/gntdev`` open (implements ``GrantDevice``).

    ``dmabuf_errno``: None when the dma-buf ioctls work; ``errno.ENOTTY`` to act like a
    kernel without ``CONFIG_XEN_GNTDEV_DMABUF`` (all four fail); ``errno.EINVAL`` to act like
    an x86 PV Dom0 (export fails, import works).
    """

    def __init__(self, socket_path: str, domid: int, dmabuf_errno: int | None = None) -> None:
        self._socket_path = socket_path
        self._domid = domid
        self._dmabuf_errno = dmabuf_errno
        self._conn = _HypervisorLink(socket_path, domid)
        self._lock = threading.Lock()
        self._live_maps = 0
        self._closing = False
        self._exports: list[tuple[int, int]] = []  # (fd number, export id), newest first
        self._imports: list[tuple[int, int, int]] = []  # (fd number, import id, held fd)

    def map_grants(self, domid: int, refs: list[int], *, writable: bool = True) -> SimGrantMapping:
        """Map ``refs`` of ``domid`` contiguously (EINVAL for any bad grant; nothing mapped)."""
        if self._closing:
            raise OSError(errno.EBADF, "grant device is closed")
        reply, fds = self._conn.call_fds("map", domid=domid, refs=list(refs), writable=writable)
        map_id = int(reply["map_id"])
        try:
            pages = map_pages(fds[0], [int(p) for p in reply["pfns"]], writable=writable)
        except BaseException:
            self._conn.call("unmap", map_id=map_id)
            raise
        finally:
            _close_fds(fds)
        with self._lock:
            self._live_maps += 1
        return SimGrantMapping(self, map_id, pages)

    def copy_from_grant(self, domid: int, ref: int, length: int) -> bytes:
        """The first ``length`` bytes of grant ``ref`` of ``domid``, copied by the hypervisor."""
        if self._closing:
            raise OSError(errno.EBADF, "grant device is closed")
        reply = self._conn.call("grant_copy", domid=domid, ref=ref, length=length)
        return base64.b64decode(reply["data"])

    def _unmapped(self, map_id: int) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            self._conn.call("unmap", map_id=map_id)
        with self._lock:
            self._live_maps -= 1
            last = self._closing and self._live_maps == 0
        if last:
            self._conn.close()

    def _check_dmabuf(self, *, export: bool) -> None:
        if self._dmabuf_errno == errno.ENOTTY or (export and self._dmabuf_errno is not None):
            raise OSError(self._dmabuf_errno, os.strerror(self._dmabuf_errno))

    def dmabuf_export(self, domid: int, refs: list[int], *, flags: int = 0) -> int:
        """Export ``refs`` of ``domid`` as a new dma-buf fd (close-on-exec)."""
        self._check_dmabuf(export=True)
        reply, fds = self._conn.call_fds("dmabuf_export", domid=domid, refs=list(refs), flags=flags)
        with self._lock:
            self._exports.insert(0, (fds[0], int(reply["export_id"])))
        return fds[0]

    def dmabuf_wait_released(self, fd: int, timeout_ms: int) -> bool:
        """BLOCK until the export known by fd number ``fd`` is released (see the Protocol)."""
        self._check_dmabuf(export=False)
        with self._lock:
            ids = [ident for number, ident in self._exports if number == fd]
        if not ids:
            return True
        waiter = _HypervisorLink(self._socket_path, self._domid)
        try:
            reply = waiter.call("dmabuf_wait", ids=ids, timeout_ms=timeout_ms)
        finally:
            waiter.close()
        with self._lock:  # released exports leave the list, as in gntdev
            dead = set(reply["dead"])
            self._exports = [e for e in self._exports if e[1] not in dead]
        return bool(reply["result"] != "timeout")

    def dmabuf_import_to_refs(self, fd: int, count: int, domid: int) -> list[int]:
        """Grant the local dma-buf ``fd`` (``count`` pages exactly) to ``domid``."""
        self._check_dmabuf(export=False)
        key = _dmabuf_key(fd)
        reply = self._conn.call("dmabuf_import", count=count, domid=domid, **key)
        held = os.dup(fd)
        _count("dmabuf_refs", 1)
        with self._lock:
            self._imports.insert(0, (fd, int(reply["import_id"]), held))
        return [int(r) for r in reply["refs"]]

    def dmabuf_import_release(self, fd: int) -> None:
        """Revoke the grants of the import made with fd number ``fd`` and drop it."""
        self._check_dmabuf(export=False)
        with self._lock:
            found = next((imp for imp in self._imports if imp[0] == fd), None)
            if found is None:
                raise OSError(errno.ENOENT, f"no dma-buf import with fd {fd}")
            self._imports.remove(found)
        try:
            self._conn.call("dmabuf_import_release", import_id=found[1])
        finally:
            os.close(found[2])
            _count("dmabuf_refs", -1)

    def close(self) -> None:
        """Release imports; the device goes once its last mapping is closed."""
        with self._lock:
            imports, self._imports = self._imports, []
            self._closing = True
            last = self._live_maps == 0
        for _fd, import_id, held in imports:
            with contextlib.suppress(OSError, ConnectionError):
                self._conn.call("dmabuf_import_release", import_id=import_id)
            os.close(held)
            _count("dmabuf_refs", -1)
        if last:
            self._conn.close()

    def abandon(self) -> None:
        """Drop the hypervisor connection at once, as a crashing process would."""
        with self._lock:
            imports, self._imports = self._imports, []
        for _fd, _ident, held in imports:
            os.close(held)
            _count("dmabuf_refs", -1)
        self._conn.abandon()


class _DmaBufHelper:
    """``DmaBufs`` over a connection of domain ``domid``."""

    def __init__(self, conn: _HypervisorLink) -> None:
        self._helper_conn = conn

    def open_dmabuf(self, fd: int) -> SimDmabufMapping:
        """Map the dma-buf ``fd``; the mapping holds a dup of it until closed."""
        key = _dmabuf_key(fd)
        reply, fds = self._helper_conn.call_fds("dmabuf_lookup", **key)
        try:
            pages = map_pages(fds[0], [int(p) for p in reply["pfns"]], writable=True)
        finally:
            _close_fds(fds)
        try:
            held = os.dup(fd)
        except BaseException:
            pages.close()
            raise
        return SimDmabufMapping(held, pages)

    def alloc_dmabuf(self, size: int) -> int:
        """A zeroed dma-buf of this domain's own memory (``size`` rounded up to pages)."""
        if size <= 0:
            raise OSError(errno.EINVAL, f"dma-buf size {size}")
        _reply, fds = self._helper_conn.call_fds("dmabuf_alloc", pages=pages_for(size))
        return fds[0]


class SimPlatform(_DmaBufHelper, ClosesOnExit):
    """The backend's platform on the simulated machine (implements ``Platform``).

    ``dmabuf_export_supported=False`` makes every gntdev opened here fail
    ``dmabuf_export`` with ``dmabuf_unsupported_errno``: ``ENOTTY`` (kernel without
    ``CONFIG_XEN_GNTDEV_DMABUF``: the other three dma-buf ioctls fail too) or ``EINVAL``
    (x86 PV Dom0: import still works).
    """

    def __init__(
        self,
        hypervisor_path: str,
        xenstore_path: str,
        *,
        domid: int = 0,
        dmabuf_export_supported: bool = True,
        dmabuf_unsupported_errno: int = errno.ENOTTY,
    ) -> None:
        if dmabuf_unsupported_errno not in (errno.ENOTTY, errno.EINVAL):
            raise ValueError("dmabuf_unsupported_errno must be ENOTTY or EINVAL")
        super().__init__(_HypervisorLink(hypervisor_path, domid))
        self._hypervisor_path = hypervisor_path
        self._xenstore_path = xenstore_path
        self._domid = domid
        self._dmabuf_errno = None if dmabuf_export_supported else dmabuf_unsupported_errno

    @property
    def domid(self) -> int:
        """This domain's id."""
        return self._domid

    @property
    def xenstore_path(self) -> str:
        """Where the XenStore client connects."""
        return self._xenstore_path

    def open_event_channels(self) -> SimEventChannels:
        """Open a simulated ``/dev/xen/evtchn``."""
        return SimEventChannels(self._hypervisor_path, self._domid)

    def open_grant_device(self) -> SimGrantDevice:
        """Open a simulated ``/dev/xen/gntdev``."""
        return SimGrantDevice(self._hypervisor_path, self._domid, self._dmabuf_errno)

    def close(self) -> None:
        """Close the platform's own connection (devices are closed by their owners)."""
        self._helper_conn.close()


class SimDomain(_DmaBufHelper, ClosesOnExit):
    """A simulated guest domain's handle: its RAM, its grants, and its devices.

    The frontend side of the protocol uses it to allocate pages (:meth:`alloc_pages`), see
    them (:meth:`map_pages`), grant them to the backend (:meth:`grant`), end access
    (:meth:`end_access`, refused with ``EBUSY`` while mapped), and to open event channels
    (``bind_unbound_port`` + ``notify``) and a grant device (to map Dom0's grants when the
    backend allocates buffers). Closing it — or the process dying — ends its grants (lazily
    for mapped ones) and frees its pages.
    """

    def __init__(self, hypervisor_path: str, domid: int) -> None:
        super().__init__(_HypervisorLink(hypervisor_path, domid))
        self._hypervisor_path = hypervisor_path
        self._domid = domid
        self._ram_fd: int | None = None
        self._ram_lock = threading.Lock()

    @property
    def domid(self) -> int:
        """This domain's id."""
        return self._domid

    def alloc_pages(self, count: int) -> list[int]:
        """Allocate ``count`` zeroed pages; return their frame numbers."""
        reply, fds = self._helper_conn.call_fds("alloc_pages", count=count)
        with self._ram_lock:
            if self._ram_fd is None:
                self._ram_fd = fds.pop(0)
        _close_fds(fds)
        return [int(p) for p in reply["pfns"]]

    def free_pages(self, pfns: list[int]) -> None:
        """Free pages allocated here; ``EBUSY`` if one is still granted."""
        self._helper_conn.call("free_pages", pfns=list(pfns))

    def map_pages(self, pfns: list[int]) -> PageMapping:
        """Map own pages contiguously and writable (the guest kernel's view of them)."""
        with self._ram_lock:
            if self._ram_fd is None:
                _reply, fds = self._helper_conn.call_fds("ram_fd")
                self._ram_fd = fds[0]
            return PageMapping(self._ram_fd, list(pfns), writable=True)

    def grant(self, pfn: int, to_domid: int, *, readonly: bool = False) -> int:
        """``gnttab_grant_foreign_access``: grant page ``pfn`` to ``to_domid``; return gref."""
        reply = self._helper_conn.call("grant", pfn=pfn, to_domid=to_domid, readonly=readonly)
        return int(reply["gref"])

    def grant_pages(self, pfns: list[int], to_domid: int, *, readonly: bool = False) -> list[int]:
        """:meth:`grant` for many pages in one round trip (all or nothing); grefs in order."""
        reply = self._helper_conn.call(
            "grant_many", pfns=list(pfns), to_domid=to_domid, readonly=readonly
        )
        return [int(g) for g in reply["grefs"]]

    def end_access_pages(self, grefs: list[int]) -> None:
        """:meth:`end_access` for many grants (all or nothing: none ends if one fails)."""
        self._helper_conn.call("end_access_many", grefs=list(grefs))

    def end_access(self, gref: int) -> None:
        """``gnttab_end_foreign_access_ref``: EBUSY while mapped, EINVAL if not granted."""
        self._helper_conn.call("end_access", gref=gref)

    def open_event_channels(self) -> SimEventChannels:
        """Open this domain's event-channel device."""
        return SimEventChannels(self._hypervisor_path, self._domid)

    def open_grant_device(self) -> SimGrantDevice:
        """Open a grant device to map other domains' grants into this one."""
        return SimGrantDevice(self._hypervisor_path, self._domid)

    def close(self) -> None:
        """End every grant (lazily if mapped) and free every page of this handle."""
        self._helper_conn.close()
        self._drop_ram()

    def abandon(self) -> None:
        """Vanish without a goodbye, as a crashing guest would."""
        self._helper_conn.abandon()
        self._drop_ram()

    def _drop_ram(self) -> None:
        with self._ram_lock:
            if self._ram_fd is not None:
                os.close(self._ram_fd)
                self._ram_fd = None


if TYPE_CHECKING:  # mypy proves the simulation implements the interfaces

    def _implements(
        platform: SimPlatform,
        domain: SimDomain,
        evtchn: SimEventChannels,
        gntdev: SimGrantDevice,
        mapping: SimGrantMapping,
        dmabuf: SimDmabufMapping,
    ) -> tuple[Platform, DmaBufs, EventChannels, GrantDevice, GrantMapping, DmabufMapping]:
        return platform, domain, evtchn, gntdev, mapping, dmabuf
