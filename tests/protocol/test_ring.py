"""The request ring: FrontRing and BackRing on one page deliver every message once, in order,
across the u32 wrap, never lose a wake-up, and turn any hostile index into ProtocolError."""

from __future__ import annotations

import mmap
import platform
import random
import struct
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from displback.protocol import ring
from displback.protocol.constants import (
    PAGE_SIZE,
    RING_REQ_EVENT_OFS,
    RING_RSP_EVENT_OFS,
    RING_SIZE,
)
from displback.protocol.errors import ProtocolError
from displback.protocol.ring import (
    INDEX_MASK,
    BackRing,
    FenceUnavailableError,
    FrontRing,
    default_rw_fence,
    full_fence,
    init_shared,
    slot_offset,
)

U32 = 2**32


def no_fence() -> None:
    pass


def header(page: bytearray) -> tuple[int, int, int, int]:
    """(req_prod, req_event, rsp_prod, rsp_event) decoded independently of the ring code."""
    values: tuple[int, int, int, int] = struct.unpack_from("<4I", page, 0)
    return values


def set_u32(page: bytearray, offset: int, value: int) -> None:
    struct.pack_into("<I", page, offset, value & INDEX_MASK)


def packet(tag: int, serial: int) -> bytes:
    return bytes([tag]) + serial.to_bytes(8, "little") * 7 + bytes(7)


def serial_of(data: bytes) -> int:
    return int.from_bytes(data[1:9], "little")


near_wrap = st.integers(U32 - 2 * RING_SIZE, U32 - 1)
starts = st.one_of(st.just(0), near_wrap, near_wrap, st.integers(0, INDEX_MASK))


def connected(start: int = 0) -> tuple[bytearray, FrontRing, BackRing]:
    page = bytearray(PAGE_SIZE)
    front = FrontRing(page, start=start, fence=no_fence, rw_fence=no_fence)
    back = BackRing(page, start=start, fence=no_fence, rw_fence=no_fence)
    return page, front, back


# --- layout and initialisation ------------------------------------------------------------


def test_frontring_initialises_header_like_shared_ring_init() -> None:
    page = bytearray(b"\xa5" * PAGE_SIZE)
    FrontRing(page, fence=no_fence, rw_fence=no_fence)
    assert header(page) == (0, 1, 0, 1)
    assert page[16:64] == bytes(48)
    assert page[64:] == b"\xa5" * (PAGE_SIZE - 64)  # slots are left alone


def test_init_shared_with_start_arms_events_one_past_start() -> None:
    page = bytearray(PAGE_SIZE)
    init_shared(page, start=INDEX_MASK)
    assert header(page) == (INDEX_MASK, 0, INDEX_MASK, 0)


def test_slot_offset_is_64_plus_64_times_index_mod_32() -> None:
    assert [slot_offset(n) for n in (0, 1, 31, 32, 33, INDEX_MASK)] == [
        64,
        128,
        64 + 64 * 31,
        64,
        128,
        64 + 64 * 31,
    ]


def test_indexes_are_published_as_little_endian_u32_words() -> None:
    page, front, back = connected(start=INDEX_MASK - 1)
    for i in range(3):
        front.put_request(packet(1, i))
    front.push_requests()
    assert header(page)[0] == 1  # (2**32 - 2) + 3 wrapped
    back.take_requests()
    back.put_response(packet(2, 0))
    back.push_responses()
    assert header(page)[2] == INDEX_MASK


def test_page_must_be_writable_and_exactly_one_page() -> None:
    with pytest.raises(ValueError):
        BackRing(memoryview(bytes(PAGE_SIZE)), fence=no_fence)  # read-only
    with pytest.raises(ValueError):
        BackRing(bytearray(PAGE_SIZE - 1), fence=no_fence)
    with pytest.raises(ValueError):
        FrontRing(bytearray(2 * PAGE_SIZE), fence=no_fence)


