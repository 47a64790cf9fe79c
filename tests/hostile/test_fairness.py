"""One guest's work must not stall the others (issue 9, weakness 5).

An attacker guest in copy mode makes the backend copy frames (up to 32 MiB each) on every
SET_CONFIG and PG_FLIP, and may notify its event channels in a tight loop. These tests hold
the attacker's copies inside their copy (a gate in a patched ``copy_frame``) so that what
they prove does not depend on timing: the copies run off the event loop, an honest guest
flips meanwhile, one guest never holds more than its share of copy slots, a copy in flight
keeps its memory mapped through a detach, a destroy and a teardown, and notification floods
on either event channel cost a bounded number of wake-ups. The speed figures are in ``make
bench`` (``fairness``).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from displback.backend.connector import SPURIOUS_WAKEUP_BURST, SPURIOUS_WAKEUPS_PER_SECOND
from displback.backend.copies import CopyWorkers
from displback.backend.device import BackendSettings, GuestDevice
from displback.display import virtual as virtual_module
from displback.display.pixels import copy_frame
from displback.display.virtual import OutputConfig
from displback.sim.guest import GuestBuffer, GuestFb, GuestRequestError, SimGuest
from displback.sim.hypervisor import HypervisorThread, query_counters
from displback.sim.machine import SimMachine, sim_machine
from tests.backend.support import (
    copy_frames_with,
    flip_frame,
    new_guest_buffers,
    paint,
    show,
    show_frames,
    shown,
    wait_until,
)

ATTACKER, HONEST = 1, 2
#: The attacker's frames: wide enough to tell its copies from the honest guest's (320 wide).
BIG = (1024, 768)
SPECS = {
    ATTACKER: f"connectors=a0:{BIG[0]}x{BIG[1]};a1:{BIG[0]}x{BIG[1]}",
    HONEST: "connectors=h0:320x240",
}
OUTPUTS = [
    OutputConfig("A0", *BIG),
    OutputConfig("A1", *BIG),
    OutputConfig("H", 320, 240),
]
ASSIGNMENTS = {f"{ATTACKER}/0/0": "A0", f"{ATTACKER}/0/1": "A1", f"{HONEST}/0/0": "H"}


@dataclass
class Gate:
    """``copy_frame`` as the backend calls it, with the attacker's copies held at a gate.

    Honest copies pass. An attacker copy made on the event loop's own thread is recorded
    (``on_loop``) and not held: holding it would hold the loop, and the test could not say so.
    """

    loop_thread: int
    open: threading.Event = field(default_factory=threading.Event)
    held: int = 0  # attacker copies inside the gate now
    most_held: int = 0
    copies: int = 0  # attacker copies done
    on_loop: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def copy(self, *args: Any) -> None:
        width_bytes = args[6]
        if width_bytes != BIG[0] * 4:
            copy_frame(*args)
            return
        if threading.get_ident() == self.loop_thread:
            self.on_loop += 1
        else:
            with self.lock:
                self.held += 1
                self.most_held = max(self.most_held, self.held)
            try:
                self.open.wait(timeout=30)
            finally:
                with self.lock:
                    self.held -= 1
        copy_frame(*args)
        self.copies += 1


@asynccontextmanager
async def attacked_machine(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[SimMachine, SimGuest, SimGuest, Gate, CopyWorkers]]:
    """A copy-mode machine (Dom0 cannot export) with the attacker and an honest guest
    connected, copies on two worker threads (``copy_workers``), the attacker's copies gated."""
    gate = Gate(threading.get_ident())
    copy_frames_with(monkeypatch, gate.copy)
    async with sim_machine(
        hypervisor, tmp_path, OUTPUTS, assignments=ASSIGNMENTS,
        platform_options={"dmabuf_export_supported": False},
        settings=BackendSettings(copy_workers=2),
    ) as machine:
        workers = machine.backend.copies
        assert (workers.total, workers.per_guest) == (2, 1)
        for domid, spec in SPECS.items():
            await machine.add_guest(domid, spec)
        async with machine.guest(ATTACKER) as attacker, machine.guest(HONEST) as honest:
            await attacker.wait_connected()
            await honest.wait_connected()
            try:
                yield machine, attacker, honest, gate, workers
            finally:
                gate.open.set()


async def _big_frame(
    guest: SimGuest, connector: int, frame: int
) -> tuple[list[GuestBuffer], list[GuestFb]]:
    """Two big buffers with a framebuffer each, ``frame`` painted into the first (buffer
    requests travel on connector 0's ring: make them before a SET_CONFIG blocks it)."""
    bufs, fbs = await new_guest_buffers(guest, *BIG)
    paint(bufs[0], fbs[0], connector=connector, frame=frame)
    return bufs, fbs


def _dom0_mappings(hv: HypervisorThread) -> int:
    """How many grants Dom0 (the backend) maps now."""
    return int(query_counters(hv.socket_path)["domains"]["0"].get("mappings", 0))


