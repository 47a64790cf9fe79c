"""One guest's vdispl device: the handshake's I/O and the connection it brings up and down.

:class:`GuestDevice` owns a nursery for the device's lifetime. It feeds the sans-I/O
:class:`~displback.protocol.handshake.Handshake` with what XenStore shows (re-read on every
watch event, since events may be coalesced or spurious) and with the outcome of its own work,
and carries out the actions it returns, in order: write our ``state``, connect, tear down,
wake up later, forget. Everything that decides lives in the handshake; this module only does.

A :class:`Connection` is one connected period: the rings and event pages of every connector
mapped, their channels bound, a buffer store, one :class:`~displback.backend.connector.
Connector` task per connector and one task reading the event-channel device. It lives in its
own cancel scope inside the device's nursery: a protocol violation or the guest going away
cancels that scope — never a sibling device — and the connection's ``finally`` releases
everything it holds (bounded in time, shielded from the cancellation that triggered it).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from displback.backend.buffers import BufferStore, ZeroCopyPolicy
from displback.backend.connector import Connector
from displback.backend.copies import CopyWorkers
from displback.backend.deferred import DeferredReleases
from displback.backend.outputs import OutputProvider
from displback.backend.quotas import LimitOverrides, Limits, Quota
from displback.backend.retained import RetainedMemory
from displback.display.interface import DisplayError, Output
from displback.protocol import layout
from displback.protocol.constants import LINUX_MAX_CONNECTORS
from displback.protocol.errors import ProtocolError
from displback.protocol.evtpage import EventProducer
from displback.protocol.handshake import (
    Connect,
    ConnectFailed,
    ConnectSucceeded,
    Forget,
    Handshake,
    Input,
    Observed,
    ProtocolViolation,
    Shutdown,
    Teardown,
    TeardownDone,
    Tick,
    Vanished,
    WakeAt,
    WriteState,
)
from displback.protocol.layout import FrontendConfig
from displback.protocol.ring import BackRing
from displback.protocol.trust import TrustRule, UntrustedNode
from displback.protocol.xenbus import XenbusState, parse_state
from displback.xen.interfaces import EventChannels, GrantDevice, GrantMapping, Platform
from displback.xenstore.client import (
    Perm,
    Transaction,
    XenStoreClient,
    XenStoreConnectionError,
)
from displback.xenstore.wire import XenStoreError

__all__ = ["BackendSettings", "Connection", "GuestDevice"]

_OBSERVE = object()
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


@dataclass
class DeviceStatus:
    """What ``displback status``, the demo and the logs show about a device.

    ``state`` is the handshake's phase; ``backend_state``/``frontend_state`` the XenbusState
    names last written by us and last read from the guest; ``name`` the domain's name.
    """

    domid: int
    devid: int
    state: str = "new"
    name: str | None = None
    backend_state: str | None = None
    frontend_state: str | None = None
    connects: int = 0
    violations: int = 0
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
            self._stack.callback(_unbind, evtchn, req_port)
            evt_port = evtchn.bind_interdomain(dev.domid, transport.evt_evtchn)
            self._stack.callback(_unbind, evtchn, evt_port)
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


def _unbind(evtchn: EventChannels, port: int) -> None:
    with contextlib.suppress(OSError):
        evtchn.unbind(port)


class GuestDevice:
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
        self.xs = xs
        self.platform = platform
        self.domid = domid
        self.devid = devid
        self.outputs = outputs
        self.settings = settings
        self.deferred = deferred
        #: The guest domain's account, shared with its other devices (the daemon's).
        self.account = account if account is not None else Quota(settings.limits, domid=domid)
        #: Where be-alloc memory the guest may still map is kept until the domain dies.
        self.retained = retained
        #: The daemon's copy workers (None: the default of this trio run).
        self.copies = copies
        base = log if log is not None else structlog.get_logger("displback.device")
        self.log = base.bind(domid=domid, devid=devid)
        self.backend_dir = layout.backend_dir(platform.domid, domid, devid)
        self.frontend_dir = layout.frontend_dir(domid, devid)
        self.status = DeviceStatus(domid, devid)
        self._handshake = Handshake()
        self._send, self._receive = trio.open_memory_channel[Any](math.inf)
        self._observe_queued = False
        self._offline_seen = False
        self._connection: Connection | None = None
        self._connection_scope: trio.CancelScope | None = None
        self._connection_done: trio.Event | None = None
        self._wake_scope: trio.CancelScope | None = None

    # --- inputs -----------------------------------------------------------------------------

    def _nudge(self) -> None:
        if not self._observe_queued:
            self._observe_queued = True
            self._send.send_nowait(_OBSERVE)

    def _feed(self, event: Input) -> None:
        self._send.send_nowait(event)

    def shutdown(self) -> None:
        """The daemon stops: release everything, tell the guest Closed, end (handshake)."""
        self._feed(Shutdown())

    def report_violation(self, reason: str) -> None:
        """A connector found the guest breaking the protocol: close this device only."""
        self.status.violations += 1
        self.log.warning("protocol violation", reason=reason)
        self._feed(ProtocolViolation(reason))

    async def _observe(self) -> Input | None:
        """What XenStore shows now; None if the connection was lost under the reads (the
        client reconnects and its watches fire again, which observes again)."""
        try:
            return await self._observe_once()
        except XenStoreConnectionError as exc:
            self.log.warning("xenstore connection lost while reading states", error=str(exc))
            return None

    async def _observe_once(self) -> Input:
        self._observe_queued = False
        xs = self.xs
        try:
            # Only the toolstack removes our directory: that alone ends the device.
            if not await xs.exists(self.backend_dir):
                return Vanished()
            backend = parse_state(await xs.read_or_none(f"{self.backend_dir}/{layout.STATE}"))
            online_raw = await xs.read_or_none(f"{self.backend_dir}/{layout.ONLINE}")
        except XenStoreError as exc:
            if exc.name != "EACCES":
                raise
            # A driver domain may not read what is left of a removed guest's tree (xenstored
            # answers EACCES, not ENOENT, under a parent it cannot read): the device is gone.
            return Vanished()
        frontend = await self._frontend_state()
        self.status.frontend_state = frontend.name
        online = online_raw is not None and online_raw.strip() not in (b"", b"0")
        if not online:
            self._offline_seen = True
        elif self._offline_seen:
            # libxl never brings a device it is removing back online: these are the
            # directories of a new device of the same number (detach + attach while we were
            # busy). This one is gone; the daemon serves the new one with a new GuestDevice.
            return Vanished()
        return Observed(frontend=frontend, backend=backend, online=online)

    async def _frontend_state(self) -> XenbusState:
        """The frontend's ``state``; a frontend directory that is gone (or that we may no
        longer read) is a closed frontend.

        The guest may remove its own device directory, and libxl's forced removal (``xl
        destroy``) removes it together with writing Closing to us: neither ends the device,
        whose life is our directory's. Taking them for the device's end made the daemon forget
        the device, find it again at once (our directory still there) and loop, and never
        answer libxl's Closing. A missing ``state`` node reads as Unknown, which the handshake
        treats as closed: one read, no separate look for the directory.
        """
        try:
            return parse_state(await self.xs.read_or_none(f"{self.frontend_dir}/{layout.STATE}"))
        except XenStoreError as exc:
            if exc.name != "EACCES":
                raise
            return XenbusState.CLOSED

    async def _watch(self, path: str) -> None:
        async with self.xs.watch(path) as events:
            async for _ in events:
                self._nudge()

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Drive the handshake until the device is forgotten (its directories are gone)."""
        self.status.name = await self._domain_name()
        self.log.info("device found", name=self.status.name)
        await self._run()

    async def _domain_name(self) -> str | None:
        """The guest domain's name (``/local/domain/<domid>/name``), if we may read it."""
        try:
            raw = await self.xs.read_or_none(f"/local/domain/{self.domid}/name")
        except XenStoreError:
            return None
        if raw is None:
            return None
        # Written by the toolstack, but keep what we show printable and short.
        name = raw[:64].decode("utf-8", "replace")
        return "".join(c if c.isprintable() else "?" for c in name)

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, self.backend_dir)
            nursery.start_soon(self._watch, self.frontend_dir)
            async for item in self._receive:
                event = await self._observe() if item is _OBSERVE else item
                if event is None:
                    continue
                actions = self._handshake.handle(event, trio.current_time())
                self.status.state = self._handshake.phase.value
                for action in actions:
                    if isinstance(action, Forget):
                        self.log.info("device gone")
                        nursery.cancel_scope.cancel()
                        return
                    await self._do(action, nursery)

    async def _do(self, action: Any, nursery: trio.Nursery) -> None:
        match action:
            case WriteState(state=state):
                await self._write_state(state)
            case Connect():
                self._connection_done = trio.Event()
                nursery.start_soon(self._connect_and_serve)
            case Teardown(reason=reason):
                self.log.info("tearing down", reason=reason)
                await self._teardown()
                self._feed(TeardownDone())
            case WakeAt(deadline=deadline):
                if self._wake_scope is not None:
                    self._wake_scope.cancel()
                nursery.start_soon(self._wake_at, deadline)
            case _:  # pragma: no cover - the handshake emits nothing else
                raise AssertionError(f"unknown action {action!r}")

    async def _wake_at(self, deadline: float) -> None:
        with trio.CancelScope() as scope:
            self._wake_scope = scope
            await trio.sleep_until(deadline)
            self._feed(Tick())

    async def _write_state(self, state: XenbusState) -> None:
        writes = layout.backend_state_writes(state)

        async def write(tx: Any) -> bool:
            # Never resurrect a removed device: WRITE would create the missing directory.
            if not await tx.exists(self.backend_dir):
                return False
            for node, value in writes.items():
                await tx.write(f"{self.backend_dir}/{node}", value)
            return True

        try:
            written = await self.xs.run_transaction(write)
        except (XenStoreError, XenStoreConnectionError) as exc:
            # Lost: the next observation shows our state is not what we wrote, and the
            # handshake writes it again.
            self.log.warning("cannot write state", state=state.name, error=str(exc))
            return
        if written:
            self.status.backend_state = state.name
            self.log.info("state", state=state.name)
        self._nudge()

    # --- connection -------------------------------------------------------------------------

    async def _connect_and_serve(self) -> None:
        assert self._connection_done is not None
        done = self._connection_done
        try:
            with trio.CancelScope() as scope:
                self._connection_scope = scope
                try:
                    connection = await self._connect()
                except (ProtocolError, OSError) as exc:
                    self.log.warning("connect failed", error=str(exc))
                    self._feed(ConnectFailed(str(exc)))
                    return
                except Exception as exc:
                    # Unforeseen (a display or platform oddity, a bug): still only a failed
                    # connect, retried after the back-off, never a device left at InitWait.
                    self.log.exception("connect failed unexpectedly")
                    self._feed(ConnectFailed(repr(exc)))
                    return
                self._connection = connection
                self.status.connects += 1
                self.status.connectors = connection.connectors
                self.status.store = connection.store
                self._feed(ConnectSucceeded())
                try:
                    await connection.serve()
                except Exception as exc:
                    # A bug or an unforeseen platform failure ended the connection's tasks.
                    # Leaving it there would keep our state Connected over dead rings (the
                    # guest times out on every request, for good): reset the device instead.
                    self.log.exception("connection failed unexpectedly")
                    self._feed(ProtocolViolation(f"internal error: {exc!r}"))
        finally:
            connection_ = self._connection
            self._connection = None
            if connection_ is not None:
                with trio.move_on_after(self.settings.teardown_timeout_s) as cleanup:
                    cleanup.shield = True
                    await connection_.close()
                if cleanup.cancelled_caught:
                    self.log.error("teardown timed out; resources may remain")
            done.set()

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

    async def _teardown(self) -> None:
        if self._connection_scope is not None:
            self._connection_scope.cancel()
        if self._connection_done is not None:
            await self._connection_done.wait()
        self._connection_scope = None
        self._connection_done = None
        self.status.connectors = []
        self.status.store = None

    @property
    def connection(self) -> Connection | None:
        return self._connection
