"""One guest's vkbd device (Xen's kbdif, Linux's ``xen-kbdfront``): input into the guest.

:class:`VkbdDevice` is a :class:`~displback.backend.xenbusdev.XenbusDevice` for a backend
directory under ``/local/domain/<self>/backend/vinput`` (xl.cfg ``vkb = ['backend-type=linux']``;
``backend/vkbd`` is QEMU's). Its handshake is vdispl's with one difference, ``xen-kbdfront``
going Connected on our InitWait (``Handshake.frontend_connects_first``).

Before InitWait we write the features the toolstack left out (``feature-abs-pointer``,
``feature-multi-touch``, ``width``/``height`` and ``multi-touch-*``: the guest connector's
resolution; :func:`~displback.protocol.kbdif.backend_feature_writes`) — Linux reads them once,
when it probes. A connection (:class:`VkbdConnection`) maps the guest's page by its grant
``page-gref`` (a guest offering only the obsolete ``page-ref``, a frame number, is refused:
mapping a guest frame by number takes a privileged foreign mapping this daemon never makes),
binds ``event-channel``, and binds a :class:`VkbdSink` to the guest connector it serves in the
daemon's :class:`~displback.backend.input.InputRouter`.

Which connector: vkbd device ``d`` of domain ``F`` serves connector ``F/0/d`` (connector ``d``
of the guest's vdispl device 0); pointer and touch coordinates arrive in that connector's
pixels (its toolstack-written resolution, or ``BackendSettings.input_size`` without one) and
are scaled to the ranges the guest was told.

The queue, and what a guest that does not read costs
----------------------------------------------------
Events wait in the sink's queue until the page has room; the publisher writes as many as
fit, publishes ``in_prod`` once and notifies. ``xen-kbdfront`` notifies us after consuming,
so the port is unmasked exactly while events wait (a guest notifying in a loop otherwise
costs nothing: the port stays masked), and the queue is also retried every
:data:`RETRY_S` while not empty. At most ``BackendSettings.input_queue`` events wait: beyond
that the **newest** are dropped and counted (``dropped``), after coalescing pointer motion
into the event at the queue's tail — except the releases of keys, buttons and contacts the
guest has seen pressed, which always go in (at most one per held key or contact, so the queue
stays bounded), so a guest that catches up is never left with a stuck key.

Linux hazards the sink avoids: ``xen-kbdfront`` tests a key code against the bitmaps of both
of its devices without a bound check or a NULL check, so codes outside 1..0x2ff are never
sent, and key events are sent only while both the keyboard and the pointer exist
(``feature-disable-*`` unset); buttons (``BTN_LEFT`` … ``BTN_TASK``, the pointer's own bits,
tested first) need only the pointer.
"""

from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from displback.backend.input import InputRouter, InputTarget
from displback.backend.quotas import Quota
from displback.backend.xenbusdev import XenbusDevice, XenbusStatus, unbind_quietly
from displback.protocol import kbdif, layout
from displback.protocol.errors import ProtocolError
from displback.protocol.handshake import Handshake
from displback.protocol.kbdif import (
    BackendConfig,
    FrontendTransport,
    InEvent,
    InEventProducer,
    Key,
    Motion,
    MtDown,
    MtMotion,
    MtSyn,
    MtUp,
    Position,
)
from displback.protocol.trust import TrustRule
from displback.protocol.xenbus import XenbusState
from displback.xen.interfaces import EventChannels, GrantDevice, GrantMapping, Platform
from displback.xenstore.client import Transaction, XenStoreClient
from displback.xenstore.wire import XenStoreError

__all__ = ["RETRY_S", "VkbdConnection", "VkbdDevice", "VkbdSink", "VkbdStatus"]

#: How often events waiting for room are retried without a notification from the guest.
RETRY_S: Final = 0.05
#: The pointer's buttons in ``xen-kbdfront`` (``BTN_LEFT`` … ``BTN_TASK``).
POINTER_BUTTONS: Final = range(0x110, 0x118)
BTN_LEFT: Final = 0x110


