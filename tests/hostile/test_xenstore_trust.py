"""XenStore tampering by a hostile guest: configuration nodes the toolstack did not write are
never believed.

Every attack runs beside an honest guest (domain 2) that keeps its output and its frames
throughout; the attacker is domain 1. An attacked device is refused (the daemon answers its
Initialised with Closed and one "connect failed" line naming the node), holds no output and
no quota, and nothing leaks (the ``hypervisor`` fixture checks it after every test).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from displback.protocol.layout import (
    BE_ALLOC,
    EVT_EVENT_CHANNEL,
    EVT_RING_REF,
    REQ_EVENT_CHANNEL,
    REQ_RING_REF,
    RESOLUTION,
    UNIQUE_ID,
    connector_dir,
    frontend_dir,
)
from displback.protocol.xenbus import XenbusState
from displback.sim import xenstored as xenstored_module
from displback.sim.guest import SimGuest
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import SimMachine, sim_machine
from displback.sim.xenstore_tree import Session
from displback.xenstore.client import Perm, Transaction, XenStoreClient, open_xenstore
from displback.xenstore.wire import MsgType, Packet
from tests.backend.support import show_frames

ATTACKER, HONEST, THIRD = 1, 2, 3
ATTACKER_SPEC = "connectors=a0:320x240"
HONEST_SPEC = "connectors=h0:320x240"
FE = frontend_dir(ATTACKER, 0)
C0 = connector_dir(ATTACKER, 0, 0)
C1 = connector_dir(ATTACKER, 0, 1)
TRANSPORT = (REQ_RING_REF, REQ_EVENT_CHANNEL, EVT_RING_REF, EVT_EVENT_CHANNEL)

Tamper = Callable[[XenStoreClient], Awaitable[None]]


# --- the scene ------------------------------------------------------------------------------


def output_of(machine: SimMachine, domid: int) -> str | None:
    """The name of the output connector 0 of ``domid``'s device shows, if connected."""
    for status in machine.backend.statuses():
        if status.domid == domid and status.connectors:
            output = status.connectors[0].output
            return None if output is None else str(output.name)
    return None


def held_by(machine: SimMachine, domid: int) -> list[str]:
    """Outputs any connector of ``domid`` holds."""
    omap: Any = machine.backend.outputs
    return [n for n in machine.display.outputs if (omap.holder(n) or "").startswith(f"{domid}/")]


@asynccontextmanager
async def beside_an_honest_guest(
    hypervisor: HypervisorThread, tmp_path: Path, **machine_options: Any
) -> AsyncIterator[SimMachine]:
    """A machine whose honest guest is connected and showing frames on its output; after the
    block, it still is (new frames reach the same output) and holds its output alone."""
    async with sim_machine(hypervisor, tmp_path, **machine_options) as machine:
        await machine.add_guest(HONEST, HONEST_SPEC)
        async with machine.guest(HONEST) as honest:
            await honest.wait_connected()
            output = output_of(machine, HONEST)
            assert output is not None
            await show_frames(machine, honest, 1, output=output)
            yield machine
            assert output_of(machine, HONEST) == output
            await show_frames(machine, honest, 10, output=output)
            assert honest.stats.disconnects == 0 and honest.stats.fatal_errors == 0


@asynccontextmanager
async def as_domain(machine: SimMachine, domid: int) -> AsyncIterator[XenStoreClient]:
    """A raw XenStore connection acting as ``domid`` (checked as xenstored checks a guest)."""
    if domid not in machine.xs.domain_sockets:
        machine.toolstack.create_domain(domid, f"guest{domid}")
        await machine.xs.add_domain_socket(domid)
    async with open_xenstore(machine.xs.domain_sockets[domid]) as xs:
        yield xs


async def expect_refused(machine: SimMachine, logs: list[dict[str, Any]], node: str,
                         *, guest: Callable[[SimGuest], None] | None = None) -> None:
    """Run the attacker's frontend: the daemon must refuse the device, naming ``node``, give
    it no output, and keep refusing until the guest gives up."""
    async with machine.guest(ATTACKER) as attacker:
        if guest is not None:
            guest(attacker)
        await attacker.wait_state(
            lambda g: g.connected or g.backend_state is XenbusState.CLOSED)
        assert not attacker.connected, "the daemon served a tampered configuration"
        refusals = [e for e in logs if e.get("domid") == ATTACKER
                    and e["event"] == "connect failed"]
        assert refusals, "no log line says why the device was refused"
        assert node in refusals[0]["error"], refusals[0]["error"]
        assert held_by(machine, ATTACKER) == []


