"""The few device operations the backend uses, as Protocols a real or simulated Xen provides.

Like QEMU's ``XenDevOps``, these interfaces are the only way the backend reaches the platform,
so it cannot tell the devices of a real Dom0 (``/dev/xen/evtchn``, ``/dev/xen/gntdev``, a KMS
driver's PRIME import) from the simulation in :mod:`displback.sim`. Each method mirrors one
ioctl or syscall of the real device so that the real implementation is a thin layer: same
arguments, same blocking behaviour, and failures raised as :class:`OSError` carrying the errno
the Linux driver gives (reference §11, §12).

XenStore is not here: the platform only says where the XenStore client should connect
(:attr:`Platform.xenstore_path`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from displback.mapping import DmabufMapping, MemoryMapping

__all__ = [
    "DmaBufs",
    "EventChannels",
    "GrantDevice",
    "GrantMapping",
    "Platform",
    "GNTDEV_DMA_FLAG_WC",
    "GNTDEV_DMA_FLAG_COHERENT",
    "GNTDEV_MAX_GRANTS",
]

#: ``GNTDEV_DMA_FLAG_WC``: back an exported dma-buf with write-combined DMA memory.
GNTDEV_DMA_FLAG_WC = 1 << 0
#: ``GNTDEV_DMA_FLAG_COHERENT``: back an exported dma-buf with coherent DMA memory.
GNTDEV_DMA_FLAG_COHERENT = 1 << 1
#: gntdev's default ``limit`` module parameter: most grants one map/export/import may cover.
GNTDEV_MAX_GRANTS = 65536


@runtime_checkable
class EventChannels(Protocol):
    """One open of ``/dev/xen/evtchn``: the ports it binds, their pending state and masks.

    A port reported by :meth:`read_pending` stays masked until :meth:`unmask` names it again;
    notifications that arrive while it is masked are not lost but reported once after
    unmasking. Closing unbinds every port this object bound.
    """

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """``IOCTL_EVTCHN_BIND_INTERDOMAIN``: bind a remote unbound port; return the local one.

        Xen marks the new local port pending once right away (notifications sent to the
        remote port while it was unbound may have been lost). ``EINVAL`` if the remote port
        is not unbound for this domain, ``ESRCH`` if the remote domain does not exist.
        """
        ...

    def bind_unbound_port(self, remote_domid: int) -> int:
        """``IOCTL_EVTCHN_BIND_UNBOUND_PORT``: allocate a port ``remote_domid`` may bind to."""
        ...

    def notify(self, local_port: int) -> None:
        """``IOCTL_EVTCHN_NOTIFY``: signal the remote end (``ENOTCONN`` if not bound here)."""
        ...

    def unbind(self, local_port: int) -> None:
        """``IOCTL_EVTCHN_UNBIND``: close the port; its peer becomes unbound again.

        ``ENOTCONN`` if this object did not bind the port, ``EINVAL`` if out of range.
        """
        ...

    def fileno(self) -> int:
        """A descriptor that polls readable while an unmasked port is pending.

        Use it with ``trio.lowlevel.wait_readable`` and then call :meth:`read_pending`.
        """
        ...

    def read_pending(self) -> list[int]:
        """``read()`` in non-blocking mode: the local ports that fired, each now masked.

        Returns an empty list when nothing is pending (where the device says ``EAGAIN``).
        """
        ...

    def unmask(self, ports: list[int]) -> None:
        """``write()`` of port numbers: re-enable them; unknown ports are ignored."""
        ...

    def reset(self) -> None:
        """``IOCTL_EVTCHN_RESET``: drop the pending queue; the dropped ports stay masked."""
        ...

    def close(self) -> None:
        """Close the device: every port bound through it is unbound."""
        ...


class GrantMapping(MemoryMapping, Protocol):
    """Grants mapped by ``MAP_GRANT_REF`` + ``mmap``: one contiguous span of ``count * 4096``,
    read-only when mapped without ``writable``; closing is ``munmap`` + ``UNMAP_GRANT_REF``."""


@runtime_checkable
class GrantDevice(Protocol):
    """One open of ``/dev/xen/gntdev``: grant mapping and the four dma-buf ioctls.

    Errors follow gntdev: ``EINVAL`` for a count of 0 or above 65536 and for any grant that
    is unknown, revoked, granted to another domain or read-only but mapped writable (nothing
    is mapped then); ``ENOTTY`` for the dma-buf ioctls when the kernel lacks
    ``CONFIG_XEN_GNTDEV_DMABUF``.
    """

    def map_grants(self, domid: int, refs: list[int], *, writable: bool = True) -> GrantMapping:
        """Map ``refs`` of domain ``domid`` as one contiguous buffer."""
        ...

    def copy_from_grant(self, domid: int, ref: int, length: int) -> bytes:
        """``IOCTL_GNTDEV_GRANT_COPY`` of one segment: the first ``length`` bytes (at most a
        page) of grant ``ref`` of ``domid``, copied by Xen into private memory.

        Nothing is mapped, so nothing needs unmapping: one call where reading through
        :meth:`map_grants` takes two (map, unmap) plus an ``munmap``. The copy is a snapshot:
        the guest changing the page afterwards changes nothing in it. ``EINVAL`` for a bad
        grant (as :meth:`map_grants`) or a ``length`` outside 1..4096.
        """
        ...

    def dmabuf_export(self, domid: int, refs: list[int], *, flags: int = 0) -> int:
        """``DMABUF_EXP_FROM_REFS``: map the grants and return a new dma-buf fd (``O_CLOEXEC``).

        ``EINVAL`` also when the calling domain is not auto-translated (x86 PV Dom0) or both
        ``GNTDEV_DMA_FLAG_WC`` and ``GNTDEV_DMA_FLAG_COHERENT`` are given.
        """
        ...

    def dmabuf_wait_released(self, fd: int, timeout_ms: int) -> bool:
        """``DMABUF_EXP_WAIT_RELEASED``: BLOCK until the buffer exported as ``fd`` is released.

        True when released, or unknown (``ENOENT``: already gone); False on ``ETIMEDOUT``.
        Close your own copy of the fd first. Blocks the calling thread: run it in a worker
        thread. The buffer is found by the fd NUMBER returned at export time, newest export
        first: if that number was reused by a later export from this device before the wait,
        this waits on the newer buffer. Serialise close + wait per device.
        """
        ...

    def dmabuf_import_to_refs(self, fd: int, count: int, domid: int) -> list[int]:
        """``DMABUF_IMP_TO_REFS``: grant the pages of a local dma-buf read-write to ``domid``.

        The dma-buf must be exactly ``count * 4096`` bytes (else ``EINVAL``). The import
        holds the dma-buf; keep ``fd`` open until :meth:`dmabuf_import_release`, which finds
        the import by that fd number.
        """
        ...

    def dmabuf_import_release(self, fd: int) -> None:
        """``DMABUF_IMP_RELEASE``: revoke the grants (deferred while still mapped); ``ENOENT``
        if ``fd`` names no import of this device."""
        ...

    def close(self) -> None:
        """Close the device: imports are released; live mappings stay valid until closed;
        exported dma-bufs live on until every holder closes them."""
        ...


@runtime_checkable
class DmaBufs(Protocol):
    """The display side of dma-bufs: reach a buffer's memory, or allocate a Dom0 buffer."""

    def open_dmabuf(self, fd: int) -> DmabufMapping:
        """Import the dma-buf ``fd`` (a private reference keeps it alive until closed).

        ``EBADF`` for a closed fd, ``EINVAL`` for an fd that is not a dma-buf.
        """
        ...

    def alloc_dmabuf(self, size: int) -> int:
        """A new zeroed Dom0-owned dma-buf of ``size`` bytes rounded up to whole pages (like a
        KMS dumb buffer exported with PRIME); returns its fd. ``EINVAL`` for size <= 0."""
        ...


@runtime_checkable
class Platform(DmaBufs, Protocol):
    """Everything the backend needs from the machine it runs on."""

    @property
    def domid(self) -> int:
        """This (backend) domain's id."""
        ...

    @property
    def xenstore_path(self) -> str:
        """UNIX socket or device path the XenStore client connects to."""
        ...

    def open_event_channels(self) -> EventChannels:
        """Open ``/dev/xen/evtchn`` (one per guest device is good hardening)."""
        ...

    def open_grant_device(self) -> GrantDevice:
        """Open ``/dev/xen/gntdev``."""
        ...

    def close(self) -> None:
        """Release what the platform object itself holds."""
        ...
