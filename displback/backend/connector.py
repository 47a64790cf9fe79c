"""One guest connector: its request ring, its event page, and the output it is shown on.

A :class:`Connector` serves the requests of one ring and turns accepted flips into frames on
its :class:`~displback.display.interface.Output` and EVT_PG_FLIP events on its event page.

Theory of operation
-------------------
The request ring is served **in the wake-up of the device's event-channel reader** that saw
its port fire (:meth:`Connector.kick`): take every request (copied out once by
:class:`~displback.protocol.ring.BackRing`), answer each in order, publish, notify when the
ring rule says so, run the final check, and only then unmask the port. The Linux guest has one
request in flight per ring and waits 3000 ms for it, so a request is answered as soon as its
outcome is known: PG_FLIP is answered when *queued*, FB_ATTACH when recorded — both at once,
in that wake-up — SET_CONFIG when the output has taken the new configuration (one vblank),
buffer requests when done. A wake-up that finds no request costs the guest a token
(``SPURIOUS_WAKEUPS_PER_SECOND``); without one the port stays masked until one is due, so
notification floods are bounded.

Two tasks per connector, in the connection's nursery, take over what cannot be done at once:

* **ring** — a request that must wait (buffers, SET_CONFIG, GET_EDID), a guest over its
  request rate or out of spurious-wake-up tokens, or more than ``REQUESTS_PER_WAKEUP``
  requests in one wake-up: that request and every one behind it are handed to the ring task,
  which answers them in order, waiting where it must, and serves the ring until it can unmask.
  While it does, the reader leaves the ring alone, so responses never overtake each other.
* **scanout** — the output's slow path: SET_CONFIG (disable, or a flip awaited until the output
  has taken the configuration) and frames that the output cannot start without waiting (KMS's
  first legacy modeset).

Which flip is shown when, and which events are owed, is decided by a
:class:`~displback.protocol.flipqueue.FlipQueue` (sans-I/O; queueing, coalescing, the event
page's back-pressure and the drop bound live there). The connector only drives it: a PG_FLIP is
accepted into it, and when the output is free the next frame is started **in the same
wake-up** — a zero-copy frame right after the PG_FLIP's answer, the next queued one by the
output's own landing callback (:meth:`~displback.display.interface.Output.start_flip`), which
also writes the landed frame's events and notifies the guest. A zero-copy flip therefore costs
one wake-up for its request (the reader's) and the display's own at the vblank, no task hop.
A copy-mode frame's copy is handed to a worker thread in that same wake-up
(:meth:`~displback.backend.buffers.GuestFramebuffer.present_later`), and the copy's own
hand-back to the loop starts the flip (:meth:`Connector._copied`): one wake-up more, still no
task hop.

Events that do not fit the event page (the guest has not consumed 63 of them) stay queued and
are retried every few milliseconds: the guest never tells us when it consumed.

Bad requests cost the guest that request (an error status). Broken rings or event pages — a
:class:`~displback.protocol.errors.ProtocolError` without errno — are protocol violations that
close the whole device; that decision belongs to the device, which we tell through
``on_violation``.
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import outcome
import structlog
import trio

from displback.backend.clock import coarse_monotonic
from displback.backend.errors import RequestError
from displback.backend.quotas import TokenBucket
from displback.backend.throttle import LogThrottle
from displback.display.interface import DisplayError, FlipResult, Framebuffer, Output
from displback.protocol.constants import EINVAL, EIO, ENODEV, EOPNOTSUPP
from displback.protocol.edid import build_edid
from displback.protocol.errors import ProtocolError
from displback.protocol.evtpage import EventProducer
from displback.protocol.flipqueue import (
    MAX_QUEUED_EVENTS,
    ConfigCommand,
    FlipCounters,
    FlipQueue,
    Frame,
)
from displback.protocol.layout import ConnectorConfig
from displback.protocol.messages import (
    DbufCreateReq,
    DbufDestroyReq,
    FbAttachReq,
    FbDetachReq,
    GetEdidReq,
    PgFlipReq,
    RequestHeader,
    Response,
    SetConfigReq,
    parse_request,
)
from displback.protocol.ring import BackRing
from displback.xen.interfaces import EventChannels

__all__ = ["MAX_QUEUED_EVENTS", "Buffers", "Connector", "ConnectorStats"]

_EVENT_RETRY_S = 0.005
#: Wake-ups of the ring task that find no new request (the guest notified with nothing in the
#: ring) allowed per second and in a burst, per connector. Linux notifies only after pushing
#: a request, so a spurious wake-up is the rare notification that raced our final check (at
#: most one per request; one request is in flight per ring). Past the budget the request port
#: stays masked until a token is due: a guest notifying in a tight loop costs Dom0 at most
#: this many wake-ups, and its requests wait at most one token interval.
SPURIOUS_WAKEUPS_PER_SECOND = 100.0
SPURIOUS_WAKEUP_BURST = 32
#: Requests the reader's wake-up answers before it leaves the rest of a ring to the ring task
#: (a later pass of the loop): a guest refilling its ring as fast as it is answered cannot
#: keep the reader, and the other connectors of its device, to itself.
REQUESTS_PER_WAKEUP = 32
#: Requests answered without waiting, in the reader's wake-up; the others go to the ring task.
_ANSWERED_AT_ONCE = frozenset({PgFlipReq, FbAttachReq})
#: How long a Linux guest waits for a flip's event (xen-drm-front's frame-done timeout, 3.1 s
#: including its 100 ms margin); an event later than this has already timed out there.
FRAME_DONE_TIMEOUT_S = 3.1
#: Warnings a guest can cause repeatedly (throttling, dropped events) at most this often.
REPEATED_WARNING_INTERVAL_S = 10.0


class Buffers(Protocol):
    """What a connector needs of the device's buffer storage (``BufferStore``)."""

    async def create(self, req: DbufCreateReq) -> None: ...

    async def destroy(self, req: DbufDestroyReq) -> None: ...

    def attach(self, req: FbAttachReq) -> None: ...

    async def detach(self, req: FbDetachReq) -> None: ...

    def framebuffer(self, fb_cookie: int) -> Any: ...

    async def write_edid(self, req: GetEdidReq, edid: bytes) -> int: ...


