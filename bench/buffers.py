"""Buffer-path benchmarks: DBUF_CREATE of the largest buffer, memcpy bandwidth, and the copy
path's bandwidth against it.

Both drive the backend's :class:`~displback.backend.buffers.BufferStore` directly, as
``tests/backend/test_buffers.py`` does: a :class:`~displback.sim.platform.SimDomain` in this
process plays the guest (allocates, grants and lists pages in directory pages the way Linux
does — not timed), the store serves the request (timed), the hypervisor runs in a child
process. What is timed is exactly the backend's work between a request and its response.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from bench.machine import hypervisor_process
from bench.report import busy_percent, cpu_jiffies, percentile
from displback.backend.buffers import BufferKind, BufferStore
from displback.backend.copies import CopyWorkers, available_cores
from displback.backend.deferred import DeferredReleases
from displback.backend.quotas import Limits, Quota
from displback.display.pixels import copy_frame
from displback.display.virtual import OutputConfig, VirtualDisplay
from displback.protocol.constants import (
    LINUX_MAX_HEIGHT,
    LINUX_MAX_WIDTH,
    PixelFormat,
    pages_for,
    pitch_for,
)
from displback.protocol.messages import DbufCreateReq, DbufDestroyReq, FbAttachReq
from displback.protocol.pagedir import build_directory, dir_pages_for
from displback.sim.platform import SimDomain, SimPlatform

__all__ = [
    "copy_bandwidth", "copy_scaling", "dbuf_create_time", "memcpy_bandwidth", "StoreBench",
]

GUEST = 7
XRGB = PixelFormat.XRGB8888


class _QuietLog:
    """The store's logger: only warnings are kept (for the report)."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def debug(self, msg: str, /) -> None:
        pass

    def info(self, msg: str, /) -> None:
        pass

    def warning(self, msg: str, /) -> None:
        self.warnings.append(msg)


@dataclass
class _GuestBuffer:
    pfns: list[int]
    refs: list[int]
    dir_pfns: list[int]
    dir_grefs: list[int]


def _grant_buffer(guest: SimDomain, width: int, height: int, bpp: int = 32) -> _GuestBuffer:
    """What the guest does before DBUF_CREATE: pages, grants, the directory."""
    npages = pages_for(pitch_for(width, bpp) * height)
    pfns = guest.alloc_pages(npages)
    refs = guest.grant_pages(pfns, 0)
    dir_pfns = guest.alloc_pages(dir_pages_for(npages))
    dir_grefs = guest.grant_pages(dir_pfns, 0)
    with guest.map_pages(dir_pfns) as directory:
        directory.buffer[:] = b"".join(build_directory(refs, dir_grefs))
    return _GuestBuffer(pfns, refs, dir_pfns, dir_grefs)


def _free_buffer(guest: SimDomain, buf: _GuestBuffer) -> None:
    guest.end_access_pages(buf.refs + buf.dir_grefs)
    guest.free_pages(buf.pfns + buf.dir_pfns)


@dataclass
class StoreBench:
    """A buffer store of one guest device, the guest's domain handle and one output."""

    store: BufferStore
    guest: SimDomain
    output: Any
    log: _QuietLog
    _ids: int = 0

    def _id(self) -> int:
        self._ids = (self._ids + 1) & 0xFFFF
        return self._ids

    def grant_buffer(self, width: int, height: int, bpp: int = 32) -> _GuestBuffer:
        return _grant_buffer(self.guest, width, height, bpp)

    def free_buffer(self, buf: _GuestBuffer) -> None:
        _free_buffer(self.guest, buf)

    def create_req(self, cookie: int, buf: _GuestBuffer, width: int, height: int) -> DbufCreateReq:
        return DbufCreateReq(
            id=self._id(), dbuf_cookie=cookie, width=width, height=height, bpp=32,
            buffer_sz=pitch_for(width, 32) * height, flags=0,
            gref_directory=buf.dir_grefs[0], data_ofs=0,
        )

    async def destroy(self, cookie: int) -> None:
        await self.store.destroy(DbufDestroyReq(id=self._id(), dbuf_cookie=cookie))


