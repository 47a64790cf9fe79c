"""What the backend needs from a display: outputs that import, allocate, flip and show frames.

One guest connector is shown on one :class:`Output` of a :class:`Display`. The backend cannot
tell a virtual display (:mod:`displback.display.virtual`, used by the simulation and the
tests) from a KMS one; both implement these protocols, raise these exceptions and report
these dataclasses. See docs/display.md for the rules in prose.

Framebuffers reach an output in one of two ways:

* **zero-copy**: :meth:`Output.import_dmabuf` takes a dma-buf fd of the guest's pages with the
  guest's geometry (pitch ``ceil(width * bpp / 8)``, offset ``data_ofs``). The output keeps
  its own reference to the memory until :meth:`Output.release`; the caller may close its fd
  right after the import. A display that cannot scan the buffer out raises
  :class:`ImportRefused` and the backend falls back to copying.
* **copy**: :meth:`Output.create_dumb` allocates a display-owned buffer with the display's
  own pitch; the backend copies the guest's pixels into :attr:`DumbFramebuffer.buffer`
  (see :func:`displback.display.pixels.copy_frame`) before each flip.

Scanout rules:

* :meth:`Output.flip` completes at the first vblank after it was called, when the frame is on
  screen; one call, one completion. :meth:`Output.start_flip` is the same flip without a
  waiting task: the output calls back, from its own wake-up at the vblank (the virtual
  display's timer, KMS's page-flip event), so the caller's reaction (the guest's event) costs
  no further wake-up. :meth:`Output.native_flip` starts the same flip but leaves its one
  system call to the caller: a copy-mode frame's native copy thread issues it right after
  filling the framebuffer, so the copy's end costs the event loop no wake-up either (a KMS
  output only; the others answer None). A flip on a disabled output turns scanout on. The caller
  serialises flips per output: a flip or :meth:`Output.disable` while a flip is pending raises
  :class:`FlipPending` (KMS answers ``EBUSY``). A flip whose caller is cancelled still lands at
  the next vblank (a queued page flip cannot be taken back); it is counted but not reported.
* :meth:`Output.release` may be called for any framebuffer at any time. Releasing the one on
  screen (or the target of a pending flip) makes the output keep showing a private copy of its
  last frame: the output never blanks because of a release, and never touches released
  memory again.
* :meth:`Output.snapshot` is what the screen shows now: the mode-sized top-left part of the
  scanned-out frame (black where the frame is smaller), all black when scanout is off.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from displback.display.pixels import RgbImage
from displback.protocol.constants import EBUSY, PixelFormat

__all__ = [
    "Display",
    "DisplayClosed",
    "DisplayError",
    "DumbFramebuffer",
    "FlipPending",
    "FlipResult",
    "Framebuffer",
    "ImportRefused",
    "InvalidFramebuffer",
    "LandedCallback",
    "Mode",
    "NativeFlip",
    "Output",
    "OutputStats",
    "RgbImage",
    "UnsupportedFormat",
]


class DisplayError(Exception):
    """Base of the errors a display raises for requests it cannot carry out."""


class ImportRefused(DisplayError):
    """A dma-buf cannot be scanned out directly; ``reason`` says why (log it, then copy)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsupportedFormat(DisplayError):
    """The display cannot show this pixel format at all (not even from a dumb buffer)."""


class FlipPending(DisplayError):
    """A flip or disable was asked for while a flip is still pending on the output (EBUSY)."""

    errno = EBUSY


class InvalidFramebuffer(DisplayError):
    """A framebuffer that was released or belongs to another output was passed in."""


class DisplayClosed(DisplayError):
    """The display was closed (before or while the operation waited)."""


class Mode(NamedTuple):
    """The resolution and refresh rate an output scans out at."""

    width: int
    height: int
    refresh_hz: float


@dataclass(frozen=True, slots=True)
class FlipResult:
    """A completed flip: ``fb`` went on screen at vblank number ``sequence``.

    ``timestamp`` is the vblank time in seconds on the display's clock (trio's clock for the
    virtual display, ``CLOCK_MONOTONIC`` for KMS).
    """

    fb: Framebuffer
    sequence: int
    timestamp: float


@dataclass(frozen=True, slots=True)
class OutputStats:
    """Counters of one output since it was opened.

    ``vblanks``: the number of the latest vblank (vblank periods elapsed); ``frames_shown``:
    vblanks at which scanout was on; ``missed_vblanks``: vblanks by which flips landed later
    than due (the process or event loop stalled past the vblank a flip was queued for);
    ``flips_completed``: flips that landed (one per accepted :meth:`Output.flip`, cancelled
    waiters included).
    """

    flips_completed: int
    frames_shown: int
    missed_vblanks: int
    vblanks: int


class Framebuffer(Protocol):
    """Something an output can scan out: a rectangle of pixels in some memory."""

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    @property
    def fourcc(self) -> PixelFormat: ...

    @property
    def pitch(self) -> int:
        """Bytes from the start of one row to the start of the next."""
        ...

    @property
    def offset(self) -> int:
        """Byte offset of the first pixel inside the memory."""
        ...

    @property
    def zero_copy(self) -> bool:
        """True for an imported dma-buf, False for a display-owned (dumb) buffer."""
        ...

    @property
    def released(self) -> bool: ...


class DumbFramebuffer(Framebuffer, Protocol):
    """A display-owned framebuffer the backend writes pixels into (offset 0)."""

    @property
    def buffer(self) -> memoryview:
        """Writable bytes of the buffer, ``size`` long; invalid after release."""
        ...

    @property
    def size(self) -> int: ...


