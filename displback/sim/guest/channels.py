"""The simulated guest's channels to the backend: rings, event pages, ports, requests.

Like Linux's ``xen_drm_front_evtchnl.c``: per connector a request ring and an event page,
each granted to the backend with an unbound port; the interrupt handlers take responses
(completing the one request waited for) and events (completing the pending flip), and
:meth:`Channels.request` sends one request and waits for its answer. May touch: the
guest's link and stats, :mod:`displback.protocol` (ring, event page, messages).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import functools
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import trio

from displback.protocol.constants import (
    Op,
)
from displback.protocol.errors import ProtocolError
from displback.protocol.evtpage import EventConsumer
from displback.protocol.messages import (
    Request,
)
from displback.protocol.ring import FrontRing
from displback.sim.memmap import PageMapping

if TYPE_CHECKING:
    from displback.sim.guest.frontend import SimGuest
from displback.sim.guest.objects import (
    GuestRequestError,
)
from displback.sim.guest.pipes import Pipe

log = logging.getLogger(__name__)


# Response header (reference §5): decoded without validation, as Linux reads it — a hostile
# backend's positive status or stray edid_sz is passed on, not rejected.
_RESPONSE: Final = struct.Struct("<HBxiI")


class PendingRequest:
    """One request waiting for its response (Linux's completion + resp_status)."""

    def __init__(self, req_id: int, op: int) -> None:
        self.req_id = req_id
        self.op = op
        self.done = trio.Event()
        self.status = 0
        self.edid_sz = 0


class _Page:
    """A shared page of a connector's channel: its frame, mapping, grant and port."""

    def __init__(self, index: int, pfn: int, mapping: PageMapping) -> None:
        self.index = index
        self.pfn = pfn
        self.mapping = mapping
        self.gref = 0
        self.port = 0


class ReqChannel(_Page):
    """A connector's request ring: page, grant, port, and the request serialisation."""

    def __init__(self, index: int, pfn: int, mapping: PageMapping, ring: FrontRing) -> None:
        super().__init__(index, pfn, mapping)
        self.ring = ring
        self.lock = trio.Lock()
        self.next_id = 0
        self.pending: PendingRequest | None = None


class EvtChannel(_Page):
    """A connector's event page: page, grant, port and the Linux-like consumer."""

    def __init__(self, index: int, pfn: int, mapping: PageMapping, consumer: EventConsumer):
        super().__init__(index, pfn, mapping)
        self.consumer = consumer


class Link:
    """One connection generation: the channels published for one handshake."""

    def __init__(self, generation: int, be_alloc: bool, resolutions: list[tuple[int, int]]):
        self.generation = generation
        self.be_alloc = be_alloc
        self.resolutions = resolutions
        self.req: list[ReqChannel] = []
        self.evt: list[EvtChannel] = []
        self.connected = False  # EVTCHNL_STATE_CONNECTED
        self.pipes: list[Pipe] | None = None  # the DRM device


class Channels:
    """The connectors' channels (``xen_drm_front_evtchnl``): a request ring and an event page per
    connector, their ports and interrupt handlers, and one request at a time per ring."""

    def __init__(self, guest: SimGuest) -> None:
        self._guest = guest
        self._port_handlers: dict[int, Callable[[], None]] = {}

    def unbind(self, link: Link) -> None:
        """Forget the handlers of ``link``'s ports and unbind them."""
        evtchn = self._guest._require_evtchn()
        for port in [ch.port for ch in link.req] + [ch.port for ch in link.evt]:
            self._port_handlers.pop(port, None)
            with contextlib.suppress(OSError):
                evtchn.unbind(port)

    def create(self, link: Link) -> None:
        dom, evtchn = self._guest._require_domain(), self._guest._require_evtchn()
        for index in range(len(link.resolutions)):
            [req_pfn, evt_pfn] = dom.alloc_pages(2)
            req_map = dom.map_pages([req_pfn])
            req = ReqChannel(index, req_pfn, req_map, FrontRing(req_map.buffer))
            link.req.append(req)
            evt_map = dom.map_pages([evt_pfn])
            evt = EvtChannel(index, evt_pfn, evt_map, EventConsumer(evt_map.buffer))
            link.evt.append(evt)
            req.gref, evt.gref = dom.grant_pages([req_pfn, evt_pfn], self._guest.backend_domid)
            req.port = evtchn.bind_unbound_port(self._guest.backend_domid)
            self._port_handlers[req.port] = functools.partial(self.on_responses, link, req)
            evt.port = evtchn.bind_unbound_port(self._guest.backend_domid)
            self._port_handlers[evt.port] = functools.partial(self.on_events, link, evt)
            self._guest.connector_stats(index).state = "offline"

    def ignore_port(self, port: int) -> None:
        """Take ``port``'s notifications without running its handler (a hostile guest)."""
        if port in self._port_handlers:
            self._port_handlers[port] = lambda: None

    def drop_memory(self, link: Link) -> list[tuple[int, int | None]]:
        """Release the ring and event-page views and mappings; (gref, pfn) to end/free."""
        pairs: list[tuple[int, int | None]] = []
        for req in link.req:
            req.ring.release()
            req.mapping.close()
            pairs.append((req.gref, req.pfn))
        for evt in link.evt:
            evt.consumer.release()
            evt.mapping.close()
            pairs.append((evt.gref, evt.pfn))
        link.req, link.evt = [], []
        return pairs

    async def irq_loop(self) -> None:
        evtchn = self._guest._require_evtchn()
        while True:
            await trio.lowlevel.wait_readable(evtchn.fileno())
            if self._guest._crashed:
                # crash() closed the device while this task was already woken (its cancel
                # only lands at the next checkpoint).
                return
            fired = evtchn.read_pending()
            for port in fired:
                handler = self._port_handlers.get(port)
                if handler is not None:
                    handler()
            evtchn.unmask(fired)

    def on_responses(self, link: Link, req: ReqChannel) -> None:
        """``evtchnl_interrupt_ctrl``: take responses, complete the one waited for."""
        if not link.connected:
            return
        stats = self._guest.connector_stats(req.index)
        while True:
            try:
                packets = req.ring.take_responses()
            except ProtocolError as exc:
                self._guest.stats.bad_rsp_prod += 1
                log.warning("guest %d: connector %d: %s", self._guest.domid, req.index, exc)
                return
            for raw in packets:
                rsp_id, operation, status, edid_sz = _RESPONSE.unpack_from(raw)
                pending = req.pending
                if pending is None or rsp_id != pending.req_id or operation != pending.op:
                    stats.responses_ignored += 1
                    continue
                pending.status = status
                pending.edid_sz = edid_sz
                pending.done.set()
            if not req.ring.final_check_for_responses():
                return

    def on_events(self, link: Link, evt: EvtChannel) -> None:
        """``evtchnl_interrupt_evt``: consume events with Linux's id rule; frame done."""
        if not link.connected:
            return
        stats = self._guest.connector_stats(evt.index)
        skipped = evt.consumer.skipped
        try:
            events = evt.consumer.take()
        except ProtocolError as exc:
            self._guest.stats.bad_in_prod += 1
            log.warning("guest %d: connector %d: %s", self._guest.domid, evt.index, exc)
            return
        stats.events_skipped += evt.consumer.skipped - skipped
        for _event in events:
            stats.events += 1
            pipe = link.pipes[evt.index] if link.pipes is not None else None
            if pipe is not None and pipe.flip is not None:
                pipe.flip.event.set()  # Linux completes whatever vblank event is pending
            else:
                stats.events_unexpected += 1

    async def request(
        self, ring_index: int, build: Callable[[int], Request | bytes]
    ) -> PendingRequest:
        """Send one request on ring ``ring_index`` and wait for its answer (Linux's do_io).

        ``build`` gets the request id; it returns a request, or 64 raw bytes whose operation
        byte is what the response must echo (see :meth:`raw_request`)."""
        link = self._guest._require_link()
        if not 0 <= ring_index < len(link.req):
            raise GuestRequestError(_errno.EINVAL, f"no connector {ring_index}")
        req = link.req[ring_index]
        stats = self._guest.connector_stats(ring_index)
        async with req.lock:
            if not link.connected:
                raise GuestRequestError(_errno.EIO, "device is not connected")
            req_id = req.next_id
            req.next_id = (req_id + 1) & 0xFFFF
            request = build(req_id)
            if isinstance(request, bytes):
                raw = request
                op_code = raw[2]
            else:
                raw = request.pack()
                op_code = int(request.OPERATION)
            op = Op(op_code) if op_code in Op._value2member_map_ else None
            op_name = op.name if op is not None else f"operation 0x{op_code:02x}"
            hook = self._guest.hostile.request_hooks.get(op) if op is not None else None
            if hook is not None:
                raw = hook(raw)
            if req.ring.outstanding >= 32:
                self._guest.stats.ring_full += 1
                raise GuestRequestError(_errno.EIO, "request ring full", op=op)
            pending = PendingRequest(req_id, op_code)
            req.pending = pending
            req.ring.put_request(raw)
            stats.requests_sent += 1
            if req.ring.push_requests():
                self._guest._require_evtchn().notify(req.port)
            try:
                with trio.move_on_after(self._guest.response_timeout):
                    await pending.done.wait()
            finally:
                if req.pending is pending:
                    req.pending = None
            if not pending.done.is_set():
                stats.response_timeouts += 1
                raise GuestRequestError(
                    _errno.ETIMEDOUT, f"{op_name}: no response in {self._guest.response_timeout} s",
                    op=op,
                )
            if pending.status != 0:
                errno = -pending.status if pending.status < 0 else _errno.EIO
                raise GuestRequestError(
                    errno, f"{op_name}: status {pending.status}", op=op
                )
            return pending

    def find(self, connector: int) -> tuple[ReqChannel, EvtChannel]:
        link = self._guest._link
        if link is None or not 0 <= connector < len(link.req):
            raise GuestRequestError(_errno.EIO, f"connector {connector} has no channels")
        return link.req[connector], link.evt[connector]
