"""What every display implementation does the same way: framebuffer, output and display bookkeeping.

:class:`~displback.display.virtual.VirtualDisplay` and :class:`~displback.kms.display.KmsDisplay`
differ in how they scan out, not in how they keep count: a framebuffer's geometry and release
flag, an output's set of live framebuffers and its one pending flip, a display's outputs,
nursery and closing. Those live here once, as base classes the two implementations extend, with
the size and format checks both apply to what the backend asks for.
"""

from __future__ import annotations

import abc
import logging
import os
import types
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Generic, Protocol, TypeVar

import trio
from PIL import Image

from displback.display.interface import (
    DisplayClosed,
    FlipPending,
    FlipResult,
    Framebuffer,
    InvalidFramebuffer,
    LandedCallback,
    Mode,
    NativeFlip,
    OutputStats,
)
from displback.display.pixels import RgbImage
from displback.protocol.constants import PixelFormat

__all__ = [
    "MAX_SIZE",
    "DisplayBase",
    "DumbBufferMixin",
    "FramebufferBase",
    "OutputBase",
    "PendingFlip",
    "check_dumb_size",
    "check_output_names",
    "on_black",
    "report_landed",
    "size_fits",
]

# Largest framebuffer or mode side, in pixels (what common KMS drivers accept).
MAX_SIZE = 16384


def size_fits(width: int, height: int) -> bool:
    """Whether both sides are within ``1..MAX_SIZE``."""
    return 1 <= width <= MAX_SIZE and 1 <= height <= MAX_SIZE


def check_dumb_size(width: int, height: int, fmt: PixelFormat) -> None:
    """``ValueError`` for a dumb buffer size no display allocates."""
    if not size_fits(width, height):
        raise ValueError(f"dumb buffer size {width}x{height} outside 1..{MAX_SIZE}")
    if fmt is PixelFormat.YUYV and width % 2:
        raise ValueError(f"YUYV needs an even width, not {width}")


def check_output_names(names: Sequence[str], what: str) -> None:
    """``ValueError`` unless there is at least one output and ``names`` (of ``what``) differ."""
    if not names:
        raise ValueError("a display needs at least one output")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names are not unique: {list(names)}")


def on_black(image: Image.Image, mode: Mode, at: tuple[int, int] = (0, 0)) -> RgbImage:
    """``image`` pasted at ``at`` on a black mode-sized screen."""
    mw, mh, _ = mode
    canvas = Image.new("RGB", (mw, mh))
    canvas.paste(image, at)
    return RgbImage(mw, mh, canvas.tobytes())


OutputT = TypeVar("OutputT")


class FramebufferBase(abc.ABC, Generic[OutputT]):
    """A framebuffer's output, geometry and release flag; subclasses say where the memory is."""

    __slots__ = ("_fourcc", "_height", "_offset", "_output", "_pitch", "_released", "_width")

    def __init__(
        self,
        output: OutputT,
        *,
        width: int,
        height: int,
        fourcc: PixelFormat,
        pitch: int,
        offset: int,
    ) -> None:
        self._output = output
        self._width = width
        self._height = height
        self._fourcc = fourcc
        self._pitch = pitch
        self._offset = offset
        self._released = False

    @property
    def width(self) -> int:
        return self._width

    @property
    def height(self) -> int:
        return self._height

    @property
    def fourcc(self) -> PixelFormat:
        return self._fourcc

    @property
    def pitch(self) -> int:
        return self._pitch

    @property
    def offset(self) -> int:
        return self._offset

    @property
    @abc.abstractmethod
    def zero_copy(self) -> bool: ...

    @property
    def released(self) -> bool:
        return self._released

    def _repr_id(self) -> str:
        """What :meth:`__repr__` shows after the class name (an id, if the display has one)."""
        return ""

    def __repr__(self) -> str:
        kind = "dma-buf" if self.zero_copy else "dumb"
        state = " released" if self._released else ""
        return (
            f"<{type(self).__name__}{self._repr_id()} {kind} {self._width}x{self._height} "
            f"{self._fourcc.name} pitch {self._pitch} offset {self._offset}{state}>"
        )


class DumbBufferMixin:
    """``buffer`` and ``size`` of a display-owned framebuffer (the class holds the slots)."""

    __slots__ = ()

    _buffer: memoryview
    _size: int

    @property
    def buffer(self) -> memoryview:
        return self._buffer

    @property
    def size(self) -> int:
        return self._size


log = logging.getLogger(__name__)


class PendingFlip(Protocol):
    """A queued flip as an output keeps it: set ``result`` (None: closed), then
    :func:`report_landed`."""

    done: trio.Event
    result: FlipResult | None
    on_landed: LandedCallback | None


def report_landed(pending: PendingFlip) -> None:
    """Wake ``pending``'s waiter and run its ``start_flip`` callback here, in the output's own
    wake-up; a callback that raises is logged, never raised into the output's task."""
    pending.done.set()
    callback = pending.on_landed
    if callback is not None:
        pending.on_landed = None
        try:
            callback(pending.result)
        except Exception:
            log.exception("a flip's landing callback failed")


