"""The legacy KMS path: SETCRTC to turn a CRTC on (blocking), PAGE_FLIP with an event after.

Legacy KMS cannot place a plane, so every frame it shows is mode-sized (others are
letterboxed by the output). May touch: :mod:`displback.kms.device`, :mod:`displback.kms.uapi`.
"""

from __future__ import annotations

from displback.kms import uapi
from displback.kms.commit import Committer
from displback.kms.device import ModeInfo, NativeCall
from displback.kms.letterbox import Placement

__all__ = ["LegacyCommitter"]


class LegacyCommitter(Committer):
    """SETCRTC when the CRTC is off (blocking), else PAGE_FLIP with PAGE_FLIP_EVENT."""

    path = "legacy"
    other_sizes = "letterbox (legacy KMS cannot place a plane; the frame is copied)"
    letterbox_why = "legacy KMS"
    places_planes = False

    def flip_blocks(self) -> bool:
        return not self.on

    def flip(self, fb_id: int, placement: Placement, mode: ModeInfo, token: int) -> None:
        self.device.page_flip(
            self.crtc_id, fb_id, flags=uapi.DRM_MODE_PAGE_FLIP_EVENT, user_data=token
        )

    def native_flip(
        self, fb_id: int, placement: Placement, mode: ModeInfo, token: int
    ) -> NativeCall | None:
        if not self.on:
            return None  # a SETCRTC first (blocking, on the loop's side)
        return self.device.page_flip_call(
            self.crtc_id, fb_id, flags=uapi.DRM_MODE_PAGE_FLIP_EVENT, user_data=token
        )

    def show_now(self, fb_id: int, placement: Placement, mode: ModeInfo) -> None:
        self.device.set_crtc(self.crtc_id, fb_id, connectors=[self.connector_id], mode=mode)
        self.on = True
        self.mode = mode

    def off(self) -> None:
        self.device.set_crtc(self.crtc_id, 0)
        self.on = False
        self.mode = None
