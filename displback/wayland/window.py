"""One guest connector as one xdg-shell toplevel window: an Output whose vblank is the
compositor's frame callback.

* **Frames** are display-owned shared-memory buffers (:class:`ShmFramebuffer`: a memfd the
  backend copies the guest's pixels into, shared with the compositor through ``wl_shm``).
  Imports are refused (:class:`~displback.display.interface.ImportRefused` says why), so the
  backend copies; see docs/outputs.md on ``zwp_linux_dmabuf_v1``.
* **Pacing.** A flip attaches and commits the buffer and asks for a frame callback; the flip
  lands when the compositor calls it back (``wl_surface.frame``: it has shown a frame with
  the surface), so a guest never runs faster than its window is shown. A window nobody sees
  gets no frame callbacks — minimised, on a sleeping output, not yet mapped, or the
  compositor gone — so each flip also has a **fallback deadline**: three frame periods
  after the commit while callbacks came, then one period after the previous landing while
  they do not. The guest keeps running at the connector's refresh rate and never stalls.
  One callback is outstanding at a time (a hidden window does not pile them up in the
  compositor).
* **Windows come and go** without the backend noticing: :meth:`WaylandOutput.attach` makes
  the window on a connection (at the first flip; a disabled output has none), and
  :meth:`WaylandOutput.detach` forgets it when the compositor went away; the next
  connection makes it again and shows the last frame.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from displback.display.common import (
    DumbBufferMixin,
    FramebufferBase,
    OutputBase,
    check_dumb_size,
    on_black,
    report_landed,
)
from displback.display.interface import (
    CopyRunner,
    DisplayClosed,
    FlipResult,
    Framebuffer,
    ImportRefused,
    LandedCallback,
    Mode,
    OutputStats,
    UnsupportedFormat,
)
from displback.display.pixels import RgbImage, to_rgb
from displback.protocol.constants import PixelFormat
from displback.wayland.connection import WaylandConnection, shm_format

if TYPE_CHECKING:
    from displback.display.interface import DumbFramebuffer, Output

__all__ = ["ShmFramebuffer", "WaylandOutput", "WindowSpec"]

#: While frame callbacks come, a flip lands by the fallback timer only this many frame
#: periods after its commit (a callback a little late must not race the timer).
FALLBACK_PERIODS = 3.0


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """What a window is made from: the output's name, its title, the guest connector's
    size, the refresh rate of the fallback timer, the compositor output to go fullscreen
    on (None: a normal window), and the guest connector it shows (for input)."""

    name: str
    title: str
    width: int
    height: int
    refresh_hz: float = 60.0
    fullscreen_on: str | None = None
    connector: tuple[int, int, int] | None = None


class ShmFramebuffer(FramebufferBase["WaylandOutput"], DumbBufferMixin):
    """A display-owned frame: a memfd mapped here and shared with the compositor."""

    __slots__ = ("_buffer", "_fd", "_map", "_size", "_wl_buffer")

    def __init__(
        self, output: WaylandOutput, *, width: int, height: int, fourcc: PixelFormat, pitch: int
    ) -> None:
        super().__init__(output, width=width, height=height, fourcc=fourcc, pitch=pitch, offset=0)
        size = pitch * height
        fd = os.memfd_create("displback-wayland", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = size
        self._buffer = memoryview(self._map)
        self._wl_buffer: tuple[int, Any] | None = None  # (connection generation, wl_buffer)

    @property
    def zero_copy(self) -> bool:
        return False

    @property
    def freed(self) -> bool:
        """Whether the memory is gone (a released frame stays until it leaves the screen)."""
        return self._fd < 0

    def wl_buffer(self, conn: WaylandConnection) -> Any:
        """This frame's ``wl_buffer`` on ``conn`` (made on first use per connection)."""
        if self._wl_buffer is not None and self._wl_buffer[0] == conn.generation:
            return self._wl_buffer[1]
        pool = conn.shm.create_pool(self._fd, self._size)
        buffer = pool.create_buffer(
            0, self._width, self._height, self._pitch, shm_format(self._fourcc)
        )
        pool.destroy()
        self._wl_buffer = (conn.generation, buffer)
        return buffer

    def _forget_buffer(self, conn: WaylandConnection | None) -> None:
        held, self._wl_buffer = self._wl_buffer, None
        live = conn is not None and not conn.closed
        if held is not None and live and conn is not None and held[0] == conn.generation:
            held[1].destroy()

    def _drop(self, conn: WaylandConnection | None) -> None:
        """Free the memory and the compositor's buffer (the output no longer shows it)."""
        self._released = True
        self._forget_buffer(conn)
        self._buffer.release()
        with contextlib.suppress(BufferError):  # a caller's view keeps it until collected
            self._map.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(slots=True, eq=False)
