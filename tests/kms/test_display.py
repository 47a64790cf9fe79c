"""KmsDisplay against the fake vkms (atomic, PRIME) and bochs (legacy, no import) kernels."""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from displback.display.interface import (
    DisplayClosed,
    DisplayError,
    FlipPending,
    ImportRefused,
    InvalidFramebuffer,
    UnsupportedFormat,
)
from displback.kms import uapi
from displback.kms.display import KmsDisplay, KmsOutputConfig
from displback.kms.modes import choose_mode
from displback.protocol.constants import PixelFormat
from tests.kms.fake import FBCON_FB, VKMS_MODES, FakeCard, bochs_card, dmt_mode, vkms_card

XRGB = PixelFormat.XRGB8888


@pytest.fixture
def vkms() -> Iterator[FakeCard]:
    card = vkms_card()
    yield card
    card.close()


@pytest.fixture
def bochs() -> Iterator[FakeCard]:
    card = bochs_card()
    yield card
    card.close()


def open_display(
    card: FakeCard, width: int | None = 1024, height: int | None = 768, **kw: Any
) -> Any:
    kw.setdefault("hotplug_poll_s", 0)
    return KmsDisplay.open(
        [KmsOutputConfig("Virtual-1", width, height)], device=card.device(), **kw
    )


