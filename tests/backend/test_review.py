"""Review findings: behaviours a real Linux guest (or a hostile one) relies on, each once broken."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from displback.backend.buffers import BufferKind
from displback.backend.connector import MAX_QUEUED_EVENTS
from displback.backend.outputs import OutputMap
from displback.display.virtual import VirtualOutput
from displback.protocol.constants import EVT_PAGE_SLOTS
from displback.protocol.evtpage import EventProducer
from displback.protocol.messages import PgFlipReq
from displback.sim.guest import FlipOutcome
from displback.sim.guest.channels import Channels
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import sim_machine
from tests.backend.support import (
    connected_guest,
    flip_frame,
    new_guest_buffers,
    paint,
    release,
    show,
    show_frames,
    shown,
    store_of,
    wait_until,
)


async def test_flip_on_a_disabled_connector_gets_its_event_but_leaves_the_output_dark(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    # Linux sends PG_FLIP for any plane update with an FB before and after, also while the
    # CRTC is off (DPMS off after SET_CONFIG disable): the output must stay dark.
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            bufs, fbs = await show(guest, 0, 320, 240)
            output = w.output("A")
            await guest.set_config(0, None)
            assert not output.enabled
            paint(bufs[1], fbs[1], connector=0, frame=2)
            assert await guest.page_flip(0, fbs[1]) == FlipOutcome.DONE
            assert not output.enabled
            # Enabled again, the connector shows what SET_CONFIG names and flips on.
            await guest.set_config(0, fbs[1])
            assert shown(output, 320, 240) == (0, 2)
            await flip_frame(guest, 0, bufs[0], fbs[0], 3)
            assert shown(output, 320, 240) == (0, 3)
            stats = guest.connector_stats(0)
            assert stats.flips_ok == stats.events == 2 and stats.events_skipped == 0
            await release(guest, 0, bufs, fbs)


async def test_a_frame_the_output_fails_unforeseeably_is_dropped_and_its_flip_still_completes(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The guest was told its flip was accepted: whatever goes wrong showing it, the event must
    # come and the device must go on (it used to take the whole device down).
    # Flip 1 is the SET_CONFIG (awaited ``flip``), flips 2 and 3 PG_FLIPs (``start_flip``).
    real_start = VirtualOutput.start_flip
    calls = 0

    def flaky(self: VirtualOutput, fb: Any, on_landed: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the output")
        return real_start(self, fb, on_landed)

    monkeypatch.setattr(VirtualOutput, "start_flip", flaky)
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            bufs, fbs = await show(guest, 0, 320, 240)  # flip 1
            paint(bufs[1], fbs[1], connector=0, frame=2)
            assert await guest.page_flip(0, fbs[1]) == FlipOutcome.DONE  # flip 2 fails
            assert shown(w.output("A"), 320, 240) == (0, 1)
            await flip_frame(guest, 0, bufs[0], fbs[0], 3)
            assert shown(w.output("A"), 320, 240) == (0, 3)
            assert guest.stats.disconnects == 0
            await release(guest, 0, bufs, fbs)


async def test_an_unforeseen_failure_in_a_connection_task_resets_the_device_instead_of_wedging_it(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug outside any request (here: sending an event) used to end the GuestDevice with its
    # state left at Connected: the guest timed out on every request, for good.
    real_put = EventProducer.put_pg_flip
    calls = 0

    def flaky(self: EventProducer, fb_cookie: int) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug while sending an event")
        return real_put(self, fb_cookie)

    monkeypatch.setattr(EventProducer, "put_pg_flip", flaky)
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            bufs, fbs = await show(guest, 0, 320, 240)
            assert await guest.page_flip(0, fbs[1]) in (
                FlipOutcome.RELEASED, FlipOutcome.FRAME_DONE_TIMEOUT
            )
            await wait_until(lambda: guest.stats.disconnects == 1)
            await guest.wait_connected()  # after the back-off
            bufs, fbs = await show(guest, 0, 320, 240, frame=4)
            await flip_frame(guest, 0, bufs[1], fbs[1], 5)
            assert shown(w.output("A"), 320, 240) == (0, 5)
            await release(guest, 0, bufs, fbs)


async def test_a_guest_that_never_reads_its_event_page_cannot_grow_the_event_queue_forever(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Channels, "on_events", lambda self, link, evt: None)
    flips = EVT_PAGE_SLOTS + MAX_QUEUED_EVENTS + 40
    with trio.fail_after(30):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            bufs, fbs = await new_guest_buffers(guest, 320, 240, count=1)
            await guest.set_config(0, fbs[0])
            for _ in range(flips):
                await guest.hostile.raw_request(0, PgFlipReq(id=0, fb_cookie=fbs[0].cookie).pack())
            [status] = w.backend.statuses()
            connector = status.connectors[0]
            await wait_until(
                lambda: connector.stats.events_sent + connector.queued_events
                + connector.stats.events_dropped == flips
            )
            assert connector.stats.events_sent == EVT_PAGE_SLOTS
            assert connector.queued_events == MAX_QUEUED_EVENTS
            assert connector.stats.events_dropped == 40
            assert guest.stats.disconnects == 0


async def test_an_unforeseen_failure_while_connecting_fails_the_connect_and_it_is_retried(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only ProtocolError and OSError were expected there: anything else ended the GuestDevice
    # with our state at InitWait, and the guest waited for Connected forever.
    real_acquire = OutputMap.acquire
    calls = 0

    def flaky(
        self: OutputMap, domid: int, devid: int, connector: Any, guest: str | None = None
    ) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug while choosing an output")
        return real_acquire(self, domid, devid, connector, guest)

    monkeypatch.setattr(OutputMap, "acquire", flaky)
    with trio.fail_after(20):
        # Connected at the second attempt, after the back-off.
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            assert calls == 2
            await show_frames(w, guest, 1, count=2)


async def test_destroy_under_fd_exhaustion_still_releases_the_guest_pages(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reserving the dma-buf's fd number used to open /dev/null first: with no descriptor
    # free, DBUF_DESTROY failed with -EIO and its dma-buf fd stayed open, the guest's pages
    # mapped in Dom0 for good.
    real_open = os.open

    def exhausted(path: Any, *args: Any, **kwargs: Any) -> int:
        if path == os.devnull:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)

    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            buf = await guest.create_dumb(320, 240, 32)
            store = store_of(w, 1)
            assert store.buffer_info(buf.cookie).kind is BufferKind.ZERO_COPY
            fd = store.buffer_info(buf.cookie).dmabuf_fd
            assert fd is not None
            monkeypatch.setattr(os, "open", exhausted)
            await guest.destroy_dumb(buf)  # raises GuestRequestError on failure
            monkeypatch.undo()
            assert guest.pending_end_access == 0
            assert w.backend.deferred is not None and w.backend.deferred.pending() == 0


async def test_a_tree_a_driver_domain_may_no_longer_read_counts_as_vanished() -> None:
    """xenstored answers EACCES, not ENOENT, under a removed guest's parent a driver domain
    cannot read: the device is forgotten (its run ends), not crashed on the error."""
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager
    from types import SimpleNamespace

    from displback.backend.device import BackendSettings, GuestDevice
    from displback.xenstore.wire import XenStoreError

    class Unreadable:
        """A XenStore client in a domain that may no longer read the guest's tree."""

        async def read_or_none(self, path: str) -> bytes | None:
            raise XenStoreError("EACCES", path)

        async def exists(self, path: str) -> bool:
            raise XenStoreError("EACCES", path)

        @asynccontextmanager
        async def watch(self, path: str) -> AsyncIterator[AsyncIterator[str]]:
            async def events() -> AsyncIterator[str]:
                yield path  # a watch fires once when set, as XenStore's do
                await trio.sleep_forever()

            yield events()

    device = GuestDevice(
        xs=Unreadable(),  # type: ignore[arg-type]
        platform=SimpleNamespace(domid=3),  # type: ignore[arg-type]
        domid=1,
        devid=0,
        outputs=None,  # type: ignore[arg-type]
        settings=BackendSettings(),
        deferred=None,  # type: ignore[arg-type]
    )
    with trio.fail_after(10):
        await device.run()  # returns once the device is forgotten
    assert device.status.state == "gone"
    assert device.status.name is None  # the name was unreadable too


