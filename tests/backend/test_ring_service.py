"""The request ring is served in the event-channel reader's wake-up (``Connector.kick``):
PG_FLIP and FB_ATTACH are answered and the frame started there, with no task of the
connector running; a request that must wait hands itself and everything behind it to the
ring task, and the answers keep the ring's order; a guest refilling its ring as fast as it
is answered gets at most ``REQUESTS_PER_WAKEUP`` answers per wake-up (issue 12 goal 1).

The connector is built over plain pages here, with a recording output and event channels,
so each test sees exactly what one wake-up did.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import outcome
import trio
import trio.testing

from displback.backend.connector import REQUESTS_PER_WAKEUP, Connector
from displback.backend.errors import RequestError
from displback.backend.quotas import TokenBucket
from displback.display.interface import DisplayError, FlipResult
from displback.protocol.constants import EINVAL, ENOENT, PAGE_SIZE
from displback.protocol.evtpage import EventConsumer, EventProducer
from displback.protocol.layout import ConnectorConfig
from displback.protocol.messages import (
    DbufDestroyReq,
    FbAttachReq,
    PgFlipReq,
    Response,
)
from displback.protocol.ring import BackRing, FrontRing

REQ_PORT, EVT_PORT = 7, 8
XRGB8888 = 0x34325258


def _no_fence() -> None:
    pass


class _Channels:
    """Event channels that record notifies and unmasks; ``on_notify`` plays the guest."""

    def __init__(self) -> None:
        self.notified: list[int] = []
        self.unmasked: list[int] = []
        self.on_notify: Callable[[int], None] | None = None

    def notify(self, port: int) -> None:
        self.notified.append(port)
        if self.on_notify is not None:
            self.on_notify(port)

    def unmask(self, ports: list[int]) -> None:
        self.unmasked.extend(ports)


class _Output:
    """An output that starts every flip and lands it when the test says so."""

    def __init__(self) -> None:
        self.started: list[Any] = []
        self._landing: list[Callable[[FlipResult | None], None]] = []

    @property
    def flip_pending(self) -> bool:
        return bool(self._landing)

    def start_flip(self, fb: Any, on_landed: Callable[[FlipResult | None], None]) -> bool:
        self.started.append(fb)
        self._landing.append(on_landed)
        return True

    def land(self) -> None:
        on_landed = self._landing.pop(0)
        on_landed(FlipResult(self.started[-1], len(self.started), 0.0))


class _Framebuffer:
    released = False

    def __init__(self, cookie: int) -> None:
        self.cookie = cookie

    def present_now(self, output: Any) -> Any:
        return ("display fb", self.cookie)


class _Buffers:
    """Every cookie is a framebuffer; DBUF_DESTROY waits until ``destroyed`` is set."""

    def __init__(self) -> None:
        self.attached: list[int] = []
        self.destroyed = trio.Event()

    def framebuffer(self, fb_cookie: int) -> _Framebuffer:
        return _Framebuffer(fb_cookie)

    def attach(self, req: FbAttachReq) -> None:
        self.attached.append(req.fb_cookie)

    async def destroy(self, req: DbufDestroyReq) -> None:
        await self.destroyed.wait()

    async def create(self, req: Any) -> None:  # pragma: no cover - not sent here
        raise AssertionError("not used")

    async def detach(self, req: Any) -> None:  # pragma: no cover - not sent here
        raise AssertionError("not used")

    async def write_edid(self, req: Any, edid: bytes) -> int:  # pragma: no cover - not sent
        raise AssertionError("not used")


class _Rig:
    """One connector over plain pages, the guest's ends of them, and what it touched."""

    def __init__(self, *, rate: float = 1e6, burst: int = 1000) -> None:
        ring_page, evt_page = bytearray(PAGE_SIZE), bytearray(PAGE_SIZE)
        self.front = FrontRing(ring_page, fence=_no_fence, rw_fence=_no_fence)
        self.events = EventConsumer(evt_page, rw_fence=_no_fence)
        self.channels = _Channels()
        self.output = _Output()
        self.buffers = _Buffers()
        self.violations: list[str] = []
        self.connector = Connector(
            config=ConnectorConfig(index=0, width=640, height=480, unique_id="c0"),
            ring=BackRing(ring_page, fence=_no_fence, rw_fence=_no_fence),
            events=EventProducer(evt_page, rw_fence=_no_fence),
            evtchn=self.channels,  # type: ignore[arg-type]
            req_port=REQ_PORT,
            evt_port=EVT_PORT,
            buffers=self.buffers,
            output=self.output,  # type: ignore[arg-type]
            limiter=TokenBucket(rate, burst),
            on_violation=self.violations.append,
        )
        self.connector.mode_fb = (640, 480)  # as after a SET_CONFIG that showed a frame

    def send(self, *requests: Any) -> None:
        for request in requests:
            self.front.put_request(request.pack())
        self.front.push_requests()

    def responses(self) -> list[Response]:
        return [Response.parse(raw) for raw in self.front.take_responses()]


