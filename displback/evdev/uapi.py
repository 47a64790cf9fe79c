"""The evdev and uinput numbers and layouts displback uses, from Linux's uapi headers.

Nothing here does I/O. ``tests/evdev/test_uapi.py`` compares every size and ioctl number
with a C program compiled against ``linux/input.h`` and ``linux/uinput.h``. The layouts are
those of 64-bit Linux (x86-64, arm64), where ``struct input_event`` is 24 bytes: a
``struct timeval`` of two longs, then ``type`` u16, ``code`` u16, ``value`` s32.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

__all__ = [
    "ABSINFO",
    "EVENT",
    "InputEvent",
    "ioc",
    "parse_events",
]

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def ioc(direction: int, kind: str, nr: int, size: int) -> int:
    """Linux's generic ``_IOC(dir, type, nr, size)`` (x86/ARM encoding)."""
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


#: ``struct input_event`` (native longs for the timeval, as the kernel writes it).
EVENT: Final = struct.Struct("@llHHi")
#: ``struct input_absinfo``: value, minimum, maximum, fuzz, flat, resolution.
ABSINFO: Final = struct.Struct("@6i")
#: ``struct uinput_setup``: input_id (bustype, vendor, product, version), name[80], ff max.
UINPUT_SETUP: Final = struct.Struct("@4H80sI")
#: ``struct uinput_abs_setup``: code, 2 bytes padding, input_absinfo.
UINPUT_ABS_SETUP: Final = struct.Struct("@H2x6i")
UINPUT_MAX_NAME_SIZE: Final = 80

# Event types and codes (linux/input-event-codes.h).
EV_SYN: Final = 0x00
EV_KEY: Final = 0x01
EV_REL: Final = 0x02
EV_ABS: Final = 0x03
SYN_REPORT: Final = 0
SYN_DROPPED: Final = 3
REL_X: Final = 0x00
REL_Y: Final = 0x01
REL_WHEEL: Final = 0x08
ABS_X: Final = 0x00
ABS_Y: Final = 0x01
ABS_MT_SLOT: Final = 0x2F
ABS_MT_POSITION_X: Final = 0x35
ABS_MT_POSITION_Y: Final = 0x36
ABS_MT_TRACKING_ID: Final = 0x39
ABS_CNT: Final = 0x40
KEY_CNT: Final = 0x300
BTN_MOUSE: Final = 0x110
BTN_TASK: Final = 0x117
BTN_TOOL_PEN: Final = 0x140
BTN_TOUCH: Final = 0x14A

# ioctls.
EVIOCGRAB: Final = ioc(_IOC_WRITE, "E", 0x90, 4)


def EVIOCGNAME(length: int) -> int:  # noqa: N802 - the kernel's name
    return ioc(_IOC_READ, "E", 0x06, length)


def EVIOCGBIT(ev: int, length: int) -> int:  # noqa: N802
    return ioc(_IOC_READ, "E", 0x20 + ev, length)


def EVIOCGABS(axis: int) -> int:  # noqa: N802
    return ioc(_IOC_READ, "E", 0x40 + axis, ABSINFO.size)


UI_DEV_CREATE: Final = ioc(_IOC_NONE, "U", 1, 0)
UI_DEV_DESTROY: Final = ioc(_IOC_NONE, "U", 2, 0)
UI_DEV_SETUP: Final = ioc(_IOC_WRITE, "U", 3, UINPUT_SETUP.size)
UI_ABS_SETUP: Final = ioc(_IOC_WRITE, "U", 4, UINPUT_ABS_SETUP.size)
UI_SET_EVBIT: Final = ioc(_IOC_WRITE, "U", 100, 4)
UI_SET_KEYBIT: Final = ioc(_IOC_WRITE, "U", 101, 4)
UI_SET_RELBIT: Final = ioc(_IOC_WRITE, "U", 102, 4)
UI_SET_ABSBIT: Final = ioc(_IOC_WRITE, "U", 103, 4)

#: Every ioctl number above, for the layout test.
IOCTLS: Final = {
    "EVIOCGRAB": EVIOCGRAB,
    "EVIOCGNAME(256)": EVIOCGNAME(256),
    "EVIOCGBIT(EV_KEY, 96)": EVIOCGBIT(EV_KEY, 96),
    "EVIOCGABS(ABS_MT_POSITION_X)": EVIOCGABS(ABS_MT_POSITION_X),
    "UI_DEV_CREATE": UI_DEV_CREATE,
    "UI_DEV_DESTROY": UI_DEV_DESTROY,
    "UI_DEV_SETUP": UI_DEV_SETUP,
    "UI_ABS_SETUP": UI_ABS_SETUP,
    "UI_SET_EVBIT": UI_SET_EVBIT,
    "UI_SET_KEYBIT": UI_SET_KEYBIT,
    "UI_SET_RELBIT": UI_SET_RELBIT,
    "UI_SET_ABSBIT": UI_SET_ABSBIT,
}
#: Struct sizes, for the layout test.
SIZES: Final = {
    "input_event": EVENT.size,
    "input_absinfo": ABSINFO.size,
    "uinput_setup": UINPUT_SETUP.size,
    "uinput_abs_setup": UINPUT_ABS_SETUP.size,
}


class InputEvent(NamedTuple):
    """One ``struct input_event`` without its time stamp."""

    type: int
    code: int
    value: int


def parse_events(data: bytes) -> list[InputEvent]:
    """The whole events in ``data`` (a read of the device returns whole events only)."""
    usable = len(data) - len(data) % EVENT.size
    return [
        InputEvent(t, c, v) for _s, _us, t, c, v in EVENT.iter_unpack(memoryview(data)[:usable])
    ]


def pack_event(type_: int, code: int, value: int) -> bytes:
    """An event as written to uinput (time stamp 0: the kernel stamps it)."""
    return EVENT.pack(0, 0, type_, code, value)
