"""KMS framebuffers: an imported dma-buf or a dumb buffer behind a KMS FB id, and their end.

A :class:`KmsFramebuffer` holds the FB id, the GEM handle and (imported) a dup of the
dma-buf fd, mapped for the CPU only when a snapshot or a kept copy needs its pixels. A
:class:`KmsDumbFramebuffer` is a dumb buffer of ours, mapped for the backend to copy into.
:func:`new_dumb` allocates one (the letterbox canvases are dumb buffers too). May touch:
:mod:`displback.kms.device` (the ioctls), :mod:`displback.display` (the base classes and the
interface's errors); never the output's scanout state.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from displback.display.common import DumbBufferMixin, FramebufferBase
from displback.display.interface import DisplayError, UnsupportedFormat
from displback.display.pixels import frame_end
from displback.kms.device import DrmDevice, DrmDumbBuffer, DrmError
from displback.mapping import DmabufMapping, MappedMemory, MappedRegion
from displback.protocol.constants import PixelFormat

if TYPE_CHECKING:
    from displback.kms.output import KmsOutput

__all__ = [
    "DumbAllocation",
    "FramePixels",
    "KmsDumbFramebuffer",
    "KmsFramebuffer",
    "new_dumb",
    "quietly",
]

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class FramePixels:
    """Pixels to compose or snapshot: ``memory`` with a geometry; None = cannot be read."""

    memory: memoryview | bytearray | None
    offset: int
    pitch: int
    width: int
    height: int
    fourcc: PixelFormat


def quietly(fn: Callable[[int], None], arg: int) -> None:
    """Clean-up ioctls: a failure is logged, never raised (the fd's close frees it anyway)."""
    try:
        fn(arg)
    except DrmError as exc:
        log.warning("clean-up failed: %s", exc)


class KmsFramebuffer(FramebufferBase["KmsOutput"]):
    """A framebuffer of a :class:`KmsOutput`: an imported dma-buf or a dumb buffer."""

    __slots__ = ("_dmabuf_fd", "_fb_id", "_handle", "_mapping")

    def __init__(
        self,
        output: KmsOutput,
        *,
        fb_id: int,
        handle: int,
        width: int,
        height: int,
        fourcc: PixelFormat,
        pitch: int,
        offset: int,
        dmabuf_fd: int | None,
    ) -> None:
        super().__init__(
            output, width=width, height=height, fourcc=fourcc, pitch=pitch, offset=offset
        )
        self._fb_id = fb_id
        self._handle = handle
        self._dmabuf_fd = dmabuf_fd
        self._mapping: DmabufMapping | None = None

    @property
    def zero_copy(self) -> bool:
        return self._dmabuf_fd is not None

    @property
    def fb_id(self) -> int:
        """The KMS framebuffer id (0 once released)."""
        return 0 if self._released else self._fb_id

    def _repr_id(self) -> str:
        return f" FB {self._fb_id}"

    def pixels(self) -> FramePixels:
        """The frame's pixels as composing and snapshots read them."""
        return FramePixels(
            self._memory(), self._offset, self._pitch, self._width, self._height, self._fourcc
        )

    def _memory(self) -> memoryview | None:
        """CPU view of the pixels: the importer's mapping of the dma-buf (None if unmappable)."""
        if self._released or self._dmabuf_fd is None:
            return None
        if self._mapping is None:
            importer = self._output._display.importer
            try:
                self._mapping = (
                    importer(self._dmabuf_fd) if importer else _MmapMapping(self._dmabuf_fd)
                )
            except OSError as exc:
                log.debug("cannot map dma-buf of %r: %s", self, exc)
                return None
        return self._mapping.buffer

    def drop(self, dev: DrmDevice) -> None:
        """Remove the FB and close the GEM handle; the caller made sure it is not on screen."""
        self._released = True
        mapping, self._mapping = self._mapping, None
        if mapping is not None:
            with contextlib.suppress(BufferError):  # a snapshot's view: unmapped when collected
                mapping.close()
        if self._dmabuf_fd is not None:
            os.close(self._dmabuf_fd)
            self._dmabuf_fd = -1  # still zero-copy, but nothing left to map
        quietly(dev.rm_fb, self._fb_id)
        quietly(dev.gem_close, self._handle)


class KmsDumbFramebuffer(KmsFramebuffer, DumbBufferMixin):
    """A dumb buffer scanned out by KMS, mapped for the backend to write pixels into."""

    __slots__ = ("_buffer", "_map", "_size")

    def __init__(
        self,
        output: KmsOutput,
        *,
        fb_id: int,
        dumb: DrmDumbBuffer,
        mapped: mmap.mmap,
        width: int,
        height: int,
        fourcc: PixelFormat,
    ) -> None:
        super().__init__(
            output,
            fb_id=fb_id,
            handle=dumb.handle,
            width=width,
            height=height,
            fourcc=fourcc,
            pitch=dumb.pitch,
            offset=0,
            dmabuf_fd=None,
        )
        self._map: mmap.mmap | None = mapped
        self._buffer = memoryview(mapped)
        self._size = dumb.size

    def _memory(self) -> memoryview | None:
        return None if self._released else self._buffer

    def drop(self, dev: DrmDevice) -> None:
        self._released = True
        self._buffer.release()
        mapped, self._map = self._map, None
        if mapped is not None:
            with contextlib.suppress(BufferError):  # a caller's view keeps it until collected
                mapped.close()
        quietly(dev.rm_fb, self._fb_id)
        quietly(dev.destroy_dumb, self._handle)


class _MmapMapping(MappedRegion):
    """A read-only CPU mapping of a dma-buf fd (when no importer was given)."""

    def __init__(self, fd: int) -> None:
        size = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        if size <= 0:
            raise OSError(errno.EINVAL, "dma-buf has no size")
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        super().__init__(MappedMemory(mm, writable=False))


@dataclass(slots=True, eq=False)
class DumbAllocation:
    """A dumb buffer with its KMS FB and its CPU mapping, as :func:`new_dumb` made them."""

    fb_id: int
    dumb: DrmDumbBuffer
    mapped: mmap.mmap

    def free(self, dev: DrmDevice) -> None:
        """RMFB, unmap (unless a view still holds it) and DESTROY_DUMB."""
        quietly(dev.rm_fb, self.fb_id)
        with contextlib.suppress(BufferError):
            self.mapped.close()
        quietly(dev.destroy_dumb, self.dumb.handle)


def new_dumb(
    dev: DrmDevice,
    width: int,
    height: int,
    fmt: PixelFormat,
    *,
    driver: str,
    modifiers: list[int] | None,
) -> DumbAllocation:
    """A mapped dumb buffer with an FB; :class:`DisplayError` (or ``UnsupportedFormat``)."""
    try:
        dumb = dev.create_dumb(width, height, fmt.bpp)
    except DrmError as exc:
        raise DisplayError(f"cannot allocate a {width}x{height} dumb buffer: {exc}") from exc
    if frame_end(0, dumb.pitch, width * fmt.cpp, height) > dumb.size:
        quietly(dev.destroy_dumb, dumb.handle)
        raise DisplayError(f"{driver} returned a dumb buffer too small: {dumb}")
    try:
        mapped = dev.mmap_dumb(dumb)
    except (DrmError, OSError) as exc:
        quietly(dev.destroy_dumb, dumb.handle)
        raise DisplayError(f"cannot map a dumb buffer: {exc}") from exc
    try:
        fb_id = dev.add_fb2(width, height, fmt, [dumb.handle], [dumb.pitch], [0], modifiers)
    except DrmError as exc:
        mapped.close()
        quietly(dev.destroy_dumb, dumb.handle)
        if exc.errno == errno.EINVAL:
            raise UnsupportedFormat(f"{driver} cannot scan out {fmt.name}: {exc}") from exc
        raise DisplayError(f"cannot make a framebuffer: {exc}") from exc
    return DumbAllocation(fb_id, dumb, mapped)
