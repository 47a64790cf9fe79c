"""The simulated guest's display pipelines: SET_CONFIG, PG_FLIP and its frame-done wait, GET_EDID.

Like Linux's ``xen_drm_front_kms.c``: one pipe per connector of the "DRM device" (it
exists while connected); a flip waits for its response, then for EVT_PG_FLIP up to the
frame-done timeout. May touch: the guest's channels (requests) and buffers (grant ends).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from displback.protocol.constants import (
    EDID_MAX_SIZE,
    PAGE_SIZE,
    pages_for,
)
from displback.protocol.messages import (
    GetEdidReq,
    PgFlipReq,
    SetConfigReq,
)
from displback.protocol.pagedir import build_directory, dir_pages_for

if TYPE_CHECKING:
    from displback.sim.guest.frontend import SimGuest
from displback.sim.guest.objects import (
    FlipOutcome,
    GuestFb,
    GuestRequestError,
)

log = logging.getLogger(__name__)


class AwaitedFlip:
    def __init__(self) -> None:
        self.event = trio.Event()
        self.released = False


class Pipe:
    """A connector's display pipeline in the "DRM device" (exists while connected)."""

    def __init__(self, index: int, width: int, height: int) -> None:
        self.index = index
        self.width = width
        self.height = height
        self.conn_connected = True
        self.enabled = False
        self.flip: AwaitedFlip | None = None


class Pipes:
    """The guest's display pipelines (``xen_drm_front_kms``): SET_CONFIG, PG_FLIP and its event,
    GET_EDID."""

    def __init__(self, guest: SimGuest) -> None:
        self._guest = guest

    async def set_config(
        self, connector: int, fb: GuestFb | None, *, x: int = 0, y: int = 0
    ) -> None:
        """Enable the pipe showing ``fb`` (size and bpp of the FB), or disable it (None)."""
        pipe = self._guest._pipe(connector)
        stats = self._guest.connector_stats(connector)
        try:
            if fb is None:
                await self._guest.channels.request(connector, SetConfigReq.disable)
            else:
                await self._guest.channels.request(
                    connector,
                    lambda req_id: SetConfigReq(
                        id=req_id, fb_cookie=fb.cookie, x=x, y=y, width=fb.width,
                        height=fb.height, bpp=fb.bpp,
                    ),
                )
        except GuestRequestError:
            if fb is not None:
                stats.set_config_errors += 1
                pipe.conn_connected = False
                stats.state = "error"
            raise
        finally:
            if fb is None:  # display_disable: restartable, stalled event released
                pipe.conn_connected = True
                pipe.enabled = False
                if pipe.flip is not None:
                    pipe.flip.released = True
                    pipe.flip.event.set()
        if fb is not None:
            pipe.enabled = True
            stats.state = "enabled"
        elif stats.state != "offline":
            stats.state = "connected"

    async def page_flip(self, connector: int, fb: GuestFb) -> FlipOutcome:
        """PG_FLIP, wait for its response, then for EVT_PG_FLIP until ``frame_done_timeout``
        after sending. Raises :class:`GuestRequestError` if the request failed (the
        connector is then marked disconnected, as Linux does)."""
        pipe = self._guest._pipe(connector)
        stats = self._guest.connector_stats(connector)
        flip = AwaitedFlip()
        pipe.flip = flip
        try:
            with trio.move_on_after(self._guest.frame_done_timeout) as frame_done:
                try:
                    await self._guest.channels.request(
                        connector, lambda req_id: PgFlipReq(id=req_id, fb_cookie=fb.cookie)
                    )
                except GuestRequestError:
                    if flip.released:  # torn down under us: not the backend's failure
                        return FlipOutcome.RELEASED
                    stats.flip_errors += 1
                    pipe.conn_connected = False
                    stats.state = "error"
                    raise
                await flip.event.wait()
        finally:
            if pipe.flip is flip:
                pipe.flip = None
        if flip.released:
            return FlipOutcome.RELEASED
        if frame_done.cancelled_caught:
            stats.frame_done_timeouts += 1
            domid = self._guest.domid
            log.warning("guest %d: connector %d: frame done timed-out", domid, connector)
            return FlipOutcome.FRAME_DONE_TIMEOUT
        stats.flips_ok += 1
        return FlipOutcome.DONE

    async def get_edid(self, connector: int, *, buffer_sz: int = EDID_MAX_SIZE) -> bytes:
        """GET_EDID (v2) with a guest buffer of ``buffer_sz`` bytes; the EDID returned."""
        self._guest._require_link()
        dom = self._guest._require_domain()
        npages = pages_for(buffer_sz)
        pfns = dom.alloc_pages(npages)
        dir_pfns = dom.alloc_pages(dir_pages_for(npages))
        pairs: list[tuple[int, int | None]] = []
        try:
            grefs = dom.grant_pages(pfns, self._guest.backend_domid)
            pairs += list(zip(grefs, pfns, strict=True))
            dir_grefs = dom.grant_pages(dir_pfns, self._guest.backend_domid)
            pairs += list(zip(dir_grefs, dir_pfns, strict=True))
            with dom.map_pages(dir_pfns) as directory:
                for i, page in enumerate(build_directory(grefs, dir_grefs)):
                    directory.buffer[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = page
            answer = await self._guest.channels.request(
                connector,
                lambda req_id: GetEdidReq(
                    id=req_id, buffer_sz=buffer_sz, gref_directory=dir_grefs[0]
                ),
            )
            size = min(answer.edid_sz, buffer_sz)
            with dom.map_pages(pfns) as memory:
                return bytes(memory.buffer[:size])
        finally:
            granted = {pfn for _gref, pfn in pairs}
            leftover = [p for p in pfns + dir_pfns if p not in granted]
            if leftover and not self._guest._crashed:
                dom.free_pages(leftover)
            self._guest.buffers.end_access(pairs)
