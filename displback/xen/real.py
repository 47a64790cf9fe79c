"""The platform of a real Dom0: ``/dev/xen/evtchn``, ``/dev/xen/gntdev`` and Dom0 dma-bufs.

:class:`RealPlatform` implements :class:`displback.xen.interfaces.Platform` with the Linux
devices, one thin method per ioctl or syscall (layouts in :mod:`displback.xen.ioctls`):

* event channels: ``BIND_INTERDOMAIN`` (its return value is the local port), ``NOTIFY``,
  ``UNBIND``, ``RESET``; pending ports are ``read()`` as u32s from a non-blocking fd and
  unmasked by ``write()``-ing them back; an overflowed queue (``EFBIG``) is reset and every
  bound port reported, so the caller rescans all rings;
* grants: ``MAP_GRANT_REF`` then ``mmap(MAP_SHARED)`` at the returned index; closing does
  ``munmap`` then ``UNMAP_GRANT_REF`` (gntdev unmaps for real once both happened);
* dma-bufs: the four gntdev dma-buf ioctls; :meth:`RealPlatform.open_dmabuf` maps a dma-buf
  fd; :meth:`RealPlatform.alloc_dmabuf` makes a Dom0 buffer from a sealed memfd through
  ``/dev/udmabuf``, or a DRM dumb buffer exported with PRIME when a card is given.

What the gntdev dma-buf ioctls can do is probed ONCE (:func:`probe_dmabuf`) by calling them
with a NULL argument: ``ENOTTY`` means a kernel without ``CONFIG_XEN_GNTDEV_DMABUF``;
``EXP_FROM_REFS`` answering ``EINVAL`` before it even reads its argument means an x86 PV Dom0
(not auto-translated), ``EFAULT`` means the ioctl would work. Failing calls then carry that
reason in their message; the backend's buffer store falls back to copying on ``ENOTTY`` and
``EINVAL``.

Every ioctl goes through an injectable ``ioctl(fd, request, buf) -> int`` function (default
:func:`fcntl.ioctl` with a mutable buffer), which is how the unit tests check argument packing
and error mapping without Xen.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import platform
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from displback.mapping import ClosesOnExit, MappedMemory, MappedRegion
from displback.protocol.constants import PAGE_SIZE, pages_for
from displback.xen import ioctls
from displback.xen.interfaces import (
    GNTDEV_DMA_FLAG_COHERENT,
    GNTDEV_DMA_FLAG_WC,
    GNTDEV_MAX_GRANTS,
)

if TYPE_CHECKING:
    from displback.mapping import DmabufMapping
    from displback.xen.interfaces import (
        EventChannels,
        GrantDevice,
        GrantMapping,
        Platform,
    )

__all__ = [
    "DEFAULT_EVTCHN",
    "DEFAULT_GNTDEV",
    "DEFAULT_UDMABUF",
    "DEFAULT_XENBUS",
    "DEFAULT_XENSTORED_SOCKET",
    "DmaBufSupport",
    "IoctlFn",
    "RealDmabufMapping",
    "RealEventChannels",
    "RealGrantDevice",
    "RealGrantMapping",
    "RealPlatform",
    "default_xenstore_path",
    "probe_dmabuf",
    "read_own_domid",
]

DEFAULT_XENSTORED_SOCKET = "/run/xenstored/socket"
DEFAULT_XENBUS = "/dev/xen/xenbus"
DEFAULT_EVTCHN = "/dev/xen/evtchn"
DEFAULT_GNTDEV = "/dev/xen/gntdev"
DEFAULT_UDMABUF = "/dev/udmabuf"

#: ``ioctl(fd, request, mutable_buffer_or_int) -> result``; raises ``OSError`` like the kernel.
IoctlFn = Callable[[int, int, "bytearray | int"], int]

_MAX_PENDING_READ = 1024  # ports per read() of /dev/xen/evtchn

# Linux's gntdev maps exported grants with GNTMAP_host_map | GNTMAP_device_map on x86, and
# Xen's x86 HVM/PVH grant mapping accepts GNTMAP_host_map alone (measured in tests/vm with
# Linux 6.1 + Xen 4.17): on x86 DMABUF_EXP_FROM_REFS fails with EINVAL on every Dom0.
_X86 = platform.machine() in ("x86_64", "i386", "i686")
_X86_EXPORT_EINVAL = (
    "DMABUF_EXP_FROM_REFS: EINVAL — bad grants, or (x86) Xen refusing the device mapping "
    "gntdev asks for on an auto-translated Dom0"
)


def _fcntl_ioctl(fd: int, request: int, arg: bytearray | int) -> int:
    if isinstance(arg, int):
        return int(fcntl.ioctl(fd, request, arg))
    return int(fcntl.ioctl(fd, request, arg, True))


def default_xenstore_path() -> str:
    """xenstored's socket when it exists (Dom0 running xenstored), else the xenbus device."""
    if os.path.exists(DEFAULT_XENSTORED_SOCKET):
        return DEFAULT_XENSTORED_SOCKET
    return DEFAULT_XENBUS


