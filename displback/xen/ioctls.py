"""Ioctl numbers and argument layouts of Linux's Xen devices, udmabuf and DRM dumb buffers.

The real platform (:mod:`displback.xen.real`) talks to ``/dev/xen/gntdev``,
``/dev/xen/evtchn``, ``/dev/udmabuf`` and a DRM card with these; nothing here does I/O. Each
argument is packed into a fresh ``bytearray`` (``fcntl.ioctl`` needs a *mutable* buffer to
return the ioctl's result and update the buffer in place, and to pass more than 1024 bytes:
reference §11) and unpacked from it afterwards.

Numbers and layouts follow the kernel's uapi headers (``xen/gntdev.h``, ``xen/evtchn.h``,
``linux/udmabuf.h``, ``drm/drm.h``, ``drm/drm_mode.h``); :data:`LAYOUTS` and :data:`IOCTLS`
let ``tests/xen/test_layout.py`` compare every size, offset and number with a C program
compiled against those headers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "IOCTLS",
    "LAYOUTS",
    "StructLayout",
    "ioc",
    "pack_map_grant_ref",
    "unpack_map_grant_ref",
    "pack_unmap_grant_ref",
    "pack_grant_copy",
    "pack_grant_copy_segment",
    "unpack_grant_copy_status",
    "pack_dmabuf_exp_from_refs",
    "unpack_dmabuf_exp_from_refs",
    "pack_dmabuf_exp_wait_released",
    "pack_dmabuf_imp_to_refs",
    "unpack_dmabuf_imp_to_refs",
    "pack_dmabuf_imp_release",
    "pack_evtchn_bind_interdomain",
    "pack_evtchn_bind_unbound_port",
    "pack_evtchn_port",
    "pack_evtchn_restrict_domid",
    "pack_udmabuf_create",
    "pack_drm_create_dumb",
    "unpack_drm_create_dumb",
    "pack_drm_prime_handle",
    "unpack_drm_prime_handle",
    "pack_drm_gem_close",
    "pack_ports",
    "unpack_ports",
]

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def ioc(direction: int, kind: str, nr: int, size: int) -> int:
    """Linux's generic ``_IOC(dir, type, nr, size)`` (x86/ARM encoding)."""
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


@dataclass(frozen=True)
class StructLayout:
    """A C struct as we pack it: its C name, ``sizeof`` and field offsets."""

    c_name: str
    size: int
    fields: dict[str, int]


# --- gntdev (reference §11) -------------------------------------------------------------------
_MAP_HEAD = struct.Struct("=IIQ")  # count, pad, index (out)
_GRANT_REF = struct.Struct("=II")  # domid, ref
_UNMAP = struct.Struct("=QII")  # index, count, pad
_EXP_HEAD = struct.Struct("=IIII")  # flags, count, fd (out), domid
_WAIT = struct.Struct("=II")  # fd, wait_to_ms
_IMP_HEAD = struct.Struct("=IIII")  # fd, count, domid, reserved
_IMP_RELEASE = struct.Struct("=II")  # fd, reserved
_U32 = struct.Struct("=I")
# gntdev_grant_copy_segment: source, dest (each a union of a pointer and {ref, offset, domid}),
# len, flags, status, 2 bytes of tail padding (8-byte alignment).
_COPY_SEGMENT = struct.Struct("=IHHQHHh2x")  # source.foreign, dest.virt, len, flags, status
_GRANT_COPY = struct.Struct("=I4xQ")  # count, pad, segments
GNTCOPY_SOURCE_GREF = 1 << 0  # GNTCOPY_source_gref: the source is a grant reference

# --- evtchn (reference §12) -------------------------------------------------------------------
_BIND_INTERDOMAIN = struct.Struct("=II")  # remote_domain, remote_port
_DOMID = struct.Struct("=H")

# --- udmabuf -------------------------------------------------------------------------------
_UDMABUF_CREATE = struct.Struct("=IIQQ")  # memfd, flags, offset, size
UDMABUF_FLAGS_CLOEXEC = 0x01

