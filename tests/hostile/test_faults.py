"""Dom0 fails under a guest: its platform (event channels, gntdev, dma-bufs) and display
(imports, dumb buffers, flips, disables) raise ENOMEM, EMFILE, EIO, EAGAIN, EBUSY or ENOSPC on
chosen calls, and xenstored drops the daemon's connection. Each failure costs that one
connect or request (an error, a reset, a dropped frame); afterwards the guest is served, the
honest guest beside it never noticed, and nothing leaked."""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path

import pytest
import trio

from displback.backend.buffers import ZeroCopyPolicy
from displback.backend.device import BackendSettings
from displback.sim.guest import GuestRequestError, SimGuest
from displback.sim.hypervisor import HypervisorThread
from tests.backend.support import release, show, show_frames, wait_until
from tests.hostile.faults import Faults, inject
from tests.hostile.support import Arena, run_attack

BE_ALLOC = "be-alloc=1,connectors=c0:320x240"
GUEST = "connectors=c0:320x240"


async def _exercise(a: Arena, g: SimGuest) -> None:
    """What a guest does: buffers, framebuffers, a mode set, flips, EDID, and back."""
    with contextlib.suppress(GuestRequestError):
        await g.get_edid(0)
    with contextlib.suppress(GuestRequestError):
        await show_frames(a.machine, g, 30, count=3, output="B")


async def _served_after(a: Arena, g: SimGuest, faults: Faults, call: str) -> None:
    """The planned faults were hit; once they are spent the guest is served again (after
    the back-off if the fault cost its connection)."""
    with contextlib.suppress(GuestRequestError):
        await _exercise(a, g)
    assert faults.raised[call] >= 1, f"{call} was never called"
    faults.clear()
    await g.wait_connected(timeout=15)
    await show_frames(a.machine, g, 60, count=3, output="B")


CONNECT_FAULTS = [
    ("platform.open_event_channels", errno.EMFILE),
    ("evtchn.bind_interdomain", errno.ENOMEM),
    ("platform.open_grant_device", errno.EMFILE),
    ("grants.map_grants", errno.ENOMEM),
]


@pytest.mark.parametrize(("call", "err"), CONNECT_FAULTS,
                         ids=[f"{c}-{errno.errorcode[e]}" for c, e in CONNECT_FAULTS])
async def test_a_failure_while_connecting_costs_one_connect(
    hypervisor: HypervisorThread, tmp_path: Path, call: str, err: int
) -> None:
    """The first connect fails with everything it made released; after the back-off the
    daemon connects the rings the guest published and serves it."""
    faults = Faults()
    faults.fail(call, err)

    async def attack(a: Arena, g: SimGuest) -> None:
        await _served_after(a, g, faults, call)

    await run_attack(hypervisor, tmp_path, attack, before=lambda a: inject(a.machine, faults))


AUTO, OFF = ZeroCopyPolicy.AUTO, ZeroCopyPolicy.OFF
REQUEST_FAULTS = [
    ("grants.dmabuf_export", errno.ENOMEM, GUEST, AUTO),
    ("grants.map_grants", errno.EIO, GUEST, OFF),
    ("grants.copy_from_grant", errno.EIO, GUEST, AUTO),
    ("grants.dmabuf_wait_released", errno.EIO, GUEST, AUTO),
    ("platform.alloc_dmabuf", errno.ENOMEM, BE_ALLOC, AUTO),
    ("grants.dmabuf_import_to_refs", errno.ENOSPC, BE_ALLOC, AUTO),
    ("platform.open_dmabuf", errno.EMFILE, BE_ALLOC, OFF),
    ("evtchn.notify", errno.EIO, GUEST, AUTO),
    ("evtchn.read_pending", errno.EAGAIN, GUEST, AUTO),
    ("evtchn.unmask", errno.EIO, GUEST, AUTO),
    ("output.import_dmabuf", errno.ENOMEM, GUEST, AUTO),
    ("output.create_dumb", errno.ENOMEM, GUEST, OFF),
    ("output.flip", errno.EIO, GUEST, AUTO),
    ("output.flip", errno.EBUSY, GUEST, AUTO),
    ("output.disable", errno.EIO, GUEST, AUTO),
]


