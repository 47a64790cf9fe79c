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
  (:meth:`InputRouter.bind`) while it is connected, and unbinds when it disconnects;
* a source configured by guest *name* (domids change at every boot) asks
  :meth:`InputRouter.named_port`, which follows the domain that bound with that name.

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

__all__ = ["InputPort", "InputRouter", "InputTarget", "NamedPort"]


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

    def _bound(self) -> tuple[InputSink, ...]:
        return self._router.sinks(self.target)

    def _sinks(self) -> tuple[InputSink, ...]:
        sinks = self._bound()
        if sinks:
            self.delivered += 1
        else:
            self.dropped += 1
        return sinks

    @property
    def space(self) -> tuple[int, int] | None:
        for sink in self._bound():
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
        for sink in self._bound():  # not an event of its own: not counted
            sink.frame()

    def release_all(self) -> None:
        for sink in self._bound():
            sink.release_all()


class NamedPort(InputPort):
    """A port for connector ``devid``/``index`` of the domain *named* ``name``: domids change
    at every guest boot, names do not. The name is resolved at each event, through the
    names the vkbd devices bound with (the toolstack's ``/local/domain/<domid>/name``)."""

    def __init__(self, router: InputRouter, name: str, devid: int, index: int) -> None:
        super().__init__(router, InputTarget(-1, devid, index))
        self.name = name

    def _bound(self) -> tuple[InputSink, ...]:
        domid = self._router.domid_of(self.name)
        if domid is None:
            return ()
        return self._router.sinks(self.target._replace(domid=domid))

    def __str__(self) -> str:
        return f"{self.name}/{self.target.devid}/{self.target.connector}"


class InputRouter:
    """Ports for sources, bindings for vkbd devices; implements ``InputPorts``."""

    def __init__(self) -> None:
        self._ports: dict[InputTarget, InputPort] = {}
        self._named: dict[tuple[str, int, int], NamedPort] = {}
        self._bound: dict[InputTarget, list[InputSink]] = {}
        self._names: dict[str, list[int]] = {}  # domain name -> domids bound with it

    def port(self, domid: int, devid: int, index: int) -> InputPort:
        target = InputTarget(domid, devid, index)
        port = self._ports.get(target)
        if port is None:
            port = self._ports[target] = InputPort(self, target)
        return port

    def named_port(self, name: str, devid: int = 0, index: int = 0) -> NamedPort:
        """The port of a connector of the domain named ``name`` (see :class:`NamedPort`)."""
        key = (name, devid, index)
        port = self._named.get(key)
        if port is None:
            port = self._named[key] = NamedPort(self, name, devid, index)
        return port

    def ports(self) -> list[InputPort]:
        """Every port a source asked for (for status)."""
        return [*self._ports.values(), *self._named.values()]

    def domid_of(self, name: str) -> int | None:
        """The domain bound with ``name`` most recently, if any is bound now."""
        domids = self._names.get(name)
        return domids[-1] if domids else None

    def sinks(self, target: InputTarget) -> tuple[InputSink, ...]:
        """The sinks bound to ``target`` now, in binding order."""
        return tuple(self._bound.get(target, ()))

    def bind(
        self, target: InputTarget, sink: InputSink, *, name: str | None = None
    ) -> Callable[[], None]:
        """Route ``target``'s input to ``sink`` too, and ``name``'s (the domain's name, which
        the caller trusts) to ``target.domid`` while bound; returns the function that unbinds
        both (idempotent)."""
        self._bound.setdefault(target, []).append(sink)
        if name is not None:
            self._names.setdefault(name, []).append(target.domid)

        def unbind() -> None:
            sinks = self._bound.get(target)
            if sinks is None or sink not in sinks:
                return
            sinks.remove(sink)
            if not sinks:
                del self._bound[target]
            if name is not None:
                domids = self._names[name]
                domids.remove(target.domid)
                if not domids:
                    del self._names[name]

        return unbind

    @contextmanager
    def bound(
        self, target: InputTarget, sink: InputSink, *, name: str | None = None
    ) -> Iterator[None]:
        """:meth:`bind` for the duration of a ``with`` block."""
        unbind = self.bind(target, sink, name=name)
        try:
            yield
        finally:
            unbind()
