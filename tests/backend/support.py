"""Helpers shared by the end-to-end backend tests: a connected guest, what an output shows,
polling, frames."""

from __future__ import annotations

import ctypes
import os
import termios
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from displback.backend import copies as copies_module
from displback.backend.buffers import BufferStore
from displback.display.interface import DisplayError, NativeFlip
from displback.protocol.constants import PixelFormat
from displback.sim.guest import FlipOutcome, GuestBuffer, GuestFb, SimGuest
from displback.sim.guest_pattern import decode_pattern, draw_pattern
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import SimMachine, sim_machine

XRGB = PixelFormat.XRGB8888
SPEC = "connectors=c0:320x240"


def copy_frames_with(monkeypatch: pytest.MonkeyPatch, copy_frame: Callable[..., None]) -> None:
    """Frame copies made from now on are made by ``copy_frame`` (a stand-in that can hold a
    copy in its thread), in the Python copy threads: the native ones run no Python."""
    monkeypatch.setattr(copies_module, "copy_frame", copy_frame)
    monkeypatch.setattr(copies_module, "NativeCopyThreads", None)


@asynccontextmanager
async def connected_guest(
    hypervisor: HypervisorThread, tmp_path: Path, spec: str = SPEC, *, domid: int = 1,
    **machine_options: Any,
) -> AsyncIterator[tuple[SimMachine, SimGuest]]:
    """A simulated machine with one guest whose vdispl device (``spec``) is connected."""
    async with sim_machine(hypervisor, tmp_path, **machine_options) as machine:
        await machine.add_guest(domid, spec)
        async with machine.guest(domid) as guest:
            await guest.wait_connected()
            yield machine, guest


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


async def flips_continue(guest: SimGuest, connector: int = 0, more: int = 3) -> None:
    """Wait until the guest has completed ``more`` further flips on ``connector``."""
    stats = guest.connector_stats(connector)
    target = stats.flips_ok + more
    await wait_until(lambda: stats.flips_ok >= target)


def paint(buf: GuestBuffer, fb: GuestFb, *, connector: int, frame: int,
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


async def flip_frame(guest: SimGuest, connector: int, buf: GuestBuffer, fb: GuestFb,
                     frame: int) -> None:
    """Paint ``frame`` and flip to it; the flip must complete with its event."""
    paint(buf, fb, connector=connector, frame=frame)
    assert await guest.page_flip(connector, fb) == FlipOutcome.DONE


def store_of(machine: SimMachine, domid: int, devid: int = 0) -> BufferStore:
    """The buffer store of a connected device."""
    for status in machine.backend.statuses():
        if status.domid == domid and status.devid == devid and status.store is not None:
            return status.store
    raise AssertionError(f"device {domid}/{devid} is not connected")


async def new_guest_buffers(
    guest: SimGuest, width: int, height: int, fmt: PixelFormat = XRGB, count: int = 2
) -> tuple[list[GuestBuffer], list[GuestFb]]:
    """``count`` dumb buffers of the given size with one framebuffer each."""
    bufs = [await guest.create_dumb(width, height, fmt.bpp) for _ in range(count)]
    fbs = [await guest.add_fb(b, width, height, fmt) for b in bufs]
    return bufs, fbs


async def show(
    guest: SimGuest, connector: int, width: int, height: int, fmt: PixelFormat = XRGB, *,
    frame: int = 1, count: int = 2,
) -> tuple[list[GuestBuffer], list[GuestFb]]:
    """``count`` buffers with a framebuffer each; ``frame`` painted into the first, which
    SET_CONFIG then shows on ``connector``."""
    bufs, fbs = await new_guest_buffers(guest, width, height, fmt, count)
    paint(bufs[0], fbs[0], connector=connector, frame=frame)
    await guest.set_config(connector, fbs[0])
    return bufs, fbs


async def show_frames(machine: SimMachine, guest: SimGuest, first: int, count: int = 3,
                      output: str = "A") -> None:
    """Show ``first`` on connector 0 (320×240), flip to the next ``count - 1`` frames (double
    buffered), each seen on ``output``, then release it all."""
    bufs, fbs = await show(guest, 0, 320, 240, frame=first)
    for frame in range(first + 1, first + count):
        back = (frame - first) % 2
        await flip_frame(guest, 0, bufs[back], fbs[back], frame)
        assert shown(machine.output(output), 320, 240) == (0, frame)
    await release(guest, 0, bufs, fbs)


async def release(guest: SimGuest, connector: int, bufs: list[GuestBuffer],
                  fbs: list[GuestFb]) -> None:
    """Disable the connector, detach and destroy, as a well-behaved guest does."""
    await guest.set_config(connector, None)
    for fb in fbs:
        await guest.rm_fb(fb)
    for buf in bufs:
        await guest.destroy_dumb(buf)


class PipeFlip:
    """An output's flip as :meth:`Output.native_flip` hands it out, whose ioctl is FIONREAD on
    a pipe holding 5 bytes (the kernel writes 5 into ``arg``: the thread issued it), or a
    request the pipe refuses (ENOTTY: a failed flip). Records what the workers tell it."""

    def __init__(self, *, fails: bool = False) -> None:
        self.read_end, self.write_end = os.pipe()
        os.write(self.write_end, b"12345")
        self.arg = (ctypes.c_int * 16)(-1)  # (TCGETS on a tty would write 60 bytes)
        self.failures: list[int] = []
        self.cancelled = 0
        request = termios.TCGETS if fails else termios.FIONREAD
        self.flip = NativeFlip(self.read_end, request, self.arg, failed=self._failed,
                               cancel=self._cancel)

    def _failed(self, code: int) -> DisplayError:
        self.failures.append(code)
        return DisplayError(f"flip failed: {os.strerror(code)}")

    def _cancel(self) -> None:
        self.cancelled += 1

    @property
    def issued(self) -> bool:
        return self.arg[0] == 5

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)