def test_ring_works_over_mmap_and_release_lets_it_close() -> None:
    with mmap.mmap(-1, PAGE_SIZE) as mem:
        front = FrontRing(mem, fence=no_fence, rw_fence=no_fence)
        back = BackRing(memoryview(mem), fence=no_fence, rw_fence=no_fence)
        front.put_request(packet(1, 42))
        front.push_requests()
        assert back.take_requests() == [packet(1, 42)]
        front.release()
        back.release()
    # leaving the with-block closed the mmap: no view was left exporting it


# --- fences ----------------------------------------------------------------------------------


def test_default_full_fence_is_callable_and_rw_fence_is_implicit_only_on_x86() -> None:
    full_fence()  # loads libatomic's atomic_thread_fence and executes it
    rw = default_rw_fence()
    rw()
    if platform.machine().lower() in {"x86_64", "amd64"}:
        assert rw is not ring._resolve_full_fence()
    else:
        assert rw is ring._resolve_full_fence()


def test_missing_libatomic_is_a_clear_error_unless_a_fence_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ring, "_LIBATOMIC", "libdisplback-no-such-library.so.0")
    monkeypatch.setattr(ring, "_full_fence_impl", None)
    with pytest.raises(FenceUnavailableError, match="libatomic1"):
        BackRing(bytearray(PAGE_SIZE), rw_fence=no_fence)
    BackRing(bytearray(PAGE_SIZE), fence=no_fence, rw_fence=no_fence)


class FenceLog:
    """Records, at each fence call, the header as the peer would see it."""

    def __init__(self, page: bytearray, name: str, log: list[tuple[str, tuple[int, ...]]]):
        self.page, self.name, self.log = page, name, log

    def __call__(self) -> None:
        self.log.append((self.name, header(self.page)))


def test_push_responses_orders_slot_write_index_store_and_event_load() -> None:
    page = bytearray(PAGE_SIZE)
    log: list[tuple[str, tuple[int, ...]]] = []
    front = FrontRing(page, fence=no_fence, rw_fence=no_fence)
    back = BackRing(page, fence=FenceLog(page, "mb", log), rw_fence=FenceLog(page, "rw", log))
    front.put_request(packet(1, 0))
    front.push_requests()
    back.take_requests()
    log.clear()
    back.put_response(packet(2, 0))
    assert back.push_responses() is True  # rsp_event is still 1
    # write barrier before rsp_prod is stored, full barrier after it (before rsp_event is read)
    assert log == [("rw", (1, 1, 0, 1)), ("mb", (1, 1, 1, 1))]


def test_final_check_fences_only_when_it_arms_req_event() -> None:
    page = bytearray(PAGE_SIZE)
    log: list[tuple[str, tuple[int, ...]]] = []
    front = FrontRing(page, fence=no_fence, rw_fence=no_fence)
    back = BackRing(page, fence=FenceLog(page, "mb", log), rw_fence=no_fence)
    front.put_request(packet(1, 0))
    front.push_requests()
    assert back.final_check() is True
    assert log == []  # work pending: nothing armed, no barrier
    back.take_requests()
    assert back.final_check() is False
    assert log == [("mb", (1, 2, 0, 1))]  # req_event = req_cons + 1 stored before the barrier


def test_push_requests_fences_between_req_prod_and_req_event() -> None:
    page = bytearray(PAGE_SIZE)
    log: list[tuple[str, tuple[int, ...]]] = []
    front = FrontRing(page, fence=FenceLog(page, "mb", log), rw_fence=FenceLog(page, "rw", log))
    front.put_request(packet(1, 0))
    front.push_requests()
    assert log == [("rw", (0, 1, 0, 1)), ("mb", (1, 1, 0, 1))]


# --- notification rule -------------------------------------------------------------------


