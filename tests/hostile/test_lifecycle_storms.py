"""Lifecycle storms: a guest that removes its device directory, or resets after every connect,
costs itself back-off, never Dom0 CPU (the daemon used to forget and re-find the device in a
tight loop: ~200 devices per 10 s on real Xen, 915 in 2 s here)."""

from __future__ import annotations

from pathlib import Path

import trio

from displback.protocol.handshake import RetryPolicy
from displback.protocol.xenbus import XenbusState
from displback.sim.hypervisor import HypervisorThread
from tests.backend.support import SPEC, connected_guest, flips_continue, wait_until
from tests.backend.test_removal import assert_idle, daemon_requests


async def test_guest_removing_its_device_directory_gets_one_close_and_no_rediscovery_loop(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            device = next(iter(w.backend.devices.values()))
            guest.start_drawing(fps=100)
            await flips_continue(guest)
            before = daemon_requests(w)
            await guest.xenstore.rm(guest.frontend_path)  # the guest owns it: allowed
            await wait_until(lambda: device.status.state == "init-wait")
            await assert_idle(w)
            # Still the same device, torn down once, waiting: no loop of found/gone.
            assert list(w.backend.devices.values()) == [device]
            assert device.status.connects == 1
            assert daemon_requests(w) - before < 100
            guest.crash()
            assert await w.toolstack.destroy_domain(1)
            assert w.toolstack.errors == []


async def test_guest_resetting_after_every_connect_is_reconnected_ever_more_slowly(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    window = 5.0
    policy = RetryPolicy()
    with trio.fail_after(40):
        async with connected_guest(hypervisor, tmp_path, SPEC) as (w, guest):
            device = next(iter(w.backend.devices.values()))
            state = f"{guest.frontend_path}/state"

            async def reset_after_every_connect() -> None:
                async with guest.xenstore.watch(f"{guest.backend_path}/state") as events:
                    async for _ in events:
                        raw = await guest.xenstore.read_or_none(f"{guest.backend_path}/state")
                        if raw == XenbusState.CONNECTED.encode():
                            await guest.xenstore.write(state, b"1")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reset_after_every_connect)
                await guest.xenstore.write(state, b"1")
                await trio.sleep(window)
                nursery.cancel_scope.cancel()
            # One free reconnect, then 2 s, 4 s, ... of back-off: a handful, not hundreds.
            allowed = 2
            waited = 0.0
            while waited + policy.delay(allowed) <= window:
                waited += policy.delay(allowed)
                allowed += 1
            assert 2 <= device.status.connects <= allowed + 1