def _device(machine: SimMachine, domid: int) -> GuestDevice:
    return next(d for d in machine.backend.devices.values() if d.domid == domid)


async def _honest_flips(machine: SimMachine, honest: SimGuest, count: int) -> None:
    """``count`` honest flips, each landing with its pixels on output H."""
    bufs, fbs = await show(honest, 0, 320, 240, frame=1)
    for frame in range(2, 2 + count):
        back = frame % 2
        await flip_frame(honest, 0, bufs[back], fbs[back], frame)
        assert shown(machine.output("H"), 320, 240) == (0, frame)


async def test_an_attackers_copies_run_off_the_loop_while_an_honest_guest_flips(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(60):
        async with attacked_machine(hypervisor, tmp_path, monkeypatch) as (
            machine, attacker, honest, gate, workers,
        ):
            frames = [await _big_frame(attacker, c, 10 + c) for c in (0, 1)]
            async with trio.open_nursery() as nursery:
                for connector, (_bufs, fbs) in enumerate(frames):
                    nursery.start_soon(attacker.set_config, connector, fbs[0])
                await wait_until(lambda: gate.held >= 1 or gate.on_loop > 0)
                assert gate.on_loop == 0, "a copy ran on the event loop's thread"
                # Both attacker connectors want a copy; the attacker holds one slot, the
                # second copy waits for it, and the honest guest has the other slot.
                await _honest_flips(machine, honest, 6)
                assert gate.held == 1 and gate.copies == 0
                assert workers.stats.running == 1
                gate.open.set()
            assert gate.copies == 2 and gate.most_held == 1
            assert workers.stats.most_running_per_guest == 1
            for connector in (0, 1):
                assert shown(machine.output(f"A{connector}")) == (connector, 10 + connector)
            assert honest.connector_stats(0).frame_done_timeouts == 0


async def test_a_copy_in_flight_keeps_its_memory_through_detach_and_destroy(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(60):
        async with attacked_machine(hypervisor, tmp_path, monkeypatch) as (
            machine, attacker, honest, gate, _workers,
        ):
            bufs, fbs = await _big_frame(attacker, 1, 5)
            async with trio.open_nursery() as nursery:

                async def set_config_fails() -> None:
                    with pytest.raises(GuestRequestError):  # released while copying
                        await attacker.set_config(1, fbs[0])

                nursery.start_soon(set_config_fails)
                await wait_until(lambda: gate.held == 1 or gate.on_loop > 0)
                assert gate.on_loop == 0, "a copy ran on the event loop's thread"
                # Buffer requests travel on connector 0's ring (as Linux sends them), beside
                # connector 1's SET_CONFIG waiting for its copy.
                await attacker.rm_fb(fbs[0])  # answered at once; the copy's target stays
                destroyed = trio.Event()

                async def destroy() -> None:
                    await attacker.destroy_dumb(bufs[0])
                    destroyed.set()

                mapped = _dom0_mappings(hypervisor)
                nursery.start_soon(destroy)
                with trio.move_on_after(0.3):
                    await destroyed.wait()
                assert not destroyed.is_set(), "DBUF_DESTROY answered under a running copy"
                assert gate.held == 1 and _dom0_mappings(hypervisor) == mapped
                gate.open.set()
                await destroyed.wait()
            assert _dom0_mappings(hypervisor) == mapped - BIG[0] * BIG[1] * 4 // 4096
            await attacker.destroy_dumb(bufs[1])
            await _honest_flips(machine, honest, 2)
            assert _device(machine, ATTACKER).status.violations == 0
            await show_frames(machine, attacker, 30, count=2, output="A0")


async def test_a_teardown_waits_for_a_copy_in_flight(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(60):
        async with attacked_machine(hypervisor, tmp_path, monkeypatch) as (
            machine, attacker, honest, gate, _workers,
        ):
            device = _device(machine, ATTACKER)
            connection = device.connection
            assert connection is not None
            _bufs, fbs = await _big_frame(attacker, 1, 5)
            async with trio.open_nursery() as nursery:

                async def set_config_fails() -> None:
                    with pytest.raises(GuestRequestError):  # the device resets under it
                        await attacker.set_config(1, fbs[0])

                nursery.start_soon(set_config_fails)
                await wait_until(lambda: gate.held == 1 or gate.on_loop > 0)
                assert gate.on_loop == 0, "a copy ran on the event loop's thread"
                # A broken ring on connector 0: the device's connection is torn down while
                # connector 1's copy still reads the guest's pages.
                attacker.hostile.scribble_ring(0, "req_prod", 1000)
                attacker.hostile.notify(0)
                await wait_until(lambda: device.status.violations == 1)
                await _honest_flips(machine, honest, 3)  # the loop goes on meanwhile
                assert device.connection is connection, "torn down under a running copy"
                gate.open.set()
            await wait_until(lambda: attacker.stats.disconnects == 1)
            await attacker.wait_connected()
            await show_frames(machine, attacker, 40, count=2, output="A0")


async def test_detaching_the_frame_on_screen_makes_no_copy_on_the_loop(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept_copies: list[object] = []
    original = virtual_module._kept_copy

    def counting_kept_copy(frame: Any) -> Any:
        kept_copies.append(frame)
        return original(frame)

    monkeypatch.setattr(virtual_module, "_kept_copy", counting_kept_copy)
    with trio.fail_after(60):
        async with attacked_machine(hypervisor, tmp_path, monkeypatch) as (
            machine, attacker, _honest, gate, _workers,
        ):
            gate.open.set()
            output = machine.output("A0")
            live = output.live_framebuffers
            for frame in range(3):  # show a big frame, then detach it while on screen
                bufs, fbs = await _big_frame(attacker, 0, frame)
                await attacker.set_config(0, fbs[0])
                await attacker.rm_fb(fbs[0])
                assert shown(output) == (0, frame)  # still shown: the last frame stays
                await attacker.rm_fb(fbs[1])
                for buf in bufs:
                    await attacker.destroy_dumb(buf)
            assert kept_copies == [], "the output copied a released frame on the event loop"
            # Only the dumb buffer on screen is kept, not one per frame shown, and it stays
            # charged to the guest until it goes.
            assert output.live_framebuffers == live + 1
            store = _device(machine, ATTACKER).status.store
            assert store is not None
            assert (store.quota.display_fbs, store.quota.copy_bytes) == (1, BIG[0] * BIG[1] * 4)
            await show_frames(machine, attacker, 70, count=2, output="A0")
            assert output.live_framebuffers == live
            assert (store.quota.display_fbs, store.quota.copy_bytes) == (0, 0)


def _count_calls(obj: Any, name: str, count: Callable[[Any, Any], int]) -> list[int]:
    """Wrap ``obj.name`` (an instance attribute); ``total[0]`` adds ``count(args, result)``."""
    original = getattr(obj, name)
    total = [0]

    def wrapper(*args: Any) -> Any:
        result = original(*args)
        total[0] += count(args, result)
        return result

    setattr(obj, name, wrapper)
    return total


async def _flood(guest: SimGuest, channel: str, seconds: float) -> tuple[int, float]:
    """Notify connector 0's ``channel`` in a loop (yielding each time) for ``seconds``."""
    start = trio.current_time()
    sent = 0
    while trio.current_time() - start < seconds:
        guest.hostile.notify(0, channel)
        sent += 1
        await trio.sleep(0)
    return sent, trio.current_time() - start


async def test_a_request_channel_flood_costs_a_bounded_number_of_wakeups(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(60):
        async with attacked_machine(hypervisor, tmp_path, monkeypatch) as (
            machine, attacker, honest, gate, _workers,
        ):
            gate.open.set()
            connection = _device(machine, ATTACKER).connection
            assert connection is not None
            req_port = connection.connectors[0].req_port
            evtchn = connection._evtchn
            unmasks = _count_calls(
                evtchn, "unmask", lambda args, _result: args[0].count(req_port))
            sent, elapsed = await _flood(attacker, "req", 1.0)
            budget = SPURIOUS_WAKEUP_BURST + SPURIOUS_WAKEUPS_PER_SECOND * elapsed + 10
            assert unmasks[0] <= budget, (
                f"{unmasks[0]} wake-ups for {sent} notifications in {elapsed:.2f} s")
            assert sent > 3 * budget, "the flood was too slow to tell anything"
            await _honest_flips(machine, honest, 3)
            await show_frames(machine, attacker, 50, count=2, output="A0")
            assert _device(machine, ATTACKER).status.violations == 0
            assert connection.connectors[0].stats.wakeups_throttled > 0
            honest_connection = _device(machine, HONEST).connection
            assert honest_connection is not None
            assert honest_connection.connectors[0].stats.wakeups_throttled == 0


async def test_an_event_channel_flood_costs_one_wakeup(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(60):
        async with attacked_machine(hypervisor, tmp_path, monkeypatch) as (
            machine, attacker, honest, gate, _workers,
        ):
            gate.open.set()
            connection = _device(machine, ATTACKER).connection
            assert connection is not None
            evt_port = connection.connectors[0].evt_port
            reports = _count_calls(
                connection._evtchn, "read_pending", lambda _args, fired: fired.count(evt_port))
            sent, _elapsed = await _flood(attacker, "evt", 0.5)
            assert sent > 100
            assert reports[0] <= 1, f"the event port woke us {reports[0]} times for {sent}"
            await _honest_flips(machine, honest, 3)
            await show_frames(machine, attacker, 60, count=2, output="A0")
