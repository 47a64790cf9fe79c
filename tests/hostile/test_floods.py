"""Floods of buffers, framebuffers, requests and flips, and cookies reused or colliding.
Every flood ends at a quota (``-ENOMEM`` for resources) or at the token bucket (the guest
is slowed, not failed); cookies are per guest and an existing one is never replaced."""

from __future__ import annotations

import dataclasses
import errno
import struct
import time
from pathlib import Path

import pytest
import trio

from displback.backend.clock import CLOCK_MONOTONIC_COARSE
from displback.backend.connector import MAX_QUEUED_EVENTS
from displback.backend.device import BackendSettings
from displback.backend.quotas import Limits
from displback.protocol.constants import Op
from displback.sim.guest import GuestBuffer, GuestRequestError, SimGuest
from displback.sim.hypervisor import HypervisorThread
from tests.backend.support import flip_frame, paint, release, show, shown, wait_until
from tests.hostile.support import Arena, rounds, run_attack


async def _create_until_refused(g: SimGuest, width: int, height: int) -> list[GuestBuffer]:
    """DBUF_CREATE until the backend refuses; the refusal must be ``-ENOMEM``."""
    bufs: list[GuestBuffer] = []
    while True:
        try:
            bufs.append(await g.create_dumb(width, height, 32))
        except GuestRequestError as exc:
            assert exc.errno == errno.ENOMEM
            return bufs
        assert len(bufs) <= 1000, "no limit on buffers"


