"""The buffer store against the simulated Xen and a virtual display: every path, every refusal.

A simulated guest (``SimDomain``) grants pages and writes page directories as Linux does; the
backend's ``BufferStore`` serves its requests; a ``VirtualDisplay`` shows the frames. The
``hypervisor`` fixture fails a test that leaves any mapping, grant, page, dma-buf or
connection behind; ``no_fd_leak`` fails one that leaves a file descriptor open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import outcome
import pytest
import trio

from displback.backend.buffers import (
    BufferKind,
    BufferStore,
    GuestFramebuffer,
    ZeroCopyPolicy,
)
from displback.backend.copies import native_copies_built
from displback.backend.deferred import DeferredReleases
from displback.backend.errors import RequestError
from displback.backend.quotas import Limits, Quota
from displback.display.interface import Framebuffer
from displback.display.virtual import OutputConfig, VirtualDisplay, VirtualOutput
from displback.protocol.constants import (
    DBUF_FLG_REQ_ALLOC,
    EDID_MAX_SIZE,
    GREFS_PER_DIR_PAGE,
    PAGE_SIZE,
    PixelFormat,
    pages_for,
)
from displback.protocol.messages import (
    DbufCreateReq,
    DbufDestroyReq,
    FbAttachReq,
    FbDetachReq,
    GetEdidReq,
)
from displback.protocol.pagedir import build_directory, dir_pages_for
from displback.sim.hypervisor import HypervisorProcess, HypervisorThread, query_counters
from displback.sim.platform import SimDomain, SimGrantDevice, SimPlatform, client_resources
from tests.backend.support import PipeFlip, copy_frames_with

GUEST = 5
XRGB = PixelFormat.XRGB8888


# --------------------------------------------------------------------------------------------
# The guest side


@dataclass
class GuestBuffer:
    """Pages a guest granted to Dom0 and the directory listing them."""

    pfns: list[int]
    refs: list[int]
    dir_pfns: list[int]
    dir_grefs: list[int]


def write_pages(guest: SimDomain, pfns: list[int], data: bytes, offset: int = 0) -> None:
    with guest.map_pages(pfns) as mapping:
        mapping.buffer[offset : offset + len(data)] = data


def read_pages(guest: SimDomain, pfns: list[int], offset: int, size: int) -> bytes:
    with guest.map_pages(pfns) as mapping:
        return bytes(mapping.buffer[offset : offset + size])


def write_directory(guest: SimDomain, buf: GuestBuffer, listed: list[int]) -> None:
    pages = build_directory(listed, buf.dir_grefs)
    write_pages(guest, buf.dir_pfns, b"".join(pages))


def guest_buffer(
    guest: SimDomain,
    npages: int,
    *,
    readonly: bool = False,
    dir_pages: int | None = None,
    listed: list[int] | None = None,
) -> GuestBuffer:
    """``npages`` zeroed pages granted to Dom0, listed by a directory as Linux writes it.

    ``npages=0`` with ``dir_pages`` makes just a chain (be-alloc mode); ``listed`` replaces
    the refs written into the directory (hostile directories).
    """
    pfns = guest.alloc_pages(npages) if npages else []
    refs = guest.grant_pages(pfns, 0, readonly=readonly) if npages else []
    ndir = dir_pages if dir_pages is not None else dir_pages_for(npages)
    dir_pfns = guest.alloc_pages(ndir)
    dir_grefs = guest.grant_pages(dir_pfns, 0)
    buf = GuestBuffer(pfns, refs, dir_pfns, dir_grefs)
    write_directory(guest, buf, refs if listed is None else listed)
    return buf


def free_buffer(guest: SimDomain, buf: GuestBuffer) -> None:
    """End access to every page (EBUSY if Dom0 still maps one) and free them."""
    guest.end_access_pages(buf.refs + buf.dir_grefs)
    guest.free_pages(buf.pfns + buf.dir_pfns)


def pixel(x: int, y: int) -> tuple[int, int, int]:
    return (x * 7 + 3) % 256, (y * 13 + 5) % 256, (x + y) % 256


def frame_bytes(width: int, height: int, pitch: int, salt: int = 0) -> bytes:
    """An XRGB8888 test picture, rows ``pitch`` bytes apart (bytes B, G, R, X)."""
    out = bytearray(pitch * height)
    for y in range(height):
        for x in range(width):
            r, g, b = pixel(x + salt, y)
            out[y * pitch + 4 * x : y * pitch + 4 * x + 4] = bytes((b, g, r, 0))
    return bytes(out)


def assert_shows(output: VirtualOutput, width: int, height: int, salt: int = 0) -> None:
    image = output.snapshot()
    for y in range(height):
        for x in range(width):
            assert image.pixel(x, y) == pixel(x + salt, y), (x, y)


# --------------------------------------------------------------------------------------------
# The backend side


class ListLog:
    """A logger that keeps its lines."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def debug(self, msg: str, /) -> None:
        self.lines.append(("debug", msg))

    def info(self, msg: str, /) -> None:
        self.lines.append(("info", msg))

    def warning(self, msg: str, /) -> None:
        self.lines.append(("warning", msg))

    def count(self, level: str, text: str) -> int:
        return sum(1 for lv, msg in self.lines if lv == level and text in msg)


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    hv: HypervisorThread | HypervisorProcess
    platform: SimPlatform
    guest: SimDomain
    grants: SimGrantDevice
    display: VirtualDisplay
    deferred: DeferredReleases
    store: BufferStore
    log: ListLog
    clock: ManualClock
    ids: Iterator[int] = field(default_factory=lambda: iter(range(1, 1 << 16)))

    @property
    def output(self) -> VirtualOutput:
        return self.display.outputs["c0"]

    def create_req(
        self,
        cookie: int,
        buf: GuestBuffer,
        width: int,
        height: int,
        bpp: int = 32,
        *,
        buffer_sz: int | None = None,
        flags: int = 0,
        data_ofs: int = 0,
    ) -> DbufCreateReq:
        if buffer_sz is None:
            buffer_sz = (width * bpp + 7) // 8 * height
        return DbufCreateReq(
            id=next(self.ids),
            dbuf_cookie=cookie,
            width=width,
            height=height,
            bpp=bpp,
            buffer_sz=buffer_sz,
            flags=flags,
            gref_directory=buf.dir_grefs[0] if buf.dir_grefs else 0,
            data_ofs=data_ofs,
        )

    async def create(self, cookie: int, buf: GuestBuffer, width: int, height: int) -> None:
        await self.store.create(self.create_req(cookie, buf, width, height))

    def attach(
        self, dbuf: int, fb: int, width: int, height: int, fourcc: int = XRGB
    ) -> GuestFramebuffer:
        req = FbAttachReq(
            id=next(self.ids),
            dbuf_cookie=dbuf,
            fb_cookie=fb,
            width=width,
            height=height,
            pixel_format=fourcc,
        )
        self.store.attach(req)
        return self.store.framebuffer(fb)

    async def detach(self, fb: int) -> None:
        await self.store.detach(FbDetachReq(id=next(self.ids), fb_cookie=fb))

    async def destroy(self, dbuf: int) -> None:
        await self.store.destroy(DbufDestroyReq(id=next(self.ids), dbuf_cookie=dbuf))

    async def show(self, fb: GuestFramebuffer, output: VirtualOutput | None = None) -> Framebuffer:
        out = output or self.output
        shown = await fb.present_on(out)
        await out.flip(shown)
        return shown


