"""A hostile guest against the daemon: stray notifications, bogus XenStore nodes, several
hostile guests at once. The attacks on rings, event pages, directories and grants, each
beside an honest guest whose rate and pixels are checked, are in tests/hostile."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest
import trio

from displback.protocol.layout import REQ_RING_REF, connector_dir
from displback.protocol.xenbus import XenbusState
from displback.sim.guest import (
    GuestRequestError,
    SimGuest,
)
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import sim_machine
from displback.sim.platform import SimDomain, SimEventChannels, SimPlatform
from tests.backend.support import (
    SPEC,
    connected_guest,
    show_frames,
    wait_until,
)


async def test_stray_notifications_change_nothing(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            for _ in range(200):
                guest.hostile.notify(0, "evt")
                guest.hostile.notify(0, "req")
            # The requests that follow queue behind the 400 notifications on the same ring
            # and event channels: no wait is needed to let the daemon see them first.
            await show_frames(w, guest, 1, count=2)
            assert guest.stats.disconnects == 0 and guest.stats.fatal_errors == 0


async def test_a_port_that_belongs_to_no_ring_is_unmasked_after_each_notification(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port on the daemon's event-channel device that no connector owns (bound there by
    someone else, or reported after an overflow) is unmasked again each time it fires, so it
    can never leave the device stuck readable nor be lost for good."""
    opened: list[SimEventChannels] = []
    unmasked: list[int] = []
    open_event_channels = SimPlatform.open_event_channels

    def recording(platform: SimPlatform) -> SimEventChannels:
        evtchn = open_event_channels(platform)
        unmask = evtchn.unmask

        def recorded(ports: list[int]) -> None:
            unmask(ports)
            unmasked.extend(ports)

        monkeypatch.setattr(evtchn, "unmask", recorded)
        opened.append(evtchn)
        return evtchn

    monkeypatch.setattr(SimPlatform, "open_event_channels", recording)
    with trio.fail_after(10):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            daemon_evtchn = opened[-1]
            with SimDomain(hypervisor.socket_path, 1) as other:
                stranger = other.open_event_channels()
                try:
                    remote = stranger.bind_unbound_port(0)
                    port = daemon_evtchn.bind_interdomain(1, remote)  # fires once at bind
                    for fired in range(1, 4):
                        await wait_until(lambda n=fired: unmasked.count(port) == n)
                        stranger.notify(remote)
                    await wait_until(lambda: unmasked.count(port) == 4)
                finally:
                    stranger.close()
            await show_frames(w, guest, 1, count=2)
            assert guest.stats.disconnects == 0


async def test_a_bogus_ring_reference_fails_the_connect_and_a_fixed_one_connects(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    node = f"{connector_dir(1, 0, 0)}/{REQ_RING_REF}"
    good_value: list[bytes] = []

    async def corrupt(guest: SimGuest) -> None:
        if not good_value:
            good_value.append(await guest.xenstore.read(node))
            await guest.xenstore.write(node, b"banana")

    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(1, SPEC)
            async with w.guest(1) as guest:
                guest.on_published = corrupt
                await guest.wait_state(lambda g: g.backend_state is XenbusState.CLOSED)
                assert not guest.connected  # Linux ignores Closed while Initialised
                await guest.xenstore.write(node, good_value[0])
                await guest.wait_connected()
                await show_frames(w, guest, 1, count=2)


async def test_the_daemon_survives_everything_at_once(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """Several hostile guests together, then a well-behaved one is served as usual."""
    rng = random.Random(7)
    with trio.fail_after(30):
        async with sim_machine(hypervisor, tmp_path) as w:
            for domid in (1, 2, 3):
                await w.add_guest(domid, SPEC)
            async with w.guest(1) as g1, w.guest(2) as g2, w.guest(3) as g3:
                for g in (g1, g2, g3):
                    await g.wait_connected()

                async def garbage(guest: SimGuest) -> None:
                    for _ in range(100):
                        packet = rng.randbytes(64)
                        try:
                            await guest.hostile.raw_request(0, packet)
                        except GuestRequestError as exc:
                            assert exc.errno != errno.ETIMEDOUT

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(garbage, g1)
                    nursery.start_soon(garbage, g2)
                    g3.hostile.scribble_ring(0, "req_prod", 77)
                    g3.hostile.notify(0)
                await wait_until(lambda: g3.stats.disconnects == 1)
                g3.crash()
                await w.toolstack.destroy_domain(3)
                await wait_until(lambda: len(w.backend.devices) == 2)
            await w.add_guest(4, SPEC)
            async with w.guest(4) as g4:
                await g4.wait_connected()
                await show_frames(w, g4, 1, count=2)
            assert not w.backend_scope.cancel_called

