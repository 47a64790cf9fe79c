"""A libxl-like toolstack for the simulation: guest domains and their vdispl and vkb devices.

It writes what libxl (tools/libs/light, Xen 4.17) writes for ``vdispl`` — same nodes, same
owners and permissions, same transactions, same timeouts — so the backend under test meets the
store it would meet under ``xl create`` / ``xl vdispl-attach`` / ``xl vdispl-detach`` /
``xl destroy`` (reference §1). It runs in the simulated xenstored's process and talks to the
store through a domain-0 :class:`~displback.sim.xenstore_tree.Session`, waiting for nodes with
:meth:`~displback.sim.xenstored.XenStored.wait_for`.

* ``create_domain``: ``/vm/<uuid>`` (owner dom0, guest may read) with ``uuid`` and ``name``;
  ``/local/domain/F`` (owner dom0, guest may read) with ``vm`` (``/vm/<uuid>``), ``name``,
  ``domid``, ``cpu``, ``memory``, ``control`` (read-only to the guest, except its ``shutdown``,
  ``feature-*`` and ``sysrq`` nodes), ``device`` (read-only to the guest: libxl 4.17's default;
  guest-owned only with ``xend_suspend_evtchn_compat``) with the guest's
  ``device/suspend/event-channel``, guest-owned ``data``, ``drivers``, ``feature``, ``attr``,
  ``error``; ``/libxl/F`` and ``/libxl/F/device`` (dom0 only); then ``@introduceDomain``.
* ``add_vdispl``: one transaction as libxl__device_generic_add: frontend directory owned by
  the guest and readable by the backend (``backend``, ``backend-id``, ``state`` = 1; the
  connector directories ``i/`` inherit this, so they are the guest's too), ``be-alloc`` and
  per connector ``i/resolution``, ``i/unique-id`` owned by the backend and read-only to the
  guest; the implicitly created ``device/vdispl`` inherits ``device``'s permissions; backend
  directory owned by the backend and readable by the guest (``frontend``, ``frontend-id``,
  ``online`` = 1, ``state`` = 1; its implicit parents are dom0's only); libxl's copy under
  ``/libxl/F/device/vdispl/D``. Then waits (10 s) for the backend to reach InitWait.
* Removal (libxl__initiate_device_generic_remove): one transaction writes ``online`` = 0 and,
  unless the backend is already Closed, ``state`` = 5 — a *forced* removal also removes the
  frontend directory (and its emptied parents) in that same transaction; then up to 10 s
  (LIBXL_DESTROY_TIMEOUT) for the backend's Closed (6); then one transaction removes the
  frontend, libxl and backend directories (libxl__device_destroy). A backend that does not
  close in time gets libxl's error ``unable to remove device with path <backend>``, recorded
  in :attr:`Toolstack.errors` as libxl logs it.
* ``remove_vdispl`` (``xl vdispl-detach``, LIBXL__FORCE_AUTO): an unforced removal; on timeout
  a forced one (another 10 s); on a second timeout the directories are removed anyway and
  ``Unable to remove vdispl with id D`` is logged.
* ``add_vkb`` / ``remove_vkb`` (``vkb = [...]``, ``xl vkb-detach``): libxl's vkb device the same
  way — frontend ``device/vkbd/D``, backend ``backend/vinput/F/D`` (``backend-type=linux``;
  ``backend/vkbd`` for qemu) with the xl.cfg numbers libxl__set_xenstore_vkb writes.
* ``destroy_domain`` (``xl destroy``, also what ``xl shutdown`` and ``xl reboot`` end in once
  the guest is down: libxl__destroy_domid with LIBXL__FORCE_ON): every device removed forced,
  all at once, each waiting up to 10 s; then ``libxl__devices_destroy failed`` if any timed
  out; then ``/vm/<uuid>``, ``/local/domain/F`` and ``/libxl/F`` are removed and
  ``@releaseDomain`` fires (xenstored, once the hypervisor has destroyed the domain). The
  domain is only paused while its devices are removed: a simulated guest keeps running unless
  the test crashed it.
"""

from __future__ import annotations

