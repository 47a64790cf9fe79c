"""One guest connector: its request ring, its event page, and the output it is shown on.

A :class:`Connector` serves the requests of one ring and turns accepted flips into frames on
its :class:`~displback.display.interface.Output` and EVT_PG_FLIP events on its event page.

Theory of operation
-------------------
Two tasks per connector, in the connection's nursery:

* **ring** — woken by the device when the request channel fires: take every request (copied
  out once by :class:`~displback.protocol.ring.BackRing`), answer each in order, publish,
  notify when the ring rule says so, run the final check, and only then unmask the port. The
  Linux guest has one request in flight per ring and waits 3000 ms for it, so a request is
  answered as soon as its outcome is known: PG_FLIP is answered when *queued*, SET_CONFIG when
  the output has taken the new configuration (one vblank), buffer requests when done.
  A wake-up that finds no request costs the guest a token (``SPURIOUS_WAKEUPS_PER_SECOND``);
  without one the port stays masked until one is due, so notification floods are bounded.
* **scanout** — the only task that touches the output, so flips and (dis)ables are serialised
  as KMS wants. Queued flips are coalesced: when several wait, only the newest is shown, but
  every accepted PG_FLIP still gets exactly one event when the frame that replaced it lands —
  the guest numbers its events and waits 3.1 s for each.

Events that do not fit the event page (the guest has not consumed 63 of them) stay queued and
are retried every few milliseconds: the guest never tells us when it consumed.

Bad requests cost the guest that request (an error status). Broken rings or event pages — a
:class:`~displback.protocol.errors.ProtocolError` without errno — are protocol violations that
close the whole device; that decision belongs to the device, which we tell through
``on_violation``.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import trio

from displback.backend.errors import RequestError
from displback.backend.quotas import TokenBucket
from displback.backend.throttle import LogThrottle
from displback.display.interface import DisplayError, Output
from displback.protocol.constants import EINVAL, EIO, ENODEV, EOPNOTSUPP
from displback.protocol.edid import build_edid
from displback.protocol.errors import ProtocolError
from displback.protocol.evtpage import EventProducer
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

__all__ = ["Connector", "ConnectorStats", "Buffers"]

_EVENT_RETRY_S = 0.005
#: Events waiting for room on the event page beyond which new ones are dropped. A Linux guest
#: consumes every event in its interrupt handler and has at most one flip outstanding per
#: connector; only a guest that stopped reading its event page gets here, and without a bound
#: its flips (up to the request rate, forever) would grow the daemon's memory without limit.
MAX_QUEUED_EVENTS = 256
#: Wake-ups of the ring task that find no new request (the guest notified with nothing in the
#: ring) allowed per second and in a burst, per connector. Linux notifies only after pushing
#: a request, so a spurious wake-up is the rare notification that raced our final check (at
#: most one per request; one request is in flight per ring). Past the budget the request port
#: stays masked until a token is due: a guest notifying in a tight loop costs Dom0 at most
#: this many wake-ups, and its requests wait at most one token interval.
SPURIOUS_WAKEUPS_PER_SECOND = 100.0
SPURIOUS_WAKEUP_BURST = 32
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
class ConnectorStats:
    """Counters of one connector since it connected."""

    requests: int = 0
    errors: int = 0
    flips_accepted: int = 0
    frames_shown: int = 0
    flips_coalesced: int = 0
    events_sent: int = 0
    events_delayed: int = 0
    events_dropped: int = 0
    throttled: int = 0
    wakeups: int = 0
    spurious_wakeups: int = 0
    wakeups_throttled: int = 0
    #: Flip events delivered later than the guest waits for them (it timed out; see
    #: ``FRAME_DONE_TIMEOUT_S``). With ``events_dropped`` these are its frame-done timeouts.
    events_late: int = 0


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
        self._scanout_kick = trio.Event()
        # Flips are (cookie, framebuffer, trio time accepted); events (cookie, time accepted).
        self._commands: collections.deque[_Config | tuple[int, Any, float]] = collections.deque()
        self._pending_events: collections.deque[tuple[int, float]] = collections.deque()
        self._events_stuck = trio.Event()
        # Width, height of what SET_CONFIG last showed; None while the connector is disabled.
        self.mode_fb: tuple[int, int] | None = None

    # --- wiring ---------------------------------------------------------------------------

    def kick(self) -> None:
        """The request channel fired (called by the device's event-channel reader)."""
        self._ring_kick.set()

    async def run(self) -> None:
        """Serve until cancelled; a violation is reported through ``on_violation``."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_ring)
            nursery.start_soon(self._scanout)
            nursery.start_soon(self._retry_events)

    # --- ring -------------------------------------------------------------------------------

    async def _serve_ring(self) -> None:
        while True:
            await self._ring_kick.wait()
            self._ring_kick = trio.Event()
            self.stats.wakeups += 1
            try:
                taken = await self._drain_ring()
            except ProtocolError as exc:
                self._on_violation(f"connector {self.index}: {exc}")
                return
            if not taken:
                await self._spurious_wakeup()
            # Unmask only after draining: bounds guest-driven wake-ups (reference §3.3). The
            # unmask is a syscall; re-check the ring once more after it in case a request
            # arrived between the final check and the unmask.
            self._evtchn.unmask([self.req_port])
            try:
                if self._ring.final_check():
                    self._ring_kick.set()
            except ProtocolError as exc:
                self._on_violation(f"connector {self.index}: {exc}")
                return

    async def _spurious_wakeup(self) -> None:
        """A wake-up with nothing to do: spend a token, or wait for one with the port masked."""
        self.stats.spurious_wakeups += 1
        if self._spurious.take():
            return
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

    async def _drain_ring(self) -> int:
        """Answer every request in the ring; return how many there were."""
        taken = 0
        while True:
            for raw in self._ring.take_requests():
                taken += 1
                while not self._limiter.take():
                    # Over its request rate the guest is slowed down, not failed: its next
                    # request waits for a token (its ring fills, never ours).
                    self.stats.throttled += 1
                    self._log_throttle()
                    await trio.sleep(self._limiter.seconds_until_token())
                response = await self._answer(raw)
                self._ring.put_response(response.pack())
                if self._ring.push_responses():
                    self._evtchn.notify(self.req_port)
            if not self._ring.final_check():
                return taken

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

    async def _answer(self, raw: bytes) -> Response:
        self.stats.requests += 1
        try:
            req = parse_request(raw)
        except ProtocolError as exc:
            header = RequestHeader.parse(raw)
            self.stats.errors += 1
            self._log.info("bad request", connector=self.index, error=str(exc))
            return Response.error(header, exc.errno or EINVAL)
        try:
            req.validate()
            edid_sz = await self._dispatch(req)
        except RequestError as exc:
            self.stats.errors += 1
            self._log.info(
                "request failed",
                connector=self.index,
                op=req.operation.name,
                errno=exc.errno,
                reason=exc.message,
            )
            return Response.error(req, exc.errno)
        except ProtocolError as exc:
            self.stats.errors += 1
            self._log.info(
                "invalid request", connector=self.index, op=req.operation.name, error=str(exc)
            )
            return Response.error(req, exc.errno or EINVAL)
        except Exception:
            # A bug of ours or a platform/display failure we did not foresee: this request
            # fails with -EIO; the guest, its other requests and the daemon carry on.
            self.stats.errors += 1
            self._log.exception("request failed unexpectedly", op=req.operation.name)
            return Response.error(req, EIO)
        return Response.ok(req, edid_sz=edid_sz)

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
        self._commands.append(command)
        self._scanout_kick.set()
        await command.done.wait()
        if command.error is not None:
            raise command.error

    def _queue_flip(self, req: PgFlipReq) -> None:
        fb = self._buffers.framebuffer(req.fb_cookie)  # ENOENT for an unknown cookie
        self.stats.flips_accepted += 1
        self._commands.append((req.fb_cookie, fb, trio.current_time()))
        self._scanout_kick.set()

    # --- scanout ----------------------------------------------------------------------------

    async def _scanout(self) -> None:
        while True:
            if not self._commands:
                await self._scanout_kick.wait()
                self._scanout_kick = trio.Event()
                continue
            head = self._commands.popleft()
            if isinstance(head, _Config):
                await self._apply_config(head)
                continue
            flips = [(head[0], head[2])]
            newest = head[1]
            # Coalesce: every flip queued behind this one (up to the next SET_CONFIG) is
            # shown instead; each still gets its event when the newest lands.
            while self._commands and not isinstance(self._commands[0], _Config):
                cookie, newest, accepted = self._commands.popleft()  # type: ignore[misc]
                flips.append((cookie, accepted))
                self.stats.flips_coalesced += 1
            await self._show(newest)
            for flip in flips:
                if len(self._pending_events) < MAX_QUEUED_EVENTS:
                    self._pending_events.append(flip)
                else:
                    self._drop_event()
            self._send_events()

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

    async def _show(self, fb: Any) -> None:
        """Put ``fb`` on screen if it still exists; a flip always completes for the guest.

        Nothing is shown while the connector is disabled: Linux sends PG_FLIP for every plane
        update with a framebuffer before and after, also on a CRTC it switched off (SET_CONFIG
        disable, e.g. DPMS off); lighting the output then would override the guest's choice.
        """
        if self.output is None or fb.released or self.mode_fb is None:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self.output.flip(await fb.present_on(self.output))
            self.stats.frames_shown += 1
        except (DisplayError, RequestError) as exc:
            # The guest was already told its flip was accepted; a frame the output cannot
            # show is dropped (logged), its event is still delivered.
            self._log.warning("frame dropped", connector=self.index, reason=str(exc))
        except Exception:
            # Same for a failure nobody foresaw: the scanout task (and the device) go on.
            self._log.exception("frame dropped after an unexpected failure", connector=self.index)

    # --- events -----------------------------------------------------------------------------

    @property
    def queued_events(self) -> int:
        """Events waiting for room on the event page (at most ``MAX_QUEUED_EVENTS``)."""
        return len(self._pending_events)

    def _drop_event(self) -> None:
        self.stats.events_dropped += 1
        suppressed = self._drop_log.allow()
        if suppressed is not None:
            self._log.warning(
                "guest does not read its event page: flip events dropped",
                connector=self.index,
                queued=len(self._pending_events),
                dropped=self.stats.events_dropped,
                suppressed=suppressed,
            )

    def _send_events(self) -> None:
        sent = 0
        now = trio.current_time()
        try:
            while self._pending_events:
                cookie, accepted = self._pending_events[0]
                if not self._events.put_pg_flip(cookie):
                    self.stats.events_delayed += 1
                    self._events_stuck.set()
                    break
                self._pending_events.popleft()
                sent += 1
                if now - accepted > FRAME_DONE_TIMEOUT_S:
                    self.stats.events_late += 1
        except ProtocolError as exc:
            self._on_violation(f"connector {self.index} event page: {exc}")
            self._pending_events.clear()
        if sent:
            self.stats.events_sent += sent
            self._evtchn.notify(self.evt_port)

    async def _retry_events(self) -> None:
        while True:
            await self._events_stuck.wait()
            while self._pending_events:
                await trio.sleep(_EVENT_RETRY_S)
                self._send_events()
            self._events_stuck = trio.Event()
