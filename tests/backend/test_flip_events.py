"""The connector drives its flip queue: events held back by a full event page reach the guest
once it reads again, and flips coalesced behind a flip in flight each get their own event
(each once survived the whole suite broken)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from displback.display.virtual import OutputConfig
from displback.protocol.constants import EVT_PAGE_SLOTS
from displback.protocol.messages import PgFlipReq
from displback.sim.guest.channels import Channels
from displback.sim.hypervisor import HypervisorThread
from tests.backend.support import connected_guest, new_guest_buffers, show, wait_until

QUEUED = 10


async def test_events_held_back_by_a_full_page_reach_the_guest_once_it_reads_again(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The guest never tells the backend it consumed: the connector must retry on its own.
    real_on_events = Channels.on_events
    reading = False
    seen: list[tuple[Any, Any, Any]] = []

    def on_events(self: Channels, link: Any, evt: Any) -> None:
        seen.append((self, link, evt))
        if reading:
            real_on_events(self, link, evt)

    monkeypatch.setattr(Channels, "on_events", on_events)
    flips = EVT_PAGE_SLOTS + QUEUED
    with trio.fail_after(30):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            _bufs, fbs = await new_guest_buffers(guest, 320, 240, count=1)
            await guest.set_config(0, fbs[0])
            for _ in range(flips):
                await guest.hostile.raw_request(0, PgFlipReq(id=0, fb_cookie=fbs[0].cookie).pack())
            [status] = w.backend.statuses()
            connector = status.connectors[0]
            await wait_until(lambda: connector.stats.events_sent == EVT_PAGE_SLOTS
                             and connector.queued_events == QUEUED)
            stats = guest.connector_stats(0)
            assert stats.events == 0
            reading = True
            channels, link, evt = seen[-1]
            real_on_events(channels, link, evt)  # the guest reads its full page: room again
            assert stats.events == EVT_PAGE_SLOTS
            # No further flip comes: only the connector's retry can deliver the rest.
            await wait_until(lambda: stats.events == flips)
            assert connector.queued_events == 0
            assert connector.stats.events_dropped == 0
            assert stats.events_skipped == 0  # ids consecutive across the hold-up


async def test_flips_coalesced_behind_a_flip_in_flight_each_get_their_own_event(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    # A 2 Hz output keeps the first flip in flight for up to half a second: the four sent
    # behind it are coalesced into one frame, and the guest must get four events for them,
    # not one (Linux waits for every flip's event, and numbers them).
    outputs = [OutputConfig("A", 320, 240, refresh_hz=2.0)]
    with trio.fail_after(30):
        async with connected_guest(hypervisor, tmp_path, outputs=outputs) as (w, guest):
            _bufs, fbs = await show(guest, 0, 320, 240)
            [status] = w.backend.statuses()
            connector = status.connectors[0]
            stats = guest.connector_stats(0)
            events0 = stats.events
            shown0 = connector.stats.frames_shown
            cookies = [fbs[n % 2].cookie for n in range(1, 6)]
            for cookie in cookies:
                await guest.hostile.raw_request(0, PgFlipReq(id=0, fb_cookie=cookie).pack())
            await wait_until(lambda: connector.stats.events_sent >= 5)
            await wait_until(lambda: stats.events >= events0 + 5)
            assert connector.stats.flips_coalesced == 3
            assert connector.stats.frames_shown == shown0 + 2  # the first, then the newest
            assert connector.stats.events_sent == 5
            assert stats.events == events0 + 5 and stats.events_skipped == 0
            assert w.output("A").current_fb is not None
