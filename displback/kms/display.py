"""A display on real hardware: guest connectors shown on DRM/KMS connectors of a card.

:class:`KmsDisplay` implements :mod:`displback.display.interface` like
:class:`~displback.display.virtual.VirtualDisplay` does, on a :class:`DrmDevice`. Theory of
operation:

* **Opening.** The display opens the configured card (or the first ``/dev/dri/card*`` with a
  connected connector), becomes DRM master, turns on universal planes and — when the driver
  has it and ``atomic`` is not False — atomic mode-setting. Each configured connector name
  (``HDMI-A-1``, ``Virtual-1``) becomes one :class:`KmsOutput` with a CRTC of its own (the one
  already driving it if free) and, when atomic, that CRTC's primary plane. The CRTC's state
  (FB, position, mode, connectors) is saved and set back when the display closes.
* **Mode.** The guest's resolution if the connector offers it (highest refresh, or the one
  closest to ``refresh_hz``), else the connector's preferred mode. A frame of another size is
  centred: by placing the primary plane (atomic, when a TEST_ONLY commit says the driver can
  position it) or by *letterboxing*: its pixels are copied into the middle of a mode-sized
  dumb buffer (two, alternating), black around. Letterboxing copies, so imports that would
  need it are refused (``ImportRefused``) and the backend copies instead.
* **Flips.** Atomic: a NONBLOCK commit with PAGE_FLIP_EVENT (with ALLOW_MODESET and a MODE_ID
  blob when the CRTC is off). Legacy: SETCRTC when off (blocking, run in a thread), else
  PAGE_FLIP with PAGE_FLIP_EVENT. One reader task per display reads the card fd and lands the
  flip whose ``user_data`` token the event carries; ``FlipResult`` holds the kernel's vblank
  sequence and its ``CLOCK_MONOTONIC`` time. A flip whose event does not come within
  ``flip_timeout_s`` lands anyway (logged), so a driver bug cannot stall a guest.
* **Release.** ``RMFB`` of the FB on screen would turn the CRTC off, so releasing it first
  composes its frame into a spare mode-sized dumb buffer and switches to that (a blocking
  commit/SETCRTC); then RMFB and GEM close (dumb: munmap and DESTROY_DUMB).
* **Hot-plug.** Connector status is polled every ``hotplug_poll_s`` without forcing a probe.
  An unplugged output turns its CRTC off; flips then complete on a timer at the mode's rate
  (nothing is shown, the guest keeps running). When it comes back, modes are re-read and the
  frame on screen, if any, is set again.

Blocking ioctls (a legacy modeset on the first flip is the slow one) run in a thread; the
rest return at once. Snapshots read dumb buffers through their mapping and imported ones
through ``dmabuf_importer`` (or ``mmap`` of a dup of the dma-buf fd); a zero-copy frame that
cannot be mapped cannot be snapshotted (:class:`DisplayError` says so).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import itertools
import logging
import math
import mmap
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict, Unpack

import trio

from displback.display.common import (
    MAX_SIZE,
    DisplayBase,
    DumbBufferMixin,
    FramebufferBase,
    OutputBase,
    check_dumb_size,
    check_output_names,
    on_black,
    report_landed,
    size_fits,
)
from displback.display.interface import (
    CopyRunner,
    DisplayError,
    FlipPending,
    FlipResult,
    Framebuffer,
    ImportRefused,
    LandedCallback,
    Mode,
    OutputStats,
    UnsupportedFormat,
)
from displback.display.pixels import RgbImage, copy_frame, frame_end, to_rgb
from displback.display.virtual import DmabufImporter, DmabufMapping
from displback.kms import uapi
from displback.kms.device import (
    Connector,
    DrmDevice,
    DrmError,
    DrmEvent,
    DumbBuffer,
    ModeInfo,
    Plane,
    PropertyValue,
    Resources,
    open_card,
)
from displback.kms.uapi import ClientCap, ObjectType, PlaneType
from displback.protocol.constants import PixelFormat

if TYPE_CHECKING:
    from displback.display.interface import Display, DumbFramebuffer, Output

__all__ = [
    "KmsDisplay",
    "KmsDisplayOptions",
    "KmsDumbFramebuffer",
    "KmsOutputInfo",
    "KmsFramebuffer",
    "KmsOutput",
    "KmsOutputConfig",
    "card_paths",
    "choose_mode",
    "find_card",
]

log = logging.getLogger(__name__)

_FALLBACK_MODE = Mode(1024, 768, 60.0)
_FP16 = 1 << 16  # plane source coordinates are 16.16 fixed point


@dataclass(frozen=True, slots=True)
class KmsOutputConfig:
    """One output: the connector's kernel name and the guest resolution wanted on it."""

    connector: str
    width: int | None = None
    height: int | None = None
    refresh_hz: float | None = None

    def __post_init__(self) -> None:
        if not self.connector:
            raise ValueError("an output needs a connector name such as HDMI-A-1")
        if (self.width is None) != (self.height is None):
            raise ValueError(f"{self.connector}: give both width and height, or neither")
        if (
            self.width is not None
            and self.height is not None
            and not size_fits(self.width, self.height)
        ):
            raise ValueError(f"{self.connector}: bad resolution {self.width}x{self.height}")


def choose_mode(
    modes: Sequence[ModeInfo],
    width: int | None,
    height: int | None,
    refresh_hz: float | None = None,
) -> ModeInfo | None:
    """The mode to scan out: ``width``×``height`` if offered, else the preferred one.

    Among modes of the wanted size, the one closest to ``refresh_hz`` (default: the highest
    rate; the preferred mode wins ties). Interlaced modes are avoided when another fits.
    """
    if not modes:
        return None

    def rank(m: ModeInfo) -> tuple[bool, float, bool]:
        interlaced = bool(m.flags & uapi.DRM_MODE_FLAG_INTERLACE)
        rate = -abs(m.refresh_hz - refresh_hz) if refresh_hz else m.refresh_hz
        return (not interlaced, rate, m.preferred)

    if width is not None and height is not None:
        sized = [m for m in modes if (m.width, m.height) == (width, height)]
        if sized:
            return max(sized, key=rank)
    preferred = [m for m in modes if m.preferred]
    return max(preferred, key=rank) if preferred else modes[0]