def test_response_notifies_only_a_frontend_that_armed_rsp_event() -> None:
    page, front, back = connected()
    for i in range(3):
        front.put_request(packet(1, i))
    front.push_requests()
    back.take_requests()
    back.put_response(packet(2, 0))
    assert back.push_responses() is True  # rsp_event = 1 from init
    assert front.take_responses() == [packet(2, 0)]
    back.put_response(packet(2, 1))
    assert back.push_responses() is False  # front has not re-armed: it is still looking
    assert front.final_check_for_responses() is True
    assert front.take_responses() == [packet(2, 1)]
    assert front.final_check_for_responses() is False  # armed rsp_event = 3
    back.put_response(packet(2, 2))
    assert back.push_responses() is True


def test_push_without_new_messages_never_notifies() -> None:
    _, front, back = connected()
    assert front.push_requests() is False
    assert back.push_responses() is False


# --- model-based: wrap, batching, no loss/dup/reorder, no lost wake-up --------------------


class RingPair(RuleBasedStateMachine):
    """Front and back on one page, each awake or asleep; a side sleeps only after its final
    check said nothing is pending and wakes only when the peer notifies it."""

    @initialize(start=starts)
    def connect(self, start: int) -> None:
        self.page = bytearray(PAGE_SIZE)
        self.fences = {"front": 0, "back": 0}

        def counter(side: str) -> ring.Fence:
            def fence() -> None:
                self.fences[side] += 1

            return fence

        self.front = FrontRing(self.page, start=start, fence=counter("front"), rw_fence=no_fence)
        self.back = BackRing(self.page, start=start, fence=counter("back"), rw_fence=no_fence)
        self.next_serial = 0
        self.requests_in_flight: deque[int] = deque()  # put by front, not yet taken by back
        self.to_answer: list[int] = []  # taken by back, not yet answered
        self.responses_in_flight: deque[int] = deque()  # put by back, not yet taken by front
        self.answered: list[int] = []
        self.back_awake = True
        self.front_awake = True

    @rule(count=st.integers(1, RING_SIZE))
    def front_puts(self, count: int) -> None:
        for _ in range(min(count, RING_SIZE - self.front.outstanding)):
            self.front.put_request(packet(1, self.next_serial))
            self.requests_in_flight.append(self.next_serial)
            self.next_serial += 1

    @rule()
    def front_pushes(self) -> None:
        before = self.fences["front"]
        if self.front.push_requests():
            self.back_awake = True
        assert self.fences["front"] == before + 1

    @precondition(lambda self: self.back_awake)
    @rule()
    def back_takes(self) -> None:
        for data in self.back.take_requests():
            assert serial_of(data) == self.requests_in_flight.popleft()
            self.to_answer.append(serial_of(data))

    @rule(order=st.randoms(use_true_random=False), count=st.integers(1, RING_SIZE))
    def back_answers(self, order: random.Random, count: int) -> None:
        order.shuffle(self.to_answer)
        for serial in self.to_answer[:count]:
            self.back.put_response(packet(2, serial))
            self.responses_in_flight.append(serial)
        del self.to_answer[:count]

    @rule()
    def back_pushes(self) -> None:
        before = self.fences["back"]
        if self.back.push_responses():
            self.front_awake = True
        assert self.fences["back"] == before + 1

    @precondition(lambda self: self.back_awake)
    @rule()
    def back_final_check(self) -> None:
        pending = header(self.page)[0] != self.back.req_cons
        before = self.fences["back"]
        more = self.back.final_check()
        assert self.fences["back"] == before + (0 if pending else 1)
        assert more == (header(self.page)[0] != self.back.req_cons)
        if not more:
            self.back_awake = False

    @precondition(lambda self: self.front_awake)
    @rule()
    def front_takes(self) -> None:
        for data in self.front.take_responses():
            assert data[0] == 2
            assert serial_of(data) == self.responses_in_flight.popleft()
            self.answered.append(serial_of(data))

    @precondition(lambda self: self.front_awake)
    @rule()
    def front_final_check(self) -> None:
        if not self.front.final_check_for_responses():
            self.front_awake = False

    @invariant()
    def a_sleeping_side_has_nothing_published_for_it(self) -> None:
        req_prod, _, rsp_prod, _ = header(self.page)
        if not self.back_awake:
            assert req_prod == self.back.req_cons, "lost wake-up: requests wait for a sleeper"
        if not self.front_awake:
            assert rsp_prod == self.front.rsp_cons, "lost wake-up: responses wait for a sleeper"

    @invariant()
    def counters_agree_with_the_model(self) -> None:
        assert self.back.unanswered == len(self.to_answer)
        assert self.front.outstanding <= RING_SIZE

    def teardown(self) -> None:
        if not hasattr(self, "front"):
            return
        # Everything the front put eventually reaches the back and is answered exactly once.
        self.front_pushes()
        for _ in range(3):
            if self.back_awake:
                self.back_takes()
            self.to_answer.sort()
            for serial in self.to_answer:
                self.back.put_response(packet(2, serial))
                self.responses_in_flight.append(serial)
            self.to_answer.clear()
            self.back_pushes()
            if self.front_awake:
                self.front_takes()
        assert not self.requests_in_flight
        assert not self.responses_in_flight
        assert sorted(self.answered) == list(range(self.next_serial))