# --- DRM dumb buffers + PRIME --------------------------------------------------------------
_CREATE_DUMB = struct.Struct("=IIIIIIQ")  # height, width, bpp, flags, handle, pitch, size
_PRIME_HANDLE = struct.Struct("=IIi")  # handle, flags, fd
_GEM_CLOSE = struct.Struct("=II")  # handle, pad
DRM_CLOEXEC = 0o2000000  # O_CLOEXEC
DRM_RDWR = 0o2  # O_RDWR

LAYOUTS: dict[str, StructLayout] = {
    "grant_ref": StructLayout("ioctl_gntdev_grant_ref", 8, {"domid": 0, "ref": 4}),
    "map_grant_ref": StructLayout(
        "ioctl_gntdev_map_grant_ref", 24, {"count": 0, "pad": 4, "index": 8, "refs": 16}
    ),
    "unmap_grant_ref": StructLayout(
        "ioctl_gntdev_unmap_grant_ref", 16, {"index": 0, "count": 8, "pad": 12}
    ),
    "grant_copy_segment": StructLayout(
        "gntdev_grant_copy_segment",
        24,
        {
            "source.foreign.ref": 0,
            "source.foreign.offset": 4,
            "source.foreign.domid": 6,
            "dest.virt": 8,
            "len": 16,
            "flags": 18,
            "status": 20,
        },
    ),
    "grant_copy": StructLayout("ioctl_gntdev_grant_copy", 16, {"count": 0, "segments": 8}),
    "dmabuf_exp_from_refs": StructLayout(
        "ioctl_gntdev_dmabuf_exp_from_refs",
        20,
        {"flags": 0, "count": 4, "fd": 8, "domid": 12, "refs": 16},
    ),
    "dmabuf_exp_wait_released": StructLayout(
        "ioctl_gntdev_dmabuf_exp_wait_released", 8, {"fd": 0, "wait_to_ms": 4}
    ),
    "dmabuf_imp_to_refs": StructLayout(
        "ioctl_gntdev_dmabuf_imp_to_refs",
        20,
        {"fd": 0, "count": 4, "domid": 8, "reserved": 12, "refs": 16},
    ),
    "dmabuf_imp_release": StructLayout(
        "ioctl_gntdev_dmabuf_imp_release", 8, {"fd": 0, "reserved": 4}
    ),
    "evtchn_bind_interdomain": StructLayout(
        "ioctl_evtchn_bind_interdomain", 8, {"remote_domain": 0, "remote_port": 4}
    ),
    "evtchn_bind_unbound_port": StructLayout(
        "ioctl_evtchn_bind_unbound_port", 4, {"remote_domain": 0}
    ),
    "evtchn_unbind": StructLayout("ioctl_evtchn_unbind", 4, {"port": 0}),
    "evtchn_notify": StructLayout("ioctl_evtchn_notify", 4, {"port": 0}),
    "evtchn_restrict_domid": StructLayout("ioctl_evtchn_restrict_domid", 2, {"domid": 0}),
    "udmabuf_create": StructLayout(
        "udmabuf_create", 24, {"memfd": 0, "flags": 4, "offset": 8, "size": 16}
    ),
    "drm_mode_create_dumb": StructLayout(
        "drm_mode_create_dumb",
        32,
        {"height": 0, "width": 4, "bpp": 8, "flags": 12, "handle": 16, "pitch": 20, "size": 24},
    ),
    "drm_prime_handle": StructLayout("drm_prime_handle", 12, {"handle": 0, "flags": 4, "fd": 8}),
    "drm_gem_close": StructLayout("drm_gem_close", 8, {"handle": 0, "pad": 4}),
}

