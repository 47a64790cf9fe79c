"""Simulated dma-bufs: gntdev export/wait/import/release and the display-side PRIME import."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import trio

from displback.sim.hypervisor import HypervisorProcess, HypervisorThread
from displback.sim.platform import SimDomain, SimGrantDevice, SimPlatform
from displback.xen.interfaces import GNTDEV_DMA_FLAG_COHERENT, GNTDEV_DMA_FLAG_WC

GUEST = 4


@pytest.fixture
def dom0(hypervisor: HypervisorThread) -> Iterator[SimPlatform]:
    with SimPlatform(hypervisor.socket_path, "unused") as platform:
        yield platform


@pytest.fixture
def gntdev(dom0: SimPlatform) -> Iterator[SimGrantDevice]:
    dev = dom0.open_grant_device()
    yield dev
    dev.close()


@pytest.fixture
def granted(hypervisor: HypervisorThread) -> Iterator[tuple[SimDomain, list[int], list[int]]]:
    """A guest with two pages granted read-write to Dom0: (guest, pfns, refs)."""
    with SimDomain(hypervisor.socket_path, GUEST) as guest:
        pfns = guest.alloc_pages(2)
        refs = [guest.grant(pfn, 0) for pfn in pfns]
        yield guest, pfns, refs
        for ref in refs:
            guest.end_access(ref)
        guest.free_pages(pfns)


def test_exported_dmabuf_shows_the_guest_pages(
    dom0: SimPlatform, gntdev: SimGrantDevice, granted: tuple[SimDomain, list[int], list[int]]
) -> None:
    guest, pfns, refs = granted
    fd = gntdev.dmabuf_export(GUEST, refs)
    assert not os.get_inheritable(fd)
    with guest.map_pages(pfns) as own, dom0.open_dmabuf(fd) as display:
        own.buffer[4096 + 1] = 0x77
        assert len(display.buffer) == 2 * 4096
        assert display.buffer[4096 + 1] == 0x77
    os.close(fd)
    assert gntdev.dmabuf_wait_released(fd, 1000)


def test_grants_stay_mapped_until_every_dmabuf_holder_closes(
    hypervisor: HypervisorThread,
    dom0: SimPlatform,
    gntdev: SimGrantDevice,
    granted: tuple[SimDomain, list[int], list[int]],
) -> None:
    guest, _pfns, refs = granted
    fd = gntdev.dmabuf_export(GUEST, refs)
    display = dom0.open_dmabuf(fd)
    os.close(fd)
    assert not gntdev.dmabuf_wait_released(fd, 50)  # the display still holds it
    with pytest.raises(OSError) as exc:
        guest.end_access(refs[0])
    assert exc.value.errno == errno.EBUSY
    assert hypervisor.counters()["domains"][0] == {
        "pages": 0, "grants": 0, "mappings": 2, "dmabufs": 1, "ports": 0
    }
    display.close()
    assert gntdev.dmabuf_wait_released(fd, 2000)
    assert hypervisor.counters()["domains"][0]["mappings"] == 0


def test_wait_released_times_out_while_own_fd_is_open(
    gntdev: SimGrantDevice, granted: tuple[SimDomain, list[int], list[int]]
) -> None:
    _guest, _pfns, refs = granted
    fd = gntdev.dmabuf_export(GUEST, refs)
    started = time.monotonic()
    assert gntdev.dmabuf_wait_released(fd, 100) is False
    assert time.monotonic() - started >= 0.09
    os.close(fd)
    assert gntdev.dmabuf_wait_released(fd, 2000) is True


def test_wait_released_of_an_unknown_fd_is_true_at_once(gntdev: SimGrantDevice) -> None:
    assert gntdev.dmabuf_wait_released(12345, 10_000) is True


async def test_wait_released_blocks_until_release_in_a_worker_thread(
    gntdev: SimGrantDevice, granted: tuple[SimDomain, list[int], list[int]]
) -> None:
    _guest, _pfns, refs = granted
    fd = gntdev.dmabuf_export(GUEST, refs)
    held = os.dup(fd)  # an importer that is slow to let go
    os.close(fd)
    async with trio.open_nursery() as nursery:
        results: list[bool] = []

        async def wait() -> None:
            results.append(await trio.to_thread.run_sync(gntdev.dmabuf_wait_released, fd, 5000))

        # Held: a wait that may not block (0 ms) says "not released".
        assert await trio.to_thread.run_sync(gntdev.dmabuf_wait_released, fd, 0) is False
        nursery.start_soon(wait)
        os.close(held)
    assert results == [True]  # the blocking wait saw the release, whenever it came


@pytest.fixture
def remote(
    hypervisor_process: HypervisorProcess,
) -> Iterator[tuple[SimPlatform, SimGrantDevice, list[int]]]:
    """Dom0 devices and two refs granted by a guest, on a hypervisor in another process."""
    path = hypervisor_process.socket_path
    with SimPlatform(path, "unused") as platform, SimDomain(path, GUEST) as guest:
        pfns = guest.alloc_pages(2)
        refs = [guest.grant(pfn, 0) for pfn in pfns]
        dev = platform.open_grant_device()
        yield platform, dev, refs
        dev.close()


def test_wait_released_is_keyed_by_fd_number_so_reuse_waits_on_the_new_buffer(
    remote: tuple[SimPlatform, SimGrantDevice, list[int]],
) -> None:
    dom0, gntdev, refs = remote
    first = gntdev.dmabuf_export(GUEST, refs[:1])
    display = dom0.open_dmabuf(first)  # keeps the first buffer alive
    os.close(first)
    second = gntdev.dmabuf_export(GUEST, refs[1:])
    assert second == first  # the kernel hands out the lowest free number
    # The hazard: waiting "for the first" now waits on the second (still open) buffer.
    assert gntdev.dmabuf_wait_released(first, 50) is False
    display.close()
    assert gntdev.dmabuf_wait_released(first, 50) is False  # still the second one
    os.close(second)
    assert gntdev.dmabuf_wait_released(second, 2000) is True


def test_waiting_on_a_released_newer_export_finds_the_older_one_of_that_number(
    remote: tuple[SimPlatform, SimGrantDevice, list[int]],
) -> None:
    dom0, gntdev, refs = remote
    first = gntdev.dmabuf_export(GUEST, refs[:1])
    display = dom0.open_dmabuf(first)
    os.close(first)
    second = gntdev.dmabuf_export(GUEST, refs[1:])
    assert second == first
    os.close(second)  # released at once: nothing else holds it
    # The newest export of that number is gone, so the wait lands on the older, held one.
    assert gntdev.dmabuf_wait_released(second, 50) is False
    display.close()
    assert gntdev.dmabuf_wait_released(first, 2000) is True


def test_export_with_a_bad_grant_is_einval(
    gntdev: SimGrantDevice, granted: tuple[SimDomain, list[int], list[int]]
) -> None:
    guest, pfns, refs = granted
    ro = guest.grant(pfns[0], 0, readonly=True)
    for bad in ([refs[0], 999], [ro], []):
        with pytest.raises(OSError) as exc:
            gntdev.dmabuf_export(GUEST, bad)
        assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as flags:
        gntdev.dmabuf_export(GUEST, refs, flags=GNTDEV_DMA_FLAG_WC | GNTDEV_DMA_FLAG_COHERENT)
    assert flags.value.errno == errno.EINVAL
    guest.end_access(ro)


@pytest.mark.parametrize("err", [errno.ENOTTY, errno.EINVAL])
def test_unsupported_dmabuf_export_fails_like_the_kernel(
    hypervisor: HypervisorThread, granted: tuple[SimDomain, list[int], list[int]], err: int
) -> None:
    _guest, _pfns, refs = granted
    with SimPlatform(
        hypervisor.socket_path, "unused", dmabuf_export_supported=False,
        dmabuf_unsupported_errno=err,
    ) as platform:
        dev = platform.open_grant_device()
        with pytest.raises(OSError) as exc:
            dev.dmabuf_export(GUEST, refs)
        assert exc.value.errno == err
        fd = platform.alloc_dmabuf(4096)
        if err == errno.ENOTTY:  # no CONFIG_XEN_GNTDEV_DMABUF: no dma-buf ioctl at all
            with pytest.raises(OSError) as imp:
                dev.dmabuf_import_to_refs(fd, 1, GUEST)
            assert imp.value.errno == errno.ENOTTY
        else:  # x86 PV Dom0: import still works
            dev.dmabuf_import_to_refs(fd, 1, GUEST)
            dev.dmabuf_import_release(fd)
        os.close(fd)
        with dev.map_grants(GUEST, refs) as mapping:  # plain mapping still works
            assert len(mapping.buffer) == 2 * 4096
        dev.close()


def test_import_grants_dom0_pages_and_release_revokes_them(
    hypervisor: HypervisorThread, dom0: SimPlatform, gntdev: SimGrantDevice
) -> None:
    fd = dom0.alloc_dmabuf(3 * 4096 - 100)
    refs = gntdev.dmabuf_import_to_refs(fd, 3, GUEST)
    assert len(set(refs)) == 3
    assert hypervisor.counters()["domains"][0]["grants"] == 3
    with SimDomain(hypervisor.socket_path, GUEST) as guest:
        dev = guest.open_grant_device()
        mapping = dev.map_grants(0, refs)
        gntdev.dmabuf_import_release(fd)
        # Revocation waits for the guest to unmap; new mappings are refused meanwhile.
        assert hypervisor.counters()["domains"][0]["grants"] == 3
        with pytest.raises(OSError) as exc:
            dev.map_grants(0, refs)
        assert exc.value.errno == errno.EINVAL
        mapping.close()
        assert hypervisor.counters()["domains"][0]["grants"] == 0
        dev.close()
    os.close(fd)


def test_import_needs_the_exact_page_count(dom0: SimPlatform, gntdev: SimGrantDevice) -> None:
    fd = dom0.alloc_dmabuf(2 * 4096)
    for count in (1, 3, 0):
        with pytest.raises(OSError) as exc:
            gntdev.dmabuf_import_to_refs(fd, count, GUEST)
        assert exc.value.errno == errno.EINVAL
    os.close(fd)


def test_import_release_of_an_unknown_fd_is_enoent(gntdev: SimGrantDevice) -> None:
    with pytest.raises(OSError) as exc:
        gntdev.dmabuf_import_release(77)
    assert exc.value.errno == errno.ENOENT


def test_import_keeps_the_dmabuf_alive_until_released(
    hypervisor: HypervisorThread, dom0: SimPlatform, gntdev: SimGrantDevice
) -> None:
    fd = dom0.alloc_dmabuf(4096)
    control = dom0.alloc_dmabuf(4096)  # not imported: released when closed
    gntdev.dmabuf_import_to_refs(fd, 1, GUEST)
    assert hypervisor.counters()["domains"][0]["dmabufs"] == 2
    os.close(fd)  # against the rules, but the import still holds the buffer
    os.close(control)
    # The hypervisor saw the later close: the earlier one would have been seen by then.
    deadline = time.monotonic() + 10
    while hypervisor.counters()["domains"][0]["dmabufs"] == 2:
        assert time.monotonic() < deadline, "the control buffer's close was never seen"
    assert hypervisor.counters()["domains"][0]["dmabufs"] == 1
    with pytest.raises(OSError):
        gntdev.dmabuf_import_release(fd + 1)
    gntdev.dmabuf_import_release(fd)


def test_alloc_dmabuf_is_zeroed_and_page_rounded(dom0: SimPlatform) -> None:
    fd = dom0.alloc_dmabuf(5000)
    with dom0.open_dmabuf(fd) as display:
        assert bytes(display.buffer) == bytes(2 * 4096)
    os.close(fd)
    with pytest.raises(OSError) as exc:
        dom0.alloc_dmabuf(0)
    assert exc.value.errno == errno.EINVAL


def test_open_dmabuf_rejects_fds_that_are_not_dmabufs(dom0: SimPlatform) -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        for fd in (a.fileno(), r):
            with pytest.raises(OSError) as exc:
                dom0.open_dmabuf(fd)
            assert exc.value.errno == errno.EINVAL
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)
    with pytest.raises(OSError) as bad:
        dom0.open_dmabuf(r)
    assert bad.value.errno == errno.EBADF


def test_dmabuf_fd_passed_to_another_thread_keeps_it_alive(
    dom0: SimPlatform, gntdev: SimGrantDevice, granted: tuple[SimDomain, list[int], list[int]]
) -> None:
    _guest, _pfns, refs = granted
    fd = gntdev.dmabuf_export(GUEST, refs)
    copy = os.dup(fd)
    os.close(fd)
    closer = threading.Timer(0.05, os.close, args=(copy,))
    closer.start()
    assert gntdev.dmabuf_wait_released(fd, 5000) is True
    closer.join()
