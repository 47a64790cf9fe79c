"""The virtual display: flips land at vblanks, imports are bounded, releases leave nothing."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from PIL import Image

from displback.display import (
    DisplayClosed,
    FlipPending,
    ImportRefused,
    InvalidFramebuffer,
    Mode,
    OutputStats,
    UnsupportedFormat,
    copy_frame,
)
from displback.display.virtual import OutputConfig, VirtualDisplay, VirtualOutput
from displback.protocol.constants import PixelFormat

XRGB = PixelFormat.XRGB8888
PERIOD = 1 / 60


class FakeMapping:
    """A read-only shared mapping of a memfd, as the platform's importer would give."""

    def __init__(self, importer: FakeImporter, fd: int) -> None:
        self._importer = importer
        self._mmap = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        self.buffer = memoryview(self._mmap)
        self.closed = False

    def close(self) -> None:
        assert not self.closed, "mapping closed twice"
        self.buffer.release()  # BufferError if the display still holds a view of it
        self._mmap.close()
        self.closed = True


class FakeImporter:
    """Records every mapping it hands out, so tests can check none outlives its framebuffer."""

    def __init__(self) -> None:
        self.mappings: list[FakeMapping] = []

    def __call__(self, fd: int) -> FakeMapping:
        mapping = FakeMapping(self, fd)
        self.mappings.append(mapping)
        return mapping

    @property
    def open_count(self) -> int:
        return sum(not m.closed for m in self.mappings)


