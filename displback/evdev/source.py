"""A configured Dom0 input device feeding a guest: found, grabbed, read, and found again.

One :class:`EvdevSource` per ``[[input]]`` entry of the configuration runs as a task for the
daemon's life. While the device is absent it looks for it every ``poll_s`` (by path — a
``/dev/input/by-id`` or ``by-path`` link is followed each time — or by the evdev name among
``/dev/input/event*``); once present it opens and grabs it (``EVIOCGRAB``: Dom0 no longer
sees its events), reads it whenever it is readable and translates its events
(:mod:`.translate`) into the guest's :class:`~displback.display.input.InputSink`. An unplugged
device (``ENODEV``) releases everything the guest held pressed and is looked for again;
a device another client holds grabbed (``EBUSY``) is retried at the same pace.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from displback.display.input import InputSink
from displback.evdev.device import DeviceGone, EvdevDevice
from displback.evdev.translate import EvdevTranslator

__all__ = ["EvdevSource", "InputAssignment"]


@dataclass(frozen=True)
class InputAssignment:
    """One ``[[input]]`` entry: which device (``device`` path or evdev ``name``) feeds which
    guest connector (``guest`` name or domid, vdispl ``devid``, ``connector`` index)."""

    guest: str | int
    device: str | None = None
    name: str | None = None
    devid: int = 0
    connector: int = 0
    grab: bool = True

    def describe(self) -> str:
        return self.device if self.device is not None else f"name {self.name!r}"


class EvdevSource:
    """Feeds ``sink`` from the device ``assignment`` names, while it exists."""

    def __init__(
        self,
        assignment: InputAssignment,
        sink: InputSink,
        *,
        poll_s: float = 1.0,
        input_dir: str = "/dev/input",
        open_device: Callable[[str], EvdevDevice] = EvdevDevice,
        log: Any = None,
    ) -> None:
        self._open = open_device
        self.assignment = assignment
        self.sink = sink
        self.poll_s = poll_s
        self.input_dir = input_dir
        base = log if log is not None else structlog.get_logger("displback.input")
        self.log = base.bind(input=assignment.describe(), guest=assignment.guest)
        #: Times the device was opened, and events read from it.
        self.opened = 0
        self.events = 0
        self.present = False

    def find(self) -> str | None:
        """The device's node now, or None."""
        if self.assignment.device is not None:
            path = os.path.realpath(self.assignment.device)
            return path if os.path.exists(path) else None
        for path in sorted(glob.glob(os.path.join(self.input_dir, "event*"))):
            if self._name_of(path) == self.assignment.name:
                return path
        return None

    def _name_of(self, path: str) -> str | None:
        try:
            device = self._open(path)
        except OSError:
            return None
        try:
            return device.name()
        except OSError:
            return None
        finally:
            device.close()

    async def run(self) -> None:
        """Serve the device until cancelled."""
        waiting_logged = False
        while True:
            path = self.find()
            if path is None:
                if not waiting_logged:
                    self.log.info("input device absent; waiting for it")
                    waiting_logged = True
                await trio.sleep(self.poll_s)
                continue
            try:
                device = self._open(path)
            except OSError as exc:
                self.log.warning("cannot open input device", path=path, error=str(exc))
                await trio.sleep(self.poll_s)
                continue
            try:
                await self._serve(device)
                waiting_logged = False
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    self.log.warning("input device grabbed by another client", path=path)
                else:
                    self.log.warning("input device failed", path=path, error=str(exc))
                await trio.sleep(self.poll_s)
            finally:
                device.close()

    async def _serve(self, device: EvdevDevice) -> None:
        if self.assignment.grab:
            device.grab()
        caps = device.capabilities()
        translator = EvdevTranslator(caps, self.sink)
        self.opened += 1
        self.present = True
        self.log.info("input device attached", path=device.path, name=device.name())
        try:
            while True:
                await trio.lowlevel.wait_readable(device.fileno())
                events = device.read()
                self.events += len(events)
                translator.feed(events)
        except DeviceGone:
            self.log.info("input device gone", path=device.path)
        finally:
            self.present = False
            with contextlib.suppress(Exception):
                translator.reset()