#: Ioctl request numbers by their C macro name.
IOCTLS: dict[str, int] = {
    "IOCTL_GNTDEV_MAP_GRANT_REF": ioc(_IOC_NONE, "G", 0, 24),
    "IOCTL_GNTDEV_UNMAP_GRANT_REF": ioc(_IOC_NONE, "G", 1, 16),
    "IOCTL_GNTDEV_GRANT_COPY": ioc(_IOC_NONE, "G", 8, 16),
    "IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS": ioc(_IOC_NONE, "G", 9, 20),
    "IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED": ioc(_IOC_NONE, "G", 10, 8),
    "IOCTL_GNTDEV_DMABUF_IMP_TO_REFS": ioc(_IOC_NONE, "G", 11, 20),
    "IOCTL_GNTDEV_DMABUF_IMP_RELEASE": ioc(_IOC_NONE, "G", 12, 8),
    "IOCTL_EVTCHN_BIND_INTERDOMAIN": ioc(_IOC_NONE, "E", 1, 8),
    "IOCTL_EVTCHN_BIND_UNBOUND_PORT": ioc(_IOC_NONE, "E", 2, 4),
    "IOCTL_EVTCHN_UNBIND": ioc(_IOC_NONE, "E", 3, 4),
    "IOCTL_EVTCHN_NOTIFY": ioc(_IOC_NONE, "E", 4, 4),
    "IOCTL_EVTCHN_RESET": ioc(_IOC_NONE, "E", 5, 0),
    "IOCTL_EVTCHN_RESTRICT_DOMID": ioc(_IOC_NONE, "E", 6, 2),
    "UDMABUF_CREATE": ioc(_IOC_WRITE, "u", 0x42, 24),
    "DRM_IOCTL_MODE_CREATE_DUMB": ioc(_IOC_READ | _IOC_WRITE, "d", 0xB2, 32),
    "DRM_IOCTL_PRIME_HANDLE_TO_FD": ioc(_IOC_READ | _IOC_WRITE, "d", 0x2D, 12),
    "DRM_IOCTL_GEM_CLOSE": ioc(_IOC_WRITE, "d", 0x09, 8),
}


def _refs_buffer(head: bytes, tail_item: struct.Struct, count: int) -> bytearray:
    buf = bytearray(len(head) + tail_item.size * count)
    buf[: len(head)] = head
    return buf


def pack_map_grant_ref(domid: int, refs: list[int]) -> bytearray:
    """``ioctl_gntdev_map_grant_ref`` with ``len(refs)`` ``{domid, ref}`` entries."""
    buf = _refs_buffer(_MAP_HEAD.pack(len(refs), 0, 0), _GRANT_REF, len(refs))
    for i, ref in enumerate(refs):
        _GRANT_REF.pack_into(buf, _MAP_HEAD.size + i * _GRANT_REF.size, domid, ref)
    return buf


def unpack_map_grant_ref(buf: bytearray) -> int:
    """The ``index`` (mmap offset) gntdev wrote back."""
    return int(_MAP_HEAD.unpack_from(buf)[2])


def pack_unmap_grant_ref(index: int, count: int) -> bytearray:
    """``ioctl_gntdev_unmap_grant_ref``."""
    return bytearray(_UNMAP.pack(index, count, 0))


def pack_grant_copy_segment(domid: int, ref: int, dest: int, length: int) -> bytearray:
    """One ``gntdev_grant_copy_segment``: ``length`` bytes from offset 0 of grant ``ref`` of
    ``domid`` to the local address ``dest``; ``status`` out."""
    return bytearray(_COPY_SEGMENT.pack(ref, 0, domid, dest, length, GNTCOPY_SOURCE_GREF, 0))


def unpack_grant_copy_status(segment: bytearray) -> int:
    """The segment's ``status`` (``GNTST_okay`` = 0, negative ``GNTST_*`` on failure)."""
    return int(_COPY_SEGMENT.unpack_from(segment)[6])


def pack_grant_copy(count: int, segments: int) -> bytearray:
    """``ioctl_gntdev_grant_copy`` of ``count`` segments at local address ``segments``."""
    return bytearray(_GRANT_COPY.pack(count, segments))


def pack_dmabuf_exp_from_refs(domid: int, refs: list[int], flags: int) -> bytearray:
    """``ioctl_gntdev_dmabuf_exp_from_refs`` with ``len(refs)`` refs; ``fd`` out = 0."""
    buf = _refs_buffer(_EXP_HEAD.pack(flags, len(refs), 0, domid), _U32, len(refs))
    struct.pack_into(f"={len(refs)}I", buf, _EXP_HEAD.size, *refs)
    return buf


