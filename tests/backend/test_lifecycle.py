"""The daemon through a guest's life: unload, reboot, crash, removal, daemon restart, and
several guests at once where one breaks the protocol."""

from __future__ import annotations

from pathlib import Path

import trio

from displback.backend.device import DeviceStatus
from displback.display.virtual import OutputConfig
from displback.protocol.xenbus import XenbusState
from displback.sim.guest import SimGuest
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import SimMachine, sim_machine
from tests.backend.support import (
    SPEC,
    connected_guest,
    flips_continue,
    show_frames,
    shown,
    wait_until,
)


def _status(w: SimMachine, domid: int) -> DeviceStatus:
    [status] = [s for s in w.backend.statuses() if s.domid == domid]
    return status


async def _handshakes_reach(guest: SimGuest, count: int) -> None:
    await wait_until(lambda: guest.stats.handshakes >= count)


async def test_driver_unload_and_reload_reconnects(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(1, SPEC)
            for session in range(3):
                async with w.guest(1) as guest:
                    await guest.wait_connected()
                    await show_frames(w, guest, 10 * session)
                # The remove path saw InitWait again: the device is ready for the next probe.
                await wait_until(lambda: _status(w, 1).state == "init-wait")
            assert _status(w, 1).connects == 3


async def test_guest_reboot_while_connected_is_torn_down_and_reconnected(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(1, SPEC)
            async with w.guest(1) as old:
                await old.wait_connected()
                old.start_drawing(fps=200)
                await flips_continue(old)
                # The old kernel vanishes without a word; the new one probes (state 1).
                old.crash()
                async with w.guest(1) as new:
                    await new.wait_connected()
                    await show_frames(w, new, 100)
            assert _status(w, 1).connects == 2


async def test_guest_crash_mid_flip_then_domain_destroy_forgets_the_device(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(1, "connectors=c0:320x240;c1:160x120")
            async with w.guest(1) as guest:
                await guest.wait_connected()
                guest.start_drawing(fps=500)
                await flips_continue(guest, 0)
                await flips_continue(guest, 1)
                guest.crash()
                await w.toolstack.destroy_domain(1)
                await wait_until(lambda: not w.backend.devices)
            assert w.backend.deferred is not None and w.backend.deferred.pending() == 0


async def test_toolstack_removal_gets_closed_in_time_and_forgets_the_device(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(1, SPEC)
            async with w.guest(1) as guest:
                await guest.wait_connected()
                guest.start_drawing(fps=200)
                await flips_continue(guest)
                assert await w.toolstack.remove_vdispl(1, 0)
                await wait_until(lambda: not w.backend.devices)
                for path in ("/local/domain/0/backend/vdispl/1/0", "/libxl/1/device/vdispl/0"):
                    assert not await _exists(w, path)
                await guest.wait_state(lambda g: not g.connected)
            # The toolstack creates the device again: a fresh backend device connects.
            await w.add_guest(1, SPEC)
            async with w.guest(1) as guest:
                await guest.wait_connected()
                await show_frames(w, guest, 1)


async def _exists(w: SimMachine, path: str) -> bool:
    from displback.xenstore.client import open_xenstore

    async with open_xenstore(w.platform.xenstore_path) as xs:
        return await xs.exists(path)


async def test_daemon_restart_with_the_guest_running_resets_it_and_it_flips_again(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            guest.start_drawing(fps=200)
            await flips_continue(guest)
            await w.restart_backend()
            await wait_until(lambda: guest.stats.handshakes == 2)
            await guest.wait_connected()
            assert guest.state is XenbusState.CONNECTED
            await flips_continue(guest)
            stats = guest.connector_stats(0)
            assert stats.flip_errors == 0 and stats.events_skipped == 0
            assert _status(w, 1).connects == 1


async def test_two_guests_with_two_connectors_each_show_on_four_outputs(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    spec = "connectors=c0:640x480;c1:320x240"
    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(1, spec)
            await w.add_guest(2, spec)
            async with w.guest(1) as g1:
                await g1.wait_connected()
                async with w.guest(2) as g2:
                    await g2.wait_connected()
                    for g in (g1, g2):
                        g.start_drawing(fps=200)
                    for g in (g1, g2):
                        for c in (0, 1):
                            await flips_continue(g, c, 5)
                    for name, connector, size in (("A", 0, (640, 480)), ("B", 1, (320, 240)),
                                                  ("C", 0, (640, 480)), ("D", 1, (320, 240))):
                        assert shown(w.output(name), *size)[0] == connector
                    for g in (g1, g2):
                        for c in (0, 1):
                            stats = g.connector_stats(c)
                            assert stats.frame_done_timeouts == stats.flip_errors == 0


async def test_a_protocol_violation_closes_only_that_device_which_reconnects_later(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(1, SPEC)
            await w.add_guest(2, "connectors=c0:320x240")
            async with w.guest(1) as bad:
                await bad.wait_connected()  # output A
                async with w.guest(2) as good:
                    await good.wait_connected()  # output B
                    good.start_drawing(fps=200)
                    await flips_continue(good)
                    bad.hostile.scribble_ring(0, "req_prod", 1000)
                    bad.hostile.notify(0)
                    await wait_until(lambda: bad.stats.disconnects == 1)
                    assert _status(w, 1).violations == 1
                    before = good.connector_stats(0).flips_ok
                    await bad.wait_connected()  # after the back-off
                    assert bad.stats.handshakes == 2
                    assert good.connector_stats(0).flips_ok > before
                    await show_frames(w, bad, 50)
                    await flips_continue(good)
                    stats = good.connector_stats(0)
                    assert stats.frame_done_timeouts == stats.flip_errors == 0
                    assert good.stats.disconnects == 0


async def test_a_device_detached_and_attached_again_at_once_is_served_again(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(1, SPEC)
            for round_ in range(3):
                async with w.guest(1) as guest:
                    await guest.wait_connected()
                    await show_frames(w, guest, 10 * round_)
                # xl vdispl-detach immediately followed by xl vdispl-attach.
                assert await w.toolstack.remove_vdispl(1, 0)
                await w.add_guest(1, SPEC)
            async with w.guest(1) as guest:
                await guest.wait_connected()
                await show_frames(w, guest, 100)


async def test_reconnecting_right_after_a_teardown_mid_flip_gets_no_errors(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """A connection torn down while its output still has a flip in flight hands the output
    on only once that flip has landed: the next connection's first SET_CONFIG must not
    meet it. (A slow output makes the window wide.)"""
    outputs = [OutputConfig("A", 320, 240, refresh_hz=20)]
    with trio.fail_after(30):
        async with sim_machine(hypervisor, tmp_path, outputs) as w:
            await w.add_guest(1, SPEC)
            for _ in range(5):
                async with w.guest(1, remove_timeout=0.2) as guest:
                    await guest.wait_connected()
                    guest.start_drawing(fps=1000)
                    await flips_continue(guest, more=2)
                    # ... and unload at once, mid-flip; reload at once.
                stats = guest.connector_stats(0)
                assert stats.set_config_errors == stats.flip_errors == 0


async def test_daemon_restarts_mid_flip_cost_the_guest_no_errors(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    outputs = [OutputConfig("A", 320, 240, refresh_hz=20)]
    with trio.fail_after(30):
        async with connected_guest(hypervisor, tmp_path, outputs=outputs) as (w, guest):
            guest.start_drawing(fps=1000)
            for _ in range(4):
                await flips_continue(guest, more=2)
                target = guest.stats.handshakes + 1
                await w.restart_backend()
                await _handshakes_reach(guest, target)
            await flips_continue(guest)
            stats = guest.connector_stats(0)
            assert stats.set_config_errors == stats.flip_errors == 0
