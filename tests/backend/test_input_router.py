"""The input router joins sources and vkbd devices by guest connector, whoever comes first."""

from __future__ import annotations

from displback.backend.input import InputRouter, InputTarget
from tests.recorder import Recorder


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


def test_a_port_by_guest_name_follows_the_domain_bound_with_that_name() -> None:
    router = InputRouter()
    port = router.named_port("web", 0, 0)
    port.key(1, True)
    assert port.dropped == 1
    first, second = Recorder(), Recorder()
    unbind = router.bind(InputTarget(5, 0, 0), first, name="web")
    port.key(2, True)
    unbind()  # the guest reboots: a new domid, the same name
    router.bind(InputTarget(9, 0, 0), second, name="web")
    port.key(3, True)
    assert first.events == [("key", 2, True)] and second.events == [("key", 3, True)]
    assert router.domid_of("web") == 9 and router.named_port("web") is port