async def rm_and_rewrite(xs: XenStoreClient | Transaction, directory: str,
                         values: dict[str, str]) -> None:
    """What C xenstored lets a guest do to a directory it owns: remove it (the read-only nodes
    in it go with it) and write nodes of its choice, which it then owns."""
    await xs.rm(directory)
    for name, value in values.items():
        await xs.write(f"{directory}/{name}", value)


# --- attacks --------------------------------------------------------------------------------


async def test_a_connector_the_guest_adds_is_refused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(30), capture_logs() as logs:
        async with beside_an_honest_guest(hypervisor, tmp_path) as machine:
            await machine.add_guest(ATTACKER, ATTACKER_SPEC)
            async with as_domain(machine, ATTACKER) as xs:
                await xs.write(f"{C1}/{RESOLUTION}", "640x480")
                await xs.write(f"{C1}/{UNIQUE_ID}", "extra")
            await expect_refused(machine, logs, f"1/{RESOLUTION}")


async def test_a_connector_the_guest_replaces_is_refused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(30), capture_logs() as logs:
        async with beside_an_honest_guest(hypervisor, tmp_path) as machine:
            await machine.add_guest(ATTACKER, ATTACKER_SPEC)
            async with as_domain(machine, ATTACKER) as xs:
                await rm_and_rewrite(xs, C0, {RESOLUTION: "640x480", UNIQUE_ID: "a0"})
            await expect_refused(machine, logs, f"0/{RESOLUTION}")


async def test_a_unique_id_the_guest_replaces_is_refused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(30), capture_logs() as logs:
        async with beside_an_honest_guest(hypervisor, tmp_path) as machine:
            await machine.add_guest(ATTACKER, ATTACKER_SPEC)
            async with as_domain(machine, ATTACKER) as xs:
                resolution = (await xs.read(f"{C0}/{RESOLUTION}")).decode()
                await rm_and_rewrite(xs, C0, {RESOLUTION: resolution})
                # the resolution is now the guest's too; a connector with only its own id
                # forged is refused just the same
                await xs.rm(f"{C0}/{RESOLUTION}")
            dom0 = machine.xs.xenstored.session(0)  # the toolstack restores its node
            dom0.write(f"{C0}/{RESOLUTION}", resolution.encode())
            dom0.set_perms(f"{C0}/{RESOLUTION}", (Perm(0, "n"), Perm(ATTACKER, "r")))
            dom0.close()
            async with as_domain(machine, ATTACKER) as xs:
                await xs.write(f"{C0}/{UNIQUE_ID}", "h0")
            await expect_refused(machine, logs, f"0/{UNIQUE_ID}")


async def test_a_be_alloc_the_guest_replaces_is_refused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """With ``xend_suspend_evtchn_compat`` libxl leaves ``device/`` to the guest, so it can
    rebuild its whole device directory in one transaction, ``be-alloc`` included."""
    with trio.fail_after(30), capture_logs() as logs:
        async with beside_an_honest_guest(hypervisor, tmp_path) as machine:
            machine.toolstack.create_domain(ATTACKER, "guest1", xend_suspend_evtchn_compat=True)
            await machine.xs.add_domain_socket(ATTACKER)
            await machine.add_guest(ATTACKER, ATTACKER_SPEC)
            async with as_domain(machine, ATTACKER) as xs:
                saved = {n: (await xs.read(f"{FE}/{n}")).decode()
                         for n in ("backend", "backend-id", "state",
                                   f"0/{RESOLUTION}", f"0/{UNIQUE_ID}")}

                async def rebuild(tx: Transaction) -> None:
                    await rm_and_rewrite(tx, FE, {**saved, BE_ALLOC: "1"})

                await xs.run_transaction(rebuild)
            await expect_refused(machine, logs, BE_ALLOC)


