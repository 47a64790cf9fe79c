"""The simulated guest's buffers: DBUF_CREATE/DESTROY, FB_ATTACH/DETACH, and grant ends.

Like Linux's GEM side of xen-drm-front: a buffer's pages (own, or the backend's in be-alloc
mode), its page directory, the cookies, and the end of grant access, retried every
``end_access_retry`` seconds while the backend still maps a page. May touch: the guest's
domain and channels (to send requests), :mod:`displback.protocol` (page directory).
"""

from __future__ import annotations

import errno as _errno
import logging
from typing import TYPE_CHECKING, Final

import trio

from displback.protocol.constants import (
    DBUF_FLG_REQ_ALLOC,
    PAGE_SIZE,
    Op,
    PixelFormat,
    pitch_for,
)
from displback.protocol.errors import ProtocolError
from displback.protocol.messages import (
    DbufCreateReq,
    DbufDestroyReq,
    FbAttachReq,
    FbDetachReq,
)
from displback.protocol.pagedir import DirectoryReader, build_directory, dir_pages_for

if TYPE_CHECKING:
    from displback.sim.guest.frontend import SimGuest
from displback.sim.guest.objects import (
    GuestBuffer,
    GuestFb,
    GuestRequestError,
)

log = logging.getLogger(__name__)


# Linux uses kernel pointers as cookies; ours look alike and are unique per guest.
_COOKIE_BASE: Final = 0xFFFF_8880_0000_0000


_COOKIE_STEP: Final = 0x100