@pytest.mark.parametrize(
    ("call", "err", "spec", "zero_copy"), REQUEST_FAULTS,
    ids=[f"{c}-{errno.errorcode[e]}-{z.value}" for c, e, _s, z in REQUEST_FAULTS],
)
async def test_a_failure_while_serving_costs_one_request_or_one_reset(
    hypervisor: HypervisorThread, tmp_path: Path, call: str, err: int, spec: str,
    zero_copy: ZeroCopyPolicy,
) -> None:
    """A request the failure hits is answered with an error (or its frame dropped); a
    failure of the device's event channel resets the device (logged as an internal error)."""
    faults = Faults()

    async def attack(a: Arena, g: SimGuest) -> None:
        faults.fail(call, err, times=2)
        await _served_after(a, g, faults, call)

    await run_attack(hypervisor, tmp_path, attack, spec=spec,
                     settings=BackendSettings(zero_copy=zero_copy),
                     before=lambda a: inject(a.machine, faults))


async def test_revoking_kept_grants_failing_when_the_domain_dies_still_releases_them(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """be-alloc memory keeps its grants until its domain dies; then each is revoked
    (``DMABUF_IMP_RELEASE``). Failing (EIO), that is logged, and closing the domain's gntdev
    releases the imports anyway: no Dom0 grant, page or fd is left (checked as the attacker
    goes)."""
    faults = Faults()
    call = "grants.dmabuf_import_release"

    async def attack(a: Arena, g: SimGuest) -> None:
        await show_frames(a.machine, g, 30, count=3, output="B")
        faults.fail(call, errno.EIO, times=8)

    await run_attack(hypervisor, tmp_path, attack, spec=BE_ALLOC,
                     before=lambda a: inject(a.machine, faults))
    assert faults.raised[call] >= 1


async def test_xenstored_dropping_the_daemons_idle_connection_costs_nothing(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """The daemon's client reconnects and re-registers its watches; flips need no XenStore;
    the guest is served as before."""

    async def attack(a: Arena, g: SimGuest) -> None:
        xs = a.machine.xs.xenstored
        bufs, fbs = await show(g, 0, 320, 240)
        await trio.sleep(0.2)  # nothing of the daemon's in flight
        dropped = xs.drop_connections(0, "test: connection dropped")
        assert dropped >= 1
        await wait_until(lambda: _dom0_connections(a) >= dropped)
        await release(g, 0, bufs, fbs)
        await show_frames(a.machine, g, 60, count=3, output="B")

    await run_attack(hypervisor, tmp_path, attack)


async def test_xenstored_dropping_the_daemons_connection_mid_request_costs_nothing(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """Drops every 5 ms while the guest re-probes (the daemon reads and writes XenStore):
    some drop finds a request of the daemon in flight. (It escaped Backend._scan and
    GuestDevice._observe and stopped the daemon.)"""

    def connects(a: Arena, domid: int) -> int:
        devices = a.machine.backend.devices.items()
        return sum(d.status.connects for k, d in devices if k.domid == domid)

    async def attack(a: Arena, g: SimGuest) -> None:
        xs = a.machine.xs.xenstored
        before = connects(a, g.domid)
        await g.xenstore.write(f"{g.frontend_path}/state", b"1")  # re-probe
        for _ in range(60):
            xs.drop_connections(0, "test: connection dropped")
            await trio.sleep(0.005)
        await wait_until(lambda: _dom0_connections(a) >= 1)
        # The guest is served again once the daemon connected it anew (until then the guest
        # may still believe in the rings the re-probe made the daemon tear down).
        await wait_until(lambda: connects(a, g.domid) > before)
        await g.wait_connected(timeout=15)
        await show_frames(a.machine, g, 60, count=3, output="B")

    await run_attack(hypervisor, tmp_path, attack)


def _dom0_connections(a: Arena) -> int:
    return len([c for c in a.machine.xs.xenstored.connections if c.session.domid == 0])