def _flip(id_: int, cookie: int) -> PgFlipReq:
    return PgFlipReq(id=id_, fb_cookie=cookie)


async def test_a_burst_of_flips_in_one_notification_is_answered_in_that_wakeup_in_order() -> None:
    rig = _Rig()
    rig.send(*(_flip(n, 0x100 + n) for n in range(1, 6)))
    # No task of the connector runs: what follows is all the reader's one wake-up.
    rig.connector.kick()
    answers = rig.responses()
    assert [(r.id, r.status) for r in answers] == [(n, 0) for n in range(1, 6)]
    assert rig.channels.unmasked == [REQ_PORT]  # drained, so unmasked in the same wake-up
    assert rig.output.started == [("display fb", 0x101)]  # the first flip started at once
    assert rig.connector.stats.wakeups == 1
    # The display's landing publishes the first flip's event and starts the newest of the
    # four queued behind it, in its own wake-up; the second landing owes four events.
    rig.output.land()
    assert [e.fb_cookie for e in rig.events.take()] == [0x101]
    assert rig.output.started[-1] == ("display fb", 0x105)
    rig.output.land()
    assert [e.fb_cookie for e in rig.events.take()] == [0x102, 0x103, 0x104, 0x105]
    assert rig.channels.notified.count(EVT_PORT) == 2
    assert rig.connector.stats.flips_coalesced == 3
    assert rig.connector.stats.events_sent == 5


async def test_attach_and_bad_requests_are_answered_in_the_reader_wakeup_too() -> None:
    rig = _Rig()
    attach = FbAttachReq(id=1, dbuf_cookie=9, fb_cookie=0x200, width=640, height=480,
                         pixel_format=XRGB8888)
    rig.send(attach, _flip(2, 0))  # cookie 0 is invalid: -EINVAL for this request only
    rig.connector.kick()
    assert [(r.id, r.status) for r in rig.responses()] == [(1, 0), (2, -EINVAL)]
    assert rig.buffers.attached == [0x200]
    assert rig.connector.stats.errors == 1
    assert rig.channels.unmasked == [REQ_PORT]


async def test_a_request_that_waits_goes_to_the_ring_task_and_answers_keep_ring_order() -> None:
    rig = _Rig()
    rig.send(_flip(1, 0x101), DbufDestroyReq(id=2, dbuf_cookie=5), _flip(3, 0x103))
    rig.connector.kick()
    # The flip before it is answered at once; the destroy and the flip behind it wait.
    assert [r.id for r in rig.responses()] == [1]
    assert rig.channels.unmasked == []  # the port stays masked while the ring task owns it
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.connector.run)
            await trio.testing.wait_all_tasks_blocked()
            # A new notification meanwhile must not let the reader answer past the destroy.
            rig.send(_flip(4, 0x104))
            rig.connector.kick()
            await trio.testing.wait_all_tasks_blocked()
            assert rig.responses() == []
            rig.buffers.destroyed.set()
            while rig.channels.unmasked != [REQ_PORT]:
                await trio.sleep(0.001)
            assert [(r.id, r.status) for r in rig.responses()] == [(2, 0), (3, 0), (4, 0)]
            # Served by the ring task, the ring is the reader's again afterwards.
            rig.send(_flip(5, 0x105))
            rig.connector.kick()
            assert [r.id for r in rig.responses()] == [5]
            nursery.cancel_scope.cancel()


