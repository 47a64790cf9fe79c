"""One guest's vdispl device and the connection it brings up and down.

:class:`GuestDevice` is a :class:`~displback.backend.xenbusdev.XenbusDevice` (the handshake's
I/O, shared with the vkbd device) whose connection is a vdispl :class:`Connection`.

A :class:`Connection` is one connected period: the rings and event pages of every connector
mapped, their channels bound, a buffer store, one :class:`~displback.backend.connector.
Connector` task per connector and one task reading the event-channel device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import trio

from displback.backend.buffers import BufferStore, ZeroCopyPolicy
from displback.backend.connector import Connector
from displback.backend.copies import CopyWorkers
from displback.backend.deferred import DeferredReleases
from displback.backend.outputs import OutputProvider
from displback.backend.quotas import LimitOverrides, Limits, Quota
from displback.backend.retained import RetainedMemory
from displback.backend.xenbusdev import XenbusDevice, XenbusStatus, unbind_quietly
from displback.display.interface import DisplayError, Output
from displback.protocol import layout
from displback.protocol.constants import LINUX_MAX_CONNECTORS
from displback.protocol.evtpage import EventProducer
from displback.protocol.layout import FrontendConfig
from displback.protocol.ring import BackRing
from displback.protocol.trust import TrustRule, UntrustedNode
from displback.xen.interfaces import EventChannels, GrantDevice, GrantMapping, Platform
from displback.xenstore.client import Perm, Transaction, XenStoreClient
from displback.xenstore.wire import XenStoreError

__all__ = ["BackendSettings", "Connection", "GuestDevice"]

#: How often teardown looks whether a flip still in flight has landed (outputs have no event
#: for it; this runs only at teardown, for at most one vblank).
_FLIP_SETTLE_POLL_S = 0.002


@dataclass(frozen=True)
class BackendSettings:
    """What an admin tunes (TOML keys of the same names)."""

    zero_copy: ZeroCopyPolicy = ZeroCopyPolicy.AUTO
    wait_free_ms: int = 2000
    limits: Limits | None = None  # None: derived from the guest's connectors
    #: Limits an admin fixed ([limits] in the configuration), for all or for one guest.
    limit_overrides: LimitOverrides = field(default_factory=LimitOverrides)
    teardown_timeout_s: float = 5.0
    #: Worker threads for copy-mode copies and buffer creations, daemon-wide (None: the CPUs
    #: this process may use; see displback.backend.copies).
    copy_workers: int | None = None
    #: vkbd: most input events waiting for a guest that does not read (backend/vkbd.py),
    #: and the pointer's space for a vkbd with no connector to follow.
    input_queue: int = 256
    input_size: tuple[int, int] = (1024, 768)


@dataclass
class DeviceStatus(XenbusStatus):
    """A vdispl device's status: the common fields and its connectors and buffers."""

    connectors: list[Connector] = field(default_factory=list)
    store: BufferStore | None = None


