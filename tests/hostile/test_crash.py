"""The attacker's domain dies at the worst moments: a request unread in its ring, the
backend inside DBUF_CREATE or GET_EDID, a flip accepted but not yet shown, the backend
waiting for a shown buffer's release, the handshake half done, be-alloc memory mapped.
The daemon finishes or abandons what it was doing, frees everything of the domain once it
is destroyed, and the honest guest sees nothing of it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from displback.sim.guest import GuestRequestError, SimGuest
from displback.sim.hypervisor import HypervisorThread
from tests.backend.support import paint, show, wait_until
from tests.hostile.support import Arena, run_attack


async def _crash_during(g: SimGuest, call: Callable[[], Awaitable[Any]],
                        when: Callable[[], bool]) -> None:
    """Run ``call`` and crash the guest as soon as ``when()`` holds; the call must end."""
    async def run() -> None:
        with contextlib.suppress(GuestRequestError):
            await call()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await wait_until(when, poll=0.001)
        g.crash()


def _crash_inside(monkeypatch: pytest.MonkeyPatch, a: Arena, g: SimGuest, method: str) -> None:
    """Make the attacker's BufferStore crash the guest as its ``method`` starts."""
    [store] = a.stores(g.domid)
    original = getattr(store, method)

    async def crashing(req: Any, *args: Any) -> Any:
        g.crash()
        await trio.sleep(0.01)  # let the hypervisor see the connections drop
        return await original(req, *args)

    monkeypatch.setattr(store, method, crashing)


async def test_a_crash_with_a_request_unread_in_the_ring(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        sent = g.connector_stats(0).requests_sent
        await _crash_during(g, lambda: g.create_dumb(1024, 1024, 32),
                            lambda: g.connector_stats(0).requests_sent > sent)

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_crash_while_the_backend_maps_a_new_buffer(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        _crash_inside(monkeypatch, a, g, "create")
        with pytest.raises(GuestRequestError):
            await g.create_dumb(1024, 1024, 32)

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_crash_while_the_backend_writes_the_edid(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        _crash_inside(monkeypatch, a, g, "write_edid")
        with pytest.raises(GuestRequestError):
            await g.get_edid(0)

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_crash_while_the_backend_destroys_a_buffer(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        buf = await g.create_dumb(320, 240, 32)
        _crash_inside(monkeypatch, a, g, "destroy")
        with pytest.raises(GuestRequestError):
            await g.destroy_dumb(buf)

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_crash_with_a_flip_accepted_but_not_yet_shown(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        bufs, fbs = await show(g, 0, 320, 240)
        paint(bufs[1], fbs[1], connector=0, frame=2)
        connector = a.status().connectors[0]
        accepted = connector.stats.flips_accepted
        await _crash_during(g, lambda: g.page_flip(0, fbs[1]),
                            lambda: connector.stats.flips_accepted > accepted)

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_crash_while_the_backend_waits_for_a_shown_buffers_release(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """DBUF_DESTROY of a buffer an importer (a display driver scanning out, played by a
    dup of the dma-buf) still holds: the backend waits (WAIT_FREE) for the release; the
    guest dies meanwhile, then the importer lets go."""

    async def attack(a: Arena, g: SimGuest) -> None:
        bufs, _fbs = await show(g, 0, 320, 240)
        [store] = a.stores(g.domid)
        fd = store.buffer_info(bufs[1].cookie).dmabuf_fd
        assert fd is not None
        importer = os.dup(fd)
        answered = trio.Event()

        async def destroy() -> None:
            with contextlib.suppress(GuestRequestError):
                await g.destroy_dumb(bufs[1])
            answered.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(destroy)
                await wait_until(lambda: store.quota.buffers == 1)  # popped
                # In WAIT_FREE: the buffer's fd number is held by a placeholder meanwhile.
                await wait_until(lambda: os.readlink(f"/proc/self/fd/{fd}") == os.devnull)
                assert not answered.is_set()
                g.crash()
        finally:
            os.close(importer)

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_crash_in_the_middle_of_the_handshake(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """A second device of the attacker publishes its rings and dies before Connected."""

    async def attack(a: Arena, g: SimGuest) -> None:
        m = a.machine
        await m.add_guest(g.domid, "connectors=h:320x240", devid=1)
        async with m.guest(g.domid, devid=1) as second:
            second.on_published = lambda guest: guest.crash()
            await second.wait_state(lambda s: s._crashed)
            g.crash()

    await run_attack(hypervisor, tmp_path, attack)


async def test_a_crash_with_backend_allocated_buffers_mapped(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """be-alloc: Dom0's pages are granted to the guest and mapped by it when it dies; they
    are freed with the domain."""

    async def attack(a: Arena, g: SimGuest) -> None:
        assert g.be_alloc
        bufs, _fbs = await show(g, 0, 320, 240, count=3)
        assert all(b.backend_refs for b in bufs)
        g.crash()

    await run_attack(hypervisor, tmp_path, attack, spec="be-alloc=1,connectors=c0:320x240")


async def test_a_crash_with_everything_in_use_on_two_connectors(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        g.start_drawing(fps=120)
        await wait_until(lambda: all(g.connector_stats(i).flips_ok >= 5 for i in (0, 1)))
        extra = [await g.create_dumb(640, 480, 32) for _ in range(3)]
        assert extra
        g.crash()

    await run_attack(hypervisor, tmp_path, attack,
                     spec="connectors=c0:320x240;c1:640x480")


async def test_a_crash_with_requests_in_flight_on_every_ring(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        async with trio.open_nursery() as nursery:
            for ring in range(3):
                nursery.start_soon(_edid_forever, g, ring)
            await wait_until(lambda: all(g.connector_stats(i).requests_sent > 3
                                         for i in range(3)))
            g.crash()
            nursery.cancel_scope.cancel()

    await run_attack(hypervisor, tmp_path, attack,
                     spec="connectors=c0:320x240;c1:320x240;c2:320x240")


async def _edid_forever(g: SimGuest, ring: int) -> None:
    while True:
        try:
            await g.get_edid(ring)
        except GuestRequestError:
            await trio.sleep(0.01)
        except OSError:
            return  # the crash closed the guest's devices under this request (a task woken
            # in the same batch as the crash runs before the nursery's cancel reaches it)