def unpack_dmabuf_exp_from_refs(buf: bytearray) -> int:
    """The exported dma-buf's fd gntdev wrote back."""
    return int(_EXP_HEAD.unpack_from(buf)[2])


def pack_dmabuf_exp_wait_released(fd: int, timeout_ms: int) -> bytearray:
    """``ioctl_gntdev_dmabuf_exp_wait_released``."""
    return bytearray(_WAIT.pack(fd, timeout_ms))


def pack_dmabuf_imp_to_refs(fd: int, count: int, domid: int) -> bytearray:
    """``ioctl_gntdev_dmabuf_imp_to_refs`` with room for ``count`` refs (out)."""
    return _refs_buffer(_IMP_HEAD.pack(fd, count, domid, 0), _U32, count)


def unpack_dmabuf_imp_to_refs(buf: bytearray, count: int) -> list[int]:
    """The grant references gntdev wrote back."""
    return list(struct.unpack_from(f"={count}I", buf, _IMP_HEAD.size))


def pack_dmabuf_imp_release(fd: int) -> bytearray:
    """``ioctl_gntdev_dmabuf_imp_release``."""
    return bytearray(_IMP_RELEASE.pack(fd, 0))


def pack_evtchn_bind_interdomain(remote_domid: int, remote_port: int) -> bytearray:
    """``ioctl_evtchn_bind_interdomain``."""
    return bytearray(_BIND_INTERDOMAIN.pack(remote_domid, remote_port))


def pack_evtchn_bind_unbound_port(remote_domid: int) -> bytearray:
    """``ioctl_evtchn_bind_unbound_port``."""
    return bytearray(_U32.pack(remote_domid))


def pack_evtchn_port(port: int) -> bytearray:
    """``ioctl_evtchn_unbind`` / ``ioctl_evtchn_notify`` (one u32 port)."""
    return bytearray(_U32.pack(port))


def pack_evtchn_restrict_domid(domid: int) -> bytearray:
    """``ioctl_evtchn_restrict_domid`` (a u16 ``domid_t``)."""
    return bytearray(_DOMID.pack(domid))


def pack_udmabuf_create(memfd: int, size: int, *, offset: int = 0) -> bytearray:
    """``udmabuf_create`` for a close-on-exec dma-buf over ``memfd``."""
    return bytearray(_UDMABUF_CREATE.pack(memfd, UDMABUF_FLAGS_CLOEXEC, offset, size))


def pack_drm_create_dumb(width: int, height: int, bpp: int) -> bytearray:
    """``drm_mode_create_dumb`` (handle, pitch and size are written back)."""
    return bytearray(_CREATE_DUMB.pack(height, width, bpp, 0, 0, 0, 0))


def unpack_drm_create_dumb(buf: bytearray) -> tuple[int, int, int]:
    """``(handle, pitch, size)`` of a created dumb buffer."""
    _h, _w, _b, _f, handle, pitch, size = _CREATE_DUMB.unpack_from(buf)
    return int(handle), int(pitch), int(size)


def pack_drm_prime_handle(handle: int) -> bytearray:
    """``drm_prime_handle`` asking for a close-on-exec, read-write dma-buf fd."""
    return bytearray(_PRIME_HANDLE.pack(handle, DRM_CLOEXEC | DRM_RDWR, -1))


def unpack_drm_prime_handle(buf: bytearray) -> int:
    """The dma-buf fd the DRM driver wrote back."""
    return int(_PRIME_HANDLE.unpack_from(buf)[2])


def pack_drm_gem_close(handle: int) -> bytearray:
    """``drm_gem_close``."""
    return bytearray(_GEM_CLOSE.pack(handle, 0))


def pack_ports(ports: list[int]) -> bytes:
    """Port numbers as written to ``/dev/xen/evtchn`` to unmask them (u32 each)."""
    return struct.pack(f"={len(ports)}I", *ports)


def unpack_ports(data: bytes) -> list[int]:
    """Port numbers read from ``/dev/xen/evtchn`` (whole u32 units only)."""
    whole = len(data) - len(data) % 4
    return list(struct.unpack_from(f"={whole // 4}I", data))
