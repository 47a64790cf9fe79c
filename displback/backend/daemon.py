"""The backend daemon: finds vdispl and vkbd devices in XenStore and runs a task for each.

:class:`Backend` watches ``/local/domain/<self>/backend/vdispl`` and, whenever it changes,
lists the devices below it: every new ``<frontend domid>/<devid>`` gets a
:class:`~displback.backend.device.GuestDevice` task in the daemon's nursery, which ends by
itself once the device's directories are gone. ``/local/domain/<self>/backend/vinput`` is
watched the same way for vkbd devices (:class:`~displback.backend.vkbd.VkbdDevice`), whose
input comes through the daemon's :class:`~displback.backend.input.InputRouter` (``inputs``).
Devices left by a previous life of the daemon are found the same way; their handshake starts
by closing the stale connection (the guest then re-handshakes), so a restart with guests
running needs nothing special here.

The daemon owns what outlives a device: one account per guest domain
(:mod:`displback.backend.quotas`) and the backend-allocated memory guests may still map
(:mod:`displback.backend.retained`), which it frees when ``@releaseDomain`` fires and the
domain's ``/local/domain/<domid>`` is gone (looked at again every
:data:`DOMAIN_RECHECK_S`, in case a toolstack removes the directory after the watch fired). Kept
memory handed down by a previous run through systemd's fd store is taken back at start, and
kept only for the domain it was granted to: a domain is known by its domid and its UUID
(``/local/domain/<domid>/vm``, believed only with the toolstack's permissions), read before
the domain's first device is served, and for every domain with kept memory at start (before
any device is) and on every look for gone domains. Memory kept for another UUID of a domid
is freed.

Every guest's account charges its be-alloc pages (Dom0 grant entries) to one daemon-wide
:class:`~displback.backend.quotas.GrantBudget` as well (``[limits] dom0_grant_entries``).

An account's limits are what :class:`~displback.backend.quotas.LimitOverrides` fixes for its
domain: by domid at once, by name before the domain's first device is served. The name is
``/local/domain/<domid>/name``, which the toolstack writes inside the domain's home (owner
Dom0, the guest may only read it); it is believed only with such permissions
(:class:`~displback.protocol.trust.TrustRule`), so no guest can take another's limits by
renaming itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
import trio

from displback.backend.copies import CopyWorkers
from displback.backend.deferred import DeferredReleases
from displback.backend.device import BackendSettings, DeviceStatus, GuestDevice
from displback.backend.input import InputRouter
from displback.backend.outputs import OutputProvider
from displback.backend.quotas import GrantBudget, Quota
from displback.backend.retained import KeptMemory, RetainedMemory, parse_uuid
from displback.backend.vkbd import VkbdDevice, VkbdStatus
from displback.protocol import kbdif, layout
from displback.protocol.errors import ProtocolError
from displback.protocol.trust import TrustRule
from displback.systemd.fdstore import FdStore
from displback.xen.interfaces import Platform
from displback.xenstore.client import XenStoreClient, XenStoreConnectionError, open_xenstore
from displback.xenstore.wire import XenStoreError

__all__ = ["DOMAIN_RECHECK_S", "Backend"]

#: How often domains with kept memory are looked at even without ``@releaseDomain``.
DOMAIN_RECHECK_S = 30.0


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
        fdstore: FdStore | None = None,
        inherited: list[tuple[str, int]] | None = None,
        inputs: InputRouter | None = None,
    ) -> None:
        self.platform = platform
        self.outputs = outputs
        self.settings = settings or BackendSettings()
        self.log = log if log is not None else structlog.get_logger("displback")
        self.devices: dict[_Key, GuestDevice] = {}
        #: vkbd devices, and the router joining input sources to them.
        self.input_devices: dict[_Key, VkbdDevice] = {}
        self.inputs = inputs if inputs is not None else InputRouter()
        self.root = layout.backend_root(platform.domid)
        self.input_root = kbdif.backend_root(platform.domid)
        self._ignored: set[str] = set()
        self._stopping = False
        self.deferred: DeferredReleases | None = None
        #: One account per guest domain, shared by all its devices (see quotas.py).
        self.accounts: dict[int, Quota] = {}
        #: Domains whose account has the limits fixed for their name (looked up once).
        self._named: set[int] = set()
        #: Dom0 grant entries all guests' be-alloc memory holds, against one limit.
        self.grant_budget = GrantBudget(self.settings.limit_overrides.dom0_grant_entries)
        #: Backend-allocated memory granted to guests, kept until their domain dies.
        self.retained = RetainedMemory(
            open_grants=lambda: self.platform.open_grant_device(), fdstore=fdstore, log=self.log
        )
        #: Where every guest's copies run: ``settings.copy_workers`` threads, fair by guest.
        self.copies = CopyWorkers(self.settings.copy_workers)
        for kept in self.retained.adopt(inherited or []):
            account = self.account(kept.domid)
            account.force("be_alloc_buffers")
            account.force("be_alloc_pages", kept.npages)

    def statuses(self) -> list[DeviceStatus]:
        """A snapshot of every device's status, in (domid, devid) order."""
        keys = sorted(self.devices, key=lambda k: (k.domid, k.devid))
        return [self.devices[k].status for k in keys]

    def input_statuses(self) -> list[VkbdStatus]:
        """A snapshot of every vkbd device's status, in (domid, devid) order."""
        keys = sorted(self.input_devices, key=lambda k: (k.domid, k.devid))
        return [self.input_devices[k].refresh_status() for k in keys]

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started()`` once the root is watched."""
        # (native=False: frame copies run in Python threads, the C extension not built.)
        self.log.info("copy threads", threads=self.copies.total, native=self.copies.native,
                      flips=self.copies.flips)
        async with open_xenstore(self.platform.xenstore_path) as xs:
            deferred = DeferredReleases(log=self.log)
            self.deferred = deferred
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(deferred.run)
                    # Adopted memory is matched to its domains before any device is served.
                    await self.reap_domains(xs)
                    await nursery.start(self._watch_domains, xs)
                    await nursery.start(self._watch_inputs, xs, nursery)
                    async with xs.watch(self.root) as events:
                        self.log.info("watching", path=self.root)
                        task_status.started()
                        async for _ in events:
                            await self._scan(xs, nursery, deferred)
            finally:
                with trio.CancelScope(shield=True):
                    await deferred.aclose()
                self.retained.close()
                self.copies.close()  # no device is left to copy for

    async def shutdown(self, timeout: float = 10.0) -> bool:
        """The daemon stops: every device releases what it holds, tells its guest Closed and
        is forgotten — through its handshake, the one path a device ends by — and no new
        device is taken on. Returns ``False`` if devices were left after ``timeout`` (their
        tasks are cancelled with the daemon's; the connections still release everything)."""
        self._stopping = True
        for device in self.devices.values():
            device.shutdown()
        for input_device in self.input_devices.values():
            input_device.shutdown()
        with trio.move_on_after(timeout):
            while self.devices or self.input_devices:
                await trio.sleep(0.01)
        left = len(self.devices) + len(self.input_devices)
        if left:
            self.log.warning("devices not closed in time", devices=left)
        return not left

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
        """Serve every device below the root that is not served yet.

        A XenStore connection lost under a request (xenstored restarted, or dropped us) ends
        this scan only: the client reconnects and its watch fires again, which scans again.
        """
        try:
            await self._scan_once(xs, nursery, deferred)
        except XenStoreConnectionError as exc:
            self.log.warning("xenstore connection lost while looking for devices", error=str(exc))

    async def _keys(self, xs: XenStoreClient, root: str) -> list[_Key]:
        """The ``<frontend domid>/<devid>`` directories below ``root``."""
        keys = []
        for dom_name in await self._list(xs, root):
            domid = self._number(dom_name, f"{root}/{dom_name}", layout.parse_domid)
            if domid is None:
                continue
            for dev_name in await self._list(xs, f"{root}/{dom_name}"):
                devid = self._number(dev_name, f"{root}/{dom_name}/{dev_name}", layout.parse_u32)
                if devid is not None:
                    keys.append(_Key(domid, devid))
        return keys

    async def _scan_once(
        self, xs: XenStoreClient, nursery: trio.Nursery, deferred: DeferredReleases
    ) -> None:
        for key in await self._keys(xs, self.root):
            if key in self.devices or self._stopping:
                continue
            account = await self._configured_account(xs, key.domid)
            if key not in self.devices and not self._stopping:  # a scan may have meanwhile
                device = GuestDevice(
                    xs=xs,
                    platform=self.platform,
                    domid=key.domid,
                    devid=key.devid,
                    outputs=self.outputs,
                    settings=self.settings,
                    deferred=deferred,
                    account=account,
                    retained=self.retained,
                    copies=self.copies,
                    log=self.log,
                )
                self.devices[key] = device
                nursery.start_soon(self._run_device, key, device, xs, nursery, deferred)

    async def _watch_inputs(
        self,
        xs: XenStoreClient,
        nursery: trio.Nursery,
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve every vkbd device below ``input_root``, as :meth:`run` serves vdispl's."""
        async with xs.watch(self.input_root) as events:
            task_status.started()
            async for _ in events:
                try:
                    await self._scan_inputs(xs, nursery)
                except XenStoreConnectionError as exc:
                    self.log.warning(
                        "xenstore connection lost while looking for devices", error=str(exc)
                    )

    async def _scan_inputs(self, xs: XenStoreClient, nursery: trio.Nursery) -> None:
        for key in await self._keys(xs, self.input_root):
            if key in self.input_devices or self._stopping:
                continue
            account = await self._configured_account(xs, key.domid)
            if key not in self.input_devices and not self._stopping:
                device = VkbdDevice(
                    xs=xs,
                    platform=self.platform,
                    domid=key.domid,
                    devid=key.devid,
                    router=self.inputs,
                    account=account,
                    queue_limit=self.settings.input_queue,
                    default_size=self.settings.input_size,
                    teardown_timeout_s=self.settings.teardown_timeout_s,
                    log=self.log,
                )
                self.input_devices[key] = device
                nursery.start_soon(self._run_input_device, key, device, xs, nursery)

    async def _run_input_device(
        self, key: _Key, device: VkbdDevice, xs: XenStoreClient, nursery: trio.Nursery
    ) -> None:
        try:
            await device.run()
        except Exception:
            self.log.exception("device failed", domid=key.domid, devid=key.devid, kind="vkbd")
            return
        finally:
            if self.input_devices.get(key) is device:
                del self.input_devices[key]
            self._forget_account(key.domid)
        if not nursery.cancel_scope.cancel_called:
            await self._scan_inputs(xs, nursery)

    def account(self, domid: int) -> Quota:
        """Guest domain ``domid``'s account, made on first use."""
        account = self.accounts.get(domid)
        if account is None:
            overrides = self.settings.limit_overrides.for_guest(domid)
            account = Quota(
                self.settings.limits,
                domid=domid,
                overrides=overrides,
                grant_budget=self.grant_budget,
            )
            self.accounts[domid] = account
        return account

    async def _configured_account(self, xs: XenStoreClient, domid: int) -> Quota:
        """``domid``'s account with the limits fixed for its name too (read once)."""
        account = self.account(domid)
        if domid in self._named:
            return account
        overrides = self.settings.limit_overrides
        name = await self._domain_name(xs, domid) if overrides.by_name else None
        present, uuid = await self._domain_identity(xs, domid)
        if present and uuid is not None:
            self._charge_back(domid, self.retained.identify(domid, uuid))
        account = self.account(domid)  # the account may have been forgotten meanwhile
        if domid not in self._named:
            self._named.add(domid)
            fixed = overrides.for_guest(domid, name)
            if fixed != account.overrides:
                account.configure(fixed)
            if fixed != dict(overrides.common):  # a table of this guest applies: say so
                self.log.info("limits", domid=domid, name=name, **fixed)
        return account

    async def _domain_name(self, xs: XenStoreClient, domid: int) -> str | None:
        """The toolstack's name of ``domid``, or None (unreadable, or not the toolstack's)."""
        path = f"/local/domain/{domid}/name"
        try:
            value = await xs.read(path)
            perms = await xs.get_perms(path)
            reason = TrustRule(self.platform.domid, domid).reason(perms)
            if reason is not None:
                self.log.warning("domain name not trusted", domid=domid, reason=reason)
                return None
            return value.decode()
        except (XenStoreError, UnicodeDecodeError) as exc:
            self.log.warning("cannot read domain name", domid=domid, error=str(exc))
            return None

    async def _domain_identity(self, xs: XenStoreClient, domid: int) -> tuple[bool, str | None]:
        """Whether ``/local/domain/<domid>`` exists, and the domain's UUID from its ``vm``
        node (None: absent, unreadable, malformed or not the toolstack's). A directory we may
        not read (``EACCES``: a driver domain) counts as present: memory is never freed on a
        doubt, and never reused for another domain either (see retained.py)."""
        home = f"/local/domain/{domid}"
        try:
            if not await xs.exists(home):
                return False, None
        except (XenStoreError, XenStoreConnectionError) as exc:  # looked at again later
            if _unexpected(exc, "EACCES"):
                self.log.warning("cannot look for a domain", domid=domid, error=str(exc))
            return True, None
        path = f"{home}/vm"
        try:
            value = await xs.read(path)
            perms = await xs.get_perms(path)
        except (XenStoreError, XenStoreConnectionError) as exc:
            if _unexpected(exc, "ENOENT", "EACCES"):
                self.log.warning("cannot read domain uuid", domid=domid, error=str(exc))
            return True, None
        reason = TrustRule(self.platform.domid, domid).reason(perms)
        if reason is not None:
            self.log.warning("domain uuid not trusted", domid=domid, reason=reason)
            return True, None
        uuid = parse_uuid(value.decode(errors="replace"))
        if uuid is None:
            self.log.warning("domain vm node malformed", domid=domid, value=value[:80])
        return True, uuid

    def _charge_back(self, domid: int, freed: list[KeptMemory]) -> None:
        """Give back the charge of kept memory of ``domid`` that was just freed."""
        if not freed:
            return
        account = self.account(domid)
        account.give("be_alloc_buffers", len(freed))
        account.give("be_alloc_pages", sum(k.npages for k in freed))

    async def _watch_domains(
        self, xs: XenStoreClient, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Free kept memory of every domain that is gone: on ``@releaseDomain`` (and at
        start, when the watch fires once), and every :data:`DOMAIN_RECHECK_S` seconds."""
        async with xs.watch("@releaseDomain") as events:
            task_status.started()
            while True:
                with trio.move_on_after(DOMAIN_RECHECK_S):
                    try:
                        await events.__anext__()
                    except StopAsyncIteration:
                        return
                await self.reap_domains(xs)

    async def reap_domains(self, xs: XenStoreClient) -> list[int]:
        """Free what is kept for domains whose ``/local/domain/<domid>`` is gone, and what is
        kept for an earlier domain of a domid now used by another (another UUID); return the
        domains that are gone."""
        gone = []
        for domid in self.retained.domains():
            present, uuid = await self._domain_identity(xs, domid)
            if present:
                self._charge_back(domid, self.retained.identify(domid, uuid))
                self._forget_account(domid)
                continue
            self._charge_back(domid, self.retained.release_domain(domid))
            self._forget_account(domid)
            gone.append(domid)
        return gone

    def _forget_account(self, domid: int) -> None:
        """Drop an idle account once no device of its domain is left."""
        account = self.accounts.get(domid)
        if account is None or not account.idle:
            return
        if all(key.domid != domid for key in [*self.devices, *self.input_devices]):
            del self.accounts[domid]
            self._named.discard(domid)

    async def _forget_once_drained(self, domid: int, deferred: DeferredReleases) -> None:
        await deferred.wait_drained(domid)
        self._forget_account(domid)

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
            if key.domid in self.accounts and deferred.pending(key.domid):
                # Buffers of the domain still wait for an importer (WAIT_FREE ran out):
                # their release, not the device's end, leaves the account idle.
                nursery.start_soon(self._forget_once_drained, key.domid, deferred)
        # The device was forgotten. A new device of the same number may already exist (the
        # toolstack detached and attached again): its watch event found this one still
        # here, so look again now that the number is free.
        if not nursery.cancel_scope.cancel_called:
            await self._scan(xs, nursery, deferred)


def _unexpected(exc: XenStoreError | XenStoreConnectionError, *expected: str) -> bool:
    """Whether a failed look deserves a warning: a lost connection always, an error answer
    unless its name is one of ``expected``."""
    return not isinstance(exc, XenStoreError) or exc.name not in expected
