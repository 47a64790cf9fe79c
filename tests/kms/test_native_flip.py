"""KmsOutput.native_flip: a plain flip handed out as one ioctl for a copy thread to issue.

The fake kernel stands in for the thread here: the test issues the handed-out ioctl through
the fake card itself, as the copy thread issues it on a real card's fd. What the output
promises: nothing is issued by the output itself; the flip is pending from the hand-out on
and lands on its event like any other, after the caller's side was settled; a flip that is
not one plain ioctl is declined (None) with nothing started; a failed or cancelled one is
forgotten, its callback never called; a closing display settles it before the CRTCs are given
back and the fd is closed.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from displback.display.interface import DisplayError, FlipPending, NativeFlip
from displback.kms import uapi
from displback.protocol.constants import PixelFormat
from tests.kms.fake import FakeCard, bochs_card, vkms_card
from tests.kms.test_display import open_display

XRGB = PixelFormat.XRGB8888


def native(make: Callable[[], FakeCard]) -> Iterator[FakeCard]:
    """A fake card whose outputs hand out native flips (their ioctls are issued here)."""
    card = make()
    card.native = True
    yield card
    card.close()


@pytest.fixture
def vkms() -> Iterator[FakeCard]:
    yield from native(vkms_card)


@pytest.fixture
def bochs() -> Iterator[FakeCard]:
    yield from native(bochs_card)


class Landing:
    """A flip's callback and its caller's settle hook, recording the order they came in."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.results: list[Any] = []
        self.arrived = trio.Event()

    def settle(self) -> None:
        self.order.append("settled")

    def __call__(self, result: Any) -> None:
        self.order.append("landed")
        self.results.append(result)
        self.arrived.set()

    async def wait(self) -> None:
        with trio.fail_after(5):
            await self.arrived.wait()


def issue(card: FakeCard, flip: NativeFlip) -> None:
    """What the copy thread does after its copy: the one ioctl, on the card's fd."""
    card.ioctl(flip.fd, flip.request, flip.arg)


async def test_an_atomic_plain_flip_is_handed_out_and_lands_on_its_event(vkms: FakeCard) -> None:
    vkms.auto_vblank = False
    async with open_display(vkms) as display:
        out = display.outputs["Virtual-1"]
        a = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        b = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        async with trio.open_nursery() as nursery:  # the first flip turns the CRTC on
            nursery.start_soon(out.flip, a)
            await trio.testing.wait_all_tasks_blocked()
            vkms.vblank()
        landing = Landing()
        calls = len(vkms.calls)
        flip = out.native_flip(b, landing)
        assert flip is not None and out.flip_pending
        assert len(vkms.calls) == calls  # handed out, not issued
        assert (flip.fd, flip.request) == (display.device.fd, uapi.IOCTLS["MODE_ATOMIC"])
        flip.settle = landing.settle
        issue(vkms, flip)
        assert vkms.calls[-1] == "MODE_ATOMIC" and vkms.committed  # FB_ID alone
        assert out.native_flip(a, landing) is None  # one flip at a time
        vkms.vblank()
        await landing.wait()
        assert landing.order == ["settled", "landed"]
        assert landing.results[0].fb is b and out.current_fb is b and not out.flip_pending


async def test_a_legacy_page_flip_is_handed_out_once_the_crtc_is_on(bochs: FakeCard) -> None:
    async with open_display(bochs) as display:
        out = display.outputs["Virtual-1"]
        a = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        b = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        assert out.native_flip(a, Landing()) is None  # SETCRTC first: blocking, the loop's
        assert not out.flip_pending
        await out.flip(a)
        landing = Landing()
        flip = out.native_flip(b, landing)
        assert flip is not None and flip.request == uapi.IOCTLS["MODE_PAGE_FLIP"]
        issue(bochs, flip)
        await landing.wait()
        assert bochs.crtc.fb_id == b.fb_id and out.current_fb is b


