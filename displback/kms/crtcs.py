"""CRTCs and planes for the outputs: which CRTC drives a connector, its primary plane, and
the CRTC state saved at open and set back at close.

The display takes a CRTC per configured connector (the one already driving it if free) and
leaves every CRTC it touched as it found it, so the console or a compositor gets its screen
back. May touch: :mod:`displback.kms.device` (reading resources, SETCRTC on restore).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from displback.display.interface import DisplayError
from displback.kms.device import DrmConnector, DrmDevice, DrmError, ModeInfo, Plane, PropertyValue
from displback.kms.uapi import ObjectType, PlaneType

__all__ = ["SavedCrtc", "pick_crtc", "primary_plane", "restore_crtcs", "save_crtc"]

log = logging.getLogger(__name__)


def pick_crtc(dev: DrmDevice, crtcs: Sequence[int], conn: DrmConnector, taken: set[int]) -> int:
    """The CRTC driving ``conn`` now if not ``taken``, else the first free one that can."""
    current = 0
    possible = 0
    for eid in conn.encoders:
        enc = dev.encoder(eid)
        possible |= enc.possible_crtcs
        if eid == conn.encoder_id:
            current = enc.crtc_id
    if current and current not in taken:
        return current
    for index, crtc_id in enumerate(crtcs):
        if possible >> index & 1 and crtc_id not in taken:
            return crtc_id
    raise DisplayError(f"no free CRTC can drive {conn.name}")


def primary_plane(
    crtcs: Sequence[int],
    crtc_id: int,
    planes: Sequence[Plane],
    props_of: Callable[[int, ObjectType], Mapping[str, PropertyValue]],
) -> Plane | None:
    """The primary plane for ``crtc_id`` (the one on it now, else the lowest id), if any."""
    index = crtcs.index(crtc_id)
    candidates = []
    for plane in planes:
        if not plane.possible_crtcs >> index & 1:
            continue
        kind = props_of(plane.id, ObjectType.PLANE).get("type")
        if kind is not None and kind.value == PlaneType.PRIMARY:
            candidates.append(plane)
    if not candidates:
        return None
    return min(candidates, key=lambda p: (p.crtc_id != crtc_id, p.id))


@dataclass(frozen=True, slots=True)
class SavedCrtc:
    """A CRTC as the display found it: FB, position, mode and the connectors it drove."""

    crtc_id: int
    fb_id: int
    x: int
    y: int
    mode: ModeInfo | None
    connectors: tuple[int, ...]


def save_crtc(dev: DrmDevice, connectors: Sequence[int], crtc_id: int) -> SavedCrtc:
    """Read ``crtc_id``'s state and which of ``connectors`` it drives."""
    crtc = dev.crtc(crtc_id)
    driven = []
    for cid in connectors:
        conn = dev.connector(cid)
        if conn.encoder_id and dev.encoder(conn.encoder_id).crtc_id == crtc_id:
            driven.append(cid)
    return SavedCrtc(crtc_id, crtc.fb_id, crtc.x, crtc.y, crtc.mode, tuple(driven))


def restore_crtcs(dev: DrmDevice, saved: Sequence[SavedCrtc]) -> None:
    """Set every saved CRTC back as it was (or off, if that fails); logs, never raises."""
    for s in saved:
        try:
            if s.fb_id and s.mode is not None:
                dev.set_crtc(s.crtc_id, s.fb_id, x=s.x, y=s.y, connectors=s.connectors, mode=s.mode)
            else:
                dev.set_crtc(s.crtc_id, 0)
        except DrmError as exc:
            log.warning("cannot restore CRTC %d: %s; turning it off", s.crtc_id, exc)
            with contextlib.suppress(DrmError):
                dev.set_crtc(s.crtc_id, 0)
