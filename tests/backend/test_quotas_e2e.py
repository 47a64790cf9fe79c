"""Per-guest quotas through the daemon: each limit fails only the request that passes it, and
a guest over its request rate is slowed down, never failed."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from displback.backend.buffers import ZeroCopyPolicy
from displback.backend.device import BackendSettings
from displback.backend.quotas import Limits
from displback.protocol.constants import EINVAL, ENOMEM
from displback.protocol.pagedir import dir_pages_for
from displback.sim.guest import GuestBuffer, GuestRequestError, SimGuest
from displback.sim.hypervisor import HypervisorThread
from tests.backend.support import (
    XRGB,
    connected_guest,
    flip_frame,
    release,
    show,
    shown,
    store_of,
)

SPEC = "connectors=c0:320x240;c1:320x240"


def _limits(**overrides: float) -> Limits:
    values: dict[str, float] = {
        "max_buffers": 4,
        "max_pages_per_buffer": 1100,
        "max_total_pages": 2000,
        "max_dir_pages": 2,
        "requests_per_second": 10_000.0,
        "request_burst": 1000,
    }
    values.update(overrides)
    return Limits(**values)  # type: ignore[arg-type]


async def _pages(guest: SimGuest, npages: int) -> GuestBuffer:
    """A dumb buffer of exactly ``npages`` pages (width 1024 px of 32 bpp = one page a row)."""
    return await guest.create_dumb(1024, npages, 32)


async def _refused(errno: int, guest: SimGuest, npages: int) -> None:
    with pytest.raises(GuestRequestError) as exc:
        await _pages(guest, npages)
    assert exc.value.errno == errno


async def _still_works(guest: SimGuest) -> None:
    bufs, fbs = await show(guest, 0, 320, 240, count=1)
    await flip_frame(guest, 0, bufs[0], fbs[0], 2)
    await release(guest, 0, bufs, fbs)


@pytest.mark.parametrize(
    ("limits", "fill", "refused", "errno", "then"),
    [
        # max_buffers 4: the fifth buffer, however small, is refused.
        (_limits(), [1, 1, 1, 1], 1, ENOMEM, 1),
        # max_total_pages 2000: 1000 + 900 held, 200 more is too many, 100 fits.
        (_limits(), [1000, 900], 200, ENOMEM, 100),
        # max_pages_per_buffer 1100: one page more is a shape no quota allows.
        (_limits(), [], 1101, EINVAL, 1100),
        # max_dir_pages 1 (so at most 1023 pages a buffer, though max_pages_per_buffer is
        # 1100): 1024 pages need a second directory page.
        (_limits(max_dir_pages=1), [], 1024, EINVAL, 1023),
    ],
    ids=["buffers", "total-pages", "pages-per-buffer", "directory-pages"],
)
async def test_a_buffer_over_a_limit_is_refused_and_the_guest_goes_on(
    hypervisor: HypervisorThread,
    tmp_path: Path,
    limits: Limits,
    fill: list[int],
    refused: int,
    errno: int,
    then: int,
) -> None:
    settings = BackendSettings(limits=limits)
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path, SPEC, settings=settings) as (w, guest):
            held = [await _pages(guest, n) for n in fill]
            await _refused(errno, guest, refused)
            assert guest.pending_end_access == 0  # the refused buffer left nothing mapped
            if errno == EINVAL:
                assert dir_pages_for(then) <= limits.max_dir_pages
                fits = await _pages(guest, then)
                await guest.destroy_dumb(fits)
            else:
                # Freeing some room lets the same request through.
                await guest.destroy_dumb(held.pop())
                held.append(await _pages(guest, then))
            for buf in held:
                await guest.destroy_dumb(buf)
            assert store_of(w, 1).quota.buffers == store_of(w, 1).quota.pages == 0
            await _still_works(guest)


async def test_a_guest_over_its_request_rate_is_throttled_and_every_request_answered(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    rate, burst, requests = 200.0, 5, 40
    settings = BackendSettings(limits=_limits(requests_per_second=rate, request_burst=burst))
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path, SPEC, settings=settings) as (w, guest):
            buf = await _pages(guest, 4)

            async def attach_detach() -> None:
                for _ in range(requests // 2):
                    fb = await guest.add_fb(buf, 1024, 4, XRGB)
                    await guest.rm_fb(fb)

            async def edids(connector: int) -> None:
                for _ in range(requests // 4):
                    await guest.get_edid(connector)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attach_detach)
                nursery.start_soon(edids, 1)
            [status] = w.backend.statuses()
            connectors = status.connectors
            assert sum(c.stats.throttled for c in connectors) > 0
            assert sum(c.stats.errors for c in connectors) == 0
            for index in (0, 1):
                stats = guest.connector_stats(index)
                assert stats.response_timeouts == 0 and stats.responses_ignored == 0
            await guest.destroy_dumb(buf)
            await _still_works(guest)


async def test_a_frame_past_the_copy_memory_limit_is_dropped_its_flip_completes(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """Copy mode: a frame whose copy buffer would pass ``max_copy_bytes`` is not shown, yet its
    PG_FLIP is answered and gets its event (the guest goes on); a SET_CONFIG that needs one
    fails with -ENOMEM."""
    frame_bytes = 320 * 240 * 4  # whole pages: 75
    settings = BackendSettings(
        limits=_limits(max_copy_bytes=frame_bytes), zero_copy=ZeroCopyPolicy.OFF
    )
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path, SPEC, settings=settings) as (w, guest):
            bufs, fbs = await show(guest, 0, 320, 240, frame=1, count=2)  # fb 0 on screen
            account = store_of(w, 1).quota
            assert account.copy_bytes == frame_bytes
            events = guest.connector_stats(0).events
            await flip_frame(guest, 0, bufs[1], fbs[1], 2)  # no room for fb 1's copy
            assert guest.connector_stats(0).events == events + 1
            assert shown(w.output("A"), 320, 240) == (0, 1)  # the old frame stays
            assert account.copy_bytes == frame_bytes
            with pytest.raises(GuestRequestError) as info:
                await guest.set_config(0, fbs[1])
            assert info.value.errno == ENOMEM
            await release(guest, 0, bufs, fbs)
            assert account.copy_bytes == 0