class _PendingFlip:
    fb: ShmFramebuffer
    done: trio.Event
    deadline: float
    result: FlipResult | None = None
    on_landed: LandedCallback | None = None


class _Window:
    """The compositor's objects of one window on one connection."""

    def __init__(
        self, conn: WaylandConnection, spec: WindowSpec, on_configured: Callable[[], None]
    ):
        self.conn = conn
        self.configured = False
        self.frame_callback: Any = None
        self.surface = conn.compositor.create_surface()
        self.xdg_surface = conn.wm_base.get_xdg_surface(self.surface)
        self.toplevel = self.xdg_surface.get_toplevel()
        self.toplevel.set_title(spec.title)
        self.toplevel.set_app_id("displback")
        # The guest's connector has one size: ask the compositor not to resize the window.
        self.toplevel.set_min_size(spec.width, spec.height)
        self.toplevel.set_max_size(spec.width, spec.height)
        self.fullscreen = False
        if spec.fullscreen_on is not None:
            target = conn.outputs.get(spec.fullscreen_on)
            if target is not None:
                self.toplevel.set_fullscreen(target)
                self.fullscreen = True

        def on_configure(xdg_surface: Any, serial: int) -> None:
            xdg_surface.ack_configure(serial)
            if not self.configured:
                self.configured = True
                on_configured()

        self.xdg_surface.dispatcher["configure"] = on_configure
        self.surface.commit()  # the initial commit, without a buffer: asks for a configure
        conn.flush()

    def destroy(self) -> None:
        if not self.conn.closed:
            self.toplevel.destroy()
            self.xdg_surface.destroy()
            self.surface.destroy()
            self.conn.flush()
        self.frame_callback = None


