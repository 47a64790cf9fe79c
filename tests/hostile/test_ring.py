"""Request ring and event page corruption. Indexes the guest owns are read once, validated,
and an impossible one resets only the attacker's device (a protocol violation), which comes
back after the back-off; indexes the backend owns are never read back from the page."""

from __future__ import annotations

import errno
import random
import struct
from pathlib import Path

import pytest
import trio

from displback.protocol.constants import RING_REQ_PROD_OFS, RING_RSP_PROD_OFS, Op
from displback.sim.guest import GuestRequestError, SimGuest
from displback.sim.hypervisor import HypervisorThread
from tests.backend.support import show, show_frames, wait_until
from tests.hostile.support import Arena, reset_and_back, rounds, run_attack


def _index(g: SimGuest, name: str) -> int:
    """An index of connector 0's request ring page as it is now."""
    req, _evt = g.hostile.channels(0)
    offset = {"req_prod": RING_REQ_PROD_OFS, "rsp_prod": RING_RSP_PROD_OFS}[name]
    value: int = struct.unpack_from("<I", req.mapping.buffer, offset)[0]
    return value


def _req_prod(g: SimGuest) -> int:
    return _index(g, "req_prod")


async def test_req_prod_far_ahead_resets_only_the_attacker(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        g.hostile.scribble_ring(0, "req_prod", _req_prod(g) + 1000)
        g.hostile.notify(0)
        await reset_and_back(a, g)

    await run_attack(hypervisor, tmp_path, attack)


async def test_req_prod_one_past_the_ring_resets_only_the_attacker(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        g.hostile.scribble_ring(0, "req_prod", _req_prod(g) + 33)  # 33 requests in 32 slots
        g.hostile.notify(0)
        await reset_and_back(a, g)

    await run_attack(hypervisor, tmp_path, attack)


async def test_req_prod_behind_the_consumer_resets_only_the_attacker(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        await g.get_edid(0)  # req_cons moves on to 1
        g.hostile.scribble_ring(0, "req_prod", _req_prod(g) - 1)
        g.hostile.notify(0)
        await reset_and_back(a, g)

    await run_attack(hypervisor, tmp_path, attack)


async def test_req_prod_wrapped_past_two_to_the_32_resets_only_the_attacker(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        g.hostile.scribble_ring(0, "req_prod", _req_prod(g) + 0x8000_0000)  # half the u32 space
        g.hostile.notify(0)
        await reset_and_back(a, g)

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_full_ring_of_garbage_slots_gets_32_error_answers(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """The guest publishes 32 slots it never wrote as requests: each is answered with an
    error; then its own ring index lags the backend's, and the next kick is a violation."""

    async def attack(a: Arena, g: SimGuest) -> None:
        rng = random.Random(32)
        start = _req_prod(g)
        for i in range(32):
            g.hostile.write_ring_slot(0, start + i, bytes([0, 0, rng.choice([0, 0x7F, 0xFF])])
                              + rng.randbytes(61))
        g.hostile.scribble_ring(0, "req_prod", start + 32)
        g.hostile.notify(0)
        stats = a.status().connectors[0].stats
        await wait_until(lambda: stats.errors >= 32)
        assert a.status().violations == 0  # garbage requests are errors, not violations
        g.hostile.scribble_ring(0, "req_prod", start + 1)  # what its own next request publishes
        g.hostile.notify(0)
        await reset_and_back(a, g)

    await run_attack(hypervisor, tmp_path, attack)


async def test_garbage_requests_get_answers_and_never_close_the_device(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """300 random packets, a third of them with a known operation, some naming live cookies:
    each gets an answer, none a timeout; the device stays open."""

    async def attack(a: Arena, g: SimGuest) -> None:
        rng = random.Random(20240601)
        bufs, fbs = await show(g, 0, 320, 240)
        cookies = [b.cookie for b in bufs] + [f.cookie for f in fbs]
        for n in range(300):
            packet = bytearray(rng.randbytes(64))
            if n % 3:
                packet[2] = rng.choice(list(Op))
            if n % 5 == 0:
                struct.pack_into("<Q", packet, 8, rng.choice(cookies))
            try:
                await g.hostile.raw_request(0, bytes(packet))
            except GuestRequestError as exc:
                assert exc.errno != errno.ETIMEDOUT
        stats = g.connector_stats(0)
        assert stats.response_timeouts == 0 and stats.responses_ignored == 0
        assert g.stats.disconnects == 0 and a.status().violations == 0

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_forged_rsp_prod_is_overwritten_not_believed(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """rsp_prod is the backend's: it publishes its own private index over the forgery."""

    async def attack(a: Arena, g: SimGuest) -> None:
        await g.get_edid(0)
        g.hostile.scribble_ring(0, "rsp_prod", 0xDEAD_BEEF)
        assert await g.get_edid(0)  # answered in the right slot, rsp_prod restored
        assert g.stats.disconnects == 0 and a.status().violations == 0

    await run_attack(hypervisor, tmp_path, attack)


@pytest.mark.parametrize("value", [0, 0x7FFF_FFFF, 0xFFFF_FFFF], ids=["zero", "far", "max"])
async def test_rsp_event_games_cost_only_the_attackers_notifications(
    hypervisor: HypervisorThread, tmp_path: Path, value: int
) -> None:
    """A guest moving rsp_event about only decides whether it is notified: the backend
    neither spins nor stops answering; it just may not kick the guest."""

    async def attack(a: Arena, g: SimGuest) -> None:
        more = rounds(0.5)
        answered = 0
        while more():
            g.hostile.scribble_ring(0, "rsp_event", value)
            g.hostile.scribble_ring(0, "req_event", value)
            try:
                await g.get_edid(0)
                answered += 1
            except GuestRequestError as exc:
                assert exc.errno == errno.ETIMEDOUT  # unnotified, never refused
        assert a.status().violations == 0
        assert a.status().connectors[0].stats.requests >= answered
        g.hostile.scribble_ring(0, "rsp_event", _index(g, "rsp_prod") + 1)  # listening again
        g.hostile.scribble_ring(0, "req_event", _index(g, "req_prod") + 1)
        await show_frames(a.machine, g, 7, count=2, output="B")  # notified again

    await run_attack(hypervisor, tmp_path, attack, response_timeout=0.2)


async def test_flapping_req_prod_resets_only_the_attacker(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """req_prod rewritten between random values while the guest keeps notifying."""

    async def attack(a: Arena, g: SimGuest) -> None:
        rng = random.Random(5)
        start = _req_prod(g)
        while g.stats.disconnects == 0:
            g.hostile.scribble_ring(0, "req_prod", start + rng.choice([0, 1, 40, -3, 1 << 31]))
            g.hostile.notify(0)
            await trio.sleep(0.001)
        await reset_and_back(a, g)

    await run_attack(hypervisor, tmp_path, attack)


async def test_in_cons_beyond_in_prod_resets_only_the_attacker(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        _bufs, fbs = await show(g, 0, 320, 240)
        g.hostile.scribble_event_page(0, "in_cons", 1000)  # consumed events never produced
        await g.page_flip(0, fbs[1])  # its event finds the page impossible
        await reset_and_back(a, g)

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_forged_in_prod_is_overwritten_not_believed(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """in_prod is the backend's: the next event is written at its own index."""

    async def attack(a: Arena, g: SimGuest) -> None:
        bufs, fbs = await show(g, 0, 320, 240)
        g.hostile.scribble_event_page(0, "in_prod", 0x1234_5678)
        for frame in range(2, 5):
            # The guest's consumer may skip over the forged range once; the backend goes on.
            await g.page_flip(0, fbs[frame % 2])
        assert a.status().violations == 0
        assert a.status().connectors[0].stats.events_sent >= 3
        del bufs

    await run_attack(hypervisor, tmp_path, attack, frame_done_timeout=0.5)


async def test_an_event_page_never_read_drops_events_at_a_bound(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """The guest stops reading its event page: the page fills, events queue up to a bound
    and then are dropped; the daemon's memory does not grow with the guest's flips."""

    async def attack(a: Arena, g: SimGuest) -> None:
        _bufs, fbs = await show(g, 0, 320, 240)
        stats = a.status().connectors[0].stats
        # The guest's reader stops, so in_cons stays put. (The test used to write 0 into
        # in_cons while the reader ran: the reader moved in_cons on, the backend published up
        # to a page ahead of it, and the next 0 made in_prod - in_cons exceed the page: a
        # real violation that the test itself had caused; seen under load.)
        g.hostile.stop_reading_events(0)
        n = 0
        while stats.events_dropped == 0:
            await g.hostile.raw_request(0, _flip(fbs[n % 2].cookie))
            n += 1
            assert n < 2000
        assert a.status().violations == 0

    await run_attack(hypervisor, tmp_path, attack)


def _flip(fb_cookie: int) -> bytes:
    return struct.pack("<HBx4xQ", 0, Op.PG_FLIP, fb_cookie).ljust(64, b"\0")
