"""Routes input to the guest's vkbd devices: guest connector → the sinks serving it now.

Input sources (a Wayland window's seat, a Dom0 evdev device assigned in the configuration)
and the vkbd devices that carry input into guests live and die independently: a window
exists while the guest's connector is shown, a vkbd device while the guest's ``xen-kbdfront``
is connected, and either may come back. :class:`InputRouter` joins them by the key both
know, the guest connector ``(domid, devid, index)`` (:class:`InputTarget`):

* a **source** asks :meth:`InputRouter.port` once for the connector it feeds and keeps the
  :class:`InputPort` (an :class:`~displback.display.input.InputSink`) for as long as it
  lives; ``run`` hands the router to the display as its
  :class:`~displback.display.input.InputPorts`;
* a **vkbd device** (:mod:`displback.backend.vkbd`) binds its sink to the connector it serves
  (:meth:`InputRouter.bind`) while it is connected, and unbinds when it disconnects.

A port forwards each event to every sink bound to its target at that moment (normally one:
a guest has one vkbd per connector) and counts events that found none (``dropped``). The
router keeps no port or binding a guest can create: ports exist for the keys sources ask
for (the admin's configuration, the display's connectors) and bindings only while a
device is connected, so nothing grows with guest activity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

from displback.display.input import InputSink

__all__ = ["InputPort", "InputRouter", "InputTarget"]


class InputTarget(NamedTuple):
    """A guest connector input is routed to: vdispl connector ``connector`` of device ``devid``
    of domain ``domid`` (the key outputs are assigned by, ``"<domid>/<devid>/<index>"``)."""

    domid: int
    devid: int
    connector: int

    def __str__(self) -> str:
        return f"{self.domid}/{self.devid}/{self.connector}"


class InputPort:
    """One connector's stable sink: forwards to whatever is bound to the target right now."""

    def __init__(self, router: InputRouter, target: InputTarget) -> None:
        self._router = router
        self.target = target
        #: Events forwarded to at least one sink, and events that found none.
        self.delivered = 0
        self.dropped = 0

    def _sinks(self) -> tuple[InputSink, ...]:
        sinks = self._router.sinks(self.target)
        if sinks:
            self.delivered += 1
        else:
            self.dropped += 1
        return sinks

    @property
    def space(self) -> tuple[int, int] | None:
        for sink in self._router.sinks(self.target):
            return sink.space
        return None

    def key(self, code: int, pressed: bool) -> None:
        for sink in self._sinks():
            sink.key(code, pressed)

    def button(self, code: int, pressed: bool) -> None:
        for sink in self._sinks():
            sink.button(code, pressed)

    def pointer_absolute(self, x: float, y: float) -> None:
        for sink in self._sinks():
            sink.pointer_absolute(x, y)

    def pointer_relative(self, dx: int, dy: int, dz: int = 0) -> None:
        for sink in self._sinks():
            sink.pointer_relative(dx, dy, dz)

    def touch_down(self, contact: int, x: float, y: float) -> None:
        for sink in self._sinks():
            sink.touch_down(contact, x, y)

    def touch_motion(self, contact: int, x: float, y: float) -> None:
        for sink in self._sinks():
            sink.touch_motion(contact, x, y)

    def touch_up(self, contact: int) -> None:
        for sink in self._sinks():
            sink.touch_up(contact)

    def frame(self) -> None:
        for sink in self._router.sinks(self.target):  # not an event of its own: not counted
            sink.frame()

    def release_all(self) -> None:
        for sink in self._router.sinks(self.target):
            sink.release_all()


class InputRouter:
    """Ports for sources, bindings for vkbd devices; implements ``InputPorts``."""

    def __init__(self) -> None:
        self._ports: dict[InputTarget, InputPort] = {}
        self._bound: dict[InputTarget, list[InputSink]] = {}

    def port(self, domid: int, devid: int, index: int) -> InputPort:
        target = InputTarget(domid, devid, index)
        port = self._ports.get(target)
        if port is None:
            port = self._ports[target] = InputPort(self, target)
        return port

    def ports(self) -> list[InputPort]:
        """Every port a source asked for (for status)."""
        return list(self._ports.values())

    def sinks(self, target: InputTarget) -> tuple[InputSink, ...]:
        """The sinks bound to ``target`` now, in binding order."""
        return tuple(self._bound.get(target, ()))

    def bind(self, target: InputTarget, sink: InputSink) -> Callable[[], None]:
        """Route ``target``'s input to ``sink`` too; returns the function that unbinds it
        (idempotent)."""
        self._bound.setdefault(target, []).append(sink)

        def unbind() -> None:
            sinks = self._bound.get(target)
            if sinks is None or sink not in sinks:
                return
            sinks.remove(sink)
            if not sinks:
                del self._bound[target]

        return unbind

    @contextmanager
    def bound(self, target: InputTarget, sink: InputSink) -> Iterator[None]:
        """:meth:`bind` for the duration of a ``with`` block."""
        unbind = self.bind(target, sink)
        try:
            yield
        finally:
            unbind()
