"""The compositor's seat, routed to the guest whose window has the focus.

Each ``wl_seat`` the compositor offers is listened to: its keyboard, pointer and touch go
to the :class:`~displback.display.input.InputSink` of the guest connector whose window the
event is for: ``port(domid, devid, index)`` of the
:class:`~displback.display.input.InputPorts` the daemon gives the display
(:attr:`SeatRouter.ports`; the vkbd backend's router). Keyboard events follow keyboard
focus (``wl_keyboard.enter``), pointer events the surface the pointer is in, touch points
the surface they went down on.

* **Keys** are Linux ``KEY_*`` codes: ``wl_keyboard.key`` carries evdev codes (X adds 8).
  The keymap fd the compositor sends is closed at once: the guest has its own keymap.
* **Pointer** positions are surface coordinates, which are the guest connector's pixels
  (the window's buffer is the connector's size, at scale 1; fullscreen centres it), clamped
  to the connector. Buttons are ``BTN_*``. Vertical scrolling becomes wheel clicks: one
  per ``axis_discrete`` step, or per 10 units of ``axis`` (weston's and libinput's unit per
  click) where the compositor sends no discrete steps; Wayland's positive axis is
  downwards, the wheel's positive is away from the user.
* **Focus lost** (keyboard leave, the window destroyed, the compositor gone): the sink's
  ``release_all``, so no key stays pressed in the guest.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

from displback.display.input import InputPorts, InputSink

if TYPE_CHECKING:
    from displback.wayland.window import WaylandOutput

__all__ = ["SeatRouter"]

_SEAT_POINTER, _SEAT_KEYBOARD, _SEAT_TOUCH = 1, 2, 4
_PRESSED = 1
_AXIS_VERTICAL = 0
_UNITS_PER_CLICK = 10.0


class SeatRouter:
    """Listens to the seats of a connection and feeds the focused window's guest."""

    def __init__(self, ports: InputPorts | None) -> None:
        #: Where input goes (None: nowhere, e.g. no vkbd backend); may be set later.
        self.ports = ports
        self._by_surface: dict[Any, WaylandOutput] = {}
        self._pointer: WaylandOutput | None = None
        self._keyboard: WaylandOutput | None = None
        self._touches: dict[int, WaylandOutput] = {}
        self._touched: set[WaylandOutput] = set()
        self._scroll = 0.0
        self._discrete = False
        self._devices: dict[int, list[Any]] = {}  # per seat (by id): its devices

    # -- windows -------------------------------------------------------------------------

    def add_output(self, output: WaylandOutput) -> None:
        output.on_surface = lambda surface, made: self._surface(output, surface, made)

    def remove_output(self, output: WaylandOutput) -> None:
        for surface in [s for s, o in self._by_surface.items() if o is output]:
            self._surface(output, surface, False)

    def _surface(self, output: WaylandOutput, surface: Any, made: bool) -> None:
        if made:
            self._by_surface[surface] = output
            return
        self._by_surface.pop(surface, None)
        self._unfocus(output)

    def _unfocus(self, output: WaylandOutput) -> None:
        held = (
            output is self._keyboard or output is self._pointer or output in self._touches.values()
        )
        if output is self._keyboard:
            self._keyboard = None
        if output is self._pointer:
            self._pointer = None
        for contact in [c for c, o in self._touches.items() if o is output]:
            del self._touches[contact]
        self._touched.discard(output)
        if held:
            sink = self._sink(output)
            if sink is not None:
                sink.release_all()

    def _sink(self, output: WaylandOutput | None) -> InputSink | None:
        if output is None or self.ports is None or output.spec.connector is None:
            return None
        return self.ports.port(*output.spec.connector)

    def connection_lost(self) -> None:
        """The seats are gone with their connection: release what the guests hold."""
        for output in {self._keyboard, self._pointer, *self._touches.values()}:
            if output is not None:
                self._unfocus(output)
        self._by_surface.clear()
        self._devices.clear()

    # -- seats ---------------------------------------------------------------------------

    def add_seat(self, seat: Any) -> None:
        """Listen to ``seat`` (a bound ``wl_seat``): take its devices as it announces them."""
        seat.dispatcher["capabilities"] = self._on_capabilities

    def _on_capabilities(self, seat: Any, capabilities: int) -> None:
        # The seat says again what it has (a device came or went): take them afresh.
        for device in self._devices.pop(id(seat), []):
            if (seat.user_data or 0) >= 3:  # the bound version: release came in 3
                device.release()
        if capabilities & _SEAT_POINTER:
            pointer = seat.get_pointer()
            for event in ("enter", "leave", "motion", "button", "axis", "frame"):
                pointer.dispatcher[event] = getattr(self, f"pointer_{event}")
            if "axis_discrete" in pointer.dispatcher._names:
                pointer.dispatcher["axis_discrete"] = self.pointer_axis_discrete
            self._devices.setdefault(id(seat), []).append(pointer)
        if capabilities & _SEAT_KEYBOARD:
            keyboard = seat.get_keyboard()
            for event in ("keymap", "enter", "leave", "key"):
                keyboard.dispatcher[event] = getattr(self, f"keyboard_{event}")
            self._devices.setdefault(id(seat), []).append(keyboard)
        if capabilities & _SEAT_TOUCH:
            touch = seat.get_touch()
            for event in ("down", "up", "motion", "frame", "cancel"):
                touch.dispatcher[event] = getattr(self, f"touch_{event}")
            self._devices.setdefault(id(seat), []).append(touch)

    # -- pointer (the handlers take the proxy first, as pywayland calls them) --------------

    def _position(self, output: WaylandOutput, x: float, y: float) -> tuple[float, float]:
        w, h, _ = output.mode
        return min(max(x, 0.0), w - 1.0), min(max(y, 0.0), h - 1.0)

    def pointer_enter(self, _p: Any, _serial: int, surface: Any, x: float, y: float) -> None:
        self._pointer = self._by_surface.get(surface)
        sink = self._sink(self._pointer)
        if sink is not None and self._pointer is not None:
            sink.pointer_absolute(*self._position(self._pointer, x, y))

    def pointer_leave(self, _p: Any, _serial: int, _surface: Any) -> None:
        self._pointer = None
        self._scroll = 0.0

    def pointer_motion(self, _p: Any, _time: int, x: float, y: float) -> None:
        sink = self._sink(self._pointer)
        if sink is not None and self._pointer is not None:
            sink.pointer_absolute(*self._position(self._pointer, x, y))

    def pointer_button(self, _p: Any, _serial: int, _time: int, button: int, state: int) -> None:
        sink = self._sink(self._pointer)
        if sink is not None:
            sink.button(button, state == _PRESSED)

    def pointer_axis(self, _p: Any, _time: int, axis: int, value: float) -> None:
        if axis != _AXIS_VERTICAL or self._discrete:
            return
        self._scroll += value
        clicks = int(self._scroll / _UNITS_PER_CLICK)
        if clicks:
            self._scroll -= clicks * _UNITS_PER_CLICK
            self._wheel(clicks)

    def pointer_axis_discrete(self, _p: Any, axis: int, discrete: int) -> None:
        if axis == _AXIS_VERTICAL and discrete:
            self._discrete = True
            self._wheel(discrete)

    def _wheel(self, clicks_down: int) -> None:
        sink = self._sink(self._pointer)
        if sink is not None:
            sink.pointer_relative(0, 0, -clicks_down)

    def pointer_frame(self, _p: Any) -> None:
        self._discrete = False
        sink = self._sink(self._pointer)
        if sink is not None:
            sink.frame()

    # -- keyboard --------------------------------------------------------------------------

    def keyboard_keymap(self, _k: Any, _format: int, fd: int, _size: int) -> None:
        with contextlib.suppress(OSError):
            os.close(fd)

    def keyboard_enter(self, _k: Any, _serial: int, surface: Any, _keys: bytes) -> None:
        # Keys already held when the focus came were pressed for someone else: not sent.
        self._keyboard = self._by_surface.get(surface)

    def keyboard_leave(self, _k: Any, _serial: int, _surface: Any) -> None:
        output, self._keyboard = self._keyboard, None
        sink = self._sink(output)
        if sink is not None:
            sink.release_all()

    def keyboard_key(self, _k: Any, _serial: int, _time: int, key: int, state: int) -> None:
        sink = self._sink(self._keyboard)
        if sink is not None:
            sink.key(key, state == _PRESSED)
            sink.frame()

    # -- touch -----------------------------------------------------------------------------

    def touch_down(
        self, _t: Any, _serial: int, _time: int, surface: Any, contact: int, x: float, y: float
    ) -> None:
        output = self._by_surface.get(surface)
        if output is None:
            return
        self._touches[contact] = output
        self._touched.add(output)
        sink = self._sink(output)
        if sink is not None:
            sink.touch_down(contact, *self._position(output, x, y))

    def touch_motion(self, _t: Any, _time: int, contact: int, x: float, y: float) -> None:
        output = self._touches.get(contact)
        sink = self._sink(output)
        if output is not None:
            self._touched.add(output)
        if sink is not None and output is not None:
            sink.touch_motion(contact, *self._position(output, x, y))

    def touch_up(self, _t: Any, _serial: int, _time: int, contact: int) -> None:
        output = self._touches.pop(contact, None)
        if output is not None:
            self._touched.add(output)  # its frame ends the lift
        sink = self._sink(output)
        if sink is not None:
            sink.touch_up(contact)

    def touch_frame(self, _t: Any) -> None:
        for output in self._touched:
            sink = self._sink(output)
            if sink is not None:
                sink.frame()
        self._touched.clear()

    def touch_cancel(self, _t: Any) -> None:
        for contact, output in list(self._touches.items()):
            sink = self._sink(output)
            if sink is not None:
                sink.touch_up(contact)
                sink.frame()
        self._touches.clear()
        self._touched.clear()
