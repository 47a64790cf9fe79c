"""Which KMS mode a connector scans out: the guest's resolution if offered, else the preferred.

Pure choice over a connector's mode list (no device access), so it is tested on lists alone.
May touch: :mod:`displback.kms.device` (``ModeInfo``) and :mod:`displback.kms.uapi` flags.
"""

from __future__ import annotations

from collections.abc import Sequence

from displback.display.interface import Mode
from displback.kms import uapi
from displback.kms.device import ModeInfo

__all__ = ["FALLBACK_MODE", "choose_mode"]

FALLBACK_MODE = Mode(1024, 768, 60.0)
"""The mode an output reports while its connector offers none and no resolution is configured."""


def choose_mode(
    modes: Sequence[ModeInfo],
    width: int | None,
    height: int | None,
    refresh_hz: float | None = None,
) -> ModeInfo | None:
    """The mode to scan out: ``width``×``height`` if offered, else the preferred one.

    Among modes of the wanted size, the one closest to ``refresh_hz`` (default: the highest
    rate; the preferred mode wins ties). Interlaced modes are avoided when another fits.
    """
    if not modes:
        return None

    def rank(m: ModeInfo) -> tuple[bool, float, bool]:
        interlaced = bool(m.flags & uapi.DRM_MODE_FLAG_INTERLACE)
        rate = -abs(m.refresh_hz - refresh_hz) if refresh_hz else m.refresh_hz
        return (not interlaced, rate, m.preferred)

    if width is not None and height is not None:
        sized = [m for m in modes if (m.width, m.height) == (width, height)]
        if sized:
            return max(sized, key=rank)
    preferred = [m for m in modes if m.preferred]
    return max(preferred, key=rank) if preferred else modes[0]
