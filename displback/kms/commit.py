"""How an output's frames reach the screen: one committer per KMS path, behind one interface.

A :class:`Committer` drives one CRTC (and, atomic, its primary plane) for one output and knows
whether that CRTC is on with a mode of ours. The output decides *what* to show (a framebuffer
and its :class:`~displback.kms.letterbox.Placement`); the committer decides *how*: an atomic
commit (:mod:`displback.kms.atomic`) or SETCRTC + PAGE_FLIP (:mod:`displback.kms.legacy`).
May touch: :mod:`displback.kms.device` only; it knows nothing of framebuffers or guests.
"""

from __future__ import annotations

import abc
import errno
from typing import ClassVar

from displback.kms.device import DrmDevice, DrmError, ModeInfo, NativeCall
from displback.kms.letterbox import Placement

__all__ = ["Committer"]


class Committer(abc.ABC):
    """Puts FBs on one CRTC: a non-blocking flip with an event, a blocking show, off."""

    path: ClassVar[str]
    """``atomic`` or ``legacy`` (what ``displback status`` shows as the commit path)."""
    other_sizes: ClassVar[str]
    """How a frame not of the mode's size is placed on this path."""
    letterbox_why: ClassVar[str]
    """Why such a frame is letterboxed (copied) when it is."""
    places_planes: ClassVar[bool]
    """Whether the path can position a smaller (or crop a bigger) frame without a copy."""

    def __init__(self, device: DrmDevice, crtc_id: int, connector_id: int) -> None:
        self.device = device
        self.crtc_id = crtc_id
        self.connector_id = connector_id
        self.on = False  # our frames are being scanned out (the CRTC is on, set by us)
        self.mode: ModeInfo | None = None  # the mode the CRTC is on with

    def flip_blocks(self) -> bool:
        """Whether the next flip is a blocking modeset (run it in a thread; it lands at once)."""
        return False

    @abc.abstractmethod
    def flip(self, fb_id: int, placement: Placement, mode: ModeInfo, token: int) -> None:
        """Queue ``fb_id`` for the next vblank; a flip event carrying ``token`` says it landed."""

    def native_flip(
        self, fb_id: int, placement: Placement, mode: ModeInfo, token: int
    ) -> NativeCall | None:
        """:meth:`flip` as one ioctl for a native thread to issue, or None where it is not
        one (a modeset, new rectangles) or the device does not allow it."""
        return None

    @abc.abstractmethod
    def show_now(self, fb_id: int, placement: Placement, mode: ModeInfo) -> None:
        """Put ``fb_id`` on screen before returning (blocking: release, replug, first frame)."""

    @abc.abstractmethod
    def off(self) -> None:
        """Turn the CRTC off (blocking)."""

    def test_placement(self, fb_id: int, placement: Placement, mode: ModeInfo) -> None:
        """Return if the driver would scan ``fb_id`` out at ``placement``; else DrmError."""
        raise DrmError("MODE_SETCRTC", errno.EINVAL, f"{self.path} KMS cannot place a plane")

    def close(self) -> None:  # noqa: B027 - most paths make nothing to free
        """Free what the committer made on the card (the display is closing)."""
