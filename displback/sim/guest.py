"""The simulated guest: one domain's vdispl frontend that behaves like Linux's xen-drm-front.

The backend is tested, demonstrated and benchmarked against this guest instead of a real VM.
It speaks displif over real shared memory of the simulated hypervisor (pages, grants, event
channels from :class:`~displback.sim.platform.SimDomain`) and XenStore through the guest's own
xenstored socket (so the permissions of a real domain F apply), and it reacts the way the
Linux driver (drivers/gpu/drm/xen/, read for behaviour, not copied) reacts:

Handshake (reference §2)
    ``open`` writes ``state`` = 1 (probe). Each change of the backend's ``state`` node is
    handled in order by one watcher task, with the rules of ``displback_changed``:

    ======================  ===================================================================
    backend becomes         guest does
    ======================  ===================================================================
    1 Initialising          unless 7: disconnect (only if connected, see below)
    2 InitWait              unless 7: disconnect; then, if 1: read ``be-alloc`` and up to four
                            ``i/resolution`` (stop at the first missing/unparsable), allocate
                            per connector a ring page + event page (granted to the backend)
                            and two unbound ports, publish all in ONE transaction, go 3
    4 Connected             if 3: channels connected, "DRM device" created, go 4
    6 Closed, 0 Unknown     unless 6: disconnect
    3, 5, 7, 8              ignored
    ======================  ===================================================================

    *Disconnect* (only when a DRM device exists, i.e. after Connected — exactly like Linux,
    which therefore ignores a backend that closes while the guest is still Initialised): go 7,
    release pending flips, fail in-flight requests with ``EIO``, unbind the ports, end grant
    access to ring, event and buffer pages, then go 1 (in be-alloc mode after
    ``be_alloc_release_delay``, standing for the last DRM user closing its file).

Grant access that cannot end because the backend still maps the page (the simulated Xen
refuses with ``EBUSY``) is retried every ``end_access_retry`` seconds, like Linux's deferred
end-access; :attr:`GuestStats.end_access_deferred` and ``end_access_retries`` count it.

Requests (reference §4)
    One request in flight per ring (a lock), a u16 id counter per ring from 0 per connection,
    ``response_timeout`` (3 s) per request: on timeout the call fails with ``ETIMEDOUT`` and the
    next request goes out anyway; a response is accepted only if its ``id`` and ``operation``
    match the request waited for (a late answer to a timed-out request is ignored). Buffer and
    framebuffer requests use connector 0's ring; SET_CONFIG, PG_FLIP and GET_EDID the
    connector's own. Notifications follow the ring's hold-off rule.

One divergence: Linux never checks for a full request ring; this guest refuses to overwrite
unanswered slots (32 timed-out requests) and fails the request with ``EIO`` (counted in
:attr:`GuestStats.ring_full`). Use :meth:`SimGuest.scribble_ring` to forge producer overflow.

Leaving ``async with SimGuest.open(...)`` unloads the driver like ``xen_drv_remove``: state 5,
poll up to ``remove_timeout`` (1 s) for backend InitWait, free everything, state 6.
:meth:`SimGuest.crash` instead abandons every resource without a word, like ``xl destroy``.
"""

from __future__ import annotations

import contextlib
import enum
import errno as _errno
import functools
import logging
import math
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Required, TypedDict, Unpack

import trio

from displback.protocol.constants import (
    DBUF_FLG_REQ_ALLOC,
    EDID_MAX_SIZE,
    EVT_IN_CONS_OFS,
    EVT_IN_PROD_OFS,
    LINUX_FRAME_DONE_TIMEOUT_MS,
    LINUX_MAX_CONNECTORS,
    LINUX_RESPONSE_TIMEOUT_MS,
    PAGE_SIZE,
    RING_REQ_EVENT_OFS,
    RING_REQ_PROD_OFS,
    RING_RSP_EVENT_OFS,
    RING_RSP_PROD_OFS,
    Op,
    PixelFormat,
    pages_for,
    pitch_for,
)
from displback.protocol.errors import ProtocolError
from displback.protocol.evtpage import EventConsumer
from displback.protocol.layout import (
    BACKEND,
    BACKEND_ID,
    BE_ALLOC,
    EVT_EVENT_CHANNEL,
    EVT_RING_REF,
    REQ_EVENT_CHANNEL,
    REQ_RING_REF,
    RESOLUTION,
    STATE,
    connector_dir,
    frontend_dir,
    parse_bool,
    parse_domid,
)
from displback.protocol.messages import (
    DbufCreateReq,
    DbufDestroyReq,
    FbAttachReq,
    FbDetachReq,
    GetEdidReq,
    PgFlipReq,
    Request,
    SetConfigReq,
)
from displback.protocol.pagedir import DirectoryReader, build_directory, dir_pages_for
from displback.protocol.ring import FrontRing
from displback.protocol.xenbus import XenbusState, parse_state
from displback.sim.guest_pattern import draw_pattern
from displback.sim.memmap import PageMapping
from displback.sim.platform import SimDomain, SimEventChannels, SimGrantDevice, SimGrantMapping
from displback.xenstore.client import Transaction, XenStoreClient, open_xenstore
from displback.xenstore.wire import XenStoreError

__all__ = [
    "GuestConnectorStats",
    "DEFAULT_FRAME_DONE_TIMEOUT",
    "DEFAULT_RESPONSE_TIMEOUT",
    "GuestBuffer",
    "FlipOutcome",
    "GuestFb",
    "GuestRequestError",
    "GuestStats",
    "RequestHook",
    "SimGuest",
    "SimGuestOptions",
]

log = logging.getLogger(__name__)

DEFAULT_RESPONSE_TIMEOUT: Final = LINUX_RESPONSE_TIMEOUT_MS / 1000
DEFAULT_FRAME_DONE_TIMEOUT: Final = LINUX_FRAME_DONE_TIMEOUT_MS / 1000
DEFAULT_END_ACCESS_RETRY: Final = 1.0  # Linux retries deferred grant ends once a second
DEFAULT_REMOVE_TIMEOUT: Final = 1.0  # xen_drv_remove polls 100 x 10 ms for backend InitWait
_REMOVE_POLL: Final = 0.01
#: xenbus_frontend_dev_shutdown's wait for the backend's Closing (5*HZ).
DEFAULT_SHUTDOWN_TIMEOUT: Final = 5.0

# Linux uses kernel pointers as cookies; ours look alike and are unique per guest.
_COOKIE_BASE: Final = 0xFFFF_8880_0000_0000
_COOKIE_STEP: Final = 0x100

# Response header (reference §5): decoded without validation, as Linux reads it — a hostile
# backend's positive status or stray edid_sz is passed on, not rejected.
_RESPONSE: Final = struct.Struct("<HBxiI")
_U32: Final = struct.Struct("<I")
_U16: Final = struct.Struct("<H")