@dataclass
class VkbdStatus(XenbusStatus):
    """A vkbd device's status: the common fields, what it serves and its queue's counters."""

    target: str = ""
    mode: str = ""
    queued: int = 0
    published: int = 0
    dropped: int = 0
    sink: VkbdSink | None = field(default=None, repr=False)


class VkbdSink:
    """The guest's input while it is connected: an :class:`~displback.display.input.
    InputSink` that queues kbdif events (see the module docstring for the rules)."""

    def __init__(
        self,
        config: BackendConfig,
        transport: FrontendTransport,
        space: tuple[int, int],
        *,
        limit: int,
        on_queued: Any = None,
    ) -> None:
        self.config = config
        self._space = space
        self.limit = limit
        self.abs_mode = config.pointer and config.abs_pointer and transport.abs_pointer
        self.mt_mode = config.multi_touch and transport.multi_touch
        self.queue: collections.deque[InEvent] = collections.deque()
        self.queued = 0
        self.dropped = 0
        self._on_queued = on_queued
        self._held: set[int] = set()
        self._contacts: dict[int, int] = {}  # source id -> guest slot
        self._touched = False  # MT events since the last SYN
        self._forced_since_syn = False
        self._emulated: int | None = None  # the contact driving the pointer without MT
        self._pos = (0, 0)  # the pointer in the guest's range

    @property
    def mode(self) -> str:
        pointer = "abs" if self.abs_mode else "rel"
        return f"{pointer}+mt" if self.mt_mode else pointer

    @property
    def space(self) -> tuple[int, int] | None:
        return self._space

    # -- scaling ------------------------------------------------------------------------------

    def _scale(self, x: float, y: float, width: int, height: int) -> tuple[int, int]:
        sw, sh = self._space
        return _clamp(round(x * width / sw), width), _clamp(round(y * height / sh), height)

    # -- the queue ----------------------------------------------------------------------------

    def _put(self, event: InEvent, *, force: bool = False) -> bool:
        queue = self.queue
        if queue and _coalesce(queue, event):
            self._queued_one()
            return True
        if len(queue) >= self.limit and not force:
            self.dropped += 1
            return False
        queue.append(event)
        self._queued_one()
        return True

    def _queued_one(self) -> None:
        self.queued += 1
        if self._on_queued is not None:
            self._on_queued()

    # -- InputSink ----------------------------------------------------------------------------

    def key(self, code: int, pressed: bool) -> None:
        if code in POINTER_BUTTONS:
            self.button(code, pressed)
            return
        if not (self.config.keyboard and self.config.pointer) or code not in kbdif.KEY_CODES:
            self.dropped += 1
            return
        self._press(code, pressed)

    def button(self, code: int, pressed: bool) -> None:
        if not self.config.pointer or code not in POINTER_BUTTONS:
            self.dropped += 1
            return
        self._press(code, pressed)

    def _press(self, code: int, pressed: bool) -> None:
        if pressed:
            if self._put(Key(code, True)):
                self._held.add(code)
        elif code in self._held:
            self._held.discard(code)
            self._put(Key(code, False), force=True)
        else:
            self._put(Key(code, False))

    def pointer_absolute(self, x: float, y: float) -> None:
        if not self.config.pointer:
            self.dropped += 1
            return
        pos = self._scale(x, y, self.config.width, self.config.height)
        self._move_to(pos, 0)

    def _move_to(self, pos: tuple[int, int], rel_z: int) -> None:
        old, self._pos = self._pos, pos
        if self.abs_mode:
            self._put(Position(pos[0], pos[1], rel_z))
        else:
            self._put(Motion(pos[0] - old[0], pos[1] - old[1], rel_z))

    def pointer_relative(self, dx: int, dy: int, dz: int = 0) -> None:
        if not self.config.pointer:
            self.dropped += 1
            return
        if self.abs_mode:
            x, y = self._pos
            pos = (_clamp(x + dx, self.config.width), _clamp(y + dy, self.config.height))
            self._move_to(pos, -dz)
        else:
            self._pos = (self._pos[0] + dx, self._pos[1] + dy)
            self._put(Motion(dx, dy, -dz))

    def touch_down(self, contact: int, x: float, y: float) -> None:
        if not self.mt_mode:
            if self._emulated is None and self.config.pointer:
                self._emulated = contact
                self.pointer_absolute(x, y)
                self.button(BTN_LEFT, True)
            return
        if contact in self._contacts:
            self.touch_motion(contact, x, y)
            return
        free = set(range(self.config.contacts)) - set(self._contacts.values())
        if not free:
            self.dropped += 1
            return
        slot = min(free)
        mx, my = self._scale(x, y, self.config.mt_width, self.config.mt_height)
        if self._put(MtDown(slot, mx, my)):
            self._contacts[contact] = slot
            self._touched = True

    def touch_motion(self, contact: int, x: float, y: float) -> None:
        if not self.mt_mode:
            if contact == self._emulated:
                self.pointer_absolute(x, y)
            return
        slot = self._contacts.get(contact)
        if slot is None:
            return
        mx, my = self._scale(x, y, self.config.mt_width, self.config.mt_height)
        if self._put(MtMotion(slot, mx, my)):
            self._touched = True

    def touch_up(self, contact: int) -> None:
        if not self.mt_mode:
            if contact == self._emulated:
                self._emulated = None
                self.button(BTN_LEFT, False)
            return
        slot = self._contacts.pop(contact, None)
        if slot is None:
            return
        self._put(MtUp(slot), force=True)
        self._touched = True
        self._forced_since_syn = True

    def frame(self) -> None:
        if self._touched and self._put(MtSyn(), force=self._forced_since_syn):
            self._touched = False
            self._forced_since_syn = False

    def release_all(self) -> None:
        for code in sorted(self._held):
            self._press(code, False)
        for contact in list(self._contacts):
            self.touch_up(contact)
        if self._emulated is not None:
            self.touch_up(self._emulated)
        self.frame()


