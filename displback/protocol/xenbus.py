"""XenbusState, the device state both ends publish in their XenStore ``state`` node (§2).

A separate module because the handshake, the XenStore layout and the simulated frontend all
speak it. Parsing never raises: a missing or garbled ``state`` node reads as ``Unknown``, which
the reference says to treat like ``Closed``.
"""

from __future__ import annotations

import enum

__all__ = ["XenbusState", "parse_state"]


class XenbusState(enum.IntEnum):
    """``enum xenbus_state`` from xen/include/public/io/xenbus.h."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8

    def encode(self) -> bytes:
        """The node value written to XenStore: decimal, no trailing NUL (``b"4"``)."""
        return str(int(self)).encode("ascii")


_BY_TEXT = {member.encode(): member for member in XenbusState}


def parse_state(value: bytes | str | None) -> XenbusState:
    """The state a ``state`` node holds; missing, empty or garbage gives ``UNKNOWN``.

    Only the canonical decimal forms ``"0"`` … ``"8"`` are states: no sign, spaces, leading
    zeros or trailing bytes, so a value cannot mean one thing to us and another to the guest.
    """
    if value is None:
        return XenbusState.UNKNOWN
    raw = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
    return _BY_TEXT.get(raw, XenbusState.UNKNOWN)
