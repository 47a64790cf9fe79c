"""Finding a DRM card: the ``/dev/dri/card*`` nodes in number order, and the first one usable.

Used when no card is configured (:class:`~displback.kms.display.KmsDisplay`) and by
``displback kms-info``. May touch: :mod:`displback.kms.device` (opening cards, reading
connectors); nothing else.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Sequence

from displback.display.interface import DisplayError
from displback.kms.device import DrmDevice, DrmError, open_card

__all__ = ["card_paths", "find_card"]


def card_paths(pattern: str = "/dev/dri/card*") -> list[str]:
    """Card nodes, in number order (``card10`` after ``card9``)."""

    def number(path: str) -> int:
        digits = path.rsplit("card", 1)[-1]
        return int(digits) if digits.isdigit() else 1 << 30

    return sorted(glob.glob(pattern), key=number)


def find_card(
    names: Sequence[str] = (), open_fn: Callable[[str], DrmDevice] = open_card
) -> DrmDevice:
    """Open the first card with a connected connector (one of ``names``, if given)."""
    tried: list[str] = []
    for path in card_paths():
        try:
            dev = open_fn(path)
        except OSError as exc:
            tried.append(f"{path}: {exc.strerror}")
            continue
        try:
            res = dev.resources()
            for cid in res.connectors:
                conn = dev.connector(cid)
                if conn.connected and (not names or conn.name in names):
                    return dev
            tried.append(
                f"{path}: no connected connector{' named ' if names else ''}{', '.join(names)}"
            )
        except DrmError as exc:
            tried.append(f"{path}: {exc}")
        dev.close()
    raise DisplayError("no usable DRM card: " + ("; ".join(tried) or "no /dev/dri/card*"))