RingPair.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_ring_pair_delivers_everything_once_in_order_without_lost_wakeups = RingPair.TestCase


# --- hostile frontend ------------------------------------------------------------------------


def back_with_history(start: int, taken: int, answered: int) -> tuple[bytearray, BackRing]:
    """A backend that has taken ``taken`` requests and answered ``answered`` of them."""
    page, front, back = connected(start)
    for i in range(taken):
        front.put_request(packet(1, i))
    front.push_requests()
    assert len(back.take_requests()) == taken
    for i in range(answered):
        back.put_response(packet(2, i))
    back.push_responses()
    return page, back


@given(
    start=starts,
    taken=st.integers(0, RING_SIZE),
    data=st.data(),
)
def test_any_req_prod_gives_valid_copies_or_overflow_error(
    start: int, taken: int, data: st.DataObject
) -> None:
    answered = data.draw(st.integers(0, taken))
    page, back = back_with_history(start, taken, answered)
    for i in range(RING_SIZE):
        page[slot_offset(i) : slot_offset(i) + 64] = packet(3, i)  # guest rewrites every slot
    req_cons, pvt = back.req_cons, back.rsp_prod_pvt
    req_prod = data.draw(
        st.one_of(
            st.integers(-3, RING_SIZE + 3).map(lambda d: (req_cons + d) & INDEX_MASK),
            st.integers(-3, RING_SIZE + 3).map(lambda d: (pvt + d) & INDEX_MASK),
            st.integers(0, INDEX_MASK),
        )
    )
    set_u32(page, 0, req_prod)
    # Oracle: legal iff req_cons <= req_prod <= rsp_prod_pvt + 32 on the circle.
    new = (req_prod - req_cons) % U32
    legal = new <= RING_SIZE - (req_cons - pvt) % U32
    if legal:
        copies = back.take_requests()
        assert copies == [packet(3, (req_cons + i) % RING_SIZE) for i in range(new)]
        assert back.req_cons == req_prod
    else:
        with pytest.raises(ProtocolError) as err:
            back.take_requests()
        assert err.value.errno is None
        assert err.value.what == "req_prod"
        assert back.req_cons == req_cons  # nothing consumed
        # The caller is sent back to find the error, once it has a free slot to look at.
        assert back.final_check() is (back.unanswered < RING_SIZE)


def test_final_check_sleeps_while_every_slot_awaits_its_response() -> None:
    """RING_HAS_UNCONSUMED_REQUESTS is capped by the free response slots: with all 32
    requests unanswered a req_prod claiming more is nothing to read yet, so the backend
    arms req_event and sleeps; one response later the claim is looked at (and refused)."""
    start = U32 - 5  # across the u32 wrap
    page, back = back_with_history(start, RING_SIZE, 0)
    assert back.unanswered == RING_SIZE
    set_u32(page, 0, start + RING_SIZE + 3)  # three more than the ring can hold
    assert back.final_check() is False
    assert header(page)[1] == (start + RING_SIZE + 1) & INDEX_MASK  # req_event armed
    back.put_response(packet(2, 0))
    back.push_responses()
    assert back.final_check() is True
    with pytest.raises(ProtocolError, match="producer overflow"):
        back.take_requests()


