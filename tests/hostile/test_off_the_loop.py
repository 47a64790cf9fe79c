"""A guest's heavy requests run off the event loop, within its share of the copy workers.

A guest that releases frames on screen makes the output keep a copy of each (its memory must
go, the screen must not go dark): up to 32 MiB per FB_DETACH or DBUF_DESTROY, one per vblank
and connector, in zero-copy mode where the frame on screen is the guest's own memory. And
each DBUF_CREATE reads a directory and maps or exports up to 8187 grants. On the event loop
both held every guest's flips (a guest churning its largest buffers: honest p99 flip latency
×3 in ``make bench``'s ``fairness`` churn runs); gated here, the honest guest flips while the
attacker's work is held in its thread."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from displback.backend.device import BackendSettings
from displback.display import virtual as virtual_module
from displback.sim.guest import SimGuest
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import SimMachine, sim_machine
from tests.backend.support import flip_frame, new_guest_buffers, paint, shown, wait_until
from tests.hostile.test_fairness import ASSIGNMENTS, ATTACKER, BIG, HONEST, OUTPUTS, SPECS, Gate


@asynccontextmanager
async def zero_copy_machine(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[SimMachine, SimGuest, SimGuest, Gate]]:
    """Both guests connected, buffers exported (zero-copy), the attacker's kept copies gated."""
    gate = Gate(threading.get_ident())
    monkeypatch.setattr(virtual_module, "copy_frame", gate.copy)
    async with sim_machine(
        hypervisor, tmp_path, OUTPUTS, assignments=ASSIGNMENTS,
        settings=BackendSettings(copy_workers=2),
    ) as machine:
        for domid, spec in SPECS.items():
            await machine.add_guest(domid, spec)
        async with machine.guest(ATTACKER) as attacker, machine.guest(HONEST) as honest:
            await attacker.wait_connected()
            await honest.wait_connected()
            try:
                yield machine, attacker, honest, gate
            finally:
                gate.open.set()


@pytest.mark.parametrize("release", ["detach", "destroy"])
async def test_releasing_frames_on_screen_keeps_their_copies_off_the_event_loop(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    release: str,
) -> None:
    with trio.fail_after(60):
        async with zero_copy_machine(hypervisor, tmp_path, monkeypatch) as (
            w, attacker, honest, gate,
        ):
            hbufs, hfbs = await new_guest_buffers(honest, 320, 240)
            await honest.set_config(0, hfbs[0])
            bufs, fbs = await new_guest_buffers(attacker, *BIG)
            paint(bufs[0], fbs[0], connector=0, frame=7)
            await attacker.set_config(0, fbs[0])
            assert w.output("A0").current_fb is not None  # the guest's own memory on screen

            async def attack() -> None:
                if release == "detach":
                    await attacker.rm_fb(fbs[0])
                else:
                    await attacker.destroy_dumb(bufs[0])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack)
                await wait_until(lambda: gate.held == 1)  # the kept copy is being made ...
                for frame in range(1, 4):  # ... and the honest guest flips meanwhile
                    await flip_frame(honest, 0, hbufs[frame % 2], hfbs[frame % 2], frame)
                    assert shown(w.output("H")) == (0, frame)
                gate.open.set()
            assert gate.on_loop == 0 and gate.copies == 1
            # The output shows the kept copy of the released frame, not the guest's memory.
            assert w.output("A0").current_fb is None
            assert shown(w.output("A0"), *BIG) == (0, 7)


async def test_a_guest_creating_its_largest_buffers_does_so_off_the_event_loop(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DBUF_CREATE reads the directory and maps or exports up to 8187 grants: 7-13 ms of
    # gntdev calls for the largest buffer. A guest creating and destroying such buffers in a
    # loop held every guest's flips while those calls ran on the event loop.
    from displback.backend import buffers as buffers_module

    loop_thread = threading.get_ident()
    gate = threading.Event()
    held: list[int] = []
    real = buffers_module.read_directory

    def gated(grants: object, domid: int, *args: object, **kwargs: object) -> object:
        if domid == ATTACKER:
            held.append(threading.get_ident())
            if threading.get_ident() != loop_thread:
                gate.wait(timeout=30)
        return real(grants, domid, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(buffers_module, "read_directory", gated)
    with trio.fail_after(60):
        async with zero_copy_machine(hypervisor, tmp_path, monkeypatch) as (
            w, attacker, honest, _,
        ):
            hbufs, hfbs = await new_guest_buffers(honest, 320, 240)
            await honest.set_config(0, hfbs[0])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(attacker.create_dumb, *BIG, 32)
                await wait_until(lambda: bool(held))  # the attacker's create is under way ...
                for frame in range(1, 4):  # ... and the honest guest flips meanwhile
                    await flip_frame(honest, 0, hbufs[frame % 2], hfbs[frame % 2], frame)
                gate.set()
            assert held and loop_thread not in held