class Memfd:
    """A guest buffer standing in for a dma-buf: a memfd of ``size`` bytes."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("guest")
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@pytest.fixture
def guest() -> Iterator[Any]:
    made: list[Memfd] = []

    def make(size: int) -> Memfd:
        m = Memfd(size)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def fill(buf: Any, pitch: int, width: int, height: int, value: bytes, offset: int = 0) -> None:
    for y in range(height):
        start = offset + y * pitch
        buf[start : start + width * 4] = value * width


# ---- mode selection -------------------------------------------------------------------


def test_mode_is_the_guest_resolution_when_offered() -> None:
    assert choose_mode(VKMS_MODES, 800, 600) == dmt_mode(800, 600)


def test_mode_falls_back_to_the_preferred_one() -> None:
    chosen = choose_mode(VKMS_MODES, 1000, 700)
    assert chosen is not None and (chosen.width, chosen.height) == (1024, 768)
    assert choose_mode(VKMS_MODES, None, None) == chosen
    assert choose_mode([], 800, 600) is None


def test_mode_with_a_refresh_rate_picks_the_closest() -> None:
    sixty = dmt_mode(1024, 768)
    seventy = dataclasses.replace(sixty, clock=75000, vrefresh=70, name="1024x768@70")
    assert choose_mode([sixty, seventy], 1024, 768) == seventy  # default: the fastest
    assert choose_mode([sixty, seventy], 1024, 768, 60.0) == sixty


def test_mode_choice_avoids_interlaced_modes_when_a_progressive_one_fits() -> None:
    progressive = dmt_mode(1920, 1080)
    # Same timings interlaced: twice the field rate, so it would win on rate alone.
    interlaced = dataclasses.replace(
        progressive, flags=uapi.DRM_MODE_FLAG_INTERLACE, name="1920x1080i"
    )
    assert interlaced.refresh_hz > progressive.refresh_hz
    for modes in ([interlaced, progressive], [progressive, interlaced]):
        assert choose_mode(modes, 1920, 1080) == progressive
        assert choose_mode(modes, 1920, 1080, interlaced.refresh_hz) == progressive
    assert choose_mode([interlaced], 1920, 1080) == interlaced  # the only one of that size
    # The fallback to the preferred modes avoids them too.
    preferred_i = dataclasses.replace(interlaced, type=uapi.DRM_MODE_TYPE_PREFERRED)
    preferred_p = dataclasses.replace(progressive, type=uapi.DRM_MODE_TYPE_PREFERRED)
    assert choose_mode([preferred_i, preferred_p], 800, 600) == preferred_p


def test_the_preferred_mode_wins_a_tie_of_size_and_rate() -> None:
    plain = dmt_mode(1024, 768)
    preferred = dmt_mode(1024, 768, preferred=True)
    for modes in ([plain, preferred], [preferred, plain]):
        chosen = choose_mode(modes, 1024, 768)
        assert chosen is not None and chosen.preferred
    # Equally far from the asked rate on both sides (rates from vrefresh: exact): still the
    # preferred one, whichever side it is on.
    slower = dataclasses.replace(plain, clock=0, vrefresh=59, name="slower")
    faster = dataclasses.replace(plain, clock=0, vrefresh=61, name="faster")
    mark = {"type": uapi.DRM_MODE_TYPE_PREFERRED}
    for modes in ([slower, dataclasses.replace(faster, **mark)],
                  [dataclasses.replace(slower, **mark), faster]):
        chosen = choose_mode(modes, 1024, 768, 60.0)
        assert chosen is not None and chosen.preferred


# ---- opening and closing --------------------------------------------------------------


async def test_vkms_opens_atomic_with_its_crtc_and_primary_plane(vkms: FakeCard) -> None:
    async with open_display(vkms, 800, 600) as display:
        out = display.outputs["Virtual-1"]
        assert display.atomic and display.prime_import
        assert (out.crtc_id, out.plane_id) == (34, 31)
        assert out.mode[:2] == (800, 600)
        assert vkms.master
    assert not vkms.master


async def test_bochs_opens_legacy_without_import(bochs: FakeCard) -> None:
    async with open_display(bochs) as display:
        assert not display.atomic and not display.prime_import
        assert "MODE_ATOMIC" not in bochs.calls


async def test_forcing_atomic_on_a_legacy_card_fails_clearly(bochs: FakeCard) -> None:
    with pytest.raises(DisplayError, match="no atomic"):
        async with open_display(bochs, atomic=True):
            pass
    assert not bochs.master


async def test_unknown_connector_names_the_ones_that_exist(vkms: FakeCard) -> None:
    with pytest.raises(DisplayError, match=r"no connector HDMI-A-1 \(it has Virtual-1\)"):
        async with KmsDisplay.open(
            [KmsOutputConfig("HDMI-A-1")], device=vkms.device(), hotplug_poll_s=0
        ):
            pass


async def test_another_master_is_reported(vkms: FakeCard) -> None:
    vkms.master_elsewhere = True
    with pytest.raises(DisplayError, match="DRM master.*SET_MASTER"):
        async with open_display(vkms):
            pass


@pytest.mark.parametrize("make", [vkms_card, bochs_card])
async def test_close_restores_the_saved_crtc_and_frees_everything(make: Any) -> None:
    card = make()
    try:
        async with open_display(card) as display:
            out = display.outputs["Virtual-1"]
            fb = out.create_dumb(width=1024, height=768, fourcc=XRGB)
            await out.flip(fb)
            assert card.crtc.fb_id == fb.fb_id
        assert card.crtc.fb_id == FBCON_FB
        assert card.crtc.mode is not None and card.crtc.mode.width == 1024
        assert card.conn.crtc_id == card.crtc_id
        assert set(card.fbs) == {FBCON_FB}
        assert card.gem_objects() == 0
        assert card.rmfb_of_active == 0
        with pytest.raises(DisplayClosed):
            out.create_dumb(width=8, height=8, fourcc=XRGB)
    finally:
        card.close()


@pytest.mark.parametrize("make", [vkms_card, bochs_card])
async def test_a_crtc_that_cannot_be_set_back_at_close_is_turned_off(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/operations.md: never left scanning out a framebuffer we are about to remove."""
    card = make()
    try:
        async with open_display(card) as display:
            out = display.outputs["Virtual-1"]
            await out.flip(out.create_dumb(width=1024, height=768, fourcc=XRGB))
            card.fail("MODE_SETCRTC", errno.EINVAL)  # the saved mode is refused
        assert card.crtc.fb_id == 0
        assert f"cannot restore CRTC {card.crtc_id}" in caplog.text
        assert "turning it off" in caplog.text
        assert set(card.fbs) == {FBCON_FB} and card.gem_objects() == 0
    finally:
        card.close()


# ---- flips ----------------------------------------------------------------------------


async def test_atomic_flip_lands_at_the_flip_event(vkms: FakeCard) -> None:
    vkms.auto_vblank = False
    async with open_display(vkms) as display:
        out = display.outputs["Virtual-1"]
        fb = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        results: list[Any] = []

        async def flipper() -> None:
            results.append(await out.flip(fb))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flipper)
            await trio.testing.wait_all_tasks_blocked()  # the flip was submitted
            assert out.flip_pending and not results
            with pytest.raises(FlipPending):
                await out.flip(fb)
            assert vkms.vblank() == 1
        (result,) = results
        assert result.fb is fb and result.sequence == 1001
        assert out.current_fb is fb and out.enabled
        assert out.stats.flips_completed == 1
        assert vkms.calls.count("MODE_ATOMIC") >= 1
        assert "MODE_PAGE_FLIP" not in vkms.calls and "MODE_SETCRTC" not in vkms.calls[:-1]


