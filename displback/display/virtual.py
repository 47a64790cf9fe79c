"""A display with no hardware: outputs that scan out in memory, paced by a trio vblank timer.

The simulation, the tests and headless hosts show guest connectors on a
:class:`VirtualDisplay`; it implements :mod:`displback.display.interface` exactly as a KMS
display will, so the backend cannot tell them apart. Vblank ``n`` of an output happens at
``start + n / refresh_hz`` on trio's clock (tests use ``trio.testing.MockClock`` and run at
full speed). The outputs of one refresh rate share one vblank clock (:class:`_VblankClock`),
one task in the display's nursery, as a KMS driver delivers every CRTC's vblank events
through one fd: one timer wake-up per vblank lands the due flips of all of them (a task per
output cost a quarter of the backend's CPU with 32 outputs flipping at 60 fps). Outputs may
have a vblank phase of their own (``OutputConfig.phase``), as the heads of a real multi-head
card do; the clock then wakes once per distinct phase and period, landing the flips due
then.

* a flip asked for during vblank period ``n`` is due at vblank ``n + 1``; the clock sleeps
  until then, puts the frame on screen and wakes the caller with a
  :class:`~displback.display.interface.FlipResult`. If the clock only runs later (the process
  stalled), the flip lands at the latest vblank and the skipped ones count as missed;
* scanout only *references* the framebuffer's memory — nothing is copied per vblank, in
  zero-copy or copy mode — and :meth:`VirtualOutput.snapshot` reads it when asked;
* with no flip pending on any of its outputs the clock waits without a timer (after one more
  vblank, so callers flipping every frame cost one wake-up of the clock per frame): idle
  outputs cost no CPU. Vblank and frame counters are derived from the clock, not counted by
  ticks.

Zero-copy imports go through an injected ``dmabuf_importer(fd)`` (the platform layer maps the
dma-buf; tests pass a memfd-backed fake) returning a :class:`~displback.mapping.DmabufMapping`.
The display owns that mapping until the framebuffer is released and closes it then, having
first dropped every view of it (a kept copy replaces it on screen if needed). Options simulate
drivers that refuse imports: ``dmabuf_importer=None`` or ``import_supported=False`` (no PRIME
import at all), ``import_formats`` (an allow-list), ``pitch_align``/``offset_align`` (like
i915's 64-byte pitch rule). Dumb buffers get the display's own pitch, rounded up to
``dumb_pitch_align``.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections.abc import AsyncIterator, Iterable, Sequence
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
    FlipResult,
    Framebuffer,
    ImportRefused,
    LandedCallback,
    Mode,
    OutputStats,
    UnsupportedFormat,
)
from displback.display.pixels import RgbImage, copy_frame, frame_end, to_rgb
from displback.mapping import DmabufImporter, DmabufMapping
from displback.protocol.constants import PixelFormat

if TYPE_CHECKING:
    from displback.display.interface import Display, DumbFramebuffer, Output

__all__ = [
    "MAX_SIZE",
    "OutputConfig",
    "VirtualDisplay",
    "VirtualDisplayOptions",
    "VirtualDumbFramebuffer",
    "VirtualFramebuffer",
    "VirtualOutput",
]

_MAX_REFRESH_HZ = 1000.0


@dataclass(frozen=True, slots=True)
class OutputConfig:
    """One virtual output: its name (the guest connector's), its mode, and its vblank phase.

    ``phase`` (0 ≤ phase < 1, in periods) puts the output's vblanks at ``start + (n + phase)
    / refresh_hz``: the heads of a real multi-head machine each have their own timing, so
    their vblanks are not in step. 0 (the default) puts every output of one rate in phase.
    """

    name: str
    width: int
    height: int
    refresh_hz: float = 60.0
    phase: float = 0.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an output needs a name")
        if not size_fits(self.width, self.height):
            raise ValueError(f"output {self.name}: bad resolution {self.width}x{self.height}")
        if not (0.0 < self.refresh_hz <= _MAX_REFRESH_HZ):
            raise ValueError(f"output {self.name}: bad refresh rate {self.refresh_hz} Hz")
        if not (0.0 <= self.phase < 1.0):
            raise ValueError(f"output {self.name}: vblank phase {self.phase} not in [0, 1)")


class VirtualDisplayOptions(TypedDict, total=False):
    """The keyword options of :class:`VirtualDisplay` (defaults there), passed on as given."""

    dmabuf_importer: DmabufImporter | None
    import_supported: bool
    import_formats: Iterable[PixelFormat] | None
    pitch_align: int
    offset_align: int
    dumb_pitch_align: int


@dataclass(slots=True, eq=False)
class _Frame:
    """What scanout reads: pixels in ``memory``; ``fb`` is None for a kept copy."""

    memory: memoryview | bytearray
    offset: int
    pitch: int
    width: int
    height: int
    fourcc: PixelFormat
    fb: VirtualFramebuffer | None


@dataclass(slots=True, eq=False)
class _PendingFlip:
    """A queued flip: lands at vblank ``due`` (or the first one handled after it)."""

    fb: VirtualFramebuffer
    frame: _Frame
    due: int
    done: trio.Event
    result: FlipResult | None = None
    on_landed: LandedCallback | None = None


class VirtualFramebuffer(FramebufferBase["VirtualOutput"]):
    """A framebuffer of a :class:`VirtualOutput`: an imported dma-buf or a dumb buffer."""

    __slots__ = ("_mapping", "_memory")

    def __init__(
        self,
        output: VirtualOutput,
        *,
        width: int,
        height: int,
        fourcc: PixelFormat,
        pitch: int,
        offset: int,
        memory: memoryview,
        mapping: DmabufMapping | None,
    ) -> None:
        super().__init__(
            output, width=width, height=height, fourcc=fourcc, pitch=pitch, offset=offset
        )
        self._memory: memoryview | None = memory
        self._mapping = mapping

    @property
    def zero_copy(self) -> bool:
        return self._mapping is not None

    def _frame(self) -> _Frame:
        assert self._memory is not None
        return _Frame(
            self._memory,
            self._offset,
            self._pitch,
            self._width,
            self._height,
            self._fourcc,
            self,
        )

    def _drop(self) -> None:
        """Forget the memory: close the importer's mapping, or free the dumb buffer."""
        self._released = True
        memory, self._memory = self._memory, None
        mapping, self._mapping = self._mapping, None
        if mapping is not None:
            del memory  # our only view of the mapping goes before the mapping closes
            mapping.close()
        elif memory is not None:
            # A caller still holding a derived view keeps the bytes alive; that is all.
            with contextlib.suppress(BufferError):
                memory.release()


class VirtualDumbFramebuffer(VirtualFramebuffer, DumbBufferMixin):
    """A display-owned framebuffer: zeroed bytes the backend copies guest pixels into.

    The bytes are an anonymous private mapping: the kernel hands out zero pages as they are
    first written, so creating one costs nothing per byte on the event loop (a ``bytearray``
    of a 4K frame would zero 33 MB there first).
    """

    __slots__ = ("_anon", "_buffer", "_size")

    def __init__(
        self, output: VirtualOutput, *, width: int, height: int, fourcc: PixelFormat, pitch: int
    ) -> None:
        size = pitch * height
        self._anon = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer = memoryview(self._anon)
        super().__init__(
            output,
            width=width,
            height=height,
            fourcc=fourcc,
            pitch=pitch,
            offset=0,
            memory=buffer,
            mapping=None,
        )
        self._buffer = buffer
        self._size = size

    def _drop(self) -> None:
        super()._drop()
        self._buffer.release()
        with contextlib.suppress(BufferError):  # a caller's view keeps it until collected
            self._anon.close()


def _parse_format(fourcc: int) -> PixelFormat | None:
    try:
        return PixelFormat(fourcc)
    except ValueError:
        return None


def _kept_copy(frame: _Frame) -> _Frame:
    """A private copy of a frame's pixels, packed, so its memory can go."""
    row_bytes = frame.width * frame.fourcc.cpp
    data = bytearray(row_bytes * frame.height)
    copy_frame(frame.memory, frame.offset, frame.pitch, data, 0, row_bytes, row_bytes, frame.height)
    return _Frame(data, 0, row_bytes, frame.width, frame.height, frame.fourcc, None)


async def _kept_copy_by(run: CopyRunner, frame: _Frame) -> _Frame:
    """:func:`_kept_copy` made by ``run`` (a worker thread)."""
    kept: list[_Frame] = []
    await run(lambda: kept.append(_kept_copy(frame)))
    return kept[0]


class VirtualOutput(OutputBase[VirtualFramebuffer]):
    """One virtual scanout; created and run by :class:`VirtualDisplay`."""

    _FRAMEBUFFER = VirtualFramebuffer
    _display: VirtualDisplay

    def __init__(self, display: VirtualDisplay, config: OutputConfig) -> None:
        self._display = display
        self._config = config
        self._mode = Mode(config.width, config.height, config.refresh_hz)
        self._showing: _Frame | None = None
        self._pending: _PendingFlip | None = None
        self._live: set[VirtualFramebuffer] = set()
        self._clock = display._clock_for(config.refresh_hz)
        self._clock.outputs.append(self)
        # Vblank n happens at start + n * period on trio's clock; set when the clock starts
        # (the clock's start, later by the output's phase).
        self._start = 0.0
        self._period = self._clock.period
        self._phase = config.phase * self._period
        self._last_seq = 0  # the latest vblank a flip landed at
        self._on_seq = 0  # the vblank scanout (last) turned on at

    # -- state ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def stats(self) -> OutputStats:
        seq = self._seq_now()
        return self._stats(self._frames_since_on(seq), seq)

    @property
    def owned_bytes(self) -> int:
        """Bytes of the display-owned (dumb) framebuffers alive on this output: the memory
        copy mode costs Dom0 here."""
        return sum(fb.size for fb in self._live if isinstance(fb, VirtualDumbFramebuffer))

    def __repr__(self) -> str:
        w, h, hz = self._mode
        return f"<VirtualOutput {self.name} {w}x{h}@{hz:g}>"

    # -- framebuffers --------------------------------------------------------------------

    def import_dmabuf(
        self, fd: int, *, width: int, height: int, pitch: int, offset: int, fourcc: int
    ) -> VirtualFramebuffer:
        self._check_open()
        d = self._display
        if d.importer is None or not d.import_supported:
            raise ImportRefused("this display does not import dma-bufs")
        fmt = _parse_format(fourcc)
        if fmt is None:
            raise ImportRefused(f"unknown pixel format 0x{fourcc:08x}")
        if d.import_formats is not None and fmt not in d.import_formats:
            raise ImportRefused(f"{fmt.name} is not scanned out from imported buffers")
        if not size_fits(width, height):
            raise ImportRefused(f"size {width}x{height} outside 1..{MAX_SIZE}")
        if fmt is PixelFormat.YUYV and width % 2:
            raise ImportRefused(f"YUYV needs an even width, not {width}")
        row_bytes = width * fmt.cpp
        if pitch < row_bytes:
            raise ImportRefused(f"pitch {pitch} is less than a row of {row_bytes} bytes")
        if pitch % d.pitch_align:
            raise ImportRefused(f"pitch {pitch} is not a multiple of {d.pitch_align}")
        if offset < 0 or offset % d.offset_align:
            raise ImportRefused(f"offset {offset} is not a multiple of {d.offset_align}")
        try:
            mapping = d.importer(fd)
        except OSError as exc:
            raise ImportRefused(f"the importer refused fd {fd}: {exc}") from exc
        try:
            memory = mapping.buffer
            end = frame_end(offset, pitch, row_bytes, height)
            if end > memory.nbytes:
                raise ImportRefused(
                    f"frame needs {end} bytes (offset {offset} + pitch {pitch} x "
                    f"{height - 1} + {row_bytes}) but the dma-buf has {memory.nbytes}"
                )
            fb = VirtualFramebuffer(
                self,
                width=width,
                height=height,
                fourcc=fmt,
                pitch=pitch,
                offset=offset,
                memory=memory,
                mapping=mapping,
            )
        except BaseException:
            mapping.close()
            raise
        self._live.add(fb)
        return fb

    def create_dumb(self, *, width: int, height: int, fourcc: int) -> VirtualDumbFramebuffer:
        self._check_open()
        fmt = _parse_format(fourcc)
        if fmt is None:
            raise UnsupportedFormat(f"unknown pixel format 0x{fourcc:08x}")
        check_dumb_size(width, height, fmt)
        align = self._display.dumb_pitch_align
        pitch = -(-width * fmt.cpp // align) * align
        fb = VirtualDumbFramebuffer(self, width=width, height=height, fourcc=fmt, pitch=pitch)
        self._live.add(fb)
        return fb

    def release(self, fb: Framebuffer) -> None:
        vfb = self._own(fb, allow_released=True)
        if vfb.released:
            return
        if self._showing is not None and self._showing.fb is vfb:
            self._showing = _kept_copy(self._showing)
        if self._pending is not None and self._pending.frame.fb is vfb:
            self._pending.frame = _kept_copy(self._pending.frame)
        self._live.discard(vfb)
        vfb._drop()

    async def keep_frame(self, fb: Framebuffer, run: CopyRunner) -> None:
        vfb = self._own(fb, allow_released=True)
        if vfb.released:
            return
        # The frame on screen and the one of a flip in flight are the same pixels if both
        # show ``vfb``: one copy serves both. Each is swapped only if it still shows ``vfb``
        # once the copy is made (the scanout went on meanwhile).
        frames = [f for f in (self._showing, self._pending and self._pending.frame) if f]
        source = next((f for f in frames if f.fb is vfb), None)
        if source is None:
            return
        kept = await _kept_copy_by(run, source)
        if self._showing is not None and self._showing.fb is vfb:
            self._showing = kept
        if self._pending is not None and self._pending.frame.fb is vfb:
            self._pending.frame = kept

    # -- scanout -------------------------------------------------------------------------

    async def flip(self, fb: Framebuffer) -> FlipResult:
        pending = self._queue_flip(fb, None)
        # Cancelled here, the flip still lands at the next vblank, like a queued KMS flip.
        return await self._landed(pending)

    def start_flip(self, fb: Framebuffer, on_landed: LandedCallback) -> bool:
        self._queue_flip(fb, on_landed)
        return True

    def _queue_flip(self, fb: Framebuffer, on_landed: LandedCallback | None) -> _PendingFlip:
        vfb = self._flippable(fb)
        due = self._seq_now() + 1
        pending = _PendingFlip(vfb, vfb._frame(), due, trio.Event(), on_landed=on_landed)
        self._pending = pending
        self._clock.pending[self] = None
        # A no-op while the clock is on its timer (it finds the flip when it wakes).
        self._clock.wake.set()
        return pending

    async def disable(self) -> None:
        await self._check_disable()
        self._scanout_off()

    def snapshot(self) -> RgbImage:
        mw, mh, _ = self._mode
        frame = self._showing
        if frame is None:
            return RgbImage(mw, mh, bytes(3 * mw * mh))
        rows = min(frame.height, mh)
        image = to_rgb(
            frame.memory,
            width=frame.width,
            height=rows,
            pitch=frame.pitch,
            offset=frame.offset,
            fourcc=frame.fourcc,
        )
        if image.width == mw and image.height == mh:
            return image
        return on_black(image.to_pil().crop((0, 0, min(image.width, mw), rows)), self._mode)

    # -- internals -----------------------------------------------------------------------

    def _seq_now(self) -> int:
        """The number of the latest vblank at trio's current time (never going backwards)."""
        # The epsilon keeps a float quotient just below an integer from losing the vblank
        # that a sleep_until(its deadline) has just woken for.
        elapsed = (trio.current_time() - self._start) / self._period
        return max(self._last_seq, math.floor(elapsed + 1e-6))

    def _deadline(self, seq: int) -> float:
        return self._start + seq * self._period

    def _frames_since_on(self, seq: int) -> int:
        return 0 if self._showing is None else seq - self._on_seq + 1

    def _scanout_off(self) -> None:
        self._frames_before += self._frames_since_on(self._seq_now())
        self._showing = None

    def _land_if_due(self) -> None:
        """Land the pending flip if its vblank has come (called by the clock)."""
        pending = self._pending
        if pending is None:
            self._clock.pending.pop(self, None)
            return
        seq = self._seq_now()
        if seq < pending.due:
            return
        self._land(pending, seq, missed=seq - pending.due)

    def _land(self, pending: _PendingFlip, seq: int, *, missed: int = 0) -> None:
        self._pending = None
        self._clock.pending.pop(self, None)
        self._last_seq = seq
        if self._showing is None:
            self._on_seq = seq
        self._showing = pending.frame
        self._count_landing(missed)
        pending.result = FlipResult(pending.fb, seq, self._deadline(seq))
        report_landed(pending)

    def _close(self) -> None:
        """Stop scanout, wake a pending flip with DisplayClosed, release every framebuffer."""
        for fb in self._close_bookkeeping():
            fb._drop()
        self._clock.pending.pop(self, None)


class _VblankClock:
    """The vblank timer of every output of one refresh rate (see the module docstring)."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.start = 0.0
        self.outputs: list[VirtualOutput] = []
        self.pending: dict[VirtualOutput, None] = {}  # outputs with a flip pending, in order
        self.wake = trio.Event()

    def _deadline(self, seq: int) -> float:
        return self.start + seq * self.period

    def _seq_now(self) -> int:
        return math.floor((trio.current_time() - self.start) / self.period + 1e-6)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Land each pending flip at its vblank; sleep without a timer while none is pending.

        After a landing the clock stays on the timer for one more vblank: callers flipping
        every frame have queued their next flips by then, so it wakes once per frame.
        """
        self.start = trio.current_time()
        for output in self.outputs:
            output._start = self.start + output._phase
        task_status.started()
        idle_vblanks = 0
        while True:
            if not self.pending:
                if idle_vblanks:
                    self.wake = trio.Event()
                    await self.wake.wait()
                    idle_vblanks = 0
                else:
                    await trio.sleep_until(self._deadline(self._seq_now() + 1))
                    idle_vblanks += 1
                continue
            idle_vblanks = 0
            deadline = min(
                o._deadline(o._pending.due) if o._pending else 0.0 for o in self.pending
            )
            if trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                continue  # flips may have come or gone meanwhile
            for output in list(self.pending):
                output._land_if_due()


class VirtualDisplay(DisplayBase[VirtualOutput]):
    """Virtual outputs with vblank timers in a nursery; open with :meth:`open`."""

    def __init__(
        self,
        outputs: Sequence[OutputConfig],
        *,
        dmabuf_importer: DmabufImporter | None = None,
        import_supported: bool = True,
        import_formats: Iterable[PixelFormat] | None = None,
        pitch_align: int = 1,
        offset_align: int = 1,
        dumb_pitch_align: int = 64,
    ) -> None:
        check_output_names([config.name for config in outputs], "output")
        for what, value in (
            ("pitch_align", pitch_align),
            ("offset_align", offset_align),
            ("dumb_pitch_align", dumb_pitch_align),
        ):
            if value < 1:
                raise ValueError(f"{what} must be at least 1, not {value}")
        self.importer = dmabuf_importer
        self.import_supported = import_supported
        self.import_formats = None if import_formats is None else frozenset(import_formats)
        self.pitch_align = pitch_align
        self.offset_align = offset_align
        self.dumb_pitch_align = dumb_pitch_align
        self._clocks: dict[float, _VblankClock] = {}
        self._outputs = {config.name: VirtualOutput(self, config) for config in outputs}
        self._closed = False
        self._nursery: trio.Nursery | None = None

    @classmethod
    @asynccontextmanager
    async def open(
        cls, outputs: Sequence[OutputConfig], **options: Unpack[VirtualDisplayOptions]
    ) -> AsyncIterator[VirtualDisplay]:
        """Open a display whose outputs tick until the ``async with`` block ends."""
        display = cls(outputs, **options)
        async with display._running() as nursery:
            for clock in display._clocks.values():
                await nursery.start(clock.run)
            yield display

    def _clock_for(self, refresh_hz: float) -> _VblankClock:
        """The vblank clock of the outputs at ``refresh_hz`` (made for the first one)."""
        period = 1.0 / refresh_hz
        clock = self._clocks.get(period)
        if clock is None:
            clock = self._clocks[period] = _VblankClock(period)
        return clock


if TYPE_CHECKING:

    def _implements_interface(
        display: VirtualDisplay, output: VirtualOutput, dumb: VirtualDumbFramebuffer
    ) -> tuple[Display, Output, DumbFramebuffer]:
        return display, output, dumb
