"""Letterboxing: a guest frame centred on a mode-sized dumb buffer of ours, black around it.

Where the primary plane cannot be placed (legacy KMS, or a driver whose TEST_ONLY commit
refuses the position), a frame not of the mode's size is copied into the middle of a
:class:`Canvas`; released frames are kept on canvases too. The borders of a canvas are
blanked once for each placement and left alone afterwards: a flip copies only the frame, not
the whole mode (issue 12). May touch: :mod:`displback.kms.framebuffers` (allocation),
:mod:`displback.display.pixels` (the row copy); never the hardware's scanout state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from displback.display.interface import Mode
from displback.display.pixels import copy_frame
from displback.kms.device import DrmDevice
from displback.kms.framebuffers import DumbAllocation, FramePixels
from displback.protocol.constants import PixelFormat

__all__ = ["Canvas", "CanvasPool", "Placement", "compose"]


@dataclass(frozen=True, slots=True)
class Placement:
    """Which part of a frame goes where on the mode: source and CRTC rectangles."""

    src_x: int
    src_y: int
    dst_x: int
    dst_y: int
    width: int
    height: int

    @classmethod
    def centred(cls, fw: int, fh: int, mw: int, mh: int) -> Placement:
        """An ``fw``×``fh`` frame centred on an ``mw``×``mh`` mode (cropped where bigger).

        The same sizes give the same object while they are in use, so a committer tells an
        unchanged placement by identity (a plain flip, see :mod:`displback.kms.atomic`).
        """
        return _centred(fw, fh, mw, mh)

    @classmethod
    def full(cls, mode: Mode) -> Placement:
        return cls(0, 0, 0, 0, mode.width, mode.height)

    def covers(self, mw: int, mh: int) -> bool:
        return (self.dst_x, self.dst_y, self.width, self.height) == (0, 0, mw, mh)


@functools.lru_cache(maxsize=64)
def _centred(fw: int, fh: int, mw: int, mh: int) -> Placement:
    w, h = min(fw, mw), min(fh, mh)
    return Placement((fw - w) // 2, (fh - h) // 2, (mw - w) // 2, (mh - h) // 2, w, h)


@dataclass(slots=True, eq=False)
class Canvas:
    """A mode-sized dumb buffer of ours: letterboxed frames and kept copies are composed here.

    ``blank_around`` is the placement whose surroundings are black now (None: not known), so
    the next frame of that placement copies only its own rows.
    """

    alloc: DumbAllocation
    fourcc: PixelFormat
    mode: Mode
    blank_around: Placement | None = None

    @property
    def fb_id(self) -> int:
        return self.alloc.fb_id

    @property
    def pitch(self) -> int:
        return self.alloc.dumb.pitch

    def pixels(self) -> FramePixels:
        """The whole canvas as a mode-sized frame (what a snapshot of it reads)."""
        w, h, _ = self.mode
        return FramePixels(memoryview(self.alloc.mapped), 0, self.pitch, w, h, self.fourcc)


def _blank_outside(canvas: Canvas, p: Placement) -> None:
    """Black every byte of the mode's rows outside the rectangle ``p`` covers."""
    mw, mh, _ = canvas.mode
    cpp = canvas.fourcc.cpp
    rows = np.frombuffer(canvas.alloc.mapped, np.uint8, count=mh * canvas.pitch).reshape(
        mh, canvas.pitch
    )
    top, bottom = p.dst_y, p.dst_y + p.height
    left, right = p.dst_x * cpp, (p.dst_x + p.width) * cpp
    rows[:top, : mw * cpp] = 0
    rows[bottom:, : mw * cpp] = 0
    rows[top:bottom, :left] = 0
    rows[top:bottom, right : mw * cpp] = 0
    del rows  # the mapping cannot close while a view of it lives


def compose(canvas: Canvas, frame: FramePixels) -> None:
    """``frame`` centred on ``canvas``, black around it (borders blanked once per placement).

    A frame that cannot be read (an imported buffer with no CPU mapping) leaves the canvas
    all black.
    """
    mode = canvas.mode
    p = Placement.centred(frame.width, frame.height, mode.width, mode.height)
    if frame.memory is None:
        p = Placement(0, 0, 0, 0, 0, 0)  # nothing inside: black everywhere
    if canvas.blank_around != p:
        _blank_outside(canvas, p)
        canvas.blank_around = p
    if frame.memory is None:
        return
    cpp = frame.fourcc.cpp
    copy_frame(
        frame.memory,
        frame.offset + p.src_y * frame.pitch + p.src_x * cpp,
        frame.pitch,
        canvas.alloc.mapped,
        p.dst_y * canvas.pitch + p.dst_x * cpp,
        canvas.pitch,
        p.width * cpp,
        p.height,
    )


class CanvasPool:
    """An output's canvases: a spare one of the current mode and format, made when needed."""

    def __init__(self, allocate: Callable[[int, int, PixelFormat], DumbAllocation]) -> None:
        self._allocate = allocate
        self._canvases: list[Canvas] = []
        self.reserved: set[Canvas] = set()  # composed in a worker thread right now

    def __contains__(self, canvas: Canvas) -> bool:
        return canvas in self._canvases

    def spare(self, fourcc: PixelFormat, mode: Mode, busy: Iterable[Canvas | None]) -> Canvas:
        """A canvas of this format and mode that is not in ``busy`` nor reserved."""
        taken = set(busy) | self.reserved
        for canvas in self._canvases:
            if canvas not in taken and canvas.fourcc is fourcc and canvas.mode == mode:
                return canvas
        canvas = Canvas(self._allocate(mode.width, mode.height, fourcc), fourcc, mode)
        self._canvases.append(canvas)
        return canvas

    def free(self, dev: DrmDevice) -> None:
        """Free every canvas (the output is closing: none is scanned out any more)."""
        for canvas in self._canvases:
            canvas.alloc.free(dev)
        self._canvases.clear()