class Connection:
    """Everything a connected device holds; built by :meth:`open`, released by :meth:`close`."""

    def __init__(self, device: GuestDevice, config: FrontendConfig) -> None:
        self.device = device
        self.config = config
        self.connectors: list[Connector] = []
        self.store: BufferStore | None = None
        self._stack = contextlib.ExitStack()
        self._evtchn: EventChannels | None = None
        self._outputs: list[Output] = []

    def open(self, transports: tuple[layout.ConnectorTransport, ...]) -> None:
        """Map, bind and build; on error whatever was done is undone by :meth:`close`."""
        dev = self.device
        platform = dev.platform
        evtchn = platform.open_event_channels()
        self._stack.callback(evtchn.close)
        self._evtchn = evtchn
        grants: GrantDevice = platform.open_grant_device()
        # Deferred releases wait on this gntdev (the wait is keyed by fd number *within* the
        # exporting device), so it closes only once they have drained.
        self._stack.callback(dev.deferred.close_device_when_drained, grants)
        # The domain's account: its limits grow with this device's connectors while it is
        # connected; what the guest holds stays charged to the domain past this connection.
        account = dev.account
        account.add_device(dev.devid, [(c.width, c.height) for c in self.config.connectors])
        self._stack.callback(account.remove_device, dev.devid)
        limiter = account.limiter
        outputs: list[Output | None] = []
        for cfg in self.config.connectors:
            output = dev.outputs.acquire(dev.domid, dev.devid, cfg, dev.status.name)
            if output is not None:
                self._outputs.append(output)
                self._stack.callback(dev.outputs.release, output)
            else:
                dev.log.warning("no output for connector", connector=cfg.index)
            outputs.append(output)
        store = BufferStore(
            domid=dev.domid,
            grants=grants,
            dmabufs=platform,
            outputs=[o for o in outputs if o is not None],
            quota=account,
            policy=dev.settings.zero_copy,
            wait_free_ms=dev.settings.wait_free_ms,
            deferred=dev.deferred,
            be_alloc=self.config.be_alloc,
            log=dev.log,
            retained=dev.retained,
            copies=dev.copies,
        )
        self.store = store
        for cfg, transport, output in zip(self.config.connectors, transports, outputs, strict=True):
            ring_map = self._map_page(grants, transport.req_ring_ref)
            evt_map = self._map_page(grants, transport.evt_ring_ref)
            ring = BackRing(ring_map.buffer)
            self._stack.callback(ring.release)
            events = EventProducer(evt_map.buffer)
            self._stack.callback(events.release)
            req_port = evtchn.bind_interdomain(dev.domid, transport.req_evtchn)
            self._stack.callback(unbind_quietly, evtchn, req_port)
            evt_port = evtchn.bind_interdomain(dev.domid, transport.evt_evtchn)
            self._stack.callback(unbind_quietly, evtchn, evt_port)
            self.connectors.append(
                Connector(
                    config=cfg,
                    ring=ring,
                    events=events,
                    evtchn=evtchn,
                    req_port=req_port,
                    evt_port=evt_port,
                    buffers=store,
                    output=output,
                    limiter=limiter,
                    on_violation=dev.report_violation,
                    log=dev.log.bind(connector=cfg.index),
                )
            )

    def _map_page(self, grants: GrantDevice, gref: int) -> GrantMapping:
        mapping = grants.map_grants(self.device.domid, [gref], writable=True)
        self._stack.callback(mapping.close)
        return mapping

    async def serve(self) -> None:
        """Run every connector and the event-channel reader until cancelled."""
        assert self._evtchn is not None
        evtchn = self._evtchn
        by_port = {c.req_port: c for c in self.connectors}
        # The guest never needs to signal an event page's port (we only notify through it,
        # which our mask does not affect): once it fired it stays masked, so a guest firing
        # it in a loop costs one wake-up, not one per notification.
        evt_ports = {c.evt_port for c in self.connectors}
        async with trio.open_nursery() as nursery:
            for connector in self.connectors:
                nursery.start_soon(connector.run)
                connector.kick()  # requests may already wait in the ring
            while True:
                await trio.lowlevel.wait_readable(evtchn.fileno())
                fired = evtchn.read_pending()
                stray = []
                for port in fired:
                    target = by_port.get(port)
                    if target is not None:
                        target.kick()  # the connector unmasks once drained (or throttled)
                    elif port not in evt_ports:
                        stray.append(port)
                if stray:
                    evtchn.unmask(stray)

    async def close(self) -> None:
        """Release everything: outputs dark first, then buffers (their grants may wait),
        then rings and ports.

        An output is handed back only once no flip of ours is in flight on it: a flip whose
        task was cancelled by the teardown still lands at the next vblank, and the output's
        next holder (often this guest reconnecting at once) would otherwise meet
        ``FlipPending`` on its first SET_CONFIG and fail it. A guest that went away leaves a
        dark output, not its last frame; dark before the buffers go, so releasing a frame
        that was on screen copies nothing (it made the output keep a copy, up to 32 MiB on
        the event loop, only to turn it off).
        """
        try:
            for output in self._outputs:
                while output.flip_pending:
                    await trio.sleep(_FLIP_SETTLE_POLL_S)
                if output.enabled:
                    with contextlib.suppress(DisplayError):
                        await output.disable()
            if self.store is not None:
                await self.store.aclose()
        finally:
            self._stack.close()