async def read_own_domid(xenstore_path: str, *, timeout: float = 5.0) -> int:
    """This domain's id from XenStore's relative ``domid`` node; 0 when it has none."""
    from displback.xenstore.client import open_xenstore

    async with open_xenstore(xenstore_path, timeout=timeout, reconnect=False) as xs:
        value = await xs.read_or_none("domid", timeout=timeout)
    if value is None:
        return 0
    text = value.decode("ascii", "replace").strip()
    if not text.isdigit() or int(text) > 0x7FEF:
        raise ValueError(f"XenStore 'domid' is not a domain id: {text!r}")
    return int(text)


def _check_count(count: int) -> None:
    if not 1 <= count <= GNTDEV_MAX_GRANTS:
        raise OSError(errno.EINVAL, f"grant count {count} not in 1..{GNTDEV_MAX_GRANTS}")


# --- event channels --------------------------------------------------------------------------


class RealEventChannels:
    """One open of ``/dev/xen/evtchn`` (implements ``EventChannels``)."""

    def __init__(
        self,
        fd: int,
        *,
        ioctl: IoctlFn = _fcntl_ioctl,
        read: Callable[[int, int], bytes] = os.read,
    ) -> None:
        self._fd = fd
        self._ioctl = ioctl
        self._read = read
        self._bound: set[int] = set()
        self._lock = threading.Lock()
        self._overflows = 0

    @classmethod
    def open(cls, path: str = DEFAULT_EVTCHN, *, ioctl: IoctlFn = _fcntl_ioctl) -> Self:
        """Open the device non-blocking and close-on-exec."""
        return cls(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC), ioctl=ioctl)

    @property
    def bound_ports(self) -> frozenset[int]:
        """Local ports bound through this object."""
        return frozenset(self._bound)

    @property
    def overflows(self) -> int:
        """How many times the pending queue overflowed (``EFBIG``) and was reset."""
        return self._overflows

    def _call(self, name: str, arg: bytearray | int) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, "event-channel device is closed")
        return self._ioctl(self._fd, ioctls.IOCTLS[name], arg)

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """Bind the guest's unbound ``remote_port``; the ioctl's result is the local port."""
        port = self._call(
            "IOCTL_EVTCHN_BIND_INTERDOMAIN",
            ioctls.pack_evtchn_bind_interdomain(remote_domid, remote_port),
        )
        with self._lock:
            self._bound.add(port)
        return port

    def bind_unbound_port(self, remote_domid: int) -> int:
        """Allocate a port ``remote_domid`` may bind to."""
        port = self._call(
            "IOCTL_EVTCHN_BIND_UNBOUND_PORT", ioctls.pack_evtchn_bind_unbound_port(remote_domid)
        )
        with self._lock:
            self._bound.add(port)
        return port

    def restrict_domid(self, domid: int) -> None:
        """``IOCTL_EVTCHN_RESTRICT_DOMID``: this fd may bind ports of ``domid`` only (once)."""
        self._call("IOCTL_EVTCHN_RESTRICT_DOMID", ioctls.pack_evtchn_restrict_domid(domid))

    def notify(self, local_port: int) -> None:
        """Signal the remote end of ``local_port``."""
        self._call("IOCTL_EVTCHN_NOTIFY", ioctls.pack_evtchn_port(local_port))

    def unbind(self, local_port: int) -> None:
        """Close ``local_port``."""
        self._call("IOCTL_EVTCHN_UNBIND", ioctls.pack_evtchn_port(local_port))
        with self._lock:
            self._bound.discard(local_port)

    def fileno(self) -> int:
        """The device fd: readable while a port is pending."""
        return self._fd

    def read_pending(self) -> list[int]:
        """Ports that fired (each now masked); [] when none.

        After a queue overflow (``EFBIG``) the queue is reset and every port bound here is
        reported, so that the caller rescans all of its rings and unmasks them.
        """
        if self._fd < 0:
            raise OSError(errno.EBADF, "event-channel device is closed")
        try:
            data = self._read(self._fd, 4 * _MAX_PENDING_READ)
        except BlockingIOError:
            return []
        except OSError as exc:
            if exc.errno != errno.EFBIG:
                raise
            self._overflows += 1
            self.reset()
            with self._lock:
                return sorted(self._bound)
        return ioctls.unpack_ports(data)

    def unmask(self, ports: list[int]) -> None:
        """Write ``ports`` back to re-enable them."""
        if not ports:
            return
        if self._fd < 0:
            raise OSError(errno.EBADF, "event-channel device is closed")
        data = ioctls.pack_ports(ports)
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    def reset(self) -> None:
        """Drop the pending queue and clear the overflow error."""
        self._call("IOCTL_EVTCHN_RESET", 0)

    def close(self) -> None:
        """Close the device: the kernel unbinds every port bound through it."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self._bound.clear()
            os.close(fd)


# --- grant mappings and dma-bufs -----------------------------------------------------------


class RealGrantMapping(MappedRegion):
    """Grants mapped from a :class:`RealGrantDevice` (implements ``GrantMapping``): ``count *
    4096`` bytes, read-only unless mapped writable; closing also does ``UNMAP_GRANT_REF``."""

    def __init__(
        self, device: RealGrantDevice, memory: MappedMemory, index: int, count: int
    ) -> None:
        super().__init__(memory)
        self._device = device
        self.index = index
        self.count = count

    def _unmapped(self) -> None:
        self._device._unmap(self.index, self.count)


@dataclass(frozen=True)
class DmaBufSupport:
    """What this kernel's gntdev can do with dma-bufs (probed once per platform)."""

    export_errno: int | None  # None: DMABUF_EXP_FROM_REFS works
    import_errno: int | None  # None: DMABUF_IMP_TO_REFS works
    reason: str  # one line for the start-up log

    @property
    def export_supported(self) -> bool:
        return self.export_errno is None

    @property
    def import_supported(self) -> bool:
        return self.import_errno is None