async def test_atomic_second_flip_is_a_plain_nonblocking_commit(vkms: FakeCard) -> None:
    async with open_display(vkms) as display:
        out = display.outputs["Virtual-1"]
        a = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        b = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        first = await out.flip(a)
        blobs = len(vkms.blobs)
        second = await out.flip(b)
        assert second.sequence == first.sequence + 1
        assert len(vkms.blobs) == blobs  # no second MODE_ID blob: no modeset
        assert vkms.crtc.fb_id == b.fb_id


async def test_a_plain_atomic_flip_commits_the_fb_alone(guest: Any) -> None:
    """A flip with the mode and placement of the last commit changes one property: the
    kernel keeps the others' state (drm_mode_atomic_ioctl). A new placement, a modeset and
    the commit after an off carry everything again."""
    card = vkms_card(plane_can_position=True)
    fb_only = [(31, "FB_ID")]
    buf = guest(640 * 4 * 400)
    try:
        async with open_display(card) as display:
            out = display.outputs["Virtual-1"]
            a, b = (out.create_dumb(width=1024, height=768, fourcc=XRGB) for _ in range(2))
            await out.flip(a)
            assert (34, "MODE_ID") in card.committed  # the modeset
            for fb in (b, a, b):
                await out.flip(fb)
                assert card.committed == fb_only and card.crtc.fb_id == fb.fb_id
            small = out.import_dmabuf(
                buf.fd, width=640, height=400, pitch=2560, offset=0, fourcc=XRGB
            )
            await out.flip(small)  # another placement: the plane's rectangles too
            assert len(card.committed) == 10 and card.crtc.dst == (192, 184, 640, 400)
            await out.flip(small)
            assert card.committed == fb_only and card.crtc.dst == (192, 184, 640, 400)
            await out.flip(a)
            assert len(card.committed) == 10 and card.crtc.dst == (0, 0, 1024, 768)
            await out.disable()
            await out.flip(a)  # on again: a modeset, everything
            assert (34, "MODE_ID") in card.committed and card.crtc.fb_id == a.fb_id
            await out.flip(b)
            assert card.committed == fb_only and card.crtc.fb_id == b.fb_id
    finally:
        card.close()


async def test_legacy_first_flip_sets_the_crtc_then_page_flips(bochs: FakeCard) -> None:
    async with open_display(bochs) as display:
        out = display.outputs["Virtual-1"]
        a = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        b = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        await out.flip(a)
        assert bochs.calls[-1] == "MODE_SETCRTC" and bochs.crtc.fb_id == a.fb_id
        result = await out.flip(b)
        assert bochs.calls[-1] == "MODE_PAGE_FLIP" and bochs.crtc.fb_id == b.fb_id
        assert result.sequence == 1001
        assert a.pitch % 64 == 0


async def test_start_flip_calls_back_from_the_flip_event_reader(vkms: FakeCard) -> None:
    vkms.auto_vblank = False
    async with open_display(vkms) as display:
        out = display.outputs["Virtual-1"]
        fb = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        landed: list[Any] = []
        arrived = trio.Event()

        def on_landed(result: Any) -> None:
            landed.append(result)
            arrived.set()

        assert out.start_flip(fb, on_landed)
        assert out.flip_pending and landed == []
        assert vkms.vblank() == 1
        with trio.fail_after(5):
            await arrived.wait()
        (result,) = landed
        assert result.fb is fb and result.sequence == 1001 and out.current_fb is fb


async def test_start_flip_declines_a_legacy_modeset_and_takes_the_page_flips(
    bochs: FakeCard,
) -> None:
    async with open_display(bochs) as display:
        out = display.outputs["Virtual-1"]
        a = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        b = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        calls = len(bochs.calls)
        assert out.start_flip(a, lambda _r: None) is False  # SETCRTC blocks: use flip()
        assert not out.flip_pending and len(bochs.calls) == calls
        await out.flip(a)
        arrived = trio.Event()
        assert out.start_flip(b, lambda _r: arrived.set())
        assert bochs.calls[-1] == "MODE_PAGE_FLIP"
        with trio.fail_after(5):
            await arrived.wait()
        assert bochs.crtc.fb_id == b.fb_id


async def test_kernel_ebusy_becomes_flip_pending(vkms: FakeCard) -> None:
    async with open_display(vkms) as display:
        out = display.outputs["Virtual-1"]
        fb = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        await out.flip(fb)
        vkms.fail("MODE_ATOMIC", errno.EBUSY)
        with pytest.raises(FlipPending, match="MODE_ATOMIC"):
            await out.flip(fb)
        assert not out.flip_pending