@contextmanager
def guest_buffer(size: int) -> Iterator[int]:
    """A memfd standing in for a dma-buf of the guest's pages."""
    fd = os.memfd_create("guest-dbuf", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        yield fd
    finally:
        os.close(fd)


def fill_xrgb(
    fd: int, colour: tuple[int, int, int], *, width: int, height: int, pitch: int, offset: int = 0
) -> None:
    r, g, b = colour
    row = bytes((b, g, r, 0)) * width
    for y in range(height):
        os.pwrite(fd, row, offset + y * pitch)


def solid(image: Any, colour: tuple[int, int, int]) -> bool:
    return bool(image.rgb == bytes(colour) * (image.width * image.height))


@asynccontextmanager
async def display(
    importer: FakeImporter | None = None, *, width: int = 8, height: int = 4, **options: Any
) -> AsyncIterator[VirtualOutput]:
    config = OutputConfig("conn0", width, height)
    async with VirtualDisplay.open([config], dmabuf_importer=importer, **options) as d:
        yield d.outputs["conn0"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_a_new_dumb_buffer_costs_no_memory_until_written() -> None:
    # Zeroing 256 MiB would touch every page (on the event loop); fresh zero pages do not.
    async with display(width=8192, height=8192) as out:
        before = _rss_bytes()
        fb = out.create_dumb(width=8192, height=8192, fourcc=XRGB)
        grown = _rss_bytes() - before
        assert fb.size >= 8192 * 8192 * 4 and fb.buffer[fb.size - 1] == 0
        assert grown < 32 << 20, f"creating the buffer touched {grown >> 20} MiB"
        fb.buffer[:4] = b"\x01\x02\x03\x00"
        assert out.snapshot().pixel(0, 0) == (0, 0, 0)  # not yet flipped
        out.release(fb)


# -- flips and vblanks --------------------------------------------------------------------


async def test_flip_completes_at_the_next_vblank(autojump_clock: trio.testing.MockClock) -> None:
    async with display() as out:
        t0 = trio.current_time()
        fb = out.create_dumb(width=8, height=4, fourcc=XRGB)
        result = await out.flip(fb)
        assert result.fb is fb
        assert result.sequence == 1
        assert result.timestamp == pytest.approx(t0 + PERIOD)
        assert trio.current_time() == pytest.approx(t0 + PERIOD)
        await trio.sleep(PERIOD / 3)  # mid-frame: the next flip waits for vblank 2
        result = await out.flip(fb)
        assert result.sequence == 2
        assert trio.current_time() == pytest.approx(t0 + 2 * PERIOD)
        assert out.current_fb is fb and out.enabled and not out.flip_pending


async def test_every_flip_completes_exactly_once(autojump_clock: trio.testing.MockClock) -> None:
    async with display() as out:
        fbs = [out.create_dumb(width=8, height=4, fourcc=XRGB) for _ in range(2)]
        sequences = [(await out.flip(fbs[i % 2])).sequence for i in range(10)]
        assert sequences == list(range(1, 11))
        await trio.sleep(10.5 * PERIOD)  # half-way between vblanks: no tie with a deadline
        stats = out.stats
        assert stats.flips_completed == 10
        assert stats.vblanks == 20
        assert stats.frames_shown == 20
        assert stats.missed_vblanks == 0


async def test_start_flip_calls_back_once_from_the_vblank_and_may_start_the_next_flip(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with display() as out:
        t0 = trio.current_time()
        fbs = [out.create_dumb(width=8, height=4, fourcc=XRGB) for _ in range(2)]
        landed: list[Any] = []
        done = trio.Event()

        def on_landed(result: Any) -> None:
            landed.append((result, trio.current_time()))
            if len(landed) < 3:  # the callback starts the next flip, as the backend does
                assert out.start_flip(fbs[len(landed) % 2], on_landed)
            else:
                done.set()

        assert out.start_flip(fbs[0], on_landed)
        assert out.flip_pending and landed == []  # returned at once
        with pytest.raises(FlipPending):
            out.start_flip(fbs[1], on_landed)
        await done.wait()
        assert [r.sequence for r, _t in landed] == [1, 2, 3]
        assert [r.fb for r, _t in landed] == [fbs[0], fbs[1], fbs[0]]
        assert [t for _r, t in landed] == pytest.approx([t0 + n * PERIOD for n in (1, 2, 3)])
        assert out.stats.flips_completed == 3 and out.current_fb is fbs[0]


async def test_a_failing_landing_callback_is_logged_and_the_output_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with display() as out:
        fb = out.create_dumb(width=8, height=4, fourcc=XRGB)
        called = trio.Event()

        def broken(_result: Any) -> None:
            called.set()
            raise RuntimeError("a bug in the caller")

        assert out.start_flip(fb, broken)
        await called.wait()
        result = await out.flip(fb)  # the vblank task survived the first flip's callback
        assert result.sequence == 2
        assert "landing callback failed" in caplog.text


async def test_closing_the_display_calls_a_pending_start_flip_back_with_none() -> None:
    landed: list[Any] = []
    async with display() as out:
        fb = out.create_dumb(width=8, height=4, fourcc=XRGB)
        assert out.start_flip(fb, landed.append)
    assert landed == [None]


async def test_flip_or_disable_while_a_flip_is_pending_is_refused_like_ebusy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with display() as out, trio.open_nursery() as nursery:
        fb = out.create_dumb(width=8, height=4, fourcc=XRGB)
        results = []

        async def first() -> None:
            results.append(await out.flip(fb))

        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        assert out.flip_pending
        with pytest.raises(FlipPending) as excinfo:
            await out.flip(fb)
        assert excinfo.value.errno == errno.EBUSY
        with pytest.raises(FlipPending):
            await out.disable()
        await trio.sleep(1.5 * PERIOD)
        assert len(results) == 1 and out.stats.flips_completed == 1
        assert (await out.flip(fb)).sequence == 2


async def test_a_cancelled_flip_still_lands_at_the_next_vblank(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with display() as out:
        fb = out.create_dumb(width=8, height=4, fourcc=XRGB)
        with trio.move_on_after(PERIOD / 4):
            await out.flip(fb)
        assert out.flip_pending and out.current_fb is None
        await trio.sleep(1.5 * PERIOD)
        assert not out.flip_pending
        assert out.current_fb is fb
        assert out.stats.flips_completed == 1


async def test_disable_turns_scanout_off_and_completes_no_flip(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with display(width=2, height=2) as out:
        fb = out.create_dumb(width=2, height=2, fourcc=XRGB)
        fb.buffer[:] = b"\xff" * fb.size
        await out.flip(fb)
        assert solid(out.snapshot(), (255, 255, 255))
        await out.disable()
        assert not out.enabled and out.current_fb is None
        assert solid(out.snapshot(), (0, 0, 0))
        shown = out.stats.frames_shown
        await trio.sleep(5.5 * PERIOD)
        assert out.stats.frames_shown == shown
        assert out.stats.flips_completed == 1
        # A flip on the disabled output turns scanout back on.
        await out.flip(fb)
        assert out.enabled and solid(out.snapshot(), (255, 255, 255))


async def test_a_flip_handled_late_lands_late_and_counts_the_missed_vblanks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with display() as out, trio.open_nursery() as nursery:
        fb = out.create_dumb(width=8, height=4, fourcc=XRGB)
        results = []

        async def flip() -> None:
            results.append(await out.flip(fb))

        nursery.start_soon(flip)
        await trio.testing.wait_all_tasks_blocked()
        autojump_clock.jump(5.5 * PERIOD)  # the process stalled for 5.5 frames
        await trio.testing.wait_all_tasks_blocked()
        assert [r.sequence for r in results] == [5]  # due at vblank 1, handled at 5
        assert out.stats.missed_vblanks == 4
        assert out.stats.vblanks == 5
        assert (await out.flip(fb)).sequence == 6
        assert out.stats.missed_vblanks == 4


async def test_an_idle_output_counts_vblanks_without_waking(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with display() as out:
        await trio.sleep(100.5 * PERIOD)
        assert out.stats == OutputStats(0, 0, 0, 100)


async def test_outputs_tick_at_their_own_refresh_rates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    configs = [OutputConfig("a", 4, 4), OutputConfig("b", 640, 480, refresh_hz=30)]
    async with VirtualDisplay.open(configs) as d:
        a, b = d.outputs["a"], d.outputs["b"]
        assert a.mode == Mode(4, 4, 60.0) and b.mode == (640, 480, 30)
        await b.flip(b.create_dumb(width=640, height=480, fourcc=PixelFormat.RGB565))
        await trio.sleep(1.0 + PERIOD / 4 - 1 / 30)
        assert a.stats.vblanks == 60 and b.stats.vblanks == 30
        assert a.stats.frames_shown == 0 and b.stats.frames_shown == 30


async def test_outputs_of_one_refresh_rate_share_one_vblank_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    configs = [OutputConfig(f"o{i}", 8, 4) for i in range(16)]
    configs.append(OutputConfig("slow", 8, 4, refresh_hz=30))
    async with VirtualDisplay.open(configs) as d:
        # One timer task per rate, as one DRM fd carries every CRTC's vblanks: 32 outputs
        # flipping at 60 fps cost one wake-up per vblank, not 32.
        assert d._nursery is not None and len(d._nursery.child_tasks) == 2
        t0 = trio.current_time()
        results: dict[str, Any] = {}

        async def flip(name: str, delay: float) -> None:
            await trio.sleep(delay)
            out = d.outputs[name]
            results[name] = await out.flip(out.create_dumb(width=8, height=4, fourcc=XRGB))

        async with trio.open_nursery() as nursery:
            for i in range(16):  # o15 asks only after the first vblank: it waits for vblank 2
                nursery.start_soon(flip, f"o{i}", 1.5 * PERIOD if i == 15 else 0.0)
            nursery.start_soon(flip, "slow", 0.0)
        assert {results[f"o{i}"].sequence for i in range(15)} == {1}
        assert [results[f"o{i}"].timestamp for i in range(15)] == [pytest.approx(t0 + PERIOD)] * 15
        assert results["o15"].sequence == 2
        assert results["o15"].timestamp == pytest.approx(t0 + 2 * PERIOD)
        assert results["slow"].sequence == 1
        assert results["slow"].timestamp == pytest.approx(t0 + 1 / 30)
        assert all(d.outputs[c.name].stats.missed_vblanks == 0 for c in configs)


async def test_outputs_of_one_rate_with_phases_of_their_own_land_flips_at_their_own_vblanks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Heads out of step, as on a real multi-head card: each output's vblank n is at
    start + (n + phase) periods, and flips land there, one clock task serving them all."""
    phases = [0.0, 0.25, 0.5, 0.75]
    configs = [OutputConfig(f"o{i}", 8, 4, phase=phase) for i, phase in enumerate(phases)]
    async with VirtualDisplay.open(configs) as d:
        assert d._nursery is not None and len(d._nursery.child_tasks) == 1
        t0 = trio.current_time()
        results: dict[str, list[Any]] = {c.name: [] for c in configs}

        async def flips(name: str) -> None:
            out = d.outputs[name]
            fbs = [out.create_dumb(width=8, height=4, fourcc=XRGB) for _ in range(2)]
            for i in range(3):
                results[name].append(await out.flip(fbs[i % 2]))

        async with trio.open_nursery() as nursery:
            for c in configs:
                nursery.start_soon(flips, c.name)
        for c in configs:
            assert [r.sequence for r in results[c.name]] == [1, 2, 3]
            assert [r.timestamp for r in results[c.name]] == [
                pytest.approx(t0 + (n + c.phase) * PERIOD) for n in (1, 2, 3)
            ]
            assert d.outputs[c.name].stats.missed_vblanks == 0


def test_output_configs_are_validated() -> None:
    for bad in [("", 4, 4, 60.0), ("x", 0, 4, 60.0), ("x", 4, 99999, 60.0), ("x", 4, 4, 0.0),
                ("x", 4, 4, 60.0, 1.0), ("x", 4, 4, 60.0, -0.1)]:
        with pytest.raises(ValueError):
            OutputConfig(*bad)
    with pytest.raises(ValueError, match="unique"):
        VirtualDisplay([OutputConfig("x", 4, 4), OutputConfig("x", 8, 8)])
    with pytest.raises(ValueError):
        VirtualDisplay([])


# -- zero-copy imports --------------------------------------------------------------------


async def test_zero_copy_scanout_shows_guest_memory_without_copying(
    autojump_clock: trio.testing.MockClock,
) -> None:
    importer = FakeImporter()
    async with display(importer) as out:
        with guest_buffer(4096) as fd:
            fill_xrgb(fd, (10, 20, 30), width=8, height=4, pitch=32, offset=64)
            fb = out.import_dmabuf(fd, width=8, height=4, pitch=32, offset=64, fourcc=XRGB)
            assert fb.zero_copy and importer.open_count == 1
            await out.flip(fb)
            assert solid(out.snapshot(), (10, 20, 30))
            # The guest draws again; scanout reads its pages, so the screen follows.
            fill_xrgb(fd, (200, 100, 50), width=8, height=4, pitch=32, offset=64)
            assert solid(out.snapshot(), (200, 100, 50))


async def test_the_import_survives_closing_the_callers_fd(
    autojump_clock: trio.testing.MockClock,
) -> None:
    importer = FakeImporter()
    async with display(importer) as out:
        with guest_buffer(128) as fd:
            fill_xrgb(fd, (1, 2, 3), width=8, height=4, pitch=32)
            fb = out.import_dmabuf(fd, width=8, height=4, pitch=32, offset=0, fourcc=XRGB)
        await out.flip(fb)
        assert solid(out.snapshot(), (1, 2, 3))


async def test_import_bounds_admit_an_exact_fit_and_refuse_one_byte_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    importer = FakeImporter()
    # 4 rows at pitch 40 of 8 XRGB pixels from offset 16: 16 + 40*3 + 32 = 168 bytes.
    async with display(importer) as out:
        with guest_buffer(168) as fd:
            fb = out.import_dmabuf(fd, width=8, height=4, pitch=40, offset=16, fourcc=XRGB)
            out.release(fb)
            for geometry in ({"pitch": 40, "offset": 17}, {"pitch": 41, "offset": 16}):
                with pytest.raises(ImportRefused, match="168"):
                    out.import_dmabuf(fd, width=8, height=4, fourcc=XRGB, **geometry)
            with pytest.raises(ImportRefused):
                out.import_dmabuf(fd, width=8, height=5, pitch=40, offset=0, fourcc=XRGB)
        assert len(importer.mappings) == 4
        assert importer.open_count == 0


REFUSALS = [
    ({"import_supported": False}, {}, "does not import"),
    ({"import_formats": [PixelFormat.RGB565]}, {}, "XRGB8888"),
    ({}, {"fourcc": 0x20203859}, "unknown pixel format"),
    ({}, {"pitch": 28}, "less than a row"),
    ({"pitch_align": 64}, {}, "multiple of 64"),
    ({"offset_align": 4096}, {"offset": 64}, "offset 64"),
    ({}, {"offset": -4}, "offset -4"),
    ({}, {"width": 0}, "size"),
    ({}, {"fourcc": PixelFormat.YUYV, "width": 7}, "even width"),
]


@pytest.mark.parametrize(("options", "geometry", "reason"), REFUSALS)
async def test_imports_the_driver_cannot_scan_out_are_refused_with_a_reason(
    autojump_clock: trio.testing.MockClock,
    options: dict[str, Any],
    geometry: dict[str, int],
    reason: str,
) -> None:
    importer = FakeImporter()
    args = {"width": 8, "height": 4, "pitch": 32, "offset": 0, "fourcc": XRGB}
    args.update(geometry)
    async with display(importer, **options) as out:
        with guest_buffer(4096) as fd, pytest.raises(ImportRefused) as excinfo:
            out.import_dmabuf(fd, **args)
        assert reason in excinfo.value.reason
        assert importer.open_count == 0
        assert out.live_framebuffers == 0


async def test_an_fd_the_importer_rejects_is_refused_and_a_display_without_importer_refuses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    importer = FakeImporter()
    read_end, write_end = os.pipe()  # a pipe cannot be mapped: the importer raises OSError
    try:
        async with display(importer) as out:
            with pytest.raises(ImportRefused, match="importer refused"):
                out.import_dmabuf(read_end, width=8, height=4, pitch=32, offset=0, fourcc=XRGB)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert importer.mappings == []
    async with display(None) as out:
        with guest_buffer(4096) as fd, pytest.raises(ImportRefused, match="does not import"):
            out.import_dmabuf(fd, width=8, height=4, pitch=32, offset=0, fourcc=XRGB)


# -- release ------------------------------------------------------------------------------


async def test_releasing_the_on_screen_fb_keeps_its_last_frame_and_closes_the_mapping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    importer = FakeImporter()
    async with display(importer) as out:
        with guest_buffer(4096) as fd:
            fill_xrgb(fd, (9, 99, 199), width=8, height=4, pitch=32)
            fb = out.import_dmabuf(fd, width=8, height=4, pitch=32, offset=0, fourcc=XRGB)
            await out.flip(fb)
            out.release(fb)
            assert fb.released and importer.open_count == 0
            assert out.enabled and out.current_fb is None
            # What the guest writes to its pages now is no longer shown.
            fill_xrgb(fd, (0, 0, 0), width=8, height=4, pitch=32)
            assert solid(out.snapshot(), (9, 99, 199))
            shown = out.stats.frames_shown
            await trio.sleep(3.5 * PERIOD)
            assert out.stats.frames_shown == shown + 3
            assert solid(out.snapshot(), (9, 99, 199))
            out.release(fb)  # idempotent
            with pytest.raises(InvalidFramebuffer, match="released"):
                await out.flip(fb)


async def test_releasing_the_target_of_a_pending_flip_shows_its_copy_at_the_vblank(
    autojump_clock: trio.testing.MockClock,
) -> None:
    importer = FakeImporter()
    async with display(importer) as out, trio.open_nursery() as n:
        with guest_buffer(4096) as fd:
            fill_xrgb(fd, (7, 8, 9), width=8, height=4, pitch=32)
            fb = out.import_dmabuf(fd, width=8, height=4, pitch=32, offset=0, fourcc=XRGB)
            results = []

            async def flip() -> None:
                results.append(await out.flip(fb))

            n.start_soon(flip)
            await trio.testing.wait_all_tasks_blocked()
            out.release(fb)
            assert importer.open_count == 0
            fill_xrgb(fd, (0, 0, 0), width=8, height=4, pitch=32)
            await trio.sleep(1.5 * PERIOD)
            assert [r.fb for r in results] == [fb]
            assert out.stats.flips_completed == 1
            assert solid(out.snapshot(), (7, 8, 9))


async def test_releasing_an_fb_that_is_not_shown_changes_nothing_on_screen(
    autojump_clock: trio.testing.MockClock,
) -> None:
    importer = FakeImporter()
    async with display(importer) as out:
        with guest_buffer(4096) as fd:
            fill_xrgb(fd, (50, 60, 70), width=8, height=4, pitch=32)
            shown = out.import_dmabuf(fd, width=8, height=4, pitch=32, offset=0, fourcc=XRGB)
            other = out.import_dmabuf(fd, width=8, height=4, pitch=32, offset=0, fourcc=XRGB)
            await out.flip(shown)
            out.release(other)
            assert importer.open_count == 1
            assert out.current_fb is shown
            fill_xrgb(fd, (1, 1, 1), width=8, height=4, pitch=32)
            assert solid(out.snapshot(), (1, 1, 1))  # still zero-copy from the shown one


async def test_framebuffers_of_another_output_are_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    configs = [OutputConfig("a", 4, 4), OutputConfig("b", 4, 4)]
    async with VirtualDisplay.open(configs) as d:
        a, b = d.outputs["a"], d.outputs["b"]
        fb = a.create_dumb(width=4, height=4, fourcc=XRGB)
        with pytest.raises(InvalidFramebuffer):
            await b.flip(fb)
        with pytest.raises(InvalidFramebuffer):
            b.release(fb)
        assert not fb.released


async def test_closing_the_display_wakes_a_pending_flip_and_releases_everything(
    autojump_clock: trio.testing.MockClock,
) -> None:
    importer = FakeImporter()
    errors: list[BaseException] = []
    with guest_buffer(4096) as fd:
        async with trio.open_nursery() as nursery:
            async with VirtualDisplay.open(
                [OutputConfig("c", 8, 4)], dmabuf_importer=importer
            ) as d:
                out = d.outputs["c"]
                fb = out.import_dmabuf(fd, width=8, height=4, pitch=32, offset=0, fourcc=XRGB)
                dumb = out.create_dumb(width=8, height=4, fourcc=XRGB)

                async def flip() -> None:
                    try:
                        await out.flip(fb)
                    except DisplayClosed as exc:
                        errors.append(exc)

                nursery.start_soon(flip)
                await trio.testing.wait_all_tasks_blocked()
            assert d.closed
            assert importer.open_count == 0
            assert fb.released and dumb.released and out.live_framebuffers == 0
    assert len(errors) == 1
    with pytest.raises(DisplayClosed):
        await out.flip(dumb)
    with pytest.raises(DisplayClosed):
        out.create_dumb(width=8, height=4, fourcc=XRGB)
    await d.aclose()  # closing again is harmless


# -- dumb buffers and snapshots -----------------------------------------------------------


async def test_dumb_buffers_have_the_display_pitch_and_show_copied_guest_pixels(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with display(width=3, height=2) as out:
        fb = out.create_dumb(width=3, height=2, fourcc=PixelFormat.RGB888)
        assert (fb.pitch, fb.size, fb.offset, fb.zero_copy) == (64, 128, 0, False)
        # The guest's RGB888 buffer: pitch 9 (3 px * 3 bytes), no padding.
        guest = bytes((0, 0, 255, 0, 255, 0, 255, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9))
        copy_frame(guest, 0, 9, fb.buffer, 0, fb.pitch, 9, 2)
        await out.flip(fb)
        image = out.snapshot()
        assert [image.pixel(x, y) for y in range(2) for x in range(3)] == [
            (255, 0, 0),
            (0, 255, 0),
            (0, 0, 255),
            (3, 2, 1),
            (6, 5, 4),
            (9, 8, 7),
        ]
        out.release(fb)
        with pytest.raises(ValueError):
            fb.buffer[0] = 1  # the display's memory is gone
        assert image == out.snapshot()  # the kept copy


async def test_dumb_buffers_of_unknown_formats_or_sizes_are_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with display(dumb_pitch_align=1) as out:
        with pytest.raises(UnsupportedFormat):
            out.create_dumb(width=4, height=4, fourcc=0x3231564E)  # NV12
        for width, height, fmt in ((0, 4, XRGB), (4, 20000, XRGB), (3, 2, PixelFormat.YUYV)):
            with pytest.raises(ValueError):
                out.create_dumb(width=width, height=height, fourcc=fmt)
        assert out.create_dumb(width=3, height=1, fourcc=PixelFormat.RGB565).pitch == 6
        assert out.live_framebuffers == 1


async def test_snapshot_shows_the_mode_sized_top_left_of_the_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with display(width=4, height=3) as out:
        big = out.create_dumb(width=6, height=5, fourcc=XRGB)
        for y in range(5):
            for x in range(6):
                i = y * big.pitch + 4 * x
                big.buffer[i : i + 4] = bytes((x, y, 100, 0))
        await out.flip(big)
        image = out.snapshot()
        assert (image.width, image.height) == (4, 3)
        assert image.pixel(3, 2) == (100, 2, 3)
        small = out.create_dumb(width=2, height=1, fourcc=XRGB)
        small.buffer[:8] = b"\xff" * 8
        await out.flip(small)
        image = out.snapshot()
        assert (image.width, image.height) == (4, 3)
        assert image.pixel(1, 0) == (255, 255, 255)
        assert image.pixel(2, 0) == image.pixel(0, 1) == (0, 0, 0)


async def test_write_png_saves_what_the_output_shows(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    async with display(width=2, height=2) as out:
        fb = out.create_dumb(width=2, height=2, fourcc=PixelFormat.XRGB1555)
        fb.buffer[:4] = bytes((0x00, 0x7C, 0x1F, 0x00))  # red, blue
        await out.flip(fb)
        out.write_png(tmp_path / "out.png")
        with Image.open(tmp_path / "out.png") as png:
            assert png.size == (2, 2)
            assert png.convert("RGB").tobytes() == bytes((255, 0, 0, 0, 0, 255)) + bytes(6)
