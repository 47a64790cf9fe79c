"""A recording input sink (displback.display.input.InputSink) for the input tests."""

from __future__ import annotations


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