async def test_a_guest_refilling_its_ring_gets_a_bounded_batch_per_wakeup() -> None:
    rig = _Rig()
    total = REQUESTS_PER_WAKEUP + 20
    answered: list[int] = []

    def refill(port: int) -> None:
        # The guest reads every response at once and sends a new request for it, as fast as
        # it can, re-arming its response notification each time.
        if port != REQ_PORT:
            return
        answered.extend(r.id for r in rig.responses())
        if len(answered) < total and rig.front.req_prod_pvt < total:
            rig.send(_flip(rig.front.req_prod_pvt + 1, 0x1000 + rig.front.req_prod_pvt))
        rig.front.final_check_for_responses()

    rig.channels.on_notify = refill
    refill(REQ_PORT)
    rig.connector.kick()
    assert answered == list(range(1, REQUESTS_PER_WAKEUP + 1))
    assert rig.channels.unmasked == []  # the rest is the ring task's, in a later pass
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.connector.run)
            while rig.channels.unmasked != [REQ_PORT]:
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    answered.extend(r.id for r in rig.responses())
    assert answered == list(range(1, total + 1))


async def test_a_guest_over_its_request_rate_is_served_by_the_ring_task_after_a_token() -> None:
    # A token every 20 ms: requests 3 and 4 find none, however the clock's ticks (the
    # bucket reads the coarse clock: 1-10 ms) fall between the kick and the ring task.
    rig = _Rig(rate=50.0, burst=2)
    rig.send(*(_flip(n, 0x100 + n) for n in range(1, 5)))
    rig.connector.kick()
    assert [r.id for r in rig.responses()] == [1, 2]  # the burst; the rest waits for tokens
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.connector.run)
            while rig.channels.unmasked != [REQ_PORT]:
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    assert [r.id for r in rig.responses()] == [3, 4]
    assert rig.connector.stats.throttled >= 1


async def test_a_broken_ring_is_reported_once_and_not_served_again() -> None:
    rig = _Rig()
    # A producer index 40 requests ahead of the responses: more than the ring holds.
    rig.front._store(0, 40)
    rig.connector.kick()
    rig.connector.kick()
    assert len(rig.violations) == 1 and "producer overflow" in rig.violations[0]
    assert rig.channels.unmasked == []


# --- copy-mode frames: the copy's hand-back starts the flip -----------------------------------


class _CopiedFramebuffer(_Framebuffer):
    """A copy-mode framebuffer: every frame is copied; the test hands back each copy."""

    def __init__(
        self, cookie: int, copies: list[Callable[[Any], None]],
        landings: list[Callable[[FlipResult | None], None] | None],
    ) -> None:
        super().__init__(cookie)
        self._copies = copies
        self._landings = landings

    def present_now(self, output: Any) -> Any:
        return None

    def present_later(
        self, output: Any, ready: Callable[[Any], None],
        on_landed: Callable[[FlipResult | None], None] | None = None,
    ) -> None:
        self._copies.append(ready)
        self._landings.append(on_landed)  # called if the copy's thread flipped (ready(None))

    async def present_on(self, output: Any) -> Any:  # pragma: no cover - must not copy twice
        raise AssertionError("the copy was made already")


class _CopyBuffers(_Buffers):
    def __init__(self) -> None:
        super().__init__()
        self.copies: list[Callable[[Any], None]] = []
        self.landings: list[Callable[[FlipResult | None], None] | None] = []

    def framebuffer(self, fb_cookie: int) -> _Framebuffer:
        return _CopiedFramebuffer(fb_cookie, self.copies, self.landings)


class _WaitingOutput(_Output):
    """An output that cannot start its first flip without waiting (KMS's first legacy
    modeset): ``start_flip`` refuses it and ``flip`` shows it."""

    def __init__(self) -> None:
        super().__init__()
        self.flipped: list[Any] = []

    def start_flip(self, fb: Any, on_landed: Callable[[FlipResult | None], None]) -> bool:
        if not self.flipped:
            return False
        return super().start_flip(fb, on_landed)

    async def flip(self, fb: Any) -> FlipResult:
        self.flipped.append(fb)
        return FlipResult(fb, 1, 0.0)