async def test_backend_allocated_memory_outlives_teardowns_until_the_domain_is_destroyed(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    # gntdev frees imported pages even while the guest still maps them, and a guest need not
    # unmap: the daemon keeps them, charged to the guest, until the domain is gone.
    from displback.sim.hypervisor import query_counters

    def dom0_dmabufs() -> int:
        counters = query_counters(hypervisor.socket_path)
        return int(counters["domains"].get("0", {}).get("dmabufs", 0))

    with trio.fail_after(30):
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(1, "be-alloc=1,connectors=c0:64x64")
            async with w.guest(1) as guest:
                await guest.wait_connected()
                await guest.create_dumb(64, 64, 32)
                assert dom0_dmabufs() == 1
            # The driver unloaded (its remove path tore the device down): memory kept.
            device = next(iter(w.backend.devices.values()))
            await wait_until(lambda: device.connection is None)
            account = w.backend.accounts[1]
            assert dom0_dmabufs() == 1 and account.be_alloc_pages == 4
            async with w.guest(1) as guest:
                await guest.wait_connected()  # a new connection: still kept (and reused)
                buf = await guest.create_dumb(32, 32, 32)
                assert dom0_dmabufs() == 1 and account.be_alloc_pages == 4
                await guest.destroy_dumb(buf)
            await w.toolstack.destroy_domain(1)
            await wait_until(lambda: dom0_dmabufs() == 0)
            # Forgotten once the device is gone too (its task may end after the reap).
            await wait_until(lambda: 1 not in w.backend.accounts)


async def test_a_daemon_exiting_without_systemds_fd_store_says_how_many_kept_pages_it_frees(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/security.md: without the store the kept be-alloc memory cannot outlive the daemon;
    a guest still mapping it then reads freed Dom0 memory, so the exit says how much."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with trio.fail_after(30), capture_logs() as logs:
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(1, "be-alloc=1,connectors=c0:64x64")
            async with w.guest(1) as guest:
                await guest.wait_connected()
                await guest.create_dumb(64, 64, 32)
            device = next(iter(w.backend.devices.values()))
            await wait_until(lambda: device.connection is None)
            assert w.backend.retained.pages(1) == 4
    said = [e["event"] for e in logs if "without systemd's fd store" in e["event"]]
    assert said == [
        "exiting without systemd's fd store: 4 pages of backend-allocated memory that "
        "guests may still map are freed"
    ]
