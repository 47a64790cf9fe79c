"""One open Dom0 input device (``/dev/input/event*``): its name, axes, grab and events.

Plain ``open``/``ioctl``/``read`` with the numbers of :mod:`.uapi`, as the KMS and Xen
bindings do theirs — no C extension to build. The descriptor is non-blocking: the caller
waits for it to be readable (trio) and calls :meth:`EvdevDevice.read`, which returns the
whole events available. A device that was unplugged fails its read with ``ENODEV``
(:class:`DeviceGone`). The ``ioctl`` function can be injected (tests).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from typing import Any

from displback.evdev import uapi
from displback.evdev.translate import Axis, Capabilities
from displback.evdev.uapi import InputEvent

__all__ = ["DeviceGone", "EvdevDevice"]

Ioctl = Callable[[int, int, Any], Any]
#: Events taken in one read (the kernel's own client buffer is larger; more come next read).
_READ_EVENTS = 64


class DeviceGone(OSError):
    """The device was unplugged (``ENODEV``)."""


def _bits(raw: bytes) -> set[int]:
    return {n for n in range(len(raw) * 8) if raw[n // 8] >> (n % 8) & 1}


class EvdevDevice:
    """An open evdev node; :meth:`close` releases the grab with the descriptor."""

    def __init__(self, path: str, *, ioctl: Ioctl = fcntl.ioctl) -> None:
        self.path = path
        self._ioctl = ioctl
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.grabbed = False

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("device closed")
        return self._fd

    def name(self) -> str:
        buf = bytearray(256)
        self._ioctl(self.fileno(), uapi.EVIOCGNAME(len(buf)), buf)
        return bytes(buf).split(b"\0", 1)[0].decode("utf-8", "replace")

    def _event_bits(self, ev: int, count: int) -> set[int]:
        buf = bytearray((count + 7) // 8)
        self._ioctl(self.fileno(), uapi.EVIOCGBIT(ev, len(buf)), buf)
        return _bits(bytes(buf))

    def _axis(self, code: int) -> Axis:
        buf = bytearray(uapi.ABSINFO.size)
        self._ioctl(self.fileno(), uapi.EVIOCGABS(code), buf)
        _value, minimum, maximum, *_ = uapi.ABSINFO.unpack(buf)
        return Axis(minimum, maximum)

    def capabilities(self) -> Capabilities:
        """The device's absolute axes (``EVIOCGBIT(EV_ABS)`` + ``EVIOCGABS``)."""
        axes = self._event_bits(uapi.EV_ABS, uapi.ABS_CNT)

        def axis(code: int) -> Axis | None:
            return self._axis(code) if code in axes else None

        return Capabilities(
            abs_x=axis(uapi.ABS_X),
            abs_y=axis(uapi.ABS_Y),
            mt_x=axis(uapi.ABS_MT_POSITION_X) if uapi.ABS_MT_SLOT in axes else None,
            mt_y=axis(uapi.ABS_MT_POSITION_Y) if uapi.ABS_MT_SLOT in axes else None,
        )

    def grab(self) -> None:
        """``EVIOCGRAB``: only we get its events (Dom0's console and compositor do not);
        ``EBUSY`` if another client holds it."""
        self._ioctl(self.fileno(), uapi.EVIOCGRAB, 1)
        self.grabbed = True

    def read(self) -> list[InputEvent]:
        """The events available now (empty if none); :class:`DeviceGone` once unplugged."""
        try:
            data = os.read(self.fileno(), uapi.EVENT.size * _READ_EVENTS)
        except BlockingIOError:
            return []
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise DeviceGone(errno.ENODEV, f"{self.path}: device gone") from None
            raise
        if not data:  # end of file: no evdev node gives it while it exists
            raise DeviceGone(errno.ENODEV, f"{self.path}: end of file")
        return uapi.parse_events(data)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing releases the grab

