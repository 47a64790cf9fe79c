"""The event page: consecutive ids from 0, a full page refuses without touching unread slots,
a hostile in_cons is a ProtocolError, the consumer drops bad ids like Linux, and both sides
share the n mod 63 slot formula across the u32 wrap."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from displback.protocol.constants import EVT_PAGE_SLOTS, PAGE_SIZE
from displback.protocol.errors import ProtocolError
from displback.protocol.evtpage import EventConsumer, EventProducer, event_slot_offset
from displback.protocol.messages import PgFlipEvent

U32 = 2**32
MASK = U32 - 1


def no_fence() -> None:
    pass


def counters(page: bytearray) -> tuple[int, int]:
    """(in_cons, in_prod), decoded independently of the page code."""
    values: tuple[int, int] = struct.unpack_from("<2I", page, 0)
    return values


def set_counters(page: bytearray, in_cons: int, in_prod: int) -> None:
    struct.pack_into("<2I", page, 0, in_cons & MASK, in_prod & MASK)


def pair(start: int = 0) -> tuple[bytearray, EventProducer, EventConsumer]:
    page = bytearray(PAGE_SIZE)
    set_counters(page, start, start)
    producer = EventProducer(page, start=start, rw_fence=no_fence)
    consumer = EventConsumer(page, rw_fence=no_fence)
    return page, producer, consumer


def cookie(n: int) -> int:
    return 0xFFFF_8880_0000_0000 + n * 0x100


def test_slot_offset_uses_full_counter_mod_63() -> None:
    assert event_slot_offset(0) == 64
    assert event_slot_offset(62) == 64 + 64 * 62
    assert event_slot_offset(63) == 64
    # 2**32 = 4 (mod 63): the last index before the wrap is slot 3, the next is slot 0.
    assert event_slot_offset(U32 - 1) == 64 + 64 * 3
    assert event_slot_offset(U32) == 64


def test_event_bytes_and_in_prod_match_the_reference_layout() -> None:
    page, producer, _ = pair()
    assert producer.put_pg_flip(0xFFFF_8880_1111_2200) is True
    assert page[64:80] == bytes.fromhex("00 00 00 00 00 00 00 00 00 22 11 11 80 88 ff ff")
    assert page[80:128] == bytes(48)
    assert counters(page) == (0, 1)


def test_events_carry_consecutive_ids_from_zero_through_batches() -> None:
    _, producer, consumer = pair()
    received: list[PgFlipEvent] = []
    n = 0
    for batch in (1, 5, 63, 2, 40, 63, 7):
        for _ in range(batch):
            assert producer.put_pg_flip(cookie(n))
            n += 1
        received += consumer.take()
    assert [e.id for e in received] == list(range(n))
    assert [e.fb_cookie for e in received] == [cookie(i) for i in range(n)]
    assert consumer.skipped == 0


def test_ids_wrap_at_65536_without_a_gap() -> None:
    _, producer, consumer = pair()
    last: list[PgFlipEvent] = []
    total = 65536 + 70
    while producer.in_prod < total:
        for _ in range(min(EVT_PAGE_SLOTS, total - producer.in_prod)):
            assert producer.put_pg_flip(1)
        last = consumer.take()
    assert consumer.skipped == 0
    assert consumer.expected_id == 70
    assert [e.id for e in last][-3:] == [67, 68, 69]
    assert producer.next_id == 70


def test_64th_unread_event_is_refused_without_touching_the_page() -> None:
    page, producer, consumer = pair()
    for n in range(EVT_PAGE_SLOTS):
        assert producer.put_pg_flip(cookie(n))
    before = bytes(page)
    assert producer.is_full()
    assert producer.put_pg_flip(cookie(999)) is False
    assert bytes(page) == before
    assert producer.next_id == EVT_PAGE_SLOTS  # no id used up by the refusal
    assert [e.id for e in consumer.take()] == list(range(EVT_PAGE_SLOTS))
    assert producer.put_pg_flip(cookie(999)) is True
    assert consumer.take() == [PgFlipEvent(id=EVT_PAGE_SLOTS, fb_cookie=cookie(999))]


@settings(max_examples=150, deadline=None)
@given(
    start=st.one_of(st.just(0), st.integers(U32 - 200, MASK), st.integers(0, MASK)),
    steps=st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70)), max_size=25),
)
def test_producer_never_overwrites_an_unconsumed_slot(
    start: int, steps: list[tuple[int, int]]
) -> None:
    """A frontend consuming part of the page at a time still gets every event, in order."""
    page, producer, _ = pair(start)
    queued = 0  # events the backend still has to deliver (kept queued when refused)
    written: list[int] = []
    seen: list[PgFlipEvent] = []
    for produce, consume in steps:
        queued += produce
        while queued and producer.put_pg_flip(cookie(len(written))):
            written.append(len(written))
            queued -= 1
        in_cons, in_prod = counters(page)
        unread = (in_prod - in_cons) % U32
        assert unread <= EVT_PAGE_SLOTS
        take = min(consume, unread)
        seen += [
            PgFlipEvent.parse(page[event_slot_offset(i) : event_slot_offset(i) + 64])
            for i in range(in_cons, in_cons + take)
        ]
        set_counters(page, in_cons + take, in_prod)
    assert [e.id for e in seen] == [n % 65536 for n in written[: len(seen)]]
    assert [e.fb_cookie for e in seen] == [cookie(n) for n in written[: len(seen)]]
    assert producer.in_prod == (start + len(written)) % U32


@given(
    start=st.integers(0, MASK),
    written=st.integers(0, 5),
    in_cons=st.integers(0, MASK) | st.integers(-3, EVT_PAGE_SLOTS + 3).map(lambda d: -d),
)
def test_impossible_in_cons_is_a_protocol_error_and_writes_nothing(
    start: int, written: int, in_cons: int
) -> None:
    page, producer, _ = pair(start)
    for n in range(written):
        producer.put_pg_flip(cookie(n))
    if in_cons <= 0:  # a distance back from in_prod, to hit the boundaries
        in_cons = (producer.in_prod + in_cons) % U32
    struct.pack_into("<I", page, 0, in_cons)
    before = bytes(page)
    unread = (producer.in_prod - in_cons) % U32
    if unread > EVT_PAGE_SLOTS:
        with pytest.raises(ProtocolError) as err:
            producer.put_pg_flip(cookie(99))
        assert err.value.what == "in_cons"
        assert err.value.errno is None
        assert bytes(page) == before
    else:
        unread_slots = {(in_cons + k) % U32 % EVT_PAGE_SLOTS for k in range(unread)}
        free = unread < EVT_PAGE_SLOTS and producer.in_prod % EVT_PAGE_SLOTS not in unread_slots
        assert producer.put_pg_flip(cookie(99)) is free


@pytest.mark.parametrize("distance", [-1, EVT_PAGE_SLOTS + 1])
def test_in_cons_past_in_prod_or_64_behind_is_refused(distance: int) -> None:
    page, producer, _ = pair(1000)
    producer.put_pg_flip(cookie(0))
    set_counters(page, 1001 - distance, 1001)
    with pytest.raises(ProtocolError, match="in_cons"):
        producer.put_pg_flip(cookie(1))
    with pytest.raises(ProtocolError, match="in_cons"):
        producer.is_full()


def write_raw_event(page: bytearray, index: int, event_id: int, event_type: int = 0) -> None:
    raw = bytearray(PgFlipEvent(id=event_id, fb_cookie=cookie(index)).pack())
    raw[2] = event_type
    page[event_slot_offset(index) : event_slot_offset(index) + 64] = raw


def test_consumer_skips_an_unexpected_id_and_never_resynchronises() -> None:
    page, _, consumer = pair()
    for index, event_id in enumerate([0, 1, 5, 3, 4]):
        write_raw_event(page, index, event_id)
    set_counters(page, 0, 5)
    assert [e.id for e in consumer.take()] == [0, 1, 3, 4]
    assert consumer.skipped == 1
    assert counters(page) == (5, 5)

    page, _, consumer = pair()
    for index, event_id in enumerate([1, 2, 3]):  # off by one from the start: all dropped
        write_raw_event(page, index, event_id)
    set_counters(page, 0, 3)
    assert consumer.take() == []
    assert consumer.expected_id == 3
    assert consumer.skipped == 3  # every one counted


def test_consumer_drops_an_unknown_event_type_and_advances_its_counter() -> None:
    page, _, consumer = pair()
    write_raw_event(page, 0, 0, event_type=0x7F)
    write_raw_event(page, 1, 1)
    write_raw_event(page, 2, 2, event_type=0x01)
    write_raw_event(page, 3, 3)
    set_counters(page, 0, 4)
    assert [e.id for e in consumer.take()] == [1, 3]
    assert consumer.skipped == 2  # every one counted


def test_consumer_rejects_in_prod_more_than_63_ahead() -> None:
    page, _, consumer = pair()
    set_counters(page, 0, EVT_PAGE_SLOTS + 1)
    with pytest.raises(ProtocolError, match="in_prod"):
        consumer.take()


def slot_event(page: bytearray, slot: int) -> PgFlipEvent:
    return PgFlipEvent.parse(page[64 + 64 * slot : 128 + 64 * slot])


def test_both_sides_share_the_slot_formula_across_the_u32_wrap() -> None:
    start = U32 - 4  # slot 0; then slots 1, 2, 3, and index 2**32 = 0 is slot 0 again
    page, producer, consumer = pair(start)
    for n in range(4):
        assert producer.put_pg_flip(cookie(n))
    assert [slot_event(page, slot).id for slot in range(4)] == [0, 1, 2, 3]
    before = bytes(page)
    assert producer.put_pg_flip(cookie(4)) is False  # slot 0 still holds unread event 0
    assert bytes(page) == before
    assert [e.id for e in consumer.take()] == [0, 1, 2, 3]
    for n in range(4, 9):
        assert producer.put_pg_flip(cookie(n))
    assert counters(page) == (0, 5)
    assert [(e.id, e.fb_cookie) for e in consumer.take()] == [(n, cookie(n)) for n in range(4, 9)]


def test_after_the_wrap_only_slots_still_unread_are_refused() -> None:
    start = U32 - 4
    page, producer, _ = pair(start)
    for n in range(4):
        assert producer.put_pg_flip(cookie(n))
    set_counters(page, U32 - 2, 0)  # events 0 and 1 (slots 0, 1) consumed; 2, 3 unread
    assert producer.put_pg_flip(cookie(4))  # index 0 -> slot 0
    assert producer.put_pg_flip(cookie(5))  # index 1 -> slot 1
    assert producer.is_full()  # index 2 -> slot 2 holds unread event 2
    assert producer.put_pg_flip(cookie(6)) is False
    assert slot_event(page, 2) == PgFlipEvent(id=2, fb_cookie=cookie(2))


def test_rw_fence_sits_between_the_event_write_and_the_in_prod_store() -> None:
    page = bytearray(PAGE_SIZE)
    seen: list[tuple[bytes, tuple[int, int]]] = []

    def fence() -> None:
        seen.append((bytes(page[64:80]), counters(page)))

    producer = EventProducer(page, rw_fence=fence)
    producer.put_pg_flip(cookie(0))
    # first after reading in_cons (nothing written yet), then after the slot, before in_prod
    assert seen[0] == (bytes(16), (0, 0))
    assert seen[1][0] != bytes(16)
    assert seen[1][1] == (0, 0)
    assert counters(page) == (0, 1)
