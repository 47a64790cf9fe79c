"""The Wayland display without a compositor: windows made per guest connector, flips that
complete on the fallback timer at the refresh rate (a guest never stalls), frames that are
released on screen kept until replaced, and nothing left open."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

pytest.importorskip("pywayland", reason="the wayland extra (pywayland) is not installed")

from displback.display.interface import DisplayClosed, FlipPending, ImportRefused  # noqa: E402
from displback.protocol.constants import PixelFormat  # noqa: E402
from displback.protocol.layout import ConnectorConfig  # noqa: E402
from displback.wayland.display import WaylandDisplay  # noqa: E402
from displback.wayland.window import FALLBACK_PERIODS  # noqa: E402

NOWHERE = "/nonexistent/displback-wayland-0"
XRGB = PixelFormat.XRGB8888


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_each_guest_connector_gets_a_window_titled_with_the_guests_name() -> None:
    async with WaylandDisplay.open(NOWHERE, fullscreen={"2/0/1": "HDMI-A-1", "pilot": "DP-1"}) as d:
        first = d.acquire(1, 0, ConnectorConfig(0, 640, 480, None), "ivi")
        second = d.acquire(2, 0, ConnectorConfig(1, 320, 200, None), None)
        third = d.acquire(3, 0, ConnectorConfig(0, 800, 600, "pilot"), "cluster")
        assert first is not None and second is not None and third is not None
        assert first.spec.title == "ivi: connector 0"
        assert second.spec.title == "dom2: connector 1"
        assert (first.mode.width, first.mode.height) == (640, 480)
        assert [o.spec.fullscreen_on for o in (first, second, third)] == [
            None,
            "HDMI-A-1",
            "DP-1",
        ]
        assert sorted(d.outputs) == ["dom1-0-0", "dom2-0-1", "dom3-0-0"]
        d.release(second)
        assert sorted(d.outputs) == ["dom1-0-0", "dom3-0-0"]
        with pytest.raises(DisplayClosed):
            second.create_dumb(width=8, height=8, fourcc=XRGB)


async def test_without_a_compositor_flips_complete_at_the_refresh_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with WaylandDisplay.open(NOWHERE, refresh_hz=50.0) as d:
        output = d.acquire(1, 0, ConnectorConfig(0, 64, 48, None), "g")
        assert output is not None
        fbs = [output.create_dumb(width=64, height=48, fourcc=XRGB) for _ in range(2)]
        start = trio.current_time()
        first = await output.flip(fbs[0])
        # Frame callbacks might still come: the first flip waits a few frames for one.
        assert first.timestamp - start == pytest.approx(FALLBACK_PERIODS / 50.0)
        times = [first.timestamp]
        for n in range(1, 11):
            times.append((await output.flip(fbs[n % 2])).timestamp)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert gaps == pytest.approx([1 / 50.0] * 10)
        assert output.timer_landings == 11
        assert output.stats.flips_completed == 11
        assert [output.stats.vblanks, first.sequence] == [11, 1]
        assert output.current_fb is fbs[0]
        assert not output.window_shown and d.connection is None


async def test_a_flip_while_one_is_pending_is_refused_with_ebusy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with WaylandDisplay.open(NOWHERE) as d:
        output = d.acquire(1, 0, ConnectorConfig(0, 16, 16, None), "g")
        assert output is not None
        fb = output.create_dumb(width=16, height=16, fourcc=XRGB)
        landed: list[object] = []
        assert output.start_flip(fb, landed.append)
        with pytest.raises(FlipPending):
            output.start_flip(fb, landed.append)
        await trio.sleep(1)
        assert len(landed) == 1


async def test_guest_buffers_are_copied_not_imported() -> None:
    async with WaylandDisplay.open(NOWHERE) as d:
        output = d.acquire(1, 0, ConnectorConfig(0, 16, 16, None), "g")
        assert output is not None
        with pytest.raises(ImportRefused, match="zwp_linux_dmabuf_v1"):
            output.import_dmabuf(0, width=16, height=16, pitch=64, offset=0, fourcc=XRGB)


async def test_a_frame_released_on_screen_stays_shown_until_the_next_and_nothing_leaks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    before = _open_fds()
    async with WaylandDisplay.open(NOWHERE) as d:
        output = d.acquire(1, 0, ConnectorConfig(0, 32, 8, None), "g")
        assert output is not None
        red, blue = (output.create_dumb(width=32, height=8, fourcc=XRGB) for _ in range(2))
        red.buffer[:] = b"\x00\x00\xff\x00" * (red.size // 4)
        blue.buffer[:] = b"\xff\x00\x00\x00" * (blue.size // 4)
        await output.flip(red)
        output.release(red)
        assert red.released and output.current_fb is None
        assert output.snapshot().pixel(0, 0) == (255, 0, 0)  # still shown, from our copy
        await output.flip(blue)
        assert red.freed and output.snapshot().pixel(31, 7) == (0, 0, 255)
        await output.disable()
        assert not output.enabled and output.snapshot().pixel(0, 0) == (0, 0, 0)
        assert output.live_framebuffers == 1
        d.release(output)
        assert blue.freed and output.live_framebuffers == 0
    assert _open_fds() == before


async def test_closing_the_display_wakes_a_pending_flip(
    autojump_clock: trio.testing.MockClock,
) -> None:
    landed: list[object] = []
    async with WaylandDisplay.open(NOWHERE) as d:
        output = d.acquire(1, 0, ConnectorConfig(0, 16, 16, None), "g")
        assert output is not None
        fb = output.create_dumb(width=16, height=16, fourcc=XRGB)
        output.start_flip(fb, landed.append)
    assert landed == [None]
    assert fb.freed