def probe_dmabuf(fd: int, ioctl: IoctlFn = _fcntl_ioctl) -> DmaBufSupport:
    """Ask gntdev (open as ``fd``) which dma-buf ioctls work, without side effects.

    Each ioctl gets a NULL argument: a kernel without ``CONFIG_XEN_GNTDEV_DMABUF`` answers
    ``ENOTTY``; ``EXP_FROM_REFS`` on a Dom0 that is not auto-translated (x86 PV) answers
    ``EINVAL`` before reading the argument; a working ioctl fails to read it (``EFAULT``).
    """

    def probe(name: str) -> int | None:
        try:
            ioctl(fd, ioctls.IOCTLS[name], 0)
        except OSError as exc:
            return None if exc.errno == errno.EFAULT else exc.errno
        return None  # pragma: no cover - a NULL argument cannot succeed

    export = probe("IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS")
    imp = probe("IOCTL_GNTDEV_DMABUF_IMP_TO_REFS")
    if export is None:
        reason = "gntdev exports guest grants as dma-bufs (zero-copy possible)"
        if _X86:
            reason += (
                "; but on x86 gntdev asks Xen for a device mapping, which Xen refuses for an "
                "auto-translated (PVH) Dom0: expect EINVAL and copying"
            )
    elif export == errno.ENOTTY:
        reason = "kernel lacks CONFIG_XEN_GNTDEV_DMABUF (ENOTTY): copy mode, no be-alloc"
    elif export == errno.EINVAL:
        reason = (
            "this Dom0 is not auto-translated (x86 PV): gntdev refuses DMABUF_EXP_FROM_REFS "
            "(EINVAL); guest buffers are copied"
        )
    else:
        reason = f"DMABUF_EXP_FROM_REFS probe failed: {os.strerror(export)}"
    if imp is not None and export != imp:
        reason += f"; DMABUF_IMP_TO_REFS unavailable ({os.strerror(imp)})"
    return DmaBufSupport(export, imp, reason)