@asynccontextmanager
async def open_env(
    hv: HypervisorThread | HypervisorProcess,
    *,
    export: bool = True,
    export_errno: int = errno.ENOTTY,
    import_supported: bool = True,
    policy: ZeroCopyPolicy = ZeroCopyPolicy.AUTO,
    be_alloc: bool = False,
    wait_free_ms: int = 2000,
    limits: Limits | None = None,
    outputs: int = 1,
) -> AsyncIterator[Env]:
    log = ListLog()
    clock = ManualClock()
    configs = [OutputConfig(f"c{i}", 64, 48, refresh_hz=1000.0) for i in range(outputs)]
    with (
        contextlib.ExitStack() as cleanup,
        SimPlatform(
            hv.socket_path,
            "unused",
            dmabuf_export_supported=export,
            dmabuf_unsupported_errno=export_errno,
        ) as platform,
        SimDomain(hv.socket_path, GUEST) as guest,
    ):
        grants = platform.open_grant_device()
        deferred = DeferredReleases(retry_interval=0.01, log=log)
        cleanup.callback(deferred.close_device_when_drained, grants)
        try:
            async with (
                trio.open_nursery() as nursery,
                VirtualDisplay.open(
                    configs, dmabuf_importer=platform.open_dmabuf, import_supported=import_supported
                ) as display,
            ):
                await nursery.start(deferred.run)
                store = BufferStore(
                    domid=GUEST,
                    grants=grants,
                    dmabufs=platform,
                    outputs=list(display.outputs.values()),
                    quota=Quota(limits or Limits.for_connectors([(64, 48)])),
                    policy=policy,
                    wait_free_ms=wait_free_ms,
                    deferred=deferred,
                    be_alloc=be_alloc,
                    log=log,
                    quota_log_clock=clock,
                )
                try:
                    yield Env(hv, platform, guest, grants, display, deferred, store, log, clock)
                finally:
                    with trio.CancelScope(shield=True):
                        await store.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await deferred.aclose()


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Set up before (and torn down after) the hypervisor: no fd may outlive the test."""
    before = len(open_fds())
    yield
    assert len(open_fds()) <= before, "file descriptors leaked"


async def expect_error(code: int, coro: object) -> RequestError:
    with pytest.raises(RequestError) as exc:
        await coro  # type: ignore[misc]
    assert exc.value.errno == code, exc.value
    return exc.value


def expect_sync_error(code: int, fn: object, *args: object) -> RequestError:
    with pytest.raises(RequestError) as exc:
        fn(*args)  # type: ignore[operator]
    assert exc.value.errno == code, exc.value
    return exc.value


def dom0_counters(hv: HypervisorThread | HypervisorProcess) -> dict[str, int]:
    """Dom0's live pages, grants, mappings, dma-bufs and ports (callable from trio)."""
    domains = query_counters(hv.socket_path)["domains"]
    return {k: int(v) for k, v in domains.get("0", {}).items()}


def mappings_of_dom0(hv: HypervisorThread | HypervisorProcess) -> int:
    return dom0_counters(hv).get("mappings", 0)


# --------------------------------------------------------------------------------------------
# Zero-copy


