"""The one exception the protocol core raises, so callers need exactly one ``except``.

Everything malformed that reaches the sans-I/O core (ring indexes, request bytes, directory
pages, XenStore values) comes from a guest we do not trust. The core never lets another
exception type escape for bad input: it raises :class:`ProtocolError` saying what was wrong,
and the I/O layer above decides what that costs (an error response, or closing one device).
"""

from __future__ import annotations

__all__ = ["ProtocolError"]


class ProtocolError(ValueError):
    """Bad input from the peer: ``what`` names the field or rule, ``value`` what was seen.

    ``errno`` is the positive errno a response to the offending request should carry
    (negated on the wire), or ``None`` where the error is not request-scoped (ring indexes,
    XenStore nodes) and the right reaction is to close the device.
    """

    def __init__(
        self,
        message: str,
        *,
        what: str = "",
        value: object = None,
        errno: int | None = None,
    ) -> None:
        super().__init__(message)
        self.what = what
        self.value = value
        self.errno = errno