@asynccontextmanager
async def store_bench(tmp: Path, *, copy: bool) -> AsyncIterator[StoreBench]:
    """A store that exports guest buffers (zero-copy) or, with ``copy``, maps and copies."""
    log = _QuietLog()
    async with hypervisor_process(tmp) as hv:
        with (
            contextlib.ExitStack() as cleanup,
            SimPlatform(hv.socket_path, "unused", dmabuf_export_supported=not copy) as platform,
            SimDomain(hv.socket_path, GUEST) as guest,
        ):
            grants = platform.open_grant_device()
            deferred = DeferredReleases(retry_interval=0.01, log=log)
            cleanup.callback(deferred.close_device_when_drained, grants)
            try:
                async with (
                    trio.open_nursery() as nursery,
                    VirtualDisplay.open(
                        [OutputConfig("bench", 1920, 1080)], dmabuf_importer=platform.open_dmabuf
                    ) as display,
                ):
                    await nursery.start(deferred.run)
                    output = display.outputs["bench"]
                    store = BufferStore(
                        domid=GUEST, grants=grants, dmabufs=platform, outputs=[output],
                        quota=Quota(Limits.for_connectors([(LINUX_MAX_WIDTH, LINUX_MAX_HEIGHT)])),
                        deferred=deferred, be_alloc=False, log=log,
                    )
                    try:
                        yield StoreBench(store, guest, output, log)
                    finally:
                        with trio.CancelScope(shield=True):
                            await store.aclose()
                        nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await deferred.aclose()