def _copy_rig(output: _Output | None = None) -> tuple[_Rig, _CopyBuffers]:
    """A rig whose framebuffers are all copied (the test hands back each copy)."""
    rig = _Rig()
    buffers = _CopyBuffers()
    rig.buffers = rig.connector._buffers = buffers
    if output is not None:
        rig.output = output
        rig.connector.output = output  # type: ignore[assignment]
    return rig, buffers


@contextlib.asynccontextmanager
async def _running_with_a_flip(rig: _Rig) -> AsyncIterator[trio.Nursery]:
    """The connector's tasks running, and a PG_FLIP of 0x101 taken in the reader's wake-up."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.connector.run)
            await trio.testing.wait_all_tasks_blocked()
            rig.send(_flip(1, 0x101))
            rig.connector.kick()
            yield nursery
            nursery.cancel_scope.cancel()


async def test_a_copy_mode_frame_is_flipped_by_its_copys_hand_back_in_that_wakeup() -> None:
    rig, buffers = _copy_rig()
    rig.send(_flip(1, 0x101))
    rig.connector.kick()
    assert [r.id for r in rig.responses()] == [1]
    assert len(buffers.copies) == 1 and rig.output.started == []  # copying, not flipping yet
    buffers.copies.pop()(outcome.Value("copy of 0x101"))
    assert rig.output.started == ["copy of 0x101"]  # no task ran in between
    rig.output.land()
    assert [e.fb_cookie for e in rig.events.take()] == [0x101]


async def test_a_copy_whose_thread_flipped_is_landed_by_the_output_not_flipped_again() -> None:
    rig, buffers = _copy_rig()
    rig.send(_flip(1, 0x101))
    rig.connector.kick()
    rig.responses()
    rig.send(_flip(2, 0x102))  # queued behind the frame being copied and flipped
    rig.connector.kick()
    on_landed = buffers.landings.pop()
    assert on_landed is not None  # the connector let the copy's thread flip
    buffers.copies.pop()(outcome.Value(None))  # handed back: the thread issued the flip
    assert rig.output.started == [] and rig.events.take() == []  # nothing flipped twice
    shown: Any = "copy of 0x101"
    on_landed(FlipResult(shown, 1, 0.0))  # the output lands it
    assert [e.fb_cookie for e in rig.events.take()] == [0x101]
    assert len(buffers.copies) == 1  # the next frame's copy started in that wake-up


async def test_a_flip_its_thread_could_not_issue_drops_the_frame_and_sends_its_event() -> None:
    rig, buffers = _copy_rig()
    rig.send(_flip(1, 0x101))
    rig.connector.kick()
    buffers.copies.pop()(outcome.Error(DisplayError("flip failed: EINVAL")))
    assert rig.output.started == []
    assert [e.fb_cookie for e in rig.events.take()] == [0x101]
    assert rig.connector.stats.frames_shown == 0


async def test_a_copy_that_failed_drops_its_frame_and_still_sends_the_flips_event() -> None:
    rig, buffers = _copy_rig()
    rig.send(_flip(1, 0x101))
    rig.connector.kick()
    rig.responses()
    rig.send(_flip(2, 0x102))  # queued behind the frame being copied
    rig.connector.kick()
    buffers.copies.pop()(outcome.Error(RequestError(ENOENT, "released while copying")))
    assert rig.output.started == []
    assert [e.fb_cookie for e in rig.events.take()] == [0x101]
    assert len(buffers.copies) == 1  # the next frame's copy started in the same wake-up


async def test_a_copy_the_output_cannot_flip_at_once_is_shown_by_the_scanout_task() -> None:
    output = _WaitingOutput()
    rig, buffers = _copy_rig(output)
    async with _running_with_a_flip(rig):
        buffers.copies.pop()(outcome.Value("copy of 0x101"))
        await trio.testing.wait_all_tasks_blocked()
        assert output.flipped == ["copy of 0x101"]  # the copy made, not a second one
        assert [e.fb_cookie for e in rig.events.take()] == [0x101]


async def test_a_copy_handed_back_after_the_connector_stopped_touches_nothing() -> None:
    rig, buffers = _copy_rig()
    async with _running_with_a_flip(rig):
        pass  # then the connector stops
    notified = list(rig.channels.notified)
    buffers.copies.pop()(outcome.Value("copy of 0x101"))
    assert rig.output.started == [] and rig.events.take() == []
    assert rig.channels.notified == notified