class GuestDevice(XenbusDevice[Connection, DeviceStatus]):
    """The backend side of vdispl device ``devid`` of guest ``domid``."""

    def __init__(
        self,
        *,
        xs: XenStoreClient,
        platform: Platform,
        domid: int,
        devid: int,
        outputs: OutputProvider,
        settings: BackendSettings,
        deferred: DeferredReleases,
        account: Quota | None = None,
        retained: RetainedMemory | None = None,
        copies: CopyWorkers | None = None,
        log: Any = None,
    ) -> None:
        super().__init__(
            xs=xs,
            platform=platform,
            domid=domid,
            devid=devid,
            backend_dir=layout.backend_dir(platform.domid, domid, devid),
            frontend_dir=layout.frontend_dir(domid, devid),
            status=DeviceStatus(domid, devid),
            teardown_timeout_s=settings.teardown_timeout_s,
            log=log,
        )
        self.outputs = outputs
        self.settings = settings
        self.deferred = deferred
        #: The guest domain's account, shared with its other devices (the daemon's).
        self.account = account if account is not None else Quota(settings.limits, domid=domid)
        #: Where be-alloc memory the guest may still map is kept until the domain dies.
        self.retained = retained
        #: The daemon's copy workers (None: the default of this trio run).
        self.copies = copies

    def _on_connected(self, connection: Connection) -> None:
        self.status.connectors = connection.connectors
        self.status.store = connection.store

    def _on_disconnected(self) -> None:
        self.status.connectors = []
        self.status.store = None

    async def _read_config(self) -> FrontendConfig:
        """The toolstack's configuration nodes with their permissions, read in one
        transaction (what is checked is what is used), and checked by the trust rule."""
        base = self.frontend_dir

        async def read(tx: Transaction) -> tuple[dict[str, bytes | None], dict[str, list[Perm]]]:
            values: dict[str, bytes | None] = {}
            perms: dict[str, list[Perm]] = {}

            async def node(name: str) -> bytes | None:
                try:
                    value = values[name] = await tx.read_or_none(f"{base}/{name}")
                    if value is not None:
                        perms[name] = await tx.get_perms(f"{base}/{name}")
                except XenStoreError as exc:
                    if exc.name != "EACCES":
                        raise
                    raise UntrustedNode(
                        f"{name}: not written by the toolstack: the backend may not read it",
                        what=name,
                    ) from None
                return value

            await node(layout.BE_ALLOC)
            for i in range(LINUX_MAX_CONNECTORS):
                if await node(f"{i}/{layout.RESOLUTION}") is None:
                    break  # the last connector: nothing after a gap is read, as by Linux
                await node(f"{i}/{layout.UNIQUE_ID}")
            return values, perms

        values, perms = await self.xs.run_transaction(read)
        trust = TrustRule(backend_domid=self.platform.domid, guest_domid=self.domid)
        return layout.parse_frontend_config(values, perms, trust)

    async def _connect(self) -> Connection:
        xs = self.xs
        config = await self._read_config()
        read: dict[str, bytes | None] = {}
        for node in layout.transport_nodes(len(config.connectors)):
            read[node] = await xs.read_or_none(f"{self.frontend_dir}/{node}")
        transports = layout.parse_transports(read, len(config.connectors))
        connection = Connection(self, config)
        try:
            connection.open(transports)
        except BaseException:
            await connection.close()
            raise
        self.log.info(
            "connected",
            connectors=[f"{c.width}x{c.height}" for c in config.connectors],
            be_alloc=config.be_alloc,
        )
        return connection

    @property
    def connection(self) -> Connection | None:
        return self._connection