class WaylandOutput(OutputBase[ShmFramebuffer]):
    """One guest connector's window; made by :class:`~displback.wayland.display.WaylandDisplay`."""

    _FRAMEBUFFER = ShmFramebuffer
    _display: Any  # the WaylandDisplay (which imports this module)

    def __init__(self, display: Any, spec: WindowSpec) -> None:
        self._display = display
        self._closed = False
        self.spec = spec
        self._mode = Mode(spec.width, spec.height, spec.refresh_hz)
        self._period = 1.0 / spec.refresh_hz
        self._pending: _PendingFlip | None = None
        self._live: set[ShmFramebuffer] = set()
        self._scanout: ShmFramebuffer | None = None  # shown; may be released (then kept)
        self._conn: WaylandConnection | None = None
        self._window: _Window | None = None
        self._callback_paced = True  # the last flip landed by a frame callback
        self._last_landing = 0.0
        self._last_due = 0.0  # when the last flip was due (its landing, or the timer's)
        self._sequence = 0
        self._flips_completed = 0
        self._frames_presented = 0
        #: Flips landed by the fallback timer (the window showed no frame in time).
        self.timer_landings = 0
        #: Called with the surface when a window is made and destroyed (input routing).
        self.on_surface: Callable[[Any, bool], None] | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def enabled(self) -> bool:
        return self._scanout is not None

    @property
    def current_fb(self) -> ShmFramebuffer | None:
        fb = self._scanout
        return None if fb is None or fb.released else fb

    @property
    def stats(self) -> OutputStats:
        return OutputStats(
            flips_completed=self._flips_completed,
            frames_shown=self._frames_presented,
            missed_vblanks=0,
            vblanks=self._sequence,
        )

    @property
    def window_shown(self) -> bool:
        """Whether the compositor has configured this output's window (it may show it)."""
        return self._window is not None and self._window.configured

    @property
    def fullscreen(self) -> bool:
        return self._window is not None and self._window.fullscreen

    @property
    def pending_deadline(self) -> float | None:
        return None if self._pending is None else self._pending.deadline

    def __repr__(self) -> str:
        w, h, hz = self._mode
        return f"<WaylandOutput {self.name} {w}x{h}@{hz:g} {self.spec.title!r}>"

    # -- framebuffers --------------------------------------------------------------------

    def import_dmabuf(
        self, fd: int, *, width: int, height: int, pitch: int, offset: int, fourcc: int
    ) -> Framebuffer:
        self._check_open()
        conn = self._conn
        if conn is not None and conn.dmabuf_offered:
            raise ImportRefused("importing guest dma-bufs into the compositor is not implemented")
        raise ImportRefused("the compositor offers no zwp_linux_dmabuf_v1")

    def create_dumb(self, *, width: int, height: int, fourcc: int) -> DumbFramebuffer:
        self._check_open()
        try:
            fmt = PixelFormat(fourcc)
        except ValueError:
            raise UnsupportedFormat(f"unknown pixel format 0x{fourcc:08x}") from None
        formats = self._display.shm_formats
        if fmt not in formats:
            raise UnsupportedFormat(f"the compositor's wl_shm has no {fmt.name}")
        check_dumb_size(width, height, fmt)
        pitch = -(-width * fmt.cpp // 64) * 64
        fb = ShmFramebuffer(self, width=width, height=height, fourcc=fmt, pitch=pitch)
        self._live.add(fb)
        return fb

    def release(self, fb: Framebuffer) -> None:
        sfb = self._own(fb, allow_released=True)
        if sfb.released:
            return
        self._live.discard(sfb)
        if sfb is self._scanout or (self._pending is not None and self._pending.fb is sfb):
            # Our own memory, shared with the compositor: it goes on showing it until the
            # next frame replaces it (the guest's memory was copied, never referenced).
            sfb._released = True
            return
        sfb._drop(self._conn)

    async def keep_frame(self, fb: Framebuffer, run: CopyRunner) -> None:
        # A frame here is always a copy in display-owned memory: releasing it keeps it.
        self._own(fb, allow_released=True)
        await trio.lowlevel.checkpoint()

    # -- scanout -------------------------------------------------------------------------

    async def flip(self, fb: Framebuffer) -> FlipResult:
        pending = self._queue_flip(fb, None)
        return await self._landed(pending)

    def start_flip(self, fb: Framebuffer, on_landed: LandedCallback) -> bool:
        self._queue_flip(fb, on_landed)
        return True

    def _queue_flip(self, fb: Framebuffer, on_landed: LandedCallback | None) -> _PendingFlip:
        sfb = self._flippable(fb)
        now = trio.current_time()
        if self._callback_paced:
            deadline = now + FALLBACK_PERIODS * self._period
        else:  # the timer's own grid, so its rate does not drift with the guest's latency
            deadline = max(now, self._last_due + self._period)
        pending = _PendingFlip(sfb, trio.Event(), deadline, on_landed=on_landed)
        self._pending = pending
        if self._window is None and self._conn is not None and not self._conn.closed:
            self._make_window(self._conn)
        else:
            self._commit(sfb)
        self._display._timer_changed()
        return pending

    async def disable(self) -> None:
        await self._check_disable()
        self._scanout_off()

    def snapshot(self) -> RgbImage:
        mw, mh, _ = self._mode
        fb = self._scanout
        if fb is None:
            return RgbImage(mw, mh, bytes(3 * mw * mh))
        image = to_rgb(
            fb._buffer,
            width=fb.width,
            height=min(fb.height, mh),
            pitch=fb.pitch,
            fourcc=fb.fourcc,
        )
        if image.width == mw and image.height == mh:
            return image
        return on_black(image.to_pil().crop((0, 0, min(image.width, mw), image.height)), self._mode)

    # -- the window ----------------------------------------------------------------------

    def attach(self, conn: WaylandConnection) -> None:
        """A connection is up: make the window if a frame is (to be) shown."""
        self._conn = conn
        if (self._scanout is not None or self._pending is not None) and not conn.closed:
            self._make_window(conn)

    def detach(self) -> None:
        """The connection is gone (its proxies are dead): forget the window; flips land by
        the fallback timer until :meth:`attach`."""
        self._drop_window(send=False)
        self._conn = None

    def _make_window(self, conn: WaylandConnection) -> None:
        self._window = _Window(conn, self.spec, self._on_configured)
        if self.on_surface is not None:
            self.on_surface(self._window.surface, True)

    def _drop_window(self, *, send: bool) -> None:
        window, self._window = self._window, None
        if window is None:
            return
        if self.on_surface is not None:
            self.on_surface(window.surface, False)
        if send:
            window.destroy()

    def _on_configured(self) -> None:
        frame = self._pending.fb if self._pending is not None else self._scanout
        if frame is not None:
            self._commit(frame)

    def _commit(self, fb: ShmFramebuffer) -> None:
        window = self._window
        if window is None or not window.configured or window.conn.closed:
            return  # lands by the timer; shown once the window is configured
        conn = window.conn
        surface = window.surface
        surface.attach(fb.wl_buffer(conn), 0, 0)
        if conn.compositor_version >= 4:
            surface.damage_buffer(0, 0, fb.width, fb.height)
        else:
            surface.damage(0, 0, fb.width, fb.height)
        if window.frame_callback is None:
            callback = surface.frame()
            callback.dispatcher["done"] = self._on_frame_done
            window.frame_callback = callback
        surface.commit()
        conn.flush()

    def _on_frame_done(self, callback: Any, _time_ms: int) -> None:
        window = self._window
        if window is None or window.frame_callback is not callback:
            return  # a callback of a window since destroyed
        window.frame_callback = None
        callback._destroy()  # the compositor destroyed it; free our proxy
        self._frames_presented += 1
        if self._pending is not None:
            self._callback_paced = True
            self._land()

    def land_if_due(self, now: float) -> None:
        """Land the pending flip by the fallback timer if its deadline has passed."""
        pending = self._pending
        if pending is not None and now >= pending.deadline:
            self.timer_landings += 1
            self._callback_paced = False
            self._land()
            self._last_due = pending.deadline

    def _land(self) -> None:
        pending = self._pending
        assert pending is not None
        self._pending = None
        self._sequence += 1
        self._flips_completed += 1
        self._last_landing = self._last_due = trio.current_time()
        old, self._scanout = self._scanout, pending.fb
        if old is not None and old is not pending.fb and old.released and not old.freed:
            old._drop(self._conn)  # a released frame kept on screen until now
        pending.result = FlipResult(pending.fb, self._sequence, self._last_landing)
        report_landed(pending)

    def _scanout_off(self) -> None:
        self._drop_window(send=True)
        old, self._scanout = self._scanout, None
        if old is not None and old.released and not old.freed:
            old._drop(self._conn)

    def _close(self) -> None:
        """Wake a pending flip (DisplayClosed), destroy the window, free every frame."""
        if self._closed:
            return
        self._closed = True
        pending = self._pending
        for fb in self._close_bookkeeping():
            fb._drop(self._conn)
        if pending is not None and not pending.fb.freed:
            pending.fb._drop(self._conn)

    def _check_open(self) -> None:
        if self._closed or self._display.closed:
            raise DisplayClosed(f"output {self.name}: the display is closed")


if TYPE_CHECKING:

    def _implements_interface(
        output: WaylandOutput, dumb: ShmFramebuffer
    ) -> tuple[Output, DumbFramebuffer]:
        return output, dumb
