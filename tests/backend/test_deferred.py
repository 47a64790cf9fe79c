"""The deferred-release list: retried until released, numbers kept reserved, bounded per guest."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import cast

import pytest
import trio

from displback.backend.deferred import DeferredReleases
from displback.sim.hypervisor import HypervisorThread
from displback.sim.platform import SimDomain, SimPlatform
from displback.xen.interfaces import GrantDevice

GUEST = 6


class ListLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def debug(self, msg: str, /) -> None:
        self.lines.append(("debug", msg))

    def info(self, msg: str, /) -> None:
        self.lines.append(("info", msg))

    def warning(self, msg: str, /) -> None:
        self.lines.append(("warning", msg))


class FakeGrants:
    """A gntdev whose exports are released when the test says so."""

    def __init__(self, error: OSError | None = None) -> None:
        self.released: set[int] = set()
        self.waits: list[tuple[int, int]] = []
        self.closed = False
        self.error = error

    def dmabuf_wait_released(self, fd: int, timeout_ms: int) -> bool:
        self.waits.append((fd, timeout_ms))
        if self.error is not None:
            raise self.error
        return fd in self.released

    def close(self) -> None:
        assert not self.closed
        self.closed = True


def placeholder() -> int:
    """A reserved number as the buffer store leaves it: an fd of /dev/null."""
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    before = len(os.listdir("/proc/self/fd"))
    yield
    assert len(os.listdir("/proc/self/fd")) <= before, "file descriptors leaked"


async def test_an_entry_is_retried_until_released_and_only_then_its_number_closed() -> None:
    fake = FakeGrants()
    log = ListLog()
    deferred = DeferredReleases(retry_interval=0.001, log=log)
    fd = placeholder()
    async with trio.open_nursery() as nursery:
        await nursery.start(deferred.run)
        deferred.add(domid=1, grants=cast(GrantDevice, fake), fd=fd, dbuf_cookie=0xAB, npages=3)
        with trio.fail_after(10):
            while len(fake.waits) < 3:
                await trio.sleep(0.001)
        assert is_open(fd) and deferred.pending(1) == 1
        assert all(wait == (fd, 0) for wait in fake.waits)  # polls, never blocks the thread
        fake.released.add(fd)
        with trio.fail_after(10):
            await deferred.wait_drained(1)
        assert not is_open(fd)
        nursery.cancel_scope.cancel()
    stats = deferred.stats
    assert (stats.pending, stats.deferred, stats.released, stats.abandoned) == (0, 1, 1, 0)
    assert any(level == "info" and "0xab released" in msg for level, msg in log.lines)
    await deferred.aclose()


async def test_add_never_refuses_and_each_entry_gives_back_its_share_once() -> None:
    fake = FakeGrants()
    deferred = DeferredReleases(log=ListLog())
    grants = cast(GrantDevice, fake)
    fds = [placeholder() for _ in range(3)]
    done: list[int] = []
    for i, fd in enumerate(fds, 1):
        deferred.add(
            domid=1, grants=grants, fd=fd, dbuf_cookie=i, npages=1,
            on_done=lambda i=i: done.append(i),  # type: ignore[misc]
        )
    assert deferred.pending(1) == 3 and deferred.pending() == 3 and deferred.pending(2) == 0
    assert [e.dbuf_cookie for e in deferred.entries(1)] == [1, 2, 3]
    await deferred.aclose()
    assert not any(is_open(fd) for fd in fds)
    assert sorted(done) == [1, 2, 3]  # abandoned at exit: each share given back once


async def test_a_handed_over_device_is_closed_after_its_last_entry_drains() -> None:
    busy, idle = FakeGrants(), FakeGrants()
    deferred = DeferredReleases(retry_interval=0.001, log=ListLog())
    fd = placeholder()
    deferred.add(domid=1, grants=cast(GrantDevice, busy), fd=fd, dbuf_cookie=1, npages=1)
    deferred.close_device_when_drained(cast(GrantDevice, idle))
    assert idle.closed  # nothing pending on it: closed at once
    deferred.close_device_when_drained(cast(GrantDevice, busy))
    deferred.close_device_when_drained(cast(GrantDevice, busy))  # once is enough
    assert not busy.closed
    async with trio.open_nursery() as nursery:
        await nursery.start(deferred.run)
        busy.released.add(fd)
        with trio.fail_after(10):
            await deferred.wait_drained()
        nursery.cancel_scope.cancel()
    assert busy.closed and not is_open(fd)
    await deferred.aclose()


async def test_exit_gives_up_on_what_remains_and_frees_the_numbers() -> None:
    fake = FakeGrants()
    log = ListLog()
    deferred = DeferredReleases(log=log)
    grants = cast(GrantDevice, fake)
    kept, freed = placeholder(), placeholder()
    deferred.add(domid=1, grants=grants, fd=kept, dbuf_cookie=1, npages=1)
    deferred.add(domid=2, grants=grants, fd=freed, dbuf_cookie=2, npages=1)
    deferred.close_device_when_drained(grants)
    fake.released.add(freed)
    await deferred.aclose()  # one last try each, then give up
    assert not is_open(kept) and not is_open(freed)
    assert (deferred.stats.released, deferred.stats.abandoned) == (1, 1)
    assert fake.closed
    assert any("giving up" in msg and "daemon is exiting" in msg for _, msg in log.lines)
    late = placeholder()
    deferred.add(domid=1, grants=grants, fd=late, dbuf_cookie=3, npages=1)
    assert not is_open(late) and deferred.pending() == 0
    await deferred.aclose()  # idempotent


async def test_a_wait_the_device_cannot_do_abandons_the_entry() -> None:
    fake = FakeGrants(OSError(errno.ENOTTY, "no dma-buf support"))
    deferred = DeferredReleases(retry_interval=0.001, log=ListLog())
    fd = placeholder()
    async with trio.open_nursery() as nursery:
        await nursery.start(deferred.run)
        deferred.add(domid=1, grants=cast(GrantDevice, fake), fd=fd, dbuf_cookie=1, npages=1)
        with trio.fail_after(10):
            await deferred.wait_drained()
        nursery.cancel_scope.cancel()
    assert deferred.stats.abandoned == 1 and not is_open(fd)
    await deferred.aclose()


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        DeferredReleases(retry_interval=0)


async def test_a_real_export_drains_once_the_importer_closes_and_the_guest_can_end_access(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    with (
        SimPlatform(hypervisor.socket_path, "unused") as platform,
        SimDomain(hypervisor.socket_path, GUEST) as guest,
    ):
        grants = platform.open_grant_device()
        deferred = DeferredReleases(retry_interval=0.005, log=ListLog())
        pfns = guest.alloc_pages(2)
        refs = guest.grant_pages(pfns, 0)
        fd = grants.dmabuf_export(GUEST, refs)
        importer = platform.open_dmabuf(fd)
        # What the buffer store does on DBUF_DESTROY: drop our reference, keep the number.
        null = placeholder()
        os.dup2(null, fd, inheritable=False)
        os.close(null)
        assert not grants.dmabuf_wait_released(fd, 10)
        async with trio.open_nursery() as nursery:
            await nursery.start(deferred.run)
            deferred.add(domid=GUEST, grants=grants, fd=fd, dbuf_cookie=9, npages=2)
            deferred.close_device_when_drained(grants)
            with pytest.raises(OSError) as exc:
                guest.end_access_pages(refs)
            assert exc.value.errno == errno.EBUSY
            importer.close()
            with trio.fail_after(10):
                await deferred.wait_drained(GUEST)
            nursery.cancel_scope.cancel()
        guest.end_access_pages(refs)
        guest.free_pages(pfns)
        assert deferred.stats.released == 1
        await deferred.aclose()
