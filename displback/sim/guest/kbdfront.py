"""The simulated guest's vkbd frontend: one domain's keyboard/pointer/touch as Linux has it.

:class:`SimKbdFront` behaves like Linux's ``drivers/input/misc/xen-kbdfront.c`` (6.1, read
for behaviour, not copied), over real shared memory of the simulated hypervisor and the
guest's own XenStore connection:

Probe (``xenkbd_probe``)
    Reads the backend's ``feature-disable-keyboard``/``-pointer``, ``feature-multi-touch``
    (writes ``request-multi-touch`` = 1 if set), ``feature-abs-pointer``, ``width``/``height``
    (writes ``request-abs-pointer`` = 1 if set) and ``multi-touch-*`` — once: later changes
    are never read. Allocates a zeroed page, grants it to the backend, allocates an unbound
    port, writes ``page-ref`` (the frame number), ``page-gref`` and ``event-channel`` in one
    transaction, then goes Initialised (3).

Backend changes (``xenkbd_backend_changed``)
    ==========================  ==============================================================
    backend becomes             guest does
    ==========================  ==============================================================
    2 InitWait                  go Connected (4) — without waiting for the backend's Connected
    4 Connected                 go Connected unless it is already
    6 Closed                    unless Closed: go Closed (``xenbus_frontend_closed``)
    5 Closing                   go Closed
    0, 1, 3, 7, 8               ignored
    ==========================  ==============================================================

    The page, its grant and the port are kept for the device's life: a backend that comes
    back (InitWait again) gets the same ones, with ``in_cons``/``in_prod`` where they were.

Interrupt (``input_handler``)
    Reads every event from ``in_cons`` to ``in_prod``, publishes ``in_cons`` and notifies the
    backend. :attr:`SimKbdFront.events` records what arrived; :attr:`keys_down`,
    :attr:`pointer` and :attr:`contacts` are the state Linux's input devices would report.

Options for tests: ``consume=False`` never reads the page (a guest that does not consume);
``publish_gref=False`` writes only the obsolete ``page-ref``; ``request_abs``/
``request_mt`` False do not ask for those features even when offered. Leaving
``async with SimKbdFront.open(...)`` unloads the driver (``xenkbd_remove``: unbind, end
access, free; then Closed); :meth:`SimKbdFront.crash` abandons everything like ``xl destroy``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from displback.protocol import kbdif
from displback.protocol.errors import ProtocolError
from displback.protocol.kbdif import (
    InEvent,
    InEventConsumer,
    Key,
    Motion,
    MtDown,
    MtMotion,
    MtUp,
    Position,
)
from displback.protocol.layout import BACKEND, BACKEND_ID, STATE, parse_domid
from displback.protocol.xenbus import XenbusState, parse_state
from displback.sim.memmap import PageMapping
from displback.sim.platform import SimDomain, SimEventChannels
from displback.xenstore.client import Transaction, XenStoreClient, open_xenstore
from displback.xenstore.wire import XenStoreError

__all__ = ["SimKbdFront"]

log = logging.getLogger(__name__)

#: How long unload retries ending the page's grant while the backend still maps it.
END_ACCESS_WAIT_S = 2.0
#: Linux's defaults (XENFB_WIDTH, XENFB_HEIGHT) when the backend gives no size.
DEFAULT_SIZE = (800, 600)


class SimKbdFront:
    """The frontend of vkbd device ``devid`` of guest ``domid``; use :meth:`open`."""

    def __init__(
        self,
        *,
        hypervisor_path: str,
        xenstore_path: str,
        domid: int,
        devid: int = 0,
        consume: bool = True,
        publish_gref: bool = True,
        request_abs: bool = True,
        request_mt: bool = True,
    ) -> None:
        self.hypervisor_path = hypervisor_path
        self.xenstore_path = xenstore_path
        self.domid = domid
        self.devid = devid
        self.consume = consume
        self.publish_gref = publish_gref
        self.request_abs = request_abs
        self.request_mt = request_mt
        self.frontend_path = kbdif.frontend_dir(domid, devid)
        self.backend_path = ""
        self.backend_domid = 0
        #: What probe read and asked for.
        self.with_kbd = self.with_ptr = self.with_mtouch = self.abs = False
        self.ptr_size = DEFAULT_SIZE
        self.mt_size = DEFAULT_SIZE
        self.num_contacts = 1
        #: Every event read from the page, in order; unknown types counted in ``skipped``.
        self.events: list[InEvent] = []
        self.interrupts = 0
        self.bad_in_prod = 0
        #: The input devices' state: keys held, the pointer (abs position or summed
        #: motion), wheel total (Linux's REL_WHEEL sign), contacts by slot.
        self.keys_down: set[int] = set()
        self.pointer = (0, 0)
        self.wheel = 0
        self.contacts: dict[int, tuple[int, int]] = {}
        self._state = XenbusState.UNKNOWN
        self._changed_event = trio.Event()
        self._xs: XenStoreClient | None = None
        self._domain: SimDomain | None = None
        self._evtchn: SimEventChannels | None = None
        self._pfn = 0
        self._mapping: PageMapping | None = None
        self._consumer: InEventConsumer | None = None
        self.gref = 0
        self.port = 0
        self._crashed = False
        self._scope = trio.CancelScope()
        self._watch_scope = trio.CancelScope()

    # --- life -------------------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, **options: Any) -> AsyncIterator[SimKbdFront]:
        """Probe the device and run the frontend until the block ends (driver unload)."""
        front = cls(**options)
        front._domain = SimDomain(front.hypervisor_path, front.domid)
        try:
            front._evtchn = front._domain.open_event_channels()
            async with open_xenstore(front.xenstore_path) as xs:
                front._xs = xs
                await front._probe()
                async with trio.open_nursery() as nursery:
                    with front._scope:
                        nursery.start_soon(front._watch_backend)
                        nursery.start_soon(front._irq_loop)
                        try:
                            yield front
                        finally:
                            if not front._crashed:
                                with trio.CancelScope(shield=True):
                                    await front._remove()
                            nursery.cancel_scope.cancel()
        finally:
            front._release()

    def crash(self) -> None:
        """Vanish like a destroyed domain: nothing released or written."""
        if self._crashed:
            return
        self._crashed = True
        self._drop_page()
        if self._evtchn is not None:
            self._evtchn.abandon()
        if self._domain is not None:
            self._domain.abandon()
        self._scope.cancel()
        self._changed()

    def _drop_page(self) -> None:
        """Let go of the shared page's view and mapping (a crash and a release alike)."""
        if self._consumer is not None:
            self._consumer.release()
            self._consumer = None
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None

    def _release(self) -> None:
        if self._crashed:
            return
        self._drop_page()
        if self._evtchn is not None:
            self._evtchn.close()
        if self._domain is not None:
            self._domain.close()

    # --- state ------------------------------------------------------------------------------

    @property
    def state(self) -> XenbusState:
        return self._state

    @property
    def xenstore(self) -> XenStoreClient:
        if self._xs is None:
            raise RuntimeError("frontend is not running")
        return self._xs

    @property
    def page(self) -> memoryview:
        """The shared page (for tests that play a hostile guest)."""
        assert self._mapping is not None
        return self._mapping.buffer

    def _changed(self) -> None:
        self._changed_event.set()
        self._changed_event = trio.Event()

    async def wait_for(
        self, predicate: Callable[[SimKbdFront], bool], *, timeout: float = 10.0
    ) -> None:
        """Wait until ``predicate(self)`` holds (checked after every change)."""
        with trio.fail_after(timeout):
            while not predicate(self):
                await self._changed_event.wait()

    async def _switch_state(self, state: XenbusState) -> None:
        if state == self._state:
            return
        with contextlib.suppress(XenStoreError):
            await self.xenstore.write(f"{self.frontend_path}/{STATE}", state.encode())
            self._state = state
            self._changed()

    # --- probe ------------------------------------------------------------------------------

    async def _read_unsigned(self, node: str, default: int) -> int:
        """``xenbus_read_unsigned``: ``%u`` of the backend's node, ``default`` if unreadable."""
        try:
            raw = await self.xenstore.read_or_none(f"{self.backend_path}/{node}")
        except XenStoreError:
            return default
        try:
            return int(raw or b"", 10) & 0xFFFFFFFF if raw is not None else default
        except ValueError:
            return default

    async def _probe(self) -> None:
        xs = self.xenstore
        self.backend_path = (await xs.read(f"{self.frontend_path}/{BACKEND}")).decode()
        self.backend_domid = parse_domid(
            await xs.read(f"{self.frontend_path}/{BACKEND_ID}"), what=BACKEND_ID
        )
        self.with_kbd = not await self._read_unsigned(kbdif.FEATURE_DISABLE_KEYBOARD, 0)
        self.with_ptr = not await self._read_unsigned(kbdif.FEATURE_DISABLE_POINTER, 0)
        self.with_mtouch = bool(await self._read_unsigned(kbdif.FEATURE_MULTI_TOUCH, 0))
        if self.with_mtouch and self.request_mt:
            await xs.write(f"{self.frontend_path}/{kbdif.REQUEST_MULTI_TOUCH}", b"1")
        else:
            self.with_mtouch = False
        if self.with_ptr:
            self.abs = bool(await self._read_unsigned(kbdif.FEATURE_ABS_POINTER, 0))
            self.ptr_size = (
                await self._read_unsigned(kbdif.WIDTH, DEFAULT_SIZE[0]),
                await self._read_unsigned(kbdif.HEIGHT, DEFAULT_SIZE[1]),
            )
            if self.abs and self.request_abs:
                await xs.write(f"{self.frontend_path}/{kbdif.REQUEST_ABS_POINTER}", b"1")
            else:
                self.abs = False
        if self.with_mtouch:
            self.num_contacts = await self._read_unsigned(kbdif.MT_NUM_CONTACTS, 1)
            self.mt_size = (
                await self._read_unsigned(kbdif.MT_WIDTH, DEFAULT_SIZE[0]),
                await self._read_unsigned(kbdif.MT_HEIGHT, DEFAULT_SIZE[1]),
            )
        await self._connect_backend()

    async def _connect_backend(self) -> None:
        """``xenkbd_connect_backend``: grant the zeroed page, an unbound port, publish, 3."""
        dom, evtchn = self._domain, self._evtchn
        assert dom is not None and evtchn is not None
        [self._pfn] = dom.alloc_pages(1)
        self._mapping = dom.map_pages([self._pfn])
        self._consumer = InEventConsumer(self._mapping.buffer)
        self.gref = dom.grant(self._pfn, self.backend_domid)
        self.port = evtchn.bind_unbound_port(self.backend_domid)

        async def publish(tx: Transaction) -> None:
            base = self.frontend_path
            await tx.write(f"{base}/{kbdif.PAGE_REF}", str(self._pfn))
            if self.publish_gref:
                await tx.write(f"{base}/{kbdif.PAGE_GREF}", str(self.gref))
            await tx.write(f"{base}/{kbdif.EVENT_CHANNEL}", str(self.port))

        await self.xenstore.run_transaction(publish)
        await self._switch_state(XenbusState.INITIALISED)

    # --- backend changes --------------------------------------------------------------------

    async def _watch_backend(self) -> None:
        path = f"{self.backend_path}/{STATE}"
        with self._watch_scope, contextlib.suppress(XenStoreError):
            async with self.xenstore.watch(path) as events:
                async for _ in events:
                    try:
                        raw = await self.xenstore.read_or_none(path)
                    except XenStoreError:
                        raw = None
                    await self._backend_changed(parse_state(raw))

    async def _backend_changed(self, backend: XenbusState) -> None:
        S = XenbusState
        if backend in (S.INIT_WAIT, S.CONNECTED):
            await self._switch_state(S.CONNECTED)
        elif backend is S.CLOSED:
            if self._state is not S.CLOSED:
                await self._switch_state(S.CLOSED)
        elif backend is S.CLOSING:
            await self._switch_state(S.CLOSED)

    # --- interrupt --------------------------------------------------------------------------

    async def _irq_loop(self) -> None:
        evtchn = self._evtchn
        assert evtchn is not None
        while True:
            await trio.lowlevel.wait_readable(evtchn.fileno())
            if self._crashed:
                return
            fired = evtchn.read_pending()
            if self.port in fired and self.consume:
                self._input_handler()
            evtchn.unmask(fired)

    def _input_handler(self) -> None:
        consumer, evtchn = self._consumer, self._evtchn
        if consumer is None or evtchn is None:
            return
        self.interrupts += 1
        try:
            events = consumer.take()
        except ProtocolError as exc:
            self.bad_in_prod += 1
            log.warning("guest %d vkbd %d: %s", self.domid, self.devid, exc)
            return
        for event in events:
            self._apply(event)
        self.events.extend(events)
        with contextlib.suppress(OSError):
            evtchn.notify(self.port)
        self._changed()

    def _apply(self, event: InEvent) -> None:
        match event:
            case Key(keycode=code, pressed=True):
                self.keys_down.add(code)
            case Key(keycode=code, pressed=False):
                self.keys_down.discard(code)
            case Position(abs_x=x, abs_y=y, rel_z=z):
                self.pointer = (x, y)
                self.wheel -= z
            case Motion(rel_x=dx, rel_y=dy, rel_z=z):
                self.pointer = (self.pointer[0] + dx, self.pointer[1] + dy)
                self.wheel -= z
            case MtDown(contact_id=slot, abs_x=x, abs_y=y) | MtMotion(
                contact_id=slot, abs_x=x, abs_y=y
            ):
                self.contacts[slot] = (x, y)
            case MtUp(contact_id=slot):
                self.contacts.pop(slot, None)

    def take_events(self) -> list[InEvent]:
        """The events recorded so far, and forget them."""
        events, self.events = self.events, []
        return events

    def read_page_now(self) -> None:
        """Read the page as an interrupt would, whatever ``consume`` says (a guest that
        starts reading again)."""
        self._input_handler()

    # --- unload -----------------------------------------------------------------------------

    async def _remove(self) -> None:
        """``xenkbd_remove`` + xenbus: unbind, end access, free the page; then Closed.

        The driver is off XenBus by then: backend state changes are no longer handled."""
        self._watch_scope.cancel()
        dom, evtchn = self._domain, self._evtchn
        if evtchn is not None and self.port:
            with contextlib.suppress(OSError):
                evtchn.unbind(self.port)
        if self._consumer is not None:
            self._consumer.release()
            self._consumer = None
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None
        with contextlib.suppress(XenStoreError, OSError):
            await self._switch_state(XenbusState.CLOSED)
        # Linux's end of access is deferred while the backend still maps the page (it
        # unmaps once it sees us Closed): retried for a while, as its deferred list does.
        if dom is not None and self.gref:
            with trio.move_on_after(END_ACCESS_WAIT_S):
                while True:
                    try:
                        dom.end_access(self.gref)
                        break
                    except OSError:
                        await trio.sleep(0.01)