def _clamp(value: int, top: int) -> int:
    return min(max(value, 0), top)


def _coalesce(queue: collections.deque[InEvent], event: InEvent) -> bool:
    """Fold pointer motion into the motion at the tail (the guest sees the same end
    position, sooner); True if ``event`` was folded in."""
    tail = queue[-1]
    if getattr(event, "rel_z", 1) or getattr(tail, "rel_z", 1):
        return False  # a wheel step is its own event; keys and touches never fold
    if isinstance(event, Position) and isinstance(tail, Position):
        queue[-1] = event
        return True
    if isinstance(event, Motion) and isinstance(tail, Motion):
        queue[-1] = Motion(tail.rel_x + event.rel_x, tail.rel_y + event.rel_y)
        return True
    return False


class VkbdConnection:
    """One connected period: the page mapped, the channel bound, the sink routed."""

    def __init__(self, device: VkbdDevice) -> None:
        self.device = device
        self._stack = contextlib.ExitStack()
        self._wake = trio.Event()
        self.sink: VkbdSink | None = None
        self.producer: InEventProducer | None = None
        self._evtchn: EventChannels | None = None
        self._port = 0
        self._masked = False  # a port is bound unmasked (and pending once)
        self.published = 0

    def _kick(self) -> None:
        self._wake.set()

    def open(
        self, config: BackendConfig, transport: FrontendTransport, name: str | None = None
    ) -> None:
        """Map, bind and route; on error whatever was done is undone by :meth:`close`."""
        dev = self.device
        if transport.page_gref is None:
            raise ProtocolError(
                f"the guest offers only {kbdif.PAGE_REF} (a frame number), no "
                f"{kbdif.PAGE_GREF}: mapping a guest frame by number needs a privileged "
                "foreign mapping, which displback does not make",
                what=kbdif.PAGE_GREF,
            )
        evtchn = dev.platform.open_event_channels()
        self._stack.callback(evtchn.close)
        self._evtchn = evtchn
        grants: GrantDevice = dev.platform.open_grant_device()
        self._stack.callback(grants.close)
        # The page is guest memory mapped in Dom0: charged to the guest's account.
        dev.account.force("pages", 1)
        self._stack.callback(dev.account.give, "pages", 1)
        page: GrantMapping = grants.map_grants(dev.domid, [transport.page_gref], writable=True)
        self._stack.callback(page.close)
        producer = InEventProducer.resume(page.buffer)
        self._stack.callback(producer.release)
        self.producer = producer
        self._port = evtchn.bind_interdomain(dev.domid, transport.event_channel)
        self._stack.callback(unbind_quietly, evtchn, self._port)
        sink = VkbdSink(
            config,
            transport,
            dev.space,
            limit=dev.queue_limit,
            on_queued=self._kick,
        )
        self.sink = sink
        self._stack.callback(dev.router.bind(dev.target, sink, name=name))

    async def serve(self) -> None:
        """Publish queued events as the page has room, until cancelled."""
        assert self._evtchn is not None and self.sink is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_notifications)
            while True:
                timeout = RETRY_S if self.sink.queue else math.inf
                with trio.move_on_after(timeout):
                    await self._wake.wait()
                self._wake = trio.Event()
                try:
                    self._publish()
                except ProtocolError as exc:
                    self.device.report_violation(str(exc))
                    await trio.sleep_forever()

    def _publish(self) -> None:
        sink, producer, evtchn = self.sink, self.producer, self._evtchn
        assert sink is not None and producer is not None and evtchn is not None
        if sink.queue:
            room = min(producer.free(), len(sink.queue))
            written = producer.put([sink.queue[n] for n in range(room)])
            for _ in range(written):
                sink.queue.popleft()
            if written:
                self.published += written
                evtchn.notify(self._port)
        if sink.queue and self._masked:
            # The guest tells us when it has read (xen-kbdfront notifies after consuming).
            self._masked = False
            evtchn.unmask([self._port])

    async def _read_notifications(self) -> None:
        evtchn = self._evtchn
        assert evtchn is not None
        while True:
            await trio.lowlevel.wait_readable(evtchn.fileno())
            fired = evtchn.read_pending()
            if self._port in fired:
                self._masked = True  # stays masked until events wait for room again
                self._wake.set()
            stray = [p for p in fired if p != self._port]
            if stray:
                evtchn.unmask(stray)

    async def close(self) -> None:
        self._stack.close()


