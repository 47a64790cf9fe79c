"""The compositor's seat routed to guests: keys to the window with keyboard focus, pointer
and touch to the window they are in, scaled to the guest connector, nothing left pressed
when focus goes. Weston's headless backend has no seat and Debian's weston has no test
protocol to inject input, so the listener is driven here with the events a compositor
sends (the handlers are what pywayland calls)."""

from __future__ import annotations

import os
from typing import Any

import pytest

pytest.importorskip("pywayland", reason="the wayland extra (pywayland) is not installed")

from displback.backend.input import InputRouter, InputTarget  # noqa: E402
from displback.protocol.layout import ConnectorConfig  # noqa: E402
from displback.wayland.display import WaylandDisplay  # noqa: E402
from displback.wayland.seat import SeatRouter  # noqa: E402

NOWHERE = "/nonexistent/displback-wayland-0"
KEY_A, BTN_LEFT = 30, 0x110


class Sink:
    """Records what one guest connector was sent."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.events.append((name, *args))


class Ports:
    def __init__(self) -> None:
        self.sinks: dict[tuple[int, int, int], Sink] = {}

    def port(self, domid: int, devid: int, index: int) -> Sink:
        return self.sinks.setdefault((domid, devid, index), Sink())


class FakeDispatcher(dict[str, Any]):
    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self._names = {n: i for i, n in enumerate(names)}


class FakeDevice:
    def __init__(self, names: list[str]) -> None:
        self.dispatcher = FakeDispatcher(names)
        self.released = False

    def release(self) -> None:
        self.released = True


class FakeSeat:
    def __init__(self) -> None:
        self.dispatcher: dict[str, Any] = {}
        self.user_data = 5  # the bound version
        self.pointer = FakeDevice(["enter", "leave", "motion", "button", "axis", "frame"])
        self.keyboard = FakeDevice(["keymap", "enter", "leave", "key"])
        self.touch = FakeDevice(["down", "up", "motion", "frame", "cancel"])

    def get_pointer(self) -> FakeDevice:
        return self.pointer

    def get_keyboard(self) -> FakeDevice:
        return self.keyboard

    def get_touch(self) -> FakeDevice:
        return self.touch


@pytest.fixture
async def windows() -> Any:
    ports = Ports()
    async with WaylandDisplay.open(NOWHERE, input_ports=ports) as display:
        a = display.acquire(1, 0, ConnectorConfig(0, 640, 480, None), "a")
        b = display.acquire(2, 0, ConnectorConfig(1, 320, 200, None), "b")
        assert a is not None and b is not None and a.on_surface and b.on_surface
        surface_a, surface_b = object(), object()
        a.on_surface(surface_a, True)  # as when the window is made on a connection
        b.on_surface(surface_b, True)
        yield display.seat, ports, (a, surface_a), (b, surface_b)


def test_the_seat_takes_the_devices_the_compositor_announces() -> None:
    router, seat = SeatRouter(None), FakeSeat()
    router.add_seat(seat)
    seat.dispatcher["capabilities"](seat, 1 | 2 | 4)
    assert set(seat.pointer.dispatcher) == {"enter", "leave", "motion", "button", "axis", "frame"}
    assert set(seat.keyboard.dispatcher) == {"keymap", "enter", "leave", "key"}
    assert set(seat.touch.dispatcher) == {"down", "up", "motion", "frame", "cancel"}
    first_pointer = seat.pointer
    seat.pointer = FakeDevice(["enter", "leave", "motion", "button", "axis", "frame"])
    seat.dispatcher["capabilities"](seat, 1)  # the keyboard and touch screen went away
    assert first_pointer.released and seat.keyboard.released and seat.touch.released
    assert not seat.pointer.released and "enter" in seat.pointer.dispatcher


async def test_keys_go_to_the_window_with_keyboard_focus_as_linux_codes(windows: Any) -> None:
    router, ports, (_, surface_a), (_, surface_b) = windows
    router.keyboard_enter(None, 1, surface_b, b"")
    router.keyboard_key(None, 2, 100, KEY_A, 1)
    router.keyboard_key(None, 3, 101, KEY_A, 0)
    assert ports.sinks[(2, 0, 1)].events == [
        ("key", KEY_A, True),
        ("frame",),
        ("key", KEY_A, False),
        ("frame",),
    ]
    assert (1, 0, 0) not in ports.sinks


async def test_losing_keyboard_focus_releases_what_the_guest_holds(windows: Any) -> None:
    router, ports, (_, surface_a), _ = windows
    router.keyboard_enter(None, 1, surface_a, b"")
    router.keyboard_key(None, 2, 100, KEY_A, 1)
    router.keyboard_leave(None, 3, surface_a)
    router.keyboard_key(None, 4, 101, KEY_A, 0)  # no focus: nobody gets it
    assert ports.sinks[(1, 0, 0)].events[-1] == ("release_all",)
    assert ports.sinks[(1, 0, 0)].events.count(("key", KEY_A, False)) == 0


async def test_the_pointer_is_in_connector_pixels_clamped_with_buttons_and_wheel(
    windows: Any,
) -> None:
    router, ports, (_, surface_a), _ = windows
    router.pointer_enter(None, 1, surface_a, 10.5, 20.25)
    router.pointer_motion(None, 5, 700.0, -3.0)  # outside the 640x480 connector
    router.pointer_button(None, 2, 6, BTN_LEFT, 1)
    router.pointer_axis(None, 7, 0, 15.0)  # 1.5 clicks down: one now
    router.pointer_axis(None, 8, 0, 5.0)  # and the second
    router.pointer_axis(None, 8, 1, 30.0)  # horizontal: not a wheel
    router.pointer_frame(None)
    assert ports.sinks[(1, 0, 0)].events == [
        ("pointer_absolute", 10.5, 20.25),
        ("pointer_absolute", 639.0, 0.0),
        ("button", BTN_LEFT, True),
        ("pointer_relative", 0, 0, -1),
        ("pointer_relative", 0, 0, -1),
        ("frame",),
    ]


async def test_discrete_wheel_steps_win_over_axis_units(windows: Any) -> None:
    router, ports, (_, surface_a), _ = windows
    router.pointer_enter(None, 1, surface_a, 0.0, 0.0)
    router.pointer_axis_discrete(None, 0, -2)
    router.pointer_axis(None, 7, 0, -30.0)  # the same scroll in units: not counted again
    router.pointer_frame(None)
    assert ports.sinks[(1, 0, 0)].events[1:] == [("pointer_relative", 0, 0, 2), ("frame",)]


async def test_touch_points_follow_the_window_they_went_down_on(windows: Any) -> None:
    router, ports, (_, surface_a), (_, surface_b) = windows
    router.touch_down(None, 1, 10, surface_a, 7, 5.0, 6.0)
    router.touch_down(None, 2, 10, surface_b, 8, 400.0, 10.0)
    router.touch_frame(None)
    router.touch_motion(None, 11, 7, 6.0, 7.0)
    router.touch_up(None, 3, 12, 8)
    router.touch_frame(None)
    assert ports.sinks[(1, 0, 0)].events == [
        ("touch_down", 7, 5.0, 6.0),
        ("frame",),
        ("touch_motion", 7, 6.0, 7.0),
        ("frame",),
    ]
    assert ports.sinks[(2, 0, 1)].events == [
        ("touch_down", 8, 319.0, 10.0),
        ("frame",),
        ("touch_up", 8),
        ("frame",),
    ]


async def test_a_window_destroyed_under_the_pointer_releases_its_guests_input(
    windows: Any,
) -> None:
    router, ports, (a, surface_a), _ = windows
    router.pointer_enter(None, 1, surface_a, 1.0, 1.0)
    router.pointer_button(None, 2, 6, BTN_LEFT, 1)
    a.on_surface(surface_a, False)
    router.pointer_motion(None, 5, 2.0, 2.0)  # nobody's now
    assert ports.sinks[(1, 0, 0)].events[-1] == ("release_all",)
    assert ("pointer_absolute", 2.0, 2.0) not in ports.sinks[(1, 0, 0)].events


def test_the_keymap_fd_is_closed() -> None:
    read, write = os.pipe()
    os.close(write)
    SeatRouter(None).keyboard_keymap(None, 1, read, 0)
    with pytest.raises(OSError):
        os.fstat(read)


async def test_keys_reach_the_guest_device_bound_through_the_backends_router() -> None:
    router = InputRouter()
    device = Sink()  # what a connected vkbd device binds for connector 0 of domain 4
    async with WaylandDisplay.open(NOWHERE, input_ports=router) as display:
        output = display.acquire(4, 0, ConnectorConfig(0, 640, 480, None), "g")
        assert output is not None and output.on_surface is not None
        surface = object()
        output.on_surface(surface, True)
        with router.bound(InputTarget(4, 0, 0), device):  # type: ignore[arg-type]
            display.seat.keyboard_enter(None, 1, surface, b"")
            display.seat.keyboard_key(None, 2, 100, KEY_A, 1)
        display.seat.keyboard_key(None, 3, 101, KEY_A, 0)  # the device went: dropped
    assert device.events == [("key", KEY_A, True), ("frame",)]
    assert router.port(4, 0, 0).dropped >= 1  # type: ignore[attr-defined]