def card_paths(pattern: str = "/dev/dri/card*") -> list[str]:
    """Card nodes, in number order (``card10`` after ``card9``)."""

    def number(path: str) -> int:
        digits = path.rsplit("card", 1)[-1]
        return int(digits) if digits.isdigit() else 1 << 30

    return sorted(glob.glob(pattern), key=number)


def find_card(
    names: Sequence[str] = (), open_fn: Callable[[str], DrmDevice] = open_card
) -> DrmDevice:
    """Open the first card with a connected connector (one of ``names``, if given)."""
    tried: list[str] = []
    for path in card_paths():
        try:
            dev = open_fn(path)
        except OSError as exc:
            tried.append(f"{path}: {exc.strerror}")
            continue
        try:
            res = dev.resources()
            for cid in res.connectors:
                conn = dev.connector(cid)
                if conn.connected and (not names or conn.name in names):
                    return dev
            tried.append(
                f"{path}: no connected connector{' named ' if names else ''}{', '.join(names)}"
            )
        except DrmError as exc:
            tried.append(f"{path}: {exc}")
        dev.close()
    raise DisplayError("no usable DRM card: " + ("; ".join(tried) or "no /dev/dri/card*"))


# ---- framebuffers -------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Frame:
    """Pixels to compose or snapshot: ``memory`` with a geometry; None = cannot be read."""

    memory: memoryview | bytearray | None
    offset: int
    pitch: int
    width: int
    height: int
    fourcc: PixelFormat


class KmsFramebuffer(FramebufferBase["KmsOutput"]):
    """A framebuffer of a :class:`KmsOutput`: an imported dma-buf or a dumb buffer."""

    __slots__ = ("_dmabuf_fd", "_fb_id", "_handle", "_mapping")

    def __init__(
        self,
        output: KmsOutput,
        *,
        fb_id: int,
        handle: int,
        width: int,
        height: int,
        fourcc: PixelFormat,
        pitch: int,
        offset: int,
        dmabuf_fd: int | None,
    ) -> None:
        super().__init__(
            output, width=width, height=height, fourcc=fourcc, pitch=pitch, offset=offset
        )
        self._fb_id = fb_id
        self._handle = handle
        self._dmabuf_fd = dmabuf_fd
        self._mapping: DmabufMapping | None = None

    @property
    def zero_copy(self) -> bool:
        return self._dmabuf_fd is not None

    @property
    def fb_id(self) -> int:
        """The KMS framebuffer id (0 once released)."""
        return 0 if self._released else self._fb_id

    def _repr_id(self) -> str:
        return f" FB {self._fb_id}"

    def _frame(self) -> _Frame:
        return _Frame(
            self._memory(), self._offset, self._pitch, self._width, self._height, self._fourcc
        )

    def _memory(self) -> memoryview | None:
        """CPU view of the pixels: the importer's mapping of the dma-buf (None if unmappable)."""
        if self._released or self._dmabuf_fd is None:
            return None
        if self._mapping is None:
            importer = self._output._display.importer
            try:
                self._mapping = (
                    importer(self._dmabuf_fd) if importer else _MmapMapping(self._dmabuf_fd)
                )
            except OSError as exc:
                log.debug("cannot map dma-buf of %r: %s", self, exc)
                return None
        return self._mapping.buffer

    def _drop(self, dev: DrmDevice) -> None:
        """Remove the FB and close the GEM handle; the caller made sure it is not on screen."""
        self._released = True
        mapping, self._mapping = self._mapping, None
        if mapping is not None:
            mapping.close()
        if self._dmabuf_fd is not None:
            os.close(self._dmabuf_fd)
            self._dmabuf_fd = -1  # still zero-copy, but nothing left to map
        _quietly(dev.rm_fb, self._fb_id)
        _quietly(dev.gem_close, self._handle)


class KmsDumbFramebuffer(KmsFramebuffer, DumbBufferMixin):
    """A dumb buffer scanned out by KMS, mapped for the backend to write pixels into."""

    __slots__ = ("_buffer", "_map", "_size")

    def __init__(
        self,
        output: KmsOutput,
        *,
        fb_id: int,
        dumb: DumbBuffer,
        mapped: mmap.mmap,
        width: int,
        height: int,
        fourcc: PixelFormat,
    ) -> None:
        super().__init__(
            output,
            fb_id=fb_id,
            handle=dumb.handle,
            width=width,
            height=height,
            fourcc=fourcc,
            pitch=dumb.pitch,
            offset=0,
            dmabuf_fd=None,
        )
        self._map: mmap.mmap | None = mapped
        self._buffer = memoryview(mapped)
        self._size = dumb.size

    def _memory(self) -> memoryview | None:
        return None if self._released else self._buffer

    def _drop(self, dev: DrmDevice) -> None:
        self._released = True
        self._buffer.release()
        mapped, self._map = self._map, None
        if mapped is not None:
            with contextlib.suppress(BufferError):  # a caller's view keeps it until collected
                mapped.close()
        _quietly(dev.rm_fb, self._fb_id)
        _quietly(dev.destroy_dumb, self._handle)


class _MmapMapping:
    """A read-only CPU mapping of a dma-buf fd (when no importer was given)."""

    def __init__(self, fd: int) -> None:
        size = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        if size <= 0:
            raise OSError(errno.EINVAL, "dma-buf has no size")
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self.buffer = memoryview(self._map)

    def close(self) -> None:
        self.buffer.release()
        with contextlib.suppress(BufferError):
            self._map.close()


def _quietly(fn: Callable[[int], None], arg: int) -> None:
    """Clean-up ioctls: a failure is logged, never raised (the fd's close frees it anyway)."""
    try:
        fn(arg)
    except DrmError as exc:
        log.warning("clean-up failed: %s", exc)


