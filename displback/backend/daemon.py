"""The backend daemon: finds vdispl devices in XenStore and runs one GuestDevice for each.

:class:`Backend` watches ``/local/domain/<self>/backend/vdispl`` and, whenever it changes,
lists the devices below it: every new ``<frontend domid>/<devid>`` gets a
:class:`~displback.backend.device.GuestDevice` task in the daemon's nursery, which ends by
itself once the device's directories are gone. Devices left by a previous life of the daemon
are found the same way; their handshake starts by closing the stale connection (the guest
then re-handshakes), so a restart with guests running needs nothing special here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
import trio

from displback.backend.deferred import DeferredReleases
from displback.backend.device import BackendSettings, DeviceStatus, GuestDevice
from displback.backend.outputs import OutputProvider
from displback.backend.quotas import Quota
from displback.protocol import layout
from displback.protocol.errors import ProtocolError
from displback.xen.interfaces import Platform
from displback.xenstore.client import XenStoreClient, open_xenstore
from displback.xenstore.wire import XenStoreError

__all__ = ["Backend"]


@dataclass(frozen=True)
class _Key:
    domid: int
    devid: int


class Backend:
    """The daemon's top level: one per Dom0 (or driver domain)."""

    def __init__(
        self,
        platform: Platform,
        outputs: OutputProvider,
        settings: BackendSettings | None = None,
        *,
        log: Any = None,
    ) -> None:
        self.platform = platform
        self.outputs = outputs
        self.settings = settings or BackendSettings()
        self.log = log if log is not None else structlog.get_logger("displback")
        self.devices: dict[_Key, GuestDevice] = {}
        self.root = layout.backend_root(platform.domid)
        self._ignored: set[str] = set()
        self.deferred: DeferredReleases | None = None
        #: One account per guest domain, shared by all its devices (see quotas.py).
        self.accounts: dict[int, Quota] = {}

    def statuses(self) -> list[DeviceStatus]:
        """A snapshot of every device's status, in (domid, devid) order."""
        keys = sorted(self.devices, key=lambda k: (k.domid, k.devid))
        return [self.devices[k].status for k in keys]

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started()`` once the root is watched."""
        async with open_xenstore(self.platform.xenstore_path) as xs:
            deferred = DeferredReleases(log=self.log)
            self.deferred = deferred
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(deferred.run)
                    async with xs.watch(self.root) as events:
                        self.log.info("watching", path=self.root)
                        task_status.started()
                        async for _ in events:
                            await self._scan(xs, nursery, deferred)
            finally:
                with trio.CancelScope(shield=True):
                    await deferred.aclose()

    async def _list(self, xs: XenStoreClient, path: str) -> list[str]:
        try:
            return await xs.directory(path)
        except XenStoreError as exc:
            if exc.name != "ENOENT":
                self.log.warning("cannot list", path=path, error=str(exc))
            return []

    async def _scan(
        self, xs: XenStoreClient, nursery: trio.Nursery, deferred: DeferredReleases
    ) -> None:
        for dom_name in await self._list(xs, self.root):
            domid = self._number(dom_name, f"{self.root}/{dom_name}", layout.parse_domid)
            if domid is None:
                continue
            for dev_name in await self._list(xs, f"{self.root}/{dom_name}"):
                path = f"{self.root}/{dom_name}/{dev_name}"
                devid = self._number(dev_name, path, layout.parse_u32)
                if devid is None:
                    continue
                key = _Key(domid, devid)
                if key not in self.devices:
                    device = GuestDevice(
                        xs=xs,
                        platform=self.platform,
                        domid=domid,
                        devid=devid,
                        outputs=self.outputs,
                        settings=self.settings,
                        deferred=deferred,
                        account=self.account(domid),
                        log=self.log,
                    )
                    self.devices[key] = device
                    nursery.start_soon(self._run_device, key, device, xs, nursery, deferred)

    def account(self, domid: int) -> Quota:
        """Guest domain ``domid``'s account, made on first use."""
        account = self.accounts.get(domid)
        if account is None:
            account = Quota(self.settings.limits, domid=domid)
            self.accounts[domid] = account
        return account

    def _forget_account(self, domid: int) -> None:
        """Drop an idle account once no device of its domain is left."""
        account = self.accounts.get(domid)
        if account is None or not account.idle:
            return
        if all(key.domid != domid for key in self.devices):
            del self.accounts[domid]

    def _number(self, name: str, path: str, parse: Any) -> int | None:
        try:
            return int(parse(name, what=path))
        except ProtocolError as exc:
            if path not in self._ignored:
                self._ignored.add(path)
                self.log.warning("ignoring unexpected node", path=path, error=str(exc))
            return None

    async def _run_device(
        self,
        key: _Key,
        device: GuestDevice,
        xs: XenStoreClient,
        nursery: trio.Nursery,
        deferred: DeferredReleases,
    ) -> None:
        try:
            await device.run()
        except Exception:
            # One device's failure must never take the daemon (and other guests) down.
            self.log.exception("device failed", domid=key.domid, devid=key.devid)
            return
        finally:
            if self.devices.get(key) is device:
                del self.devices[key]
            self._forget_account(key.domid)
        # The device was forgotten. A new device of the same number may already exist (the
        # toolstack detached and attached again): its watch event found this one still
        # here, so look again now that the number is free.
        if not nursery.cancel_scope.cancel_called:
            await self._scan(xs, nursery, deferred)