class BufferTable:
    """The guest's display buffers and framebuffers (GEM objects and ``ADDFB2``), and the grant
    ends Linux defers while the backend still maps a page."""

    def __init__(self, guest: SimGuest) -> None:
        self._guest = guest
        self._live: dict[int, GuestBuffer] = {}
        self._next_cookie = _COOKIE_BASE
        self.deferred: list[tuple[int, int | None]] = []  # (gref, pfn to free after)

    @property
    def live(self) -> list[GuestBuffer]:
        """The buffers not yet freed."""
        return list(self._live.values())

    def free_all(self) -> list[tuple[int, int | None]]:
        """Free every buffer locally (the device went away); the (gref, pfn) pairs to end."""
        pairs: list[tuple[int, int | None]] = []
        for buf in list(self._live.values()):
            pairs += self.free_local(buf)
        return pairs

    def forget_all(self, *, mark_freed: bool = False) -> None:
        """Drop every buffer's mappings without a word (unload cut short, or a crash)."""
        for buf in self._live.values():
            if mark_freed:
                buf.freed = True
            self.close_mappings(buf)
        self._live.clear()

    def _cookie(self) -> int:
        cookie = self._next_cookie
        self._next_cookie += _COOKIE_STEP
        return cookie

    async def create_dumb(
        self, width: int, height: int, bpp: int, *, cookie: int | None = None
    ) -> GuestBuffer:
        """``DRM_IOCTL_MODE_CREATE_DUMB``: pitch = ceil(width*bpp/8), size = pitch*height."""
        if width <= 0 or height <= 0 or bpp <= 0:
            raise GuestRequestError(_errno.EINVAL, f"dumb buffer {width}x{height}x{bpp}")
        size = pitch_for(width, bpp) * height
        return await self._create_buffer(width, height, bpp, size, 0, cookie)

    async def import_prime(
        self, size: int, data_ofs: int = 0, *, cookie: int | None = None
    ) -> GuestBuffer:
        """A PRIME-imported buffer: DBUF_CREATE with width = height = bpp = 0."""
        if size <= 0:
            raise GuestRequestError(_errno.EINVAL, f"imported buffer of {size} bytes")
        return await self._create_buffer(0, 0, 0, size, data_ofs, cookie)

    async def _create_buffer(
        self, width: int, height: int, bpp: int, size: int, data_ofs: int, cookie: int | None
    ) -> GuestBuffer:
        link = self._guest._require_link()
        dom = self._guest._require_domain()
        buf = GuestBuffer(
            self._cookie() if cookie is None else cookie,
            width=width,
            height=height,
            bpp=bpp,
            size=size,
            data_ofs=data_ofs,
            be_alloc=link.be_alloc,
            generation=link.generation,
        )
        ndir = dir_pages_for(buf.npages)
        self._live[id(buf)] = buf
        try:
            buf.dir_pfns = dom.alloc_pages(ndir)
            buf.dir_grefs = dom.grant_pages(buf.dir_pfns, self._guest.backend_domid)
            if not buf.be_alloc:
                buf.pfns = dom.alloc_pages(buf.npages)
                buf.grefs = dom.grant_pages(buf.pfns, self._guest.backend_domid)
                buf._own = dom.map_pages(buf.pfns)
            refs = buf.grefs if not buf.be_alloc else [0] * buf.npages
            with dom.map_pages(buf.dir_pfns) as directory:
                for i, page in enumerate(build_directory(refs, buf.dir_grefs)):
                    directory.buffer[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = page
            if self._guest.hostile.on_directory is not None:
                self._guest.hostile.on_directory(buf)  # e.g. scribble_directory before DBUF_CREATE
        except OSError as exc:
            self._destroy_local(buf)
            raise GuestRequestError(exc.errno or _errno.ENOMEM, str(exc)) from exc
        try:
            await self._guest.channels.request(
                0,
                lambda req_id: DbufCreateReq(
                    id=req_id,
                    dbuf_cookie=buf.cookie,
                    width=width,
                    height=height,
                    bpp=bpp,
                    buffer_sz=size,
                    flags=DBUF_FLG_REQ_ALLOC if buf.be_alloc else 0,
                    gref_directory=buf.dir_grefs[0],
                    data_ofs=data_ofs,
                ),
            )
            if buf.be_alloc and not buf.freed:
                self._map_backend_buffer(buf)
        except BaseException:
            self._destroy_local(buf)
            raise
        if buf.freed:  # torn down while waiting
            raise GuestRequestError(_errno.EIO, "device disconnected", op=Op.DBUF_CREATE)
        return buf

    def _map_backend_buffer(self, buf: GuestBuffer) -> None:
        """be-alloc: read the refs the backend wrote into our directory and map them."""
        dom = self._guest._require_domain()
        reader = DirectoryReader(buf.dir_grefs[0], buf.npages, same_grant_table=False)
        error: Exception | None = None
        with dom.map_pages(buf.dir_pfns) as directory:
            page_of = {gref: i for i, gref in enumerate(buf.dir_grefs)}
            try:
                while (gref := reader.next_page_gref) is not None:
                    index = page_of[gref]
                    with directory.buffer[index * PAGE_SIZE : (index + 1) * PAGE_SIZE] as page:
                        reader.feed(page)
            except (ProtocolError, KeyError) as exc:
                error = exc  # raised below, once no view of the mapping is alive
        if error is not None:
            raise GuestRequestError(_errno.EIO, f"backend directory: {error}") from error
        buf.backend_refs = list(reader.refs)
        if self._guest._gntdev is None:
            self._guest._gntdev = dom.open_grant_device()
        try:
            gntdev = self._guest._gntdev
            buf._backend = gntdev.map_grants(self._guest.backend_domid, buf.backend_refs)
        except OSError as exc:
            raise GuestRequestError(exc.errno or _errno.EIO, f"mapping: {exc}") from exc

    def close_mappings(self, buf: GuestBuffer) -> None:
        for mapping in (buf._backend, buf._own):
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:
                    log.error("buffer %#x: a view of its memory is still alive", buf.cookie)
        buf._backend = buf._own = None

    def free_local(self, buf: GuestBuffer) -> list[tuple[int, int | None]]:
        """``dbuf_free``: unmap, and return (gref, pfn) pairs whose access must end."""
        if buf.freed:
            return []
        buf.freed = True
        self._live.pop(id(buf), None)
        self.close_mappings(buf)
        # grant_pages is all or nothing: a list of pages is either all granted or none.
        pairs: list[tuple[int, int | None]] = []
        for grefs, pfns in ((buf.grefs, buf.pfns), (buf.dir_grefs, buf.dir_pfns)):
            if grefs:
                pairs += zip(grefs, pfns, strict=True)
            else:
                pairs += ((0, pfn) for pfn in pfns)
        return pairs

    def _destroy_local(self, buf: GuestBuffer) -> None:
        self.end_access(self.free_local(buf))

    async def destroy_dumb(self, buf: GuestBuffer) -> None:
        """GEM free: DBUF_DESTROY and end access to the pages whatever the answer.

        As Linux: in be-alloc mode the backend's pages are unmapped and the directory's
        grants ended *before* the request; otherwise after it. Without a connection only the
        local part happens. Raises :class:`GuestRequestError` if the request failed; access
        the backend still maps is retried every ``end_access_retry`` seconds.
        """
        if buf.freed:
            return
        if not self._guest.connected:
            self._destroy_local(buf)
            return
        if buf.be_alloc:
            self._destroy_local(buf)
        try:
            await self._guest.channels.request(
                0, lambda req_id: DbufDestroyReq(id=req_id, dbuf_cookie=buf.cookie)
            )
        finally:
            self._destroy_local(buf)

    async def add_fb(
        self,
        buf: GuestBuffer,
        width: int,
        height: int,
        fourcc: PixelFormat | int = PixelFormat.XRGB8888,
        *,
        cookie: int | None = None,
    ) -> GuestFb:
        """``ADDFB2``: FB_ATTACH on connector 0's ring."""
        if buf.freed:
            raise GuestRequestError(_errno.EINVAL, "buffer is gone")
        fb = GuestFb(self._cookie() if cookie is None else cookie, buf, width, height,
                         int(fourcc))
        await self._guest.channels.request(
            0,
            lambda req_id: FbAttachReq(
                id=req_id,
                dbuf_cookie=buf.cookie,
                fb_cookie=fb.cookie,
                width=width,
                height=height,
                pixel_format=fb.fourcc,
            ),
        )
        return fb

    async def rm_fb(self, fb: GuestFb) -> None:
        """``RMFB``: FB_DETACH on connector 0's ring."""
        await self._guest.channels.request(
            0, lambda req_id: FbDetachReq(id=req_id, fb_cookie=fb.cookie)
        )

    def end_access(self, pairs: list[tuple[int, int | None]]) -> None:
        """End access and free; what the backend still maps is deferred and retried."""
        if not pairs or self._guest._crashed or self._guest._domain is None:
            return
        dom = self._guest._domain
        ungranted = [pfn for gref, pfn in pairs if gref == 0 and pfn is not None]
        if ungranted:
            dom.free_pages(ungranted)
        pairs = [(gref, pfn) for gref, pfn in pairs if gref != 0]
        if not pairs:
            return
        try:
            dom.end_access_pages([gref for gref, _pfn in pairs])
        except OSError as exc:
            if exc.errno != _errno.EBUSY:
                raise
            for gref, pfn in pairs:
                try:
                    dom.end_access(gref)
                except OSError as one:
                    if one.errno != _errno.EBUSY:
                        raise
                    self._guest.stats.end_access_deferred += 1
                    self.deferred.append((gref, pfn))
                    continue
                if pfn is not None:
                    dom.free_pages([pfn])
            return
        pfns = [pfn for _gref, pfn in pairs if pfn is not None]
        if pfns:
            dom.free_pages(pfns)

    async def deferred_loop(self) -> None:
        while True:
            await trio.sleep(self._guest.end_access_retry)
            if not self.deferred or self._guest._domain is None:
                continue
            still: list[tuple[int, int | None]] = []
            for gref, pfn in self.deferred:
                try:
                    self._guest._domain.end_access(gref)
                except OSError as exc:
                    if exc.errno != _errno.EBUSY:
                        log.error("guest %d: ending gref %d: %s", self._guest.domid, gref, exc)
                        continue
                    self._guest.stats.end_access_retries += 1
                    still.append((gref, pfn))
                    continue
                if pfn is not None:
                    self._guest._domain.free_pages([pfn])
            self.deferred = still
            self._guest._changed()
