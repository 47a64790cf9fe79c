"""The vkbd backend end to end on the simulated machine: a guest like Linux's xen-kbdfront
gets keys, pointer and touch from the input router, scaled to what it was told; reconnects,
removal, guests that never read, and bad XenStore values."""

from __future__ import annotations

import struct
from pathlib import Path

import trio

from displback.backend.device import BackendSettings
from displback.backend.vkbd import VkbdDevice
from displback.protocol import kbdif
from displback.protocol.kbdif import Key, MtDown, MtMotion, MtSyn, MtUp, Position
from displback.protocol.xenbus import XenbusState
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import SimMachine, sim_machine
from tests.backend.support import wait_until

KEY_A = 30
BTN_LEFT = 0x110


def _device(machine: SimMachine, domid: int, devid: int = 0) -> VkbdDevice:
    [device] = [
        d for k, d in machine.backend.input_devices.items() if (k.domid, k.devid) == (domid, devid)
    ]
    return device


async def _connected(machine: SimMachine, domid: int, devid: int = 0) -> None:
    """The device serves its connection and its handshake says so (the connection is made
    before the backend writes Connected: the status may say "connecting" in between)."""
    await wait_until(
        lambda: any(
            (k.domid, k.devid) == (domid, devid)
            and d.connection is not None
            and d.refresh_status().state == "connected"
            for k, d in machine.backend.input_devices.items()
        )
    )


