"""A DRM card fd with typed methods: the only place displback talks DRM ioctls.

:class:`DrmDevice` wraps an open card (``/dev/dri/cardN``, see :func:`open_card`) and turns
each ioctl of :mod:`displback.kms.uapi` into a method taking and returning plain Python values
(frozen dataclasses). Every ioctl goes through one injectable :class:`Syscalls` object — the
real one calls ``fcntl.ioctl``/``mmap``; ``tests/kms/fake.py`` answers like a vkms or bochs
kernel, writing through the same user pointers the kernel would. A failed ioctl raises
:class:`DrmError`, an ``OSError`` naming the ioctl and carrying its errno.

Events (flip completions, vblanks) are read from the card fd, which :func:`open_card` opens
non-blocking: wait with ``await device.wait_readable()`` (``trio.lowlevel.wait_readable``),
then :meth:`DrmDevice.read_events` returns what is there. The fd-level methods are blocking
system calls that return at once, except a legacy modeset (``set_crtc``), which can take a
few frames: callers run it in a thread.

Variable-length answers (resources, connectors, planes, properties) use the kernel's
two-call protocol: ask for the counts, allocate, ask again, and repeat if the counts grew in
between (hot-plug). :meth:`DrmDevice.connector` reads the current state without forcing a
probe (libdrm's ``drmModeGetConnectorCurrent`` trick: a non-zero ``count_modes`` on the first
call), unless ``probe=True``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from displback.kms import uapi
from displback.kms.uapi import (
    DRM_MODE_FLAG_DBLSCAN,
    DRM_MODE_FLAG_INTERLACE,
    DRM_MODE_TYPE_PREFERRED,
    ConnectorStatus,
    ObjectType,
)

__all__ = [
    "DrmConnector",
    "Crtc",
    "DrmDevice",
    "DrmError",
    "DrmEvent",
    "DrmVersion",
    "DrmDumbBuffer",
    "Encoder",
    "KernelSyscalls",
    "ModeInfo",
    "NativeCall",
    "PlaneFlip",
    "Plane",
    "Property",
    "PropertyValue",
    "Resources",
    "Syscalls",
    "open_card",
    "parse_events",
]

_MAX_RETRIES = 8  # two-call protocol: counts changing more often than this is a driver bug
_EVENT_READ_SIZE = 4096


class DrmError(OSError):
    """A DRM ioctl failed: ``ioctl`` is its short name (``"MODE_ADDFB2"``), ``errno`` the code."""

    def __init__(self, ioctl: str, code: int, detail: str = "") -> None:
        text = f"DRM_IOCTL_{ioctl} failed: {os.strerror(code)} (errno {code})"
        if detail:
            text += f"; {detail}"
        super().__init__(code, text)
        self.ioctl = ioctl

    def __str__(self) -> str:
        return str(self.strerror)


class Syscalls(Protocol):
    """The system calls a :class:`DrmDevice` makes on its fd (injectable for tests)."""

    #: Whether the fd is a real card another thread may issue ioctls on directly
    #: (:meth:`DrmDevice.native_call`); a test double's calls must go through :meth:`ioctl`.
    native: bool

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure | ctypes.c_uint32 | None) -> None:
        """Issue ``request`` with ``arg`` read and written in place; OSError on failure."""
        ...

    def mmap(self, fd: int, length: int, offset: int) -> mmap.mmap:
        """Map ``length`` bytes of the fd at ``offset``, shared, read-write."""
        ...


class KernelSyscalls:
    """The real thing: ``fcntl.ioctl`` and ``mmap.mmap`` on the card fd."""

    native = True

    def ioctl(self, fd: int, request: int, arg: ctypes.Structure | ctypes.c_uint32 | None) -> None:
        if arg is None:
            fcntl.ioctl(fd, request, 0)
        else:
            fcntl.ioctl(fd, request, arg, True)

    def mmap(self, fd: int, length: int, offset: int) -> mmap.mmap:
        return mmap.mmap(
            fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
        )


# ---- values -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModeInfo:
    """A display mode (``drm_mode_modeinfo``) as plain values."""

    clock: int
    hdisplay: int
    hsync_start: int
    hsync_end: int
    htotal: int
    hskew: int
    vdisplay: int
    vsync_start: int
    vsync_end: int
    vtotal: int
    vscan: int
    vrefresh: int
    flags: int
    type: int
    name: str

    @property
    def width(self) -> int:
        return self.hdisplay

    @property
    def height(self) -> int:
        return self.vdisplay

    @property
    def preferred(self) -> bool:
        return bool(self.type & DRM_MODE_TYPE_PREFERRED)

    @property
    def refresh_hz(self) -> float:
        """Refresh rate from the timings (as the kernel's ``drm_mode_vrefresh``), else vrefresh."""
        if self.htotal and self.vtotal and self.clock:
            rate = self.clock * 1000.0 / (self.htotal * self.vtotal)
            if self.flags & DRM_MODE_FLAG_INTERLACE:
                rate *= 2
            if self.flags & DRM_MODE_FLAG_DBLSCAN:
                rate /= 2
            if self.vscan > 1:
                rate /= self.vscan
            return rate
        return float(self.vrefresh or 60)

    def __str__(self) -> str:
        return f"{self.hdisplay}x{self.vdisplay}@{self.refresh_hz:.2f}"

    @classmethod
    def from_struct(cls, s: uapi.drm_mode_modeinfo) -> ModeInfo:
        return cls(
            s.clock,
            s.hdisplay,
            s.hsync_start,
            s.hsync_end,
            s.htotal,
            s.hskew,
            s.vdisplay,
            s.vsync_start,
            s.vsync_end,
            s.vtotal,
            s.vscan,
            s.vrefresh,
            s.flags,
            s.type,
            s.name.decode("ascii", "replace"),
        )

    def to_struct(self) -> uapi.drm_mode_modeinfo:
        return uapi.drm_mode_modeinfo(
            self.clock,
            self.hdisplay,
            self.hsync_start,
            self.hsync_end,
            self.htotal,
            self.hskew,
            self.vdisplay,
            self.vsync_start,
            self.vsync_end,
            self.vtotal,
            self.vscan,
            self.vrefresh,
            self.flags,
            self.type,
            self.name.encode("ascii", "replace")[: uapi.DRM_DISPLAY_MODE_LEN - 1],
        )

    def to_bytes(self) -> bytes:
        """The struct's bytes: the payload of a ``MODE_ID`` property blob."""
        return bytes(self.to_struct())


@dataclass(frozen=True, slots=True)
class DrmVersion:
    major: int
    minor: int
    patchlevel: int
    name: str
    date: str
    desc: str


@dataclass(frozen=True, slots=True)
class Resources:
    """Object ids of a card (GETRESOURCES) and its framebuffer size limits."""

    fbs: tuple[int, ...]
    crtcs: tuple[int, ...]
    connectors: tuple[int, ...]
    encoders: tuple[int, ...]
    min_width: int
    max_width: int
    min_height: int
    max_height: int


@dataclass(frozen=True, slots=True)
class PropertyValue:
    """One property of an object: its id (for atomic commits) and current value."""

    id: int
    value: int


@dataclass(frozen=True, slots=True)
class Property:
    """A property's definition (GETPROPERTY): name, flags, range values, enum names."""

    id: int
    name: str
    flags: int
    values: tuple[int, ...]
    enums: Mapping[str, int]

    @property
    def atomic(self) -> bool:
        return bool(self.flags & uapi.DRM_MODE_PROP_ATOMIC)

    @property
    def immutable(self) -> bool:
        return bool(self.flags & uapi.DRM_MODE_PROP_IMMUTABLE)


@dataclass(frozen=True, slots=True)
class DrmConnector:
    """A connector (GETCONNECTOR): ``name`` like ``HDMI-A-1``, status, modes, properties."""

    id: int
    type: int
    type_id: int
    status: ConnectorStatus
    encoder_id: int
    encoders: tuple[int, ...]
    modes: tuple[ModeInfo, ...]
    mm_width: int
    mm_height: int
    properties: Mapping[str, PropertyValue] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return uapi.connector_name(self.type, self.type_id)

    @property
    def connected(self) -> bool:
        return self.status is ConnectorStatus.CONNECTED

    @property
    def preferred_mode(self) -> ModeInfo | None:
        """The mode flagged preferred, else the first one listed (the kernel sorts them)."""
        for mode in self.modes:
            if mode.preferred:
                return mode
        return self.modes[0] if self.modes else None


@dataclass(frozen=True, slots=True)
class Encoder:
    id: int
    type: int
    crtc_id: int
    possible_crtcs: int
    possible_clones: int


@dataclass(frozen=True, slots=True)
class Crtc:
    """A CRTC's state (GETCRTC): the FB it scans out, where from, and its mode (None: off)."""

    id: int
    fb_id: int
    x: int
    y: int
    mode: ModeInfo | None
    gamma_size: int


@dataclass(frozen=True, slots=True)
class Plane:
    """A plane (GETPLANE) with the pixel formats (fourcc) it scans out."""

    id: int
    crtc_id: int
    fb_id: int
    possible_crtcs: int
    gamma_size: int
    formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DrmDumbBuffer:
    """A dumb buffer (CREATE_DUMB): GEM handle, the driver's pitch and size."""

    handle: int
    pitch: int
    size: int


@dataclass(frozen=True, slots=True)
class DrmEvent:
    """An event read from the card fd; flip completions carry ``user_data`` back."""

    type: int
    user_data: int
    tv_sec: int
    tv_usec: int
    sequence: int
    crtc_id: int

    @property
    def timestamp(self) -> float:
        """The vblank time in seconds (``CLOCK_MONOTONIC`` when TIMESTAMP_MONOTONIC is set)."""
        return self.tv_sec + self.tv_usec / 1e6

    @property
    def flip_complete(self) -> bool:
        return self.type == uapi.DRM_EVENT_FLIP_COMPLETE


_EVENT_HEADER = struct.Struct("=II")
_EVENT_VBLANK = struct.Struct("=IIQIIII")


def parse_events(data: bytes) -> list[DrmEvent]:
    """Split what a read of the card fd returned into events (unknown kinds are skipped).

    Each event starts with ``{type u32, length u32}``; vblank and flip-complete events are
    the 32-byte ``drm_event_vblank``. ValueError for a truncated or zero-length event.
    """
    events: list[DrmEvent] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < _EVENT_HEADER.size:
            raise ValueError(f"truncated DRM event header at byte {pos} of {len(data)}")
        kind, length = _EVENT_HEADER.unpack_from(data, pos)
        if length < _EVENT_HEADER.size or pos + length > len(data):
            raise ValueError(f"DRM event at byte {pos} has bad length {length}")
        if kind in (uapi.DRM_EVENT_VBLANK, uapi.DRM_EVENT_FLIP_COMPLETE):
            if length < _EVENT_VBLANK.size:
                raise ValueError(f"DRM vblank event of {length} bytes (needs 32)")
            _, _, user_data, sec, usec, seq, crtc = _EVENT_VBLANK.unpack_from(data, pos)
            events.append(DrmEvent(kind, user_data, sec, usec, seq, crtc))
        pos += length
    return events


# ---- the device ---------------------------------------------------------------------------


def _u32s(count: int) -> ctypes.Array[ctypes.c_uint32]:
    return (ctypes.c_uint32 * max(count, 0))()


def _u64s(count: int) -> ctypes.Array[ctypes.c_uint64]:
    return (ctypes.c_uint64 * max(count, 0))()


def _addr(
    array: ctypes.Array[ctypes.c_uint32]
    | ctypes.Array[ctypes.c_uint64]
    | ctypes.Array[uapi.drm_mode_modeinfo]
    | ctypes.Array[uapi.drm_mode_property_enum],
) -> int:
    return ctypes.addressof(array) if len(array) else 0


@dataclass(frozen=True, slots=True)
class NativeCall:
    """One ioctl on a card's fd, for a native thread to issue (:meth:`DrmDevice.native_call`)."""

    fd: int
    request: int
    arg: ctypes.Structure  # read (and written) by the kernel in place
    name: str  # the ioctl's short name, for the error
    detail: str = ""

    def error(self, code: int) -> DrmError:
        """The error of this call having failed with errno ``code``."""
        return DrmError(self.name, code, self.detail)


class PlaneFlip:
    """The atomic commit of a plain flip, its arrays built once: one plane's ``FB_ID``,
    NONBLOCK with PAGE_FLIP_EVENT (:meth:`DrmDevice.commit_plane_flip` fills in the FB
    and the event's ``user_data``).

    Why one property is a whole flip: the kernel starts a commit from a copy of every object's
    current state and applies only the properties given (``drm_mode_atomic_ioctl`` →
    ``drm_atomic_get_plane_state``), and a plane's state brings its CRTC's with it, which
    carries the event. A flip that keeps the plane's rectangles and the CRTC's mode needs no
    more, and building and filling ten properties' arrays per flip is the costly part in
    Python.
    """

    __slots__ = ("_keep", "arg", "detail", "values")

    def __init__(self, plane_id: int, fb_prop_id: int) -> None:
        objs, counts, props = _u32s(1), _u32s(1), _u32s(1)
        objs[0], counts[0], props[0] = plane_id, 1, fb_prop_id
        self.values = _u64s(1)
        self._keep = (objs, counts, props)  # the arrays the struct points into
        self.arg = uapi.drm_mode_atomic()
        self.arg.flags = uapi.DRM_MODE_ATOMIC_NONBLOCK | uapi.DRM_MODE_PAGE_FLIP_EVENT
        self.arg.count_objs = 1
        self.arg.objs_ptr, self.arg.count_props_ptr = _addr(objs), _addr(counts)
        self.arg.props_ptr, self.arg.prop_values_ptr = _addr(props), _addr(self.values)
        self.detail = f"flip of plane {plane_id} (its FB_ID alone)"


class DrmDevice:
    """Typed DRM ioctls on one card fd; see the module docstring."""

    def __init__(
        self, fd: int, *, syscalls: Syscalls | None = None, owns_fd: bool = True, path: str = ""
    ) -> None:
        self.fd = fd
        self.path = path
        self._sys: Syscalls = syscalls if syscalls is not None else KernelSyscalls()
        self._owns_fd = owns_fd
        self._closed = False
        self._property_cache: dict[int, Property] = {}

    def __repr__(self) -> str:
        return f"<DrmDevice fd {self.fd} {self.path}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the fd (if owned); the kernel drops master and every handle and FB with it."""
        if self._closed:
            return
        self._closed = True
        if self._owns_fd:
            os.close(self.fd)

    def _ioctl(
        self,
        name: str,
        arg: ctypes.Structure | ctypes.c_uint32 | None,
        detail: str | Callable[[], str] = "",
    ) -> None:
        """The one door to the kernel: retried on EINTR/EAGAIN, failures as DrmError.

        ``detail`` may be a function: the flips' ioctls then format it only on failure.
        """
        if self._closed:
            raise DrmError(name, errno.EBADF, "the device is closed")
        request = uapi.IOCTLS[name]
        for _ in range(100):
            try:
                self._sys.ioctl(self.fd, request, arg)
                return
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                text = detail() if callable(detail) else detail
                raise DrmError(name, exc.errno or errno.EIO, text) from exc
        text = detail() if callable(detail) else detail
        raise DrmError(name, errno.EAGAIN, text or "retried 100 times")

    # -- identity and capabilities --------------------------------------------------------

    def version(self) -> DrmVersion:
        v = uapi.drm_version()
        self._ioctl("VERSION", v)
        bufs = [ctypes.create_string_buffer(n + 1) for n in (v.name_len, v.date_len, v.desc_len)]
        v2 = uapi.drm_version()
        v2.name_len, v2.date_len, v2.desc_len = v.name_len, v.date_len, v.desc_len
        v2.name, v2.date, v2.desc = (ctypes.addressof(b) for b in bufs)
        self._ioctl("VERSION", v2)
        name, date, desc = (
            b.raw[: min(n, len(b) - 1)].decode("utf-8", "replace")
            for b, n in zip(bufs, (v.name_len, v.date_len, v.desc_len), strict=True)
        )
        return DrmVersion(
            v2.version_major, v2.version_minor, v2.version_patchlevel, name, date, desc
        )

    def get_cap(self, capability: int) -> int:
        cap = uapi.drm_get_cap(capability, 0)
        self._ioctl("GET_CAP", cap, f"capability {capability}")
        return int(cap.value)

    def has_cap(self, capability: int) -> int:
        """``get_cap`` that answers 0 where the kernel does not know the capability."""
        try:
            return self.get_cap(capability)
        except DrmError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return 0
            raise

    def set_client_cap(self, capability: int, value: int = 1) -> None:
        self._ioctl(
            "SET_CLIENT_CAP", uapi.drm_set_client_cap(capability, value), f"capability {capability}"
        )

    def set_master(self) -> None:
        self._ioctl("SET_MASTER", None)

    def drop_master(self) -> None:
        self._ioctl("DROP_MASTER", None)

    # -- mode-setting objects -------------------------------------------------------------

    def resources(self) -> Resources:
        counts = (0, 0, 0, 0)
        for _ in range(_MAX_RETRIES):
            arrays = [_u32s(n) for n in counts]
            res = uapi.drm_mode_card_res()
            res.fb_id_ptr, res.crtc_id_ptr, res.connector_id_ptr, res.encoder_id_ptr = (
                _addr(a) for a in arrays
            )
            res.count_fbs, res.count_crtcs, res.count_connectors, res.count_encoders = counts
            self._ioctl("MODE_GETRESOURCES", res)
            got = (res.count_fbs, res.count_crtcs, res.count_connectors, res.count_encoders)
            if got == counts:
                fbs, crtcs, conns, encs = (tuple(a[:n]) for a, n in zip(arrays, got, strict=True))
                return Resources(
                    fbs,
                    crtcs,
                    conns,
                    encs,
                    res.min_width,
                    res.max_width,
                    res.min_height,
                    res.max_height,
                )
            counts = got
        raise DrmError("MODE_GETRESOURCES", errno.EAGAIN, "object counts kept changing")

    def connector_status(self, connector_id: int) -> ConnectorStatus:
        """A connector's status alone: one GETCONNECTOR that copies nothing else and never
        probes (it asks for one mode: only a request for zero makes the kernel re-detect).
        What the hot-plug check needs once a second, without :meth:`connector`'s modes and
        properties."""
        modes = (uapi.drm_mode_modeinfo * 1)()
        c = uapi.drm_mode_get_connector()
        c.connector_id = connector_id
        c.count_modes, c.modes_ptr = 1, _addr(modes)
        self._ioctl("MODE_GETCONNECTOR", c, f"connector {connector_id}")
        try:
            return ConnectorStatus(c.connection)
        except ValueError:
            return ConnectorStatus.UNKNOWN

    def connector(self, connector_id: int, *, probe: bool = False) -> DrmConnector:
        """A connector's state; ``probe=True`` makes the kernel re-detect it (slow: EDID)."""
        n_modes, n_props, n_encs = (0 if probe else 1), 0, 0
        for _ in range(_MAX_RETRIES):
            modes = (uapi.drm_mode_modeinfo * n_modes)()
            props, values, encs = _u32s(n_props), _u64s(n_props), _u32s(n_encs)
            c = uapi.drm_mode_get_connector()
            c.connector_id = connector_id
            c.count_modes, c.count_props, c.count_encoders = n_modes, n_props, n_encs
            c.modes_ptr, c.props_ptr, c.prop_values_ptr, c.encoders_ptr = (
                _addr(modes),
                _addr(props),
                _addr(values),
                _addr(encs),
            )
            self._ioctl("MODE_GETCONNECTOR", c, f"connector {connector_id}")
            got = (c.count_modes, c.count_props, c.count_encoders)
            # A connector without modes answers 0 to the 1 we asked for: that is final too.
            if got == (n_modes, n_props, n_encs) or (n_modes == 1 and got == (0, n_props, n_encs)):
                break
            # Never ask for 0 modes after the first call: that would probe again.
            n_modes, n_props, n_encs = max(got[0], 1), got[1], got[2]
        else:
            raise DrmError("MODE_GETCONNECTOR", errno.EAGAIN, "counts kept changing")
        try:
            status = ConnectorStatus(c.connection)
        except ValueError:
            status = ConnectorStatus.UNKNOWN
        properties = {
            self.property(pid).name: PropertyValue(pid, int(val))
            for pid, val in zip(props[: c.count_props], values[: c.count_props], strict=True)
        }
        return DrmConnector(
            id=connector_id,
            type=c.connector_type,
            type_id=c.connector_type_id,
            status=status,
            encoder_id=c.encoder_id,
            encoders=tuple(encs[: c.count_encoders]),
            modes=tuple(ModeInfo.from_struct(m) for m in modes[: c.count_modes]),
            mm_width=c.mm_width,
            mm_height=c.mm_height,
            properties=properties,
        )

    def encoder(self, encoder_id: int) -> Encoder:
        e = uapi.drm_mode_get_encoder(encoder_id)
        self._ioctl("MODE_GETENCODER", e, f"encoder {encoder_id}")
        return Encoder(e.encoder_id, e.encoder_type, e.crtc_id, e.possible_crtcs, e.possible_clones)

    def crtc(self, crtc_id: int) -> Crtc:
        c = uapi.drm_mode_crtc()
        c.crtc_id = crtc_id
        self._ioctl("MODE_GETCRTC", c, f"CRTC {crtc_id}")
        mode = ModeInfo.from_struct(c.mode) if c.mode_valid else None
        return Crtc(c.crtc_id, c.fb_id, c.x, c.y, mode, c.gamma_size)

    def set_crtc(
        self,
        crtc_id: int,
        fb_id: int,
        *,
        x: int = 0,
        y: int = 0,
        connectors: Sequence[int] = (),
        mode: ModeInfo | None = None,
    ) -> None:
        """Legacy modeset: scan ``fb_id`` out at ``mode`` on ``connectors`` (fb 0: turn off).

        Blocks until the mode is set (a few frames on real hardware): run it in a thread.
        """
        ids = _u32s(len(connectors))
        for i, cid in enumerate(connectors):
            ids[i] = cid
        c = uapi.drm_mode_crtc()
        c.crtc_id, c.fb_id, c.x, c.y = crtc_id, fb_id, x, y
        c.set_connectors_ptr, c.count_connectors = _addr(ids), len(connectors)
        if mode is not None:
            c.mode, c.mode_valid = mode.to_struct(), 1
        self._ioctl("MODE_SETCRTC", c, f"CRTC {crtc_id}, FB {fb_id}, mode {mode}")

    def plane_ids(self) -> tuple[int, ...]:
        """Every plane (set the UNIVERSAL_PLANES client cap first to see primaries too)."""
        count = 0
        for _ in range(_MAX_RETRIES):
            ids = _u32s(count)
            res = uapi.drm_mode_get_plane_res(_addr(ids), count)
            self._ioctl("MODE_GETPLANERESOURCES", res)
            if res.count_planes == count:
                return tuple(ids[:count])
            count = res.count_planes
        raise DrmError("MODE_GETPLANERESOURCES", errno.EAGAIN, "plane count kept changing")

    def plane(self, plane_id: int) -> Plane:
        count = 0
        for _ in range(_MAX_RETRIES):
            formats = _u32s(count)
            p = uapi.drm_mode_get_plane()
            p.plane_id, p.count_format_types, p.format_type_ptr = plane_id, count, _addr(formats)
            self._ioctl("MODE_GETPLANE", p, f"plane {plane_id}")
            if p.count_format_types == count:
                return Plane(
                    p.plane_id,
                    p.crtc_id,
                    p.fb_id,
                    p.possible_crtcs,
                    p.gamma_size,
                    tuple(formats[:count]),
                )
            count = p.count_format_types
        raise DrmError("MODE_GETPLANE", errno.EAGAIN, "format count kept changing")

    def object_properties(self, obj_id: int, obj_type: ObjectType) -> dict[str, PropertyValue]:
        """Every property of a KMS object by name, with its id and current value."""
        count = 0
        for _ in range(_MAX_RETRIES):
            props, values = _u32s(count), _u64s(count)
            o = uapi.drm_mode_obj_get_properties(
                _addr(props), _addr(values), count, obj_id, obj_type
            )
            self._ioctl("MODE_OBJ_GETPROPERTIES", o, f"{obj_type.name.lower()} {obj_id}")
            if o.count_props == count:
                return {
                    self.property(pid).name: PropertyValue(pid, int(val))
                    for pid, val in zip(props[:count], values[:count], strict=True)
                }
            count = o.count_props
        raise DrmError("MODE_OBJ_GETPROPERTIES", errno.EAGAIN, "property count kept changing")

    def property(self, prop_id: int) -> Property:
        """A property's definition (cached: definitions never change while the card is open)."""
        cached = self._property_cache.get(prop_id)
        if cached is not None:
            return cached
        n_values = n_enums = 0
        for _ in range(_MAX_RETRIES):
            values = _u64s(n_values)
            enums = (uapi.drm_mode_property_enum * n_enums)()
            p = uapi.drm_mode_get_property()
            p.prop_id, p.count_values, p.count_enum_blobs = prop_id, n_values, n_enums
            p.values_ptr, p.enum_blob_ptr = _addr(values), _addr(enums)
            self._ioctl("MODE_GETPROPERTY", p, f"property {prop_id}")
            if (p.count_values, p.count_enum_blobs) == (n_values, n_enums):
                break
            n_values, n_enums = p.count_values, p.count_enum_blobs
        else:
            raise DrmError("MODE_GETPROPERTY", errno.EAGAIN, "counts kept changing")
        enum_kinds = uapi.DRM_MODE_PROP_ENUM | uapi.DRM_MODE_PROP_BITMASK
        result = Property(
            id=prop_id,
            name=p.name.decode("ascii", "replace"),
            flags=p.flags,
            values=tuple(int(v) for v in values[:n_values]),
            enums=(
                {e.name.decode("ascii", "replace"): int(e.value) for e in enums[:n_enums]}
                if p.flags & enum_kinds
                else {}
            ),
        )
        self._property_cache[prop_id] = result
        return result

    # -- buffers and framebuffers ---------------------------------------------------------

    def create_dumb(self, width: int, height: int, bpp: int) -> DrmDumbBuffer:
        d = uapi.drm_mode_create_dumb(height, width, bpp, 0)
        self._ioctl("MODE_CREATE_DUMB", d, f"{width}x{height} at {bpp} bpp")
        return DrmDumbBuffer(d.handle, d.pitch, int(d.size))

    def map_dumb(self, handle: int) -> int:
        """The fake offset to ``mmap`` the card fd at for dumb buffer ``handle``."""
        m = uapi.drm_mode_map_dumb(handle, 0, 0)
        self._ioctl("MODE_MAP_DUMB", m, f"handle {handle}")
        return int(m.offset)

    def mmap_dumb(self, buffer: DrmDumbBuffer) -> mmap.mmap:
        """A shared read-write CPU mapping of a dumb buffer (MAP_DUMB + mmap of the card fd)."""
        offset = self.map_dumb(buffer.handle)
        return self._sys.mmap(self.fd, buffer.size, offset)

    def destroy_dumb(self, handle: int) -> None:
        self._ioctl("MODE_DESTROY_DUMB", uapi.drm_mode_destroy_dumb(handle), f"handle {handle}")

    def prime_fd_to_handle(self, fd: int) -> int:
        """Import a dma-buf: the GEM handle keeps it alive after ``fd`` is closed."""
        p = uapi.drm_prime_handle(0, 0, fd)
        self._ioctl("PRIME_FD_TO_HANDLE", p, f"dma-buf fd {fd}")
        return int(p.handle)

    def prime_handle_to_fd(self, handle: int, flags: int = uapi.DRM_CLOEXEC) -> int:
        p = uapi.drm_prime_handle(handle, flags, -1)
        self._ioctl("PRIME_HANDLE_TO_FD", p, f"handle {handle}")
        return int(p.fd)

    def gem_close(self, handle: int) -> None:
        self._ioctl("GEM_CLOSE", uapi.drm_gem_close(handle, 0), f"handle {handle}")

    def add_fb2(
        self,
        width: int,
        height: int,
        fourcc: int,
        handles: Sequence[int],
        pitches: Sequence[int],
        offsets: Sequence[int],
        modifiers: Sequence[int] | None = None,
    ) -> int:
        """Make a framebuffer of up to four planes; ``modifiers`` sets DRM_MODE_FB_MODIFIERS."""
        cmd = uapi.drm_mode_fb_cmd2()
        cmd.width, cmd.height, cmd.pixel_format = width, height, fourcc
        for i, (h, p, o) in enumerate(zip(handles, pitches, offsets, strict=True)):
            cmd.handles[i], cmd.pitches[i], cmd.offsets[i] = h, p, o
        if modifiers is not None:
            cmd.flags = uapi.DRM_MODE_FB_MODIFIERS
            for i, m in enumerate(modifiers):
                cmd.modifier[i] = m
        self._ioctl(
            "MODE_ADDFB2",
            cmd,
            f"{width}x{height} fourcc 0x{fourcc:08x} pitch {pitches[0]} offset {offsets[0]}",
        )
        return int(cmd.fb_id)

    def rm_fb(self, fb_id: int) -> None:
        self._ioctl("MODE_RMFB", ctypes.c_uint32(fb_id), f"FB {fb_id}")

    # -- scanout --------------------------------------------------------------------------

    def page_flip(self, crtc_id: int, fb_id: int, *, flags: int, user_data: int = 0) -> None:
        """Queue a legacy flip; with PAGE_FLIP_EVENT its completion arrives as an event."""
        f = uapi.drm_mode_crtc_page_flip(crtc_id, fb_id, flags, 0, user_data)
        self._ioctl("MODE_PAGE_FLIP", f, lambda: f"CRTC {crtc_id}, FB {fb_id}")

    def atomic_commit(
        self, changes: Mapping[int, Mapping[int, int]], *, flags: int, user_data: int = 0
    ) -> None:
        """Commit ``{object id: {property id: value}}`` with DRM_MODE_ATOMIC_* flags."""
        objs = _u32s(len(changes))
        counts = _u32s(len(changes))
        total = sum(len(p) for p in changes.values())
        props, values = _u32s(total), _u64s(total)
        i = 0
        for n, (obj, obj_props) in enumerate(changes.items()):
            objs[n], counts[n] = obj, len(obj_props)
            for prop, value in obj_props.items():
                props[i], values[i] = prop, value & 0xFFFFFFFFFFFFFFFF
                i += 1
        a = uapi.drm_mode_atomic()
        a.flags, a.count_objs, a.user_data = flags, len(changes), user_data
        a.objs_ptr, a.count_props_ptr = _addr(objs), _addr(counts)
        a.props_ptr, a.prop_values_ptr = _addr(props), _addr(values)
        kind = "test-only " if flags & uapi.DRM_MODE_ATOMIC_TEST_ONLY else ""
        self._ioctl("MODE_ATOMIC", a, lambda: f"{kind}commit of {total} properties")

    def commit_plane_flip(self, flip: PlaneFlip, fb_id: int, user_data: int) -> None:
        """Commit ``flip`` with ``fb_id`` on its plane, NONBLOCK with a flip event."""
        flip.values[0] = fb_id
        flip.arg.user_data = user_data
        self._ioctl("MODE_ATOMIC", flip.arg, flip.detail)

    def plane_flip_call(self, flip: PlaneFlip, fb_id: int, user_data: int) -> NativeCall | None:
        """:meth:`commit_plane_flip` for another thread to issue (see :meth:`native_call`)."""
        call = self.native_call("MODE_ATOMIC", flip.arg, flip.detail)
        if call is not None:
            flip.values[0] = fb_id
            flip.arg.user_data = user_data
        return call

    def page_flip_call(self, crtc_id: int, fb_id: int, *, flags: int, user_data: int = 0
                       ) -> NativeCall | None:
        """:meth:`page_flip` for another thread to issue (see :meth:`native_call`)."""
        f = uapi.drm_mode_crtc_page_flip(crtc_id, fb_id, flags, 0, user_data)
        return self.native_call("MODE_PAGE_FLIP", f, f"CRTC {crtc_id}, FB {fb_id}")

    def native_call(self, name: str, arg: ctypes.Structure, detail: str = "") -> NativeCall | None:
        """The ioctl ``name`` with ``arg``, for a native thread to issue on the card's fd
        itself (a copy thread flipping the frame it copied), or None where it may not: the
        device closed, or its system calls a test double's. The caller keeps the device
        open until the ioctl was issued, and reports a failure with :meth:`NativeCall.error`.
        """
        if self._closed or not self._sys.native:
            return None
        return NativeCall(self.fd, uapi.IOCTLS[name], arg, name, detail)

    def create_blob(self, data: bytes) -> int:
        buf = ctypes.create_string_buffer(data, len(data))
        b = uapi.drm_mode_create_blob(ctypes.addressof(buf), len(data), 0)
        self._ioctl("MODE_CREATEPROPBLOB", b, f"{len(data)} bytes")
        return int(b.blob_id)

    def destroy_blob(self, blob_id: int) -> None:
        self._ioctl("MODE_DESTROYPROPBLOB", uapi.drm_mode_destroy_blob(blob_id), f"blob {blob_id}")

    # -- events ---------------------------------------------------------------------------

    async def wait_readable(self) -> None:
        """Sleep until an event can be read from the card fd."""
        await trio.lowlevel.wait_readable(self.fd)

    def read_events(self) -> list[DrmEvent]:
        """Events queued on the card fd now ([] if none; the fd must be non-blocking)."""
        try:
            data = os.read(self.fd, _EVENT_READ_SIZE)
        except BlockingIOError:
            return []
        return parse_events(data)


def open_card(path: str | os.PathLike[str], *, syscalls: Syscalls | None = None) -> DrmDevice:
    """Open a card node read-write, close-on-exec and non-blocking (for event reads)."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    return DrmDevice(fd, syscalls=syscalls, path=os.fspath(path))