_RING_FIELDS: Final = {
    "req_prod": RING_REQ_PROD_OFS,
    "req_event": RING_REQ_EVENT_OFS,
    "rsp_prod": RING_RSP_PROD_OFS,
    "rsp_event": RING_RSP_EVENT_OFS,
}
_EVT_FIELDS: Final = {"in_cons": EVT_IN_CONS_OFS, "in_prod": EVT_IN_PROD_OFS}

RequestHook = Callable[[bytes], bytes]
"""Rewrites the 64 bytes of a request just before they are copied into the ring."""



def _linux_resolution(value: bytes | None) -> tuple[int, int] | None:
    """``i/resolution`` as xen-drm-front reads it (``sscanf("%d" "x" "%d")``, any size: its
    own mode limits prune what it cannot show); None ends the connector list."""
    match = re.match(rb"\s*([+-]?\d+)x\s*([+-]?\d+)", value or b"")
    if match is None:
        return None
    return int(match[1]), int(match[2])


class GuestRequestError(OSError):
    """A request failed: ``errno`` is the backend's (negated status), ``ETIMEDOUT`` (no answer
    within the response timeout) or ``EIO`` (not connected, torn down meanwhile, ring full)."""

    def __init__(self, errno: int, message: str, *, op: Op | None = None) -> None:
        super().__init__(errno, message)
        self.op = op


class FlipOutcome(enum.Enum):
    """How a page flip ended after its OK response."""

    DONE = "done"  # EVT_PG_FLIP arrived in time
    FRAME_DONE_TIMEOUT = "frame_done_timeout"  # "Frame done timed-out, releasing"
    RELEASED = "released"  # the device was torn down meanwhile


@dataclass
class GuestConnectorStats:
    """Per-connector counters (requests on connector 0's ring count for connector 0)."""

    state: str = "offline"  # offline | connected | enabled | error
    frames_drawn: int = 0
    flips_ok: int = 0
    flip_errors: int = 0
    frame_done_timeouts: int = 0
    response_timeouts: int = 0
    requests_sent: int = 0
    responses_ignored: int = 0
    events: int = 0
    events_skipped: int = 0
    events_unexpected: int = 0
    set_config_errors: int = 0


@dataclass
class GuestStats:
    """Whole-device counters."""

    handshakes: int = 0
    disconnects: int = 0
    fatal_errors: int = 0
    end_access_deferred: int = 0
    end_access_retries: int = 0
    ring_full: int = 0
    bad_rsp_prod: int = 0
    bad_in_prod: int = 0
    connectors: dict[int, GuestConnectorStats] = field(default_factory=dict)


class GuestBuffer:
    """A display buffer (dumb or imported) shared with the backend; ``buffer`` is its memory."""

    def __init__(
        self,
        cookie: int,
        *,
        width: int,
        height: int,
        bpp: int,
        size: int,
        data_ofs: int,
        be_alloc: bool,
        generation: int,
    ) -> None:
        self.cookie = cookie
        self.width = width
        self.height = height
        self.bpp = bpp
        self.pitch = pitch_for(width, bpp)
        self.size = size
        self.data_ofs = data_ofs
        self.be_alloc = be_alloc
        self.npages = pages_for(size)
        self.generation = generation
        self.freed = False
        self.pfns: list[int] = []
        self.grefs: list[int] = []
        self.dir_pfns: list[int] = []
        self.dir_grefs: list[int] = []
        self.backend_refs: list[int] = []
        self._own: PageMapping | None = None
        self._backend: SimGrantMapping | None = None

    @property
    def buffer(self) -> memoryview:
        """The pixels (``npages * 4096`` bytes): own pages, or the backend's in be-alloc mode.

        Do not keep views of it past the buffer's life: unmapping refuses while they exist.
        """
        if self._backend is not None:
            return self._backend.buffer
        if self._own is not None:
            return self._own.buffer
        raise GuestRequestError(_errno.EIO, f"buffer {self.cookie:#x} has no memory mapped")

    def __repr__(self) -> str:
        return (
            f"GuestBuffer(cookie={self.cookie:#x}, {self.width}x{self.height}x{self.bpp}, "
            f"size={self.size}, be_alloc={self.be_alloc}, freed={self.freed})"
        )


@dataclass(eq=False)
class GuestFb:
    """A framebuffer attached to a buffer (``ADDFB2``)."""

    cookie: int
    buffer: GuestBuffer
    width: int
    height: int
    fourcc: int

    @property
    def bpp(self) -> int:
        """Bits per pixel sent with SET_CONFIG: the format's, else the buffer's."""
        try:
            return PixelFormat(self.fourcc).bpp
        except ValueError:
            return self.buffer.bpp


class _PendingRequest:
    """One request waiting for its response (Linux's completion + resp_status)."""

    def __init__(self, req_id: int, op: int) -> None:
        self.req_id = req_id
        self.op = op
        self.done = trio.Event()
        self.status = 0
        self.edid_sz = 0


class _ReqChannel:
    """A connector's request ring: page, grant, port, and the request serialisation."""

    def __init__(self, index: int, pfn: int, mapping: PageMapping, ring: FrontRing) -> None:
        self.index = index
        self.pfn = pfn
        self.mapping = mapping
        self.ring = ring
        self.gref = 0
        self.port = 0
        self.lock = trio.Lock()
        self.next_id = 0
        self.pending: _PendingRequest | None = None


class _EvtChannel:
    """A connector's event page: page, grant, port and the Linux-like consumer."""

    def __init__(self, index: int, pfn: int, mapping: PageMapping, consumer: EventConsumer):
        self.index = index
        self.pfn = pfn
        self.mapping = mapping
        self.consumer = consumer
        self.gref = 0
        self.port = 0


class _AwaitedFlip:
    def __init__(self) -> None:
        self.event = trio.Event()
        self.released = False


class _Pipe:
    """A connector's display pipeline in the "DRM device" (exists while connected)."""

    def __init__(self, index: int, width: int, height: int) -> None:
        self.index = index
        self.width = width
        self.height = height
        self.conn_connected = True
        self.enabled = False
        self.flip: _AwaitedFlip | None = None


class _Link:
    """One connection generation: the channels published for one handshake."""

    def __init__(self, generation: int, be_alloc: bool, resolutions: list[tuple[int, int]]):
        self.generation = generation
        self.be_alloc = be_alloc
        self.resolutions = resolutions
        self.req: list[_ReqChannel] = []
        self.evt: list[_EvtChannel] = []
        self.connected = False  # EVTCHNL_STATE_CONNECTED
        self.pipes: list[_Pipe] | None = None  # the DRM device


class SimGuestOptions(TypedDict, total=False):
    """The keyword arguments of :class:`SimGuest` (defaults there), passed on by ``open``."""

    hypervisor_path: Required[str]
    xenstore_path: Required[str]
    domid: Required[int]
    devid: int
    response_timeout: float
    frame_done_timeout: float
    end_access_retry: float
    remove_timeout: float
    be_alloc_release_delay: float