async def test_a_flip_error_names_the_ioctl(bochs: FakeCard) -> None:
    async with open_display(bochs) as display:
        out = display.outputs["Virtual-1"]
        fb = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        bochs.fail("MODE_SETCRTC", errno.EINVAL)
        with pytest.raises(DisplayError, match=r"DRM_IOCTL_MODE_SETCRTC failed: Invalid argument"):
            await out.flip(fb)
        assert not out.flip_pending and not out.enabled


async def test_a_flip_without_event_lands_after_the_timeout(
    vkms: FakeCard, caplog: pytest.LogCaptureFixture
) -> None:
    vkms.auto_vblank = False
    async with open_display(vkms, flip_timeout_s=0.05) as display:
        out = display.outputs["Virtual-1"]
        fb = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        submitted = trio.current_time()
        with trio.fail_after(2):
            result = await out.flip(fb)
        assert trio.current_time() - submitted >= 0.05
        assert result.fb is fb and out.stats.flips_completed == 1
        assert out.flip_timeouts == 1 and out.kms_info.flip_timeouts == 1
        assert "no flip event after 0.05 s" in caplog.text


class _TaskSteps(trio.abc.Instrument):
    """Counts the steps of the tasks whose name ends with ``suffix``."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += task.name.endswith(self.suffix)


@pytest.mark.parametrize("make", [vkms_card, bochs_card])
async def test_flips_that_land_do_not_wake_the_watchdog(make: Any) -> None:
    """Measured in the nested VM: the watchdog was stepped 1.5 times per flip (woken by the
    submission, then by the landing), each step a pass of trio's loop under emulation. It
    sleeps to the pending flip's deadline instead; flips landing before it cost it nothing."""
    card = make()
    try:
        async with open_display(card, flip_timeout_s=60) as display:
            out = display.outputs["Virtual-1"]
            fbs = [out.create_dumb(width=1024, height=768, fourcc=XRGB) for _ in range(2)]
            await out.flip(fbs[0])  # the modeset
            await out.flip(fbs[1])  # kicks the idle watchdog: it sleeps to this deadline
            await trio.testing.wait_all_tasks_blocked()
            watchdog = _TaskSteps("KmsOutput.run")
            trio.lowlevel.add_instrument(watchdog)
            for n in range(20):
                landed = trio.Event()
                assert out.start_flip(fbs[n % 2], lambda _r, e=landed: e.set())
                with trio.fail_after(5):
                    await landed.wait()
            trio.lowlevel.remove_instrument(watchdog)
            assert watchdog.steps == 0
            assert out.stats.flips_completed == 22 and out.flip_timeouts == 0
    finally:
        card.close()


async def test_a_flip_submitted_while_the_watchdog_sleeps_gets_its_own_full_timeout(
    vkms: FakeCard, caplog: pytest.LogCaptureFixture
) -> None:
    """The watchdog wakes at the deadline of an earlier flip that has landed since: the flip
    pending then is not overdue yet, and lands flip_timeout_s after its own submission."""
    timeout = 0.3
    async with open_display(vkms, flip_timeout_s=timeout) as display:
        out = display.outputs["Virtual-1"]
        fb = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        await out.flip(fb)  # lands at once; the watchdog sleeps to its deadline
        await trio.sleep(timeout / 2)
        vkms.auto_vblank = False
        submitted = trio.current_time()
        with trio.fail_after(5):
            result = await out.flip(fb)  # its event never comes
        assert trio.current_time() - submitted >= timeout
        assert result.fb is fb and out.flip_timeouts == 1
        assert "no flip event after 0.3 s" in caplog.text


async def test_a_cancelled_flip_still_lands(vkms: FakeCard) -> None:
    vkms.auto_vblank = False
    async with open_display(vkms) as display:
        out = display.outputs["Virtual-1"]
        fb = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        with trio.move_on_after(0.01):
            await out.flip(fb)
        assert out.flip_pending
        vkms.vblank()
        await trio.testing.wait_all_tasks_blocked()  # the event was read off the card's fd
        assert not out.flip_pending and out.current_fb is fb
        assert out.stats.flips_completed == 1


async def test_disable_turns_the_crtc_off(vkms: FakeCard) -> None:
    async with open_display(vkms) as display:
        out = display.outputs["Virtual-1"]
        fb = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        await out.flip(fb)
        await out.disable()
        assert not out.enabled and vkms.crtc.fb_id == 0 and vkms.crtc.mode is None
        assert out.snapshot().rgb == bytes(3 * 1024 * 768)
        await out.flip(fb)  # on again: a modeset
        assert vkms.crtc.fb_id == fb.fb_id