def test_final_check_counts_at_most_the_free_response_slots() -> None:
    page, back = back_with_history(0, RING_SIZE - 1, 0)  # one slot free
    set_u32(page, 0, RING_SIZE - 1 + 1)  # an honest guest fills it
    assert back.final_check() is True
    assert back.take_requests() == [bytes(page[slot_offset(31) : slot_offset(31) + 64])]
    assert back.final_check() is False  # 32 unanswered: nothing more to read


def test_the_backend_counts_requests_taken_and_responses_pushed_over_rounds() -> None:
    page, front, back = connected(U32 - 3)
    assert (back.requests_taken, back.responses_pushed) == (0, 0)
    for round_ in range(1, 4):
        for i in range(5):
            front.put_request(packet(1, i))
        front.push_requests()
        assert len(back.take_requests()) == 5
        for i in range(5):
            back.put_response(packet(2, i))
        back.push_responses()
        assert (back.requests_taken, back.responses_pushed) == (5 * round_, 5 * round_)
        assert len(front.take_responses()) == 5


def test_a_refused_req_prod_is_named_with_its_value() -> None:
    page, back = back_with_history(0, 0, 0)
    set_u32(page, 0, RING_SIZE + 7)
    with pytest.raises(ProtocolError) as err:
        back.take_requests()
    assert (err.value.what, err.value.value) == ("req_prod", RING_SIZE + 7)
    page, back = back_with_history(100, 10, 4)
    set_u32(page, 0, 105)
    with pytest.raises(ProtocolError) as err:
        back.take_requests()
    assert (err.value.what, err.value.value) == ("req_prod", 105)


def test_producer_overflow_is_refused() -> None:
    page, back = back_with_history(0, 0, 0)
    set_u32(page, 0, RING_SIZE + 1)
    with pytest.raises(ProtocolError, match="producer overflow"):
        back.take_requests()


def test_req_prod_moving_backwards_is_consumer_overflow() -> None:
    page, back = back_with_history(100, 10, 4)  # req_cons 110, rsp_prod_pvt 104
    set_u32(page, 0, 105)  # within 32 of rsp_prod_pvt, but behind req_cons
    with pytest.raises(ProtocolError, match="consumer overflow"):
        back.take_requests()


@given(
    start=st.integers(0, INDEX_MASK),
    head=st.binary(min_size=64, max_size=64),
    fill=st.integers(0, 2**64),
    near=st.none() | st.integers(-2, RING_SIZE + 2),
    responses=st.integers(0, 3),
)
def test_arbitrary_page_bytes_give_protocol_error_or_copies_of_the_slots(
    start: int, head: bytes, fill: int, near: int | None, responses: int
) -> None:
    page = bytearray(head + random.Random(fill).randbytes(PAGE_SIZE - 64))
    if near is not None:  # also land req_prod where it may be legal
        set_u32(page, 0, start + near)
    garbage = bytes(page)
    back = BackRing(page, start=start, fence=no_fence, rw_fence=no_fence)
    try:
        copies = back.take_requests()
    except ProtocolError as exc:
        assert exc.errno is None
        copies = []
    assert back.req_cons == (start + len(copies)) % U32
    for i, data in enumerate(copies):
        assert data == garbage[slot_offset(start + i) : slot_offset(start + i) + 64]
    assert isinstance(back.final_check(), bool)
    for i in range(min(responses, len(copies))):
        back.put_response(packet(2, i))
    assert isinstance(back.push_responses(), bool)