class SimGuest:
    """The frontend of vdispl device ``devid`` of guest ``domid``; use :meth:`open`."""

    def __init__(
        self,
        *,
        hypervisor_path: str,
        xenstore_path: str,
        domid: int,
        devid: int = 0,
        response_timeout: float = DEFAULT_RESPONSE_TIMEOUT,
        frame_done_timeout: float = DEFAULT_FRAME_DONE_TIMEOUT,
        end_access_retry: float = DEFAULT_END_ACCESS_RETRY,
        remove_timeout: float = DEFAULT_REMOVE_TIMEOUT,
        be_alloc_release_delay: float = 0.0,
    ) -> None:
        self.hypervisor_path = hypervisor_path
        self.xenstore_path = xenstore_path
        self.domid = domid
        self.devid = devid
        self.response_timeout = response_timeout
        self.frame_done_timeout = frame_done_timeout
        self.end_access_retry = end_access_retry
        self.remove_timeout = remove_timeout
        self.be_alloc_release_delay = be_alloc_release_delay
        self.stats = GuestStats()
        self.request_hooks: dict[Op, RequestHook] = {}
        self.on_published: Callable[[SimGuest], Awaitable[None] | None] | None = None
        self.on_directory: Callable[[GuestBuffer], None] | None = None
        self.frontend_path = frontend_dir(domid, devid)
        self.backend_path = ""
        self.backend_domid = 0
        self._state = XenbusState.UNKNOWN
        self._backend_state = XenbusState.UNKNOWN
        self._state_changed = trio.Event()
        self._link: _Link | None = None
        self._generation = 0
        self._buffers: dict[int, GuestBuffer] = {}
        self._next_cookie = _COOKIE_BASE
        self._deferred: list[tuple[int, int | None]] = []  # (gref, pfn to free after)
        self._port_handlers: dict[int, Callable[[], None]] = {}
        self._crashed = False
        self._xs: XenStoreClient | None = None
        self._nursery: trio.Nursery | None = None
        self._background_scope = trio.CancelScope()
        self._watch_scope = trio.CancelScope()
        self._domain: SimDomain | None = None
        self._evtchn: SimEventChannels | None = None
        self._gntdev: SimGrantDevice | None = None

    # ------------------------------------------------------------------ lifetime

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, **options: Unpack[SimGuestOptions]) -> AsyncIterator[SimGuest]:
        """Probe the device (state 1) and run the frontend until the block ends (unload)."""
        guest = cls(**options)
        async with guest._run() as running:
            yield running

    @contextlib.asynccontextmanager
    async def _run(self) -> AsyncIterator[SimGuest]:
        domain = SimDomain(self.hypervisor_path, self.domid)
        self._domain = domain
        body_error: BaseException | None = None
        try:
            self._evtchn = domain.open_event_channels()
            async with open_xenstore(self.xenstore_path) as xs, trio.open_nursery() as nursery:
                self._xs = xs
                await self._probe()
                await nursery.start(self._background)
                try:
                    yield self
                except BaseException as exc:
                    # Re-raised below, outside the nursery, so the caller gets its own
                    # exception rather than an ExceptionGroup around it.
                    body_error = exc
                finally:
                    if not self._crashed:
                        with trio.CancelScope(shield=True):
                            with trio.move_on_after(self.remove_timeout + 5):
                                await self._remove()
                    nursery.cancel_scope.cancel()
        finally:
            self._release_devices()
        if body_error is not None:
            raise body_error

    async def _background(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The guest's own tasks, in a scope :meth:`crash` can cancel without touching the
        caller: interrupts, deferred grant ends, the backend-state watcher, drawing."""
        with self._background_scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._irq_loop)
                nursery.start_soon(self._deferred_loop)
                nursery.start_soon(self._watch_backend)
                task_status.started()

    def _release_devices(self) -> None:
        if self._crashed:
            return
        link, self._link = self._link, None
        if link is not None:  # only if unload could not run (cancelled): drop what is left
            self._drop_link_memory(link)
        for buf in list(self._buffers.values()):
            self._close_buffer_mappings(buf)
        self._buffers.clear()
        if self._gntdev is not None:
            self._gntdev.close()
        if self._evtchn is not None:
            self._evtchn.close()
        if self._domain is not None:
            self._domain.close()  # ends deferred grants lazily, frees pages

    async def shutdown(self, *, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> bool:
        """The guest powers off (``xl shutdown``): ``xenbus_frontend_dev_shutdown``.

        A Connected frontend writes Closing and waits up to ``timeout`` for the backend's
        Closing — read when the backend-state watch fires, as ``xenbus_otherend_changed``
        does once the system is shutting down (every other backend state is ignored then) —
        and answers it with Closed. Then the kernel halts: nothing is released (the domain's
        destruction reclaims it), as after :meth:`crash`. Returns ``False`` if the wait timed
        out ("timeout closing device", which delays the guest's poweroff by ``timeout``).
        """
        self._watch_scope.cancel()  # the driver is no longer told of backend changes
        closed = True
        if self._state is XenbusState.CONNECTED:
            path = f"{self.backend_path}/{STATE}"
            closed = False
            with contextlib.suppress(XenStoreError), trio.move_on_after(timeout):
                async with self.xenstore.watch(path) as events:
                    await self._switch_state(XenbusState.CLOSING)
                    async for _changed in events:
                        raw = await self.xenstore.read_or_none(path)
                        if parse_state(raw) is XenbusState.CLOSING:
                            await self._switch_state(XenbusState.CLOSED)
                            closed = True
                            break
            if not closed:
                log.info("guest %d: %s timeout closing device", self.domid, self.frontend_path)
        self.crash()
        return closed

    def crash(self) -> None:
        """Vanish like a crashed or destroyed domain: nothing is released or written; the
        hypervisor reclaims the pages, grants and ports when the connections drop."""
        if self._crashed:
            return
        self._crashed = True
        link, self._link = self._link, None
        if link is not None:
            link.connected = False
            self._drop_link_memory(link)
        for buf in self._buffers.values():
            buf.freed = True
            self._close_buffer_mappings(buf)
        self._buffers.clear()
        if self._gntdev is not None:
            self._gntdev.abandon()
        if self._evtchn is not None:
            self._evtchn.abandon()
        if self._domain is not None:
            self._domain.abandon()
        self._background_scope.cancel()
        self._changed()

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> XenbusState:
        """The guest's own XenbusState, as last written."""
        return self._state

    @property
    def backend_state(self) -> XenbusState:
        """The backend's state as last seen by the watcher."""
        return self._backend_state

    @property
    def connected(self) -> bool:
        """Whether the DRM device exists (backend and guest both Connected)."""
        return self._link is not None and self._link.pipes is not None

    @property
    def be_alloc(self) -> bool:
        """``be-alloc`` as read at the last InitWait."""
        return self._link is not None and self._link.be_alloc

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        """The connectors' resolutions read at the last InitWait."""
        return list(self._link.resolutions) if self._link is not None else []

    @property
    def pending_end_access(self) -> int:
        """Grants whose end of access is still being retried."""
        return len(self._deferred)

    @property
    def xenstore(self) -> XenStoreClient:
        """The guest's XenStore connection (acts as domain ``domid``)."""
        if self._xs is None:
            raise RuntimeError("guest is not running")
        return self._xs

    def connector_stats(self, index: int) -> GuestConnectorStats:
        """Counters of connector ``index`` (created on first use)."""
        return self.stats.connectors.setdefault(index, GuestConnectorStats())

    async def wait_state(
        self, predicate: Callable[[SimGuest], bool], *, timeout: float = 10.0
    ) -> None:
        """Wait until ``predicate(self)`` holds (checked after every state change)."""
        with trio.fail_after(timeout):
            while not predicate(self):
                await self._state_changed.wait()

    async def wait_connected(self, *, timeout: float = 10.0) -> None:
        """Wait until the guest is Connected with a DRM device."""
        await self.wait_state(lambda g: g.connected and g.state is XenbusState.CONNECTED,
                              timeout=timeout)

    def _changed(self) -> None:
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def _switch_state(self, state: XenbusState) -> None:
        """``xenbus_switch_state``: write our ``state`` node unless it already says so."""
        if state == self._state:
            return
        try:
            await self.xenstore.write(f"{self.frontend_path}/{STATE}", state.encode())
        except XenStoreError as exc:
            # Like Linux: the failure is reported and the caller goes on (its teardown still
            # runs); our state stays what the store last said.
            log.warning("guest %d: writing state %s: %s", self.domid, state.name, exc)
            return
        self._state = state
        self._changed()

    async def _probe(self) -> None:
        xs = self.xenstore
        self.backend_path = (await xs.read(f"{self.frontend_path}/{BACKEND}")).decode()
        self.backend_domid = parse_domid(
            await xs.read(f"{self.frontend_path}/{BACKEND_ID}"), what=BACKEND_ID
        )
        await self._switch_state(XenbusState.INITIALISING)

    async def _watch_backend(self) -> None:
        path = f"{self.backend_path}/{STATE}"
        with self._watch_scope, contextlib.suppress(XenStoreError):
            await self._watch_states(path)

    async def _watch_states(self, path: str) -> None:
        async with self.xenstore.watch(path) as events:
            async for _changed in events:
                try:
                    raw = await self.xenstore.read_or_none(path)
                except XenStoreError:
                    # xenbus_read_driver_state: any read error is Unknown. A removed backend
                    # directory reads EACCES (its parent is not ours to read), not ENOENT.
                    raw = None
                self._backend_state = parse_state(raw)
                self._changed()
                await self._on_backend_state(self._backend_state)

    async def _on_backend_state(self, backend: XenbusState) -> None:
        """``displback_changed``: the table in the module docstring."""
        S = XenbusState
        if backend in (S.RECONFIGURING, S.RECONFIGURED, S.INITIALISED, S.CLOSING):
            return
        if backend is S.INITIALISING:
            if self._state is not S.RECONFIGURING:
                await self._disconnect()
        elif backend is S.INIT_WAIT:
            if self._state is S.RECONFIGURING:
                return
            await self._disconnect()
            if self._state is not S.INITIALISING:
                return
            try:
                await self._initwait()
            except GuestRequestError as exc:
                await self._fatal(exc.errno or _errno.EIO, f"initializing frontend: {exc.strerror}")
                return
            except XenStoreError as exc:
                await self._fatal(exc.errno or _errno.EIO, f"initializing frontend: {exc}")
                return
            await self._switch_state(S.INITIALISED)
        elif backend is S.CONNECTED:
            if self._state is not S.INITIALISED:
                return
            self._connect()
            await self._switch_state(S.CONNECTED)
        elif self._state is not S.CLOSED:  # Closed or Unknown
            await self._disconnect()

    async def _fatal(self, errno: int, message: str) -> None:
        """``xenbus_dev_fatal``: error node, then Closing."""
        self.stats.fatal_errors += 1
        log.error("guest %d vdispl %d: %s", self.domid, self.devid, message)
        with contextlib.suppress(XenStoreError):
            await self.xenstore.write(
                f"/local/domain/{self.domid}/error/device/vdispl/{self.devid}/error",
                f"{errno} {message}",
            )
        await self._switch_state(XenbusState.CLOSING)

    # ------------------------------------------------------------------ handshake

    async def _read_config(self) -> tuple[bool, list[tuple[int, int]]]:
        xs = self.xenstore
        raw = await xs.read_or_none(f"{self.frontend_path}/{BE_ALLOC}")
        try:
            be_alloc = raw is not None and parse_bool(raw)
        except ProtocolError:
            be_alloc = False  # xenbus_read_unsigned's default
        resolutions: list[tuple[int, int]] = []
        for i in range(LINUX_MAX_CONNECTORS):
            value = await xs.read_or_none(f"{connector_dir(self.domid, self.devid, i)}/"
                                          f"{RESOLUTION}")
            size = _linux_resolution(value)
            if size is None:
                break
            resolutions.append(size)
        return be_alloc, resolutions

    async def _initwait(self) -> None:
        """``displback_initwait``: config, channels, one publishing transaction."""
        be_alloc, resolutions = await self._read_config()
        if not resolutions:
            raise GuestRequestError(_errno.ENODEV, "no connector(s) configured")
        self._generation += 1
        link = _Link(self._generation, be_alloc, resolutions)
        self._link = link
        try:
            self._create_channels(link)
        except OSError as exc:
            raise GuestRequestError(exc.errno or _errno.EIO, str(exc)) from exc

        async def publish(tx: Transaction) -> None:
            for req, evt in zip(link.req, link.evt, strict=True):
                base = connector_dir(self.domid, self.devid, req.index)
                await tx.write(f"{base}/{REQ_RING_REF}", str(req.gref))
                await tx.write(f"{base}/{REQ_EVENT_CHANNEL}", str(req.port))
                await tx.write(f"{base}/{EVT_RING_REF}", str(evt.gref))
                await tx.write(f"{base}/{EVT_EVENT_CHANNEL}", str(evt.port))

        try:
            await self.xenstore.run_transaction(publish)
        except XenStoreError as exc:
            raise GuestRequestError(exc.errno or _errno.EIO, f"writing Xen store: {exc}") from exc
        if self.on_published is not None:
            result = self.on_published(self)
            if result is not None:
                await result

    def _create_channels(self, link: _Link) -> None:
        dom, evtchn = self._require_domain(), self._require_evtchn()
        for index in range(len(link.resolutions)):
            [req_pfn, evt_pfn] = dom.alloc_pages(2)
            req_map = dom.map_pages([req_pfn])
            req = _ReqChannel(index, req_pfn, req_map, FrontRing(req_map.buffer))
            link.req.append(req)
            evt_map = dom.map_pages([evt_pfn])
            evt = _EvtChannel(index, evt_pfn, evt_map, EventConsumer(evt_map.buffer))
            link.evt.append(evt)
            req.gref, evt.gref = dom.grant_pages([req_pfn, evt_pfn], self.backend_domid)
            req.port = evtchn.bind_unbound_port(self.backend_domid)
            self._port_handlers[req.port] = functools.partial(self._on_responses, link, req)
            evt.port = evtchn.bind_unbound_port(self.backend_domid)
            self._port_handlers[evt.port] = functools.partial(self._on_events, link, evt)
            self.connector_stats(index).state = "offline"

    def _connect(self) -> None:
        """``displback_connect``: channels connected, then the DRM device."""
        link = self._link
        assert link is not None
        link.connected = True
        link.pipes = [_Pipe(i, w, h) for i, (w, h) in enumerate(link.resolutions)]
        for i in range(len(link.resolutions)):
            self.connector_stats(i).state = "connected"
        self.stats.handshakes += 1
        # Anything the backend sent before we were connected was ignored (Linux's handlers
        # return early); look once now, as a late interrupt would.
        for req in link.req:
            self._on_responses(link, req)
        for evt in link.evt:
            self._on_events(link, evt)

    async def _disconnect(self) -> None:
        """``displback_disconnect``: only a guest with a DRM device resets itself."""
        link = self._link
        if link is None or link.pipes is None:
            return
        await self._switch_state(XenbusState.RECONFIGURING)
        self.stats.disconnects += 1
        self._fini(link)
        if not link.be_alloc or self.be_alloc_release_delay <= 0:
            await self._switch_state(XenbusState.INITIALISING)
        elif self._nursery is not None:
            # be-alloc: 1 only once the last DRM user closed its file (drm release); backend
            # changes seen meanwhile find the guest in 7 and are ignored, as on Linux.
            self._nursery.start_soon(self._released_later)

    async def _released_later(self) -> None:
        await trio.sleep(self.be_alloc_release_delay)
        if self._state is XenbusState.RECONFIGURING:
            await self._switch_state(XenbusState.INITIALISING)

    def _fini(self, link: _Link) -> None:
        """``xen_drm_drv_fini``: unplug, free channels, free all buffers."""
        if self._link is link:
            self._link = None
        for pipe in link.pipes or []:
            if pipe.flip is not None:
                pipe.flip.released = True
                pipe.flip.event.set()
        link.pipes = None
        link.connected = False
        for req in link.req:
            if req.pending is not None:
                req.pending.status = -_errno.EIO
                req.pending.done.set()
        evtchn = self._require_evtchn()
        for port in [ch.port for ch in link.req] + [ch.port for ch in link.evt]:
            self._port_handlers.pop(port, None)
            with contextlib.suppress(OSError):
                evtchn.unbind(port)
        for index in range(len(link.resolutions)):
            self.connector_stats(index).state = "offline"
        pairs = self._drop_link_memory(link)
        for buf in list(self._buffers.values()):
            pairs += self._free_buffer_local(buf)
        self._end_access(pairs)
        self._changed()

    def _drop_link_memory(self, link: _Link) -> list[tuple[int, int | None]]:
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

    async def _remove(self) -> None:
        """``xen_drv_remove``: Closing, poll for backend InitWait, free everything, Closed.

        The driver is off XenBus by then: backend state changes are no longer handled."""
        self._watch_scope.cancel()
        with contextlib.suppress(XenStoreError, OSError):
            await self._switch_state(XenbusState.CLOSING)
            path = f"{self.backend_path}/{STATE}"
            with trio.move_on_after(self.remove_timeout):
                while parse_state(await self.xenstore.read_or_none(path)) \
                        is not XenbusState.INIT_WAIT:
                    await trio.sleep(_REMOVE_POLL)
        link = self._link
        if link is not None:
            self._fini(link)
        with contextlib.suppress(XenStoreError, OSError):
            await self._switch_state(XenbusState.CLOSED)

    # ------------------------------------------------------------------ interrupts

    async def _irq_loop(self) -> None:
        evtchn = self._require_evtchn()
        while True:
            await trio.lowlevel.wait_readable(evtchn.fileno())
            if self._crashed:
                # crash() closed the device while this task was already woken (its cancel
                # only lands at the next checkpoint).
                return
            fired = evtchn.read_pending()
            for port in fired:
                handler = self._port_handlers.get(port)
                if handler is not None:
                    handler()
            evtchn.unmask(fired)

    def _on_responses(self, link: _Link, req: _ReqChannel) -> None:
        """``evtchnl_interrupt_ctrl``: take responses, complete the one waited for."""
        if not link.connected:
            return
        stats = self.connector_stats(req.index)
        while True:
            try:
                packets = req.ring.take_responses()
            except ProtocolError as exc:
                self.stats.bad_rsp_prod += 1
                log.warning("guest %d: connector %d: %s", self.domid, req.index, exc)
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

    def _on_events(self, link: _Link, evt: _EvtChannel) -> None:
        """``evtchnl_interrupt_evt``: consume events with Linux's id rule; frame done."""
        if not link.connected:
            return
        stats = self.connector_stats(evt.index)
        skipped = evt.consumer.skipped
        try:
            events = evt.consumer.take()
        except ProtocolError as exc:
            self.stats.bad_in_prod += 1
            log.warning("guest %d: connector %d: %s", self.domid, evt.index, exc)
            return
        stats.events_skipped += evt.consumer.skipped - skipped
        for _event in events:
            stats.events += 1
            pipe = link.pipes[evt.index] if link.pipes is not None else None
            if pipe is not None and pipe.flip is not None:
                pipe.flip.event.set()  # Linux completes whatever vblank event is pending
            else:
                stats.events_unexpected += 1

    # ------------------------------------------------------------------ requests

    def _require_domain(self) -> SimDomain:
        if self._domain is None or self._crashed:
            raise GuestRequestError(_errno.EIO, "guest is not running")
        return self._domain

    def _require_evtchn(self) -> SimEventChannels:
        if self._evtchn is None or self._crashed:
            raise GuestRequestError(_errno.EIO, "guest is not running")
        return self._evtchn

    def _require_link(self) -> _Link:
        link = self._link
        if link is None or link.pipes is None:
            raise GuestRequestError(_errno.EIO, "device is not connected")
        return link

    def _pipe(self, connector: int) -> _Pipe:
        link = self._require_link()
        assert link.pipes is not None
        if not 0 <= connector < len(link.pipes):
            raise GuestRequestError(_errno.EINVAL, f"no connector {connector}")
        return link.pipes[connector]

    async def _request(
        self, ring_index: int, build: Callable[[int], Request | bytes]
    ) -> _PendingRequest:
        """Send one request on ring ``ring_index`` and wait for its answer (Linux's do_io).

        ``build`` gets the request id; it returns a request, or 64 raw bytes whose operation
        byte is what the response must echo (see :meth:`raw_request`)."""
        link = self._require_link()
        if not 0 <= ring_index < len(link.req):
            raise GuestRequestError(_errno.EINVAL, f"no connector {ring_index}")
        req = link.req[ring_index]
        stats = self.connector_stats(ring_index)
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
            hook = self.request_hooks.get(op) if op is not None else None
            if hook is not None:
                raw = hook(raw)
            if req.ring.outstanding >= 32:
                self.stats.ring_full += 1
                raise GuestRequestError(_errno.EIO, "request ring full", op=op)
            pending = _PendingRequest(req_id, op_code)
            req.pending = pending
            req.ring.put_request(raw)
            stats.requests_sent += 1
            if req.ring.push_requests():
                self._require_evtchn().notify(req.port)
            try:
                with trio.move_on_after(self.response_timeout):
                    await pending.done.wait()
            finally:
                if req.pending is pending:
                    req.pending = None
            if not pending.done.is_set():
                stats.response_timeouts += 1
                raise GuestRequestError(
                    _errno.ETIMEDOUT, f"{op_name}: no response in {self.response_timeout} s",
                    op=op,
                )
            if pending.status != 0:
                errno = -pending.status if pending.status < 0 else _errno.EIO
                raise GuestRequestError(
                    errno, f"{op_name}: status {pending.status}", op=op
                )
            return pending

    async def raw_request(self, ring_index: int, packet: bytes) -> int:
        """Send 64 raw bytes on ring ``ring_index`` (bytes 0-1 become the request id); return
        the response's ``edid_sz``. The response must echo the id and ``packet[2]`` (the
        operation, known or not); a non-zero status raises :class:`GuestRequestError`."""
        if len(packet) != 64:
            raise ValueError("a request is 64 bytes")
        answer = await self._request(
            ring_index, lambda req_id: _U16.pack(req_id) + packet[2:]
        )
        return answer.edid_sz

    def _cookie(self) -> int:
        cookie = self._next_cookie
        self._next_cookie += _COOKIE_STEP
        return cookie

    # ------------------------------------------------------------------ buffers

    async def create_dumb(
        self, width: int, height: int, bpp: int, *, cookie: int | None = None
    ) -> GuestBuffer:
        """``DRM_IOCTL_MODE_CREATE_DUMB``: pitch = ceil(width*bpp/8), size = pitch*height."""
        if width <= 0 or height <= 0 or bpp <= 0:
            raise GuestRequestError(_errno.EINVAL, f"dumb buffer {width}x{height}x{bpp}")
        size = pitch_for(width, bpp) * height
        return await self._create_buffer(width, height, bpp, size, 0, cookie)

    async def import_prime(
        self, size: int, data_ofs: int = 0, *, cookie: int | None = None
    ) -> GuestBuffer:
        """A PRIME-imported buffer: DBUF_CREATE with width = height = bpp = 0."""
        if size <= 0:
            raise GuestRequestError(_errno.EINVAL, f"imported buffer of {size} bytes")
        return await self._create_buffer(0, 0, 0, size, data_ofs, cookie)

    async def _create_buffer(
        self, width: int, height: int, bpp: int, size: int, data_ofs: int, cookie: int | None
    ) -> GuestBuffer:
        link = self._require_link()
        dom = self._require_domain()
        buf = GuestBuffer(
            self._cookie() if cookie is None else cookie,
            width=width,
            height=height,
            bpp=bpp,
            size=size,
            data_ofs=data_ofs,
            be_alloc=link.be_alloc,
            generation=link.generation,
        )
        ndir = dir_pages_for(buf.npages)
        self._buffers[id(buf)] = buf
        try:
            buf.dir_pfns = dom.alloc_pages(ndir)
            buf.dir_grefs = dom.grant_pages(buf.dir_pfns, self.backend_domid)
            if not buf.be_alloc:
                buf.pfns = dom.alloc_pages(buf.npages)
                buf.grefs = dom.grant_pages(buf.pfns, self.backend_domid)
                buf._own = dom.map_pages(buf.pfns)
            refs = buf.grefs if not buf.be_alloc else [0] * buf.npages
            with dom.map_pages(buf.dir_pfns) as directory:
                for i, page in enumerate(build_directory(refs, buf.dir_grefs)):
                    directory.buffer[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = page
            if self.on_directory is not None:
                self.on_directory(buf)  # e.g. scribble_directory before DBUF_CREATE
        except OSError as exc:
            self._destroy_local(buf)
            raise GuestRequestError(exc.errno or _errno.ENOMEM, str(exc)) from exc
        try:
            await self._request(
                0,
                lambda req_id: DbufCreateReq(
                    id=req_id,
                    dbuf_cookie=buf.cookie,
                    width=width,
                    height=height,
                    bpp=bpp,
                    buffer_sz=size,
                    flags=DBUF_FLG_REQ_ALLOC if buf.be_alloc else 0,
                    gref_directory=buf.dir_grefs[0],
                    data_ofs=data_ofs,
                ),
            )
            if buf.be_alloc and not buf.freed:
                self._map_backend_buffer(buf)
        except BaseException:
            self._destroy_local(buf)
            raise
        if buf.freed:  # torn down while waiting
            raise GuestRequestError(_errno.EIO, "device disconnected", op=Op.DBUF_CREATE)
        return buf

    def _map_backend_buffer(self, buf: GuestBuffer) -> None:
        """be-alloc: read the refs the backend wrote into our directory and map them."""
        dom = self._require_domain()
        reader = DirectoryReader(buf.dir_grefs[0], buf.npages, same_grant_table=False)
        error: Exception | None = None
        with dom.map_pages(buf.dir_pfns) as directory:
            page_of = {gref: i for i, gref in enumerate(buf.dir_grefs)}
            try:
                while (gref := reader.next_page_gref) is not None:
                    index = page_of[gref]
                    with directory.buffer[index * PAGE_SIZE : (index + 1) * PAGE_SIZE] as page:
                        reader.feed(page)
            except (ProtocolError, KeyError) as exc:
                error = exc  # raised below, once no view of the mapping is alive
        if error is not None:
            raise GuestRequestError(_errno.EIO, f"backend directory: {error}") from error
        buf.backend_refs = list(reader.refs)
        if self._gntdev is None:
            self._gntdev = dom.open_grant_device()
        try:
            buf._backend = self._gntdev.map_grants(self.backend_domid, buf.backend_refs)
        except OSError as exc:
            raise GuestRequestError(exc.errno or _errno.EIO, f"mapping: {exc}") from exc

    def _close_buffer_mappings(self, buf: GuestBuffer) -> None:
        for mapping in (buf._backend, buf._own):
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:
                    log.error("buffer %#x: a view of its memory is still alive", buf.cookie)
        buf._backend = buf._own = None

    def _free_buffer_local(self, buf: GuestBuffer) -> list[tuple[int, int | None]]:
        """``dbuf_free``: unmap, and return (gref, pfn) pairs whose access must end."""
        if buf.freed:
            return []
        buf.freed = True
        self._buffers.pop(id(buf), None)
        self._close_buffer_mappings(buf)
        # grant_pages is all or nothing: a list of pages is either all granted or none.
        pairs: list[tuple[int, int | None]] = []
        for grefs, pfns in ((buf.grefs, buf.pfns), (buf.dir_grefs, buf.dir_pfns)):
            if grefs:
                pairs += zip(grefs, pfns, strict=True)
            else:
                pairs += ((0, pfn) for pfn in pfns)
        return pairs

    def _destroy_local(self, buf: GuestBuffer) -> None:
        self._end_access(self._free_buffer_local(buf))

    async def destroy_dumb(self, buf: GuestBuffer) -> None:
        """GEM free: DBUF_DESTROY and end access to the pages whatever the answer.

        As Linux: in be-alloc mode the backend's pages are unmapped and the directory's
        grants ended *before* the request; otherwise after it. Without a connection only the
        local part happens. Raises :class:`GuestRequestError` if the request failed; access
        the backend still maps is retried every ``end_access_retry`` seconds.
        """
        if buf.freed:
            return
        if not self.connected:
            self._destroy_local(buf)
            return
        if buf.be_alloc:
            self._destroy_local(buf)
        try:
            await self._request(
                0, lambda req_id: DbufDestroyReq(id=req_id, dbuf_cookie=buf.cookie)
            )
        finally:
            self._destroy_local(buf)

    async def add_fb(
        self,
        buf: GuestBuffer,
        width: int,
        height: int,
        fourcc: PixelFormat | int = PixelFormat.XRGB8888,
        *,
        cookie: int | None = None,
    ) -> GuestFb:
        """``ADDFB2``: FB_ATTACH on connector 0's ring."""
        if buf.freed:
            raise GuestRequestError(_errno.EINVAL, "buffer is gone")
        fb = GuestFb(self._cookie() if cookie is None else cookie, buf, width, height,
                         int(fourcc))
        await self._request(
            0,
            lambda req_id: FbAttachReq(
                id=req_id,
                dbuf_cookie=buf.cookie,
                fb_cookie=fb.cookie,
                width=width,
                height=height,
                pixel_format=fb.fourcc,
            ),
        )
        return fb

    async def rm_fb(self, fb: GuestFb) -> None:
        """``RMFB``: FB_DETACH on connector 0's ring."""
        await self._request(0, lambda req_id: FbDetachReq(id=req_id, fb_cookie=fb.cookie))

    async def set_config(
        self, connector: int, fb: GuestFb | None, *, x: int = 0, y: int = 0
    ) -> None:
        """Enable the pipe showing ``fb`` (size and bpp of the FB), or disable it (None)."""
        pipe = self._pipe(connector)
        stats = self.connector_stats(connector)
        try:
            if fb is None:
                await self._request(connector, lambda req_id: SetConfigReq.disable(req_id))
            else:
                await self._request(
                    connector,
                    lambda req_id: SetConfigReq(
                        id=req_id, fb_cookie=fb.cookie, x=x, y=y, width=fb.width,
                        height=fb.height, bpp=fb.bpp,
                    ),
                )
        except GuestRequestError:
            if fb is not None:
                stats.set_config_errors += 1
                pipe.conn_connected = False
                stats.state = "error"
            raise
        finally:
            if fb is None:  # display_disable: restartable, stalled event released
                pipe.conn_connected = True
                pipe.enabled = False
                if pipe.flip is not None:
                    pipe.flip.released = True
                    pipe.flip.event.set()
        if fb is not None:
            pipe.enabled = True
            stats.state = "enabled"
        elif stats.state != "offline":
            stats.state = "connected"

    async def page_flip(self, connector: int, fb: GuestFb) -> FlipOutcome:
        """PG_FLIP, wait for its response, then for EVT_PG_FLIP until ``frame_done_timeout``
        after sending. Raises :class:`GuestRequestError` if the request failed (the
        connector is then marked disconnected, as Linux does)."""
        pipe = self._pipe(connector)
        stats = self.connector_stats(connector)
        flip = _AwaitedFlip()
        pipe.flip = flip
        try:
            with trio.move_on_after(self.frame_done_timeout) as frame_done:
                try:
                    await self._request(
                        connector, lambda req_id: PgFlipReq(id=req_id, fb_cookie=fb.cookie)
                    )
                except GuestRequestError:
                    if flip.released:  # torn down under us: not the backend's failure
                        return FlipOutcome.RELEASED
                    stats.flip_errors += 1
                    pipe.conn_connected = False
                    stats.state = "error"
                    raise
                await flip.event.wait()
        finally:
            if pipe.flip is flip:
                pipe.flip = None
        if flip.released:
            return FlipOutcome.RELEASED
        if frame_done.cancelled_caught:
            stats.frame_done_timeouts += 1
            log.warning("guest %d: connector %d: frame done timed-out", self.domid, connector)
            return FlipOutcome.FRAME_DONE_TIMEOUT
        stats.flips_ok += 1
        return FlipOutcome.DONE

    async def get_edid(self, connector: int, *, buffer_sz: int = EDID_MAX_SIZE) -> bytes:
        """GET_EDID (v2) with a guest buffer of ``buffer_sz`` bytes; the EDID returned."""
        self._require_link()
        dom = self._require_domain()
        npages = pages_for(buffer_sz)
        pfns = dom.alloc_pages(npages)
        dir_pfns = dom.alloc_pages(dir_pages_for(npages))
        pairs: list[tuple[int, int | None]] = []
        try:
            grefs = dom.grant_pages(pfns, self.backend_domid)
            pairs += list(zip(grefs, pfns, strict=True))
            dir_grefs = dom.grant_pages(dir_pfns, self.backend_domid)
            pairs += list(zip(dir_grefs, dir_pfns, strict=True))
            with dom.map_pages(dir_pfns) as directory:
                for i, page in enumerate(build_directory(grefs, dir_grefs)):
                    directory.buffer[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = page
            answer = await self._request(
                connector,
                lambda req_id: GetEdidReq(
                    id=req_id, buffer_sz=buffer_sz, gref_directory=dir_grefs[0]
                ),
            )
            size = min(answer.edid_sz, buffer_sz)
            with dom.map_pages(pfns) as memory:
                return bytes(memory.buffer[:size])
        finally:
            granted = {pfn for _gref, pfn in pairs}
            leftover = [p for p in pfns + dir_pfns if p not in granted]
            if leftover and not self._crashed:
                dom.free_pages(leftover)
            self._end_access(pairs)

    # ------------------------------------------------------------------ grant ends

    def _end_access(self, pairs: list[tuple[int, int | None]]) -> None:
        """End access and free; what the backend still maps is deferred and retried."""
        if not pairs or self._crashed or self._domain is None:
            return
        dom = self._domain
        ungranted = [pfn for gref, pfn in pairs if gref == 0 and pfn is not None]
        if ungranted:
            dom.free_pages(ungranted)
        pairs = [(gref, pfn) for gref, pfn in pairs if gref != 0]
        if not pairs:
            return
        try:
            dom.end_access_pages([gref for gref, _pfn in pairs])
        except OSError as exc:
            if exc.errno != _errno.EBUSY:
                raise
            for gref, pfn in pairs:
                try:
                    dom.end_access(gref)
                except OSError as one:
                    if one.errno != _errno.EBUSY:
                        raise
                    self.stats.end_access_deferred += 1
                    self._deferred.append((gref, pfn))
                    continue
                if pfn is not None:
                    dom.free_pages([pfn])
            return
        pfns = [pfn for _gref, pfn in pairs if pfn is not None]
        if pfns:
            dom.free_pages(pfns)

    async def _deferred_loop(self) -> None:
        while True:
            await trio.sleep(self.end_access_retry)
            if not self._deferred or self._domain is None:
                continue
            still: list[tuple[int, int | None]] = []
            for gref, pfn in self._deferred:
                try:
                    self._domain.end_access(gref)
                except OSError as exc:
                    if exc.errno != _errno.EBUSY:
                        log.error("guest %d: ending gref %d: %s", self.domid, gref, exc)
                        continue
                    self.stats.end_access_retries += 1
                    still.append((gref, pfn))
                    continue
                if pfn is not None:
                    self._domain.free_pages([pfn])
            self._deferred = still
            self._changed()

    # ------------------------------------------------------------------ drawing mode

    async def draw(
        self,
        connector: int,
        *,
        fps: float = 60.0,
        fmt: PixelFormat = PixelFormat.XRGB8888,
        frames: int | None = None,
    ) -> None:
        """Show a moving test pattern on ``connector`` at ``fps`` (double-buffered dumb
        buffers at the connector's resolution, SET_CONFIG once, then PG_FLIP per frame).

        Runs until ``frames`` frames were shown (None: until cancelled). After a disconnect it
        waits for the next connection and starts over; after a failed request it pauses a
        frame and retries. See :func:`displback.sim.guest_pattern.pattern_rgb`.
        """
        period = 1.0 / fps if fps > 0 else 0.0
        shown = 0
        while frames is None or shown < frames:
            await self.wait_state(lambda g: g.connected, timeout=math.inf)
            try:
                shown = await self._draw_session(connector, fmt, period, shown, frames)
            except GuestRequestError as exc:
                log.info("guest %d: connector %d drawing: %s", self.domid, connector, exc)
                await trio.sleep(max(period, 0.01))

    async def _draw_session(
        self, connector: int, fmt: PixelFormat, period: float, shown: int, frames: int | None
    ) -> int:
        stats = self.connector_stats(connector)
        width, height = self.resolutions[connector]
        buffers: list[GuestBuffer] = []
        fbs: list[GuestFb] = []
        try:
            for _ in range(2):
                buf = await self.create_dumb(width, height, fmt.bpp)
                buffers.append(buf)
                fbs.append(await self.add_fb(buf, width, height, fmt))
            self._paint(buffers[0], fmt, connector, shown)
            stats.frames_drawn += 1
            await self.set_config(connector, fbs[0])
            shown += 1
            next_time = trio.current_time() + period
            while frames is None or shown < frames:
                back = shown % 2
                self._paint(buffers[back], fmt, connector, shown)
                stats.frames_drawn += 1
                result = await self.page_flip(connector, fbs[back])
                if result is FlipOutcome.RELEASED:
                    return shown
                shown += 1
                await trio.sleep_until(next_time)
                next_time = max(next_time + period, trio.current_time())
            return shown
        finally:
            with trio.CancelScope(shield=True):
                await self._undraw(connector, buffers, fbs)

    async def _undraw(
        self, connector: int, buffers: list[GuestBuffer], fbs: list[GuestFb]
    ) -> None:
        if self.connected:
            with contextlib.suppress(GuestRequestError):
                await self.set_config(connector, None)
            for fb in fbs:
                with contextlib.suppress(GuestRequestError):
                    await self.rm_fb(fb)
        for buf in buffers:
            with contextlib.suppress(GuestRequestError):
                await self.destroy_dumb(buf)

    @staticmethod
    def _paint(buf: GuestBuffer, fmt: PixelFormat, connector: int, frame: int) -> None:
        draw_pattern(
            buf.buffer, width=buf.width, height=buf.height, pitch=buf.pitch, fmt=fmt,
            connector=connector, frame=frame,
        )

    def start_drawing(
        self,
        connectors: Iterable[int] | None = None,
        *,
        fps: float = 60.0,
        fmt: PixelFormat = PixelFormat.XRGB8888,
        frames: int | None = None,
    ) -> None:
        """Run :meth:`draw` for each connector (default: all configured) in the guest's
        nursery, until the guest closes."""
        if self._nursery is None:
            raise RuntimeError("guest is not running")
        indices = list(range(len(self.resolutions))) if connectors is None else list(connectors)
        for index in indices:
            self._nursery.start_soon(
                functools.partial(self.draw, index, fps=fps, fmt=fmt, frames=frames)
            )

    # ------------------------------------------------------------------ misbehaviour

    def set_request_hook(self, op: Op, hook: RequestHook | None) -> None:
        """Let ``hook`` rewrite every ``op`` request's 64 bytes before they enter the ring."""
        if hook is None:
            self.request_hooks.pop(op, None)
        else:
            self.request_hooks[op] = hook

    def _channels(self, connector: int) -> tuple[_ReqChannel, _EvtChannel]:
        link = self._link
        if link is None or not 0 <= connector < len(link.req):
            raise GuestRequestError(_errno.EIO, f"connector {connector} has no channels")
        return link.req[connector], link.evt[connector]

    def scribble_ring(self, connector: int, field_name: str, value: int) -> None:
        """Store ``value`` (u32) into ``req_prod``/``req_event``/``rsp_prod``/``rsp_event`` of
        the connector's request ring page, behind the ring object's back."""
        req, _evt = self._channels(connector)
        _U32.pack_into(req.mapping.buffer, _RING_FIELDS[field_name], value & 0xFFFF_FFFF)

    def scribble_event_page(self, connector: int, field_name: str, value: int) -> None:
        """Store ``value`` (u32) into ``in_cons``/``in_prod`` of the connector's event page."""
        _req, evt = self._channels(connector)
        _U32.pack_into(evt.mapping.buffer, _EVT_FIELDS[field_name], value & 0xFFFF_FFFF)

    def write_ring_slot(self, connector: int, index: int, packet: bytes) -> None:
        """Write raw bytes into request-ring slot ``index & 31`` (no index is moved)."""
        req, _evt = self._channels(connector)
        offset = 64 + 64 * (index & 31)
        req.mapping.buffer[offset : offset + len(packet)] = packet

    def scribble_directory(self, buf: GuestBuffer, page: int, offset: int, data: bytes) -> None:
        """Overwrite bytes of the buffer's directory page ``page`` at ``offset``."""
        if buf.freed or self._domain is None:
            raise GuestRequestError(_errno.EINVAL, "buffer is gone")
        with self._domain.map_pages([buf.dir_pfns[page]]) as directory:
            directory.buffer[offset : offset + len(data)] = data

    def notify(self, connector: int, channel: str = "req") -> None:
        """Kick the backend on the connector's ``"req"`` or ``"evt"`` channel (the latter is
        never signalled by Linux)."""
        req, evt = self._channels(connector)
        self._require_evtchn().notify(req.port if channel == "req" else evt.port)