async def test_pending_flip_is_woken_by_close(vkms: FakeCard) -> None:
    vkms.auto_vblank = False
    async with open_display(vkms) as display:
        out = display.outputs["Virtual-1"]
        fb = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        errors: list[BaseException] = []

        async def flipper() -> None:
            try:
                await out.flip(fb)
            except DisplayClosed as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flipper)
            await trio.testing.wait_all_tasks_blocked()  # the flip waits for its event
            await display.aclose()
        assert len(errors) == 1


# ---- imports --------------------------------------------------------------------------


async def test_import_is_zero_copy_and_shows_guest_pixels(vkms: FakeCard, guest: Any) -> None:
    buf = guest(1024 * 4 * 768 + 4096)
    fill(buf.map, 4096, 1024, 768, b"\x10\x20\x30\x00", offset=4096)
    async with open_display(vkms) as display:
        out = display.outputs["Virtual-1"]
        fb = out.import_dmabuf(buf.fd, width=1024, height=768, pitch=4096, offset=4096, fourcc=XRGB)
        os.close(os.dup(buf.fd))
        assert fb.zero_copy
        await out.flip(fb)
        assert vkms.scanout_pixels(5, 5) == b"\x10\x20\x30\x00"
        assert out.snapshot().pixel(5, 5) == (0x30, 0x20, 0x10)
        buf.map[4096:4100] = b"\x00\x00\xff\x00"  # the guest draws: the screen shows it
        assert vkms.scanout_pixels(0, 0) == b"\x00\x00\xff\x00"


async def test_an_imported_frame_is_mapped_for_the_cpu_only_when_read(
    vkms: FakeCard, guest: Any
) -> None:
    """Flipping a zero-copy frame never reads it: no CPU mapping until a snapshot needs one."""
    buf = guest(1024 * 4 * 768)
    fill(buf.map, 4096, 1024, 768, b"\x10\x20\x30\x00")
    mapped: list[int] = []

    def importer(fd: int) -> Any:
        from displback.kms.framebuffers import _MmapMapping

        mapped.append(fd)
        return _MmapMapping(fd)

    async with open_display(vkms, dmabuf_importer=importer) as display:
        out = display.outputs["Virtual-1"]
        fb = out.import_dmabuf(buf.fd, width=1024, height=768, pitch=4096, offset=0, fourcc=XRGB)
        for _ in range(3):
            await out.flip(fb)
        assert mapped == []
        assert out.snapshot().pixel(5, 5) == (0x30, 0x20, 0x10)
        assert len(mapped) == 1


async def test_bochs_refuses_imports_with_the_reason(bochs: FakeCard, guest: Any) -> None:
    buf = guest(1024 * 4 * 768)
    async with open_display(bochs) as display:
        out = display.outputs["Virtual-1"]
        with pytest.raises(ImportRefused, match="bochs-drm cannot import"):
            out.import_dmabuf(buf.fd, width=1024, height=768, pitch=4096, offset=0, fourcc=XRGB)
    assert bochs.gem_objects() == 0


async def test_refused_framebuffer_leaks_no_handle(guest: Any) -> None:
    card = vkms_card(pitch_align=64)
    buf = guest(1024 * 4 * 768)
    try:
        async with open_display(card) as display:
            out = display.outputs["Virtual-1"]
            with pytest.raises(ImportRefused, match="MODE_ADDFB2.*Invalid argument"):
                out.import_dmabuf(buf.fd, width=1000, height=768, pitch=4000, offset=0, fourcc=XRGB)
            assert card.gem_objects() == 0 and set(card.fbs) == {FBCON_FB}
            with pytest.raises(ImportRefused, match="does not scan out RGB565"):
                out.import_dmabuf(
                    buf.fd,
                    width=1024,
                    height=768,
                    pitch=2048,
                    offset=0,
                    fourcc=PixelFormat.RGB565,
                )
            small = guest(4096)
            with pytest.raises(ImportRefused, match="MODE_ADDFB2"):
                out.import_dmabuf(
                    small.fd, width=1024, height=768, pitch=4096, offset=0, fourcc=XRGB
                )
            card.fail("PRIME_FD_TO_HANDLE", errno.EBADF)
            with pytest.raises(ImportRefused, match="PRIME_FD_TO_HANDLE"):
                out.import_dmabuf(buf.fd, width=1024, height=768, pitch=4096, offset=0, fourcc=XRGB)
            assert card.gem_objects() == 0
    finally:
        card.close()