# ---- placement ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Placement:
    """Which part of a frame goes where on the mode: source and CRTC rectangles."""

    src_x: int
    src_y: int
    dst_x: int
    dst_y: int
    width: int
    height: int

    @classmethod
    def centred(cls, fw: int, fh: int, mw: int, mh: int) -> _Placement:
        w, h = min(fw, mw), min(fh, mh)
        return cls((fw - w) // 2, (fh - h) // 2, (mw - w) // 2, (mh - h) // 2, w, h)

    def covers(self, mw: int, mh: int) -> bool:
        return (self.dst_x, self.dst_y, self.width, self.height) == (0, 0, mw, mh)


def _compose(dst: memoryview, dst_pitch: int, mode: Mode, frame: _Frame) -> None:
    """Black ``dst`` (mode-sized, the frame's format), then the frame centred on it."""
    dst[:] = bytes(len(dst))
    if frame.memory is None:
        return
    p = _Placement.centred(frame.width, frame.height, mode.width, mode.height)
    cpp = frame.fourcc.cpp
    copy_frame(
        frame.memory,
        frame.offset + p.src_y * frame.pitch + p.src_x * cpp,
        frame.pitch,
        dst,
        p.dst_y * dst_pitch + p.dst_x * cpp,
        dst_pitch,
        p.width * cpp,
        p.height,
    )


@dataclass(frozen=True, slots=True)
class KmsOutputInfo:
    """A KMS output as ``displback status`` shows it (see docs/operations.md).

    ``other_sizes`` says how a frame not of the mode's size is placed in general;
    ``placement`` how the frame on screen now is (:attr:`KmsOutput.placement`).
    """

    card: str
    driver: str
    commit: str
    crtc: int
    plane: int | None
    connected: bool
    other_sizes: str
    placement: str
    flip_timeouts: int


@dataclass(slots=True, eq=False)
class _Canvas:
    """A mode-sized dumb buffer of ours: letterboxing and kept copies are composed here."""

    fb_id: int
    dumb: DumbBuffer
    mapped: mmap.mmap
    fourcc: PixelFormat
    mode: Mode


@dataclass(slots=True, eq=False)
class _Shown:
    """What an output shows: ``fb`` (None for a kept copy) through KMS FB ``scan_fb_id``."""

    fb: KmsFramebuffer | None
    scan_fb_id: int
    placement: _Placement
    frame: _Frame  # for snapshots: the guest frame, or the canvas holding its copy
    canvas: _Canvas | None


@dataclass(slots=True, eq=False)
class _PendingFlip:
    fb: KmsFramebuffer
    shown: _Shown
    token: int
    submitted: float  # CLOCK_MONOTONIC
    done: trio.Event
    timer_due: float | None = None  # trio time, for flips of an unplugged output
    result: FlipResult | None = None
    on_landed: LandedCallback | None = None  # start_flip's callback


def _monotonic() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


# ---- outputs ------------------------------------------------------------------------------


class KmsOutput(OutputBase[KmsFramebuffer]):
    """One connector of the card with its CRTC (and primary plane); made by KmsDisplay."""

    _FRAMEBUFFER = KmsFramebuffer
    _display: KmsDisplay

    def __init__(
        self,
        display: KmsDisplay,
        config: KmsOutputConfig,
        connector: Connector,
        crtc_id: int,
        plane_id: int | None,
        formats: frozenset[int] | None,
    ) -> None:
        self._display = display
        self._config = config
        self._connector = connector
        self.crtc_id = crtc_id
        self.plane_id = plane_id
        self.formats = formats
        self._connected = connector.connected
        self._modeinfo: ModeInfo | None = None
        self._mode = _FALLBACK_MODE
        self._select_mode(connector)
        self._hw_on = False  # whether our frames are being scanned out (CRTC on by us)
        self._hw_mode: ModeInfo | None = None
        self._hw_placement: _Placement | None = None
        self._mode_blob = 0
        self._shown: _Shown | None = None
        self._pending: _PendingFlip | None = None
        self._live: set[KmsFramebuffer] = set()
        self._canvases: list[_Canvas] = []
        self._reserved: set[_Canvas] = set()  # composed in a worker thread right now
        self._position_ok: dict[tuple[int, int, int], bool] = {}
        self._wake = trio.Event()
        self._opened = _monotonic()
        self._on_since: float | None = None
        self._frames_before = 0
        self._flips_completed = 0
        self._missed_vblanks = 0
        self._last_seq = 0
        self.flip_timeouts = 0  # flips landed on the timeout, the driver sent no event

    # -- state ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._connector.name

    @property
    def modeinfo(self) -> ModeInfo | None:
        """The KMS mode chosen for the connector (None while it offers none)."""
        return self._modeinfo

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def enabled(self) -> bool:
        return self._shown is not None

    @property
    def current_fb(self) -> KmsFramebuffer | None:
        return None if self._shown is None else self._shown.fb

    @property
    def stats(self) -> OutputStats:
        now = _monotonic()
        return OutputStats(
            flips_completed=self._flips_completed,
            frames_shown=self._frames_before + self._frames_since_on(now),
            missed_vblanks=self._missed_vblanks,
            vblanks=math.floor((now - self._opened) / self._period()),
        )

    def __repr__(self) -> str:
        w, h, hz = self._mode
        return f"<KmsOutput {self.name} CRTC {self.crtc_id} {w}x{h}@{hz:g}>"

    @property
    def placement(self) -> str:
        """How the frame on screen is placed: ``full-screen`` (the mode's size), ``plane
        position`` (a centred primary plane), ``letterbox`` (copied onto a black mode-sized
        buffer), ``kept copy`` (a released frame's copy) or ``off``."""
        shown = self._shown
        if shown is None:
            return "off"
        if shown.fb is None:
            return "kept copy"
        if shown.canvas is not None:
            return "letterbox"
        if shown.placement.covers(self._mode.width, self._mode.height):
            return "full-screen"
        return "plane position"

    @property
    def kms_info(self) -> KmsOutputInfo:
        """What ``displback status`` shows of this output beyond any output's fields."""
        d = self._display
        return KmsOutputInfo(
            card=d.card,
            driver=d.driver,
            commit=d.commit_path,
            crtc=self.crtc_id,
            plane=self.plane_id,
            connected=self._connected,
            other_sizes=d.other_sizes,
            placement=self.placement,
            flip_timeouts=self.flip_timeouts,
        )

    def _period(self) -> float:
        return 1.0 / self._mode.refresh_hz

    def _frames_since_on(self, now: float) -> int:
        if self._on_since is None:
            return 0
        return math.floor((now - self._on_since) / self._period()) + 1

    def _select_mode(self, connector: Connector) -> None:
        c = self._config
        chosen = choose_mode(connector.modes, c.width, c.height, c.refresh_hz)
        self._modeinfo = chosen
        if chosen is not None:
            self._mode = Mode(chosen.width, chosen.height, chosen.refresh_hz)
        elif c.width is not None and c.height is not None:
            self._mode = Mode(c.width, c.height, c.refresh_hz or 60.0)

    # -- framebuffers --------------------------------------------------------------------

    def _check_format(self, fourcc: int, refuse: Callable[[str], Exception]) -> PixelFormat:
        try:
            fmt = PixelFormat(fourcc)
        except ValueError:
            raise refuse(f"unknown pixel format 0x{fourcc:08x}") from None
        if self.formats is not None and fmt not in self.formats:
            raise refuse(f"{self.name}'s plane does not scan out {fmt.name}")
        return fmt

    def import_dmabuf(
        self, fd: int, *, width: int, height: int, pitch: int, offset: int, fourcc: int
    ) -> KmsFramebuffer:
        self._check_open()
        d = self._display
        if not d.prime_import:
            raise ImportRefused(f"{d.driver} cannot import dma-bufs (no PRIME import)")
        fmt = self._check_format(fourcc, ImportRefused)
        if not size_fits(width, height):
            raise ImportRefused(f"size {width}x{height} outside 1..{MAX_SIZE}")
        if pitch < width * fmt.cpp or offset < 0:
            raise ImportRefused(f"pitch {pitch} / offset {offset} do not fit a {width}-pixel row")
        if not self._can_place(width, height):
            raise ImportRefused(self._letterbox_reason(width, height))
        dev = d.device
        try:
            handle = dev.prime_fd_to_handle(fd)
        except DrmError as exc:
            raise ImportRefused(f"{d.driver} refused the dma-buf: {exc}") from exc
        try:
            fb_id = dev.add_fb2(
                width, height, fmt, [handle], [pitch], [offset], d.linear_modifiers(1)
            )
        except DrmError as exc:
            _quietly(dev.gem_close, handle)
            raise ImportRefused(f"{d.driver} refused the framebuffer: {exc}") from exc
        try:
            keep = os.dup(fd)
        except OSError as exc:
            _quietly(dev.rm_fb, fb_id)
            _quietly(dev.gem_close, handle)
            raise ImportRefused(f"cannot keep the dma-buf fd: {exc}") from exc
        fb = KmsFramebuffer(
            self,
            fb_id=fb_id,
            handle=handle,
            width=width,
            height=height,
            fourcc=fmt,
            pitch=pitch,
            offset=offset,
            dmabuf_fd=keep,
        )
        if not self._test_position(fb):
            fb._drop(dev)
            raise ImportRefused(self._letterbox_reason(width, height))
        self._live.add(fb)
        return fb

    def create_dumb(self, *, width: int, height: int, fourcc: int) -> KmsDumbFramebuffer:
        self._check_open()
        fmt = self._check_format(fourcc, UnsupportedFormat)
        check_dumb_size(width, height, fmt)
        fb_id, dumb, mapped = self._display._new_dumb(width, height, fmt)
        fb = KmsDumbFramebuffer(
            self, fb_id=fb_id, dumb=dumb, mapped=mapped, width=width, height=height, fourcc=fmt
        )
        self._live.add(fb)
        return fb

    def release(self, fb: Framebuffer) -> None:
        kfb = self._own(fb, allow_released=True)
        if kfb.released:
            return
        dev = self._display.device
        if self._shows(kfb):
            self._swap_kept(kfb, self._kept_copy(kfb))
        self._live.discard(kfb)
        kfb._drop(dev)

    async def keep_frame(self, fb: Framebuffer, run: CopyRunner) -> None:
        kfb = self._own(fb, allow_released=True)
        if kfb.released or not self._shows(kfb):
            return
        frame = kfb._frame()
        if frame.memory is None:
            return  # release shows black: nothing to copy
        mode = self._mode
        canvas = self._spare_canvas(kfb.fourcc)
        self._reserved.add(canvas)  # no flip composes into it while the thread does
        try:
            await run(lambda: _compose(memoryview(canvas.mapped), canvas.dumb.pitch, mode, frame))
        finally:
            self._reserved.discard(canvas)
        if canvas in self._canvases and canvas.mode == self._mode and self._shows(kfb):
            self._swap_kept(kfb, self._canvas_shown(None, canvas))

    def _shows(self, kfb: KmsFramebuffer) -> bool:
        """Whether ``kfb`` is on screen or the target of the flip in flight."""
        return (self._shown is not None and self._shown.fb is kfb) or (
            self._pending is not None and self._pending.fb is kfb
        )

    def _swap_kept(self, kfb: KmsFramebuffer, kept: _Shown) -> None:
        """Show ``kept`` (a copy of ``kfb``'s frame) wherever ``kfb`` is shown or will be."""
        if self._hw_on and self._connected:
            self._show_now(kept)  # off the FB before RMFB, or the CRTC goes dark
        if self._shown is not None and self._shown.fb is kfb:
            self._shown = kept
        if self._pending is not None and self._pending.fb is kfb:
            self._pending.shown = kept

    def _kept_copy(self, fb: KmsFramebuffer) -> _Shown:
        """The frame of ``fb`` composed on a spare canvas (black if it cannot be read)."""
        frame = fb._frame()
        if frame.memory is None:
            log.warning("%s: %r has no CPU mapping; showing black after its release", self, fb)
        canvas = self._spare_canvas(fb.fourcc)
        _compose(memoryview(canvas.mapped), canvas.dumb.pitch, self._mode, frame)
        return self._canvas_shown(None, canvas)

    def _canvas_shown(self, fb: KmsFramebuffer | None, canvas: _Canvas) -> _Shown:
        w, h, _ = self._mode
        frame = _Frame(memoryview(canvas.mapped), 0, canvas.dumb.pitch, w, h, canvas.fourcc)
        return _Shown(fb, canvas.fb_id, _Placement(0, 0, 0, 0, w, h), frame, canvas)

    # -- scanout -------------------------------------------------------------------------

    async def flip(self, fb: Framebuffer) -> FlipResult:
        kfb = self._flippable(fb)
        pending = self._new_pending(kfb, None)
        if self._modeset_in_thread():
            # The first legacy modeset: SETCRTC blocks until it is done, so in a thread.
            self._pending = pending
            try:
                await trio.to_thread.run_sync(self._set_crtc, pending.shown)
            except DrmError as exc:
                raise self._flip_failed(pending, exc) from exc
            self._land(pending, self._last_seq + 1, _monotonic())
        else:
            self._submit(pending)
        # Cancelled here, the flip still lands (the event or the timer lands it).
        return await self._landed(pending)

    def start_flip(self, fb: Framebuffer, on_landed: LandedCallback) -> bool:
        kfb = self._flippable(fb)
        if self._modeset_in_thread():
            return False
        self._submit(self._new_pending(kfb, on_landed))
        return True

    def _new_pending(self, kfb: KmsFramebuffer, on_landed: LandedCallback | None) -> _PendingFlip:
        shown = self._prepare(kfb)
        token = next(self._display._tokens)
        return _PendingFlip(kfb, shown, token, _monotonic(), trio.Event(), on_landed=on_landed)

    def _modeset_in_thread(self) -> bool:
        """Whether the next flip is a legacy modeset (a blocking SETCRTC, run in a thread)."""
        return (
            self._connected
            and self._modeinfo is not None
            and not self._display.atomic
            and not self._hw_on
        )

    def _submit(self, pending: _PendingFlip) -> None:
        """Queue ``pending`` with the driver (or on the timer while unplugged), no waiting."""
        self._pending = pending
        try:
            if not self._connected or self._modeinfo is None:
                pending.timer_due = trio.current_time() + self._period()
            elif self._display.atomic:
                self._commit(pending.shown, event_token=pending.token)
            else:
                self._display.device.page_flip(
                    self.crtc_id,
                    pending.shown.scan_fb_id,
                    flags=uapi.DRM_MODE_PAGE_FLIP_EVENT,
                    user_data=pending.token,
                )
        except DrmError as exc:
            raise self._flip_failed(pending, exc) from exc
        self._display._awaiting[pending.token] = self
        self._wake.set()

    def _flip_failed(self, pending: _PendingFlip, exc: DrmError) -> DisplayError:
        if self._pending is pending:
            self._pending = None
        if exc.errno == errno.EBUSY:
            return FlipPending(f"output {self.name}: {exc}")
        return DisplayError(f"output {self.name}: flip failed: {exc}")

    async def disable(self) -> None:
        await self._check_disable()
        if self._hw_on:
            try:
                await trio.to_thread.run_sync(self._hw_off)
            except DrmError as exc:
                raise DisplayError(f"output {self.name}: disable failed: {exc}") from exc
        self._scanout_off()

    def snapshot(self) -> RgbImage:
        mw, mh, _ = self._mode
        shown = self._shown
        if shown is None:
            return RgbImage(mw, mh, bytes(3 * mw * mh))
        frame, p = shown.frame, shown.placement
        if frame.memory is None:
            raise DisplayError(
                f"output {self.name}: the zero-copy frame on screen has no CPU mapping "
                "(give the display a dmabuf_importer, or use copy mode, to snapshot it)"
            )
        cpp = frame.fourcc.cpp
        image = to_rgb(
            frame.memory,
            width=p.width,
            height=p.height,
            pitch=frame.pitch,
            offset=frame.offset + p.src_y * frame.pitch + p.src_x * cpp,
            fourcc=frame.fourcc,
        )
        if p.covers(mw, mh):
            return image
        return on_black(image.to_pil(), self._mode, (p.dst_x, p.dst_y))

    # -- internals: planning and programming the hardware --------------------------------

    def _letterbox_reason(self, width: int, height: int) -> str:
        w, h, _ = self._mode
        how = "the plane cannot be placed" if self._display.atomic else "legacy KMS"
        return (
            f"a {width}x{height} frame on {self.name}'s {w}x{h} mode needs letterboxing "
            f"({how}), which copies"
        )

    def _can_place(self, width: int, height: int) -> bool:
        """Whether a frame of this size can be scanned out without letterboxing (so far)."""
        w, h, _ = self._mode
        if (width, height) == (w, h) or not self._connected:
            return True
        if not self._display.atomic:
            return False
        return self._position_ok.get((width, height, w * 100000 + h), True)

    def _test_position(self, fb: KmsFramebuffer) -> bool:
        """TEST_ONLY commit of a centred plane for a frame not the mode's size (cached)."""
        w, h, _ = self._mode
        if (fb.width, fb.height) == (w, h) or not self._connected or self._modeinfo is None:
            return True
        key = (fb.width, fb.height, w * 100000 + h)
        if key not in self._position_ok:
            placement = _Placement.centred(fb.width, fb.height, w, h)
            shown = _Shown(fb, fb.fb_id, placement, fb._frame(), None)
            try:
                self._commit(shown, test_only=True)
                self._position_ok[key] = True
            except DrmError as exc:
                log.info("%s: no plane placement for %dx%d: %s", self, fb.width, fb.height, exc)
                self._position_ok[key] = False
        return self._position_ok[key]

    def _prepare(self, fb: KmsFramebuffer) -> _Shown:
        """How ``fb`` will be shown: directly, placed by the plane, or letterboxed (copied)."""
        w, h, _ = self._mode
        placement = _Placement.centred(fb.width, fb.height, w, h)
        direct = (fb.width, fb.height) == (w, h) or (
            self._display.atomic
            and self._connected
            and (placement.covers(w, h) or self._test_position(fb))
        )
        if direct or not self._connected:
            return _Shown(fb, fb.fb_id, placement, fb._frame(), None)
        canvas = self._spare_canvas(fb.fourcc)
        _compose(memoryview(canvas.mapped), canvas.dumb.pitch, self._mode, fb._frame())
        # Snapshots read the canvas: what is on screen, not what the backend writes next.
        return self._canvas_shown(fb, canvas)

    def _spare_canvas(self, fourcc: PixelFormat) -> _Canvas:
        """A canvas of this format and mode that is neither on screen nor about to be."""
        busy = {
            s.canvas
            for s in (self._shown, self._pending.shown if self._pending else None)
            if s is not None and s.canvas is not None
        } | self._reserved
        for canvas in self._canvases:
            if canvas not in busy and canvas.fourcc is fourcc and canvas.mode == self._mode:
                return canvas
        fb_id, dumb, mapped = self._display._new_dumb(self._mode.width, self._mode.height, fourcc)
        canvas = _Canvas(fb_id, dumb, mapped, fourcc, self._mode)
        self._canvases.append(canvas)
        return canvas

    def _plane_rects(self, shown: _Shown) -> dict[str, int]:
        p = shown.placement
        return {
            "FB_ID": shown.scan_fb_id,
            "CRTC_ID": self.crtc_id,
            "SRC_X": p.src_x * _FP16,
            "SRC_Y": p.src_y * _FP16,
            "SRC_W": p.width * _FP16,
            "SRC_H": p.height * _FP16,
            "CRTC_X": p.dst_x,
            "CRTC_Y": p.dst_y,
            "CRTC_W": p.width,
            "CRTC_H": p.height,
        }

    def _commit(
        self, shown: _Shown | None, *, event_token: int = 0, test_only: bool = False
    ) -> None:
        """Atomic commit of ``shown`` (None: off); NONBLOCK with an event when a token is given."""
        d = self._display
        assert self.plane_id is not None
        modeset = shown is None or not self._hw_on or self._hw_mode != self._modeinfo
        changes: dict[int, dict[int, int]] = {}
        blob = 0
        if shown is None:
            changes[self.plane_id] = d.prop_ids(self.plane_id, {"FB_ID": 0, "CRTC_ID": 0})
            changes[self.crtc_id] = d.prop_ids(self.crtc_id, {"ACTIVE": 0, "MODE_ID": 0})
            changes[self._connector.id] = d.prop_ids(self._connector.id, {"CRTC_ID": 0})
        else:
            changes[self.plane_id] = d.prop_ids(self.plane_id, self._plane_rects(shown))
            if modeset:
                assert self._modeinfo is not None
                blob = d.device.create_blob(self._modeinfo.to_bytes())
                changes[self.crtc_id] = d.prop_ids(self.crtc_id, {"ACTIVE": 1, "MODE_ID": blob})
                changes[self._connector.id] = d.prop_ids(
                    self._connector.id, {"CRTC_ID": self.crtc_id}
                )
        flags = uapi.DRM_MODE_ATOMIC_ALLOW_MODESET if modeset else 0
        if test_only:
            flags |= uapi.DRM_MODE_ATOMIC_TEST_ONLY
        elif event_token:
            flags |= uapi.DRM_MODE_ATOMIC_NONBLOCK | uapi.DRM_MODE_PAGE_FLIP_EVENT
        try:
            d.device.atomic_commit(changes, flags=flags, user_data=event_token)
        except DrmError:
            if blob:
                _quietly(d.device.destroy_blob, blob)
            raise
        if test_only:
            if blob:
                _quietly(d.device.destroy_blob, blob)
            return
        if modeset:
            if self._mode_blob:
                _quietly(d.device.destroy_blob, self._mode_blob)
            self._mode_blob = blob
            self._hw_mode = self._modeinfo if shown is not None else None
        self._hw_on = shown is not None

    def _set_crtc(self, shown: _Shown) -> None:
        """Legacy modeset of ``shown`` (full-screen: legacy frames are letterboxed)."""
        self._display.device.set_crtc(
            self.crtc_id,
            shown.scan_fb_id,
            connectors=[self._connector.id],
            mode=self._modeinfo,
        )
        self._hw_on = True
        self._hw_mode = self._modeinfo

    def _show_now(self, shown: _Shown) -> None:
        """Put ``shown`` on screen before returning (blocking; for release and replug)."""
        if self._display.atomic:
            self._commit(shown)
        else:
            self._set_crtc(shown)

    def _hw_off(self) -> None:
        if self._display.atomic:
            self._commit(None)
        else:
            self._display.device.set_crtc(self.crtc_id, 0)
        self._hw_on = False
        self._hw_mode = None

    def _scanout_off(self) -> None:
        now = _monotonic()
        self._frames_before += self._frames_since_on(now)
        self._on_since = None
        self._shown = None

    def _land(self, pending: _PendingFlip, seq: int, timestamp: float) -> None:
        if self._pending is not pending:
            return
        self._pending = None
        self._display._awaiting.pop(pending.token, None)
        late = math.floor((timestamp - pending.submitted) / self._period())
        self._missed_vblanks += max(0, late)
        self._last_seq = seq
        if self._shown is None:
            self._on_since = timestamp
        self._shown = pending.shown
        self._flips_completed += 1
        pending.result = FlipResult(pending.fb, seq, timestamp)
        report_landed(pending)

    def _on_event(self, event: DrmEvent) -> None:
        pending = self._pending
        if pending is not None and pending.token == event.user_data:
            self._land(pending, event.sequence, event.timestamp)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Land timer flips (unplugged output) and flips whose event never comes."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            pending = self._pending
            if pending is None:
                continue
            if pending.timer_due is not None:
                await trio.sleep_until(pending.timer_due)
                self._land(pending, self._last_seq + 1, _monotonic())
                continue
            with trio.move_on_after(self._display.flip_timeout_s):
                await pending.done.wait()
            if self._pending is pending:
                self.flip_timeouts += 1
                log.warning("%s: no flip event after %g s", self, self._display.flip_timeout_s)
                self._land(pending, self._last_seq + 1, _monotonic())

    def _poll(self) -> None:
        """Check the connector's status; turn the CRTC off when unplugged, on when back."""
        dev = self._display.device
        conn = dev.connector(self._connector.id)
        if conn.connected == self._connected:
            return
        if not conn.connected:
            log.info("%s: unplugged; frames are dropped until it comes back", self)
            self._connected = False
            if self._hw_on:
                self._hw_off()
            return
        conn = dev.connector(self._connector.id, probe=True)
        self._connector = conn
        self._connected = True
        old = self._mode
        self._select_mode(conn)
        self._position_ok.clear()
        log.info("%s: plugged in; mode %s", self, self._modeinfo)
        shown = self._shown
        if shown is None or self._pending is not None:
            return
        if self._mode != old or shown.canvas is not None:
            canvas = self._spare_canvas(shown.frame.fourcc)
            _compose(memoryview(canvas.mapped), canvas.dumb.pitch, self._mode, shown.frame)
            shown = self._canvas_shown(shown.fb, canvas)
        self._show_now(shown)
        self._shown = shown

    def _close(self) -> None:
        """Wake a pending flip with DisplayClosed, stop scanout, free every framebuffer."""
        live = self._close_bookkeeping()
        self._hw_on = False
        dev = self._display.device
        for fb in live:
            fb._drop(dev)
        for canvas in self._canvases:
            _quietly(dev.rm_fb, canvas.fb_id)
            with contextlib.suppress(BufferError):
                canvas.mapped.close()
            _quietly(dev.destroy_dumb, canvas.dumb.handle)
        self._canvases.clear()
        if self._mode_blob:
            _quietly(dev.destroy_blob, self._mode_blob)
            self._mode_blob = 0


# ---- the display --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SavedCrtc:
    crtc_id: int
    fb_id: int
    x: int
    y: int
    mode: ModeInfo | None
    connectors: tuple[int, ...]


class KmsDisplayOptions(TypedDict, total=False):
    """The keyword options of :class:`KmsDisplay` (defaults there), passed on by ``open``."""

    atomic: bool | None
    dmabuf_importer: DmabufImporter | None
    flip_timeout_s: float
    hotplug_poll_s: float


class KmsDisplay(DisplayBase[KmsOutput]):
    """Outputs on the connectors of one DRM card; open with :meth:`open`."""

    def __init__(
        self,
        device: DrmDevice,
        outputs: Sequence[KmsOutputConfig],
        *,
        atomic: bool | None = None,
        dmabuf_importer: DmabufImporter | None = None,
        flip_timeout_s: float = 1.0,
        hotplug_poll_s: float = 1.0,
        owns_device: bool = True,
    ) -> None:
        check_output_names([c.connector for c in outputs], "connector")
        self.device = device
        self.importer = dmabuf_importer
        self.flip_timeout_s = flip_timeout_s
        self.hotplug_poll_s = hotplug_poll_s
        self._owns_device = owns_device
        self._closed = False
        self._nursery: trio.Nursery | None = None
        self._tokens = itertools.count(1)
        self._awaiting: dict[int, KmsOutput] = {}
        self._saved: list[_SavedCrtc] = []
        self._props: dict[int, Mapping[str, PropertyValue]] = {}
        self._master = False
        try:
            self._setup(outputs, atomic)
        except BaseException:
            self._teardown()
            raise

    # -- set-up --------------------------------------------------------------------------

    def _setup(self, configs: Sequence[KmsOutputConfig], atomic: bool | None) -> None:
        dev = self.device
        self.driver = dev.version().name
        try:
            dev.set_master()
        except DrmError as exc:
            raise DisplayError(
                f"cannot become DRM master of {dev.path or self.driver} (is a compositor or "
                f"another displback running?): {exc}"
            ) from exc
        self._master = True
        if not dev.has_cap(uapi.Cap.DUMB_BUFFER):
            raise DisplayError(f"{self.driver} has no dumb buffers")
        self.prime_import = bool(dev.has_cap(uapi.Cap.PRIME) & uapi.DRM_PRIME_CAP_IMPORT)
        self.modifiers = bool(dev.has_cap(uapi.Cap.ADDFB2_MODIFIERS))
        dev.set_client_cap(ClientCap.UNIVERSAL_PLANES, 1)
        self.atomic = False
        if atomic is not False:
            try:
                dev.set_client_cap(ClientCap.ATOMIC, 1)
                self.atomic = True
            except DrmError as exc:
                if atomic:
                    raise DisplayError(f"{self.driver} has no atomic mode-setting: {exc}") from exc
        res = dev.resources()
        by_name = {c.name: c for c in (dev.connector(cid, probe=True) for cid in res.connectors)}
        missing = [c.connector for c in configs if c.connector not in by_name]
        if missing:
            raise DisplayError(
                f"{self.driver} has no connector {', '.join(missing)} "
                f"(it has {', '.join(sorted(by_name)) or 'none'})"
            )
        planes = [dev.plane(pid) for pid in dev.plane_ids()]
        taken: set[int] = set()
        self._outputs: dict[str, KmsOutput] = {}
        for config in configs:
            conn = by_name[config.connector]
            crtc_id = self._pick_crtc(res, conn, taken)
            taken.add(crtc_id)
            plane_id, formats = self._primary_plane(res, crtc_id, planes)
            if self.atomic and plane_id is None:
                raise DisplayError(f"{self.driver}: no primary plane for CRTC {crtc_id}")
            self._save_crtc(res, crtc_id)
            output = KmsOutput(self, config, conn, crtc_id, plane_id, formats)
            self._outputs[conn.name] = output
            w, h, hz = output.mode
            log.info(
                "output %s on %s (%s), CRTC %d, mode %dx%d@%g, %s commits; "
                "frames of another size: %s",
                conn.name,
                self.card,
                self.driver,
                crtc_id,
                w,
                h,
                hz,
                self.commit_path,
                self.other_sizes,
            )

    @property
    def card(self) -> str:
        """The card's device path (or its driver's name when opened from an fd)."""
        return self.device.path or self.driver

    @property
    def commit_path(self) -> str:
        """``atomic`` or ``legacy`` (SETCRTC + PAGE_FLIP) mode-setting."""
        return "atomic" if self.atomic else "legacy"

    @property
    def other_sizes(self) -> str:
        """How a guest frame not of the mode's size is placed on this card."""
        if self.atomic:
            return "plane position (centred; letterbox where the driver refuses it)"
        return "letterbox (legacy KMS cannot place a plane; the frame is copied)"

    def _pick_crtc(self, res: Resources, conn: Connector, taken: set[int]) -> int:
        current = 0
        possible = 0
        for eid in conn.encoders:
            enc = self.device.encoder(eid)
            possible |= enc.possible_crtcs
            if eid == conn.encoder_id:
                current = enc.crtc_id
        if current and current not in taken:
            return current
        for index, crtc_id in enumerate(res.crtcs):
            if possible >> index & 1 and crtc_id not in taken:
                return crtc_id
        raise DisplayError(f"{self.driver}: no free CRTC can drive {conn.name}")

    def _primary_plane(
        self, res: Resources, crtc_id: int, planes: Sequence[Plane]
    ) -> tuple[int | None, frozenset[int] | None]:
        index = res.crtcs.index(crtc_id)
        candidates = []
        for plane in planes:
            if not plane.possible_crtcs >> index & 1:
                continue
            kind = self.object_props(plane.id, ObjectType.PLANE).get("type")
            if kind is not None and kind.value == PlaneType.PRIMARY:
                candidates.append(plane)
        if not candidates:
            return None, None
        best = min(candidates, key=lambda p: (p.crtc_id != crtc_id, p.id))
        return best.id, frozenset(best.formats)

    def _save_crtc(self, res: Resources, crtc_id: int) -> None:
        dev = self.device
        crtc = dev.crtc(crtc_id)
        connectors = []
        for cid in res.connectors:
            conn = dev.connector(cid)
            if conn.encoder_id and dev.encoder(conn.encoder_id).crtc_id == crtc_id:
                connectors.append(cid)
        self._saved.append(
            _SavedCrtc(crtc_id, crtc.fb_id, crtc.x, crtc.y, crtc.mode, tuple(connectors))
        )

    def object_props(self, obj_id: int, obj_type: ObjectType) -> Mapping[str, PropertyValue]:
        """Properties of a KMS object by name (ids cached; values as of the first read)."""
        props = self._props.get(obj_id)
        if props is None:
            props = self.device.object_properties(obj_id, obj_type)
            self._props[obj_id] = props
        return props

    def prop_ids(self, obj_id: int, values: Mapping[str, int]) -> dict[int, int]:
        """``{property id: value}`` for an atomic commit, from property names."""
        obj_type = (
            ObjectType.PLANE
            if any(o.plane_id == obj_id for o in self._outputs.values())
            else ObjectType.CRTC
            if any(o.crtc_id == obj_id for o in self._outputs.values())
            else ObjectType.CONNECTOR
        )
        props = self.object_props(obj_id, obj_type)
        try:
            return {props[name].id: value for name, value in values.items()}
        except KeyError as exc:
            raise DrmError(
                "MODE_ATOMIC", errno.EINVAL, f"object {obj_id} has no property {exc.args[0]}"
            ) from None

    def linear_modifiers(self, planes: int) -> list[int] | None:
        return [uapi.DRM_FORMAT_MOD_LINEAR] * planes if self.modifiers else None

    def _new_dumb(
        self, width: int, height: int, fmt: PixelFormat
    ) -> tuple[int, DumbBuffer, mmap.mmap]:
        dev = self.device
        try:
            dumb = dev.create_dumb(width, height, fmt.bpp)
        except DrmError as exc:
            raise DisplayError(f"cannot allocate a {width}x{height} dumb buffer: {exc}") from exc
        try:
            if frame_end(0, dumb.pitch, width * fmt.cpp, height) > dumb.size:
                raise DisplayError(f"{self.driver} returned a dumb buffer too small: {dumb}")
            mapped = dev.mmap_dumb(dumb)
        except (DrmError, OSError) as exc:
            _quietly(dev.destroy_dumb, dumb.handle)
            raise DisplayError(f"cannot map a dumb buffer: {exc}") from exc
        try:
            fb_id = dev.add_fb2(
                width, height, fmt, [dumb.handle], [dumb.pitch], [0], self.linear_modifiers(1)
            )
        except DrmError as exc:
            mapped.close()
            _quietly(dev.destroy_dumb, dumb.handle)
            if exc.errno == errno.EINVAL:
                raise UnsupportedFormat(f"{self.driver} cannot scan out {fmt.name}: {exc}") from exc
            raise DisplayError(f"cannot make a framebuffer: {exc}") from exc
        return fb_id, dumb, mapped

    # -- life ----------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        outputs: Sequence[KmsOutputConfig],
        *,
        card: str | os.PathLike[str] | None = None,
        device: DrmDevice | None = None,
        **options: Unpack[KmsDisplayOptions],
    ) -> AsyncIterator[KmsDisplay]:
        """Open a display on ``device``, on ``card``, or on the first card that fits."""
        if device is not None:
            dev, owns = device, False
        elif card is not None:
            dev, owns = open_card(card), True
        else:
            dev, owns = find_card([c.connector for c in outputs]), True
        display = cls(dev, outputs, owns_device=owns, **options)
        async with display._running() as nursery:
            nursery.start_soon(display._read_events)
            if display.hotplug_poll_s > 0:
                nursery.start_soon(display._poll_hotplug)
            for output in display._outputs.values():
                await nursery.start(output._run)
            yield display

    async def _read_events(self) -> None:
        while True:
            await self.device.wait_readable()
            for event in self.device.read_events():
                if event.flip_complete:
                    output = self._awaiting.get(event.user_data)
                    if output is not None:
                        output._on_event(event)

    async def _poll_hotplug(self) -> None:
        while True:
            await trio.sleep(self.hotplug_poll_s)
            for output in self._outputs.values():
                try:
                    output._poll()
                except (DrmError, DisplayError) as exc:
                    log.warning("%s: hot-plug check failed: %s", output, exc)

    def _shut_down(self) -> None:
        self._restore()
        super()._shut_down()
        self._teardown()

    def _restore(self) -> None:
        """Set every CRTC we touched back as it was (or off, if that fails)."""
        dev = self.device
        for saved in self._saved:
            try:
                if saved.fb_id and saved.mode is not None:
                    dev.set_crtc(
                        saved.crtc_id,
                        saved.fb_id,
                        x=saved.x,
                        y=saved.y,
                        connectors=saved.connectors,
                        mode=saved.mode,
                    )
                else:
                    dev.set_crtc(saved.crtc_id, 0)
            except DrmError as exc:
                log.warning("cannot restore CRTC %d: %s; turning it off", saved.crtc_id, exc)
                with contextlib.suppress(DrmError):
                    dev.set_crtc(saved.crtc_id, 0)

    def _teardown(self) -> None:
        if self._master:
            self._master = False
            with contextlib.suppress(DrmError):
                self.device.drop_master()
        if self._owns_device:
            self.device.close()


if TYPE_CHECKING:

    def _implements_interface(
        display: KmsDisplay, output: KmsOutput, dumb: KmsDumbFramebuffer
    ) -> tuple[Display, Output, DumbFramebuffer]:
        return display, output, dumb
