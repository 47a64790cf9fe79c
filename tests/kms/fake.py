"""A fake DRM kernel for the KMS tests: answers ioctls like a vkms or a bochs card would.

:class:`FakeCard` is a :class:`displback.kms.device.Syscalls`: it decodes each ioctl's ctypes
argument, reads and writes the caller's arrays through their ``*_ptr`` addresses as the
kernel does, and keeps the card's state (objects, properties, GEM handles, FBs, what each CRTC
scans out). Its card fd is the read end of a pipe: flip-complete events are written to the
other end, 32 bytes each, at the next :meth:`FakeCard.vblank` (or at once with
``auto_vblank``). Dumb buffers live in one memfd that ``mmap`` maps at MAP_DUMB's offset;
imported "dma-bufs" are memfds too, so tests can read what a CRTC scans out
(:meth:`FakeCard.scanout_pixels`).

The two cards follow what those drivers report on Linux 6.1 (values as a vkms/bochs probe
shows them; ids are plausible, not sacred):

* :func:`vkms_card`: one CRTC, one encoder, connector ``Virtual-1`` (several modes, 1024x768
  preferred), a primary plane that must cover the CRTC (no positioning, no scaling), atomic,
  PRIME import and export;
* :func:`bochs_card`: legacy only (SET_CLIENT_CAP ATOMIC → EOPNOTSUPP, as a test stand-in),
  no PRIME import (FD_TO_HANDLE → EOPNOTSUPP), XRGB8888/RGB565 only, 64-byte dumb pitch.

Both start with "fbcon" scanning FB 99 at 1024x768, so restoring it at close can be checked.
Recorded ioctls are in :attr:`FakeCard.calls` (short names, in order); the properties of the
last atomic commit in :attr:`FakeCard.committed`. As the kernel does, an atomic commit starts
from the current state and changes only the properties it carries.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from displback.kms import uapi
from displback.kms.device import DrmDevice, ModeInfo
from displback.kms.uapi import ConnectorStatus, ObjectType
from displback.protocol.constants import PixelFormat

PAGE = 4096
FBCON_FB = 99

# DMT timings: (w, h, clock kHz, hss, hse, htotal, vss, vse, vtotal)
_DMT = {
    (1920, 1080): (148500, 2008, 2052, 2200, 1084, 1089, 1125),
    (1280, 1024): (108000, 1328, 1440, 1688, 1025, 1028, 1066),
    (1280, 720): (74250, 1390, 1430, 1650, 725, 730, 750),
    (1024, 768): (65000, 1048, 1184, 1344, 771, 777, 806),
    (800, 600): (40000, 840, 968, 1056, 601, 605, 628),
    (640, 480): (25175, 656, 752, 800, 490, 492, 525),
}


def dmt_mode(width: int, height: int, *, preferred: bool = False) -> ModeInfo:
    clock, hss, hse, ht, vss, vse, vt = _DMT[(width, height)]
    kind = uapi.DRM_MODE_TYPE_DRIVER | (uapi.DRM_MODE_TYPE_PREFERRED if preferred else 0)
    return ModeInfo(
        clock, width, hss, hse, ht, 0, height, vss, vse, vt, 0, 60, 0, kind, f"{width}x{height}"
    )


def _u32_at(addr: int, count: int) -> Any:
    return (ctypes.c_uint32 * count).from_address(addr)


def _u64_at(addr: int, count: int) -> Any:
    return (ctypes.c_uint64 * count).from_address(addr)


class _Fail(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


@dataclass
class Obj:
    """A GEM object: a region of a memfd."""

    fd: int
    offset: int
    size: int
    dumb: bool
    refs: int = 1


@dataclass
class Fb:
    width: int
    height: int
    fourcc: int
    obj: Obj
    pitch: int
    offset: int


@dataclass
class CrtcState:
    fb_id: int = 0
    mode: ModeInfo | None = None
    x: int = 0
    y: int = 0
    # primary plane rectangles (atomic): src in pixels, dst on the CRTC
    src: tuple[int, int, int, int] = (0, 0, 0, 0)
    dst: tuple[int, int, int, int] = (0, 0, 0, 0)
    seq: int = 1000


@dataclass
class ConnState:
    id: int
    type: int
    type_id: int
    encoder_id: int
    modes: list[ModeInfo]
    status: ConnectorStatus = ConnectorStatus.CONNECTED
    crtc_id: int = 0


@dataclass
class Prop:
    id: int
    name: str
    flags: int
    enums: dict[str, int] = field(default_factory=dict)
    values: tuple[int, ...] = ()


class FakeCard:
    """A fake kernel with one card; see the module docstring."""

    #: Its ioctls are Python calls: no native thread may issue one on the card's fd. A test
    #: setting it True gets the outputs' native flips, whose ioctls then reach the pipe that
    #: stands for the card and fail (ENOTTY): the failure path of a thread's flip.
    native = False

    def __init__(
        self,
        *,
        driver: str,
        desc: str,
        atomic: bool,
        prime: int,
        formats: tuple[int, ...],
        dumb_pitch_align: int,
        modes: list[ModeInfo],
        plane_can_position: bool = False,
        pitch_align: int = 1,
        auto_vblank: bool = True,
        dumb_fill: bytes = b"",
    ) -> None:
        self.driver, self.desc = driver, desc
        self.atomic_supported = atomic
        self.prime = prime
        self.formats = formats
        self.dumb_pitch_align = dumb_pitch_align
        self.plane_can_position = plane_can_position
        self.pitch_align = pitch_align
        self.auto_vblank = auto_vblank
        self.dumb_fill = dumb_fill  # a new dumb buffer's bytes (VRAM ones need not be zero)
        self.calls: list[str] = []
        self.committed: list[tuple[int, str]] = []  # (object id, property) of the last commit
        self.failures: dict[str, list[int]] = {}
        self.master = False
        self.master_elsewhere = False
        self.client_caps: dict[int, int] = {}
        self.lock = threading.RLock()
        self.rd, self.wr = os.pipe()
        os.set_blocking(self.rd, False)
        self.mem = os.memfd_create("fake-vram")
        self.mem_used = 0
        self.handles: dict[int, Obj] = {}
        self.next_handle = 1
        self.fbs: dict[int, Fb] = {}
        self.next_fb = 100
        self.blobs: dict[int, bytes] = {}
        self.next_blob = 500
        self.queued: list[tuple[int, int]] = []  # (crtc, user_data) waiting for a vblank
        self.rmfb_of_active = 0
        # objects: plane 31, CRTC 34, encoder 35, connector 36 (as vkms numbers them)
        self.plane_id, self.crtc_id, self.encoder_id = 31, 34, 35
        self.conn = ConnState(36, uapi.ConnectorType.VIRTUAL, 1, 35, modes)
        fbcon_obj = self._alloc(1024 * 4 * 768, dumb=True)
        self.fbs[FBCON_FB] = Fb(1024, 768, PixelFormat.XRGB8888, fbcon_obj, 4096, 0)
        fbcon_mode = next(m for m in modes if (m.width, m.height) == (1024, 768))
        self.crtc = CrtcState(FBCON_FB, fbcon_mode, 0, 0, (0, 0, 1024, 768), (0, 0, 1024, 768))
        self.conn.crtc_id = self.crtc_id
        enum_flags = uapi.DRM_MODE_PROP_ENUM | uapi.DRM_MODE_PROP_IMMUTABLE
        rng = uapi.DRM_MODE_PROP_RANGE | uapi.DRM_MODE_PROP_ATOMIC
        obj = uapi.DRM_MODE_PROP_OBJECT | uapi.DRM_MODE_PROP_ATOMIC
        self.props = {
            p.id: p
            for p in [
                Prop(1, "EDID", uapi.DRM_MODE_PROP_BLOB | uapi.DRM_MODE_PROP_IMMUTABLE),
                Prop(2, "DPMS", uapi.DRM_MODE_PROP_ENUM, {"On": 0, "Standby": 1, "Off": 3}),
                Prop(8, "type", enum_flags, {"Overlay": 0, "Primary": 1, "Cursor": 2}),
                Prop(16, "FB_ID", obj),
                Prop(17, "CRTC_ID", obj),
                Prop(18, "SRC_X", rng, values=(0, 2**32 - 1)),
                Prop(19, "SRC_Y", rng, values=(0, 2**32 - 1)),
                Prop(20, "SRC_W", rng, values=(0, 2**32 - 1)),
                Prop(21, "SRC_H", rng, values=(0, 2**32 - 1)),
                Prop(22, "CRTC_X", uapi.DRM_MODE_PROP_SIGNED_RANGE | uapi.DRM_MODE_PROP_ATOMIC),
                Prop(23, "CRTC_Y", uapi.DRM_MODE_PROP_SIGNED_RANGE | uapi.DRM_MODE_PROP_ATOMIC),
                Prop(24, "CRTC_W", rng, values=(0, 2**31 - 1)),
                Prop(25, "CRTC_H", rng, values=(0, 2**31 - 1)),
                Prop(26, "ACTIVE", rng, values=(0, 1)),
                Prop(27, "MODE_ID", uapi.DRM_MODE_PROP_BLOB | uapi.DRM_MODE_PROP_ATOMIC),
                Prop(28, "CRTC_ID", obj),  # the connector's
            ]
        }
        self.handlers: dict[int, Callable[[Any], None]] = {
            uapi.IOCTLS[name]: getattr(self, "_" + name.lower()) for name in uapi.IOCTLS
        }

    # -- test controls -------------------------------------------------------------------

    def device(self) -> DrmDevice:
        return DrmDevice(self.rd, syscalls=self, owns_fd=False, path=f"/dev/dri/fake-{self.driver}")

    def close(self) -> None:
        for fd in (self.rd, self.wr, self.mem):
            os.close(fd)
        for o in self.handles.values():
            if not o.dumb and o.fd != self.mem:
                os.close(o.fd)

    def fail(self, name: str, code: int, times: int = 1) -> None:
        """Make the next ``times`` calls of ioctl ``name`` fail with ``code``."""
        self.failures.setdefault(name, []).extend([code] * times)

    def unplug(self) -> None:
        self.conn.status = ConnectorStatus.DISCONNECTED

    def plug(self, modes: list[ModeInfo] | None = None) -> None:
        self.conn.status = ConnectorStatus.CONNECTED
        if modes is not None:
            self.conn.modes = modes

    def vblank(self) -> int:
        """One vblank: deliver queued flip events; returns how many."""
        with self.lock:
            queued, self.queued = self.queued, []
            if queued:
                self.crtc.seq += 1
            now = time.clock_gettime(time.CLOCK_MONOTONIC)
            for crtc, user_data in queued:
                sec, usec = int(now), int((now % 1) * 1e6)
                os.write(
                    self.wr,
                    struct.pack(
                        "=IIQIIII",
                        uapi.DRM_EVENT_FLIP_COMPLETE,
                        32,
                        user_data,
                        sec,
                        usec,
                        self.crtc.seq,
                        crtc,
                    ),
                )
            return len(queued)

    def shown_fb(self) -> Fb | None:
        return self.fbs.get(self.crtc.fb_id) if self.crtc.fb_id else None

    def scanout_pixels(self, x: int, y: int) -> bytes:
        """The 4 bytes (XRGB8888) the CRTC shows at mode position ``x, y`` (b"" if black)."""
        fb = self.shown_fb()
        assert fb is not None
        dx, dy, dw, dh = self.crtc.dst
        sx, sy, _, _ = self.crtc.src
        if not (dx <= x < dx + dw and dy <= y < dy + dh):
            return b""
        pos = fb.obj.offset + fb.offset + (sy + y - dy) * fb.pitch + (sx + x - dx) * 4
        return os.pread(fb.obj.fd, 4, pos)

    def gem_objects(self) -> int:
        return len(self.handles)

    # -- Syscalls ------------------------------------------------------------------------

    def ioctl(self, fd: int, request: int, arg: Any) -> None:
        assert fd == self.rd, "ioctl on a foreign fd"
        name = uapi.IOCTL_NAMES[request]
        with self.lock:
            self.calls.append(name)
            pending = self.failures.get(name)
            if pending:
                code = pending.pop(0)
                raise OSError(code, os.strerror(code))
            try:
                self.handlers[request](arg)
            except _Fail as exc:
                raise OSError(exc.code, os.strerror(exc.code)) from None

    def mmap(self, fd: int, length: int, offset: int) -> mmap.mmap:
        assert fd == self.rd
        for o in self.handles.values():
            if o.dumb and o.offset == offset:
                assert length <= o.size
                return mmap.mmap(self.mem, length, offset=offset)
        raise OSError(errno.EINVAL, "no dumb buffer at that offset")

    # -- helpers -------------------------------------------------------------------------

    def _alloc(self, size: int, *, dumb: bool) -> Obj:
        size = -(-size // PAGE) * PAGE
        offset = self.mem_used
        self.mem_used += size
        os.ftruncate(self.mem, self.mem_used)
        return Obj(self.mem, offset, size, dumb)

    def _need_master(self) -> None:
        if not self.master:
            raise _Fail(errno.EACCES)

    def _obj_props(self, obj_id: int) -> list[tuple[int, int]]:
        c = self.crtc
        if obj_id == self.plane_id:
            sx, sy, sw, sh = c.src
            dx, dy, dw, dh = c.dst
            on = c.fb_id != 0
            return [
                (8, 1),
                (16, c.fb_id),
                (17, self.crtc_id if on else 0),
                (18, sx << 16),
                (19, sy << 16),
                (20, sw << 16),
                (21, sh << 16),
                (22, dx),
                (23, dy),
                (24, dw),
                (25, dh),
            ]
        if obj_id == self.crtc_id:
            return [(26, int(c.mode is not None)), (27, 0)]
        if obj_id == self.conn.id:
            return [(1, 0), (2, 0), (28, self.conn.crtc_id)]
        raise _Fail(errno.ENOENT)

    # -- ioctls (names match uapi.IOCTLS, lower-cased) -----------------------------------

    def _version(self, v: uapi.drm_version) -> None:
        v.version_major, v.version_minor, v.version_patchlevel = 1, 0, 0
        for attr, text in (("name", self.driver), ("date", "20180514"), ("desc", self.desc)):
            data = text.encode()
            room = getattr(v, attr + "_len")
            addr = getattr(v, attr)
            if addr and room:
                ctypes.memmove(addr, data, min(room, len(data)))
            setattr(v, attr + "_len", len(data))

    def _get_cap(self, cap: uapi.drm_get_cap) -> None:
        values = {
            uapi.Cap.DUMB_BUFFER: 1,
            uapi.Cap.PRIME: self.prime,
            uapi.Cap.TIMESTAMP_MONOTONIC: 1,
            uapi.Cap.ADDFB2_MODIFIERS: int(self.atomic_supported),
            uapi.Cap.CRTC_IN_VBLANK_EVENT: 1,
        }
        if cap.capability not in values:
            raise _Fail(errno.EINVAL)
        cap.value = values[uapi.Cap(cap.capability)]

    def _set_client_cap(self, cap: uapi.drm_set_client_cap) -> None:
        if cap.capability == uapi.ClientCap.ATOMIC and not self.atomic_supported:
            raise _Fail(errno.EOPNOTSUPP)
        self.client_caps[cap.capability] = cap.value

    def _set_master(self, _: None) -> None:
        if self.master_elsewhere:
            raise _Fail(errno.EBUSY)
        self.master = True

    def _drop_master(self, _: None) -> None:
        self.master = False

    def _gem_close(self, g: uapi.drm_gem_close) -> None:
        obj = self.handles.pop(g.handle, None)
        if obj is None:
            raise _Fail(errno.EINVAL)
        if not obj.dumb:
            os.close(obj.fd)

    def _prime_handle_to_fd(self, p: uapi.drm_prime_handle) -> None:
        if not self.prime & uapi.DRM_PRIME_CAP_EXPORT:
            raise _Fail(errno.EOPNOTSUPP)
        raise _Fail(errno.ENOSYS)  # not needed by the display

    def _prime_fd_to_handle(self, p: uapi.drm_prime_handle) -> None:
        if not self.prime & uapi.DRM_PRIME_CAP_IMPORT:
            raise _Fail(errno.EOPNOTSUPP)
        try:
            size = os.fstat(p.fd).st_size
            dup = os.dup(p.fd)
        except OSError:
            raise _Fail(errno.EBADF) from None
        handle = self.next_handle
        self.next_handle += 1
        self.handles[handle] = Obj(dup, 0, size, dumb=False)
        p.handle = handle

    def _mode_getresources(self, r: uapi.drm_mode_card_res) -> None:
        lists = [list(self.fbs), [self.crtc_id], [self.conn.id], [self.encoder_id]]
        names = ["fb", "crtc", "connector", "encoder"]
        for name, ids in zip(names, lists, strict=True):
            count_attr = f"count_{name}s"
            ptr = getattr(r, f"{name}_id_ptr")
            if getattr(r, count_attr) >= len(ids) and ids and ptr:
                _u32_at(ptr, len(ids))[:] = ids
            setattr(r, count_attr, len(ids))
        r.min_width, r.max_width, r.min_height, r.max_height = 1, 8192, 1, 8192

    def _mode_getcrtc(self, c: uapi.drm_mode_crtc) -> None:
        if c.crtc_id != self.crtc_id:
            raise _Fail(errno.ENOENT)
        c.fb_id, c.x, c.y, c.gamma_size = self.crtc.fb_id, self.crtc.x, self.crtc.y, 256
        c.mode_valid = int(self.crtc.mode is not None)
        if self.crtc.mode is not None:
            c.mode = self.crtc.mode.to_struct()

    def _mode_setcrtc(self, c: uapi.drm_mode_crtc) -> None:
        self._need_master()
        if c.crtc_id != self.crtc_id:
            raise _Fail(errno.ENOENT)
        if not c.fb_id:
            self.crtc.fb_id, self.crtc.mode = 0, None
            self.conn.crtc_id = 0
            return
        fb = self.fbs.get(c.fb_id)
        if fb is None or not c.mode_valid:
            raise _Fail(errno.EINVAL)
        mode = ModeInfo.from_struct(c.mode)
        if c.x + mode.width > fb.width or c.y + mode.height > fb.height:
            raise _Fail(errno.ENOSPC)
        conns = list(_u32_at(c.set_connectors_ptr, c.count_connectors))
        if conns != [self.conn.id]:
            raise _Fail(errno.EINVAL)
        self.crtc.fb_id, self.crtc.mode, self.crtc.x, self.crtc.y = c.fb_id, mode, c.x, c.y
        self.crtc.src = (c.x, c.y, mode.width, mode.height)
        self.crtc.dst = (0, 0, mode.width, mode.height)
        self.conn.crtc_id = self.crtc_id

    def _mode_getencoder(self, e: uapi.drm_mode_get_encoder) -> None:
        if e.encoder_id != self.encoder_id:
            raise _Fail(errno.ENOENT)
        e.encoder_type = uapi.EncoderType.VIRTUAL
        e.crtc_id = self.conn.crtc_id
        e.possible_crtcs, e.possible_clones = 1, 1

    def _mode_getconnector(self, c: uapi.drm_mode_get_connector) -> None:
        if c.connector_id != self.conn.id:
            raise _Fail(errno.ENOENT)
        conn = self.conn
        modes = conn.modes if conn.status == ConnectorStatus.CONNECTED else []
        props = self._obj_props(conn.id)
        if c.count_modes >= len(modes) and modes:
            arr = (uapi.drm_mode_modeinfo * len(modes)).from_address(c.modes_ptr)
            for i, m in enumerate(modes):
                arr[i] = m.to_struct()
        if c.count_props >= len(props):
            _u32_at(c.props_ptr, len(props))[:] = [p for p, _ in props]
            _u64_at(c.prop_values_ptr, len(props))[:] = [v for _, v in props]
        if c.count_encoders >= 1:
            _u32_at(c.encoders_ptr, 1)[0] = self.encoder_id
        c.count_modes, c.count_props, c.count_encoders = len(modes), len(props), 1
        c.encoder_id = self.encoder_id if conn.crtc_id else 0
        c.connector_type, c.connector_type_id = conn.type, conn.type_id
        c.connection = conn.status
        c.mm_width, c.mm_height = (0, 0)

    def _mode_getproperty(self, p: uapi.drm_mode_get_property) -> None:
        prop = self.props.get(p.prop_id)
        if prop is None:
            raise _Fail(errno.ENOENT)
        p.name, p.flags = prop.name.encode(), prop.flags
        if prop.enums:
            if p.count_enum_blobs >= len(prop.enums):
                arr = (uapi.drm_mode_property_enum * len(prop.enums)).from_address(p.enum_blob_ptr)
                for i, (name, value) in enumerate(prop.enums.items()):
                    arr[i] = uapi.drm_mode_property_enum(value, name.encode())
            if p.count_values >= len(prop.enums):
                _u64_at(p.values_ptr, len(prop.enums))[:] = list(prop.enums.values())
            p.count_enum_blobs = p.count_values = len(prop.enums)
        else:
            if p.count_values >= len(prop.values) and prop.values:
                _u64_at(p.values_ptr, len(prop.values))[:] = list(prop.values)
            p.count_values, p.count_enum_blobs = len(prop.values), 0

    def _mode_rmfb(self, fb_id: ctypes.c_uint32) -> None:
        self._need_master()
        fb = self.fbs.pop(fb_id.value, None)
        if fb is None:
            raise _Fail(errno.ENOENT)
        fb.obj.refs -= 1
        if self.crtc.fb_id == fb_id.value:
            self.rmfb_of_active += 1  # the kernel turns the CRTC off
            self.crtc.fb_id, self.crtc.mode = 0, None

    def _mode_page_flip(self, f: uapi.drm_mode_crtc_page_flip) -> None:
        self._need_master()
        if f.crtc_id != self.crtc_id or self.crtc.mode is None or not self.crtc.fb_id:
            raise _Fail(errno.EINVAL)
        fb = self.fbs.get(f.fb_id)
        if fb is None:
            raise _Fail(errno.ENOENT)
        if any(c == self.crtc_id for c, _ in self.queued):
            raise _Fail(errno.EBUSY)
        mode = self.crtc.mode
        if fb.width < mode.width or fb.height < mode.height:
            raise _Fail(errno.ENOSPC)
        self.crtc.fb_id = f.fb_id
        if f.flags & uapi.DRM_MODE_PAGE_FLIP_EVENT:
            self._queue_event(f.user_data)

    def _queue_event(self, user_data: int) -> None:
        self.queued.append((self.crtc_id, user_data))
        if self.auto_vblank:
            self.vblank()

    def _mode_create_dumb(self, d: uapi.drm_mode_create_dumb) -> None:
        if not d.width or not d.height or d.bpp not in (16, 24, 32):
            raise _Fail(errno.EINVAL)
        align = self.dumb_pitch_align
        d.pitch = -(-(d.width * d.bpp // 8) // align) * align
        obj = self._alloc(d.pitch * d.height, dumb=True)
        if self.dumb_fill:
            os.pwrite(self.mem, self.dumb_fill * obj.size, obj.offset)
        d.size = obj.size
        d.handle = self.next_handle
        self.handles[self.next_handle] = obj
        self.next_handle += 1

    def _mode_map_dumb(self, m: uapi.drm_mode_map_dumb) -> None:
        obj = self.handles.get(m.handle)
        if obj is None or not obj.dumb:
            raise _Fail(errno.ENOENT)
        m.offset = obj.offset

    def _mode_destroy_dumb(self, d: uapi.drm_mode_destroy_dumb) -> None:
        if self.handles.pop(d.handle, None) is None:
            raise _Fail(errno.EINVAL)

    def _mode_getplaneresources(self, r: uapi.drm_mode_get_plane_res) -> None:
        if r.count_planes >= 1:
            _u32_at(r.plane_id_ptr, 1)[0] = self.plane_id
        r.count_planes = 1

    def _mode_getplane(self, p: uapi.drm_mode_get_plane) -> None:
        if p.plane_id != self.plane_id:
            raise _Fail(errno.ENOENT)
        if p.count_format_types >= len(self.formats):
            _u32_at(p.format_type_ptr, len(self.formats))[:] = list(self.formats)
        p.count_format_types = len(self.formats)
        p.crtc_id = self.crtc_id if self.crtc.fb_id else 0
        p.fb_id, p.possible_crtcs, p.gamma_size = self.crtc.fb_id, 1, 0

    def _mode_addfb2(self, c: uapi.drm_mode_fb_cmd2) -> None:
        if c.pixel_format not in self.formats:
            raise _Fail(errno.EINVAL)
        if c.flags & uapi.DRM_MODE_FB_MODIFIERS and not self.atomic_supported:
            raise _Fail(errno.EINVAL)
        obj = self.handles.get(c.handles[0])
        if obj is None:
            raise _Fail(errno.ENOENT)
        cpp = PixelFormat(c.pixel_format).cpp
        pitch, offset = c.pitches[0], c.offsets[0]
        if pitch < c.width * cpp or pitch % self.pitch_align:
            raise _Fail(errno.EINVAL)
        if offset + pitch * (c.height - 1) + c.width * cpp > obj.size:
            raise _Fail(errno.EINVAL)
        obj.refs += 1
        c.fb_id = self.next_fb
        self.fbs[self.next_fb] = Fb(c.width, c.height, c.pixel_format, obj, pitch, offset)
        self.next_fb += 1

    def _mode_obj_getproperties(self, o: uapi.drm_mode_obj_get_properties) -> None:
        expected = {
            self.plane_id: ObjectType.PLANE,
            self.crtc_id: ObjectType.CRTC,
            self.conn.id: ObjectType.CONNECTOR,
        }
        if expected.get(o.obj_id) != o.obj_type:
            raise _Fail(errno.ENOENT)
        props = self._obj_props(o.obj_id)
        if o.count_props >= len(props):
            _u32_at(o.props_ptr, len(props))[:] = [p for p, _ in props]
            _u64_at(o.prop_values_ptr, len(props))[:] = [v for _, v in props]
        o.count_props = len(props)

    def _mode_atomic(self, a: uapi.drm_mode_atomic) -> None:
        if not self.client_caps.get(uapi.ClientCap.ATOMIC):
            raise _Fail(errno.EOPNOTSUPP)
        self._need_master()
        objs = list(_u32_at(a.objs_ptr, a.count_objs))
        counts = list(_u32_at(a.count_props_ptr, a.count_objs))
        total = sum(counts)
        props = list(_u32_at(a.props_ptr, total))
        values = list(_u64_at(a.prop_values_ptr, total))
        state: dict[str, Any] = {
            "FB_ID": self.crtc.fb_id,
            "CRTC_ID": self.crtc_id if self.crtc.fb_id else 0,
            "ACTIVE": int(self.crtc.mode is not None),
            "MODE": self.crtc.mode,
            "CONN_CRTC": self.conn.crtc_id,
            "SRC": self.crtc.src,
            "DST": self.crtc.dst,
        }
        src, dst = list(self.crtc.src), list(self.crtc.dst)
        self.committed = [
            (obj, self.props[props[sum(counts[:n]) + k]].name)
            for n, obj in enumerate(objs)
            for k in range(counts[n])
        ]
        i = 0
        modeset = False
        for obj, n in zip(objs, counts, strict=True):
            for _ in range(n):
                prop, value = self.props[props[i]].name, values[i]
                i += 1
                if obj == self.plane_id:
                    if prop in ("FB_ID", "CRTC_ID"):
                        state[prop] = value
                    elif prop.startswith("SRC_"):
                        src["XYWH".index(prop[-1])] = value >> 16
                    elif prop.startswith("CRTC_"):
                        dst["XYWH".index(prop[-1])] = value
                    else:
                        raise _Fail(errno.EINVAL)
                elif obj == self.crtc_id and prop == "ACTIVE":
                    modeset |= value != state["ACTIVE"]
                    state["ACTIVE"] = value
                elif obj == self.crtc_id and prop == "MODE_ID":
                    mode = None
                    if value:
                        blob = self.blobs.get(value)
                        if blob is None:
                            raise _Fail(errno.EINVAL)
                        mode = ModeInfo.from_struct(uapi.drm_mode_modeinfo.from_buffer_copy(blob))
                    modeset |= mode != state["MODE"]
                    state["MODE"] = mode
                elif obj == self.conn.id and prop == "CRTC_ID":
                    modeset |= value != state["CONN_CRTC"]
                    state["CONN_CRTC"] = value
                else:
                    raise _Fail(errno.EINVAL)
        if modeset and not a.flags & uapi.DRM_MODE_ATOMIC_ALLOW_MODESET:
            raise _Fail(errno.EINVAL)
        active, mode = state["ACTIVE"], state["MODE"]
        if bool(state["FB_ID"]) != bool(state["CRTC_ID"]):
            raise _Fail(errno.EINVAL)
        if active and (mode is None or not state["FB_ID"] or not state["CONN_CRTC"]):
            raise _Fail(errno.EINVAL)
        if state["FB_ID"]:
            fb = self.fbs.get(state["FB_ID"])
            if fb is None or not active:
                raise _Fail(errno.EINVAL)
            assert isinstance(mode, ModeInfo)
            if src[2:] != dst[2:]:
                raise _Fail(errno.ERANGE)  # no scaling
            if src[0] + src[2] > fb.width or src[1] + src[3] > fb.height:
                raise _Fail(errno.ENOSPC)
            covers = dst == [0, 0, mode.width, mode.height]
            if not covers and not self.plane_can_position:
                raise _Fail(errno.EINVAL)
            if dst[0] + dst[2] > mode.width or dst[1] + dst[3] > mode.height:
                raise _Fail(errno.EINVAL)
        event = a.flags & uapi.DRM_MODE_PAGE_FLIP_EVENT
        if event and not active:
            raise _Fail(errno.EINVAL)
        if a.flags & uapi.DRM_MODE_ATOMIC_NONBLOCK and self.queued:
            raise _Fail(errno.EBUSY)
        if a.flags & uapi.DRM_MODE_ATOMIC_TEST_ONLY:
            return
        self.crtc.fb_id = state["FB_ID"] if active else 0
        self.crtc.mode = mode if active else None
        self.crtc.src = (src[0], src[1], src[2], src[3])
        self.crtc.dst = (dst[0], dst[1], dst[2], dst[3])
        self.conn.crtc_id = state["CONN_CRTC"]
        if event:
            self._queue_event(a.user_data)

    def _mode_createpropblob(self, b: uapi.drm_mode_create_blob) -> None:
        blob_id = self.next_blob
        self.next_blob += 1
        self.blobs[blob_id] = ctypes.string_at(b.data, b.length)
        b.blob_id = blob_id

    def _mode_destroypropblob(self, b: uapi.drm_mode_destroy_blob) -> None:
        if self.blobs.pop(b.blob_id, None) is None:
            raise _Fail(errno.EPERM)


VKMS_MODES = [
    dmt_mode(1920, 1080),
    dmt_mode(1280, 1024),
    dmt_mode(1280, 720),
    dmt_mode(1024, 768, preferred=True),
    dmt_mode(800, 600),
    dmt_mode(640, 480),
]

_VKMS_FORMATS = (PixelFormat.XRGB8888, PixelFormat.ARGB8888)
_BOCHS_FORMATS = (PixelFormat.XRGB8888, PixelFormat.RGB565)


def vkms_card(**options: Any) -> FakeCard:
    params: dict[str, Any] = dict(
        driver="vkms",
        desc="Virtual Kernel Mode Setting",
        atomic=True,
        prime=uapi.DRM_PRIME_CAP_IMPORT | uapi.DRM_PRIME_CAP_EXPORT,
        formats=_VKMS_FORMATS,
        dumb_pitch_align=1,
        modes=list(VKMS_MODES),
    )
    params.update(options)
    return FakeCard(**params)


def bochs_card(**options: Any) -> FakeCard:
    params: dict[str, Any] = dict(
        driver="bochs-drm",
        desc="bochs dispi vga interface (qemu stdvga)",
        atomic=False,
        prime=0,
        formats=_BOCHS_FORMATS,
        dumb_pitch_align=64,
        modes=[dmt_mode(1024, 768, preferred=True), dmt_mode(800, 600), dmt_mode(640, 480)],
    )
    params.update(options)
    return FakeCard(**params)