async def test_import_needing_letterbox_is_refused_on_vkms(vkms: FakeCard, guest: Any) -> None:
    buf = guest(800 * 4 * 600)
    async with open_display(vkms, 800, 600) as display:
        out = display.outputs["Virtual-1"]
        # 800x600 is offered: direct.
        fb = out.import_dmabuf(buf.fd, width=800, height=600, pitch=3200, offset=0, fourcc=XRGB)
        out.release(fb)
    async with open_display(vkms, 640, 400) as display:
        out = display.outputs["Virtual-1"]
        assert out.mode[:2] == (1024, 768)
        with pytest.raises(ImportRefused, match="needs letterboxing.*plane cannot be placed"):
            out.import_dmabuf(buf.fd, width=640, height=400, pitch=2560, offset=0, fourcc=XRGB)
        assert vkms.gem_objects() == 0


async def test_plane_that_can_be_placed_centres_the_frame(guest: Any) -> None:
    card = vkms_card(plane_can_position=True)
    buf = guest(640 * 4 * 400)
    fill(buf.map, 2560, 640, 400, b"\x01\x02\x03\x00")
    try:
        async with open_display(card, 640, 400) as display:
            out = display.outputs["Virtual-1"]
            fb = out.import_dmabuf(buf.fd, width=640, height=400, pitch=2560, offset=0, fourcc=XRGB)
            await out.flip(fb)
            assert card.crtc.dst == (192, 184, 640, 400)
            assert card.scanout_pixels(192, 184) == b"\x01\x02\x03\x00"
            assert card.scanout_pixels(0, 0) == b""
            snap = out.snapshot()
            assert snap.pixel(0, 0) == (0, 0, 0) and snap.pixel(192, 184) == (3, 2, 1)
    finally:
        card.close()


# ---- copy path: dumb buffers and letterboxing -----------------------------------------


@pytest.mark.parametrize("make", [vkms_card, bochs_card])
async def test_small_dumb_frame_is_letterboxed_in_the_middle(make: Any) -> None:
    card = make()
    try:
        async with open_display(card, 640, 400) as display:
            out = display.outputs["Virtual-1"]
            fb = out.create_dumb(width=640, height=400, fourcc=XRGB)
            fill(fb.buffer, fb.pitch, 640, 400, b"\x09\x08\x07\x00")
            await out.flip(fb)
            assert card.crtc.fb_id != fb.fb_id  # a canvas of ours is scanned out
            assert card.scanout_pixels(192, 184) == b"\x09\x08\x07\x00"
            assert card.scanout_pixels(831, 583) == b"\x09\x08\x07\x00"
            assert card.scanout_pixels(191, 184) == b"\x00\x00\x00\x00"
            assert card.scanout_pixels(832, 584) == b"\x00\x00\x00\x00"
            snap = out.snapshot()
            assert snap.pixel(192, 184) == (7, 8, 9) and snap.pixel(0, 0) == (0, 0, 0)
            # next frame goes to the other canvas (no tearing)
            first_canvas = card.crtc.fb_id
            fill(fb.buffer, fb.pitch, 640, 400, b"\x01\x01\x01\x00")
            await out.flip(fb)
            assert card.crtc.fb_id != first_canvas
            assert card.scanout_pixels(500, 300) == b"\x01\x01\x01\x00"
            assert out.current_fb is fb
    finally:
        card.close()


@pytest.mark.parametrize("make", [vkms_card, bochs_card])
async def test_letterbox_blanks_each_canvas_border_once_then_copies_only_the_frame(
    make: Any,
) -> None:
    card = make(dumb_fill=b"\xee")  # dumb buffers in VRAM need not start black
    marker = b"\x5a\x5a\x5a\x00"
    try:
        async with open_display(card, 640, 400) as display:
            out = display.outputs["Virtual-1"]
            fb = out.create_dumb(width=640, height=400, fourcc=XRGB)
            canvases: list[int] = []
            for n in range(4):
                value = bytes([n + 1, n + 2, n + 3, 0])
                fill(fb.buffer, fb.pitch, 640, 400, value)
                await out.flip(fb)
                canvas = card.shown_fb()
                assert canvas is not None and card.crtc.fb_id != fb.fb_id
                canvases.append(card.crtc.fb_id)
                for x, y in [(192, 184), (831, 583), (500, 300)]:
                    assert card.scanout_pixels(x, y) == value
                for x, y in [(191, 184), (832, 583), (500, 183), (500, 584), (1023, 767)]:
                    assert card.scanout_pixels(x, y) == b"\x00\x00\x00\x00", (n, x, y)
                if n < 2:  # a mark in the border of each canvas: no later frame writes there
                    os.pwrite(canvas.obj.fd, marker, canvas.obj.offset + canvas.offset)
                else:
                    assert card.scanout_pixels(0, 0) == marker, n
            assert canvases[0] == canvases[2] != canvases[1] == canvases[3]
    finally:
        card.close()


