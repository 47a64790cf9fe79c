"""A hostile guest against the daemon: garbage requests, forged directories, broken rings and
event pages, bogus XenStore nodes. Errors for requests, a closed (and later reconnected)
device for broken transports; the daemon and other guests carry on; nothing leaks."""

from __future__ import annotations

import contextlib
import errno
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from displback.protocol.constants import EINVAL, Op
from displback.protocol.layout import REQ_RING_REF, connector_dir
from displback.protocol.xenbus import XenbusState
from displback.sim.guest import (
    DumbBuffer,
    FlipResult,
    GuestRequestError,
    RequestHook,
    SimGuest,
)
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import SimMachine, sim_machine
from tests.backend.support import (
    SPEC,
    connected_guest,
    flips_continue,
    new_guest_buffers,
    show,
    show_frames,
    store_of,
    wait_until,
)


async def test_garbage_requests_get_answers_and_never_close_the_device(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    rng = random.Random(20240601)
    with trio.fail_after(30):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            bufs, fbs = await new_guest_buffers(guest, 320, 240)
            # Known cookies make the garbage reach deeper checks now and then.
            cookies = [b.cookie for b in bufs] + [f.cookie for f in fbs]
            answered = 0
            for n in range(300):
                packet = bytearray(rng.randbytes(64))
                if n % 3:  # a known operation with a garbage body
                    packet[2] = rng.choice(list(Op))
                if n % 5 == 0:
                    struct.pack_into("<Q", packet, 8, rng.choice(cookies))
                try:
                    await guest.raw_request(0, bytes(packet))
                except GuestRequestError as exc:
                    assert exc.errno != errno.ETIMEDOUT
                answered += 1
            assert answered == 300
            stats = guest.connector_stats(0)
            assert stats.response_timeouts == 0 and stats.responses_ignored == 0
            assert guest.stats.disconnects == 0
            [status] = w.backend.statuses()
            assert status.violations == 0
            # The garbage may have detached or destroyed ours (their cookies are known):
            # that is the guest's own doing, answered like any request.
            await guest.set_config(0, None)
            for call in [*(guest.rm_fb(f) for f in fbs),
                         *(guest.destroy_dumb(b) for b in bufs)]:
                with contextlib.suppress(GuestRequestError):
                    await call
            await show_frames(w, guest, 10, count=2)


def _forge(guest: SimGuest, page: int, offset: int, value: int | str) -> None:
    """Before the next DBUF_CREATE, overwrite one u32 of its directory page ``page``."""

    def scribble(buf: DumbBuffer) -> None:
        number = buf.dir_grefs[page] if value == "self" else int(value)
        guest.scribble_directory(buf, page, offset, struct.pack("<I", number))

    guest.on_directory = scribble


@pytest.mark.parametrize(
    ("page", "offset", "value"),
    [
        (0, 0, "self"),  # page 0 chains to itself: a loop
        (0, 0, 0),  # the chain ends one page early
        (1, 0, 12345),  # the last page chains on
        (0, 4 + 4 * 500, 0xFFFF_FFF0),  # a buffer page no one granted
        (1, 4 + 4 * 3, 0),  # a zero ref
    ],
    ids=["loop", "short-chain", "chain-past-the-end", "bad-ref", "zero-ref"],
)
async def test_forged_directories_are_refused_and_leave_nothing_mapped(
    hypervisor: HypervisorThread, tmp_path: Path, page: int, offset: int, value: int | str
) -> None:
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            _forge(guest, page, offset, value)
            with pytest.raises(GuestRequestError) as exc:
                await guest.create_dumb(1024, 1500, 32)  # 1500 pages, 2 directory pages
            assert exc.value.errno == EINVAL
            guest.on_directory = None
            assert guest.pending_end_access == 0  # the backend kept nothing mapped
            assert store_of(w, 1).stats.buffers == 0
            big = await guest.create_dumb(1024, 1500, 32)
            await guest.destroy_dumb(big)
            await show_frames(w, guest, 1, count=2)


async def test_requests_pointing_at_the_wrong_pages_are_refused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            ring_gref = int(await guest.xenstore.read(
                f"{connector_dir(1, 0, 0)}/{REQ_RING_REF}"))
            for gref in (ring_gref, 0xFFFF_FFFE):
                guest.set_request_hook(Op.DBUF_CREATE, _at(36, gref))
                with pytest.raises(GuestRequestError):
                    await guest.create_dumb(320, 240, 32)
                guest.set_request_hook(Op.GET_EDID, _at(12, gref))
                with pytest.raises(GuestRequestError):
                    await guest.get_edid(0)
            guest.set_request_hook(Op.DBUF_CREATE, None)
            guest.set_request_hook(Op.GET_EDID, None)
            assert guest.connected and guest.pending_end_access == 0
            await show_frames(w, guest, 1, count=2)


def _at(offset: int, value: int) -> RequestHook:
    def hook(raw: bytes) -> bytes:
        out = bytearray(raw)
        struct.pack_into("<I", out, offset, value)
        return bytes(out)

    return hook


async def test_stray_notifications_change_nothing(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            for _ in range(200):
                guest.notify(0, "evt")
                guest.notify(0, "req")
            await trio.sleep(0.05)
            await show_frames(w, guest, 1, count=2)
            assert guest.stats.disconnects == 0


async def _broken_transport_closes_only_that_device(
    w: SimMachine, break_it: Callable[[SimGuest], None], *, flip_after: bool
) -> None:
    await w.add_guest(1, SPEC)
    await w.add_guest(2, SPEC)
    async with w.guest(1) as bad:
        await bad.wait_connected()  # output A
        async with w.guest(2) as good:
            await good.wait_connected()  # output B
            good.start_drawing(fps=200)
            await flips_continue(good)
            bufs, fbs = await show(bad, 0, 320, 240)
            break_it(bad)
            if flip_after:
                assert await bad.page_flip(0, fbs[1]) in (FlipResult.RELEASED,
                                                          FlipResult.FRAME_DONE_TIMEOUT)
            await wait_until(lambda: bad.stats.disconnects == 1)
            [status, _] = w.backend.statuses()
            assert status.violations >= 1
            for buf in bufs:  # the reset freed them; the handles are stale
                assert buf.freed
            await bad.wait_connected()  # after the back-off
            await show_frames(w, bad, 20, count=2)
            await flips_continue(good)
            stats = good.connector_stats(0)
            assert stats.frame_done_timeouts == stats.flip_errors == 0
            assert good.stats.disconnects == 0


@pytest.mark.parametrize(
    ("field", "value"), [("req_prod", 1000), ("req_prod", 0xFFFF_FFF0)],
    ids=["ahead", "behind"],
)
async def test_a_broken_request_ring_closes_only_that_device_which_comes_back(
    hypervisor: HypervisorThread, tmp_path: Path, field: str, value: int
) -> None:
    def break_it(guest: SimGuest) -> None:
        guest.scribble_ring(0, field, value)
        guest.notify(0)

    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as w:
            await _broken_transport_closes_only_that_device(w, break_it, flip_after=False)


async def test_a_broken_event_page_closes_only_that_device_which_comes_back(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    def break_it(guest: SimGuest) -> None:
        guest.scribble_event_page(0, "in_cons", 1000)  # consumed events never produced

    with trio.fail_after(20):
        async with sim_machine(hypervisor, tmp_path) as w:
            await _broken_transport_closes_only_that_device(w, break_it, flip_after=True)


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
                            await guest.raw_request(0, packet)
                        except GuestRequestError as exc:
                            assert exc.errno != errno.ETIMEDOUT

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(garbage, g1)
                    nursery.start_soon(garbage, g2)
                    g3.scribble_ring(0, "req_prod", 77)
                    g3.notify(0)
                await wait_until(lambda: g3.stats.disconnects == 1)
                g3.crash()
                await w.toolstack.destroy_domain(3)
                await wait_until(lambda: len(w.backend.devices) == 2)
            await w.add_guest(4, SPEC)
            async with w.guest(4) as g4:
                await g4.wait_connected()
                await show_frames(w, g4, 1, count=2)
            assert not w.backend_scope.cancel_called

