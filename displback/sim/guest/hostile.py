"""The hostile guest's hooks: requests rewritten or forged, shared pages scribbled, floods.

Kept apart from the frontend that behaves like Linux, so what the simulated guest does on
its own is only what xen-drm-front does; tests/hostile reach these through
``guest.hostile``. May touch: the guest's channels and domain.
"""

from __future__ import annotations

import errno as _errno
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from displback.protocol.constants import (
    EVT_IN_CONS_OFS,
    EVT_IN_PROD_OFS,
    RING_REQ_EVENT_OFS,
    RING_REQ_PROD_OFS,
    RING_RSP_EVENT_OFS,
    RING_RSP_PROD_OFS,
    Op,
)
from displback.sim.platform import SimDomain

if TYPE_CHECKING:
    from displback.sim.guest.frontend import SimGuest
from displback.sim.guest.channels import EvtChannel, ReqChannel
from displback.sim.guest.objects import (
    GuestBuffer,
    GuestRequestError,
    RequestHook,
)

log = logging.getLogger(__name__)


_U32: Final = struct.Struct("<I")


_U16: Final = struct.Struct("<H")


_RING_FIELDS: Final = {
    "req_prod": RING_REQ_PROD_OFS,
    "req_event": RING_REQ_EVENT_OFS,
    "rsp_prod": RING_RSP_PROD_OFS,
    "rsp_event": RING_RSP_EVENT_OFS,
}


_EVT_FIELDS: Final = {"in_cons": EVT_IN_CONS_OFS, "in_prod": EVT_IN_PROD_OFS}


class HostileHooks:
    """What a hostile guest does that Linux never does: rewritten or raw requests, scribbled
    ring indexes, event pages and directories, notifications with nothing to do."""

    def __init__(self, guest: SimGuest) -> None:
        self._guest = guest
        self.request_hooks: dict[Op, RequestHook] = {}
        self.on_directory: Callable[[GuestBuffer], None] | None = None
        """Called with a buffer's directory written, before DBUF_CREATE is sent."""

    def channels(self, connector: int) -> tuple[ReqChannel, EvtChannel]:
        """The connector's request and event channels (pages, grants, ports), to tamper with."""
        return self._guest.channels.find(connector)

    @property
    def domain(self) -> SimDomain:
        """The guest's domain: its pages, grants and event channels."""
        return self._guest._require_domain()

    def set_request_hook(self, op: Op, hook: RequestHook | None) -> None:
        """Let ``hook`` rewrite every ``op`` request's 64 bytes before they enter the ring."""
        if hook is None:
            self.request_hooks.pop(op, None)
        else:
            self.request_hooks[op] = hook

    async def raw_request(self, ring_index: int, packet: bytes) -> int:
        """Send 64 raw bytes on ring ``ring_index`` (bytes 0-1 become the request id); return
        the response's ``edid_sz``. The response must echo the id and ``packet[2]`` (the
        operation, known or not); a non-zero status raises :class:`GuestRequestError`."""
        if len(packet) != 64:
            raise ValueError("a request is 64 bytes")
        answer = await self._guest.channels.request(
            ring_index, lambda req_id: _U16.pack(req_id) + packet[2:]
        )
        return answer.edid_sz

    def scribble_ring(self, connector: int, field_name: str, value: int) -> None:
        """Store ``value`` (u32) into ``req_prod``/``req_event``/``rsp_prod``/``rsp_event`` of
        the connector's request ring page, behind the ring object's back."""
        req, _evt = self._guest.channels.find(connector)
        _U32.pack_into(req.mapping.buffer, _RING_FIELDS[field_name], value & 0xFFFF_FFFF)

    def scribble_event_page(self, connector: int, field_name: str, value: int) -> None:
        """Store ``value`` (u32) into ``in_cons``/``in_prod`` of the connector's event page."""
        _req, evt = self._guest.channels.find(connector)
        _U32.pack_into(evt.mapping.buffer, _EVT_FIELDS[field_name], value & 0xFFFF_FFFF)

    def stop_reading_events(self, connector: int) -> None:
        """From now on the guest ignores the connector's event-page notifications: it never
        reads the page again, so ``in_cons`` moves only when the test writes it."""
        _req, evt = self._guest.channels.find(connector)
        self._guest.channels.ignore_port(evt.port)

    def write_ring_slot(self, connector: int, index: int, packet: bytes) -> None:
        """Write raw bytes into request-ring slot ``index & 31`` (no index is moved)."""
        req, _evt = self._guest.channels.find(connector)
        offset = 64 + 64 * (index & 31)
        req.mapping.buffer[offset : offset + len(packet)] = packet

    def scribble_directory(self, buf: GuestBuffer, page: int, offset: int, data: bytes) -> None:
        """Overwrite bytes of the buffer's directory page ``page`` at ``offset``."""
        if buf.freed or self._guest._domain is None:
            raise GuestRequestError(_errno.EINVAL, "buffer is gone")
        with self._guest._domain.map_pages([buf.dir_pfns[page]]) as directory:
            directory.buffer[offset : offset + len(data)] = data

    def notify(self, connector: int, channel: str = "req") -> None:
        """Kick the backend on the connector's ``"req"`` or ``"evt"`` channel (the latter is
        never signalled by Linux)."""
        req, evt = self._guest.channels.find(connector)
        self._guest._require_evtchn().notify(req.port if channel == "req" else evt.port)
