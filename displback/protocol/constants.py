"""Numbers of the displif protocol (displif.h v2), named as in the C header.

Kept in one place so the reference (../shared/docs/displif-reference.md §8, §10) and the code
read alike; nothing here does I/O or depends on anything else.
"""

from __future__ import annotations

import enum
import errno as _errno

PROTOCOL_VERSION = "2"
PROTOCOL_VERSION_INT = 2
DEVICE_TYPE = "vdispl"
LIST_SEPARATOR = ","
RESOLUTION_SEPARATOR = "x"

PAGE_SIZE = 4096
PACKET_SIZE = 64

# Request ring (Xen "sring"): 64-byte header, entries rounded down to a power of two.
RING_HEADER_SIZE = 64
RING_SIZE = 32
# Event page: 64-byte header, then (4096 - 64) / 64 = 63 slots (not a power of two).
EVT_PAGE_HEADER_SIZE = 64
EVT_PAGE_SLOTS = (PAGE_SIZE - EVT_PAGE_HEADER_SIZE) // PACKET_SIZE

# Grant-reference page directory: next-page ref, then 1023 refs.
GREFS_PER_DIR_PAGE = (PAGE_SIZE - 4) // 4

EDID_BLOCK_SIZE = 128
EDID_MAX_BLOCKS = 256
EDID_MAX_SIZE = EDID_BLOCK_SIZE * EDID_MAX_BLOCKS

DBUF_FLG_REQ_ALLOC = 1 << 0

# Limits of the Linux frontend (xen_drm_front.h / xen_drm_front_kms.c).
LINUX_MAX_CONNECTORS = 4
LINUX_MAX_WIDTH = 4095
LINUX_MAX_HEIGHT = 2047
LINUX_RESPONSE_TIMEOUT_MS = 3000
LINUX_FRAME_DONE_TIMEOUT_MS = 3100
LINUX_REFRESH_HZ = 60

# libxl waits this long for InitWait at creation and for Closed at removal.
LIBXL_INIT_TIMEOUT_S = 10
LIBXL_DESTROY_TIMEOUT_S = 10


class Op(enum.IntEnum):
    """``XENDISPL_OP_*``: request operation codes."""

    DBUF_CREATE = 0x10
    DBUF_DESTROY = 0x11
    FB_ATTACH = 0x12
    FB_DETACH = 0x13
    SET_CONFIG = 0x14
    PG_FLIP = 0x15
    GET_EDID = 0x16


class EventType(enum.IntEnum):
    """``XENDISPL_EVT_*``: event types on the event page."""

    PG_FLIP = 0x00


class PixelFormat(enum.IntEnum):
    """DRM fourcc codes the Linux frontend offers (reference §10)."""

    RGB565 = 0x36314752
    RGB888 = 0x34324752
    XRGB8888 = 0x34325258
    ARGB8888 = 0x34325241
    XRGB4444 = 0x32315258
    ARGB4444 = 0x32315241
    XRGB1555 = 0x35315258
    ARGB1555 = 0x35315241
    YUYV = 0x56595559

    @property
    def bpp(self) -> int:
        """Bits per pixel of the (single-plane) format."""
        return _FORMAT_BPP[self]

    @property
    def cpp(self) -> int:
        """Bytes per pixel of the (single-plane) format."""
        return _FORMAT_BPP[self] // 8


_FORMAT_BPP = {
    PixelFormat.RGB565: 16,
    PixelFormat.RGB888: 24,
    PixelFormat.XRGB8888: 32,
    PixelFormat.ARGB8888: 32,
    PixelFormat.XRGB4444: 16,
    PixelFormat.ARGB4444: 16,
    PixelFormat.XRGB1555: 16,
    PixelFormat.ARGB1555: 16,
    PixelFormat.YUYV: 16,
}


def pitch_for(width: int, bpp: int) -> int:
    """The Linux dumb-buffer pitch, ``ceil(width * bpp / 8)`` with no alignment padding."""
    return (width * bpp + 7) // 8


def pages_for(size: int) -> int:
    """How many 4 KiB pages hold ``size`` bytes."""
    return (size + PAGE_SIZE - 1) // PAGE_SIZE


# Status values: Xen errno numbers, negated on the wire; equal to Linux's.
EPERM = _errno.EPERM
ENOENT = _errno.ENOENT
EIO = _errno.EIO
E2BIG = _errno.E2BIG
EAGAIN = _errno.EAGAIN
ENOMEM = _errno.ENOMEM
EBUSY = _errno.EBUSY
EEXIST = _errno.EEXIST
ENODEV = _errno.ENODEV
EINVAL = _errno.EINVAL
ENOSPC = _errno.ENOSPC
ENOSYS = _errno.ENOSYS
EOPNOTSUPP = _errno.EOPNOTSUPP
ETIMEDOUT = _errno.ETIMEDOUT

# Byte offsets of the shared indexes (xen_displif_sring and xendispl_event_page).
RING_REQ_PROD_OFS = 0
RING_REQ_EVENT_OFS = 4
RING_RSP_PROD_OFS = 8
RING_RSP_EVENT_OFS = 12
EVT_IN_CONS_OFS = 0
EVT_IN_PROD_OFS = 4