async def test_what_is_not_one_plain_ioctl_is_declined_with_nothing_started(
    vkms: FakeCard, bochs: FakeCard
) -> None:
    async with open_display(vkms) as display:
        out = display.outputs["Virtual-1"]
        a = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        assert out.native_flip(a, Landing()) is None  # the CRTC is off: a modeset
        await out.flip(a)
        vkms.native = False
        assert out.native_flip(a, Landing()) is None  # a test double's ioctls: never native
        vkms.native = True
        other = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        out.release(other)
        assert out.native_flip(other, Landing()) is None  # released
        assert not out.flip_pending
    assert out.native_flip(a, Landing()) is None  # closed
    async with open_display(bochs) as display:  # legacy: a smaller frame is letterboxed
        out = display.outputs["Virtual-1"]
        a = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        small = out.create_dumb(width=640, height=480, fourcc=XRGB)
        await out.flip(a)
        assert out.native_flip(small, Landing()) is None  # composed after the copy
        assert not out.flip_pending


async def test_a_failed_or_cancelled_native_flip_is_forgotten_and_never_lands(
    vkms: FakeCard,
) -> None:
    async with open_display(vkms) as display:
        out = display.outputs["Virtual-1"]
        a = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        await out.flip(a)
        for code, error in ((errno.EINVAL, DisplayError), (errno.EBUSY, FlipPending)):
            landing = Landing()
            flip = out.native_flip(a, landing)
            assert flip is not None
            exc = flip.failed(code)
            assert isinstance(exc, error) and "MODE_ATOMIC" in str(exc)
            assert not out.flip_pending and not display.awaiting
        landing = Landing()
        flip = out.native_flip(a, landing)
        assert flip is not None
        flip.cancel()
        assert not out.flip_pending and not display.awaiting
        await out.flip(a)  # the output goes on flipping
        await trio.testing.wait_all_tasks_blocked()
        assert landing.order == []


async def test_a_closing_display_settles_a_native_flip_before_it_gives_the_crtcs_back(
    vkms: FakeCard,
) -> None:
    vkms.auto_vblank = False
    seen: list[tuple[bool, int]] = []
    async with open_display(vkms) as display:
        opened = len(vkms.calls)
        out = display.outputs["Virtual-1"]
        a = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        b = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.flip, a)
            await trio.testing.wait_all_tasks_blocked()
            vkms.vblank()
        landing = Landing()
        flip = out.native_flip(b, landing)
        assert flip is not None

        def settle() -> None:  # the thread issues its flip while the card is still ours
            if not seen:  # (settling is idempotent: the copy is handed back once)
                seen.append((display.device.closed, len(vkms.calls)))
                issue(vkms, flip)
                landing.settle()

        flip.settle = settle
    (closed, calls), = seen
    assert not closed
    assert vkms.calls[calls] == "MODE_ATOMIC"  # the thread's flip, then the give-back
    assert "MODE_SETCRTC" not in vkms.calls[opened:calls]
    assert "MODE_SETCRTC" in vkms.calls[calls:]  # fbcon's CRTC set back after it
    assert landing.order == ["settled", "landed"] and landing.results == [None]


async def test_a_flip_found_failed_when_settled_at_its_deadline_never_lands(
    vkms: FakeCard,
) -> None:
    """The watchdog lands a flip whose event never came; settling it first may show that
    the thread's ioctl failed (its hand-back not yet run): then it is forgotten, not landed."""
    async with open_display(vkms, flip_timeout_s=0.05) as display:
        out = display.outputs["Virtual-1"]
        a = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        b = out.create_dumb(width=1024, height=768, fourcc=XRGB)
        await out.flip(a)
        flips = out.stats.flips_completed
        landing = Landing()
        flip = out.native_flip(b, landing)
        assert flip is not None
        failures: list[Exception] = []

        def settle() -> None:  # the thread's hand-back: its ioctl failed
            landing.settle()
            failures.append(flip.failed(errno.EINVAL))

        flip.settle = settle
        with trio.fail_after(5):
            while out.flip_pending:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert landing.order == ["settled"] and len(failures) == 1
        assert out.flip_timeouts == 1 and not display.awaiting
        # Not landed: what is on screen and what was counted stay as they were.
        assert out.current_fb is a and out.stats.flips_completed == flips
        assert out.native_flips == 0
