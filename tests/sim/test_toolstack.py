"""The libxl-like toolstack: xl.cfg vdispl parsing, device nodes and permissions, timeouts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio

from displback.sim.toolstack import (
    Toolstack,
    ToolstackError,
    VdisplConfig,
    VdisplConnector,
    VdisplSpecError,
    parse_vdispl,
)
from displback.sim.xenstore_tree import RELEASE_DOMAIN, WatchEvent
from displback.sim.xenstored import XenStored
from displback.xenstore.wire import Perm, XenStoreError

FE = "/local/domain/5/device/vdispl/0"
BE = "/local/domain/0/backend/vdispl/5/0"
LX = "/libxl/5/device/vdispl/0"
SPEC = "backend=Domain-0,be-alloc=1,connectors=id0:1024x768;id1:800x600"


def test_parse_vdispl_reads_xl_syntax() -> None:
    assert parse_vdispl(SPEC) == VdisplConfig(
        (VdisplConnector("id0", 1024, 768), VdisplConnector("id1", 800, 600)), "Domain-0", True)
    assert parse_vdispl("connectors=a:1x1") == VdisplConfig((VdisplConnector("a", 1, 1),))


@pytest.mark.parametrize("spec", [
    "", "backend=0", "connectors=", "connectors=id0", "connectors=id0:1024", "connectors=:1x1",
    "connectors=id0:0x768", "connectors=id0:axb", "connectors=a b:1x1",
    "connectors=a:1x1;a:2x2", "be-alloc=yes,connectors=a:1x1", "colour=red,connectors=a:1x1",
    "connectors=a:1x1,connectors=b:1x1", "backend,connectors=a:1x1",
])
def test_parse_vdispl_refuses_bad_strings(spec: str) -> None:
    with pytest.raises(VdisplSpecError, match="vdispl"):
        parse_vdispl(spec)


@pytest.fixture
def xsd() -> XenStored:
    return XenStored()


@pytest.fixture
def ts(xsd: XenStored) -> Toolstack:
    toolstack = Toolstack(xsd, init_timeout=2, destroy_timeout=2)
    toolstack.create_domain(5, "guest")
    return toolstack


def fake_backend(
    xsd: XenStored, react: Callable[[bytes | None], bytes | None]
) -> Callable[[], Awaitable[None]]:
    """A backend that rewrites its state node with ``react(current)`` whenever that is not None."""

    async def run() -> None:
        session = xsd.session(0)
        session.watch(BE + "/state", "be")
        while True:
            await trio.sleep(0.01)
            try:
                current: bytes | None = session.read(BE + "/state")
            except XenStoreError:
                current = None
            new = react(current)
            if new is not None and new != current:
                session.write(BE + "/state", new)

    return run


async def test_add_vdispl_writes_libxl_layout_and_waits_for_initwait(
    xsd: XenStored, ts: Toolstack
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_backend(xsd, lambda s: b"2" if s == b"1" else None))
        assert await ts.add_vdispl(5, SPEC) == 0
        nursery.cancel_scope.cancel()
    dom0 = xsd.session(0)
    expected = {
        f"{FE}/backend": BE, f"{FE}/backend-id": "0", f"{FE}/state": "1",
        f"{FE}/be-alloc": "1", f"{FE}/0/resolution": "1024x768", f"{FE}/0/unique-id": "id0",
        f"{FE}/1/resolution": "800x600", f"{FE}/1/unique-id": "id1",
        f"{BE}/frontend": FE, f"{BE}/frontend-id": "5", f"{BE}/online": "1", f"{BE}/state": "2",
        f"{LX}/frontend": FE, f"{LX}/backend": BE, f"{LX}/state": "1",
        "/local/domain/5/name": "guest", "/local/domain/5/domid": "5",
    }
    assert {p: dom0.read(p).decode() for p in expected} == expected
    assert dom0.get_perms(FE) == (Perm(5, "n"), Perm(0, "r"))
    assert dom0.get_perms(BE) == (Perm(0, "n"), Perm(5, "r"))
    assert dom0.get_perms(f"{FE}/0/resolution") == (Perm(0, "n"), Perm(5, "r"))
    guest = xsd.session(5)
    guest.write(f"{FE}/state", b"3")
    guest.write(f"{FE}/0/req-ring-ref", b"8")
    for path in (f"{FE}/be-alloc", f"{FE}/1/unique-id", f"{BE}/state", f"{LX}/state"):
        with pytest.raises(XenStoreError):
            guest.write(path, b"x")
    assert guest.read(f"{BE}/state") == b"2"


async def test_add_vdispl_fails_when_backend_never_reaches_initwait(ts: Toolstack) -> None:
    with trio.fail_after(5), pytest.raises(ToolstackError, match="InitWait"):
        await ts.add_vdispl(5, SPEC, timeout=0.1)


async def test_add_vdispl_needs_known_domains(ts: Toolstack) -> None:
    with pytest.raises(ToolstackError, match="no guest domain 9"):
        await ts.add_vdispl(9, SPEC, timeout=0.1)
    with pytest.raises(ToolstackError, match="no domain named 'driver'"):
        await ts.add_vdispl(5, "backend=driver,connectors=a:1x1", timeout=0.1)


async def test_remove_vdispl_closes_in_one_transaction_waits_and_deletes(
    xsd: XenStored, ts: Toolstack
) -> None:
    online_when_closing: list[bytes] = []

    def react(state: bytes | None) -> bytes | None:
        if state == b"1":
            return b"2"
        if state == b"5":
            online_when_closing.append(xsd.session(0).read(BE + "/online"))
            return b"6"
        return None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_backend(xsd, react))
        await ts.add_vdispl(5, SPEC)
        assert await ts.remove_vdispl(5, 0) is True
        nursery.cancel_scope.cancel()
    assert online_when_closing == [b"0"]
    dom0 = xsd.session(0)
    for path in (FE, BE, LX, "/local/domain/5/device/vdispl", "/local/domain/0/backend"):
        assert not dom0.exists(path), path
    assert dom0.read("/local/domain/5/name") == b"guest"
    assert ts.vdispl_devices(5) == []


async def test_remove_vdispl_forces_removal_after_timeout(xsd: XenStored, ts: Toolstack) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_backend(xsd, lambda s: b"2" if s == b"1" else None))
        await ts.add_vdispl(5, SPEC)
        assert await ts.remove_vdispl(5, 0, timeout=0.1) is False
        nursery.cancel_scope.cancel()
    assert not xsd.session(0).exists(FE)


async def test_destroy_domain_removes_everything_and_fires_release(
    xsd: XenStored, ts: Toolstack
) -> None:
    watcher = xsd.session(0)
    watcher.watch(RELEASE_DOMAIN, "rel")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_backend(xsd, lambda s: b"2" if s == b"1" else None))
        await ts.add_vdispl(5, SPEC)
        nursery.cancel_scope.cancel()
    watcher.watch(BE, "be")
    watcher.events.clear()
    await ts.destroy_domain(5)
    dom0 = xsd.session(0)
    for path in ("/local/domain/5", "/libxl/5", BE):
        assert not dom0.exists(path), path
    assert list(watcher.events)[-1] == WatchEvent(RELEASE_DOMAIN, "rel")
    assert WatchEvent(BE, "be") in watcher.events


async def test_second_device_gets_next_devid(xsd: XenStored, ts: Toolstack) -> None:
    async with trio.open_nursery() as nursery:
        session = xsd.session(0)

        async def backend() -> None:
            while True:
                await trio.sleep(0.01)
                for devid in ts.vdispl_devices(5):
                    path = f"/local/domain/0/backend/vdispl/5/{devid}/state"
                    if session.exists(path) and session.read(path) == b"1":
                        session.write(path, b"2")

        nursery.start_soon(backend)
        assert await ts.add_vdispl(5, "connectors=a:1x1") == 0
        assert await ts.add_vdispl(5, "connectors=b:2x2") == 1
        nursery.cancel_scope.cancel()
    assert ts.vdispl_devices(5) == [0, 1]


# What libxl 4.17 (libxl__domain_make, libxl__device_generic_add) and C xenstored 4.17
# (construct_node: a new node inherits its parent's permissions) give every node of a vdispl
# device, with xl.cfg defaults, for guest 5 and backend 0.
LIBXL_417_PERMS = {
    "/local/domain/5": "n0 r5",
    "/local/domain/5/device": "n0 r5",
    "/local/domain/5/device/suspend": "n0 r5",  # implicit parent
    "/local/domain/5/device/suspend/event-channel": "n5",
    "/local/domain/5/device/vdispl": "n0 r5",  # implicit parent: the guest cannot write it
    FE: "n5 r0",
    f"{FE}/backend": "n5 r0",  # written without perms: inherited
    f"{FE}/backend-id": "n5 r0",
    f"{FE}/state": "n5 r0",
    f"{FE}/be-alloc": "n0 r5",
    f"{FE}/0": "n5 r0",  # implicit parent: the guest's
    f"{FE}/0/resolution": "n0 r5",
    f"{FE}/0/unique-id": "n0 r5",
    f"{FE}/1": "n5 r0",
    f"{FE}/1/resolution": "n0 r5",
    f"{FE}/1/unique-id": "n0 r5",
    "/local/domain/0/backend": "n0",
    "/local/domain/0/backend/vdispl": "n0",
    "/local/domain/0/backend/vdispl/5": "n0",
    BE: "n0 r5",
    f"{BE}/frontend": "n0 r5",
    f"{BE}/frontend-id": "n0 r5",
    f"{BE}/online": "n0 r5",
    f"{BE}/state": "n0 r5",
    "/libxl/5": "n0",
    "/libxl/5/device": "n0",
    "/libxl/5/device/vdispl": "n0",
    LX: "n0",
    f"{LX}/frontend": "n0",
    f"{LX}/backend": "n0",
    f"{LX}/frontend-id": "n0",
    f"{LX}/online": "n0",
    f"{LX}/state": "n0",
}


async def test_every_device_node_gets_the_permissions_libxl_417_gives_it(
    xsd: XenStored, ts: Toolstack
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_backend(xsd, lambda s: b"2" if s == b"1" else None))
        await ts.add_vdispl(5, SPEC)
        nursery.cancel_scope.cancel()
    under = ("/local/domain/5/device", "/local/domain/0/backend", "/libxl/5/device")
    device_nodes = {p for p in xsd.tree.paths() if p.startswith(under)}
    device_nodes |= {"/local/domain/5", "/libxl/5"}
    dom0 = xsd.session(0)
    actual = {p: " ".join(str(x) for x in dom0.get_perms(p)) for p in device_nodes}
    assert actual == LIBXL_417_PERMS


async def test_a_guest_cannot_recreate_a_device_directory_it_removed(
    xsd: XenStored, ts: Toolstack
) -> None:
    """It owns the directory, so it may remove it; ``device/vdispl`` is the toolstack's, so
    it may not create anything there (C xenstored: EACCES)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_backend(xsd, lambda s: b"2" if s == b"1" else None))
        await ts.add_vdispl(5, SPEC)
        nursery.cancel_scope.cancel()
    guest = xsd.session(5)
    guest.rm(f"{FE}/0")  # its connector directory, read-only nodes and all
    assert not xsd.session(0).exists(f"{FE}/0/resolution")
    guest.write(f"{FE}/0/resolution", b"4096x2160")  # its own node now
    assert xsd.session(0).get_perms(f"{FE}/0/resolution")[0] == Perm(5, "n")
    guest.rm(FE)
    for attempt in (lambda: guest.write(f"{FE}/state", b"1"),
                    lambda: guest.mkdir(FE),
                    lambda: guest.write("/local/domain/5/device/vdispl/1/be-alloc", b"1")):
        with pytest.raises(XenStoreError) as exc:
            attempt()
        assert exc.value.name == "EACCES"


async def test_with_xend_suspend_evtchn_compat_the_guest_owns_device(xsd: XenStored) -> None:
    """libxl's other layout: ``device`` is the guest's, and so is every device directory
    path it re-creates there — the trust rule, not the store, has to catch that."""
    ts = Toolstack(xsd, init_timeout=2, destroy_timeout=2)
    ts.create_domain(5, "guest", xend_suspend_evtchn_compat=True)
    dom0, guest = xsd.session(0), xsd.session(5)
    assert dom0.get_perms("/local/domain/5/device") == (Perm(5, "n"),)
    assert not dom0.exists("/local/domain/5/device/suspend")
    guest.write(f"{FE}/be-alloc", b"1")
    assert dom0.get_perms(f"{FE}/be-alloc") == (Perm(5, "n"),)