import errno as _errno
import re
import uuid as uuid_module
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import trio

from displback.sim.xenstore_tree import Session, domain_path
from displback.sim.xenstored import XenStored
from displback.xenstore.wire import Perm, XenStoreError

__all__ = [
    "VdisplConnector",
    "ToolstackError",
    "Toolstack",
    "VdisplConfig",
    "VdisplSpecError",
    "VkbConfig",
    "backend_path",
    "frontend_path",
    "libxl_path",
    "parse_vdispl",
    "parse_vkb",
]

INIT_TIMEOUT = 10.0  # LIBXL_INIT_TIMEOUT
DESTROY_TIMEOUT = 10.0  # LIBXL_DESTROY_TIMEOUT

STATE_CLOSING = b"5"
STATE_CLOSED = b"6"

T = TypeVar("T")


class _AlreadyRemoved(Exception):
    """libxl found no backend ``state``: nothing to wait for."""


class VdisplSpecError(ValueError):
    """An xl.cfg ``vdispl`` string that xl would refuse."""


class ToolstackError(RuntimeError):
    """A toolstack operation failed (unknown domain, backend never reached InitWait, …)."""


def frontend_path(domid: int, devid: int, kind: str = "vdispl") -> str:
    return f"{domain_path(domid)}/device/{kind}/{devid}"


def backend_path(backend_domid: int, domid: int, devid: int, kind: str = "vdispl") -> str:
    return f"{domain_path(backend_domid)}/backend/{kind}/{domid}/{devid}"


def libxl_path(domid: int, devid: int, kind: str = "vdispl") -> str:
    return f"/libxl/{domid}/device/{kind}/{devid}"


@dataclass(frozen=True, slots=True)
class VdisplConnector:
    unique_id: str
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class VdisplConfig:
    """A parsed ``vdispl`` entry; ``backend`` is a domain name or decimal id."""

    connectors: tuple[VdisplConnector, ...]
    backend: str = "Domain-0"
    be_alloc: bool = False


_UNIQUE_ID = re.compile(r"[!-~]+")  # printable, no space
_RESOLUTION = re.compile(r"([0-9]{1,10})x([0-9]{1,10})")


def parse_vdispl(spec: str) -> VdisplConfig:
    """Parse ``backend=Domain-0,be-alloc=0,connectors=id0:1024x768;id1:800x600``."""
    backend = "Domain-0"
    be_alloc = False
    connectors: tuple[VdisplConnector, ...] | None = None
    seen: set[str] = set()
    for item in spec.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise VdisplSpecError(f"vdispl: expected key=value, got {item!r}")
        if key in seen:
            raise VdisplSpecError(f"vdispl: {key!r} given twice")
        seen.add(key)
        if key == "backend":
            if not value:
                raise VdisplSpecError("vdispl: empty backend")
            backend = value
        elif key == "be-alloc":
            if not value.isdigit():
                raise VdisplSpecError(f"vdispl: be-alloc must be an integer, got {value!r}")
            be_alloc = int(value) != 0
        elif key == "connectors":
            connectors = _parse_connectors(value)
        else:
            raise VdisplSpecError(f"vdispl: unknown key {key!r}")
    if not connectors:
        raise VdisplSpecError("vdispl: at least one connector must be given (connectors=...)")
    return VdisplConfig(connectors, backend, be_alloc)


def _parse_connectors(text: str) -> tuple[VdisplConnector, ...]:
    result: list[VdisplConnector] = []
    for entry in text.split(";"):
        unique_id, sep, resolution = entry.partition(":")
        if not sep:
            raise VdisplSpecError(f"vdispl: connector {entry!r} is not <id>:<W>x<H>")
        if _UNIQUE_ID.fullmatch(unique_id) is None or any(c in unique_id for c in ",;:"):
            raise VdisplSpecError(f"vdispl: bad connector id {unique_id!r}")
        match = _RESOLUTION.fullmatch(resolution)
        if match is None:
            raise VdisplSpecError(f"vdispl: bad resolution {resolution!r} (want <W>x<H>)")
        width, height = int(match.group(1)), int(match.group(2))
        if not (0 < width <= 0xFFFFFFFF and 0 < height <= 0xFFFFFFFF):
            raise VdisplSpecError(f"vdispl: resolution {resolution!r} out of range")
        if any(c.unique_id == unique_id for c in result):
            raise VdisplSpecError(f"vdispl: connector id {unique_id!r} used twice")
        result.append(VdisplConnector(unique_id, width, height))
    return tuple(result)