class _Closable(Protocol):
    @property
    def closed(self) -> bool: ...


FbT = TypeVar("FbT", bound=FramebufferBase[Any])
FbT_co = TypeVar("FbT_co", covariant=True)


class _OnScreen(Protocol[FbT_co]):
    """What an output scans out: a guest framebuffer, or None for a kept copy of one."""

    @property
    def fb(self) -> FbT_co | None: ...


class OutputBase(abc.ABC, Generic[FbT]):
    """An output's live framebuffers and its one pending flip; subclasses scan out."""

    _FRAMEBUFFER: type[FbT]
    """The framebuffer class of this output (what :meth:`_own` accepts)."""
    _display: _Closable
    _mode: Mode
    _pending: PendingFlip | None
    _live: set[FbT]
    _showing: _OnScreen[FbT] | None  # what is on screen (None: scanout off)
    # The counts behind ``stats``; each output measures vblanks its own way.
    _flips_completed = 0
    _missed_vblanks = 0
    _frames_before = 0  # frames shown in stretches of scanout that have ended

    @property
    @abc.abstractmethod
    def name(self) -> str: ...

    @property
    def enabled(self) -> bool:
        return self._showing is not None

    @property
    def current_fb(self) -> FbT | None:
        return None if self._showing is None else self._showing.fb

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def flip_pending(self) -> bool:
        return self._pending is not None

    @property
    def live_framebuffers(self) -> int:
        """How many framebuffers of this output are not yet released."""
        return len(self._live)

    @abc.abstractmethod
    def snapshot(self) -> RgbImage: ...

    def _stats(self, frames_since_on: int, vblanks: int) -> OutputStats:
        """``stats`` from the counts, the current stretch's frames and the latest vblank."""
        return OutputStats(
            flips_completed=self._flips_completed,
            frames_shown=self._frames_before + frames_since_on,
            missed_vblanks=self._missed_vblanks,
            vblanks=vblanks,
        )

    def _count_landing(self, missed_vblanks: int) -> None:
        self._missed_vblanks += missed_vblanks
        self._flips_completed += 1

    def write_png(self, path: str | os.PathLike[str]) -> None:
        self.snapshot().write_png(path)

    def _check_open(self) -> None:
        if self._display.closed:
            raise DisplayClosed(f"output {self.name}: the display is closed")

    def _own(self, fb: Framebuffer, *, allow_released: bool) -> FbT:
        if not isinstance(fb, self._FRAMEBUFFER) or fb._output is not self:
            raise InvalidFramebuffer(f"{fb!r} is not a framebuffer of output {self.name}")
        if fb.released and not allow_released:
            raise InvalidFramebuffer(f"{fb!r} was released")
        return fb

    def _flippable(self, fb: Framebuffer) -> FbT:
        """``fb`` as this output's, if a flip to it may start now (else the interface's error)."""
        self._check_open()
        own = self._own(fb, allow_released=False)
        if self._pending is not None:
            raise FlipPending(f"output {self.name}: a flip is already pending")
        return own

    def native_flip(self, fb: Framebuffer, on_landed: LandedCallback) -> NativeFlip | None:
        """None: this output's flips are not one system call the caller could issue."""
        return None

    async def _landed(self, pending: PendingFlip) -> FlipResult:
        """Wait for ``pending`` to land; ``DisplayClosed`` if the display closed first."""
        await pending.done.wait()
        if pending.result is None:
            raise DisplayClosed(f"output {self.name}: display closed before the flip landed")
        return pending.result

    async def _check_disable(self) -> None:
        """Checkpoint, then refuse a disable of a closed display or during a pending flip."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        if self._pending is not None:
            raise FlipPending(f"output {self.name}: cannot disable while a flip is pending")

    @abc.abstractmethod
    def _scanout_off(self) -> None: ...

    def _close_bookkeeping(self) -> list[FbT]:
        """Wake a pending flip (DisplayClosed), stop scanout; the live framebuffers to drop."""
        pending, self._pending = self._pending, None
        if pending is not None:
            report_landed(pending)
        self._scanout_off()
        live = list(self._live)
        self._live.clear()
        return live


class _ClosingOutput(Protocol):
    def _close(self) -> None: ...


OutT = TypeVar("OutT", bound=_ClosingOutput)


class DisplayBase(abc.ABC, Generic[OutT]):
    """A display's outputs by name, its nursery and its closing; subclasses open them."""

    _outputs: dict[str, OutT]
    _closed: bool
    _nursery: trio.Nursery | None

    @property
    def outputs(self) -> Mapping[str, OutT]:
        return types.MappingProxyType(self._outputs)

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        self._close()
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[trio.Nursery]:
        """A nursery for the display's tasks; the display closes when the block ends."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield nursery
            finally:
                self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._shut_down()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _shut_down(self) -> None:
        """Close every output (a subclass adds what its hardware needs around that)."""
        for output in self._outputs.values():
            output._close()
