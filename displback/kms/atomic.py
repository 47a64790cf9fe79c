"""The atomic KMS path: one commit sets plane, CRTC and connector; flips are NONBLOCK commits.

A commit turns the CRTC on with a MODE_ID blob (ALLOW_MODESET) when it is off or its mode
changed, and otherwise only moves the primary plane's FB and rectangles. A plain flip — the
same mode and placement as the last commit — commits the plane's FB_ID alone, through
arrays built once (:class:`~displback.kms.device.PlaneFlip`). A TEST_ONLY commit asks the
driver whether it can position a plane that does not cover the mode. Property ids are looked
up by name once per object (:class:`PropertyCache`). May touch:
:mod:`displback.kms.device`, :mod:`displback.kms.uapi`.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

from displback.kms import uapi
from displback.kms.commit import Committer
from displback.kms.device import (
    DrmDevice,
    DrmError,
    ModeInfo,
    NativeCall,
    PlaneFlip,
    PropertyValue,
)
from displback.kms.framebuffers import quietly
from displback.kms.letterbox import Placement
from displback.kms.uapi import ObjectType

__all__ = ["AtomicCommitter", "PropertyCache"]

_FP16 = 1 << 16  # plane source coordinates are 16.16 fixed point


class PropertyCache:
    """Properties of KMS objects by name (read once per object: ids do not change)."""

    def __init__(self, device: DrmDevice) -> None:
        self._device = device
        self._props: dict[int, Mapping[str, PropertyValue]] = {}

    def of(self, obj_id: int, obj_type: ObjectType) -> Mapping[str, PropertyValue]:
        """``{name: (id, value as of the first read)}`` of one object."""
        props = self._props.get(obj_id)
        if props is None:
            props = self._device.object_properties(obj_id, obj_type)
            self._props[obj_id] = props
        return props

    def ids(self, obj_id: int, obj_type: ObjectType, values: Mapping[str, int]) -> dict[int, int]:
        """``{property id: value}`` for an atomic commit, from property names."""
        props = self.of(obj_id, obj_type)
        try:
            return {props[name].id: value for name, value in values.items()}
        except KeyError as exc:
            raise DrmError(
                "MODE_ATOMIC", errno.EINVAL, f"object {obj_id} has no property {exc.args[0]}"
            ) from None


class AtomicCommitter(Committer):
    """Atomic commits of one CRTC, its primary plane and one connector."""

    path = "atomic"
    other_sizes = "plane position (centred; letterbox where the driver refuses it)"
    letterbox_why = "the plane cannot be placed"
    places_planes = True

    def __init__(
        self,
        device: DrmDevice,
        crtc_id: int,
        connector_id: int,
        *,
        plane_id: int,
        props: PropertyCache,
    ) -> None:
        super().__init__(device, crtc_id, connector_id)
        self.plane_id = plane_id
        self._props = props
        self._mode_blob = 0
        self._placed: Placement | None = None  # the plane's rectangles as last committed
        self._plain: PlaneFlip | None = None

    def flip(self, fb_id: int, placement: Placement, mode: ModeInfo, token: int) -> None:
        """A plain flip (on, same mode and placement) commits the FB alone, else everything.

        Identity first: the output passes the same mode and (cached) placement objects."""
        if (
            self.on
            and mode is self.mode
            and (placement is self._placed or placement == self._placed)
        ):
            self.device.commit_plane_flip(self._plain_flip(), fb_id, token)
            return
        self._commit((fb_id, placement), mode, event_token=token)

    def native_flip(
        self, fb_id: int, placement: Placement, mode: ModeInfo, token: int
    ) -> NativeCall | None:
        """A plain flip only (its arrays are built once; the thread's commit reads them)."""
        if not (self.on and mode is self.mode and (placement is self._placed
                                                   or placement == self._placed)):
            return None
        return self.device.plane_flip_call(self._plain_flip(), fb_id, token)

    def _plain_flip(self) -> PlaneFlip:
        if self._plain is None:
            fb_prop = self._props.ids(self.plane_id, ObjectType.PLANE, {"FB_ID": 0})
            self._plain = PlaneFlip(self.plane_id, next(iter(fb_prop)))
        return self._plain

    def show_now(self, fb_id: int, placement: Placement, mode: ModeInfo) -> None:
        self._commit((fb_id, placement), mode)

    def off(self) -> None:
        self._commit(None, None)

    def test_placement(self, fb_id: int, placement: Placement, mode: ModeInfo) -> None:
        self._commit((fb_id, placement), mode, test_only=True)

    def close(self) -> None:
        if self._mode_blob:
            quietly(self.device.destroy_blob, self._mode_blob)
            self._mode_blob = 0

    def _plane(self, fb_id: int, p: Placement) -> dict[int, int]:
        return self._props.ids(
            self.plane_id,
            ObjectType.PLANE,
            {
                "FB_ID": fb_id,
                "CRTC_ID": self.crtc_id,
                "SRC_X": p.src_x * _FP16,
                "SRC_Y": p.src_y * _FP16,
                "SRC_W": p.width * _FP16,
                "SRC_H": p.height * _FP16,
                "CRTC_X": p.dst_x,
                "CRTC_Y": p.dst_y,
                "CRTC_W": p.width,
                "CRTC_H": p.height,
            },
        )

    def _commit(
        self,
        shown: tuple[int, Placement] | None,
        mode: ModeInfo | None,
        *,
        event_token: int = 0,
        test_only: bool = False,
    ) -> None:
        """Commit ``shown`` (None: off); NONBLOCK with an event when a token is given.

        A TEST_ONLY commit the driver refuses raises :class:`DrmError`, like any other.
        """
        ids, dev = self._props.ids, self.device
        modeset = shown is None or not self.on or self.mode != mode
        changes: dict[int, dict[int, int]] = {}
        blob = 0
        if shown is None:
            changes[self.plane_id] = ids(
                self.plane_id, ObjectType.PLANE, {"FB_ID": 0, "CRTC_ID": 0}
            )
            changes[self.crtc_id] = ids(self.crtc_id, ObjectType.CRTC, {"ACTIVE": 0, "MODE_ID": 0})
            changes[self.connector_id] = ids(
                self.connector_id, ObjectType.CONNECTOR, {"CRTC_ID": 0}
            )
        else:
            changes[self.plane_id] = self._plane(*shown)
            if modeset:
                assert mode is not None
                blob = dev.create_blob(mode.to_bytes())
                changes[self.crtc_id] = ids(
                    self.crtc_id, ObjectType.CRTC, {"ACTIVE": 1, "MODE_ID": blob}
                )
                changes[self.connector_id] = ids(
                    self.connector_id, ObjectType.CONNECTOR, {"CRTC_ID": self.crtc_id}
                )
        flags = uapi.DRM_MODE_ATOMIC_ALLOW_MODESET if modeset else 0
        if test_only:
            flags |= uapi.DRM_MODE_ATOMIC_TEST_ONLY
        elif event_token:
            flags |= uapi.DRM_MODE_ATOMIC_NONBLOCK | uapi.DRM_MODE_PAGE_FLIP_EVENT
        try:
            dev.atomic_commit(changes, flags=flags, user_data=event_token)
        except DrmError:
            if blob:
                quietly(dev.destroy_blob, blob)
            raise
        if test_only:
            if blob:
                quietly(dev.destroy_blob, blob)
            return
        if modeset:
            if self._mode_blob:
                quietly(dev.destroy_blob, self._mode_blob)
            self._mode_blob = blob
        # An equal mode object too: the next plain flip tells it by identity.
        self.mode = mode if shown is not None else None
        self._placed = shown[1] if shown is not None else None
        self.on = shown is not None
