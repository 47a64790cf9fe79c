"""Guest shutdown and device removal as libxl does them (issue: every ``xl destroy`` waited
10 s for us and libxl reported an error): the backend answers the toolstack's Closing with
Closed at once, whether or not the frontend directory is still there, forgets the device only
once its backend directory is gone, and then does no more work for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from displback.protocol.layout import frontend_dir
from displback.sim.guest import SimGuest
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import SimMachine, sim_machine
from tests.backend.support import SPEC, flips_continue, show_frames, wait_until

#: libxl waits 10 s (LIBXL_DESTROY_TIMEOUT); a prompt backend answers in milliseconds.
PROMPT_S = 3.0


def daemon_requests(w: SimMachine) -> int:
    """XenStore requests the daemon (domain 0's socket) has made so far."""
    return w.xs.xenstored.requests_served[0]


def daemon_watches(w: SimMachine) -> list[str]:
    """The paths domain 0's connections (the daemon's) watch in the simulated xenstored."""
    return [path for conn in w.xs.xenstored.connections if conn.session.domid == 0
            for path, _token in conn.session.watches]


async def assert_idle(w: SimMachine, *, forgotten: tuple[str, ...] = ()) -> None:
    """The daemon has settled and works no more for what it let go: the whole machine but
    the hypervisor lives in this trio loop, so once every task is blocked (a daemon looping
    on XenStore never is: each reply wakes it) it has no request in flight; it watches no
    node under the ``forgotten`` paths; and a write to each of them (a late frontend, a
    toolstack's cleanup) costs it no XenStore request once the loop has settled again."""
    await trio.testing.wait_all_tasks_blocked()
    watched = daemon_watches(w)
    assert not [p for p in watched for f in forgotten if p == f or p.startswith(f + "/")]
    before = daemon_requests(w)
    dom0 = w.xs.xenstored.session(0)
    try:
        for path in forgotten:
            # Poke the node, then take away what the poke created (its first new ancestor).
            created = path
            while not dom0.exists(created.rsplit("/", 1)[0]):
                created = created.rsplit("/", 1)[0]
            existed = dom0.exists(path)
            dom0.write(f"{path}/state", b"1")
            await trio.testing.wait_all_tasks_blocked()
            assert daemon_requests(w) - before == 0, f"the daemon still acts on {path}"
            dom0.rm(f"{path}/state" if existed else created)
    finally:
        dom0.close()
    await trio.testing.wait_all_tasks_blocked()
    assert daemon_requests(w) - before == 0


@asynccontextmanager
async def flipping_guest(
    w: SimMachine, domid: int = 1, spec: str = SPEC
) -> AsyncIterator[SimGuest]:
    """Guest ``domid`` with vdispl ``spec``, connected and flipping on every connector."""
    await w.add_guest(domid, spec)
    async with w.guest(domid) as guest:
        await guest.wait_connected()
        guest.start_drawing(fps=200)
        for connector in range(len(guest.resolutions)):
            await flips_continue(guest, connector)
        yield guest


async def removed(w: SimMachine, domid: int = 1) -> None:
    """libxl reported no error, the daemon forgot every device and then does nothing."""
    assert w.toolstack.errors == []
    await wait_until(lambda: not w.backend.devices)
    await assert_idle(w, forgotten=(frontend_dir(domid, 0),))


async def test_xl_destroy_mid_flip_is_answered_at_once_without_libxl_error(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with sim_machine(hypervisor, tmp_path) as w:
            async with flipping_guest(w, spec="connectors=c0:320x240;c1:160x120") as guest:
                with trio.fail_after(PROMPT_S):
                    assert await w.toolstack.destroy_domain(1)
                guest.crash()  # the domain is gone
            await removed(w)


async def test_xl_destroy_of_a_crashed_guest_is_answered_at_once(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with sim_machine(hypervisor, tmp_path) as w:
            async with flipping_guest(w) as guest:
                guest.crash()
                with trio.fail_after(PROMPT_S):
                    assert await w.toolstack.destroy_domain(1)
            await removed(w)


async def test_xl_shutdown_guest_closes_without_waiting_then_destroy_is_prompt(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    # Linux's poweroff writes Closing on each Connected frontend and waits 5 s for the
    # backend's Closing; xl's monitor then destroys the domain.
    with trio.fail_after(30):
        async with sim_machine(hypervisor, tmp_path) as w:
            async with flipping_guest(w) as guest:
                with trio.fail_after(PROMPT_S):
                    assert await guest.shutdown(), "the guest waited for our Closing in vain"
                    assert await w.toolstack.destroy_domain(1)
            await removed(w)


async def test_xl_reboot_destroys_promptly_and_the_new_domain_connects(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(40):
        async with sim_machine(hypervisor, tmp_path) as w:
            async with flipping_guest(w) as guest:
                with trio.fail_after(PROMPT_S):
                    assert await guest.shutdown()
                    assert await w.toolstack.destroy_domain(1)
            # xl reboot re-creates the guest under a new domain id.
            await w.add_guest(2, SPEC)
            async with w.guest(2) as guest:
                await guest.wait_connected()
                await show_frames(w, guest, 1)
            assert w.toolstack.errors == []


async def test_vdispl_detach_on_a_running_guest_is_answered_at_once_and_attach_serves_again(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(40):
        async with sim_machine(hypervisor, tmp_path) as w:
            async with flipping_guest(w) as guest:
                with trio.fail_after(PROMPT_S):
                    assert await w.toolstack.remove_vdispl(1, 0)
                await wait_until(lambda: not w.backend.devices)
                guest.crash()  # its driver is unbound; the device is gone
            await removed(w)
            # xl vdispl-attach: the same device number again, a fresh connection.
            await w.toolstack.add_vdispl(1, SPEC, devid=0)
            async with w.guest(1) as guest:
                await guest.wait_connected()
                await show_frames(w, guest, 1)


async def test_twenty_guests_created_and_destroyed_in_a_row_each_promptly(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(120):
        async with sim_machine(hypervisor, tmp_path) as w:
            for domid in range(1, 21):
                await w.add_guest(domid, SPEC)
                async with w.guest(domid) as guest:
                    await guest.wait_connected()
                    with trio.fail_after(PROMPT_S):
                        assert await w.toolstack.destroy_domain(domid)
                    guest.crash()
            await removed(w)
