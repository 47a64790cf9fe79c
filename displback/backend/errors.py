"""Why a request failed, as the errno its response carries.

Handlers raise :class:`RequestError`; the connector turns it into ``Response.error`` (status
``-errno``) and one log line. Nothing else about the guest's device changes: a bad request
costs the guest that request, never its connection.
"""

from __future__ import annotations

__all__ = ["RequestError"]


class RequestError(Exception):
    """Answer the current request with ``-errno``; ``message`` says why, for the log."""

    def __init__(self, errno: int, message: str) -> None:
        if errno <= 0:
            raise ValueError("errno must be a positive errno value")
        super().__init__(message)
        self.errno = errno
        self.message = message
