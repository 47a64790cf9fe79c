"""systemd's notification protocol (``Type=notify``, ``WatchdogSec=``) without libsystemd.

The service manager passes a datagram socket in ``$NOTIFY_SOCKET``; we send ``READY=1`` once
every vdispl device is watched, ``STATUS=…`` lines an admin sees in ``systemctl status``,
``WATCHDOG=1`` from the event loop itself (a stuck loop stops the pings and systemd restarts
us), ``STOPPING=1`` on shutdown, and fds for the fd store (:mod:`displback.systemd.fdstore`).
Outside systemd every call is a no-op.
"""

from __future__ import annotations

import array
import os
import socket

__all__ = ["Notifier"]


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET`` (or to ``address`` for tests)."""

    def __init__(self, address: str | None = None, *, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        raw = address if address is not None else env.get("NOTIFY_SOCKET")
        self._address: str | bytes | None = None
        if raw:
            # A leading '@' names a socket in the abstract namespace.
            self._address = b"\0" + raw[1:].encode() if raw.startswith("@") else raw
        self.watchdog_s = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (``ready=1`` → ``READY=1``); ``False`` if not delivered."""
        if self._address is None:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self._address)
        except OSError:
            return False
        return True

    def send_fds(self, fds: list[int], **fields: str | int) -> bool:
        """Like :meth:`send`, passing ``fds`` along (``SCM_RIGHTS``: the fd store)."""
        if self._address is None:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendmsg([message.encode()], rights, 0, self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send(ready=1, status=status) if status else self.send(ready=1)

    def status(self, status: str) -> bool:
        return self.send(status=status)

    def watchdog(self) -> bool:
        return self.send(watchdog=1)

    def stopping(self) -> bool:
        return self.send(stopping=1)


def _watchdog_interval(env: os._Environ[str] | dict[str, str]) -> float | None:
    """Seconds between pings systemd expects (``WatchdogSec``), or None without a watchdog.

    ``WATCHDOG_PID``, when set, must be ours: the variable may be inherited by children.
    """
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
