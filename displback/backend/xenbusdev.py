"""The XenbusState handshake's I/O for one backend device, whatever its protocol.

:class:`XenbusDevice` owns a nursery for the device's lifetime. It feeds the sans-I/O
:class:`~displback.protocol.handshake.Handshake` with what XenStore shows (re-read on every
watch event, since events may be coalesced or spurious) and with the outcome of its own work,
and carries out the actions it returns, in order: write our ``state``, connect, tear down,
wake up later, forget. Everything that decides lives in the handshake; this module only does.

What a device kind adds (vdispl: :class:`~displback.backend.device.GuestDevice`; vkbd:
:class:`~displback.backend.vkbd.VkbdDevice`) is its directories, what it writes with a state
(:meth:`XenbusDevice._state_writes`) and its connection: :meth:`XenbusDevice._connect`
builds one (a :class:`Served`: everything one connected period holds), which is served in
its own cancel scope inside the device's nursery. A protocol violation or the guest going
away cancels that scope — never a sibling device — and the connection's ``close`` releases
everything it holds (bounded in time, shielded from the cancellation that triggered it).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import structlog
import trio

from displback.protocol import layout
from displback.protocol.errors import ProtocolError
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
from displback.protocol.xenbus import XenbusState, parse_state
from displback.xen.interfaces import EventChannels, Platform
from displback.xenstore.client import Transaction, XenStoreClient, XenStoreConnectionError
from displback.xenstore.wire import XenStoreError

__all__ = ["Served", "XenbusDevice", "XenbusStatus", "unbind_quietly"]

_OBSERVE = object()


@dataclass
class XenbusStatus:
    """What ``displback status``, the demo and the logs show about any device.

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


class Served(Protocol):
    """One connected period of a device: served until cancelled, then closed."""

    async def serve(self) -> None: ...

    async def close(self) -> None: ...


C = TypeVar("C", bound=Served)
S = TypeVar("S", bound=XenbusStatus)


class XenbusDevice(Generic[C, S]):
    """The handshake of device ``devid`` of guest ``domid`` with its backend directory
    ``backend_dir`` and the guest's ``frontend_dir``; subclasses connect."""

    def __init__(
        self,
        *,
        xs: XenStoreClient,
        platform: Platform,
        domid: int,
        devid: int,
        backend_dir: str,
        frontend_dir: str,
        status: S,
        teardown_timeout_s: float,
        handshake: Handshake | None = None,
        log: Any = None,
    ) -> None:
        self.xs = xs
        self.platform = platform
        self.domid = domid
        self.devid = devid
        self.backend_dir = backend_dir
        self.frontend_dir = frontend_dir
        self.status = status
        self.teardown_timeout_s = teardown_timeout_s
        base = log if log is not None else structlog.get_logger("displback.device")
        self.log = base.bind(domid=domid, devid=devid)
        self._handshake = handshake if handshake is not None else Handshake()
        self._send, self._receive = trio.open_memory_channel[Any](math.inf)
        self._observe_queued = False
        self._offline_seen = False
        self._connection: C | None = None
        self._connection_scope: trio.CancelScope | None = None
        self._connection_done: trio.Event | None = None
        self._wake_scope: trio.CancelScope | None = None

    # --- what a device kind provides ---------------------------------------------------------

    async def _connect(self) -> C:
        """Read the guest's nodes, map and bind; raise :class:`ProtocolError` or
        :class:`OSError` (after releasing what was done) if that fails."""
        raise NotImplementedError

    async def _state_writes(self, tx: Transaction, state: XenbusState) -> dict[str, bytes]:
        """The nodes written with our ``state``, in the same transaction."""
        return layout.backend_state_writes(state)

    def _on_connected(self, connection: C) -> None:
        """A connection is up (for the status)."""

    def _on_disconnected(self) -> None:
        """The connection is gone (for the status)."""

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
        async def write(tx: Transaction) -> bool:
            # Never resurrect a removed device: WRITE would create the missing directory.
            if not await tx.exists(self.backend_dir):
                return False
            writes = await self._state_writes(tx, state)
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

    # --- connection ---------------------------------------------------------------------------

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
                self._on_connected(connection)
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
                with trio.move_on_after(self.teardown_timeout_s) as cleanup:
                    cleanup.shield = True
                    await connection_.close()
                if cleanup.cancelled_caught:
                    self.log.error("teardown timed out; resources may remain")
            done.set()

    async def _teardown(self) -> None:
        if self._connection_scope is not None:
            self._connection_scope.cancel()
        if self._connection_done is not None:
            await self._connection_done.wait()
        self._connection_scope = None
        self._connection_done = None
        self._on_disconnected()


def unbind_quietly(evtchn: EventChannels, port: int) -> None:
    """Unbind a connection's port on teardown; one the guest already closed is gone anyway."""
    with contextlib.suppress(OSError):
        evtchn.unbind(port)