#: Where libxl puts a vkb's backend directory for each ``backend-type``.
VKB_BACKEND_KINDS: Final = {"qemu": "vkbd", "linux": "vinput"}
#: ``vkb`` keys xl passes to libxl as numbers, written to the backend directory as given.
_VKB_NUMBERS: Final = (
    "feature-disable-keyboard",
    "feature-disable-pointer",
    "feature-abs-pointer",
    "feature-raw-pointer",
    "feature-multi-touch",
    "width",
    "height",
    "multi-touch-width",
    "multi-touch-height",
    "multi-touch-num-contacts",
)


@dataclass(frozen=True, slots=True)
class VkbConfig:
    """A parsed ``vkb`` entry: backend, ``backend-type`` and the numbers libxl writes."""

    backend: str = "Domain-0"
    backend_type: str = "linux"
    unique_id: str | None = None
    numbers: tuple[tuple[str, int], ...] = ()


def parse_vkb(spec: str) -> VkbConfig:
    """Parse an xl.cfg ``vkb`` entry: ``backend-type=linux,width=1024,height=768,...``.

    ``backend-type`` defaults to linux here (libxl's default is qemu, which needs a device
    model this simulation does not run)."""
    backend, backend_type, unique_id = "Domain-0", "linux", None
    numbers: dict[str, int] = {}
    for item in filter(None, (i.strip() for i in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise VdisplSpecError(f"vkb: expected key=value, got {item!r}")
        if key == "backend":
            backend = value
        elif key == "backend-type":
            if value not in VKB_BACKEND_KINDS:
                raise VdisplSpecError(f"vkb: unknown backend-type {value!r}")
            backend_type = value
        elif key == "unique-id":
            unique_id = value
        elif key in _VKB_NUMBERS:
            if not value.isdigit() or int(value) > 0xFFFFFFFF:
                raise VdisplSpecError(f"vkb: {key} must be a u32, got {value!r}")
            numbers[key] = int(value)
        else:
            raise VdisplSpecError(f"vkb: unknown key {key!r}")
    return VkbConfig(backend, backend_type, unique_id, tuple(numbers.items()))


class Toolstack:
    """Creates and removes guests' vdispl devices in a :class:`XenStored`, as libxl does."""

    def __init__(
        self,
        xenstored: XenStored,
        *,
        init_timeout: float = INIT_TIMEOUT,
        destroy_timeout: float = DESTROY_TIMEOUT,
    ) -> None:
        self.xenstored = xenstored
        self.init_timeout = init_timeout
        self.destroy_timeout = destroy_timeout
        self._xs: Session = xenstored.session(0)
        #: libxl's ERROR log lines, oldest first (a test asserts there are none).
        self.errors: list[str] = []

    # -- helpers -----------------------------------------------------------------------

    def _transact(self, body: Callable[[int], T]) -> T:
        """Run ``body(tx)`` in a transaction, retrying on EAGAIN as libxl does."""
        while True:
            tx = self._xs.transaction_start()
            try:
                result = body(tx)
            except BaseException:
                self._xs.transaction_end(tx, commit=False)
                raise
            try:
                self._xs.transaction_end(tx, commit=True)
            except XenStoreError as exc:
                if exc.errno == _errno.EAGAIN:
                    continue
                raise
            return result

    def _read(self, path: str, tx: int = 0) -> bytes | None:
        try:
            return self._xs.read(path, tx)
        except XenStoreError as exc:
            if exc.errno == _errno.ENOENT:
                return None
            raise

    def _list(self, path: str, tx: int = 0) -> list[str]:
        try:
            return self._xs.directory(path, tx)
        except XenStoreError as exc:
            if exc.errno == _errno.ENOENT:
                return []
            raise

    def _rm(self, path: str, tx: int) -> None:
        """RM whose ENOENT (missing parent) is ignored, as libxl ignores it."""
        try:
            self._xs.rm(path, tx)
        except XenStoreError as exc:
            if exc.errno != _errno.ENOENT:
                raise

    def _write_with_perms(self, tx: int, path: str, value: str, perms: tuple[Perm, ...]) -> None:
        self._xs.write(path, value.encode(), tx)
        self._xs.set_perms(path, perms, tx)

    def _cleanup(self, tx: int, path: str, stop: str) -> None:
        """Remove ``path``, then each parent left empty, up to (not including) ``stop``
        (libxl__xs_path_cleanup)."""
        self._rm(path, tx)
        parent = path.rsplit("/", 1)[0]
        while parent.startswith(stop + "/") and not self._list(parent, tx):
            self._rm(parent, tx)
            parent = parent.rsplit("/", 1)[0]

    def domid_of(self, name_or_id: str | int) -> int:
        """A domain id from a decimal id or a domain ``name`` (``Domain-0`` is 0)."""
        if isinstance(name_or_id, int):
            return name_or_id
        if name_or_id.isdigit():
            return int(name_or_id)
        for entry in self._list("/local/domain"):
            if entry.isdigit() and self._read(f"/local/domain/{entry}/name") == \
                    name_or_id.encode():
                return int(entry)
        raise ToolstackError(f"no domain named {name_or_id!r}")

    # -- domains -----------------------------------------------------------------------

    def create_domain(
        self,
        domid: int,
        name: str,
        *,
        xend_suspend_evtchn_compat: bool = False,
        uuid: str | None = None,
    ) -> str:
        """The XenStore part of libxl__domain_make (and libxl__build_post's ``domid``) for
        guest ``domid``; fires ``@introduceDomain``.

        Every node gets libxl's permissions (``roperm`` = n0 r<F>, ``rwperm`` = n<F>,
        ``noperm`` = n0); nodes written without them inherit their parent's. In particular
        ``device`` is read-only for the guest — so it cannot re-create a device directory it
        removed — unless ``xend_suspend_evtchn_compat`` (an xl.cfg option, off by default)
        hands ``device`` to the guest as libxl does then. ``/vm/<uuid>`` (roperm) holds
        ``uuid`` and ``name``, and ``/local/domain/F/vm`` names it; ``uuid`` (a new random
        one if not given) is returned."""
        if not 0 < domid < 0x7FF0:
            raise ToolstackError(f"bad guest domain id {domid}")
        uuid = str(uuid_module.UUID(uuid)) if uuid is not None else str(uuid_module.uuid4())
        vm = f"/vm/{uuid}"
        home = domain_path(domid)
        libxl = f"/libxl/{domid}"
        noperm = (Perm(0, "n"),)
        roperm = (Perm(0, "n"), Perm(domid, "r"))
        rwperm = (Perm(domid, "n"),)

        def body(tx: int) -> None:
            xs = self._xs

            def mknod(path: str, perms: tuple[Perm, ...]) -> None:  # libxl__xs_mknod
                xs.write(path, b"", tx)
                xs.set_perms(path, perms, tx)

            self._rm(home, tx)
            mknod(home, roperm)
            self._rm(vm, tx)
            mknod(vm, roperm)
            self._rm(libxl, tx)
            mknod(libxl, noperm)
            mknod(f"{libxl}/device", noperm)
            xs.write(f"{home}/vm", vm.encode(), tx)
            xs.write(f"{home}/name", name.encode(), tx)  # libxl__domain_rename: both names
            xs.write(f"{vm}/name", name.encode(), tx)
            mknod(f"{home}/cpu", roperm)
            mknod(f"{home}/memory", roperm)
            if xend_suspend_evtchn_compat:
                mknod(f"{home}/device", rwperm)
            else:
                mknod(f"{home}/device", roperm)
                mknod(f"{home}/device/suspend/event-channel", rwperm)
            mknod(f"{home}/control", roperm)
            for control in ("shutdown", "feature-poweroff", "feature-reboot",
                            "feature-suspend", "sysrq"):
                mknod(f"{home}/control/{control}", rwperm)
            for sub in ("data", "drivers", "feature", "attr", "error"):
                mknod(f"{home}/{sub}", rwperm)
            xs.write(f"{home}/control/platform-feature-multiprocessor-suspend", b"1", tx)
            xs.write(f"{home}/control/platform-feature-xs_reset_watches", b"1", tx)
            xs.write(f"{libxl}/type", b"pvh", tx)
            xs.write(f"{home}/domid", str(domid).encode(), tx)  # libxl__build_post
            xs.write(f"{vm}/uuid", uuid.encode(), tx)

        self._transact(body)
        self.xenstored.introduce_domain(domid)
        return uuid

    async def destroy_domain(self, domid: int) -> bool:
        """``xl destroy``: remove every vdispl device forced and at once (each waits up to
        10 s for the backend's Closed), remove the domain's directories and fire
        ``@releaseDomain``. Returns ``False`` if a device did not close in time (libxl logs
        it and destroys the domain all the same)."""
        results: list[bool] = []

        async def remove(devid: int, kind: str) -> None:
            results.append(await self._remove_device(domid, devid, force=True, kind=kind))

        async with trio.open_nursery() as nursery:
            for kind in ("vdispl", "vkbd"):
                for devid in self.devices(domid, kind):
                    nursery.start_soon(remove, devid, kind)
        if not all(results):
            self._error(f"Domain {domid}:libxl__devices_destroy failed")

        def body(tx: int) -> None:
            for entry in self._list("/local/domain", tx):
                for backend_kind in ("vdispl", *VKB_BACKEND_KINDS.values()):
                    self._rm(f"/local/domain/{entry}/backend/{backend_kind}/{domid}", tx)
            vm = self._read(f"{domain_path(domid)}/vm", tx)
            if vm is not None and vm.startswith(b"/vm/"):  # devices_destroy_cb
                self._rm(vm.decode(), tx)
            self._rm(domain_path(domid), tx)
            self._rm(f"/libxl/{domid}", tx)

        self._transact(body)
        self.xenstored.release_domain(domid)
        return all(results)

    # -- vdispl devices ----------------------------------------------------------------

    def vdispl_devices(self, domid: int) -> list[int]:
        """Device ids libxl knows for the guest (``/libxl/F/device/vdispl``)."""
        return self.devices(domid, "vdispl")

    def devices(self, domid: int, kind: str) -> list[int]:
        """Device ids of ``kind`` (``vdispl``, ``vkbd``) libxl knows for the guest."""
        return sorted(int(d) for d in self._list(f"/libxl/{domid}/device/{kind}") if d.isdigit())

    async def _generic_add(
        self,
        what: str,
        domid: int,
        backend_domid: int,
        fe: str,
        be: str,
        lx: str,
        *,
        bents: dict[str, str],
        ro_fents: dict[str, str] | None = None,
        timeout: float | None,
    ) -> None:
        """libxl__device_generic_add in one transaction: libxl's own record of the device
        (``lx``), the frontend directory (the guest's, with ``ro_fents`` it may only read) and
        the backend directory (``bents``); then wait for the backend's InitWait."""
        frontend_perms = (Perm(domid, "n"), Perm(backend_domid, "r"))
        ro_frontend_perms = (Perm(backend_domid, "n"), Perm(domid, "r"))
        backend_perms = (Perm(backend_domid, "n"), Perm(domid, "r"))
        fents = {"backend-id": str(backend_domid), "state": "1"}

        def body(tx: int) -> None:
            xs = self._xs
            self._rm(lx, tx)
            xs.write(f"{lx}/frontend", fe.encode(), tx)
            xs.write(f"{lx}/backend", be.encode(), tx)
            self._rm(fe, tx)
            xs.mkdir(fe, tx)
            xs.set_perms(fe, frontend_perms, tx)
            xs.write(f"{fe}/backend", be.encode(), tx)
            for key, value in fents.items():
                self._write_with_perms(tx, f"{fe}/{key}", value, frontend_perms)
            for key, value in (ro_fents or {}).items():
                self._write_with_perms(tx, f"{fe}/{key}", value, ro_frontend_perms)
            self._rm(be, tx)
            xs.mkdir(be, tx)
            xs.set_perms(be, backend_perms, tx)
            xs.write(f"{be}/frontend", fe.encode(), tx)
            for key, value in bents.items():
                xs.write(f"{be}/{key}", value.encode(), tx)
            for key in ("frontend-id", "online", "state"):
                xs.write(f"{lx}/{key}", bents[key].encode(), tx)

        self._transact(body)
        limit = self.init_timeout if timeout is None else timeout
        try:
            await self.xenstored.wait_for(f"{be}/state", _reached_init_wait, timeout=limit)
        except trio.TooSlowError:
            state = self._read(f"{be}/state")
            raise ToolstackError(
                f"{what}: backend state {state!r} did not reach InitWait (2) within {limit} s"
            ) from None

    async def add_vdispl(
        self,
        domid: int,
        spec: str | VdisplConfig,
        *,
        devid: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Create vdispl device ``devid`` (default: the next free one) for guest ``domid`` and
        wait for the backend's InitWait. Returns the device id.

        Raises :class:`VdisplSpecError` for a bad spec and :class:`ToolstackError` if the guest
        does not exist or the backend does not reach state 2 (or beyond) in time; the nodes
        are then left in place, as libxl leaves them."""
        config = parse_vdispl(spec) if isinstance(spec, str) else spec
        backend_domid = self.domid_of(config.backend)
        if self._read(domain_path(domid)) is None:
            raise ToolstackError(f"no guest domain {domid}")
        if devid is None:
            devid = max(self.vdispl_devices(domid), default=-1) + 1
        fe = frontend_path(domid, devid)
        be = backend_path(backend_domid, domid, devid)
        lx = libxl_path(domid, devid)
        ro_fents = {"be-alloc": "1" if config.be_alloc else "0"}
        for index, connector in enumerate(config.connectors):
            ro_fents[f"{index}/resolution"] = f"{connector.width}x{connector.height}"
            ro_fents[f"{index}/unique-id"] = connector.unique_id
        await self._generic_add(
            f"vdispl {devid} of domain {domid}", domid, backend_domid, fe, be, lx,
            bents={"frontend-id": str(domid), "online": "1", "state": "1"},
            ro_fents=ro_fents, timeout=timeout,
        )
        return devid

    async def add_vkb(
        self,
        domid: int,
        spec: str | VkbConfig = "",
        *,
        devid: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Create vkb device ``devid`` (default: the next free one) for guest ``domid`` as
        libxl__device_generic_add does for ``vkb`` (frontend ``device/vkbd/D``; backend
        ``backend/vinput/F/D`` for ``backend-type=linux``, with libxl__set_xenstore_vkb's
        nodes: only the numbers given, non-zero ones) and wait for the backend's InitWait.
        Returns the device id."""
        config = parse_vkb(spec) if isinstance(spec, str) else spec
        backend_domid = self.domid_of(config.backend)
        if self._read(domain_path(domid)) is None:
            raise ToolstackError(f"no guest domain {domid}")
        if devid is None:
            devid = max(self.devices(domid, "vkbd"), default=-1) + 1
        fe = frontend_path(domid, devid, "vkbd")
        be = backend_path(backend_domid, domid, devid, VKB_BACKEND_KINDS[config.backend_type])
        lx = libxl_path(domid, devid, "vkbd")
        bents = {"frontend-id": str(domid), "online": "1", "state": "1"}
        if config.unique_id is not None:
            bents["unique-id"] = config.unique_id
        for key, value in config.numbers:
            if value:  # libxl writes a feature or size only when it is set
                bents[key] = str(value)
        await self._generic_add(
            f"vkb {devid} of domain {domid}", domid, backend_domid, fe, be, lx,
            bents=bents, timeout=timeout,
        )
        return devid

    async def remove_vkb(self, domid: int, devid: int, *, timeout: float | None = None) -> bool:
        """``xl vkb-detach``: as :meth:`remove_vdispl`, for a vkb device."""
        if self._read(f"{libxl_path(domid, devid, 'vkbd')}/backend") is None:
            raise ToolstackError(f"domain {domid} has no vkb device {devid}")
        for force in (False, True):
            if await self._remove_device(domid, devid, force=force, timeout=timeout, kind="vkbd"):
                return True
        self._error(f"Domain {domid}:Unable to remove vkb with id {devid}")
        return False

    async def remove_vdispl(self, domid: int, devid: int, *, timeout: float | None = None) -> bool:
        """Detach vdispl ``devid``: ``online``=0 and ``state``=5 in one transaction, wait for
        state 6, then delete the directories. Returns ``False`` if the backend did not close
        in time (the directories are removed anyway: libxl's forced removal)."""
        if self._read(f"{libxl_path(domid, devid)}/backend") is None:
            raise ToolstackError(f"domain {domid} has no vdispl device {devid}")
        if await self._remove_device(domid, devid, force=False, timeout=timeout):
            return True
        # LIBXL__FORCE_AUTO: "Timeout reached, initiating forced remove".
        if await self._remove_device(domid, devid, force=True, timeout=timeout):
            return True
        self._error(f"Domain {domid}:Unable to remove vdispl with id {devid}")
        return False

    def _error(self, message: str) -> None:
        self.errors.append(f"libxl: error: {message}")

    async def _remove_device(
        self,
        domid: int,
        devid: int,
        *,
        force: bool,
        timeout: float | None = None,
        kind: str = "vdispl",
    ) -> bool:
        """libxl__initiate_device_generic_remove, then libxl__device_destroy when the
        backend closed or the removal is forced. Whether the backend closed in time."""
        lx = libxl_path(domid, devid, kind)
        backend = self._read(f"{lx}/backend")
        frontend = self._read(f"{lx}/frontend")
        if backend is None:
            return True
        be = backend.decode()

        def body(tx: int) -> bool:
            if force and frontend is not None:
                self._cleanup(tx, frontend.decode(), domain_path(domid))
            state = self._read(f"{be}/state", tx)
            if state is None:
                raise _AlreadyRemoved
            self._xs.write(f"{be}/online", b"0", tx)
            if state != STATE_CLOSED:
                self._xs.write(f"{be}/state", STATE_CLOSING, tx)
            return True

        try:
            self._transact(body)
        except _AlreadyRemoved:
            # "backend ... already removed, cleanup frontend only" (the transaction, the
            # forced frontend cleanup with it, is abandoned; libxl__device_destroy follows).
            self._destroy_device(domid, devid, kind)
            return True
        limit = self.destroy_timeout if timeout is None else timeout
        closed = True
        try:
            value = await self.xenstored.wait_for(
                f"{be}/state", lambda v: v is None or v == STATE_CLOSED, timeout=limit)
        except trio.TooSlowError:
            closed = False
        else:
            # A state node deleted under libxl's wait is ERROR_INVAL, not success.
            closed = value is not None
        if not closed and force:
            # Unforced, libxl only notes "Timeout reached, initiating forced remove".
            self._error(f"Domain {domid}:unable to remove device with path {be}")
        if closed or force:
            self._destroy_device(domid, devid, kind)
        return closed

    def _destroy_device(self, domid: int, devid: int, kind: str = "vdispl") -> None:
        lx = libxl_path(domid, devid, kind)

        def body(tx: int) -> None:
            fe = self._read(f"{lx}/frontend", tx)
            be = self._read(f"{lx}/backend", tx)
            if fe is not None:
                self._cleanup(tx, fe.decode(), domain_path(domid))
            if be is not None:
                path = be.decode()
                self._cleanup(tx, path, path.split("/backend/")[0])
            self._cleanup(tx, lx, f"/libxl/{domid}")

        self._transact(body)


def _reached_init_wait(value: bytes | None) -> bool:
    # InitWait, or already past it (a hot-plugged guest may connect before we look).
    return value is not None and value.isdigit() and 2 <= int(value) <= 4