@dataclass
class ConnectorStats(FlipCounters):
    """Counters of one connector since it connected (the flip queue's among them).

    ``events_late``: flip events delivered later than the guest waits for them (it timed out;
    see ``FRAME_DONE_TIMEOUT_S``). With ``events_dropped`` these are its frame-done timeouts.
    """

    requests: int = 0
    errors: int = 0
    frames_shown: int = 0
    throttled: int = 0
    wakeups: int = 0
    spurious_wakeups: int = 0
    wakeups_throttled: int = 0


@dataclass
class _Config:
    """A SET_CONFIG for the scanout task; ``done`` wakes the ring task with the outcome."""

    fb: Any | None
    done: trio.Event = field(default_factory=trio.Event)
    error: RequestError | None = None


class Connector:
    """Serves connector ``config.index`` of one connected guest device."""

    def __init__(
        self,
        *,
        config: ConnectorConfig,
        ring: BackRing,
        events: EventProducer,
        evtchn: EventChannels,
        req_port: int,
        evt_port: int,
        buffers: Buffers,
        output: Output | None,
        limiter: TokenBucket,
        on_violation: Callable[[str], None],
        log: Any = None,
    ) -> None:
        self.config = config
        self.index = config.index
        self._ring = ring
        self._events = events
        self._evtchn = evtchn
        self.req_port = req_port
        self.evt_port = evt_port
        self._buffers = buffers
        self.output = output
        self._limiter = limiter
        self._spurious = TokenBucket(SPURIOUS_WAKEUPS_PER_SECOND, SPURIOUS_WAKEUP_BURST)
        self._on_violation = on_violation
        self._log = log if log is not None else structlog.get_logger("displback.connector")
        self._edid = build_edid(config.width, config.height, serial=config.index)
        self.stats = ConnectorStats()
        #: When this connector was connected (``time.monotonic``), for rates in the status.
        self.started_at = time.monotonic()
        self._flood_log = LogThrottle(REPEATED_WARNING_INTERVAL_S, trio.current_time)
        self._throttle_log = LogThrottle(REPEATED_WARNING_INTERVAL_S, trio.current_time)
        self._drop_log = LogThrottle(REPEATED_WARNING_INTERVAL_S, trio.current_time)
        self._ring_kick = trio.Event()
        # The ring task is serving the ring (the reader hands over, see kick()); what it has
        # taken and not answered yet, parsed, in order; a spurious wake-up it must wait for.
        self._ring_busy = False
        self._backlog: collections.deque[Any] = collections.deque()
        self._spurious_owed = False
        # The ring broke the protocol: it is not served any more (the device closes).
        self._dead = False
        # Its times (a flip's age, for events_late) are the coarse clock's: read on every
        # flip, and a tick is nothing beside the guest's 3 s timeout.
        self._flips: FlipQueue[Any, _Config] = FlipQueue(
            events,
            max_queued_events=MAX_QUEUED_EVENTS,
            late_after=FRAME_DONE_TIMEOUT_S,
            counters=self.stats,
        )
        # The command the scanout task is to carry out (the flip queue's, in flight).
        self._slow: Frame[Any] | ConfigCommand[_Config] | None = None
        # The copy made for that frame, when its copy's hand-back could not flip at once.
        self._ready: Framebuffer | None = None
        self._scanout_kick = trio.Event()
        self._events_stuck = trio.Event()
        # Set when run() ends: a flip landing after that has nobody to tell (the event page
        # and channels are gone).
        self._stopped = False
        # A failure of ours outside any request (say, writing an event): the scanout task
        # raises it in the connector's nursery, which resets the device, instead of the flip
        # queue wedging with a command in flight forever.
        self._failure: Exception | None = None
        # Width, height of what SET_CONFIG last showed; None while the connector is disabled.
        self.mode_fb: tuple[int, int] | None = None

    # --- wiring ---------------------------------------------------------------------------

    def kick(self) -> None:
        """The request channel fired: called by the device's event-channel reader, in its own
        wake-up, which serves the ring right here unless a request needs waiting."""
        if self._dead:
            return
        self.stats.wakeups += 1
        if self._ring_busy:
            # The ring task is on it (a request that waits, a throttle): it serves the ring
            # until it can unmask, so it takes whatever this notification announced.
            return
        try:
            if self._serve_now():
                return
        except ProtocolError as exc:
            self._ring_violation(exc)
            return
        self._ring_busy = True
        self._ring_kick.set()

    async def run(self) -> None:
        """Serve until cancelled; a violation is reported through ``on_violation``."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_ring)
                nursery.start_soon(self._scanout)
                nursery.start_soon(self._retry_events)
        finally:
            self._stopped = True

    # --- ring -------------------------------------------------------------------------------

    def _serve_now(self) -> bool:
        """Serve the ring without waiting; True if done (the port unmasked, nothing left),
        False if the ring task must go on (``_backlog``, ``_spurious_owed``, or more than
        ``REQUESTS_PER_WAKEUP`` requests)."""
        ring = self._ring
        taken = 0
        while True:
            packets = ring.take_requests()
            for i, raw in enumerate(packets):
                taken += 1
                item = self._parse(raw)
                if (
                    not isinstance(item, Response) and type(item) not in _ANSWERED_AT_ONCE
                ) or not self._limiter.take():
                    # A request that waits (buffers, SET_CONFIG), or the guest is over its
                    # request rate: it and the ones behind it go to the ring task, in order.
                    self._backlog.append(item)
                    self._backlog.extend(self._parse(rest) for rest in packets[i + 1 :])
                    return False
                self._respond(item.pack() if isinstance(item, Response) else self._answer_now(item))
            if not ring.final_check():
                break
            if taken >= REQUESTS_PER_WAKEUP:
                return False  # a guest refilling its ring as fast as we answer: yield
        if not taken and not self._spurious_now():
            self._spurious_owed = True
            return False
        # Unmask only after draining: bounds guest-driven wake-ups (reference §3.3). The
        # unmask is a syscall; re-check the ring once more after it in case a request
        # arrived between the final check and the unmask.
        self._evtchn.unmask([self.req_port])
        return not ring.final_check()

    async def _serve_ring(self) -> None:
        """The ring task: serves what :meth:`kick` handed over, waiting where it must."""
        while True:
            await self._ring_kick.wait()
            self._ring_kick = trio.Event()
            if not self._ring_busy or self._dead:
                continue
            try:
                done = await self._serve_waiting()
            except ProtocolError as exc:
                self._ring_violation(exc)
                return
            if done:
                self._ring_busy = False
            else:
                self._ring_kick.set()  # a request came in after the unmask: another round

    async def _serve_waiting(self) -> bool:
        """Answer the backlog and every request in the ring in order, waiting where needed;
        True once the port is unmasked with nothing left."""
        ring = self._ring
        taken = len(self._backlog)
        while True:
            while self._backlog:
                await self._answer_waiting(self._backlog.popleft())
            packets = ring.take_requests()
            if packets:
                taken += len(packets)
                self._backlog.extend(self._parse(raw) for raw in packets)
                # One ring's worth per pass: a guest refilling its ring as fast as it is
                # answered yields to the others between batches.
                await trio.lowlevel.checkpoint()
                continue
            if not ring.final_check():
                break
        if self._spurious_owed or (not taken and not self._spurious_now()):
            self._spurious_owed = False
            await self._wait_spurious_token()
        self._evtchn.unmask([self.req_port])
        return not ring.final_check()

    def _ring_violation(self, exc: ProtocolError) -> None:
        self._dead = True
        self._on_violation(f"connector {self.index}: {exc}")

    def _spurious_now(self) -> bool:
        """A wake-up found no request: spend a token; False if none is left."""
        self.stats.spurious_wakeups += 1
        return self._spurious.take()

    async def _wait_spurious_token(self) -> None:
        """Out of tokens for wake-ups with nothing to do: wait for one with the port masked."""
        self.stats.wakeups_throttled += 1
        suppressed = self._flood_log.allow()
        if suppressed is not None:
            self._log.warning(
                "guest notifies with no request: its request channel is throttled",
                connector=self.index,
                rate=self._spurious.rate,
                spurious=self.stats.spurious_wakeups,
                suppressed=suppressed,
            )
        while not self._spurious.take():
            await trio.sleep(self._spurious.seconds_until_token())

    async def _answer_waiting(self, item: Any) -> None:
        """Answer one request of the backlog, waiting for a request token first if need be."""
        while not self._limiter.take():
            # Over its request rate the guest is slowed down, not failed: its next request
            # waits for a token (its ring fills, never ours).
            self.stats.throttled += 1
            self._log_throttle()
            await trio.sleep(self._limiter.seconds_until_token())
        if isinstance(item, Response):
            self._respond(item.pack())
        elif type(item) in _ANSWERED_AT_ONCE:
            self._respond(self._answer_now(item))
        else:
            self._respond((await self._answer_later(item)).pack())

    def _respond(self, packet: bytes) -> None:
        """Publish the response ``packet``, notify if the ring rule asks, and start what the
        flip queue has next (a PG_FLIP is answered first, then its frame started, in this
        wake-up)."""
        self._ring.put_response(packet)
        if self._ring.push_responses():
            self._evtchn.notify(self.req_port)
        self._pump()

    def _log_throttle(self) -> None:
        suppressed = self._throttle_log.allow()
        if suppressed is not None:
            self._log.warning(
                "guest over its request rate: throttled",
                connector=self.index,
                rate=self._limiter.rate,
                throttled=self.stats.throttled,
                suppressed=suppressed,
            )

    def _parse(self, raw: bytes) -> Any:
        """The request in ``raw``, or the error response to a packet that is none."""
        self.stats.requests += 1
        try:
            return parse_request(raw)
        except ProtocolError as exc:
            header = RequestHeader.parse(raw)
            self.stats.errors += 1
            self._log.info("bad request", connector=self.index, error=str(exc))
            return Response.error(header, exc.errno or EINVAL)

    def _answer_now(self, req: Any) -> bytes:
        """The response packet to a request of ``_ANSWERED_AT_ONCE`` (PG_FLIP, FB_ATTACH)."""
        try:
            req.validate()
            if type(req) is PgFlipReq:
                self._queue_flip(req)
            else:
                self._buffers.attach(req)
        except Exception as exc:
            return self._failed(req, exc).pack()
        return Response.ok_packet(req)

    async def _answer_later(self, req: Any) -> Response:
        try:
            req.validate()
            edid_sz = await self._dispatch(req)
        except Exception as exc:
            return self._failed(req, exc)
        return Response.ok(req, edid_sz=edid_sz)

    def _failed(self, req: Any, exc: Exception) -> Response:
        """The error response to ``req``, which raised ``exc`` (call in the except clause)."""
        self.stats.errors += 1
        if isinstance(exc, RequestError):
            self._log.info(
                "request failed",
                connector=self.index,
                op=req.operation.name,
                errno=exc.errno,
                reason=exc.message,
            )
            return Response.error(req, exc.errno)
        if isinstance(exc, ProtocolError):
            self._log.info(
                "invalid request", connector=self.index, op=req.operation.name, error=str(exc)
            )
            return Response.error(req, exc.errno or EINVAL)
        # A bug of ours or a platform/display failure we did not foresee: this request fails
        # with -EIO; the guest, its other requests and the daemon carry on.
        self._log.exception("request failed unexpectedly", op=req.operation.name)
        return Response.error(req, EIO)

    async def _dispatch(self, req: Any) -> int:
        match req:
            case DbufCreateReq():
                await self._buffers.create(req)
            case DbufDestroyReq():
                await self._buffers.destroy(req)
            case FbAttachReq():
                self._buffers.attach(req)
            case FbDetachReq():
                await self._buffers.detach(req)
            case SetConfigReq():
                await self._set_config(req)
            case PgFlipReq():
                self._queue_flip(req)
            case GetEdidReq():
                return await self._buffers.write_edid(req, self._edid)
            case _:  # pragma: no cover - parse_request knows no other type
                raise RequestError(EOPNOTSUPP, f"unsupported request {req!r}")
        return 0

    async def _set_config(self, req: SetConfigReq) -> None:
        if self.output is None:
            raise RequestError(ENODEV, "no output for this connector")
        fb = None if req.is_disable else self._buffers.framebuffer(req.fb_cookie)
        command = _Config(fb)
        self._flips.accept_config(command)
        self._pump()
        await command.done.wait()
        if command.error is not None:
            raise command.error

    def _queue_flip(self, req: PgFlipReq) -> None:
        fb = self._buffers.framebuffer(req.fb_cookie)  # ENOENT for an unknown cookie
        # Started by _drain_ring's _pump once the answer is published.
        self._flips.accept_flip(req.fb_cookie, fb, coarse_monotonic())

    # --- scanout ----------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start what the flip queue has next, here if that needs no waiting, else hand it to
        the scanout task; called wherever the output may have become free."""
        try:
            while self._slow is None and (command := self._flips.next_command()) is not None:
                if isinstance(command, Frame) and self._start_frame(command):
                    continue
                self._slow = command
                self._scanout_kick.set()
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        if self._failure is None:
            self._failure = exc
        self._scanout_kick.set()

    def _start_frame(self, frame: Frame[Any]) -> bool:
        """Show ``frame`` without waiting: started (it completes in :meth:`_landed`) or already
        done (nothing to show; dropped). False: it needs the scanout task."""
        fb = frame.fb
        if not self._showable(fb):
            self._frame_done(frame)
            return True
        assert self.output is not None
        try:
            display_fb = fb.present_now(self.output)
            if display_fb is None:
                # A copy first, in a worker thread; the thread flips after it, or its
                # completion does (_copied).
                fb.present_later(
                    self.output,
                    functools.partial(self._copied, frame),
                    functools.partial(self._landed, frame),
                )
                return True
            return bool(self.output.start_flip(display_fb, functools.partial(self._landed, frame)))
        except Exception as exc:
            self._frame_dropped(exc)
        self._frame_done(frame)
        return True

    def _copied(self, frame: Frame[Any], result: outcome.Outcome[Framebuffer | None]) -> None:
        """The copy of a copy-mode frame was made, in its own wake-up (the copy thread's
        hand-back) or in the output's, before the flip the thread made lands (None): flip to
        it here, or hand it to the scanout task if the output must wait. Must not raise."""
        if self._stopped:
            return  # nobody to tell; the copy buffer stays with its framebuffer
        try:
            display_fb = result.unwrap()
            if display_fb is None:
                return  # the thread flipped: _landed follows
            assert self.output is not None
            if self.output.start_flip(display_fb, functools.partial(self._landed, frame)):
                return
            self._ready = display_fb
            self._slow = frame
            self._scanout_kick.set()
            return
        except Exception as exc:
            self._frame_dropped(exc)
        try:
            self._frame_done(frame)
        except Exception as exc:
            self._fail(exc)
            return
        self._pump()

    def _landed(self, frame: Frame[Any], result: FlipResult | None) -> None:
        """The output's callback, in its own wake-up: the frame is on screen (None: the display
        closed first); its events go out now and the next frame starts."""
        if self._stopped:
            return
        try:
            if result is None:
                self._log.warning("frame dropped", connector=self.index, reason="display closed")
            else:
                self.stats.frames_shown += 1
            self._frame_done(frame)
        except Exception as exc:
            self._fail(exc)
            return
        self._pump()

    async def _scanout(self) -> None:
        while True:
            await self._scanout_kick.wait()
            self._scanout_kick = trio.Event()
            if self._failure is not None:
                raise self._failure
            command = self._slow
            if command is None:
                continue
            if isinstance(command, ConfigCommand):
                await self._apply_config(command.config)
                self._flips.config_done(command)
            else:
                ready, self._ready = self._ready, None
                if not await self._show(command, ready):
                    self._frame_done(command)
            # else started: it completes in _landed
            self._slow = None
            self._pump()

    async def _apply_config(self, command: _Config) -> None:
        assert self.output is not None
        try:
            if command.fb is None:
                await self.output.disable()
                self.mode_fb = None
            else:
                await self.output.flip(await command.fb.present_on(self.output))
                self.mode_fb = (command.fb.width, command.fb.height)
                self.stats.frames_shown += 1
        except RequestError as exc:
            command.error = exc
        except DisplayError as exc:
            command.error = RequestError(EINVAL, f"output refused the configuration: {exc}")
        except Exception as exc:
            # As for any request: an unforeseen failure fails this SET_CONFIG (-EIO), not the
            # scanout task and with it the device.
            self._log.exception("configuration failed unexpectedly", connector=self.index)
            command.error = RequestError(EIO, f"unexpected failure: {exc!r}")
        finally:
            command.done.set()

    def _showable(self, fb: Any) -> bool:
        """Whether a frame of ``fb`` goes on screen; a flip always completes for the guest.

        Nothing is shown while the connector is disabled: Linux sends PG_FLIP for every plane
        update with a framebuffer before and after, also on a CRTC it switched off (SET_CONFIG
        disable, e.g. DPMS off); lighting the output then would override the guest's choice.
        """
        return self.output is not None and not fb.released and self.mode_fb is not None

    async def _show(self, frame: Frame[Any], display_fb: Framebuffer | None = None) -> bool:
        """Show ``frame`` the slow way (copy it first unless ``display_fb`` is its copy, or
        wait for the flip); True if it was started with a landing callback, False if it is
        done (shown or dropped)."""
        fb = frame.fb
        if not self._showable(fb):
            return False
        assert self.output is not None
        try:
            if display_fb is None:
                display_fb = await fb.present_on(self.output)
            if self.output.start_flip(display_fb, functools.partial(self._landed, frame)):
                return True
            await self.output.flip(display_fb)
            self.stats.frames_shown += 1
        except Exception as exc:
            self._frame_dropped(exc)
        return False

    def _frame_dropped(self, exc: Exception) -> None:
        # The guest was already told its flip was accepted; a frame the output cannot show
        # is dropped (logged), its event is still delivered.
        if isinstance(exc, DisplayError | RequestError):
            self._log.warning("frame dropped", connector=self.index, reason=str(exc))
        else:
            # Same for a failure nobody foresaw: the scanout (and the device) go on.
            self._log.exception("frame dropped after an unexpected failure", connector=self.index)

    # --- events -----------------------------------------------------------------------------

    @property
    def flips(self) -> FlipQueue[Any, _Config]:
        """This connector's flip queue (its state; the connector alone feeds it)."""
        return self._flips

    @property
    def queued_events(self) -> int:
        """Events waiting for room on the event page (at most ``MAX_QUEUED_EVENTS``)."""
        return self._flips.queued_events

    def _frame_done(self, frame: Frame[Any]) -> None:
        """``frame`` landed or was dropped: write its flips' events, notify the guest."""
        try:
            sent, dropped = self._flips.frame_done(frame, coarse_monotonic())
        except ProtocolError as exc:
            self._on_violation(f"connector {self.index} event page: {exc}")
            return
        if dropped:
            self._log_dropped()
        self._events_published(sent)

    def _publish(self) -> None:
        try:
            sent = self._flips.publish(coarse_monotonic())
        except ProtocolError as exc:
            self._on_violation(f"connector {self.index} event page: {exc}")
            return
        self._events_published(sent)

    def _events_published(self, sent: int) -> None:
        if sent:
            self._evtchn.notify(self.evt_port)
        if self._flips.queued_events:
            self._events_stuck.set()

    def _log_dropped(self) -> None:
        suppressed = self._drop_log.allow()
        if suppressed is not None:
            self._log.warning(
                "guest does not read its event page: flip events dropped",
                connector=self.index,
                queued=self._flips.queued_events,
                dropped=self.stats.events_dropped,
                suppressed=suppressed,
            )

    async def _retry_events(self) -> None:
        while True:
            await self._events_stuck.wait()
            while self._flips.queued_events:
                await trio.sleep(_EVENT_RETRY_S)
                self._publish()
            self._events_stuck = trio.Event()
