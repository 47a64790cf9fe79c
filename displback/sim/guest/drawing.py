"""The simulated guest's drawing mode: a moving test pattern, double-buffered, flipped at a rate.

What a desktop or a drmtest-like program does through the driver, so demos and benchmarks
have a guest that shows frames. May touch: the guest's public calls only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import trio

from displback.protocol.constants import (
    PixelFormat,
)
from displback.sim.guest_pattern import draw_pattern

if TYPE_CHECKING:
    from displback.sim.guest.frontend import SimGuest
from displback.sim.guest.objects import (
    FlipOutcome,
    GuestBuffer,
    GuestFb,
    GuestRequestError,
)

log = logging.getLogger(__name__)


class Drawing:
    """Draws a test pattern on connectors through the guest's public calls."""

    def __init__(self, guest: SimGuest) -> None:
        self._guest = guest

    async def draw(
        self,
        connector: int,
        *,
        fps: float = 60.0,
        fmt: PixelFormat = PixelFormat.XRGB8888,
        frames: int | None = None,
    ) -> None:
        """Show a moving test pattern on ``connector`` at ``fps`` (double-buffered dumb
        buffers at the connector's resolution, SET_CONFIG once, then PG_FLIP per frame).

        Runs until ``frames`` frames were shown (None: until cancelled). After a disconnect it
        waits for the next connection and starts over; after a failed request it pauses a
        frame and retries. See :func:`displback.sim.guest_pattern.pattern_rgb`.
        """
        period = 1.0 / fps if fps > 0 else 0.0
        shown = 0
        while frames is None or shown < frames:
            await self._guest.wait_state(lambda g: g.connected, timeout=math.inf)
            try:
                shown = await self._draw_session(connector, fmt, period, shown, frames)
            except GuestRequestError as exc:
                log.info("guest %d: connector %d drawing: %s", self._guest.domid, connector, exc)
                await trio.sleep(max(period, 0.01))

    async def _draw_session(
        self, connector: int, fmt: PixelFormat, period: float, shown: int, frames: int | None
    ) -> int:
        stats = self._guest.connector_stats(connector)
        width, height = self._guest.resolutions[connector]
        buffers: list[GuestBuffer] = []
        fbs: list[GuestFb] = []
        try:
            for _ in range(2):
                buf = await self._guest.create_dumb(width, height, fmt.bpp)
                buffers.append(buf)
                fbs.append(await self._guest.add_fb(buf, width, height, fmt))
            self._paint(buffers[0], fmt, connector, shown)
            stats.frames_drawn += 1
            await self._guest.set_config(connector, fbs[0])
            shown += 1
            next_time = trio.current_time() + period
            while frames is None or shown < frames:
                back = shown % 2
                self._paint(buffers[back], fmt, connector, shown)
                stats.frames_drawn += 1
                result = await self._guest.page_flip(connector, fbs[back])
                if result is FlipOutcome.RELEASED:
                    return shown
                shown += 1
                await trio.sleep_until(next_time)
                next_time = max(next_time + period, trio.current_time())
            return shown
        finally:
            with trio.CancelScope(shield=True):
                await self._undraw(connector, buffers, fbs)

    async def _undraw(
        self, connector: int, buffers: list[GuestBuffer], fbs: list[GuestFb]
    ) -> None:
        if self._guest.connected:
            with contextlib.suppress(GuestRequestError):
                await self._guest.set_config(connector, None)
            for fb in fbs:
                with contextlib.suppress(GuestRequestError):
                    await self._guest.rm_fb(fb)
        for buf in buffers:
            with contextlib.suppress(GuestRequestError):
                await self._guest.destroy_dumb(buf)

    @staticmethod
    def _paint(buf: GuestBuffer, fmt: PixelFormat, connector: int, frame: int) -> None:
        draw_pattern(
            buf.buffer, width=buf.width, height=buf.height, pitch=buf.pitch, fmt=fmt,
            connector=connector, frame=frame,
        )

    def start_drawing(
        self,
        connectors: Iterable[int] | None = None,
        *,
        fps: float = 60.0,
        fmt: PixelFormat = PixelFormat.XRGB8888,
        frames: int | None = None,
    ) -> None:
        """Run :meth:`draw` for each connector (default: all configured) in the guest's
        nursery, until the guest closes."""
        if self._guest._nursery is None:
            raise RuntimeError("guest is not running")
        every = range(len(self._guest.resolutions))
        indices = list(every if connectors is None else connectors)
        for index in indices:
            self._guest._nursery.start_soon(
                functools.partial(self.draw, index, fps=fps, fmt=fmt, frames=frames)
            )
