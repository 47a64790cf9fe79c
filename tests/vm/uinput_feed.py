"""Dom0's side of the VM input scenario: two uinput devices that displback assigns to a guest.

Run in Dom0 (``python -m tests.vm.uinput_feed SHARE``): creates a keyboard-and-mouse
(``displback-vm-keys``: ``KEY_A``, ``BTN_LEFT``, ``REL_X``/``REL_Y``) and a touch screen
(``displback-vm-touch``: multi-touch slots over 1024x768), writes ``SHARE/uinput-ready``,
waits for ``SHARE/uinput-go`` (the harness writes it once the daemon has grabbed both), then
sends :data:`KEYS` and :data:`TOUCH`, writes ``SHARE/uinput-sent`` and keeps the devices
until ``SHARE/uinput-stop`` appears (or 300 s).
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from displback.evdev import uapi

KEY_A = 30
BTN_LEFT = 0x110
INPUT_PROP_DIRECT = 0x01
UI_SET_PROPBIT = uapi.ioc(1, "U", 110, 4)
SYN = (uapi.EV_SYN, uapi.SYN_REPORT, 0)
KEYS = [
    (uapi.EV_KEY, KEY_A, 1),
    SYN,
    (uapi.EV_KEY, KEY_A, 0),
    SYN,
    (uapi.EV_REL, uapi.REL_X, 10),
    (uapi.EV_REL, uapi.REL_Y, 20),
    SYN,
    (uapi.EV_KEY, BTN_LEFT, 1),
    SYN,
    (uapi.EV_KEY, BTN_LEFT, 0),
    SYN,
]
TOUCH = [
    (uapi.EV_ABS, uapi.ABS_MT_SLOT, 0),
    (uapi.EV_ABS, uapi.ABS_MT_TRACKING_ID, 1),
    (uapi.EV_ABS, uapi.ABS_MT_POSITION_X, 512),
    (uapi.EV_ABS, uapi.ABS_MT_POSITION_Y, 384),
    (uapi.EV_KEY, uapi.BTN_TOUCH, 1),
    SYN,
    (uapi.EV_ABS, uapi.ABS_MT_TRACKING_ID, -1),
    (uapi.EV_KEY, uapi.BTN_TOUCH, 0),
    SYN,
]


def create(name: str, setup: list[tuple[int, int]], axes: list[tuple[int, int, int]]) -> int:
    fd = os.open("/dev/uinput", os.O_WRONLY | os.O_NONBLOCK)
    for request, value in setup:
        fcntl.ioctl(fd, request, value)
    for code, low, high in axes:
        fcntl.ioctl(fd, uapi.UI_ABS_SETUP, uapi.UINPUT_ABS_SETUP.pack(code, 0, low, high, 0, 0, 0))
    fcntl.ioctl(fd, uapi.UI_DEV_SETUP, uapi.UINPUT_SETUP.pack(3, 0x5844, 1, 1, name.encode(), 0))
    fcntl.ioctl(fd, uapi.UI_DEV_CREATE)
    return fd


def send(fd: int, events: list[tuple[int, int, int]]) -> None:
    for event in events:
        os.write(fd, uapi.pack_event(*event))
        if event == SYN:
            time.sleep(0.05)


def wait_for(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def main() -> None:
    share = Path(sys.argv[1])
    keys = create(
        "displback-vm-keys",
        [
            (uapi.UI_SET_EVBIT, uapi.EV_KEY),
            (uapi.UI_SET_KEYBIT, KEY_A),
            (uapi.UI_SET_KEYBIT, BTN_LEFT),
            (uapi.UI_SET_EVBIT, uapi.EV_REL),
            (uapi.UI_SET_RELBIT, uapi.REL_X),
            (uapi.UI_SET_RELBIT, uapi.REL_Y),
        ],
        [],
    )
    touch = create(
        "displback-vm-touch",
        [
            (uapi.UI_SET_EVBIT, uapi.EV_KEY),
            (uapi.UI_SET_KEYBIT, uapi.BTN_TOUCH),
            (uapi.UI_SET_EVBIT, uapi.EV_ABS),
            (UI_SET_PROPBIT, INPUT_PROP_DIRECT),
            *(
                (uapi.UI_SET_ABSBIT, code)
                for code in (
                    uapi.ABS_MT_SLOT,
                    uapi.ABS_MT_TRACKING_ID,
                    uapi.ABS_MT_POSITION_X,
                    uapi.ABS_MT_POSITION_Y,
                )
            ),
        ],
        [
            (uapi.ABS_MT_SLOT, 0, 9),
            (uapi.ABS_MT_TRACKING_ID, 0, 65535),
            (uapi.ABS_MT_POSITION_X, 0, 1023),
            (uapi.ABS_MT_POSITION_Y, 0, 767),
        ],
    )
    (share / "uinput-ready").write_text("ready\n")
    if wait_for(share / "uinput-go", 300):
        send(keys, KEYS)
        send(touch, TOUCH)
        (share / "uinput-sent").write_text("sent\n")
        wait_for(share / "uinput-stop", 300)
    for fd in (keys, touch):
        fcntl.ioctl(fd, uapi.UI_DEV_DESTROY)
        os.close(fd)


if __name__ == "__main__":
    main()