class Output(Protocol):
    """One guest connector's output: a scanout of one framebuffer at a fixed mode."""

    @property
    def name(self) -> str: ...

    @property
    def mode(self) -> Mode: ...

    @property
    def enabled(self) -> bool:
        """Whether scanout is on (a frame, or the kept copy of a released one, is shown)."""
        ...

    @property
    def flip_pending(self) -> bool: ...

    @property
    def current_fb(self) -> Framebuffer | None:
        """The framebuffer on screen; None when disabled or showing a released FB's copy."""
        ...

    @property
    def stats(self) -> OutputStats: ...

    def import_dmabuf(
        self, fd: int, *, width: int, height: int, pitch: int, offset: int, fourcc: int
    ) -> Framebuffer:
        """Import a dma-buf for zero-copy scanout, or raise :class:`ImportRefused`."""
        ...

    def create_dumb(self, *, width: int, height: int, fourcc: int) -> DumbFramebuffer:
        """Allocate a display-owned framebuffer; :class:`UnsupportedFormat`/ValueError."""
        ...

    async def flip(self, fb: Framebuffer) -> FlipResult:
        """Show ``fb`` from the next vblank on; return when it is on screen."""
        ...

    def start_flip(self, fb: Framebuffer, on_landed: LandedCallback) -> bool:
        """Start a flip to ``fb`` and return at once; False, with nothing started, when this
        flip cannot start without waiting (use :meth:`flip`).

        ``on_landed(result)`` is called exactly once, from the output's own task when the
        frame is on screen (None: the display closed first). It must not raise (what it
        raises is logged) and may start the next flip. Errors are those of :meth:`flip`,
        raised here.
        """
        ...

    def native_flip(self, fb: Framebuffer, on_landed: LandedCallback) -> NativeFlip | None:
        """:meth:`start_flip` of a frame a native copy thread is about to write into ``fb`` (a
        dumb framebuffer of this output), its system call left to that thread: the output
        counts the flip as pending from now on, and the caller issues
        ``ioctl(flip.fd, flip.request, flip.arg)`` once ``fb`` is filled, then reports back
        (:class:`NativeFlip`). None, with nothing started, where the flip is not one system
        call the output can hand out now (not KMS, a flip pending, a frame to letterbox, a
        modeset due, the card behind a test double); then :meth:`start_flip` it after the
        copy as usual. Never raises.
        """
        ...

    async def disable(self) -> None:
        """Turn scanout off (SET_CONFIG with zeros); nothing is reported to the guest."""
        ...

    def release(self, fb: Framebuffer) -> None:
        """Drop ``fb`` and every reference to its memory; idempotent.

        If ``fb`` is on screen (or about to be) the output goes on showing a private copy of
        its frame, made here, on the event loop: call :meth:`keep_frame` first where the
        caller can wait, and the copy is made wherever ``run`` makes it.
        """
        ...

    async def keep_frame(self, fb: Framebuffer, run: CopyRunner) -> None:
        """If ``fb`` is on screen or about to be, show a private copy of its frame instead.

        ``run(copy)`` runs the copy (a worker thread: up to 32 MiB); the output swaps the
        copy in once it is made, if ``fb`` is still shown by then. Afterwards :meth:`release`
        of ``fb`` copies nothing, unless ``fb`` was flipped on again meanwhile.
        """
        ...

    def snapshot(self) -> RgbImage:
        """What the screen shows now, ``mode.width`` × ``mode.height`` pixels."""
        ...

    def write_png(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`snapshot` as a PNG file (blocking file I/O)."""
        ...


#: Called by :meth:`Output.start_flip`'s output when the flip landed (None: display closed).
LandedCallback = Callable[[FlipResult | None], None]


@dataclass(eq=False, slots=True)
class NativeFlip:
    """A flip an output started (:meth:`Output.native_flip`) whose system call is the caller's.

    The caller issues ``ioctl(fd, request, arg)`` exactly once (``arg`` is the output's: it
    must stay untouched until then), or never and says so with :meth:`cancel`. A failed
    ioctl is reported with :meth:`failed`, on the event loop, which makes the output forget
    the flip (``on_landed`` is never called) and returns the error to report. ``settle`` is
    the caller's to set: the output calls it, on the loop, before the flip lands or the
    display closes, so the caller's side of the flip is finished first (the thread may be
    between its ioctl and its hand-back; the card's fd must outlive the ioctl).
    """

    fd: int
    request: int
    arg: Any  # a writable buffer (a ctypes structure) the ioctl reads and may write
    failed: Callable[[int], DisplayError]  # errno → the error; the flip is forgotten
    cancel: Callable[[], None]  # the ioctl will never be issued; the flip is forgotten
    settle: Callable[[], None] | None = None

#: Runs a copy (a callable) somewhere, e.g. ``lambda copy: workers.run(domid, copy)``.
CopyRunner = Callable[[Callable[[], None]], Awaitable[None]]


class Display(Protocol):
    """An output device: owns its outputs and whatever runs them, open until closed.

    Each implementation opens with an async context manager of its own (e.g.
    ``async with VirtualDisplay.open(...) as display``) that closes it on exit.
    """

    @property
    def outputs(self) -> Mapping[str, Output]: ...

    @property
    def closed(self) -> bool: ...

    async def aclose(self) -> None:
        """Release every framebuffer, stop scanout and wake pending flips with DisplayClosed."""
        ...