async def test_a_guest_cannot_claim_another_guests_output_by_unique_id(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """The admin gave output B to the honest guest's connector (by its unique-id ``h0``, and
    by its key ``2/0/0`` for a second honest device): the attacker forges both as its own
    unique-id and connects first; the honest devices still get B and C."""
    assignments = {"h0": "B", "2/1/0": "C"}
    with trio.fail_after(30), capture_logs() as logs:
        async with sim_machine(hypervisor, tmp_path, assignments=assignments) as machine:
            for devid, forged in ((0, "h0"), (1, "2/1/0")):
                await machine.add_guest(ATTACKER, ATTACKER_SPEC, devid=devid)
                async with as_domain(machine, ATTACKER) as xs:
                    await rm_and_rewrite(xs, connector_dir(ATTACKER, devid, 0),
                                         {RESOLUTION: "320x240", UNIQUE_ID: forged})
            async with machine.guest(ATTACKER, devid=0) as first, \
                    machine.guest(ATTACKER, devid=1) as second:
                for attacker in (first, second):
                    await attacker.wait_state(
                        lambda g: g.connected or g.backend_state is XenbusState.CLOSED)
                assert held_by(machine, ATTACKER) == []
                await machine.add_guest(HONEST, HONEST_SPEC)
                await machine.add_guest(HONEST, HONEST_SPEC, devid=1)
                async with machine.guest(HONEST) as honest, \
                        machine.guest(HONEST, devid=1) as honest2:
                    await honest.wait_connected()
                    await honest2.wait_connected()
                    await show_frames(machine, honest, 1, output="B")
                    await show_frames(machine, honest2, 1, output="C")
                assert not first.connected and not second.connected
    assert any(e.get("domid") == ATTACKER and e["event"] == "connect failed" for e in logs)


async def test_a_node_a_third_domain_wrote_is_refused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """The guest hands its directory to a colluding domain, which writes a connector for it
    and gives it read access: the owner is neither the guest nor the toolstack."""
    with trio.fail_after(30), capture_logs() as logs:
        async with beside_an_honest_guest(hypervisor, tmp_path) as machine:
            await machine.add_guest(ATTACKER, ATTACKER_SPEC)
            async with as_domain(machine, ATTACKER) as xs:
                await xs.set_perms(FE, [Perm(ATTACKER, "n"), Perm(0, "r"), Perm(THIRD, "b")])
                await xs.rm(C0)
            async with as_domain(machine, THIRD) as third:
                await third.write(f"{C0}/{RESOLUTION}", "640x480")
                await third.write(f"{C0}/{UNIQUE_ID}", "a0")
                await third.set_perms(C0, [Perm(THIRD, "n"), Perm(ATTACKER, "b")])
                for node in (RESOLUTION, UNIQUE_ID):
                    await third.set_perms(f"{C0}/{node}", [Perm(THIRD, "n"),
                                                           Perm(ATTACKER, "r")])
            await expect_refused(machine, logs, f"0/{RESOLUTION}")


async def test_a_toolstack_node_others_may_write_is_refused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """Owned by the toolstack, but writable by the guest (a toolstack bug or a careless
    ``xenstore-chmod``): the guest could change it at any time, so it is not configuration."""
    with trio.fail_after(30), capture_logs() as logs:
        async with beside_an_honest_guest(hypervisor, tmp_path) as machine:
            await machine.add_guest(ATTACKER, ATTACKER_SPEC)
            dom0 = machine.xs.xenstored.session(0)
            dom0.set_perms(f"{C0}/{RESOLUTION}", (Perm(0, "n"), Perm(ATTACKER, "b")))
            dom0.close()
            await expect_refused(machine, logs, f"0/{RESOLUTION}")


@pytest.mark.parametrize(
    ("node", "value"),
    [
        (f"0/{RESOLUTION}", "16385x240"),
        (f"0/{RESOLUTION}", "0x240"),
        (f"0/{RESOLUTION}", "4294967616x240"),
        (f"0/{UNIQUE_ID}", "has:colon"),
        (BE_ALLOC, "-1"),
    ],
)
async def test_toolstack_values_out_of_range_are_refused(
    hypervisor: HypervisorThread, tmp_path: Path, node: str, value: str
) -> None:
    """Even the toolstack's own nodes are parsed strictly: a value out of range refuses the
    device (a configuration error, said once per attempt) and costs nothing else. (Written
    once the guest has read its configuration, so that the daemon, not the guest, meets it.)"""

    def spoil(guest: SimGuest) -> None:
        dom0 = machine.xs.xenstored.session(0)
        dom0.write(f"{FE}/{node}", value.encode())
        dom0.close()

    def install(guest: SimGuest) -> None:
        guest.on_published = spoil

    with trio.fail_after(30), capture_logs() as logs:
        async with beside_an_honest_guest(hypervisor, tmp_path) as machine:
            await machine.add_guest(ATTACKER, ATTACKER_SPEC)
            await expect_refused(machine, logs, node, guest=install)


@pytest.mark.parametrize(
    "value", ["4294967296", "-1", "0x10", "", "1 ", "9" * 4000, "\u00e9"]
)
async def test_guest_transport_values_out_of_range_are_refused(
    hypervisor: HypervisorThread, tmp_path: Path, value: str
) -> None:
    """The guest's own nodes (grant refs, ports) out of range: a failed connect naming the
    node, nothing mapped, nothing bound."""
    node = f"0/{REQ_EVENT_CHANNEL}"

    async def spoil(guest: SimGuest) -> None:
        await guest.xenstore.write(f"{FE}/{node}", value)

    def install(guest: SimGuest) -> None:
        guest.on_published = spoil

    with trio.fail_after(30), capture_logs() as logs:
        async with beside_an_honest_guest(hypervisor, tmp_path) as machine:
            await machine.add_guest(ATTACKER, ATTACKER_SPEC)
            await expect_refused(machine, logs, node, guest=install)


async def test_tampering_between_initwait_and_initialised_is_refused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """The guest read its configuration and published its rings, then — before it says
    Initialised — swaps connector 0's resolution for a bigger one (and re-publishes the rings
    the removal took with it)."""

    async def swap(guest: SimGuest) -> None:
        xs = guest.xenstore
        transport = {n: (await xs.read(f"{C0}/{n}")).decode() for n in TRANSPORT}
        await rm_and_rewrite(xs, C0, {RESOLUTION: "640x480", UNIQUE_ID: "a0", **transport})

    def install(guest: SimGuest) -> None:
        guest.on_published = swap

    with trio.fail_after(30), capture_logs() as logs:
        async with beside_an_honest_guest(hypervisor, tmp_path) as machine:
            await machine.add_guest(ATTACKER, ATTACKER_SPEC)
            await expect_refused(machine, logs, f"0/{RESOLUTION}", guest=install)


async def test_a_refused_device_is_served_again_once_the_toolstack_rewrites_it(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """The refusal is no verdict on the domain: once the toolstack's nodes are back (here
    xl vdispl-detach + attach), the same guest is served as configured."""
    with trio.fail_after(30), capture_logs() as logs:
        async with beside_an_honest_guest(hypervisor, tmp_path) as machine:
            await machine.add_guest(ATTACKER, ATTACKER_SPEC)
            async with as_domain(machine, ATTACKER) as xs:
                await xs.write(f"{C1}/{RESOLUTION}", "640x480")
            await expect_refused(machine, logs, f"1/{RESOLUTION}")
            await machine.toolstack.remove_vdispl(ATTACKER, 0)
            await machine.add_guest(ATTACKER, ATTACKER_SPEC)
            async with machine.guest(ATTACKER) as attacker:
                await attacker.wait_connected()
                assert attacker.resolutions == [(320, 240)]
                name = output_of(machine, ATTACKER)
                assert name is not None
                await show_frames(machine, attacker, 1, output=name)


async def test_tampering_while_the_daemon_reads_its_configuration_is_refused(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest strikes between two of the daemon's reads: right after the daemon checked
    ``0/resolution``, the guest removes ``0/`` (the ``unique-id`` the daemon reads next goes
    with it) and writes the same resolution back as its own. Read piecemeal, the daemon would
    take a connector with no unique-id; read in one transaction, the commit fails, the reads
    are redone and the guest's node is seen for what it is."""
    handlers: Any = xenstored_module._HANDLERS
    original = handlers[MsgType.GET_PERMS]
    struck: list[bool] = []

    def get_perms(session: Session, request: Packet) -> bytes:
        reply: bytes = original(session, request)
        if (session.domid == 0 and not struck
                and request.payload == f"{C0}/{RESOLUTION}\0".encode()):
            struck.append(True)
            guest = session.tree.session(ATTACKER)
            resolution = guest.read(f"{C0}/{RESOLUTION}")
            transport = {n: guest.read(f"{C0}/{n}") for n in TRANSPORT}
            guest.rm(C0)
            for name, value in {RESOLUTION: resolution, **transport}.items():
                guest.write(f"{C0}/{name}", value)
            guest.close()
        return reply

    monkeypatch.setitem(handlers, MsgType.GET_PERMS, get_perms)
    with trio.fail_after(30), capture_logs() as logs:
        async with beside_an_honest_guest(hypervisor, tmp_path) as machine:
            await machine.add_guest(ATTACKER, ATTACKER_SPEC)
            await expect_refused(machine, logs, f"0/{RESOLUTION}")
    assert struck


async def test_a_connector_the_guest_removes_ends_the_list_at_both_ends(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """A guest may throw away its own connectors (it owns ``i/``): removing the middle one of
    three leaves a gap, where Linux stops reading and so does the daemon. The guest is served
    the one connector before the gap — what it asked for, and less than it was given — and the
    trusted connector after the gap holds nothing."""
    with trio.fail_after(30):
        async with beside_an_honest_guest(hypervisor, tmp_path) as machine:
            await machine.add_guest(
                ATTACKER, "connectors=a0:320x240;a1:320x240;a2:320x240")
            async with as_domain(machine, ATTACKER) as xs:
                await xs.rm(C1)
            async with machine.guest(ATTACKER) as attacker:
                await attacker.wait_connected()
                assert attacker.resolutions == [(320, 240)]
                [status] = [s for s in machine.backend.statuses() if s.domid == ATTACKER]
                assert [c.config.index for c in status.connectors] == [0]
                assert len(held_by(machine, ATTACKER)) == 1
                name = output_of(machine, ATTACKER)
                assert name is not None
                await show_frames(machine, attacker, 1, output=name)
