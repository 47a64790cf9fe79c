"""Helpers shared by the end-to-end backend tests: what an output shows, polling, frames."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import trio

from displback.backend.buffers import BufferStore
from displback.protocol.constants import PixelFormat
from displback.sim.guest import DumbBuffer, FlipResult, Framebuffer, SimGuest
from displback.sim.guest_pattern import decode_pattern, draw_pattern
from displback.sim.machine import SimMachine

XRGB = PixelFormat.XRGB8888


def rgb_of(output: Any) -> np.ndarray[Any, Any]:
    """The output's current picture as a (height, width, 3) array."""
    image = output.snapshot()
    return np.frombuffer(image.rgb, np.uint8).reshape(image.height, image.width, 3)


def shown(output: Any, width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """(connector, frame) of the test pattern in the output's top-left ``width``×``height``."""
    rgb = rgb_of(output)
    h = rgb.shape[0] if height is None else height
    w = rgb.shape[1] if width is None else width
    return decode_pattern(rgb[:h, :w])


async def wait_until(predicate: Callable[[], bool], poll: float = 0.01) -> None:
    """Poll ``predicate`` until it holds (the caller's ``fail_after`` bounds the wait)."""
    while not predicate():
        await trio.sleep(poll)


def paint(buf: DumbBuffer, fb: Framebuffer, *, connector: int, frame: int,
          pitch: int | None = None, offset: int | None = None) -> None:
    """Draw the pattern of (connector, frame) into ``fb`` the way the guest lays it out."""
    fmt = PixelFormat(fb.fourcc)
    draw_pattern(
        buf.buffer,
        width=fb.width,
        height=fb.height,
        pitch=buf.pitch if pitch is None else pitch,
        fmt=fmt,
        connector=connector,
        frame=frame,
        offset=buf.data_ofs if offset is None else offset,
    )


async def flip_frame(guest: SimGuest, connector: int, buf: DumbBuffer, fb: Framebuffer,
                     frame: int) -> None:
    """Paint ``frame`` and flip to it; the flip must complete with its event."""
    paint(buf, fb, connector=connector, frame=frame)
    assert await guest.page_flip(connector, fb) == FlipResult.DONE


def store_of(machine: SimMachine, domid: int, devid: int = 0) -> BufferStore:
    """The buffer store of a connected device."""
    for status in machine.backend.statuses():
        if status.domid == domid and status.devid == devid and status.store is not None:
            return status.store
    raise AssertionError(f"device {domid}/{devid} is not connected")


async def new_guest_buffers(
    guest: SimGuest, width: int, height: int, fmt: PixelFormat = XRGB, count: int = 2
) -> tuple[list[DumbBuffer], list[Framebuffer]]:
    """``count`` dumb buffers of the given size with one framebuffer each."""
    bufs = [await guest.create_dumb(width, height, fmt.bpp) for _ in range(count)]
    fbs = [await guest.add_fb(b, width, height, fmt) for b in bufs]
    return bufs, fbs


async def release(guest: SimGuest, connector: int, bufs: list[DumbBuffer],
                  fbs: list[Framebuffer]) -> None:
    """Disable the connector, detach and destroy, as a well-behaved guest does."""
    await guest.set_config(connector, None)
    for fb in fbs:
        await guest.rm_fb(fb)
    for buf in bufs:
        await guest.destroy_dumb(buf)
