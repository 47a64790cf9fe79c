"""The flip queue without trio: commands in order with one in flight, flips queued back to back
coalesced into one frame whose flips each get their own event, events held back while the
event page is full and re-sent once it has room, the drop bound, late events, and a hostile
page closing the device. A hypothesis state machine drives it against a real event page and
a Linux-like consumer."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from displback.protocol.constants import EVT_PAGE_SLOTS, PAGE_SIZE
from displback.protocol.errors import ProtocolError
from displback.protocol.evtpage import EventConsumer, EventProducer
from displback.protocol.flipqueue import (
    ConfigCommand,
    FlipQueue,
    Frame,
    Published,
    QueuedFlip,
)


def no_fence() -> None:
    pass


def page_pair() -> tuple[bytearray, EventProducer, EventConsumer]:
    page = bytearray(PAGE_SIZE)
    return page, EventProducer(page, rw_fence=no_fence), EventConsumer(page, rw_fence=no_fence)


def cookies(consumer: EventConsumer) -> list[int]:
    return [event.fb_cookie for event in consumer.take()]


def queue(
    max_queued_events: int = 256, late_after: float = 3.1
) -> tuple[FlipQueue[str, str], EventConsumer]:
    _page, producer, consumer = page_pair()
    q: FlipQueue[str, str] = FlipQueue(
        producer, max_queued_events=max_queued_events, late_after=late_after
    )
    return q, consumer


def show_one(q: FlipQueue[str, str], cookie: int, now: float = 0.0) -> Published:
    """Accept one flip and land it at once."""
    q.accept_flip(cookie, f"fb{cookie}", now)
    frame = q.next_command()
    assert isinstance(frame, Frame)
    return q.frame_done(frame, now)


def test_a_flip_is_shown_and_its_event_written_when_it_lands() -> None:
    q, consumer = queue()
    q.accept_flip(7, "fb7", 1.0)
    frame = q.next_command()
    assert isinstance(frame, Frame)
    assert frame.fb == "fb7" and frame.flips == (QueuedFlip(7, 1.0),)
    assert consumer.take() == []  # nothing before it lands
    assert q.frame_done(frame, 1.01) == Published(sent=1, dropped=0)
    assert cookies(consumer) == [7]
    assert q.counters.events_sent == 1 and q.counters.flips_accepted == 1


def test_only_one_command_is_in_flight_until_it_is_reported_done() -> None:
    q, _consumer = queue()
    q.accept_flip(1, "a", 0.0)
    frame = q.next_command()
    assert isinstance(frame, Frame) and q.in_flight is frame
    q.accept_flip(2, "b", 0.0)
    assert q.next_command() is None  # the output takes one flip at a time
    q.frame_done(frame, 0.0)
    assert q.in_flight is None
    second = q.next_command()
    assert isinstance(second, Frame) and second.fb == "b"


def test_reporting_a_command_that_is_not_in_flight_is_refused() -> None:
    q, _consumer = queue()
    q.accept_flip(1, "a", 0.0)
    frame = q.next_command()
    assert isinstance(frame, Frame)
    q.frame_done(frame, 0.0)
    with pytest.raises(ValueError, match="not the command in flight"):
        q.frame_done(frame, 0.0)


def test_coalesced_flips_each_get_their_own_event_in_order_when_the_newest_lands() -> None:
    q, consumer = queue()
    q.accept_flip(1, "a", 0.0)
    first = q.next_command()
    assert isinstance(first, Frame)
    for cookie, fb in ((2, "b"), (3, "c"), (4, "d")):  # queued while flip 1 is in flight
        q.accept_flip(cookie, fb, 0.0)
    q.frame_done(first, 0.0)
    assert cookies(consumer) == [1]
    frame = q.next_command()
    assert isinstance(frame, Frame)
    assert frame.fb == "d"  # only the newest is shown
    assert [f.fb_cookie for f in frame.flips] == [2, 3, 4]
    assert q.counters.flips_coalesced == 2
    assert consumer.take() == []  # none before the frame that replaced them lands
    assert q.frame_done(frame, 0.0) == Published(sent=3, dropped=0)
    assert cookies(consumer) == [2, 3, 4]  # three events, not one between them
    assert consumer.skipped == 0  # ids consecutive: the guest accepted every one


def test_a_configuration_is_a_barrier_flips_are_not_coalesced_across() -> None:
    q, consumer = queue()
    q.accept_flip(1, "a", 0.0)
    q.accept_config("disable")
    q.accept_flip(2, "b", 0.0)
    before = q.next_command()
    assert isinstance(before, Frame) and before.fb == "a" and len(before.flips) == 1
    q.frame_done(before, 0.0)
    config = q.next_command()
    assert config is not None and isinstance(config, ConfigCommand)
    assert config.config == "disable"
    assert q.next_command() is None  # the flip after it waits for the configuration
    q.config_done(config)
    after = q.next_command()
    assert isinstance(after, Frame) and after.fb == "b"
    q.frame_done(after, 0.0)
    assert cookies(consumer) == [1, 2]
    assert q.counters.flips_coalesced == 0


def test_events_that_do_not_fit_wait_and_are_re_sent_once_the_page_has_room() -> None:
    q, consumer = queue()
    for n in range(EVT_PAGE_SLOTS):
        assert show_one(q, n).sent == 1
    assert show_one(q, 100) == Published(sent=0, dropped=0)  # the page is full
    assert show_one(q, 101) == Published(sent=0, dropped=0)
    assert q.queued_events == 2
    assert q.publish(0.0) == 0  # still full: nothing written, nothing lost
    assert q.counters.events_delayed == 3
    assert cookies(consumer) == list(range(EVT_PAGE_SLOTS))  # the guest reads: room again
    assert q.publish(0.0) == 2  # the queued ones go out now, in order
    assert q.queued_events == 0
    assert cookies(consumer) == [100, 101]
    assert consumer.skipped == 0


def test_the_events_of_a_frame_after_queued_ones_keep_their_order() -> None:
    q, consumer = queue()
    for n in range(EVT_PAGE_SLOTS + 1):
        show_one(q, n)
    assert q.queued_events == 1
    consumer.take()
    assert show_one(q, 500).sent == 2  # the queued event first, then the new one
    assert cookies(consumer) == [EVT_PAGE_SLOTS, 500]


def test_the_drop_bound_holds_and_counts_what_it_drops() -> None:
    q, consumer = queue(max_queued_events=5)
    for n in range(EVT_PAGE_SLOTS + 5):
        show_one(q, n)
    assert q.queued_events == 5
    assert show_one(q, 1000) == Published(sent=0, dropped=1)
    # A coalesced frame of three past the bound: all three dropped, the queue stays at 5.
    for cookie in (2000, 2001):
        q.accept_flip(cookie, "x", 0.0)
    q.accept_flip(2002, "y", 0.0)
    frame = q.next_command()
    assert isinstance(frame, Frame) and len(frame.flips) == 3
    assert q.frame_done(frame, 0.0) == Published(sent=0, dropped=3)
    assert q.queued_events == 5
    assert q.counters.events_dropped == 4
    consumer.take()
    assert q.publish(0.0) == 5  # the ones kept are still delivered
    assert cookies(consumer) == list(range(EVT_PAGE_SLOTS, EVT_PAGE_SLOTS + 5))


def test_the_drop_bound_keeps_the_oldest_flips_of_a_frame() -> None:
    q, _consumer = queue(max_queued_events=2)
    for n in range(EVT_PAGE_SLOTS):
        show_one(q, n)
    for cookie in (1, 2, 3):
        q.accept_flip(cookie, "x", 0.0)
    frame = q.next_command()
    assert isinstance(frame, Frame)
    assert q.frame_done(frame, 0.0) == Published(sent=0, dropped=1)
    assert q.queued_events == 2


def test_an_event_later_than_the_guest_waits_is_counted_late() -> None:
    q, _consumer = queue(late_after=3.1)
    show_one(q, 1, now=0.0)
    q.accept_flip(2, "b", 10.0)
    frame = q.next_command()
    assert isinstance(frame, Frame)
    q.frame_done(frame, 13.0)  # 3.0 s: in time
    assert q.counters.events_late == 0
    q.accept_flip(3, "c", 20.0)
    frame = q.next_command()
    assert isinstance(frame, Frame)
    q.frame_done(frame, 23.2)  # 3.2 s: the guest already timed out
    assert q.counters.events_late == 1


def test_a_hostile_in_cons_raises_and_discards_the_queued_events() -> None:
    page, producer, _consumer = page_pair()
    q: FlipQueue[str, str] = FlipQueue(producer)
    q.accept_flip(1, "a", 0.0)
    frame = q.next_command()
    assert isinstance(frame, Frame)
    struct.pack_into("<I", page, 0, 1000)  # in_cons far ahead of in_prod
    with pytest.raises(ProtocolError):
        q.frame_done(frame, 0.0)
    assert q.queued_events == 0 and q.in_flight is None


def test_a_negative_drop_bound_is_refused() -> None:
    with pytest.raises(ValueError):
        queue(max_queued_events=-1)


class FlipQueueMachine(RuleBasedStateMachine):
    """Any interleaving of flips, configurations, landings, retries and guest reads: every
    accepted flip gets exactly one event in acceptance order (or is counted dropped, at the
    bound only), frames never mix flips across a configuration and show their newest flip,
    the waiting events never pass the bound, and the guest accepts every id."""

    BOUND = 70

    def __init__(self) -> None:
        super().__init__()
        _page, producer, self.consumer = page_pair()
        self.queue: FlipQueue[int, str] = FlipQueue(producer, max_queued_events=self.BOUND)
        self.next_cookie = 1
        self.accepted: list[int] = []  # cookies in acceptance order
        self.fifo: list[Any] = []  # our model of the queued commands
        self.received: list[int] = []
        self.dropped: list[int] = []
        self.in_flight: Frame[int] | ConfigCommand[str] | None = None
        self.waiting: list[int] = []  # events we expect queued, in order

    @rule()
    def accept_flip(self) -> None:
        cookie = self.next_cookie
        self.next_cookie += 1
        self.queue.accept_flip(cookie, cookie, 0.0)
        self.accepted.append(cookie)
        self.fifo.append(cookie)

    @rule()
    def accept_config(self) -> None:
        self.queue.accept_config("cfg")
        self.fifo.append("cfg")

    @rule()
    def take_command(self) -> None:
        command = self.queue.next_command()
        if self.in_flight is not None or not self.fifo:
            assert command is None
            return
        assert command is not None
        self.in_flight = command
        if self.fifo[0] == "cfg":
            assert isinstance(command, ConfigCommand)
            self.fifo.pop(0)
            return
        assert isinstance(command, Frame)
        run = []
        while self.fifo and self.fifo[0] != "cfg":
            run.append(self.fifo.pop(0))
        assert [f.fb_cookie for f in command.flips] == run
        assert command.fb == run[-1]  # the newest of the run is shown

    @precondition(lambda self: self.in_flight is not None)
    @rule()
    def finish(self) -> None:
        command = self.in_flight
        self.in_flight = None
        if isinstance(command, ConfigCommand):
            self.queue.config_done(command)
            return
        assert isinstance(command, Frame)
        room = self.BOUND - len(self.waiting)
        cookies_ = [f.fb_cookie for f in command.flips]
        kept, lost = cookies_[: max(room, 0)], cookies_[max(room, 0):]
        published = self.queue.frame_done(command, 0.0)
        assert published.dropped == len(lost)
        self.dropped += lost
        self.waiting += kept
        del self.waiting[: published.sent]

    @rule()
    def retry(self) -> None:
        sent = self.queue.publish(0.0)
        del self.waiting[:sent]

    @rule(reads=st.booleans())
    def guest_reads(self, reads: bool) -> None:
        if reads:
            self.received += [e.fb_cookie for e in self.consumer.take()]

    @invariant()
    def events_are_accounted_for_in_order(self) -> None:
        assert self.queue.queued_events == len(self.waiting) <= self.BOUND
        counters = self.queue.counters
        assert counters.events_dropped == len(self.dropped)
        assert counters.flips_accepted == len(self.accepted)
        assert self.consumer.skipped == 0
        # Everything the guest has is a prefix of what was not dropped, in acceptance order.
        delivered = [c for c in self.accepted if c not in set(self.dropped)]
        assert self.received == delivered[: len(self.received)]

    def teardown(self) -> None:
        # Drain: land what is in flight and queued, let the guest read until nothing waits.
        for _ in range(10_000):
            if self.in_flight is not None:
                self.finish()
            elif self.fifo:
                self.take_command()
            elif self.queue.queued_events:
                self.guest_reads(True)
                self.retry()
            else:
                break
        self.guest_reads(True)
        # Every accepted flip got exactly one event, or was dropped at the bound.
        assert sorted(self.received + self.dropped) == self.accepted
        assert len(set(self.received)) == len(self.received)
        if not self.dropped:
            assert self.received == self.accepted


TestFlipQueueMachine = FlipQueueMachine.TestCase
TestFlipQueueMachine.settings = settings(max_examples=150, stateful_step_count=120,
                                         deadline=None)