async def test_kbdfront_connects_with_abs_pointer_and_touch_at_the_connectors_size(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as machine:
            await machine.add_guest(1, "connectors=c0:800x600")
            await machine.add_vkb(1)
            async with machine.kbdfront(1) as front:
                await _connected(machine, 1)
                assert front.state is XenbusState.CONNECTED
                assert front.abs and front.with_mtouch and front.with_kbd and front.with_ptr
                assert front.ptr_size == (800, 600) and front.mt_size == (800, 600)
                assert front.num_contacts == kbdif.DEFAULT_NUM_CONTACTS
                status = machine.backend.input_statuses()[0]
                assert (status.mode, status.target) == ("abs+mt", "1/0/0")
                await wait_until(lambda: status.backend_state == "CONNECTED")


async def test_keys_pointer_and_touch_reach_the_guest_scaled_to_its_ranges(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as machine:
            await machine.add_guest(1, "connectors=c0:800x600")
            # The admin fixed the guest's ranges: the connector's pixels are scaled to them.
            await machine.add_vkb(1, "width=1600,height=1200,multi-touch-width=400,"
                                     "multi-touch-height=300,multi-touch-num-contacts=2,"
                                     "feature-multi-touch=1")
            async with machine.kbdfront(1) as front:
                await _connected(machine, 1)
                port = machine.backend.inputs.port(1, 0, 0)
                assert port.space == (800, 600)
                port.key(KEY_A, True)
                port.key(KEY_A, False)
                port.pointer_absolute(400, 300)
                port.button(BTN_LEFT, True)
                port.touch_down(77, 800, 600)
                port.touch_down(5, 0, 0)
                port.touch_down(6, 10, 10)  # a third contact: only two slots offered
                port.frame()
                port.touch_motion(5, 400, 300)
                port.touch_up(77)
                port.frame()
                await front.wait_for(lambda f: len(f.events) >= 10)
                assert front.events == [
                    Key(KEY_A, True),
                    Key(KEY_A, False),
                    Position(800, 600),
                    Key(BTN_LEFT, True),
                    MtDown(0, 400, 300),
                    MtDown(1, 0, 0),
                    MtSyn(),
                    MtMotion(1, 200, 150),
                    MtUp(0),
                    MtSyn(),
                ]
                assert front.keys_down == {BTN_LEFT} and front.pointer == (800, 600)
                assert front.contacts == {1: (200, 150)}
                port.release_all()
                await front.wait_for(lambda f: not f.keys_down and not f.contacts)


async def test_a_guest_without_abs_pointer_gets_relative_motion_and_touch_as_a_button(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as machine:
            await machine.add_guest(1, "connectors=c0:640x480")
            await machine.add_vkb(1)
            async with machine.kbdfront(1, request_abs=False, request_mt=False) as front:
                await _connected(machine, 1)
                assert machine.backend.input_statuses()[0].mode == "rel"
                port = machine.backend.inputs.port(1, 0, 0)
                port.pointer_absolute(100, 50)
                await front.wait_for(lambda f: f.pointer == (100, 50))
                port.pointer_relative(-20, 5, 1)
                await front.wait_for(lambda f: f.pointer == (80, 55) and f.wheel == 1)
                port.touch_down(3, 10, 10)
                await front.wait_for(lambda f: BTN_LEFT in f.keys_down and f.pointer == (10, 10))
                port.touch_up(3)
                await front.wait_for(lambda f: BTN_LEFT not in f.keys_down)


async def test_a_guest_that_never_reads_costs_a_bounded_queue_and_keeps_no_stuck_key(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    settings = BackendSettings(input_queue=16)
    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path, settings=settings) as machine:
            await machine.add_guest(1, "connectors=c0:640x480")
            await machine.add_vkb(1)
            async with machine.kbdfront(1, consume=False) as front:
                await _connected(machine, 1)
                port = machine.backend.inputs.port(1, 0, 0)
                port.key(KEY_A, True)
                for n in range(500):
                    port.key(2 + n % 50, True)
                    port.key(2 + n % 50, False)
                sink = _device(machine, 1).connection.sink  # type: ignore[union-attr]
                assert sink is not None
                await wait_until(lambda: len(sink.queue) <= 16 and sink.dropped > 0)
                port.key(KEY_A, False)  # held in the guest's view: never dropped
                assert len(sink.queue) <= 16 + 1
                status = machine.backend.input_statuses()[0]
                assert status.dropped == sink.dropped > 900
                # The page holds 51; the guest reads at last and catches up.
                front.consume = True
                front.read_page_now()
                await front.wait_for(lambda f: not sink.queue, timeout=5)
                await front.wait_for(lambda f: KEY_A not in f.keys_down)
                assert not front.keys_down


async def test_unplug_and_reconnect_keep_serving_and_release_everything(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with sim_machine(hypervisor, tmp_path) as machine:
            await machine.add_guest(1, "connectors=c0:640x480")
            await machine.add_vkb(1)
            port = machine.backend.inputs.port(1, 0, 0)
            for round_ in range(2):  # driver unload and reload
                async with machine.kbdfront(1) as front:
                    await _connected(machine, 1)
                    port.key(KEY_A, True)
                    await front.wait_for(lambda f: KEY_A in f.keys_down)
                    port.key(KEY_A, False)
                await wait_until(lambda: _device(machine, 1).connection is None)
                assert _device(machine, 1).status.connects == round_ + 1
            # The backend restarts under a connected guest: the same page is served again.
            async with machine.kbdfront(1) as front:
                await _connected(machine, 1)
                await machine.restart_backend()
                await _connected(machine, 1)
                machine.backend.inputs.port(1, 0, 0).key(KEY_A, True)
                await front.wait_for(lambda f: KEY_A in f.keys_down)
                # xl vkb-detach: closed, forgotten, nothing routed any more.
                assert await machine.toolstack.remove_vkb(1, 0)
                await wait_until(lambda: not machine.backend.input_devices)
                assert machine.backend.inputs.sinks(port.target) == ()
            assert machine.toolstack.errors == []


async def test_bad_values_from_the_guest_refuse_the_connect_and_nothing_else(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as machine:
            await machine.add_guest(1, "connectors=c0:640x480")
            await machine.add_guest(2, "connectors=c0:640x480")
            await machine.add_vkb(1)
            await machine.add_vkb(2)
            async with machine.kbdfront(2) as honest:
                await _connected(machine, 2)
                # Guest 1 publishes only the obsolete frame number, then a bad port.
                async with machine.kbdfront(1, publish_gref=False):
                    await wait_until(lambda: _device(machine, 1).status.state == "closed")
                async with machine.kbdfront(1) as bad:
                    await bad.xenstore.write(f"{bad.frontend_path}/event-channel", b"0x10")
                    await wait_until(lambda: _device(machine, 1).status.state == "closed")
                assert _device(machine, 1).status.connects == 0
                machine.backend.inputs.port(2, 0, 0).key(KEY_A, True)
                await honest.wait_for(lambda f: KEY_A in f.keys_down)


async def test_an_impossible_in_cons_is_a_violation_of_that_device_only(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as machine:
            await machine.add_guest(1, "connectors=c0:640x480")
            await machine.add_vkb(1)
            async with machine.kbdfront(1, consume=False) as front:
                await _connected(machine, 1)
                struct.pack_into("<I", front.page, kbdif.IN_CONS_OFS, 1000)
                machine.backend.inputs.port(1, 0, 0).key(KEY_A, True)
                await wait_until(lambda: _device(machine, 1).status.violations == 1)
                await wait_until(lambda: _device(machine, 1).connection is None)


async def test_displback_status_shows_each_vkbd_with_its_queue(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    from displback.app.status import StatusModel, render_table, to_json

    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as machine:
            await machine.add_vkb(4)  # a guest with input and no display
            async with machine.kbdfront(4, consume=False) as front:
                await _connected(machine, 4)
                assert front.ptr_size == (1024, 768)  # the daemon's input_size
                port = machine.backend.inputs.port(4, 0, 0)
                for _ in range(60):
                    port.key(KEY_A, True)
                    port.key(KEY_A, False)
                doc = to_json(StatusModel(machine.backend).report())
                [guest] = doc["guests"]
                [vkbd] = guest["inputs"]
                assert (vkbd["target"], vkbd["mode"], vkbd["state"]) == ("4/0/0", "abs+mt",
                                                                        "connected")
                await wait_until(lambda: _device(machine, 4).refresh_status().published == 51)
                doc = to_json(StatusModel(machine.backend).report())
                [vkbd] = doc["guests"][0]["inputs"]
                assert (vkbd["queued"], vkbd["published"], vkbd["waiting"]) == (120, 51, 69)
                assert "vkbd 0 → 4/0/0: connected abs+mt, events 51 written, 69 waiting" in (
                    render_table(doc)
                )