def _summary(samples: list[float]) -> dict[str, Any]:
    return {
        "p50": percentile(samples, 50),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


async def dbuf_create_time(
    tmp: Path, *, copy: bool, runs: int = 7,
    width: int = LINUX_MAX_WIDTH, height: int = LINUX_MAX_HEIGHT,
) -> dict[str, Any]:
    """The store's DBUF_CREATE (and, for information, DBUF_DESTROY) time, in seconds, for a
    ``width`` × ``height`` × 32 buffer, ``runs`` times; and the floor it is held to: the
    bare cost of mapping the same grefs read-only in one ``map_grants`` call of the same
    grant device (unmapped right after, not timed), just before each create.

    ``create_over_map`` is the ratio of the p50s (issue 12 goal 3: ≤ 1.5). What the create
    adds to the bare map is reading the directory (one gntdev call per directory page,
    the parse) and the bookkeeping; in zero-copy mode the export replaces the map.
    """
    creates: list[float] = []
    destroys: list[float] = []
    maps: list[float] = []
    unmaps: list[float] = []
    kind = None
    npages = pages_for(pitch_for(width, 32) * height)
    async with store_bench(tmp, copy=copy) as bench:
        grants = bench.store.grants
        for run in range(runs):
            buf = bench.grant_buffer(width, height)
            req = bench.create_req(0x1000 + run, buf, width, height)
            start = time.perf_counter()
            mapping = grants.map_grants(GUEST, list(buf.refs), writable=False)
            maps.append(time.perf_counter() - start)
            start = time.perf_counter()
            mapping.close()
            unmaps.append(time.perf_counter() - start)
            start = time.perf_counter()
            await bench.store.create(req)
            creates.append(time.perf_counter() - start)
            kind = bench.store.buffer_info(req.dbuf_cookie).kind
            start = time.perf_counter()
            await bench.destroy(req.dbuf_cookie)
            destroys.append(time.perf_counter() - start)
            bench.free_buffer(buf)
    expected = BufferKind.COPY if copy else BufferKind.ZERO_COPY
    if kind is not expected:
        raise RuntimeError(f"buffers were {kind}, not {expected}")
    return {
        "width": width,
        "height": height,
        "bpp": 32,
        "pages": npages,
        "directory_pages": dir_pages_for(npages),
        "kind": expected.value,
        "create_s": _summary(creates),
        "destroy_s": _summary(destroys),
        "bare_map_s": _summary(maps),
        "bare_unmap_s": _summary(unmaps),
        "create_over_map": percentile(creates, 50) / percentile(maps, 50),
    }


def _best_rate(nbytes: int, copy: Callable[[], object], repeats: int) -> dict[str, float]:
    """Bytes per second of ``copy`` (two warm-ups, so alternating targets are both touched,
    then ``repeats`` timed): median and best."""
    copy()
    copy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        copy()
        times.append(time.perf_counter() - start)
    return {
        "bytes": nbytes,
        "median_s": percentile(times, 50),
        "median_bps": nbytes / percentile(times, 50),
        "best_bps": nbytes / min(times),
    }


async def _best_rate_async(
    nbytes: int, copy: Callable[[], Awaitable[object]], repeats: int
) -> dict[str, float]:
    """:func:`_best_rate` of an async ``copy`` (the backend's copies run in worker threads)."""
    times = []
    for n in range(repeats + 2):
        start = time.perf_counter()
        await copy()
        if n >= 2:
            times.append(time.perf_counter() - start)
    return {
        "bytes": nbytes,
        "median_s": percentile(times, 50),
        "median_bps": nbytes / percentile(times, 50),
        "best_bps": nbytes / min(times),
    }


def memcpy_bandwidth(
    nbytes: int = 64 << 20, *, repeats: int = 10, targets: int = 1
) -> dict[str, Any]:
    """This machine's memcpy: ``np.copyto`` and a memoryview slice assignment of ``nbytes``
    from one buffer into ``targets`` buffers in turn (2 = the copy path's pattern: one guest
    frame, two dumb buffers). Every buffer is touched first, so no page fault is timed."""
    src = np.full(nbytes, 0x5A, dtype=np.uint8)
    dsts = [np.zeros(nbytes, dtype=np.uint8) for _ in range(targets)]
    turn = [0]

    def numpy_copy() -> None:
        turn[0] = (turn[0] + 1) % targets
        np.copyto(dsts[turn[0]], src)

    numpy_rate = _best_rate(nbytes, numpy_copy, repeats)
    msrc = memoryview(bytearray(src.tobytes()))
    mdsts = [memoryview(bytearray(b"\x01" * nbytes)) for _ in range(targets)]

    def slice_copy() -> None:
        turn[0] = (turn[0] + 1) % targets
        mdsts[turn[0]][:] = msrc

    view_rate = _best_rate(nbytes, slice_copy, repeats)
    return {
        "targets": targets,
        "numpy": numpy_rate,
        "memoryview": view_rate,
        "baseline_bps": max(numpy_rate["median_bps"], view_rate["median_bps"]),
    }


async def copy_bandwidth(
    tmp: Path, sizes: list[tuple[int, int]], *, repeats: int = 20
) -> dict[str, Any]:
    """The copy path per frame: ``GuestFramebuffer.present_on`` of a copy-mode buffer (a
    guest grant mapping copied into the output's dumb buffer), timed per call, for each
    size; plus ``copy_frame`` alone between a guest-pitch and a wider dumb-pitch buffer."""
    results: dict[str, Any] = {}
    async with store_bench(tmp, copy=True) as bench:
        for index, (width, height) in enumerate(sizes):
            buf = bench.grant_buffer(width, height)
            with bench.guest.map_pages(buf.pfns) as pixels:
                pixels.buffer[:] = bytes([0x3C]) * len(pixels.buffer)
            cookie = 0x2000 + index
            await bench.store.create(bench.create_req(cookie, buf, width, height))
            bench.store.attach(FbAttachReq(
                id=bench._id(), dbuf_cookie=cookie, fb_cookie=cookie | 0x10000, width=width,
                height=height, pixel_format=XRGB,
            ))
            fb = bench.store.framebuffer(cookie | 0x10000)
            if fb.zero_copy:
                raise RuntimeError("the copy-mode store did not copy")
            frame_bytes = width * XRGB.cpp * height
            rate = await _best_rate_async(
                frame_bytes, functools.partial(fb.present_on, bench.output), repeats
            )
            await bench.destroy(cookie)
            bench.free_buffer(buf)
            same_size = memcpy_bandwidth(frame_bytes, repeats=repeats, targets=2)
            results[f"{width}x{height}"] = {
                **rate, "guest_pitch": pitch_for(width, 32),
                "dumb_pitch": -(-width * 4 // 64) * 64,
                "memcpy_same_size": same_size,
                "percent_of_same_size_memcpy": 100 * rate["median_bps"]
                / same_size["baseline_bps"],
            }
    return results


def copy_frame_bandwidth(
    width: int, height: int, *, dst_pitch_align: int = 64, repeats: int = 20
) -> dict[str, Any]:
    """``copy_frame`` alone, guest pitch → the display's pitch (row by row when they differ)."""
    src_pitch = width * 4
    dst_pitch = -(-src_pitch // dst_pitch_align) * dst_pitch_align
    src = memoryview(bytearray(b"\x3c" * (src_pitch * height)))
    dst = memoryview(bytearray(dst_pitch * height))
    rate = _best_rate(
        width * 4 * height,
        lambda: copy_frame(src, 0, src_pitch, dst, 0, dst_pitch, width * 4, height),
        repeats,
    )
    same_size = memcpy_bandwidth(width * 4 * height, repeats=repeats, targets=1)
    return {
        **rate, "guest_pitch": src_pitch, "dumb_pitch": dst_pitch,
        "memcpy_same_size": same_size,
        "percent_of_same_size_memcpy": 100 * rate["median_bps"] / same_size["baseline_bps"],
    }


@dataclass
class _CopyGuest:
    """One guest of :func:`copy_scaling`: its domain, granted buffer and output."""

    domain: SimDomain
    buffer: _GuestBuffer
    output: Any


async def _frames_per_second(
    guests: list[_CopyGuest], grants: Any, platform: SimPlatform, deferred: DeferredReleases,
    workers: CopyWorkers, size: tuple[int, int], window: float, log: _QuietLog,
) -> dict[str, float]:
    """Every guest presenting its frame as fast as it can for ``window`` seconds through a
    store of its own, all stores sharing ``workers``: frames copied per second in all, and
    the event loop thread's CPU time per frame (its GIL-held share of each copy)."""
    width, height = size
    stores: list[BufferStore] = []
    fbs = []
    try:
        for guest in guests:
            store = BufferStore(
                domid=guest.domain.domid, grants=grants, dmabufs=platform,
                outputs=[guest.output], quota=Quota(Limits.for_connectors([size])),
                deferred=deferred, be_alloc=False, log=log, copies=workers,
            )
            stores.append(store)
            await store.create(DbufCreateReq(
                id=1, dbuf_cookie=1, width=width, height=height, bpp=32,
                buffer_sz=pitch_for(width, 32) * height, flags=0,
                gref_directory=guest.buffer.dir_grefs[0], data_ofs=0,
            ))
            store.attach(FbAttachReq(id=2, dbuf_cookie=1, fb_cookie=2, width=width,
                                     height=height, pixel_format=XRGB))
            fb = store.framebuffer(2)
            if fb.zero_copy:
                raise RuntimeError("the copy-mode store did not copy")
            fbs.append(fb)
        for fb, guest in zip(fbs, guests, strict=True):  # warm: dumb buffers made, touched
            await fb.present_on(guest.output)
            await fb.present_on(guest.output)
        frames = 0
        deadline = trio.current_time() + window
        presenting = len(fbs)
        all_done = trio.Event()
        failures: list[BaseException] = []

        def present(fb: Any, output: Any) -> None:
            # As a copy-mode flip: the copy handed to a worker thread, and the next one
            # started by the copy's own hand-back to the loop (no task parked, none hopped).
            def ready(result: Any) -> None:
                nonlocal frames, presenting
                try:
                    result.unwrap()
                    frames += 1
                    if trio.current_time() < deadline:
                        fb.present_later(output, ready)
                        return
                except Exception as exc:  # (a callback of trio's must not raise)
                    failures.append(exc)
                presenting -= 1
                if not presenting:
                    all_done.set()

            fb.present_later(output, ready)

        loop_cpu, cpu = time.thread_time(), time.process_time()
        start = time.perf_counter()
        for fb, guest in zip(fbs, guests, strict=True):
            present(fb, guest.output)
        await all_done.wait()
        elapsed = time.perf_counter() - start
        if failures:
            raise failures[0]
        loop_cpu, cpu = time.thread_time() - loop_cpu, time.process_time() - cpu
    finally:
        for store in stores:
            with trio.CancelScope(shield=True):
                await store.aclose()
    return {
        "workers": workers.total,
        "frames": frames,
        "seconds": elapsed,
        "fps": frames / elapsed,
        "loop_cpu_per_frame_us": 1e6 * loop_cpu / max(frames, 1),
        # All threads: how many cores the copies got (other work on the machine takes its
        # share; the hypervisor process is idle here).
        "cores_used": cpu / elapsed,
        "most_running": workers.stats.most_running,
    }


async def copy_scaling(
    tmp: Path, *, size: tuple[int, int] = (1024, 768), guests: int = 4,
    workers: int | None = None, window: float = 1.0, rounds: int = 3,
) -> dict[str, Any]:
    """Copy-mode capacity on all cores against one (issue 12 goal 4): frames per second the
    copy path makes when ``guests`` guests (one copy at a time each, as the daemon allows)
    present ``size`` frames as fast as they can, with ``workers`` copy threads (default: the
    CPUs this process may use) and with one, in the same run. Each frame is what a copy-mode
    flip costs the backend before the display flip: ``present_later`` (dumb buffer picked, the
    copy handed to a worker thread; its hand-back to the loop starts the guest's next one, as
    it starts the flip in the connector). ``rounds`` alternations of the two, so that
    a disturbance by other work hits both; the ratio is the median of the rounds' ratios."""
    many = workers if workers is not None else available_cores()
    width, height = size
    log = _QuietLog()
    busy0 = cpu_jiffies()
    runs: dict[int, list[dict[str, float]]] = {1: [], many: []}
    async with hypervisor_process(tmp) as hv:
        with contextlib.ExitStack() as stack:
            platform = stack.enter_context(
                SimPlatform(hv.socket_path, "unused", dmabuf_export_supported=False))
            grants = platform.open_grant_device()
            deferred = DeferredReleases(retry_interval=0.01, log=log)
            stack.callback(deferred.close_device_when_drained, grants)
            domains = [stack.enter_context(SimDomain(hv.socket_path, GUEST + i))
                       for i in range(guests)]
            configs = [OutputConfig(f"copy{i}", width, height) for i in range(guests)]
            try:
                async with (
                    trio.open_nursery() as nursery,
                    VirtualDisplay.open(configs, dmabuf_importer=platform.open_dmabuf) as display,
                ):
                    await nursery.start(deferred.run)
                    party: list[_CopyGuest] = []
                    for domain, config in zip(domains, configs, strict=True):
                        buf = _grant_buffer(domain, width, height)
                        party.append(_CopyGuest(domain, buf, display.outputs[config.name]))
                        with domain.map_pages(buf.pfns) as pixels:
                            pixels.buffer[:] = b"\x3c" * len(pixels.buffer)
                    for _ in range(rounds):
                        for count in (1, many):
                            runs[count].append(await _frames_per_second(
                                party, grants, platform, deferred, CopyWorkers(count), size,
                                window, log))
                    for guest in party:
                        _free_buffer(guest.domain, guest.buffer)
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await deferred.aclose()
    ratios = [b["fps"] / a["fps"] for a, b in zip(runs[1], runs[many], strict=True)]
    loop_us = [r["loop_cpu_per_frame_us"] for r in runs[1] + runs[many]]
    return {
        # How busy the whole machine was over the run (all CPUs; this process included).
        "busy_percent": busy_percent(busy0, cpu_jiffies()),
        "loadavg": os.getloadavg()[0],
        "loop_cpu_per_frame_us": percentile(loop_us, 50),
        "size": [width, height],
        "guests": guests,
        "workers": many,
        "one_worker": runs[1],
        "all_workers": runs[many],
        "fps_one": percentile([r["fps"] for r in runs[1]], 50),
        "fps_all": percentile([r["fps"] for r in runs[many]], 50),
        "ratios": ratios,
        "ratio": percentile(ratios, 50),
        "cores_used_one": percentile([r["cores_used"] for r in runs[1]], 50),
        "cores_used_all": percentile([r["cores_used"] for r in runs[many]], 50),
    }
