"""systemd's file-descriptor store: memory a guest may still map survives a daemon restart.

A service with ``FileDescriptorStoreMax=`` may hand fds to systemd (``FDSTORE=1`` with
``FDNAME=<name>``, the fds passed by ``SCM_RIGHTS`` over ``$NOTIFY_SOCKET``) and drop them
again (``FDSTOREREMOVE=1`` with ``FDNAME=``). systemd keeps them while the service restarts and
passes them to the next start like socket activation: fds from 3 on, ``$LISTEN_FDS`` of them,
``$LISTEN_FDNAMES`` their names separated by ``:``, ``$LISTEN_PID`` our pid. Without systemd
every call is a no-op and nothing is inherited.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import MutableMapping

from displback.systemd.sdnotify import Notifier

__all__ = ["SD_LISTEN_FDS_START", "FdStore", "inherited_fds", "valid_name"]

#: The first fd number systemd passes (``SD_LISTEN_FDS_START``).
SD_LISTEN_FDS_START = 3
_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,255}")  # printable ASCII, no ':' (systemd's rule)


def valid_name(name: str) -> bool:
    """Whether systemd accepts ``name`` as an ``FDNAME``."""
    return _NAME.fullmatch(name) is not None


class FdStore:
    """Hands fds to systemd's store and takes them out again (through ``notifier``)."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier

    @property
    def enabled(self) -> bool:
        return self._notifier.enabled

    def add(self, name: str, fd: int) -> bool:
        """Store a duplicate of ``fd`` under ``name``; ``False`` if not delivered."""
        if not valid_name(name):
            raise ValueError(f"not a valid FDNAME: {name!r}")
        return self._notifier.send_fds([fd], fdstore=1, fdname=name)

    def remove(self, name: str) -> bool:
        """Drop every stored fd named ``name``."""
        if not valid_name(name):
            raise ValueError(f"not a valid FDNAME: {name!r}")
        return self._notifier.send(fdstoreremove=1, fdname=name)


def inherited_fds(
    environ: MutableMapping[str, str] | None = None, *, first_fd: int = SD_LISTEN_FDS_START
) -> list[tuple[str, int]]:
    """The ``(name, fd)`` pairs systemd passed us (empty outside systemd), once.

    The variables are removed from ``environ`` (children must not take them for theirs) and
    every fd is made close-on-exec. A fd without a name gets ``"unknown"``.
    """
    env = os.environ if environ is None else environ
    count_raw = env.pop("LISTEN_FDS", None)
    pid_raw = env.pop("LISTEN_PID", None)
    names_raw = env.pop("LISTEN_FDNAMES", None)
    if not count_raw or pid_raw != str(os.getpid()):
        return []
    try:
        count = int(count_raw)
    except ValueError:
        return []
    names = names_raw.split(":") if names_raw else []
    result = []
    for index in range(max(0, count)):
        fd = first_fd + index
        with contextlib.suppress(OSError):
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            result.append((names[index] if index < len(names) else "unknown", fd))
    return result