class RealGrantDevice:
    """One open of ``/dev/xen/gntdev`` (implements ``GrantDevice``).

    ``support`` (from :func:`probe_dmabuf`) lets dma-buf calls that cannot work fail at once
    with the probed errno and reason, and annotates an ``EINVAL`` of ``EXP_FROM_REFS``.
    ``mmap_fn`` is injectable for tests (a memfd stands in for the device).
    """

    def __init__(
        self,
        fd: int,
        *,
        ioctl: IoctlFn = _fcntl_ioctl,
        support: DmaBufSupport | None = None,
    ) -> None:
        self._fd = fd
        self._ioctl = ioctl
        self._support = support
        self._lock = threading.Lock()
        self._live_maps = 0
        self._closing = False
        self._imports: set[int] = set()

    @classmethod
    def open(
        cls,
        path: str = DEFAULT_GNTDEV,
        *,
        ioctl: IoctlFn = _fcntl_ioctl,
        support: DmaBufSupport | None = None,
    ) -> Self:
        return cls(os.open(path, os.O_RDWR | os.O_CLOEXEC), ioctl=ioctl, support=support)

    def fileno(self) -> int:
        return self._fd

    def _call(self, name: str, arg: bytearray | int) -> int:
        if self._fd < 0 or self._closing:
            raise OSError(errno.EBADF, "grant device is closed")
        return self._ioctl(self._fd, ioctls.IOCTLS[name], arg)

    def map_grants(self, domid: int, refs: list[int], *, writable: bool = True) -> RealGrantMapping:
        """``MAP_GRANT_REF`` + ``mmap``; on an ``mmap`` failure the registration is undone."""
        _check_count(len(refs))
        buf = ioctls.pack_map_grant_ref(domid, list(refs))
        self._call("IOCTL_GNTDEV_MAP_GRANT_REF", buf)
        index = ioctls.unpack_map_grant_ref(buf)
        count = len(refs)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            mm = mmap.mmap(self._fd, count * PAGE_SIZE, mmap.MAP_SHARED, prot, offset=index)
        except BaseException:
            with contextlib.suppress(OSError):
                self._call(
                    "IOCTL_GNTDEV_UNMAP_GRANT_REF", ioctls.pack_unmap_grant_ref(index, count)
                )
            raise
        with self._lock:
            self._live_maps += 1
        return RealGrantMapping(self, MappedMemory(mm, writable), index, count)

    def copy_from_grant(self, domid: int, ref: int, length: int) -> bytes:
        """``GRANT_COPY`` of one segment into private memory; ``EINVAL`` when Xen refuses
        the grant (the segment's ``GNTST_*`` status is in the message)."""
        if not 1 <= length <= PAGE_SIZE:
            raise OSError(errno.EINVAL, f"grant copy of {length} bytes (1..{PAGE_SIZE})")
        data = bytearray(length)
        dest = (ctypes.c_char * length).from_buffer(data)
        segment = ioctls.pack_grant_copy_segment(domid, ref, ctypes.addressof(dest), length)
        held = (ctypes.c_char * len(segment)).from_buffer(segment)
        try:
            self._call("IOCTL_GNTDEV_GRANT_COPY", ioctls.pack_grant_copy(1, ctypes.addressof(held)))
        finally:
            del dest, held  # the bytearrays may be read (and freed) again
        status = ioctls.unpack_grant_copy_status(segment)
        if status != 0:
            raise OSError(
                errno.EINVAL, f"grant copy from gref {ref} of dom{domid} failed: GNTST {status}"
            )
        return bytes(data)

    def _unmap(self, index: int, count: int) -> None:
        try:
            self._ioctl(
                self._fd,
                ioctls.IOCTLS["IOCTL_GNTDEV_UNMAP_GRANT_REF"],
                ioctls.pack_unmap_grant_ref(index, count),
            )
        finally:
            with self._lock:
                self._live_maps -= 1
                last = self._closing and self._live_maps == 0
            if last:
                self._really_close()

    def _refuse(self, errno_value: int | None) -> None:
        if errno_value is not None and self._support is not None:
            raise OSError(errno_value, f"{os.strerror(errno_value)}: {self._support.reason}")

    def dmabuf_export(self, domid: int, refs: list[int], *, flags: int = 0) -> int:
        """``DMABUF_EXP_FROM_REFS``: the guest's grants as a new dma-buf fd."""
        if self._support is not None:
            self._refuse(self._support.export_errno)
        if flags & GNTDEV_DMA_FLAG_WC and flags & GNTDEV_DMA_FLAG_COHERENT:
            raise OSError(errno.EINVAL, "GNTDEV_DMA_FLAG_WC and _COHERENT are exclusive")
        _check_count(len(refs))
        buf = ioctls.pack_dmabuf_exp_from_refs(domid, list(refs), flags)
        try:
            self._call("IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS", buf)
        except OSError as exc:
            if exc.errno == errno.EINVAL and _X86:
                raise OSError(errno.EINVAL, _X86_EXPORT_EINVAL) from exc
            raise
        return ioctls.unpack_dmabuf_exp_from_refs(buf)

    def dmabuf_wait_released(self, fd: int, timeout_ms: int) -> bool:
        """``DMABUF_EXP_WAIT_RELEASED`` (BLOCKS: call it from a worker thread)."""
        try:
            self._call(
                "IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED",
                ioctls.pack_dmabuf_exp_wait_released(fd, timeout_ms),
            )
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return True
            if exc.errno == errno.ETIMEDOUT:
                return False
            raise
        return True

    def dmabuf_import_to_refs(self, fd: int, count: int, domid: int) -> list[int]:
        """``DMABUF_IMP_TO_REFS``: grant a local dma-buf's ``count`` pages to ``domid``."""
        if self._support is not None:
            self._refuse(self._support.import_errno)
        _check_count(count)
        buf = ioctls.pack_dmabuf_imp_to_refs(fd, count, domid)
        self._call("IOCTL_GNTDEV_DMABUF_IMP_TO_REFS", buf)
        with self._lock:
            self._imports.add(fd)
        return ioctls.unpack_dmabuf_imp_to_refs(buf, count)

    def dmabuf_import_release(self, fd: int) -> None:
        """``DMABUF_IMP_RELEASE``: revoke the grants of the import made with ``fd``."""
        self._call("IOCTL_GNTDEV_DMABUF_IMP_RELEASE", ioctls.pack_dmabuf_imp_release(fd))
        with self._lock:
            self._imports.discard(fd)

    def close(self) -> None:
        """Release imports; the fd is closed once the last mapping is closed too."""
        with self._lock:
            if self._closing:
                return
            imports, self._imports = sorted(self._imports), set()
        for fd in imports:
            with contextlib.suppress(OSError):
                self.dmabuf_import_release(fd)
        with self._lock:
            self._closing = True
            last = self._live_maps == 0
        if last:
            self._really_close()

    def _really_close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class RealDmabufMapping(MappedRegion):
    """A dma-buf mapped for CPU access (implements ``DmabufMapping``).

    The mapping itself holds a reference to the dma-buf (the kernel's vma keeps the file),
    so the caller may close its fd at once.
    """