@given(
    start=st.integers(0, INDEX_MASK),
    sent=st.integers(0, RING_SIZE),
    hostile_header=st.binary(min_size=16, max_size=16),
    near=st.none() | st.integers(-2, RING_SIZE + 2),
)
def test_front_accepts_only_as_many_responses_as_requests_published(
    start: int, sent: int, hostile_header: bytes, near: int | None
) -> None:
    page = bytearray(PAGE_SIZE)
    front = FrontRing(page, start=start, fence=no_fence, rw_fence=no_fence)
    for i in range(sent):
        front.put_request(packet(1, i))
    front.push_requests()
    page[:16] = hostile_header
    if near is not None:
        set_u32(page, 8, start + near)
    rsp_prod = header(page)[2]
    claimed = (rsp_prod - start) % U32
    if claimed <= sent:
        assert front.take_responses() == [packet(1, i) for i in range(claimed)]
        assert front.rsp_cons == rsp_prod
    else:
        with pytest.raises(ProtocolError) as err:
            front.take_responses()
        assert err.value.what == "rsp_prod"
        assert front.rsp_cons == start
    assert isinstance(front.final_check_for_responses(), bool)


def test_final_check_catches_a_request_published_while_it_arms_req_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    page, front, back = connected()
    front.put_request(packet(1, 0))
    assert front.push_requests() is True
    back.take_requests()
    store = back._store

    def racing_store(offset: int, value: int) -> None:
        if offset == RING_REQ_EVENT_OFS:  # the front publishes just before req_event lands
            front.put_request(packet(1, 1))
            assert front.push_requests() is False  # it saw the stale req_event: no kick
        store(offset, value)

    monkeypatch.setattr(back, "_store", racing_store)
    assert back.final_check() is True  # so the re-read must find the request
    assert back.take_requests() == [packet(1, 1)]


def test_final_check_for_responses_catches_a_response_published_while_it_arms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    page, front, back = connected()
    front.put_request(packet(1, 0))
    front.put_request(packet(1, 1))
    front.push_requests()
    back.take_requests()
    back.put_response(packet(2, 0))
    assert back.push_responses() is True
    front.take_responses()
    store = front._store

    def racing_store(offset: int, value: int) -> None:
        if offset == RING_RSP_EVENT_OFS:
            back.put_response(packet(2, 1))
            assert back.push_responses() is False
        store(offset, value)

    monkeypatch.setattr(front, "_store", racing_store)
    assert front.final_check_for_responses() is True
    assert front.take_responses() == [packet(2, 1)]


def test_guest_scribbling_rsp_prod_does_not_change_the_notify_decision() -> None:
    page, front, back = connected()
    front.put_request(packet(1, 0))
    front.push_requests()
    back.take_requests()
    back.put_response(packet(2, 0))
    set_u32(page, 8, 1)  # the guest pre-writes the value we are about to publish
    assert back.push_responses() is True  # rsp_event = 1 lies in (0, 1] of OUR publish


def test_request_copy_is_unaffected_by_guest_rewriting_the_slot() -> None:
    page, front, back = connected()
    front.put_request(packet(1, 7))
    front.push_requests()
    (copy,) = back.take_requests()
    page[slot_offset(0) : slot_offset(0) + 64] = b"\xff" * 64
    assert copy == packet(1, 7)
    assert isinstance(copy, bytes)


def test_put_response_refuses_more_responses_than_requests_taken() -> None:
    page, front, back = connected()
    front.put_request(packet(1, 0))
    front.put_request(packet(1, 1))
    front.push_requests()
    set_u32(page, 0, 1)  # pretend the back only saw the first one
    back.take_requests()
    back.put_response(packet(2, 0))
    with pytest.raises(RuntimeError):
        back.put_response(packet(2, 1))
    assert page[slot_offset(1) : slot_offset(1) + 64] == packet(1, 1)  # request not clobbered
    assert back.pending_responses == 1


def test_front_refuses_a_33rd_outstanding_request() -> None:
    _, front, _ = connected()
    for i in range(RING_SIZE):
        front.put_request(packet(1, i))
    with pytest.raises(RuntimeError):
        front.put_request(packet(1, RING_SIZE))


def test_packets_must_be_64_bytes() -> None:
    _, front, _ = connected()
    with pytest.raises(ValueError):
        front.put_request(b"short")
