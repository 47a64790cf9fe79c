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
:attr:`GuestStats.ring_full`). Use ``guest.hostile.scribble_ring`` to forge producer overflow.

Leaving ``async with SimGuest.open(...)`` unloads the driver like ``xen_drv_remove``: state 5,
poll up to ``remove_timeout`` (1 s) for backend InitWait, free everything, state 6.
:meth:`SimGuest.crash` instead abandons every resource without a word, like ``xl destroy``.

The driver is divided as xen-drm-front's files are: :class:`SimGuest` here is the device
(``xen_drm_front.c``: probe, the XenBus handshake, remove), with its parts in
:mod:`.channels` (``xen_drm_front_evtchnl.c``), :mod:`.buffers` (the GEM objects and grant
ends), :mod:`.pipes` (``xen_drm_front_kms.c``), :mod:`.drawing` (a client drawing frames)
and, apart, :mod:`.hostile` (what only a hostile guest does). May touch: the simulated
platform (:mod:`displback.sim.platform`), the guest's own XenStore connection, and
:mod:`displback.protocol`.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, Required, TypedDict, Unpack

import trio

from displback.protocol.constants import (
    LINUX_MAX_CONNECTORS,
)
from displback.protocol.errors import ProtocolError
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
from displback.protocol.xenbus import XenbusState, parse_state
from displback.sim.guest.buffers import BufferTable
from displback.sim.guest.channels import Channels, Link
from displback.sim.guest.drawing import Drawing
from displback.sim.guest.hostile import HostileHooks
from displback.sim.guest.objects import (
    DEFAULT_END_ACCESS_RETRY,
    DEFAULT_FRAME_DONE_TIMEOUT,
    DEFAULT_REMOVE_TIMEOUT,
    DEFAULT_RESPONSE_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    GuestConnectorStats,
    GuestRequestError,
    GuestStats,
)
from displback.sim.guest.pipes import Pipe, Pipes
from displback.sim.platform import SimDomain, SimEventChannels, SimGrantDevice
from displback.xenstore.client import Transaction, XenStoreClient, open_xenstore
from displback.xenstore.wire import XenStoreError

__all__ = ["SimGuest", "SimGuestOptions"]

log = logging.getLogger(__name__)

_REMOVE_POLL: Final = 0.01


def _linux_resolution(value: bytes | None) -> tuple[int, int] | None:
    """``i/resolution`` as xen-drm-front reads it (``sscanf("%d" "x" "%d")``, any size: its
    own mode limits prune what it cannot show); None ends the connector list."""
    match = re.match(rb"\s*([+-]?\d+)x\s*([+-]?\d+)", value or b"")
    if match is None:
        return None
    return int(match[1]), int(match[2])


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
        self.on_published: Callable[[SimGuest], Awaitable[None] | None] | None = None
        self.frontend_path = frontend_dir(domid, devid)
        self.backend_path = ""
        self.backend_domid = 0
        self._state = XenbusState.UNKNOWN
        self._backend_state = XenbusState.UNKNOWN
        self._state_changed = trio.Event()
        self._link: Link | None = None
        self._generation = 0
        self._crashed = False
        self._xs: XenStoreClient | None = None
        self._nursery: trio.Nursery | None = None
        self._background_scope = trio.CancelScope()
        self._watch_scope = trio.CancelScope()
        self._domain: SimDomain | None = None
        self._evtchn: SimEventChannels | None = None
        self._gntdev: SimGrantDevice | None = None
        # The driver's parts, as xen-drm-front's files divide it; each works on this state.
        self.channels = Channels(self)
        self.buffers = BufferTable(self)
        self.pipes = Pipes(self)
        self.drawing = Drawing(self)
        self.hostile = HostileHooks(self)
        # What a DRM client of the guest calls, served by the parts.
        self.create_dumb = self.buffers.create_dumb
        self.import_prime = self.buffers.import_prime
        self.destroy_dumb = self.buffers.destroy_dumb
        self.add_fb = self.buffers.add_fb
        self.rm_fb = self.buffers.rm_fb
        self.set_config = self.pipes.set_config
        self.page_flip = self.pipes.page_flip
        self.get_edid = self.pipes.get_edid
        self.draw = self.drawing.draw
        self.start_drawing = self.drawing.start_drawing

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
                nursery.start_soon(self.channels.irq_loop)
                nursery.start_soon(self.buffers.deferred_loop)
                nursery.start_soon(self._watch_backend)
                task_status.started()

    def _release_devices(self) -> None:
        if self._crashed:
            return
        link, self._link = self._link, None
        if link is not None:  # only if unload could not run (cancelled): drop what is left
            self.channels.drop_memory(link)
        self.buffers.forget_all()
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
            self.channels.drop_memory(link)
        self.buffers.forget_all(mark_freed=True)
        if self._gntdev is not None:
            self._gntdev.abandon()
        if self._evtchn is not None:
            self._evtchn.abandon()
        if self._domain is not None:
            self._domain.abandon()
        self._background_scope.cancel()
        self._changed()

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
        return len(self.buffers.deferred)

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
        link = Link(self._generation, be_alloc, resolutions)
        self._link = link
        try:
            self.channels.create(link)
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

    def _connect(self) -> None:
        """``displback_connect``: channels connected, then the DRM device."""
        link = self._link
        assert link is not None
        link.connected = True
        link.pipes = [Pipe(i, w, h) for i, (w, h) in enumerate(link.resolutions)]
        for i in range(len(link.resolutions)):
            self.connector_stats(i).state = "connected"
        self.stats.handshakes += 1
        # Anything the backend sent before we were connected was ignored (Linux's handlers
        # return early); look once now, as a late interrupt would.
        for req in link.req:
            self.channels.on_responses(link, req)
        for evt in link.evt:
            self.channels.on_events(link, evt)

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

    def _fini(self, link: Link) -> None:
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
        self.channels.unbind(link)
        for index in range(len(link.resolutions)):
            self.connector_stats(index).state = "offline"
        pairs = self.channels.drop_memory(link)
        pairs += self.buffers.free_all()
        self.buffers.end_access(pairs)
        self._changed()

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

    def _require_domain(self) -> SimDomain:
        if self._domain is None or self._crashed:
            raise GuestRequestError(_errno.EIO, "guest is not running")
        return self._domain

    def _require_evtchn(self) -> SimEventChannels:
        if self._evtchn is None or self._crashed:
            raise GuestRequestError(_errno.EIO, "guest is not running")
        return self._evtchn

    def _require_link(self) -> Link:
        link = self._link
        if link is None or link.pipes is None:
            raise GuestRequestError(_errno.EIO, "device is not connected")
        return link

    def _pipe(self, connector: int) -> Pipe:
        link = self._require_link()
        assert link.pipes is not None
        if not 0 <= connector < len(link.pipes):
            raise GuestRequestError(_errno.EINVAL, f"no connector {connector}")
        return link.pipes[connector]
