"""One KMS output: a guest connector's frames on one card connector, its CRTC and plane.

:class:`KmsOutput` implements :class:`~displback.display.interface.Output`. It decides *what*
is on screen — the guest's framebuffer placed by the plane, or a letterbox canvas, or a kept
copy after a release — and hands it to its :class:`~displback.kms.commit.Committer`, which
knows *how* on its KMS path. It lands a flip when the display's event reader passes it the
flip event (or in its watchdog task: unplugged, or the event never came), and follows
hot-plug when the display polls it. A flip is the hot path (under emulation every Python call
and trio task step counts, issue 12): how a framebuffer is shown is worked out once per
framebuffer and mode, and the watchdog is not woken by flips that land in time. A plain
flip to a frame a native copy thread is filling is handed to that thread as one ioctl
(:meth:`KmsOutput.native_flip`), so the copy's end wakes no one.

May touch: :mod:`displback.kms.commit` (never the ioctls of a commit itself),
:mod:`displback.kms.framebuffers`, :mod:`displback.kms.letterbox`, :mod:`displback.kms.modes`,
:mod:`displback.display`.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from displback.display.common import (
    MAX_SIZE,
    OutputBase,
    check_dumb_size,
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
    NativeFlip,
    OutputStats,
    UnsupportedFormat,
)
from displback.display.pixels import RgbImage, to_rgb
from displback.kms.commit import Committer
from displback.kms.device import DrmConnector, DrmError, DrmEvent, ModeInfo, NativeCall
from displback.kms.framebuffers import (
    FramePixels,
    KmsDumbFramebuffer,
    KmsFramebuffer,
    quietly,
)
from displback.kms.letterbox import Canvas, CanvasPool, Placement, compose
from displback.kms.modes import FALLBACK_MODE, choose_mode
from displback.kms.uapi import ConnectorStatus
from displback.protocol.constants import PixelFormat

if TYPE_CHECKING:
    from displback.kms.display import KmsDisplay, KmsOutputConfig

__all__ = ["KmsOutput", "KmsOutputInfo"]

log = logging.getLogger(__name__)


def _monotonic() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


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
    native_flips: int


@dataclass(slots=True, eq=False)
class _Shown:
    """What an output shows: ``fb`` (None for a kept copy) through KMS FB ``scan_fb_id``."""

    fb: KmsFramebuffer | None
    scan_fb_id: int
    placement: Placement
    canvas: Canvas | None

    @property
    def frame(self) -> FramePixels:
        """For snapshots and recomposing: the canvas holding a copy, else the guest frame
        (read when needed: an imported frame is mapped for the CPU only then)."""
        if self.canvas is not None:
            return self.canvas.pixels()
        assert self.fb is not None
        return self.fb.pixels()


@dataclass(slots=True, eq=False)
class _FlipInFlight:
    """A flip given to the committer: landed by its event, its timer or the timeout."""

    fb: KmsFramebuffer
    shown: _Shown
    token: int
    submitted: float  # CLOCK_MONOTONIC
    done: trio.Event
    on_timer: bool = False  # an unplugged output's flip: landed at ``deadline``, no event
    deadline: float | None = None  # trio time the watchdog lands it by (set when it looks)
    result: FlipResult | None = None
    on_landed: LandedCallback | None = None  # start_flip's callback
    native: NativeFlip | None = None  # its ioctl is a native thread's (native_flip)


class KmsOutput(OutputBase[KmsFramebuffer]):
    """One connector of the card with its CRTC (and primary plane); made by KmsDisplay."""

    _FRAMEBUFFER = KmsFramebuffer
    _display: KmsDisplay

    def __init__(
        self,
        display: KmsDisplay,
        config: KmsOutputConfig,
        connector: DrmConnector,
        committer: Committer,
        plane_id: int | None,
        formats: frozenset[int] | None,
    ) -> None:
        self._display = display
        self._config = config
        self._connector = connector
        self._committer = committer
        self.crtc_id = committer.crtc_id
        self.plane_id = plane_id
        self.formats = formats
        self._connected = connector.connected
        self._modeinfo: ModeInfo | None = None
        self._mode = FALLBACK_MODE
        self._select_mode(connector)
        self._showing: _Shown | None = None
        self._pending: _FlipInFlight | None = None
        self._live: set[KmsFramebuffer] = set()
        self._canvases = CanvasPool(display.new_dumb)
        self._position_ok: dict[tuple[int, int, int], bool] = {}
        self._direct: dict[KmsFramebuffer, _Shown] = {}
        """How each framebuffer is shown without a copy, for the current mode and plug state."""
        self._wake = trio.Event()
        self._watchdog_idle = True  # no deadline to wake at: a new flip must kick it
        self._opened = _monotonic()
        self._on_since: float | None = None
        self._last_seq = 0
        self.flip_timeouts = 0  # flips landed on the timeout, the driver sent no event
        self.native_flips = 0  # flips a copy thread issued after its copy, landed

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
    def stats(self) -> OutputStats:
        now = _monotonic()
        return self._stats(
            self._frames_since_on(now), math.floor((now - self._opened) / self._period())
        )

    def __repr__(self) -> str:
        w, h, hz = self._mode
        return f"<KmsOutput {self.name} CRTC {self.crtc_id} {w}x{h}@{hz:g}>"

    @property
    def placement(self) -> str:
        """How the frame on screen is placed: ``full-screen`` (the mode's size), ``plane
        position`` (a centred primary plane), ``letterbox`` (copied onto a black mode-sized
        buffer), ``kept copy`` (a released frame's copy) or ``off``."""
        shown = self._showing
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
            commit=self._committer.path,
            crtc=self.crtc_id,
            plane=self.plane_id,
            connected=self._connected,
            other_sizes=self._committer.other_sizes,
            placement=self.placement,
            flip_timeouts=self.flip_timeouts,
            native_flips=self.native_flips,
        )

    def _period(self) -> float:
        return 1.0 / self._mode.refresh_hz

    def _frames_since_on(self, now: float) -> int:
        if self._on_since is None:
            return 0
        return math.floor((now - self._on_since) / self._period()) + 1

    def _select_mode(self, connector: DrmConnector) -> None:
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
            quietly(dev.gem_close, handle)
            raise ImportRefused(f"{d.driver} refused the framebuffer: {exc}") from exc
        try:
            keep = os.dup(fd)
        except OSError as exc:
            quietly(dev.rm_fb, fb_id)
            quietly(dev.gem_close, handle)
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
            fb.drop(dev)
            raise ImportRefused(self._letterbox_reason(width, height))
        self._live.add(fb)
        return fb

    def create_dumb(self, *, width: int, height: int, fourcc: int) -> KmsDumbFramebuffer:
        self._check_open()
        fmt = self._check_format(fourcc, UnsupportedFormat)
        check_dumb_size(width, height, fmt)
        alloc = self._display.new_dumb(width, height, fmt)
        fb = KmsDumbFramebuffer(
            self,
            fb_id=alloc.fb_id,
            dumb=alloc.dumb,
            mapped=alloc.mapped,
            width=width,
            height=height,
            fourcc=fmt,
        )
        self._live.add(fb)
        return fb

    def release(self, fb: Framebuffer) -> None:
        kfb = self._own(fb, allow_released=True)
        if kfb.released:
            return
        if self._shows(kfb):
            self._swap_kept(kfb, self._kept_copy(kfb))
        self._live.discard(kfb)
        self._direct.pop(kfb, None)
        kfb.drop(self._display.device)

    async def keep_frame(self, fb: Framebuffer, run: CopyRunner) -> None:
        kfb = self._own(fb, allow_released=True)
        if kfb.released or not self._shows(kfb):
            return
        frame = kfb.pixels()
        if frame.memory is None:
            return  # release shows black: nothing to copy
        canvas = self._spare_canvas(kfb.fourcc)
        self._canvases.reserved.add(canvas)  # no flip composes into it while the thread does
        try:
            await run(lambda: compose(canvas, frame))
        finally:
            self._canvases.reserved.discard(canvas)
        if canvas in self._canvases and canvas.mode == self._mode and self._shows(kfb):
            self._swap_kept(kfb, self._canvas_shown(None, canvas))

    def _shows(self, kfb: KmsFramebuffer) -> bool:
        """Whether ``kfb`` is on screen or the target of the flip in flight."""
        return (self._showing is not None and self._showing.fb is kfb) or (
            self._pending is not None and self._pending.fb is kfb
        )

    def _swap_kept(self, kfb: KmsFramebuffer, kept: _Shown) -> None:
        """Show ``kept`` (a copy of ``kfb``'s frame) wherever ``kfb`` is shown or will be."""
        if self._committer.on and self._connected:
            self._show_now(kept)  # off the FB before RMFB, or the CRTC goes dark
        if self._showing is not None and self._showing.fb is kfb:
            self._showing = kept
        if self._pending is not None and self._pending.fb is kfb:
            self._pending.shown = kept

    def _kept_copy(self, fb: KmsFramebuffer) -> _Shown:
        """The frame of ``fb`` composed on a spare canvas (black if it cannot be read)."""
        frame = fb.pixels()
        if frame.memory is None:
            log.warning("%s: %r has no CPU mapping; showing black after its release", self, fb)
        canvas = self._spare_canvas(fb.fourcc)
        compose(canvas, frame)
        return self._canvas_shown(None, canvas)

    def _canvas_shown(self, fb: KmsFramebuffer | None, canvas: Canvas) -> _Shown:
        return _Shown(fb, canvas.fb_id, Placement.full(canvas.mode), canvas)

    # -- scanout -------------------------------------------------------------------------

    async def flip(self, fb: Framebuffer) -> FlipResult:
        kfb = self._flippable(fb)
        pending = self._new_flip(kfb, None)
        if self._flip_blocks():
            # A commit that blocks until it is done (legacy SETCRTC), so in a thread.
            self._pending = pending
            try:
                await trio.to_thread.run_sync(self._show_now, pending.shown)
            except DrmError as exc:
                raise self._flip_failed(pending, exc) from exc
            self._land(pending, self._last_seq + 1, _monotonic())
        else:
            self._submit(pending)
        # Cancelled here, the flip still lands (the event or the timer lands it).
        return await self._landed(pending)

    def start_flip(self, fb: Framebuffer, on_landed: LandedCallback) -> bool:
        kfb = self._flippable(fb)
        if self._flip_blocks():
            return False
        self._submit(self._new_flip(kfb, on_landed))
        return True

    def native_flip(self, fb: Framebuffer, on_landed: LandedCallback) -> NativeFlip | None:
        """A plain flip to ``fb`` (shown as it is, no letterbox, no modeset) as one ioctl for
        the copy thread filling it; pending from now on, as after :meth:`start_flip`."""
        if (
            self._pending is not None
            or self._display.closed
            or not self._connected
            or self._modeinfo is None
            or self._committer.flip_blocks()
            or not isinstance(fb, KmsFramebuffer)
            or fb._output is not self
            or fb.released
        ):
            return None
        shown = self._direct_shown(fb)
        if shown is None:
            return None  # letterboxed: composed from the frame, after the copy
        token = next(self._display.tokens)
        call = self._committer.native_flip(shown.scan_fb_id, shown.placement, self._modeinfo,
                                           token)
        if call is None:
            return None
        pending = _FlipInFlight(fb, shown, token, _monotonic(), trio.Event(), on_landed=on_landed)
        flip = pending.native = NativeFlip(
            call.fd, call.request, call.arg,
            failed=lambda code: self._native_failed(pending, call, code),
            cancel=lambda: self._native_forget(pending),
        )
        self._pending = pending
        self._display.awaiting[token] = self
        if self._watchdog_idle:
            self._wake.set()
        return flip

    def _native_failed(self, pending: _FlipInFlight, call: NativeCall, code: int) -> DisplayError:
        """The thread's ioctl for ``pending`` failed with ``code``: forget the flip."""
        self._native_forget(pending)
        return self._flip_failed(pending, call.error(code))

    def _native_forget(self, pending: _FlipInFlight) -> None:
        """``pending``'s ioctl failed or never ran: it will never land, nobody is called."""
        pending.native = None
        self._display.awaiting.pop(pending.token, None)
        if self._pending is pending:
            self._pending = None

    def _new_flip(self, kfb: KmsFramebuffer, on_landed: LandedCallback | None) -> _FlipInFlight:
        shown = self._prepare(kfb)
        token = next(self._display.tokens)
        return _FlipInFlight(kfb, shown, token, _monotonic(), trio.Event(), on_landed=on_landed)

    def _flip_blocks(self) -> bool:
        """Whether the next flip is a commit that blocks (run in a thread, not queued)."""
        return (
            self._connected and self._modeinfo is not None and self._committer.flip_blocks()
        )

    def _submit(self, pending: _FlipInFlight) -> None:
        """Queue ``pending`` with the committer (or on the timer while unplugged), no waiting.

        The watchdog is kicked only when it has no deadline to wake at (idle) or the flip is
        due on the timer; else the deadline it sleeps to comes first (see :meth:`run`)."""
        self._pending = pending
        try:
            if not self._connected or self._modeinfo is None:
                pending.on_timer = True
                pending.deadline = trio.current_time() + self._period()
            else:
                shown = pending.shown
                self._committer.flip(
                    shown.scan_fb_id, shown.placement, self._modeinfo, pending.token
                )
        except DrmError as exc:
            raise self._flip_failed(pending, exc) from exc
        self._display.awaiting[pending.token] = self
        if self._watchdog_idle or pending.on_timer:
            self._wake.set()

    def _flip_failed(self, pending: _FlipInFlight, exc: DrmError) -> DisplayError:
        if self._pending is pending:
            self._pending = None
        if exc.errno == errno.EBUSY:
            return FlipPending(f"output {self.name}: {exc}")
        return DisplayError(f"output {self.name}: flip failed: {exc}")

    async def disable(self) -> None:
        await self._check_disable()
        if self._committer.on:
            try:
                await trio.to_thread.run_sync(self._committer.off)
            except DrmError as exc:
                raise DisplayError(f"output {self.name}: disable failed: {exc}") from exc
        self._scanout_off()

    def snapshot(self) -> RgbImage:
        mw, mh, _ = self._mode
        shown = self._showing
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

    # -- internals: planning what is shown ----------------------------------------------

    def _letterbox_reason(self, width: int, height: int) -> str:
        w, h, _ = self._mode
        return (
            f"a {width}x{height} frame on {self.name}'s {w}x{h} mode needs letterboxing "
            f"({self._committer.letterbox_why}), which copies"
        )

    def _can_place(self, width: int, height: int) -> bool:
        """Whether a frame of this size can be scanned out without letterboxing (so far)."""
        w, h, _ = self._mode
        if (width, height) == (w, h) or not self._connected:
            return True
        if not self._committer.places_planes:
            return False
        return self._position_ok.get((width, height, w * 100000 + h), True)

    def _test_position(self, fb: KmsFramebuffer) -> bool:
        """TEST_ONLY commit of a centred plane for a frame not the mode's size (cached)."""
        w, h, _ = self._mode
        if (fb.width, fb.height) == (w, h) or not self._connected or self._modeinfo is None:
            return True
        key = (fb.width, fb.height, w * 100000 + h)
        if key not in self._position_ok:
            placement = Placement.centred(fb.width, fb.height, w, h)
            try:
                self._committer.test_placement(fb.fb_id, placement, self._modeinfo)
                self._position_ok[key] = True
            except DrmError as exc:
                log.info("%s: no plane placement for %dx%d: %s", self, fb.width, fb.height, exc)
                self._position_ok[key] = False
        return self._position_ok[key]

    def _prepare(self, fb: KmsFramebuffer) -> _Shown:
        """How ``fb`` will be shown: directly, placed by the plane, or letterboxed (copied)."""
        shown = self._direct_shown(fb)
        if shown is not None:
            return shown
        canvas = self._spare_canvas(fb.fourcc)
        compose(canvas, fb.pixels())
        # Snapshots read the canvas: what is on screen, not what the backend writes next.
        return self._canvas_shown(fb, canvas)

    def _direct_shown(self, fb: KmsFramebuffer) -> _Shown | None:
        """How ``fb`` is shown without a copy (directly or placed by the plane), or None.

        The answer holds until the mode or the plug state changes (:meth:`poll_connector`
        forgets it): it is worked out once, not on every flip."""
        shown = self._direct.get(fb)
        if shown is not None:
            return shown
        w, h, _ = self._mode
        placement = Placement.centred(fb.width, fb.height, w, h)
        direct = (fb.width, fb.height) == (w, h) or (
            self._committer.places_planes
            and self._connected
            and (placement.covers(w, h) or self._test_position(fb))
        )
        if direct or not self._connected:
            shown = self._direct[fb] = _Shown(fb, fb.fb_id, placement, None)
            return shown
        return None

    def _spare_canvas(self, fourcc: PixelFormat) -> Canvas:
        """A canvas of this format and mode that is neither on screen nor about to be."""
        busy = (s.canvas for s in (self._showing, self._pending and self._pending.shown) if s)
        return self._canvases.spare(fourcc, self._mode, busy)

    # -- internals: the hardware ---------------------------------------------------------

    def _show_now(self, shown: _Shown) -> None:
        """Put ``shown`` on screen before returning (blocking; for release and replug)."""
        assert self._modeinfo is not None
        self._committer.show_now(shown.scan_fb_id, shown.placement, self._modeinfo)

    def _scanout_off(self) -> None:
        now = _monotonic()
        self._frames_before += self._frames_since_on(now)
        self._on_since = None
        self._showing = None

    def _land(self, pending: _FlipInFlight, seq: int, timestamp: float) -> None:
        if self._pending is not pending:
            return
        if pending.native is not None:
            _settle(pending.native)  # the thread's hand-back first; it may have failed
            if self._pending is not pending:
                return
            pending.native = None  # (its callbacks hold the pending flip: no cycle left)
            self.native_flips += 1
        self._pending = None
        self._display.awaiting.pop(pending.token, None)
        late = math.floor((timestamp - pending.submitted) / self._period())
        self._last_seq = seq
        if self._showing is None:
            self._on_since = timestamp
        self._showing = pending.shown
        self._count_landing(max(0, late))
        pending.result = FlipResult(pending.fb, seq, timestamp)
        report_landed(pending)

    def on_flip_event(self, event: DrmEvent) -> None:
        """The display read the flip event of ``event.user_data``: land that flip."""
        pending = self._pending
        if pending is not None and pending.token == event.user_data:
            self._land(pending, event.sequence, event.timestamp)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The watchdog: lands timer flips (unplugged output) and flips whose event never comes.

        It sleeps until the deadline of the flip pending when it last looked — ``flip_timeout_s``
        after that flip was submitted — and then looks again: a flip that landed meanwhile
        cost it nothing, and the one pending now gets its own deadline. With nothing pending
        it stays awake one ``flip_timeout_s`` more before going idle, so a stream of flips
        never kicks it; any flip submitted meanwhile has a later deadline than that wake-up.
        Flips landing in time thus wake it once per ``flip_timeout_s``, not once per flip
        (each wake-up is a task step and a cancel scope, costly under emulation);
        :meth:`_submit` kicks it only when it is idle or a flip is due on the timer.
        """
        task_status.started()
        timeout = self._display.flip_timeout_s
        quiet_until: float | None = None  # nothing was pending: go idle then, if still so
        while True:
            self._wake = trio.Event()  # before looking: a kick from now on is not lost
            pending = self._pending
            now = trio.current_time()
            if pending is not None:
                quiet_until = None
                if pending.deadline is None:
                    # Submitted on CLOCK_MONOTONIC; the deadline is on trio's clock.
                    pending.deadline = now + timeout - (_monotonic() - pending.submitted)
                deadline = pending.deadline
                if now >= deadline:
                    self._overdue(pending)
                    continue
            elif quiet_until is None or now < quiet_until:
                deadline = quiet_until = quiet_until or now + timeout
            else:
                deadline, quiet_until = math.inf, None
            self._watchdog_idle = deadline == math.inf
            with trio.move_on_at(deadline):
                await self._wake.wait()

    def _overdue(self, pending: _FlipInFlight) -> None:
        """Land ``pending`` at its deadline: a timer flip, or one whose event never came."""
        if not pending.on_timer:
            self.flip_timeouts += 1
            log.warning("%s: no flip event after %g s", self, self._display.flip_timeout_s)
        self._land(pending, self._last_seq + 1, _monotonic())

    # -- hot-plug ------------------------------------------------------------------------

    def poll_connector(self) -> None:
        """Check the connector's status; turn the CRTC off when unplugged, on when back.

        An unplugged output's flips land on a timer at the mode's rate (nothing is shown,
        the guest keeps running); when it comes back, its modes are read again and the frame
        on screen, if any, is set again (letterboxed anew if the mode changed).
        """
        dev = self._display.device
        connected = dev.connector_status(self._connector.id) is ConnectorStatus.CONNECTED
        if connected == self._connected:
            return
        self._direct.clear()  # shown another way now (timer flips, or a new mode)
        if not connected:
            log.info("%s: unplugged; frames are dropped until it comes back", self)
            self._connected = False
            if self._committer.on:
                self._committer.off()
            return
        conn = dev.connector(self._connector.id, probe=True)
        self._connector = conn
        self._connected = True
        old = self._mode
        self._select_mode(conn)
        self._position_ok.clear()
        log.info("%s: plugged in; mode %s", self, self._modeinfo)
        shown = self._showing
        if shown is None or self._pending is not None or self._modeinfo is None:
            return
        if self._mode != old or shown.canvas is not None:
            canvas = self._spare_canvas(shown.frame.fourcc)
            compose(canvas, shown.frame)
            shown = self._canvas_shown(shown.fb, canvas)
        self._show_now(shown)
        self._showing = shown

    def settle_native(self) -> None:
        """Wait until the thread issuing the pending flip (if it is a native flip) has issued
        it and handed its copy back: the display is closing (the card's fd must outlive the
        ioctl, and the CRTCs are given back only after it)."""
        pending = self._pending
        if pending is not None and pending.native is not None:
            _settle(pending.native)

    def _close(self) -> None:
        """Wake a pending flip with DisplayClosed, stop scanout, free every framebuffer."""
        self.settle_native()
        live = self._close_bookkeeping()
        self._direct.clear()
        self._committer.on = False
        dev = self._display.device
        for fb in live:
            fb.drop(dev)
        self._canvases.free(dev)
        self._committer.close()


def _settle(flip: NativeFlip) -> None:
    """Let the thread issuing ``flip`` finish its side (see :class:`NativeFlip`)."""
    if flip.settle is not None:
        flip.settle()