async def test_zero_copy_buffer_is_scanned_out_from_guest_memory(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(hypervisor, outputs=2) as env:
        buf = guest_buffer(env.guest, pages_for(32 * 16 * 4))
        write_pages(env.guest, buf.pfns, frame_bytes(32, 16, 128))
        await env.create(0xA0, buf, 32, 16)
        assert env.store.buffer_info(0xA0).kind is BufferKind.ZERO_COPY
        assert env.store.export_supported is True
        fb = env.attach(0xA0, 0xF0, 32, 16)
        assert (fb.pitch, fb.offset, fb.zero_copy) == (128, 0, True)

        shown = await env.show(fb)
        assert shown.zero_copy
        assert await fb.present_on(env.output) is shown  # imported once per output, cached
        assert_shows(env.output, 32, 16)
        other = env.display.outputs["c1"]
        shown_there = await env.show(fb, other)
        assert shown_there is not shown and shown_there.zero_copy
        assert_shows(other, 32, 16)

        # Zero-copy: the guest's next drawing is on screen without another present.
        write_pages(env.guest, buf.pfns, frame_bytes(32, 16, 128, salt=9))
        assert_shows(env.output, 32, 16, salt=9)

        await env.detach(0xF0)
        assert fb.released and shown.released and shown_there.released
        assert_shows(env.output, 32, 16, salt=9)  # the output keeps its last frame
        await env.destroy(0xA0)
        assert mappings_of_dom0(env.hv) == 0
        free_buffer(env.guest, buf)  # nothing of it is mapped in Dom0 any more
        assert env.store.stats.buffers == 0


async def test_destroy_of_an_on_screen_buffer_detaches_and_keeps_the_last_frame(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(hypervisor) as env:
        buf = guest_buffer(env.guest, pages_for(16 * 8 * 4))
        write_pages(env.guest, buf.pfns, frame_bytes(16, 8, 64))
        await env.create(1, buf, 16, 8)
        fb = env.attach(1, 2, 16, 8)
        await env.show(fb)
        await env.destroy(1)  # no FB_DETACH first
        assert fb.released
        expect_sync_error(errno.ENOENT, env.store.framebuffer, 2)
        await expect_error(errno.ENOENT, fb.present_on(env.output))
        assert env.output.enabled and env.output.current_fb is None
        assert mappings_of_dom0(env.hv) == 0
        write_pages(env.guest, buf.pfns, bytes(16 * 8 * 4))  # the guest reuses its pages
        assert_shows(env.output, 16, 8)
        free_buffer(env.guest, buf)
        # The cookies may be used again.
        buf2 = guest_buffer(env.guest, 1)
        await env.create(1, buf2, 16, 8)
        env.attach(1, 2, 16, 8)
        await env.destroy(1)
        free_buffer(env.guest, buf2)


async def test_wait_free_timeout_answers_and_defers_until_the_importer_lets_go(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(hypervisor, wait_free_ms=30) as env:
        buf = guest_buffer(env.guest, 2)
        await env.create(7, buf, 32, 16)
        fd = env.store.buffer_info(7).dmabuf_fd
        assert fd is not None
        stubborn = env.platform.open_dmabuf(fd)  # e.g. a compositor holding the buffer
        await env.destroy(7)  # answered although the importer holds on
        assert env.store.stats.deferred == 1
        assert env.deferred.pending(GUEST) == 1
        with pytest.raises(OSError) as exc:
            env.guest.end_access(buf.refs[0])
        assert exc.value.errno == errno.EBUSY  # still mapped by the export
        stubborn.close()
        with trio.fail_after(10):
            await env.deferred.wait_drained(GUEST)
        assert env.deferred.stats.released == 1
        free_buffer(env.guest, buf)


@pytest.mark.parametrize("machine", ["hypervisor", "hypervisor_process"])
async def test_a_deferred_fd_number_stays_reserved_so_a_new_export_cannot_take_it(
    request: pytest.FixtureRequest, machine: str
) -> None:
    hv = request.getfixturevalue(machine)  # in a child process fd numbers are as on Dom0
    async with open_env(hv, wait_free_ms=30) as env:
        old = guest_buffer(env.guest, 2)
        await env.create(1, old, 32, 16)
        fd = env.store.buffer_info(1).dmabuf_fd
        assert fd is not None
        stubborn = env.platform.open_dmabuf(fd)
        await env.destroy(1)
        assert os.readlink(f"/proc/self/fd/{fd}") == os.devnull  # reserved, not the dma-buf
        new = guest_buffer(env.guest, 2)
        await env.create(2, new, 32, 16)
        new_fd = env.store.buffer_info(2).dmabuf_fd
        assert new_fd is not None and new_fd != fd
        # The deferred wait is on the OLD buffer: it drains while the new one lives on.
        stubborn.close()
        with trio.fail_after(10):
            await env.deferred.wait_drained(GUEST)
        free_buffer(env.guest, old)
        assert env.store.buffer_info(2).dmabuf_fd == new_fd
        await env.destroy(2)
        free_buffer(env.guest, new)


async def test_a_destroy_cancelled_while_waiting_still_ends_with_the_buffer_deferred(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(hypervisor, wait_free_ms=100) as env:
        buf = guest_buffer(env.guest, 1)
        await env.create(1, buf, 16, 8)
        fd = env.store.buffer_info(1).dmabuf_fd
        assert fd is not None
        stubborn = env.platform.open_dmabuf(fd)


        async def cancel_once_waiting(scope: trio.CancelScope) -> None:
            while os.readlink(f"/proc/self/fd/{fd}") != os.devnull:  # number reserved: waiting
                await trio.sleep(0.001)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as scope:
                nursery.start_soon(cancel_once_waiting, scope)
                # trio does not abandon the waiting thread: the wait runs to its end.
                await env.destroy(1)
        expect_sync_error(errno.ENOENT, env.store.buffer_info, 1)
        assert env.deferred.pending(GUEST) == 1
        assert os.readlink(f"/proc/self/fd/{fd}") == os.devnull
        stubborn.close()
        with trio.fail_after(10):
            await env.deferred.wait_drained(GUEST)
        free_buffer(env.guest, buf)


async def test_a_full_deferred_list_refuses_new_buffers_until_it_drains(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    limits = dataclasses.replace(Limits.for_connectors([(64, 48)]), max_deferred=1)
    async with open_env(hypervisor, wait_free_ms=10, limits=limits) as env:
        buf = guest_buffer(env.guest, 1)
        await env.create(1, buf, 16, 8)
        fd = env.store.buffer_info(1).dmabuf_fd
        assert fd is not None
        stubborn = env.platform.open_dmabuf(fd)
        await env.destroy(1)
        assert env.store.quota.deferred == 1 and env.deferred.pending(GUEST) == 1
        other = guest_buffer(env.guest, 1)
        await expect_error(errno.ENOMEM, env.create(2, other, 16, 8))
        assert env.log.count("warning", "still imported") == 2  # deferral + refusal
        stubborn.close()
        with trio.fail_after(10):
            await env.deferred.wait_drained(GUEST)
        await env.create(2, other, 16, 8)
        await env.destroy(2)
        free_buffer(env.guest, other)
        free_buffer(env.guest, buf)


async def test_teardown_releases_everything_and_defers_what_is_still_imported(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(hypervisor) as env:
        bufs = [guest_buffer(env.guest, 1) for _ in range(3)]
        for cookie, buf in enumerate(bufs, 1):
            await env.create(cookie, buf, 16, 8)
            env.attach(cookie, 100 + cookie, 16, 8)
        await env.show(env.store.framebuffer(101))
        fd = env.store.buffer_info(2).dmabuf_fd
        assert fd is not None
        stubborn = env.platform.open_dmabuf(fd)
        await env.store.aclose()
        assert env.store.stats.buffers == 0 and env.store.stats.framebuffers == 0
        # The still-imported buffer's page stays mapped: charged to the guest until released.
        quota = env.store.quota
        assert (quota.buffers, quota.pages, quota.deferred, quota.framebuffers) == (0, 1, 1, 0)
        assert env.deferred.pending(GUEST) == 1
        await expect_error(errno.EIO, env.create(9, bufs[0], 16, 8))
        stubborn.close()
        with trio.fail_after(10):
            await env.deferred.wait_drained()
        assert quota.idle
        for buf in bufs:
            free_buffer(env.guest, buf)


async def test_teardown_never_waits_for_importers_each_held_buffer_is_deferred_at_once(
    hypervisor: HypervisorThread,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DBUF_DESTROY waits up to wait_free_ms for an importer; a teardown does not (a guest
    going away with N buffers held elsewhere would otherwise stall its device N × that long):
    every release check at teardown is a look (0 ms), and what is still held is deferred."""
    async with open_env(hypervisor, wait_free_ms=3000) as env:
        waits: list[int] = []
        wait_released = env.grants.dmabuf_wait_released

        def recorded(fd: int, timeout_ms: int) -> bool:
            waits.append(timeout_ms)
            return wait_released(fd, timeout_ms)

        monkeypatch.setattr(env.grants, "dmabuf_wait_released", recorded)
        bufs = [guest_buffer(env.guest, 1) for _ in range(3)]
        stubborn = []
        for cookie, buf in enumerate(bufs, 1):
            await env.create(cookie, buf, 16, 8)
            fd = env.store.buffer_info(cookie).dmabuf_fd
            assert fd is not None
            stubborn.append(env.platform.open_dmabuf(fd))
        await env.store.aclose()
        # One look per buffer (the deferred list's retries, also looks, may follow at once).
        assert len(waits) >= 3 and set(waits) == {0}
        assert env.deferred.pending(GUEST) == 3 and env.store.quota.deferred == 3
        for held in stubborn:
            held.close()
        with trio.fail_after(10):
            await env.deferred.wait_drained()
        assert env.store.quota.idle
        for buf in bufs:
            free_buffer(env.guest, buf)


# --------------------------------------------------------------------------------------------
# Copy


@pytest.mark.parametrize("unsupported", [errno.ENOTTY, errno.EINVAL])
async def test_a_platform_that_cannot_export_copies_and_says_so_once(
    hypervisor: HypervisorThread,  # noqa: F811
    unsupported: int,
) -> None:
    async with open_env(hypervisor, export=False, export_errno=unsupported) as env:
        width, height = 10, 6  # 40-byte guest rows; the display pads dumb rows to 64
        buf = guest_buffer(env.guest, 1)
        write_pages(env.guest, buf.pfns, frame_bytes(width, height, 40))
        await env.create(1, buf, width, height)
        assert env.store.buffer_info(1).kind is BufferKind.COPY
        assert env.store.export_supported is False
        fb = env.attach(1, 11, width, height)
        assert not fb.zero_copy
        first = await env.show(fb)
        assert not first.zero_copy and first.pitch != fb.pitch
        assert_shows(env.output, width, height)

        # A copy: the guest's next drawing appears only after the next present.
        write_pages(env.guest, buf.pfns, frame_bytes(width, height, 40, salt=4))
        assert_shows(env.output, width, height)
        second = await env.show(fb)
        assert second is not first  # never the buffer on screen
        assert_shows(env.output, width, height, salt=4)
        assert await fb.present_on(env.output) is first  # the two alternate...
        assert await fb.present_on(env.output) is first  # ...but never onto the one on screen

        buf2 = guest_buffer(env.guest, 1)
        await env.create(2, buf2, width, height)
        assert env.log.count("warning", "copying guest buffers instead") == 1
        stats = env.store.stats
        assert (stats.buffers, stats.copy, stats.zero_copy) == (2, 2, 0)
        await env.destroy(1)
        await env.destroy(2)
        free_buffer(env.guest, buf)  # unmapped by the destroy
        free_buffer(env.guest, buf2)


async def test_a_copy_ending_after_its_framebuffer_went_frees_its_buffer_even_if_release_fails(
    hypervisor: HypervisorThread,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``present_later``: the framebuffer is detached while its copy runs; when the copy
    ends, releasing the copy buffer fails in a way nobody foresaw. The frame's callback
    gets the failure, and the copy still counts as ended: destroying the buffer (which
    waits for its copies before unmapping) does not hang."""
    started, release = threading.Event(), threading.Event()

    def held_copy(*args: object) -> None:
        started.set()
        release.wait(30)

    copy_frames_with(monkeypatch, held_copy)
    async with open_env(hypervisor, export=False) as env:
        width, height = 10, 6
        buf = guest_buffer(env.guest, 1)
        await env.create(1, buf, width, height)
        fb = env.attach(1, 11, width, height)
        assert fb.present_now(env.output) is None  # copy mode
        results: list[Any] = []
        done = trio.Event()

        def ready(result: Any) -> None:
            results.append(result)
            done.set()

        fb.present_later(env.output, ready)
        target = fb._outputs[env.output].filling
        real_release = env.output.release

        def release_failing(fb_: Framebuffer) -> None:
            if fb_ is target:
                raise RuntimeError("a display bug")
            real_release(fb_)

        monkeypatch.setattr(env.output, "release", release_failing)
        with trio.fail_after(30):
            await trio.to_thread.run_sync(started.wait, 30)
            await env.detach(11)  # released while its copy runs
            release.set()
            await done.wait()
            assert isinstance(results[0], outcome.Error)
            assert "a display bug" in str(results[0].error)
            # The copy counts as ended: else the destroy below would wait for ever (here the
            # count is put right before failing, so that the teardown ends).
            unended = fb._buffer.copies
            for _ in range(unended):
                fb._buffer.copy_ended()
            assert unended == 0
            expect_sync_error(errno.ENOENT, fb.present_later, env.output, ready)  # (detached)
            monkeypatch.setattr(env.output, "release", real_release)
            await env.destroy(1)  # waits for the copy to have ended: it has
        free_buffer(env.guest, buf)


@pytest.mark.skipif(not native_copies_built(), reason="the native copy threads are not built")
async def test_a_frame_whose_copy_thread_flipped_it_is_handed_back_with_nothing_to_flip(
    hypervisor: HypervisorThread,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``present_later(..., on_landed)``: the output hands the flip to the copy thread (a
    pipe's FIONREAD stands for the KMS commit); the copy comes back when the output settles
    it, with None — the flip is under way, nothing is left to flip — and the frame's dumb
    buffer was the flip's target. Detached meanwhile, it is still None, not ENOENT: the
    output lands what the thread flipped (its own buffer, no guest memory)."""
    pipe = PipeFlip()
    asked: list[tuple[Any, Any]] = []

    def native_flip(fb: Any, on_landed: Any) -> Any:
        asked.append((fb, on_landed))
        return pipe.flip

    async with open_env(hypervisor, export=False) as env:
        monkeypatch.setattr(env.output, "native_flip", native_flip)
        width, height = 10, 6
        buf = guest_buffer(env.guest, 1)
        await env.create(1, buf, width, height)
        fb = env.attach(1, 11, width, height)
        assert fb.present_now(env.output) is None  # copy mode
        results: list[Any] = []

        def on_landed(result: Any) -> None:  # (the output's: never called here)
            raise AssertionError("landed")

        with trio.fail_after(30):
            fb.present_later(env.output, results.append, on_landed)
            [(target, landing)] = asked
            assert target is fb._outputs[env.output].filling and landing is on_landed
            while not pipe.issued:
                await trio.sleep(0.005)
            await env.detach(11)  # released while its flip is under way
            assert results == []  # quiet: the flip's event will hand the copy back
            assert pipe.flip.settle is not None
            pipe.flip.settle()
            [result] = results
            assert result.unwrap() is None
            await env.destroy(1)  # the copy ended: nothing waits
        free_buffer(env.guest, buf)
    pipe.close()


async def test_a_display_refusing_imports_gets_copies_logged_once_per_buffer(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(hypervisor, import_supported=False) as env:
        buf = guest_buffer(env.guest, 1)
        write_pages(env.guest, buf.pfns, frame_bytes(16, 8, 64))
        await env.create(1, buf, 16, 8)
        assert env.store.buffer_info(1).kind is BufferKind.ZERO_COPY
        fb = env.attach(1, 11, 16, 8)
        narrow = env.attach(1, 12, 8, 8)
        shown = await env.show(fb)
        assert not shown.zero_copy and not fb.zero_copy
        assert_shows(env.output, 16, 8)
        await env.show(narrow)
        assert env.log.count("warning", "refuses to import buffer 0x1") == 1
        assert env.store.stats.import_fallbacks == 2
        await env.detach(11)
        await env.detach(12)
        await env.destroy(1)
        free_buffer(env.guest, buf)


async def test_policy_off_copies_even_where_export_works(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(hypervisor, policy=ZeroCopyPolicy.OFF) as env:
        buf = guest_buffer(env.guest, 1)
        write_pages(env.guest, buf.pfns, frame_bytes(16, 8, 64))
        await env.create(1, buf, 16, 8)
        assert env.store.buffer_info(1).kind is BufferKind.COPY
        assert env.store.buffer_info(1).dmabuf_fd is None
        fb = env.attach(1, 2, 16, 8)
        assert not (await env.show(fb)).zero_copy
        assert_shows(env.output, 16, 8)
        await env.destroy(1)
        free_buffer(env.guest, buf)


async def test_a_directory_is_read_with_one_grant_copy_per_page_and_maps_nothing(
    hypervisor: HypervisorThread,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Copy mode: the only mapping a DBUF_CREATE makes is the buffer's, in one call; each
    directory page costs one gntdev call (map + unmap cost two and an munmap)."""
    async with open_env(hypervisor, policy=ZeroCopyPolicy.OFF) as env:
        calls: list[tuple[str, int]] = []
        grants = env.store.grants
        real_map, real_copy = grants.map_grants, grants.copy_from_grant

        def map_grants(domid: int, refs: list[int], *, writable: bool = True) -> object:
            calls.append(("map", len(refs)))
            return real_map(domid, refs, writable=writable)

        def copy_from_grant(domid: int, ref: int, length: int) -> bytes:
            calls.append(("copy", ref))
            return real_copy(domid, ref, length)

        monkeypatch.setattr(grants, "map_grants", map_grants)
        monkeypatch.setattr(grants, "copy_from_grant", copy_from_grant)
        npages = GREFS_PER_DIR_PAGE + 5
        buf = guest_buffer(env.guest, npages)
        await env.store.create(env.create_req(1, buf, 16, 8, buffer_sz=npages * PAGE_SIZE))
        assert calls == [("copy", buf.dir_grefs[0]), ("copy", buf.dir_grefs[1]), ("map", npages)]
        assert mappings_of_dom0(env.hv) == npages
        await env.destroy(1)
        free_buffer(env.guest, buf)


@pytest.mark.parametrize("unsupported", [errno.ENOTTY, errno.EINVAL])
async def test_policy_require_refuses_buffers_that_cannot_be_exported(
    hypervisor: HypervisorThread,  # noqa: F811
    unsupported: int,
) -> None:
    async with open_env(
        hypervisor, export=False, export_errno=unsupported, policy=ZeroCopyPolicy.REQUIRE
    ) as env:
        buf = guest_buffer(env.guest, 1)
        await expect_error(errno.EOPNOTSUPP, env.create(1, buf, 16, 8))
        await expect_error(errno.EOPNOTSUPP, env.create(1, buf, 16, 8))  # known now
        assert env.store.stats.buffers == 0 and env.store.quota.buffers == 0
        assert mappings_of_dom0(env.hv) == 0
        free_buffer(env.guest, buf)


async def test_policy_require_fails_the_flip_when_the_display_refuses_the_import(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(
        hypervisor, import_supported=False, policy=ZeroCopyPolicy.REQUIRE
    ) as env:
        buf = guest_buffer(env.guest, 1)
        await env.create(1, buf, 16, 8)
        fb = env.attach(1, 2, 16, 8)
        await expect_error(errno.EOPNOTSUPP, fb.present_on(env.output))
        await env.destroy(1)
        free_buffer(env.guest, buf)


# --------------------------------------------------------------------------------------------
# Pending (PRIME) buffers and be-alloc


async def test_a_pending_prime_buffer_takes_its_geometry_from_fb_attach(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(hypervisor) as env:
        data_ofs = 256
        buf = guest_buffer(env.guest, 1)
        write_pages(env.guest, buf.pfns, frame_bytes(16, 8, 64), offset=data_ofs)
        req = env.create_req(1, buf, 0, 0, 0, buffer_sz=PAGE_SIZE, data_ofs=data_ofs)
        await env.store.create(req)
        info = env.store.buffer_info(1)
        assert (info.width, info.height, info.bpp, info.data_ofs) == (0, 0, 0, data_ofs)
        # (4096 - 256) / 64 = 60 rows of 16 pixels fit; 61 do not.
        expect_sync_error(errno.EINVAL, env.attach, 1, 3, 16, 61)
        fb = env.attach(1, 2, 16, 8)
        assert (fb.pitch, fb.offset) == (64, data_ofs)
        await env.show(fb)
        assert_shows(env.output, 16, 8)
        await env.detach(2)
        await env.destroy(1)
        free_buffer(env.guest, buf)


@pytest.mark.parametrize("import_supported", [True, False])
async def test_a_backend_allocated_buffer_is_granted_to_the_guest_and_shown(
    hypervisor: HypervisorThread,  # noqa: F811
    import_supported: bool,
) -> None:
    async with open_env(hypervisor, be_alloc=True, import_supported=import_supported) as env:
        npages = GREFS_PER_DIR_PAGE + 2  # two directory pages to fill
        chain = guest_buffer(env.guest, 0, dir_pages=2, listed=[0] * npages)
        req = env.create_req(
            1, chain, 16, 8, buffer_sz=npages * PAGE_SIZE, flags=DBUF_FLG_REQ_ALLOC
        )
        await env.store.create(req)
        assert env.store.buffer_info(1).kind is BufferKind.BACKEND
        # The guest reads our refs from its directory, maps them and draws.
        directory = read_pages(env.guest, chain.dir_pfns, 0, 2 * PAGE_SIZE)
        refs = list(struct.unpack_from(f"<{GREFS_PER_DIR_PAGE}I", directory, 4))
        refs += struct.unpack_from("<2I", directory, PAGE_SIZE + 4)
        assert len(set(refs)) == npages and 0 not in refs
        gntdev = env.guest.open_grant_device()
        try:
            with gntdev.map_grants(0, refs) as mapping:
                mapping.buffer[: 64 * 8] = frame_bytes(16, 8, 64)
                fb = env.attach(1, 2, 16, 8)
                shown = await env.show(fb)
                assert shown.zero_copy is import_supported
                assert_shows(env.output, 16, 8)
            # Linux unmaps before DBUF_DESTROY.
            await env.detach(2)
            await env.destroy(1)
            assert dom0_counters(hypervisor).get("grants", 0) == 0
        finally:
            gntdev.close()
        free_buffer(env.guest, chain)


async def test_req_alloc_without_be_alloc_is_refused_with_eperm(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(hypervisor) as env:
        chain = guest_buffer(env.guest, 0, dir_pages=1, listed=[0])
        req = env.create_req(1, chain, 16, 8, flags=DBUF_FLG_REQ_ALLOC)
        await expect_error(errno.EPERM, env.store.create(req))
        free_buffer(env.guest, chain)


async def test_a_hostile_be_alloc_directory_is_refused_and_our_buffer_freed(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(hypervisor, be_alloc=True) as env:
        chain = guest_buffer(env.guest, 0, dir_pages=1, listed=[0])
        write_pages(env.guest, chain.dir_pfns, struct.pack("<I", 999))  # links beyond the end
        req = env.create_req(1, chain, 16, 8, flags=DBUF_FLG_REQ_ALLOC)
        await expect_error(errno.EINVAL, env.store.create(req))
        counters = dom0_counters(hypervisor)
        assert [counters.get(k, 0) for k in ("grants", "dmabufs", "mappings")] == [0, 0, 0]
        free_buffer(env.guest, chain)


# --------------------------------------------------------------------------------------------
# Refusals: bad refs, hostile directories, quotas, FB rules, GET_EDID


@pytest.mark.parametrize(
    ("export", "unsupported"),
    [(True, errno.ENOTTY), (False, errno.ENOTTY), (False, errno.EINVAL)],
)
async def test_bad_grant_refs_are_einval_and_leave_nothing_mapped(
    hypervisor: HypervisorThread,  # noqa: F811
    export: bool,
    unsupported: int,
) -> None:
    async with open_env(hypervisor, export=export, export_errno=unsupported) as env:
        buf = guest_buffer(env.guest, 3)
        write_directory(env.guest, buf, [buf.refs[0], 4000, buf.refs[2]])  # 4000: never granted
        await expect_error(errno.EINVAL, env.create(1, buf, 32, 96))
        readonly = guest_buffer(env.guest, 1, readonly=True)
        if export or unsupported == errno.EINVAL:
            # The export (or the probe telling bad refs from no export) needs write access.
            await expect_error(errno.EINVAL, env.create(2, readonly, 16, 8))
        assert mappings_of_dom0(env.hv) == 0
        assert env.store.stats.buffers == 0 and env.store.quota.buffers == 0
        if not export and unsupported == errno.EINVAL:
            assert env.store.export_supported is None  # bad refs settle nothing
        write_directory(env.guest, buf, buf.refs)
        await env.create(1, buf, 32, 96)  # the guest's next request works
        await env.destroy(1)
        free_buffer(env.guest, buf)
        free_buffer(env.guest, readonly)


def _hostile(buf: GuestBuffer, kind: str) -> list[bytes]:
    """Directory pages (for ``buf.dir_grefs``) that break one rule of reference §7."""
    refs, dirs = buf.refs, buf.dir_grefs
    pages = [bytearray(p) for p in build_directory(refs, dirs)]
    if kind == "premature end":
        struct.pack_into("<I", pages[0], 0, 0)
    elif kind == "loop":
        struct.pack_into("<I", pages[0], 0, dirs[0])  # page 0 claims to be followed by itself
    elif kind == "too long":
        struct.pack_into("<I", pages[1], 0, dirs[1] + 1000)
    elif kind == "repeated ref":
        struct.pack_into("<I", pages[1], 4, refs[0])
    elif kind == "zero ref":
        struct.pack_into("<I", pages[0], 8, 0)
    elif kind == "directory page as buffer page":
        struct.pack_into("<I", pages[0], 4, dirs[1])
    elif kind == "next page not granted":
        struct.pack_into("<I", pages[0], 0, 4000)
    return [bytes(p) for p in pages]


@pytest.mark.parametrize(
    "kind",
    [
        "premature end",
        "loop",
        "too long",
        "repeated ref",
        "zero ref",
        "directory page as buffer page",
        "next page not granted",
    ],
)
async def test_hostile_directories_are_einval_and_the_guest_can_go_on(
    hypervisor: HypervisorThread,  # noqa: F811
    kind: str,
) -> None:
    async with open_env(hypervisor) as env:
        npages = GREFS_PER_DIR_PAGE + 1
        buf = guest_buffer(env.guest, npages)
        before = client_resources()
        write_pages(env.guest, buf.dir_pfns, b"".join(_hostile(buf, kind)))
        req = env.create_req(1, buf, 0, 0, 0, buffer_sz=npages * PAGE_SIZE)
        await expect_error(errno.EINVAL, env.store.create(req))
        assert client_resources() == before
        assert mappings_of_dom0(env.hv) == 0
        write_directory(env.guest, buf, buf.refs)
        await env.store.create(req)
        await env.destroy(1)
        free_buffer(env.guest, buf)


async def test_every_quota_refuses_with_its_errno_and_the_guest_can_go_on(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    limits = Limits(
        max_buffers=2,
        max_pages_per_buffer=3,
        max_total_pages=4,
        max_dir_pages=1,
        requests_per_second=1000.0,
        request_burst=100,
    )
    async with open_env(hypervisor, limits=limits) as env:
        big = guest_buffer(env.guest, 4)
        # 32 XRGB8888 pixels = 128 bytes a row, 32 rows a page.
        await expect_error(errno.EINVAL, env.store.create(env.create_req(1, big, 32, 128)))
        a, b, c = (guest_buffer(env.guest, n) for n in (2, 1, 2))
        await env.store.create(env.create_req(1, a, 32, 64))
        await env.store.create(env.create_req(2, b, 32, 32))
        await expect_error(errno.ENOMEM, env.store.create(env.create_req(3, c, 32, 64)))
        await env.destroy(2)
        # 2 + 2 pages would be fine, 2 + 3 would not.
        d = guest_buffer(env.guest, 3)
        await expect_error(errno.ENOMEM, env.store.create(env.create_req(3, d, 32, 96)))
        # Three refusals inside one interval: one log line.
        assert env.log.count("warning", "DBUF_CREATE refused") == 1
        env.clock.now += 60
        await expect_error(errno.ENOMEM, env.store.create(env.create_req(3, d, 32, 96)))
        assert env.log.count("warning", "2 similar refusals not logged") == 1
        await env.store.create(env.create_req(3, c, 32, 64))
        assert (env.store.quota.buffers, env.store.quota.pages) == (2, 4)
        await env.destroy(1)
        await env.destroy(3)
        assert (env.store.quota.buffers, env.store.quota.pages) == (0, 0)
        for buf in (big, a, b, c, d):
            free_buffer(env.guest, buf)


async def test_buffer_and_framebuffer_requests_are_checked_against_the_tables(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(hypervisor) as env:
        buf = guest_buffer(env.guest, pages_for(32 * 16 * 4))
        await env.create(1, buf, 32, 16)
        await expect_error(errno.EEXIST, env.create(1, buf, 32, 16))
        await expect_error(errno.EINVAL, env.store.create(env.create_req(0, buf, 32, 16)))
        await expect_error(errno.ENOENT, env.destroy(2))
        expect_sync_error(errno.ENOENT, env.attach, 2, 10, 32, 16)
        fb = env.attach(1, 10, 32, 16)
        expect_sync_error(errno.EEXIST, env.attach, 1, 10, 32, 16)
        expect_sync_error(errno.EINVAL, env.attach, 1, 11, 32, 16, 0x20203859)  # unknown fourcc
        expect_sync_error(errno.EINVAL, env.attach, 1, 11, 0, 16)
        expect_sync_error(errno.EINVAL, env.attach, 1, 11, 33, 16)  # wider than the buffer
        expect_sync_error(errno.EINVAL, env.attach, 1, 11, 32, 33)  # taller than the page
        expect_sync_error(errno.EINVAL, env.attach, 1, 11, 31, 16, PixelFormat.YUYV)
        narrow = env.attach(1, 11, 16, 16, PixelFormat.RGB565)  # other format, same pitch
        assert (narrow.pitch, fb.pitch) == (128, 128)
        assert env.store.buffer_info(1).framebuffers == (10, 11)
        await expect_error(errno.ENOENT, env.detach(12))
        await env.detach(11)
        await expect_error(errno.ENOENT, env.detach(11))
        outsider = VirtualDisplay([OutputConfig("x", 8, 8)]).outputs["x"]
        with pytest.raises(ValueError):
            await fb.present_on(outsider)
        await env.detach(10)
        await env.destroy(1)
        await expect_error(errno.ENOENT, env.destroy(1))
        free_buffer(env.guest, buf)


async def test_get_edid_writes_the_edid_into_the_guests_buffer(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(hypervisor) as env:
        npages = pages_for(EDID_MAX_SIZE)
        buf = guest_buffer(env.guest, npages)
        edid = bytes(range(256)) * 2  # 4 blocks
        req = GetEdidReq(id=1, buffer_sz=EDID_MAX_SIZE, gref_directory=buf.dir_grefs[0])
        assert await env.store.write_edid(req, edid) == len(edid)
        assert read_pages(env.guest, buf.pfns, 0, len(edid)) == edid
        small = GetEdidReq(id=2, buffer_sz=EDID_MAX_SIZE - 1, gref_directory=buf.dir_grefs[0])
        await expect_error(errno.EINVAL, env.store.write_edid(small, edid))
        # A directory listing fewer pages than buffer_sz needs ends too early.
        short = guest_buffer(env.guest, 2)
        write_pages(env.guest, short.dir_pfns, struct.pack("<III", 0, *short.refs))
        req = GetEdidReq(id=3, buffer_sz=EDID_MAX_SIZE, gref_directory=short.dir_grefs[0])
        await expect_error(errno.EINVAL, env.store.write_edid(req, edid))
        # Read-only pages cannot take the EDID.
        readonly = guest_buffer(env.guest, npages, readonly=True)
        req = GetEdidReq(id=4, buffer_sz=EDID_MAX_SIZE, gref_directory=readonly.dir_grefs[0])
        await expect_error(errno.EINVAL, env.store.write_edid(req, edid))
        assert mappings_of_dom0(env.hv) == 0
        for b in (buf, short, readonly):
            free_buffer(env.guest, b)


async def test_a_framebuffer_may_end_at_the_buffers_last_byte_odd_widths_only_yuyv_refuses(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(hypervisor) as env:
        buf = guest_buffer(env.guest, 1)
        await env.create(1, buf, 32, 32)  # 32 × 32 × 4 bytes: exactly its one page
        env.attach(1, 10, 32, 32)  # ends at the last byte
        env.attach(1, 11, 31, 32)  # an odd width is fine...
        env.attach(1, 12, 30, 32, PixelFormat.YUYV)  # ...and YUYV's even ones
        expect_sync_error(errno.EINVAL, env.attach, 1, 13, 31, 32, PixelFormat.YUYV)
        expect_sync_error(errno.EINVAL, env.attach, 1, 13, 32, 33)  # one row past the end
        for fb in (10, 11, 12):
            await env.detach(fb)
        await env.destroy(1)
        free_buffer(env.guest, buf)


async def test_a_framebuffer_past_the_limit_is_refused_enomem_naming_the_limit(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    limits = dataclasses.replace(Limits.for_connectors([(64, 48)]), max_framebuffers=1)
    async with open_env(hypervisor, limits=limits) as env:
        buf = guest_buffer(env.guest, 1)
        await env.create(1, buf, 32, 32)
        env.attach(1, 10, 32, 32)
        refused = expect_sync_error(errno.ENOMEM, env.attach, 1, 11, 32, 32)
        assert "framebuffers" in refused.message and "limit 1" in refused.message
        assert env.log.count("warning", "FB_ATTACH refused") == 1
        await env.detach(10)
        env.attach(1, 11, 32, 32)  # room again
        await env.detach(11)
        await env.destroy(1)
        free_buffer(env.guest, buf)


async def test_an_edid_may_fill_the_guests_buffer_exactly_and_an_empty_one_is_our_bug(
    hypervisor: HypervisorThread,  # noqa: F811
) -> None:
    async with open_env(hypervisor) as env:
        buf = guest_buffer(env.guest, pages_for(EDID_MAX_SIZE))
        largest = bytes(range(256)) * (EDID_MAX_SIZE // 256)
        req = GetEdidReq(id=1, buffer_sz=EDID_MAX_SIZE, gref_directory=buf.dir_grefs[0])
        assert await env.store.write_edid(req, largest) == EDID_MAX_SIZE
        assert read_pages(env.guest, buf.pfns, 0, EDID_MAX_SIZE) == largest
        with pytest.raises(ValueError):
            await env.store.write_edid(req, b"")
        assert mappings_of_dom0(env.hv) == 0
        free_buffer(env.guest, buf)


async def test_a_failed_wait_for_the_release_keeps_the_number_reserved_and_defers_the_buffer(
    hypervisor: HypervisorThread,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever ends WAIT_FREE without "released" (here the wait itself failing), the fd
    number stays reserved — not inheritable by a child — and the pages mapped and charged
    until a later wait says released."""
    async with open_env(hypervisor, wait_free_ms=100) as env:
        buf = guest_buffer(env.guest, 1)
        await env.create(1, buf, 16, 8)
        fd = env.store.buffer_info(1).dmabuf_fd
        assert fd is not None
        stubborn = env.platform.open_dmabuf(fd)
        real_wait = env.grants.dmabuf_wait_released
        calls: list[int] = []

        def failing_once(fd_: int, timeout_ms: int) -> bool:
            calls.append(fd_)
            if len(calls) == 1:
                raise OSError(errno.EIO, "the wait failed")
            return real_wait(fd_, timeout_ms)

        monkeypatch.setattr(env.grants, "dmabuf_wait_released", failing_once)
        await env.destroy(1)
        assert env.log.count("warning", "waiting for the release of buffer 0x1 failed") == 1
        assert env.deferred.pending(GUEST) == 1 and env.store.quota.pages == 1
        assert os.readlink(f"/proc/self/fd/{fd}") == os.devnull
        assert not os.get_inheritable(fd)
        stubborn.close()
        with trio.fail_after(10):
            await env.deferred.wait_drained(GUEST)
        assert env.store.quota.pages == 0
        free_buffer(env.guest, buf)
