"""What a Dom0 device's evdev events mean to a guest: keys, buttons, relative and absolute
pointers, multi-touch slots, frames and lost events."""

from __future__ import annotations

from displback.evdev import uapi
from displback.evdev.translate import Axis, Capabilities, EvdevTranslator
from displback.evdev.uapi import InputEvent
from tests.recorder import Recorder

SYN = InputEvent(uapi.EV_SYN, uapi.SYN_REPORT, 0)
KEY_A = 30


def key(code: int, value: int) -> InputEvent:
    return InputEvent(uapi.EV_KEY, code, value)


def rel(code: int, value: int) -> InputEvent:
    return InputEvent(uapi.EV_REL, code, value)


def absolute(code: int, value: int) -> InputEvent:
    return InputEvent(uapi.EV_ABS, code, value)


def test_keys_with_autorepeat_and_mouse_buttons_go_through_and_other_buttons_do_not() -> None:
    sink = Recorder()
    EvdevTranslator(Capabilities(), sink).feed(
        [key(KEY_A, 1), key(KEY_A, 2), key(KEY_A, 0), key(uapi.BTN_MOUSE, 1),
         key(0x130, 1), key(0x2FF, 1), key(0x300, 1), SYN]
    )
    assert sink.events == [
        ("key", KEY_A, True), ("key", KEY_A, True), ("key", KEY_A, False),
        ("button", uapi.BTN_MOUSE, True), ("key", 0x2FF, True), ("frame",),
    ]


def test_relative_motion_is_summed_up_to_the_report() -> None:
    sink = Recorder()
    EvdevTranslator(Capabilities(), sink).feed(
        [rel(uapi.REL_X, 3), rel(uapi.REL_X, 4), rel(uapi.REL_Y, -2), rel(uapi.REL_WHEEL, 1), SYN]
    )
    assert sink.events == [("rel", 7, -2, 1), ("frame",)]


def test_an_absolute_device_is_scaled_onto_the_connectors_pixels() -> None:
    sink = Recorder(space=(641, 481))
    caps = Capabilities(abs_x=Axis(0, 32767), abs_y=Axis(100, 1100))
    EvdevTranslator(caps, sink).feed(
        [absolute(uapi.ABS_X, 32767), absolute(uapi.ABS_Y, 600), key(uapi.BTN_TOUCH, 1), SYN]
    )
    assert sink.events == [("button", uapi.BTN_MOUSE, True), ("abs", 640.0, 240.0), ("frame",)]


def test_absolute_events_wait_while_the_guest_space_is_unknown() -> None:
    sink = Recorder(space=None)
    caps = Capabilities(abs_x=Axis(0, 100), abs_y=Axis(0, 100))
    EvdevTranslator(caps, sink).feed([absolute(uapi.ABS_X, 5), SYN])
    assert sink.events == [("frame",)]


def test_multi_touch_slots_become_contacts_down_motion_up() -> None:
    sink = Recorder(space=(101, 201))
    caps = Capabilities(mt_x=Axis(0, 1000), mt_y=Axis(0, 1000))
    translator = EvdevTranslator(caps, sink)
    translator.feed([
        absolute(uapi.ABS_MT_SLOT, 0), absolute(uapi.ABS_MT_TRACKING_ID, 7),
        absolute(uapi.ABS_MT_POSITION_X, 500), absolute(uapi.ABS_MT_POSITION_Y, 500),
        absolute(uapi.ABS_MT_SLOT, 1), absolute(uapi.ABS_MT_TRACKING_ID, 8),
        absolute(uapi.ABS_MT_POSITION_X, 0), absolute(uapi.ABS_MT_POSITION_Y, 1000),
        key(uapi.BTN_TOUCH, 1), SYN,
        absolute(uapi.ABS_MT_SLOT, 0), absolute(uapi.ABS_MT_POSITION_X, 1000), SYN,
        absolute(uapi.ABS_MT_TRACKING_ID, -1), SYN,
    ])
    assert sink.events == [
        ("down", 0, 50.0, 100.0), ("down", 1, 0.0, 200.0), ("frame",),
        ("motion", 0, 100.0, 100.0), ("frame",),
        ("up", 0), ("frame",),
    ]


def test_lost_events_release_everything_and_resume_at_the_next_report() -> None:
    sink = Recorder()
    EvdevTranslator(Capabilities(), sink).feed([
        key(KEY_A, 1), SYN,
        InputEvent(uapi.EV_SYN, uapi.SYN_DROPPED, 0), key(KEY_A, 0), rel(uapi.REL_X, 5), SYN,
        rel(uapi.REL_X, 1), SYN,
    ])
    assert sink.events == [
        ("key", KEY_A, True), ("frame",), ("release_all",), ("rel", 1, 0, 0), ("frame",),
    ]