async def test_bigger_frame_shows_its_centre(vkms: FakeCard) -> None:
    async with open_display(vkms, 1280, 1000) as display:
        out = display.outputs["Virtual-1"]
        assert out.mode[:2] == (1024, 768)
        fb = out.create_dumb(width=1280, height=1000, fourcc=XRGB)
        fill(fb.buffer, fb.pitch, 1280, 1000, b"\x05\x05\x05\x00")
        fb.buffer[116 * fb.pitch + 128 * 4 : 116 * fb.pitch + 129 * 4] = b"\xaa\xbb\xcc\x00"
        await out.flip(fb)
        assert vkms.crtc.fb_id == fb.fb_id  # the plane crops: still zero extra copies
        assert vkms.scanout_pixels(0, 0) == b"\xaa\xbb\xcc\x00"
        assert out.snapshot().pixel(0, 0) == (0xCC, 0xBB, 0xAA)


async def test_unsupported_dumb_format(bochs: FakeCard) -> None:
    async with open_display(bochs) as display:
        out = display.outputs["Virtual-1"]
        with pytest.raises(UnsupportedFormat, match="ARGB8888"):
            out.create_dumb(width=64, height=64, fourcc=PixelFormat.ARGB8888)
        with pytest.raises(UnsupportedFormat, match="unknown"):
            out.create_dumb(width=64, height=64, fourcc=0x12345678)
        with pytest.raises(ValueError, match="outside"):
            out.create_dumb(width=0, height=64, fourcc=XRGB)


# ---- release --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [vkms_card, bochs_card])
async def test_release_of_the_frame_on_screen_keeps_a_copy(make: Any) -> None:
    card = make()
    try:
        async with open_display(card) as display:
            out = display.outputs["Virtual-1"]
            fb = out.create_dumb(width=1024, height=768, fourcc=XRGB)
            fill(fb.buffer, fb.pitch, 1024, 768, b"\x33\x22\x11\x00")
            await out.flip(fb)
            fb_id = fb.fb_id
            out.release(fb)
            out.release(fb)  # idempotent
            assert fb.released and fb_id not in card.fbs
            assert card.rmfb_of_active == 0
            assert out.enabled and out.current_fb is None
            assert card.crtc.fb_id not in (0, fb_id)
            assert card.scanout_pixels(10, 10) == b"\x33\x22\x11\x00"
            assert out.snapshot().pixel(10, 10) == (0x11, 0x22, 0x33)
            with pytest.raises(InvalidFramebuffer):
                await out.flip(fb)
    finally:
        card.close()


async def test_release_of_imported_frame_on_screen_copies_from_the_mapping(
    vkms: FakeCard, guest: Any
) -> None:
    buf = guest(1024 * 4 * 768)
    fill(buf.map, 4096, 1024, 768, b"\x44\x55\x66\x00")
    async with open_display(vkms) as display:
        out = display.outputs["Virtual-1"]
        fb = out.import_dmabuf(buf.fd, width=1024, height=768, pitch=4096, offset=0, fourcc=XRGB)
        await out.flip(fb)
        out.release(fb)
        fill(buf.map, 4096, 1024, 768, b"\x00\x00\x00\x00")  # guest memory no longer read
        assert vkms.scanout_pixels(3, 3) == b"\x44\x55\x66\x00"
        assert vkms.rmfb_of_active == 0 and out.live_framebuffers == 0


