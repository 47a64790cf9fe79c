"""The input router joins sources and vkbd devices by guest connector, whoever comes first."""

from __future__ import annotations

from displback.backend.input import InputRouter, InputTarget


class Recorder:
    def __init__(self, space: tuple[int, int] | None = (640, 480)) -> None:
        self.events: list[tuple[object, ...]] = []
        self._space = space

    @property
    def space(self) -> tuple[int, int] | None:
        return self._space

    def key(self, code: int, pressed: bool) -> None:
        self.events.append(("key", code, pressed))

    def button(self, code: int, pressed: bool) -> None:
        self.events.append(("button", code, pressed))

    def pointer_absolute(self, x: float, y: float) -> None:
        self.events.append(("abs", x, y))

    def pointer_relative(self, dx: int, dy: int, dz: int = 0) -> None:
        self.events.append(("rel", dx, dy, dz))

    def touch_down(self, contact: int, x: float, y: float) -> None:
        self.events.append(("down", contact, x, y))

    def touch_motion(self, contact: int, x: float, y: float) -> None:
        self.events.append(("motion", contact, x, y))

    def touch_up(self, contact: int) -> None:
        self.events.append(("up", contact))

    def frame(self) -> None:
        self.events.append(("frame",))

    def release_all(self) -> None:
        self.events.append(("release_all",))


def test_a_port_asked_before_the_guest_connects_delivers_once_it_binds() -> None:
    router = InputRouter()
    port = router.port(5, 0, 1)
    port.key(30, True)
    assert port.dropped == 1 and port.space is None
    sink = Recorder()
    unbind = router.bind(InputTarget(5, 0, 1), sink)
    assert router.port(5, 0, 1) is port
    port.key(30, False)
    port.pointer_absolute(1.5, 2.0)
    port.touch_down(7, 3, 4)
    port.frame()
    assert sink.events == [("key", 30, False), ("abs", 1.5, 2.0), ("down", 7, 3, 4), ("frame",)]
    assert port.space == (640, 480) and port.delivered == 3
    unbind()
    unbind()  # idempotent
    port.button(272, True)
    assert port.dropped == 2 and len(sink.events) == 4


def test_other_connectors_and_domains_never_see_the_events() -> None:
    router = InputRouter()
    mine, other = Recorder(), Recorder()
    router.bind(InputTarget(5, 0, 0), mine)
    router.bind(InputTarget(6, 0, 0), other)
    router.port(5, 0, 0).pointer_relative(1, 2, 3)
    router.port(5, 0, 1).key(1, True)
    assert mine.events == [("rel", 1, 2, 3)] and other.events == []


def test_bindings_end_with_their_with_block_and_leave_nothing_behind() -> None:
    router = InputRouter()
    sink = Recorder()
    with router.bound(InputTarget(1, 2, 3), sink):
        assert router.sinks(InputTarget(1, 2, 3)) == (sink,)
    assert router.sinks(InputTarget(1, 2, 3)) == ()
    assert router._bound == {}
