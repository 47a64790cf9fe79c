"""Displays the backend shows guest connectors on: the interface and its implementations.

:mod:`.interface` is what the backend programs against; :mod:`.virtual` is the in-memory
display (simulation, tests, headless hosts); :mod:`.pixels` converts frames to RGB and copies
rows for the copy path. See docs/display.md.
"""

from displback.display.interface import (
    Display,
    DisplayClosed,
    DisplayError,
    DumbFramebuffer,
    FlipPending,
    FlipResult,
    Framebuffer,
    ImportRefused,
    InvalidFramebuffer,
    Mode,
    Output,
    OutputStats,
    UnsupportedFormat,
)
from displback.display.pixels import RgbImage, copy_frame, frame_end, to_rgb

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
    "Mode",
    "Output",
    "OutputStats",
    "RgbImage",
    "UnsupportedFormat",
    "copy_frame",
    "frame_end",
    "to_rgb",
]