async def test_keep_frame_copies_through_the_runner_and_release_then_copies_nothing(
    vkms: FakeCard, guest: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from displback.kms import output as kms_output

    buf = guest(1024 * 4 * 768)
    fill(buf.map, 4096, 1024, 768, b"\x44\x55\x66\x00")
    ran: list[int] = []

    async def run(copy: Any) -> None:  # a worker thread, as the copy workers do
        ran.append(1)
        await trio.to_thread.run_sync(copy)

    async with open_display(vkms) as display:
        out = display.outputs["Virtual-1"]
        fb = out.import_dmabuf(buf.fd, width=1024, height=768, pitch=4096, offset=0, fourcc=XRGB)
        await out.flip(fb)
        await out.keep_frame(fb, run)
        assert ran == [1] and out.current_fb is None  # the copy is on screen already
        composed: list[int] = []
        real = kms_output.compose
        monkeypatch.setattr(kms_output, "compose", lambda *a: composed.append(1) or real(*a))
        out.release(fb)
        assert composed == []  # nothing copied on the event loop
        fill(buf.map, 4096, 1024, 768, b"\x00\x00\x00\x00")
        assert vkms.scanout_pixels(3, 3) == b"\x44\x55\x66\x00"
        assert vkms.rmfb_of_active == 0 and out.live_framebuffers == 0
        # A framebuffer not on screen: nothing to keep.
        other = out.create_dumb(width=64, height=64, fourcc=XRGB)
        await out.keep_frame(other, run)
        assert ran == [1]


async def test_release_of_a_framebuffer_of_another_output_is_refused(vkms: FakeCard) -> None:
    other = vkms_card()
    try:
        async with open_display(vkms) as d1, open_display(other) as d2:
            fb = d2.outputs["Virtual-1"].create_dumb(width=8, height=8, fourcc=XRGB)
            with pytest.raises(InvalidFramebuffer):
                d1.outputs["Virtual-1"].release(fb)
    finally:
        other.close()


# ---- hot-plug -------------------------------------------------------------------------


async def test_hotplug_check_of_an_unchanged_connector_is_one_status_read(
    vkms: FakeCard, autojump_clock: trio.testing.MockClock
) -> None:
    """Measured in the nested VM (bench-vm): the once-a-second check read every mode and
    property of the connector (two GETCONNECTORs and a dozen objects built, 48 ms of the
    event loop under TCG) to look at its status. One GETCONNECTOR, no mode copied, will do."""
    async with open_display(vkms, hotplug_poll_s=0.5) as display:
        out = display.outputs["Virtual-1"]
        fb = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        await out.flip(fb)
        vkms.calls.clear()
        await trio.sleep(2.25)  # 4 checks
        assert vkms.calls == ["MODE_GETCONNECTOR"] * 4
        assert out.connected


async def test_unplugged_output_drops_frames_but_flips_complete(
    vkms: FakeCard, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_display(vkms, hotplug_poll_s=0.5) as display:
        out = display.outputs["Virtual-1"]
        fb = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        fill(fb.buffer, fb.pitch, 1024, 768, b"\x07\x07\x07\x00")
        await out.flip(fb)
        vkms.unplug()
        await trio.sleep(1)
        assert not out.connected and vkms.crtc.fb_id == 0
        commits = vkms.calls.count("MODE_ATOMIC")
        start = trio.current_time()
        for _ in range(3):
            await out.flip(fb)
        assert vkms.calls.count("MODE_ATOMIC") == commits  # nothing sent to the card
        assert trio.current_time() - start == pytest.approx(3 / 60, rel=0.01)
        assert out.stats.flips_completed == 4
        vkms.plug()
        await trio.sleep(1)
        assert out.connected and vkms.crtc.fb_id == fb.fb_id
        assert vkms.scanout_pixels(0, 0) == b"\x07\x07\x07\x00"
        await out.flip(fb)
        assert out.stats.flips_completed == 5


async def test_replug_with_other_modes_letterboxes_the_frame(
    vkms: FakeCard, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_display(vkms, hotplug_poll_s=0.5) as display:
        out = display.outputs["Virtual-1"]
        fb = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        fill(fb.buffer, fb.pitch, 1024, 768, b"\x02\x02\x02\x00")
        await out.flip(fb)
        vkms.unplug()
        await trio.sleep(1)
        vkms.plug([dmt_mode(1920, 1080, preferred=True)])
        await trio.sleep(1)
        assert out.mode[:2] == (1920, 1080)
        assert vkms.crtc.mode is not None and vkms.crtc.mode.width == 1920
        assert vkms.scanout_pixels(448, 156) == b"\x02\x02\x02\x00"
        assert vkms.scanout_pixels(0, 0) == b"\x00\x00\x00\x00"
        # The next flips of that frame are worked out for the new mode too.
        for _ in range(2):
            await out.flip(fb)
            assert vkms.crtc.fb_id != fb.fb_id and out.placement == "letterbox"
            assert vkms.scanout_pixels(448, 156) == b"\x02\x02\x02\x00"
