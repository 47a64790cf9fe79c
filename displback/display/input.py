"""What an input source feeds a guest: keys, pointer, touch — the seat side of an output.

A guest's keyboard, pointer and touch screen are served by the vkbd backend (Xen's kbdif,
Linux's ``xen-kbdfront``; :mod:`displback.backend.vkbd`). Whatever produces input for a
guest — a Wayland window's seat, a Dom0 evdev device assigned to the guest — programs
against the two protocols here and never learns whether, or how many, vkbd devices of the
guest are connected right now. They sit in the display layer so that an output (which may
not import the backend) can take input too.

How an output finds the guest's keyboard
----------------------------------------
Input is routed per **guest connector**, the same key outputs are assigned by:
``(domid, devid, index)`` of a vdispl connector. :meth:`InputPorts.port` answers an
:class:`InputSink` for one connector; the object stays valid for the daemon's life (keep it
as long as the window or source lives): events go to the vkbd devices of that domain that
serve the connector *while they are connected*, and are dropped (counted) otherwise, so a
guest that reboots or has no vkbd at all costs the source nothing. The backend's
:class:`~displback.backend.input.InputRouter` implements :class:`InputPorts`; ``run`` hands
it to the display and to the evdev sources.

Rules for callers
-----------------
* Call from the trio thread (the daemon's event loop); no method blocks or awaits. Events
  are queued by the guest's device and published to its page from its own task.
* **Coordinates** are in the guest connector's pixel space: ``0 <= x < width`` of the
  connector's resolution (floats allowed — a scaled window gives sub-pixel positions);
  values outside are clamped. The guest's device scales them to the range it told the
  guest. :attr:`InputSink.space` is that resolution, or None while unknown (no vkbd
  connected): an absolute source with its own range (a touch screen) scales into it.
* **Codes** are Linux's ``KEY_*``/``BTN_*`` numbers (``linux/input-event-codes.h``), as evdev
  and Wayland (``wl_keyboard.key`` + 8 is X's, the raw value is Linux's) deliver them.
* **Touch contacts** carry the source's own ids (any int: Wayland's ``id``, evdev's tracking
  id); the device maps them to the guest's contact slots, and drops contacts beyond the
  number of slots it offered.
* :meth:`InputSink.frame` ends a group of events that belong together (``wl_pointer.frame``,
  ``wl_touch.frame``, evdev ``SYN_REPORT``); a source without frames may call it after every
  event. :meth:`InputSink.release_all` lifts every key, button and contact the guest still
  sees pressed: call it when the source loses focus or goes away, so the guest is not left
  with a stuck key.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["InputPorts", "InputSink"]


class InputSink(Protocol):
    """Input events for one guest connector; see the module docstring for the rules."""

    @property
    def space(self) -> tuple[int, int] | None:
        """The connector's resolution (width, height) coordinates are given in, if known."""
        ...

    def key(self, code: int, pressed: bool) -> None:
        """A key (``KEY_*``) went down or up."""
        ...

    def button(self, code: int, pressed: bool) -> None:
        """A pointer button (``BTN_LEFT`` …) went down or up."""
        ...

    def pointer_absolute(self, x: float, y: float) -> None:
        """The pointer is at (x, y) of the connector (pixels)."""
        ...

    def pointer_relative(self, dx: int, dy: int, dz: int = 0) -> None:
        """The pointer moved by (dx, dy); ``dz`` is wheel clicks (positive: away from the
        user, as evdev's ``REL_WHEEL``)."""
        ...

    def touch_down(self, contact: int, x: float, y: float) -> None:
        """Contact ``contact`` touched at (x, y) of the connector (pixels)."""
        ...

    def touch_motion(self, contact: int, x: float, y: float) -> None:
        """Contact ``contact`` moved to (x, y)."""
        ...

    def touch_up(self, contact: int) -> None:
        """Contact ``contact`` was lifted."""
        ...

    def frame(self) -> None:
        """The events since the last frame belong together (ends a touch frame)."""
        ...

    def release_all(self) -> None:
        """Release every key and button and lift every contact this sink holds pressed."""
        ...


class InputPorts(Protocol):
    """Finds the input sink of a guest connector."""

    def port(self, domid: int, devid: int, index: int) -> InputSink:
        """The sink of connector ``index`` of vdispl device ``devid`` of domain ``domid``;
        the same object for the same key, valid for the daemon's life."""
        ...
