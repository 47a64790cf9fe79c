"""Pixels of guest framebuffers: conversion to packed RGB (snapshots, PNG) and row copies.

A display shows framebuffers in any format of reference §10 at any pitch and byte offset;
tests, the demo and operators want to *see* them, so :func:`to_rgb` turns such a frame into an
:class:`RgbImage` (8-bit R, G, B per pixel, rows packed) that can be written as PNG. The copy
path of the backend moves guest pixels into display-owned buffers with a different pitch;
:func:`copy_frame` does that with numpy (one strided copy, the GIL released meanwhile, so it
can run in a worker thread) and refuses any geometry that would read or write outside either
buffer.

Format notes (all DRM formats are little-endian words, so byte order is the reverse of the
channel names):

* ``XRGB8888``/``ARGB8888`` are bytes B, G, R, X/A and ``RGB888`` is B, G, R: Pillow's raw
  decoders ``BGRX`` and ``BGR`` handle them, including the pitch.
* The 16-bit RGB formats (``RGB565``, ``[XA]RGB4444``, ``[XA]RGB1555``) are decoded by one
  table-driven numpy routine. Each channel is widened to 8 bits by bit replication
  (``v << (8 - n) | v >> (2n - 8)``), as scanout hardware does, so full intensity stays 255
  and zero stays 0 for every format alike. (Pillow has no decoder for 4444 with blue in the low
  nibble, and its 565/1555 decoders round differently, so mixing them would give two rules.)
* ``YUYV`` (bytes Y0 U Y1 V per two pixels) is decoded by numpy with ITU-R BT.601
  limited-range coefficients, the DRM default encoding of YUV framebuffers; each chroma pair
  is shared by its two pixels. Widths must be even, as DRM requires for this format.
* Alpha is ignored: a primary plane is not blended, so ``ARGB`` shows like ``XRGB``.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from displback.protocol.constants import PixelFormat

__all__ = [
    "ReadableBuffer",
    "RgbImage",
    "WritableBuffer",
    "copy_frame",
    "frame_end",
    "to_rgb",
]

ReadableBuffer = bytes | bytearray | memoryview | mmap.mmap
WritableBuffer = bytearray | memoryview | mmap.mmap

# Pillow raw modes for the 8-bit-per-channel formats (decoded straight to "RGB").
_PILLOW_RAW = {
    PixelFormat.XRGB8888: "BGRX",
    PixelFormat.ARGB8888: "BGRX",
    PixelFormat.RGB888: "BGR",
}

# 16-bit RGB formats: (shift, bits) of red, green and blue inside the little-endian word.
_PACKED16: dict[PixelFormat, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    PixelFormat.RGB565: ((11, 5), (5, 6), (0, 5)),
    PixelFormat.XRGB4444: ((8, 4), (4, 4), (0, 4)),
    PixelFormat.ARGB4444: ((8, 4), (4, 4), (0, 4)),
    PixelFormat.XRGB1555: ((10, 5), (5, 5), (0, 5)),
    PixelFormat.ARGB1555: ((10, 5), (5, 5), (0, 5)),
}

# ITU-R BT.601, limited range ("studio swing"): Y in 16..235, Cb/Cr in 16..240.
_KR, _KB = 0.299, 0.114
_KG = 1.0 - _KR - _KB
_Y_SCALE = 255.0 / 219.0
_C_SCALE = 255.0 / 224.0
_R_V = 2.0 * (1.0 - _KR) * _C_SCALE
_G_U = 2.0 * _KB * (1.0 - _KB) / _KG * _C_SCALE
_G_V = 2.0 * _KR * (1.0 - _KR) / _KG * _C_SCALE
_B_U = 2.0 * (1.0 - _KB) * _C_SCALE


@dataclass(frozen=True, slots=True)
class RgbImage:
    """A picture as packed 8-bit RGB: ``rgb[3 * (y * width + x) + c]``, c = 0 (R), 1, 2 (B)."""

    width: int
    height: int
    rgb: bytes

    def __post_init__(self) -> None:
        if self.width < 0 or self.height < 0:
            raise ValueError(f"negative image size {self.width}x{self.height}")
        if len(self.rgb) != 3 * self.width * self.height:
            raise ValueError(f"{len(self.rgb)} bytes of RGB for a {self.width}x{self.height} image")

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        """The (R, G, B) of one pixel."""
        if not (0 <= x < self.width and 0 <= y < self.height):
            raise IndexError(f"pixel ({x}, {y}) outside {self.width}x{self.height}")
        i = 3 * (y * self.width + x)
        return self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]

    def to_pil(self) -> Image.Image:
        """A Pillow image (mode ``RGB``) of this picture."""
        return Image.frombytes("RGB", (self.width, self.height), self.rgb)

    def write_png(self, path: str | os.PathLike[str]) -> None:
        """Write the picture as an 8-bit RGB PNG file (blocking file I/O)."""
        self.to_pil().save(path, format="PNG")


def frame_end(offset: int, pitch: int, width_bytes: int, height: int) -> int:
    """One past the last byte a ``height``-row frame touches: ``offset + pitch*(h-1) + w``.

    Zero-height or zero-width frames touch nothing and end at ``offset``.
    """
    if height <= 0 or width_bytes <= 0:
        return offset
    return offset + pitch * (height - 1) + width_bytes


def _byte_view(buf: ReadableBuffer) -> memoryview:
    """A flat unsigned-byte view of ``buf`` (the caller releases it)."""
    with memoryview(buf) as view:
        return view.cast("B")


def _check_geometry(
    what: str, size: int, offset: int, pitch: int, width_bytes: int, height: int
) -> None:
    if offset < 0 or pitch < 0 or width_bytes < 0 or height < 0:
        raise ValueError(
            f"{what}: negative geometry (offset {offset}, pitch {pitch}, "
            f"width {width_bytes} bytes, height {height})"
        )
    if height > 1 and width_bytes > pitch:
        raise ValueError(f"{what}: rows of {width_bytes} bytes overlap at pitch {pitch}")
    end = frame_end(offset, pitch, width_bytes, height)
    if end > size:
        raise ValueError(
            f"{what}: frame ends at byte {end} (offset {offset} + pitch {pitch} x "
            f"{height - 1} + {width_bytes}) but the buffer holds {size} bytes"
        )


def copy_frame(
    src: ReadableBuffer,
    src_offset: int,
    src_pitch: int,
    dst: WritableBuffer,
    dst_offset: int,
    dst_pitch: int,
    width_bytes: int,
    height: int,
) -> None:
    """Copy ``height`` rows of ``width_bytes`` bytes from ``src`` into ``dst``.

    Row ``r`` starts at ``src_offset + r * src_pitch`` in ``src`` and at ``dst_offset + r *
    dst_pitch`` in ``dst``. Raises :class:`ValueError`, before touching anything, when either
    frame does not fit its buffer, any value is negative, rows would overlap
    (``width_bytes > pitch``) or ``dst`` is read-only. Equal pitches are copied as one span
    (including the bytes between rows), others as one strided copy; numpy releases the GIL
    while it copies, so other threads (the event loop) run meanwhile.
    """
    with _byte_view(src) as s, _byte_view(dst) as d:
        if d.readonly:
            raise ValueError("copy_frame: the destination buffer is read-only")
        _check_geometry("copy_frame source", len(s), src_offset, src_pitch, width_bytes, height)
        _check_geometry(
            "copy_frame destination", len(d), dst_offset, dst_pitch, width_bytes, height
        )
        if width_bytes == 0 or height == 0:
            return
        if src_pitch == dst_pitch:
            # One flat copy. numpy, not a memoryview slice assignment: numpy releases the GIL
            # while it copies (the backend copies in worker threads), a memoryview does not.
            span = frame_end(0, src_pitch, width_bytes, height)
            flat_dst = np.frombuffer(d, np.uint8, count=span, offset=dst_offset)
            np.copyto(flat_dst, np.frombuffer(s, np.uint8, count=span, offset=src_offset))
            del flat_dst
            return
        # Different pitches: one strided copy of two (height, width_bytes) views; numpy runs
        # the row loop in C (a Python loop of slice assignments reaches a third of memcpy).
        src_rows = np.lib.stride_tricks.as_strided(
            np.frombuffer(
                s, np.uint8, count=frame_end(0, src_pitch, width_bytes, height), offset=src_offset
            ),
            shape=(height, width_bytes),
            strides=(src_pitch, 1),
            writeable=False,
        )
        dst_rows = np.lib.stride_tricks.as_strided(
            np.frombuffer(
                d, np.uint8, count=frame_end(0, dst_pitch, width_bytes, height), offset=dst_offset
            ),
            shape=(height, width_bytes),
            strides=(dst_pitch, 1),
        )
        np.copyto(dst_rows, src_rows)
        del src_rows, dst_rows  # no view of either buffer outlives the call


def to_rgb(
    buf: ReadableBuffer,
    *,
    width: int,
    height: int,
    pitch: int,
    offset: int = 0,
    fourcc: int,
) -> RgbImage:
    """Decode a ``width``×``height`` frame of format ``fourcc`` into packed RGB.

    The frame starts ``offset`` bytes into ``buf`` with rows ``pitch`` bytes apart. Raises
    :class:`ValueError` for an unknown format, an odd ``YUYV`` width, or a frame that does not
    fit ``buf``. Only the bytes of the frame are read, once (a guest may change them meanwhile;
    the result is then some mix of old and new pixels, never an error).
    """
    try:
        fmt = PixelFormat(fourcc)
    except ValueError:
        raise ValueError(f"unknown pixel format 0x{fourcc:08x}") from None
    if width < 0 or height < 0:
        raise ValueError(f"negative frame size {width}x{height}")
    if fmt is PixelFormat.YUYV and width % 2:
        raise ValueError(f"YUYV needs an even width, not {width}")
    row_bytes = width * fmt.cpp
    with _byte_view(buf) as view:
        _check_geometry("to_rgb", len(view), offset, pitch, row_bytes, height)
        if width == 0 or height == 0:
            return RgbImage(width, height, b"")
        with view[offset : frame_end(offset, pitch, row_bytes, height)] as region:
            data = bytes(region)
    raw = _PILLOW_RAW.get(fmt)
    if raw is not None:
        image = Image.frombuffer("RGB", (width, height), data, "raw", raw, pitch, 1)
        return RgbImage(width, height, image.tobytes())
    rows = _rows(data, pitch, row_bytes, height)
    rgb = _yuyv_to_rgb(rows) if fmt is PixelFormat.YUYV else _packed16_to_rgb(rows, fmt)
    return RgbImage(width, height, rgb.tobytes())


def _rows(data: bytes, pitch: int, row_bytes: int, height: int) -> npt.NDArray[np.uint8]:
    """``data`` as a (height, row_bytes) array, dropping the bytes between rows."""
    flat = np.frombuffer(data, dtype=np.uint8)
    if pitch == row_bytes or height == 1:
        return flat[: row_bytes * height].reshape(height, row_bytes)
    # The last row has no padding after it: pad it so every row is a full pitch.
    padded = np.zeros(pitch * height, dtype=np.uint8)
    padded[: flat.size] = flat
    return padded.reshape(height, pitch)[:, :row_bytes]


def _widen(values: npt.NDArray[np.uint16], bits: int) -> npt.NDArray[np.uint8]:
    """``bits``-bit channel values widened to 8 bits by bit replication."""
    wide = (values << np.uint16(8 - bits)) | (values >> np.uint16(2 * bits - 8))
    return wide.astype(np.uint8)


def _packed16_to_rgb(rows: npt.NDArray[np.uint8], fmt: PixelFormat) -> npt.NDArray[np.uint8]:
    # Little-endian 16-bit words, one per pixel (a copy only when rows had padding).
    words = np.ascontiguousarray(rows).view(np.dtype("<u2")).astype(np.uint16, copy=False)
    out = np.empty((*words.shape, 3), dtype=np.uint8)
    for channel, (shift, bits) in enumerate(_PACKED16[fmt]):
        mask = np.uint16((1 << bits) - 1)
        out[..., channel] = _widen((words >> np.uint16(shift)) & mask, bits)
    return out


def _yuyv_to_rgb(rows: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    y = rows[:, 0::2].astype(np.float32) - 16.0
    u = np.repeat(rows[:, 1::4].astype(np.float32) - 128.0, 2, axis=1)
    v = np.repeat(rows[:, 3::4].astype(np.float32) - 128.0, 2, axis=1)
    luma = _Y_SCALE * y
    out = np.empty((*y.shape, 3), dtype=np.float32)
    out[..., 0] = luma + _R_V * v
    out[..., 1] = luma - _G_U * u - _G_V * v
    out[..., 2] = luma + _B_U * u
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