async def test_a_buffer_flood_stops_at_the_buffer_quota_and_recovers(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        bufs = await _create_until_refused(g, 64, 64)
        [store] = a.stores(g.domid)
        assert len(bufs) == store.quota.buffers <= store.quota.limits.max_buffers
        for buf in bufs:
            await g.destroy_dumb(buf)
        assert store.quota.buffers == 0
        await release(g, 0, *await show(g, 0, 320, 240))  # served again

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_flood_of_big_buffers_stops_at_the_page_quota(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        bufs = await _create_until_refused(g, 1024, 1024)  # 1024 pages each
        [store] = a.stores(g.domid)
        assert store.quota.pages == 1024 * len(bufs) <= store.quota.limits.max_total_pages
        assert store.quota.pages + 1024 > store.quota.limits.max_total_pages
        for buf in bufs:
            await g.destroy_dumb(buf)
        assert store.quota.pages == 0

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_buffer_beyond_the_largest_framebuffer_is_refused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """4096×2048 is larger than anything Linux's frontend creates: ``-EINVAL``, whatever
    the guest holds."""

    async def attack(a: Arena, g: SimGuest) -> None:
        with pytest.raises(GuestRequestError) as exc:
            await g.create_dumb(4096, 2048, 32)
        assert exc.value.errno == errno.EINVAL

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_framebuffer_flood_on_one_buffer_stays_within_quota(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """300 FB_ATTACH on one small buffer: each answered (accepted or refused with
    ``-ENOMEM`` at a framebuffer limit), never beyond a quota, and all of them go with
    the buffer."""

    async def attack(a: Arena, g: SimGuest) -> None:
        buf = await g.create_dumb(320, 240, 32)
        accepted = 0
        for _ in range(300):
            try:
                await g.add_fb(buf, 320, 240)
                accepted += 1
            except GuestRequestError as exc:
                assert exc.errno == errno.ENOMEM
            a.check()
        [store] = a.stores(g.domid)
        assert store.stats.framebuffers == accepted
        await g.destroy_dumb(buf)
        assert store.stats.framebuffers == 0

    await run_attack(hypervisor, tmp_path, attack)


def _bucket_time(elapsed: float) -> float:
    """The most time the bucket can have seen pass in ``elapsed`` s: it reads the coarse
    clock, whose reading at the start may lag by up to a tick."""
    return elapsed + time.clock_getres(CLOCK_MONOTONIC_COARSE)


def _throttling_settings() -> BackendSettings:
    """A request rate every guest stays under when it behaves (the honest guest flips 10
    times a second) and an attacker passes at once."""
    limits = dataclasses.replace(Limits.for_connectors([(320, 240)]),
                                 requests_per_second=200.0, request_burst=40)
    return BackendSettings(limits=limits)


async def test_a_request_flood_is_slowed_to_the_token_rate(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """Requests as fast as the ring turns for 1.5 s: the backend answers no more than
    the bucket allows (rate × time + burst), slowing the attacker and no one else."""
    settings = _throttling_settings()
    assert settings.limits is not None
    limits = settings.limits

    async def attack(a: Arena, g: SimGuest) -> None:
        stats = a.status().connectors[0].stats
        before = stats.requests
        more = rounds(1.5)
        sent = 0


        start = trio.current_time()
        while more():
            with pytest.raises(GuestRequestError):
                await g.hostile.raw_request(0, bytes([0, 0, 0x7F]) + bytes(61))
            sent += 1
        elapsed = trio.current_time() - start
        assert stats.throttled > 0
        assert stats.requests - before <= limits.requests_per_second * _bucket_time(elapsed) \
            + limits.request_burst + 1
        assert g.connector_stats(0).response_timeouts == 0  # slowed, never dropped

    await run_attack(hypervisor, tmp_path, attack, settings=settings)


async def test_requests_on_every_ring_at_once_share_one_bucket(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """The bucket is the guest's, not a ring's: flooding four rings does not buy four
    times the rate."""
    settings = _throttling_settings()
    assert settings.limits is not None
    limits = settings.limits
    spec = "connectors=c0:320x240;c1:320x240;c2:320x240"

    async def attack(a: Arena, g: SimGuest) -> None:


        status = a.status()
        before = sum(c.stats.requests for c in status.connectors)
        start = trio.current_time()

        async def flood(ring: int) -> None:
            more = rounds(1.5)
            while more():
                try:
                    await g.get_edid(ring)
                except GuestRequestError as exc:
                    assert exc.errno != errno.ETIMEDOUT

        async with trio.open_nursery() as nursery:
            for ring in range(3):
                nursery.start_soon(flood, ring)
        elapsed = trio.current_time() - start
        answered = sum(c.stats.requests for c in status.connectors) - before
        assert answered <= limits.requests_per_second * _bucket_time(elapsed) \
            + limits.request_burst + 3

    await run_attack(hypervisor, tmp_path, attack, spec=spec, settings=settings)


async def test_a_flip_flood_without_waiting_for_events_is_coalesced(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """500 PG_FLIPs sent back to back (the guest never waits for its events): flips
    queued behind one another are coalesced, every accepted flip gets one event, and the
    events waiting for room never exceed their bound."""

    async def attack(a: Arena, g: SimGuest) -> None:
        bufs, fbs = await show(g, 0, 320, 240, frame=1)
        paint(bufs[1], fbs[1], connector=0, frame=2)
        connector = a.status().connectors[0]
        for n in range(500):
            await g.hostile.raw_request(0, struct.pack("<HBx4xQ", 0, Op.PG_FLIP,
                                               fbs[n % 2].cookie).ljust(64, b"\0"))
            assert connector.queued_events <= MAX_QUEUED_EVENTS
        stats = connector.stats
        assert stats.flips_accepted >= 500
        # Every accepted flip gets its event (or is dropped at the bound) before the next.
        await wait_until(lambda: stats.events_sent + stats.events_dropped
                         >= stats.flips_accepted)
        await flip_frame(g, 0, bufs[1], fbs[1], 3)
        assert shown(a.machine.output("B"), 320, 240) == (0, 3)
        await release(g, 0, bufs, fbs)

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_set_config_storm_leaves_the_output_consistent(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        bufs, fbs = await show(g, 0, 320, 240, frame=4)
        for n in range(100):
            await g.set_config(0, fbs[n % 2] if n % 3 else None)
        await g.set_config(0, fbs[0])
        assert shown(a.machine.output("B"), 320, 240) == (0, 4)
        await release(g, 0, bufs, fbs)

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_live_buffer_cookie_reused_is_refused_and_the_buffer_kept(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        bufs, fbs = await show(g, 0, 320, 240, frame=5)
        with pytest.raises(GuestRequestError) as exc:
            await g.create_dumb(64, 64, 32, cookie=bufs[0].cookie)
        assert exc.value.errno == errno.EEXIST
        with pytest.raises(GuestRequestError) as exc:
            await g.add_fb(bufs[1], 320, 240, cookie=fbs[0].cookie)
        assert exc.value.errno == errno.EEXIST
        await flip_frame(g, 0, bufs[1], fbs[1], 6)
        await flip_frame(g, 0, bufs[0], fbs[0], 7)  # the original buffer and fb still work
        assert shown(a.machine.output("B"), 320, 240) == (0, 7)
        await release(g, 0, bufs, fbs)

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_framebuffer_cookie_equal_to_a_buffer_cookie_is_its_own_object(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """Buffer and framebuffer cookies are separate name spaces (Linux uses one pointer
    value for both now and then): detaching the framebuffer leaves the buffer alone."""

    async def attack(a: Arena, g: SimGuest) -> None:
        buf = await g.create_dumb(320, 240, 32)
        fb = await g.add_fb(buf, 320, 240, cookie=buf.cookie)
        paint(buf, fb, connector=0, frame=8)
        await g.set_config(0, fb)
        assert shown(a.machine.output("B"), 320, 240) == (0, 8)
        await g.set_config(0, None)
        await g.rm_fb(fb)
        fb2 = await g.add_fb(buf, 320, 240)  # the buffer survived its namesake
        await release(g, 0, [buf], [fb2])

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_destroyed_cookie_is_reusable_and_stale_cookies_get_enoent(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        bufs, fbs = await show(g, 0, 320, 240, frame=1)
        stale_fb = fbs[1]
        await g.rm_fb(stale_fb)
        for call in (g.page_flip(0, stale_fb), g.set_config(0, stale_fb), g.rm_fb(stale_fb)):
            with pytest.raises(GuestRequestError) as exc:
                await call
            assert exc.value.errno == errno.ENOENT
        cookie = bufs[1].cookie
        await g.destroy_dumb(bufs[1])
        with pytest.raises(GuestRequestError) as exc:
            await g.add_fb(bufs[1], 320, 240)  # guest-side refusal: its buffer is gone
        again = await g.create_dumb(320, 240, 32, cookie=cookie)
        fb = await g.add_fb(again, 320, 240)
        await flip_frame(g, 0, again, fb, 12)
        assert shown(a.machine.output("B"), 320, 240) == (0, 12)
        await release(g, 0, [bufs[0], again], [fbs[0], fb])

    await run_attack(hypervisor, tmp_path, attack, frame_done_timeout=0.5)
