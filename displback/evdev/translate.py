"""Evdev events → an input sink, sans-I/O: what one Dom0 device means to a guest.

:class:`EvdevTranslator` is fed the events read from one device (:meth:`feed`) and calls
an :class:`~displback.display.input.InputSink`; it does no I/O. What a device is follows
from its capabilities (:class:`Capabilities`, read once when it is opened):

* keys (``EV_KEY`` codes outside the button ranges) → :meth:`InputSink.key`, autorepeat
  (value 2) as a press again (the guest's virtual keyboard has no repeat of its own);
  mouse buttons ``BTN_LEFT`` … ``BTN_TASK`` → :meth:`InputSink.button`;
* relative axes (``REL_X``/``REL_Y``/``REL_WHEEL``) summed up to the ``SYN_REPORT`` →
  one :meth:`InputSink.pointer_relative`;
* absolute ``ABS_X``/``ABS_Y`` without multi-touch (a tablet, a single-touch screen) →
  :meth:`InputSink.pointer_absolute` scaled from the axis' range onto the connector's pixels
  (:attr:`InputSink.space`; dropped while unknown), ``BTN_TOUCH`` as ``BTN_LEFT``;
* multi-touch (protocol B: ``ABS_MT_SLOT``, ``ABS_MT_TRACKING_ID``, ``ABS_MT_POSITION_X/Y``)
  → ``touch_down``/``touch_motion``/``touch_up`` per slot at each ``SYN_REPORT``, the slot
  number being the contact id;
* ``SYN_REPORT`` ends a frame (:meth:`InputSink.frame`); ``SYN_DROPPED`` (the kernel's buffer
  overflowed) discards up to the next ``SYN_REPORT`` and releases everything held
  (:meth:`InputSink.release_all`), since what was lost may have been releases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from displback.display.input import InputSink
from displback.evdev import uapi
from displback.evdev.uapi import InputEvent

__all__ = ["Axis", "Capabilities", "EvdevTranslator"]


class Axis(NamedTuple):
    """An absolute axis' range (``input_absinfo`` minimum and maximum)."""

    minimum: int
    maximum: int

    def scale(self, value: int, pixels: int) -> float:
        """``value`` of this axis on ``0 .. pixels - 1``."""
        span = max(self.maximum - self.minimum, 1)
        return min(max(value - self.minimum, 0), span) * (pixels - 1) / span


@dataclass(frozen=True)
class Capabilities:
    """What a device reports: its absolute axes (None where it has none)."""

    abs_x: Axis | None = None
    abs_y: Axis | None = None
    mt_x: Axis | None = None
    mt_y: Axis | None = None

    @property
    def multi_touch(self) -> bool:
        return self.mt_x is not None and self.mt_y is not None

    @property
    def absolute(self) -> bool:
        return self.abs_x is not None and self.abs_y is not None


@dataclass
class _Slot:
    tracking_id: int = -1
    x: int = 0
    y: int = 0
    down: bool = False  # touch_down sent
    changed: bool = False


@dataclass
class EvdevTranslator:
    """One device's events to ``sink``; see the module docstring."""

    caps: Capabilities
    sink: InputSink
    _dx: int = 0
    _dy: int = 0
    _wheel: int = 0
    _abs: list[int] = field(default_factory=lambda: [0, 0])
    _abs_changed: bool = False
    _slot: int = 0
    _slots: dict[int, _Slot] = field(default_factory=dict)
    _dropping: bool = False

    def feed(self, events: list[InputEvent]) -> None:
        for event in events:
            if self._dropping:
                if event.type == uapi.EV_SYN and event.code == uapi.SYN_REPORT:
                    self._dropping = False
                    self.reset()
                continue
            if event.type == uapi.EV_SYN:
                if event.code == uapi.SYN_REPORT:
                    self._report()
                elif event.code == uapi.SYN_DROPPED:
                    self._dropping = True
            elif event.type == uapi.EV_KEY:
                self._key(event.code, event.value)
            elif event.type == uapi.EV_REL:
                self._rel(event.code, event.value)
            elif event.type == uapi.EV_ABS:
                self._absolute(event.code, event.value)

    def reset(self) -> None:
        """Forget what is held and tell the guest everything is released."""
        self._dx = self._dy = self._wheel = 0
        self._abs_changed = False
        self._slots.clear()
        self.sink.release_all()

    def _key(self, code: int, value: int) -> None:
        if uapi.BTN_MOUSE <= code <= uapi.BTN_TASK:
            self.sink.button(code, value != 0)
        elif code == uapi.BTN_TOUCH:
            if self.caps.absolute and not self.caps.multi_touch:
                self.sink.button(uapi.BTN_MOUSE, value != 0)
        elif 0x100 <= code < 0x160:
            return  # joystick, tool and other buttons: nothing a guest keyboard has
        elif 0 < code < uapi.KEY_CNT:
            self.sink.key(code, value != 0)

    def _rel(self, code: int, value: int) -> None:
        if code == uapi.REL_X:
            self._dx += value
        elif code == uapi.REL_Y:
            self._dy += value
        elif code == uapi.REL_WHEEL:
            self._wheel += value

    def _absolute(self, code: int, value: int) -> None:
        if code in (uapi.ABS_X, uapi.ABS_Y):
            self._abs[code] = value
            self._abs_changed = True
        elif code == uapi.ABS_MT_SLOT:
            self._slot = value
        elif code in (uapi.ABS_MT_TRACKING_ID, uapi.ABS_MT_POSITION_X, uapi.ABS_MT_POSITION_Y):
            if not 0 <= self._slot < 64:
                return  # no device has more slots; a bogus one is ignored
            slot = self._slots.setdefault(self._slot, _Slot())
            if code == uapi.ABS_MT_TRACKING_ID:
                slot.tracking_id = value
            elif code == uapi.ABS_MT_POSITION_X:
                slot.x = value
            else:
                slot.y = value
            slot.changed = True

    def _report(self) -> None:
        sink = self.sink
        if self._dx or self._dy or self._wheel:
            sink.pointer_relative(self._dx, self._dy, self._wheel)
            self._dx = self._dy = self._wheel = 0
        space = sink.space
        caps = self.caps
        if self._abs_changed and caps.abs_x and caps.abs_y and not caps.multi_touch and space:
            sink.pointer_absolute(
                caps.abs_x.scale(self._abs[0], space[0]), caps.abs_y.scale(self._abs[1], space[1])
            )
        self._abs_changed = False
        if caps.mt_x and caps.mt_y:
            for number, slot in sorted(self._slots.items()):
                if not slot.changed:
                    continue
                slot.changed = False
                if slot.tracking_id < 0:
                    if slot.down:
                        sink.touch_up(number)
                    del self._slots[number]
                elif space is not None:
                    x, y = caps.mt_x.scale(slot.x, space[0]), caps.mt_y.scale(slot.y, space[1])
                    if slot.down:
                        sink.touch_motion(number, x, y)
                    else:
                        sink.touch_down(number, x, y)
                        slot.down = True
        sink.frame()
