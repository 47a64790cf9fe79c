"""The simulated guest's test pattern: a deterministic picture per (connector, frame), drawn in
any pixel format of reference §10 and recognisable again from a snapshot.

The drawing mode of :class:`~displback.sim.guest.SimGuest` paints one of these per frame, so a
test (or a person looking at a PNG of the backend's output) can tell which connector a frame
came from and which frame it is, and can see motion.

Layout, top to bottom, for a ``width`` x ``height`` frame:

* rows ``[0, 5h/8)``: eight vertical colour bars (white, yellow, cyan, green, magenta, red,
  blue, black), static;
* rows ``[5h/8, 6h/8)``: a black band with a white square box moving right by
  :data:`BOX_STEP` pixels per frame (wrapping);
* rows ``[6h/8, h)``: :data:`CELLS` cells of equal width: the first :data:`CONNECTOR_BITS`
  spell the connector index, the rest the frame number (low bits), least significant bit
  first, white = 1, black = 0.

Every channel value is 0 or 255, which all RGB formats store exactly (DRM widens by bit
replication), so :func:`decode_pattern` reads the cells back by thresholding at 128 even from
16-bit formats or YUYV.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt

from displback.protocol.constants import PixelFormat

__all__ = [
    "BOX_STEP",
    "CELLS",
    "CONNECTOR_BITS",
    "FRAME_BITS",
    "decode_pattern",
    "draw_pattern",
    "encode_rgb",
    "pattern_rgb",
]

BOX_STEP = 8
CELLS = 24
CONNECTOR_BITS = 4
FRAME_BITS = CELLS - CONNECTOR_BITS

_BARS = np.array(
    [
        (255, 255, 255),
        (255, 255, 0),
        (0, 255, 255),
        (0, 255, 0),
        (255, 0, 255),
        (255, 0, 0),
        (0, 0, 255),
        (0, 0, 0),
    ],
    dtype=np.uint8,
)

RgbArray = npt.NDArray[np.uint8]


def _bands(height: int) -> tuple[int, int]:
    return (5 * height) // 8, (6 * height) // 8


@functools.lru_cache(maxsize=16)
def _static_part(width: int, height: int) -> RgbArray:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    bars_end, _ = _bands(height)
    columns = (np.arange(width) * len(_BARS)) // max(width, 1)
    image[:bars_end] = _BARS[columns][np.newaxis, :, :]
    image.setflags(write=False)
    return image


def _box_size(width: int, height: int) -> int:
    bars_end, box_end = _bands(height)
    return max(1, min(box_end - bars_end, width // 4))


def pattern_rgb(width: int, height: int, connector: int, frame: int) -> RgbArray:
    """The pattern as an ``(height, width, 3)`` uint8 RGB array."""
    if width <= 0 or height <= 0:
        raise ValueError(f"empty frame {width}x{height}")
    image = _static_part(width, height).copy()
    bars_end, box_end = _bands(height)
    if box_end > bars_end:
        size = _box_size(width, height)
        span = max(1, width - size + 1)
        x = (frame * BOX_STEP) % span
        image[bars_end : bars_end + size, x : x + size] = 255
    cell = width // CELLS
    if cell and height > box_end:
        value = (connector % (1 << CONNECTOR_BITS)) | (
            (frame % (1 << FRAME_BITS)) << CONNECTOR_BITS
        )
        for bit in range(CELLS):
            if value >> bit & 1:
                image[box_end:, bit * cell : (bit + 1) * cell] = 255
    return image


def decode_pattern(image: RgbArray) -> tuple[int, int]:
    """Read ``(connector, frame mod 2**FRAME_BITS)`` back from a pattern (RGB array)."""
    height, width = image.shape[:2]
    _, box_end = _bands(height)
    cell = width // CELLS
    if not cell or height <= box_end:
        raise ValueError(f"a {width}x{height} frame has no counter cells")
    row = image[(box_end + height) // 2]
    value = 0
    for bit in range(CELLS):
        if int(row[bit * cell + cell // 2].mean()) >= 128:
            value |= 1 << bit
    return value % (1 << CONNECTOR_BITS), value >> CONNECTOR_BITS


def encode_rgb(image: RgbArray, fmt: PixelFormat) -> RgbArray:
    """RGB → the bytes of one frame in ``fmt``: ``(height, width * cpp)`` uint8, rows packed.

    X/A channels are written as all ones. YUYV uses BT.601 limited range, the chroma of each
    pixel pair averaged; the width must then be even.
    """
    r = image[..., 0].astype(np.uint32)
    g = image[..., 1].astype(np.uint32)
    b = image[..., 2].astype(np.uint32)
    height, width = image.shape[:2]
    if fmt in (PixelFormat.XRGB8888, PixelFormat.ARGB8888):
        words = (0xFF << 24) | (r << 16) | (g << 8) | b
        return words.astype("<u4").view(np.uint8).reshape(height, width * 4)
    if fmt is PixelFormat.RGB888:
        return np.stack([b, g, r], axis=-1).astype(np.uint8).reshape(height, width * 3)
    if fmt is PixelFormat.RGB565:
        half = ((r >> 3) << 11) | ((g >> 2) << 5) | (b >> 3)
    elif fmt in (PixelFormat.XRGB4444, PixelFormat.ARGB4444):
        half = (0xF << 12) | ((r >> 4) << 8) | ((g >> 4) << 4) | (b >> 4)
    elif fmt in (PixelFormat.XRGB1555, PixelFormat.ARGB1555):
        half = (1 << 15) | ((r >> 3) << 10) | ((g >> 3) << 5) | (b >> 3)
    elif fmt is PixelFormat.YUYV:
        if width % 2:
            raise ValueError("YUYV needs an even width")
        rf, gf, bf = (c.astype(np.float64) for c in (r, g, b))
        y = 16 + (65.481 * rf + 128.553 * gf + 24.966 * bf) / 255
        u = 128 + (-37.797 * rf - 74.203 * gf + 112.0 * bf) / 255
        v = 128 + (112.0 * rf - 93.786 * gf - 18.214 * bf) / 255
        out = np.empty((height, width * 2), dtype=np.uint8)
        out[:, 0::2] = np.clip(np.rint(y), 0, 255).astype(np.uint8)
        out[:, 1::4] = np.clip(np.rint((u[:, 0::2] + u[:, 1::2]) / 2), 0, 255).astype(np.uint8)
        out[:, 3::4] = np.clip(np.rint((v[:, 0::2] + v[:, 1::2]) / 2), 0, 255).astype(np.uint8)
        return out
    else:  # pragma: no cover - PixelFormat is closed
        raise ValueError(f"unsupported format {fmt!r}")
    return half.astype("<u2").view(np.uint8).reshape(height, width * 2)


def draw_pattern(
    buffer: memoryview,
    *,
    width: int,
    height: int,
    pitch: int,
    fmt: PixelFormat,
    connector: int,
    frame: int,
    offset: int = 0,
) -> None:
    """Paint the pattern into ``buffer`` (writable) at ``offset`` with ``pitch`` bytes per row.

    Raises ``ValueError`` if the frame does not fit; no view of ``buffer`` outlives the call.
    """
    row_bytes = width * fmt.cpp
    if pitch < row_bytes or offset < 0 or offset + pitch * (height - 1) + row_bytes > len(buffer):
        raise ValueError(f"{width}x{height} {fmt.name} at pitch {pitch} does not fit the buffer")
    pixels = encode_rgb(pattern_rgb(width, height, connector, frame), fmt)
    view = memoryview(buffer).cast("B")
    try:
        if pitch == row_bytes:
            view[offset : offset + row_bytes * height] = pixels.tobytes()
        else:
            for row in range(height):
                start = offset + row * pitch
                view[start : start + row_bytes] = pixels[row].tobytes()
    finally:
        view.release()