class VkbdDevice(XenbusDevice[VkbdConnection, VkbdStatus]):
    """The backend side of vkbd device ``devid`` of guest ``domid``."""

    def __init__(
        self,
        *,
        xs: XenStoreClient,
        platform: Platform,
        domid: int,
        devid: int,
        router: InputRouter,
        account: Quota,
        kind: str = kbdif.BACKEND_KINDS[0],
        queue_limit: int = 256,
        default_size: tuple[int, int] = (1024, 768),
        teardown_timeout_s: float = 5.0,
        log: Any = None,
    ) -> None:
        super().__init__(
            xs=xs,
            platform=platform,
            domid=domid,
            devid=devid,
            backend_dir=kbdif.backend_dir(platform.domid, domid, devid, kind),
            frontend_dir=kbdif.frontend_dir(domid, devid),
            status=VkbdStatus(domid, devid),
            teardown_timeout_s=teardown_timeout_s,
            handshake=Handshake(frontend_connects_first=True),
            log=(log.bind(device="vkbd") if log is not None else None),
        )
        self.router = router
        self.account = account
        self.queue_limit = queue_limit
        self.default_size = default_size
        self.target = InputTarget(domid, 0, devid)
        self.status.target = str(self.target)
        #: The connector's resolution coordinates arrive in (read before InitWait).
        self.space = default_size
        self._base = (0, 0, 0)
        self._live: VkbdConnection | None = None

    # --- XenbusDevice ---------------------------------------------------------------------

    async def _state_writes(self, tx: Transaction, state: XenbusState) -> dict[str, bytes]:
        writes = {layout.STATE: state.encode()}
        if state is not XenbusState.INIT_WAIT:
            return writes
        self.space = await self._connector_size(tx)
        read = {n: await tx.read_or_none(f"{self.backend_dir}/{n}") for n in
                kbdif.BACKEND_CONFIG_NODES}
        try:
            features = kbdif.backend_feature_writes(read, self.space)
        except ProtocolError as exc:
            # The connect that follows reads the same value and fails with this reason.
            self.log.error("bad toolstack value in the backend directory", error=str(exc))
            return writes
        return {**features, **writes}

    async def _connector_size(self, tx: Transaction) -> tuple[int, int]:
        """The resolution of the connector this device serves, as the toolstack wrote it
        (believed only with the toolstack's permissions), else ``default_size``."""
        path = f"{layout.connector_dir(self.domid, 0, self.target.connector)}/{layout.RESOLUTION}"
        try:
            value = await tx.read_or_none(path)
            if value is None:
                return self.default_size
            TrustRule(self.platform.domid, self.domid).check(path, await tx.get_perms(path))
            return layout.parse_resolution(value, what=path)
        except (XenStoreError, ProtocolError) as exc:
            self.log.warning("connector size not usable", path=path, error=str(exc))
            return self.default_size

    async def _connect(self) -> VkbdConnection:
        xs = self.xs
        read = {n: await xs.read_or_none(f"{self.backend_dir}/{n}") for n in
                kbdif.BACKEND_CONFIG_NODES}
        config = kbdif.parse_backend_config(read)
        read = {n: await xs.read_or_none(f"{self.frontend_dir}/{n}") for n in
                kbdif.FRONTEND_TRANSPORT_NODES}
        transport = kbdif.parse_frontend_transport(read)
        name = await self._trusted_name()
        connection = VkbdConnection(self)
        try:
            connection.open(config, transport, name)
        except BaseException:
            await connection.close()
            raise
        assert connection.sink is not None
        self.log.info(
            "connected",
            target=str(self.target),
            mode=connection.sink.mode,
            range=f"{config.width}x{config.height}",
            space=f"{self.space[0]}x{self.space[1]}",
        )
        return connection

    async def _trusted_name(self) -> str | None:
        """The domain's name if the toolstack wrote it (sources configured by name follow
        it; a name the guest could have written would let it take another's input)."""
        path = f"/local/domain/{self.domid}/name"
        try:
            raw = await self.xs.read_or_none(path)
            if raw is None:
                return None
            reason = TrustRule(self.platform.domid, self.domid).reason(
                await self.xs.get_perms(path)
            )
        except XenStoreError:
            return None
        if reason is not None:
            self.log.warning("domain name not trusted", reason=reason)
            return None
        return raw.decode("utf-8", "replace")

    def _on_connected(self, connection: VkbdConnection) -> None:
        self.status.sink = connection.sink
        self.status.mode = connection.sink.mode if connection.sink is not None else ""
        self._live = connection

    def _on_disconnected(self) -> None:
        self.refresh_status()
        self._base = (self.status.queued, self.status.published, self.status.dropped)
        self._live = None
        self.status.sink = None
        self.status.mode = ""

    def refresh_status(self) -> VkbdStatus:
        """The status with its counters (every connection's, the live one's included)."""
        queued, published, dropped = self._base
        live = self._live
        if live is not None and live.sink is not None:
            queued += live.sink.queued
            published += live.published
            dropped += live.sink.dropped
        self.status.queued, self.status.published, self.status.dropped = queued, published, dropped
        return self.status

    @property
    def connection(self) -> VkbdConnection | None:
        return self._connection
