"""The libxl-like toolstack: xl.cfg vdispl parsing, device nodes and permissions, timeouts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio

from displback.sim.toolstack import (
    Connector,
    Toolstack,
    ToolstackError,
    VdisplConfig,
    VdisplSpecError,
    parse_vdispl,
)
from displback.sim.xenstore_tree import RELEASE_DOMAIN, Perm, WatchEvent
from displback.sim.xenstored import XenStored
from displback.xenstore.wire import XenStoreError

FE = "/local/domain/5/device/vdispl/0"
BE = "/local/domain/0/backend/vdispl/5/0"
LX = "/libxl/5/device/vdispl/0"
SPEC = "backend=Domain-0,be-alloc=1,connectors=id0:1024x768;id1:800x600"


def test_parse_vdispl_reads_xl_syntax() -> None:
    assert parse_vdispl(SPEC) == VdisplConfig(
        (Connector("id0", 1024, 768), Connector("id1", 800, 600)), "Domain-0", True)
    assert parse_vdispl("connectors=a:1x1") == VdisplConfig((Connector("a", 1, 1),))


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
    assert dom0.get_perms(FE) == (Perm("n", 5), Perm("r", 0))
    assert dom0.get_perms(BE) == (Perm("n", 0), Perm("r", 5))
    assert dom0.get_perms(f"{FE}/0/resolution") == (Perm("n", 0), Perm("r", 5))
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