def open_dmabuf(fd: int) -> RealDmabufMapping:
    """Map the whole dma-buf ``fd`` read-write (its size is what ``lseek(SEEK_END)`` says)."""
    size = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, 0, os.SEEK_SET)
    if size <= 0:
        raise OSError(errno.EINVAL, "not a dma-buf (no size)")
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return RealDmabufMapping(MappedMemory(mm, True))


class RealPlatform(ClosesOnExit):
    """The backend's platform on a real Dom0 (implements ``Platform``).

    ``xenstore_path=None`` picks xenstored's socket if present, else ``/dev/xen/xenbus``;
    ``domid`` defaults to 0 (use :meth:`create` to read it from XenStore). With ``card`` (a
    DRM device path) Dom0 buffers are DRM dumb buffers exported with PRIME, otherwise
    udmabufs over sealed memfds.
    """

    def __init__(
        self,
        xenstore_path: str | None = None,
        domid: int = 0,
        *,
        card: str | None = None,
        evtchn_path: str = DEFAULT_EVTCHN,
        gntdev_path: str = DEFAULT_GNTDEV,
        udmabuf_path: str = DEFAULT_UDMABUF,
        ioctl: IoctlFn = _fcntl_ioctl,
    ) -> None:
        self._xenstore_path = xenstore_path or default_xenstore_path()
        self._domid = domid
        self._evtchn_path = evtchn_path
        self._gntdev_path = gntdev_path
        self._udmabuf_path = udmabuf_path
        self._ioctl = ioctl
        self._card_fd = os.open(card, os.O_RDWR | os.O_CLOEXEC) if card is not None else None
        self._support: DmaBufSupport | None = None
        self._lock = threading.Lock()

    @classmethod
    async def create(
        cls, xenstore_path: str | None = None, domid: int | None = None, **options: object
    ) -> RealPlatform:
        """Like the constructor, reading this domain's id from XenStore unless given."""
        path = xenstore_path or default_xenstore_path()
        if domid is None:
            domid = await read_own_domid(path)
        return cls(path, domid, **options)  # type: ignore[arg-type]

    @property
    def domid(self) -> int:
        return self._domid

    @property
    def xenstore_path(self) -> str:
        return self._xenstore_path

    @property
    def dmabuf_support(self) -> DmaBufSupport:
        """The gntdev dma-buf probe's result (probed on first use)."""
        with self._lock:
            if self._support is None:
                fd = os.open(self._gntdev_path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    self._support = probe_dmabuf(fd, self._ioctl)
                finally:
                    os.close(fd)
            return self._support

    def open_event_channels(self) -> RealEventChannels:
        """Open ``/dev/xen/evtchn``."""
        return RealEventChannels.open(self._evtchn_path, ioctl=self._ioctl)

    def open_grant_device(self) -> RealGrantDevice:
        """Open ``/dev/xen/gntdev`` (knowing what its dma-buf ioctls can do)."""
        support = self.dmabuf_support
        return RealGrantDevice.open(self._gntdev_path, ioctl=self._ioctl, support=support)

    def open_dmabuf(self, fd: int) -> RealDmabufMapping:
        """Map the dma-buf ``fd`` for the CPU (a dup of it is held until closed)."""
        return open_dmabuf(fd)

    def alloc_dmabuf(self, size: int) -> int:
        """A new zeroed Dom0 dma-buf of ``size`` bytes rounded up to pages; its fd."""
        if size <= 0:
            raise OSError(errno.EINVAL, f"dma-buf size {size}")
        length = pages_for(size) * PAGE_SIZE
        if self._card_fd is not None:
            return self._alloc_dumb(length)
        return self._alloc_udmabuf(length)

    def _alloc_udmabuf(self, length: int) -> int:
        memfd = os.memfd_create("displback", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(memfd, length)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            dev = os.open(self._udmabuf_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                return self._ioctl(
                    dev, ioctls.IOCTLS["UDMABUF_CREATE"], ioctls.pack_udmabuf_create(memfd, length)
                )
            finally:
                os.close(dev)
        finally:
            os.close(memfd)

    def _alloc_dumb(self, length: int) -> int:
        assert self._card_fd is not None
        card = self._card_fd
        # One row of 4-byte pixels whose pitch is exactly a page: size = length exactly.
        buf = ioctls.pack_drm_create_dumb(PAGE_SIZE // 4, length // PAGE_SIZE, 32)
        self._ioctl(card, ioctls.IOCTLS["DRM_IOCTL_MODE_CREATE_DUMB"], buf)
        handle, _pitch, size = ioctls.unpack_drm_create_dumb(buf)
        try:
            if size < length:
                raise OSError(errno.ENOMEM, f"dumb buffer of {size} < {length} bytes")
            prime = ioctls.pack_drm_prime_handle(handle)
            self._ioctl(card, ioctls.IOCTLS["DRM_IOCTL_PRIME_HANDLE_TO_FD"], prime)
            return ioctls.unpack_drm_prime_handle(prime)
        finally:  # the dma-buf keeps the buffer alive; the handle is not needed
            with contextlib.suppress(OSError):
                close = ioctls.pack_drm_gem_close(handle)
                self._ioctl(card, ioctls.IOCTLS["DRM_IOCTL_GEM_CLOSE"], close)

    def close(self) -> None:
        """Close the DRM card if one was opened."""
        if self._card_fd is not None:
            fd, self._card_fd = self._card_fd, None
            os.close(fd)


if TYPE_CHECKING:  # mypy proves the real platform implements the interfaces

    def _implements(
        platform: RealPlatform,
        evtchn: RealEventChannels,
        gntdev: RealGrantDevice,
        mapping: RealGrantMapping,
        dmabuf: RealDmabufMapping,
    ) -> tuple[Platform, EventChannels, GrantDevice, GrantMapping, DmabufMapping]:
        return platform, evtchn, gntdev, mapping, dmabuf
