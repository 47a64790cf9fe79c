"""Pixel formats decode to the RGB a screen shows; copy_frame moves rows and nothing else."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from displback.display.pixels import RgbImage, copy_frame, frame_end, to_rgb
from displback.protocol.constants import PixelFormat

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
GARBAGE = 0xA5


def frame(rows: list[list[bytes]], *, pitch: int, offset: int) -> bytes:
    """Pixels laid out at ``pitch`` from ``offset``, with garbage everywhere else."""
    out = bytearray([GARBAGE]) * (offset + pitch * len(rows) + 7)
    for y, row in enumerate(rows):
        data = b"".join(row)
        start = offset + y * pitch
        out[start : start + len(data)] = data
    return bytes(out)


def pixels(image: RgbImage) -> list[list[tuple[int, int, int]]]:
    return [[image.pixel(x, y) for x in range(image.width)] for y in range(image.height)]


def u16(*words: int) -> list[bytes]:
    return [struct.pack("<H", w) for w in words]


# (format, rows of encoded pixels, expected RGB rows). Two rows of two pixels each (four for
# YUYV), so row order, column order and channel order all show.
CASES = [
    (
        PixelFormat.XRGB8888,
        [
            [bytes((0, 0, 255, 0x11)), bytes((0, 255, 0, 0x22))],
            [bytes((255, 0, 0, 0x33)), bytes((0x30, 0x20, 0x10, 0))],
        ],
        [[RED, GREEN], [BLUE, (0x10, 0x20, 0x30)]],
    ),
    (
        PixelFormat.ARGB8888,  # alpha does not dim anything: a primary plane is not blended
        [
            [bytes((0, 0, 255, 0x00)), bytes((0, 255, 0, 0x80))],
            [bytes((255, 0, 0, 0xFF)), bytes((0x30, 0x20, 0x10, 0x40))],
        ],
        [[RED, GREEN], [BLUE, (0x10, 0x20, 0x30)]],
    ),
    (
        PixelFormat.RGB888,
        [[bytes((0, 0, 255)), bytes((0, 255, 0))], [bytes((255, 0, 0)), bytes((3, 2, 1))]],
        [[RED, GREEN], [BLUE, (1, 2, 3)]],
    ),
    (
        PixelFormat.RGB565,
        [u16(0xF800, 0x07E0), u16(0x001F, 0x8410)],
        # 0x8410: r=16 -> 16<<3|16>>2 = 132, g=32 -> 32<<2|32>>4 = 130, b=16 -> 132
        [[RED, GREEN], [BLUE, (132, 130, 132)]],
    ),
    (
        PixelFormat.XRGB4444,
        [u16(0xFF00, 0x00F0), u16(0x000F, 0xF842)],
        [[RED, GREEN], [BLUE, (0x88, 0x44, 0x22)]],
    ),
    (
        PixelFormat.ARGB4444,
        [u16(0x0F00, 0x70F0), u16(0xF00F, 0xF000)],
        [[RED, GREEN], [BLUE, BLACK]],
    ),
    (
        PixelFormat.XRGB1555,
        [u16(0x7C00, 0x03E0), u16(0x801F, 0x4210)],
        [[RED, GREEN], [BLUE, (132, 132, 132)]],
    ),
    (
        PixelFormat.ARGB1555,
        [u16(0xFC00, 0x83E0), u16(0x001F, 0x8000)],
        [[RED, GREEN], [BLUE, BLACK]],
    ),
    (
        PixelFormat.YUYV,
        # Y0 U Y1 V: black|white (neutral chroma), then a grey pair
        [
            [bytes((16, 128, 235, 128)), bytes((126, 128, 126, 128))],
            [bytes((235, 128, 16, 128)), bytes((16, 128, 16, 128))],
        ],
        # Y=126: (126-16)*255/219 = 128.08 -> 128
        [[BLACK, WHITE, (128, 128, 128), (128, 128, 128)], [WHITE, BLACK, BLACK, BLACK]],
    ),
]


@pytest.mark.parametrize(("fmt", "rows", "expected"), CASES, ids=[c[0].name for c in CASES])
def test_every_format_decodes_to_the_expected_rgb_at_any_pitch_and_offset(
    fmt: PixelFormat, rows: list[list[bytes]], expected: list[list[tuple[int, int, int]]]
) -> None:
    width = len(expected[0])
    row_bytes = width * fmt.cpp
    for pitch, offset in ((row_bytes, 0), (row_bytes + 3, 5), (row_bytes * 3, 4096)):
        buf = frame(rows, pitch=pitch, offset=offset)
        image = to_rgb(buf, width=width, height=2, pitch=pitch, offset=offset, fourcc=fmt)
        assert (image.width, image.height) == (width, 2)
        assert pixels(image) == expected, (pitch, offset)


def test_yuyv_decodes_saturated_colours_with_bt601_limited_range() -> None:
    # BT.601 limited-range encodings of pure red, green and blue (rounded).
    data = bytes((81, 90, 81, 240, 145, 54, 145, 34, 41, 240, 41, 110))
    image = to_rgb(data, width=6, height=1, pitch=12, fourcc=PixelFormat.YUYV)
    for x, colour in ((0, RED), (2, GREEN), (4, BLUE)):
        got = image.pixel(x, 0)
        assert all(abs(a - b) <= 3 for a, b in zip(got, colour, strict=True)), (x, got)
        assert image.pixel(x + 1, 0) == got  # the pair shares its chroma


def reference_packed16(word: int, fmt: PixelFormat) -> tuple[int, int, int]:
    """The DRM layout of reference §10, written out independently of the module."""

    def widen(v: int, bits: int) -> int:
        return round(v * 255 / ((1 << bits) - 1))

    if fmt is PixelFormat.RGB565:
        return widen(word >> 11, 5), widen((word >> 5) & 63, 6), widen(word & 31, 5)
    if fmt in (PixelFormat.XRGB1555, PixelFormat.ARGB1555):
        return widen((word >> 10) & 31, 5), widen((word >> 5) & 31, 5), widen(word & 31, 5)
    return widen((word >> 8) & 15, 4), widen((word >> 4) & 15, 4), widen(word & 15, 4)


PACKED16 = [
    PixelFormat.RGB565,
    PixelFormat.XRGB4444,
    PixelFormat.ARGB4444,
    PixelFormat.XRGB1555,
    PixelFormat.ARGB1555,
]


@given(st.sampled_from(PACKED16), st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=40))
def test_16_bit_formats_are_within_one_step_of_exact_scaling(
    fmt: PixelFormat, words: list[int]
) -> None:
    data = struct.pack(f"<{len(words)}H", *words)
    image = to_rgb(data, width=len(words), height=1, pitch=len(data), fourcc=fmt)
    for x, word in enumerate(words):
        got, want = image.pixel(x, 0), reference_packed16(word, fmt)
        # Bit replication is exact at 0 and full scale and within one step elsewhere.
        assert all(abs(a - b) <= 1 for a, b in zip(got, want, strict=True)), (hex(word), got)


def test_frame_that_does_not_fit_the_buffer_is_refused() -> None:
    fmt = PixelFormat.XRGB8888
    size = frame_end(8, 64, 16 * 4, 4)  # offset 8, pitch 64, 16 px, 4 rows
    assert size == 8 + 64 * 3 + 64
    buf = bytes(size)
    to_rgb(buf, width=16, height=4, pitch=64, offset=8, fourcc=fmt)  # exact fit
    with pytest.raises(ValueError, match="holds"):
        to_rgb(buf, width=16, height=4, pitch=64, offset=9, fourcc=fmt)
    with pytest.raises(ValueError, match="holds"):
        to_rgb(buf[:-1], width=16, height=4, pitch=64, offset=8, fourcc=fmt)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fourcc": 0x20202020}, "unknown pixel format"),
        ({"fourcc": PixelFormat.YUYV, "width": 3}, "even width"),
        ({"pitch": 4}, "overlap"),
        ({"offset": -1}, "negative"),
        ({"width": -2}, "negative"),
    ],
)
def test_bad_geometry_or_format_is_a_value_error(kwargs: dict[str, int], message: str) -> None:
    args = {"width": 2, "height": 2, "pitch": 8, "offset": 0, "fourcc": PixelFormat.XRGB8888}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        to_rgb(bytes(64), **args)


def test_rgb_image_writes_a_png_with_the_same_pixels(tmp_path: Path) -> None:
    data = frame(
        [[bytes((0, 0, 255, 0)), bytes((9, 8, 7, 0))], [bytes(4), bytes((255,) * 4)]],
        pitch=8,
        offset=0,
    )
    image = to_rgb(data, width=2, height=2, pitch=8, fourcc=PixelFormat.XRGB8888)
    path = tmp_path / "frame.png"
    image.write_png(path)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.mode == "RGB"
        assert png.size == (2, 2)
        assert png.tobytes() == image.rgb == bytes((255, 0, 0, 7, 8, 9, 0, 0, 0, 255, 255, 255))


def test_rgb_image_checks_its_size() -> None:
    with pytest.raises(ValueError):
        RgbImage(2, 2, bytes(11))
    with pytest.raises(IndexError):
        RgbImage(1, 1, bytes(3)).pixel(1, 0)


# -- copy_frame ---------------------------------------------------------------------------


def test_copy_frame_between_different_pitches_copies_rows_and_leaves_padding_alone() -> None:
    src = bytes(range(256)) * 2
    dst = bytearray(b"\xee") * 200
    copy_frame(src, 3, 50, dst, 10, 64, 20, 3)
    for row in range(3):
        assert dst[10 + 64 * row : 30 + 64 * row] == src[3 + 50 * row : 23 + 50 * row]
    expected_untouched = [
        i for i in range(200) if not any(10 + 64 * r <= i < 30 + 64 * r for r in range(3))
    ]
    assert all(dst[i] == 0xEE for i in expected_untouched)


def test_copy_frame_with_equal_pitches_copies_the_block() -> None:
    src = bytes(range(100))
    dst = bytearray(100)
    copy_frame(memoryview(src), 0, 10, memoryview(dst), 0, 10, 10, 10)
    assert dst == src


def test_copy_frame_reads_up_to_the_last_byte_of_an_exact_source_and_not_beyond() -> None:
    src = bytes(range(1, 1 + frame_end(2, 16, 5, 4)))  # exactly the frame, nothing after
    dst = bytearray(64)
    copy_frame(src, 2, 16, dst, 0, 16, 5, 4)
    assert dst[48:53] == src[-5:]
    with pytest.raises(ValueError, match="source"):
        copy_frame(src, 2, 16, dst, 0, 16, 6, 4)  # one byte too wide
    with pytest.raises(ValueError, match="source"):
        copy_frame(src, 3, 16, dst, 0, 20, 5, 4)  # one byte too far


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 8, 0, 8, 8, 9), "destination"),  # 9 rows of dst pitch 8 > 64 bytes
        ((0, 8, 60, 8, 8, 1), "destination"),
        ((-1, 8, 0, 8, 8, 1), "negative"),
        ((0, 8, 0, -8, 8, 1), "negative"),
        ((0, 4, 0, 8, 8, 2), "overlap"),
        ((0, 8, 0, 8, -1, 2), "negative"),
    ],
)
def test_copy_frame_refuses_geometry_that_does_not_fit_and_writes_nothing(
    args: tuple[int, int, int, int, int, int], message: str
) -> None:
    so, sp, do, dp, wb, h = args
    src, dst = bytes(range(128)), bytearray(64)
    with pytest.raises(ValueError, match=message):
        copy_frame(src, so, sp, dst, do, dp, wb, h)
    assert dst == bytearray(64)


def test_copy_frame_refuses_a_read_only_destination() -> None:
    with pytest.raises(ValueError, match="read-only"):
        copy_frame(bytes(8), 0, 8, memoryview(bytes(8)), 0, 8, 8, 1)


def test_copy_frame_of_nothing_is_a_no_op() -> None:
    dst = bytearray(4)
    copy_frame(b"", 0, 0, dst, 0, 0, 0, 5)
    copy_frame(b"abcd", 0, 4, dst, 0, 4, 4, 0)
    assert dst == bytearray(4)


@given(
    st.integers(0, 30),
    st.integers(0, 40),
    st.integers(0, 30),
    st.integers(0, 40),
    st.integers(0, 20),
    st.integers(0, 6),
    st.integers(0, 300),
    st.integers(0, 300),
)
def test_copy_frame_matches_a_byte_by_byte_copy_or_refuses(
    so: int, sp: int, do: int, dp: int, wb: int, h: int, src_len: int, dst_len: int
) -> None:
    src = bytes((i * 7 + 1) & 0xFF for i in range(src_len))
    dst = bytearray(dst_len)
    expected = bytearray(dst_len)
    fits = (
        all(h <= 1 or wb <= pitch for pitch in (sp, dp))
        and frame_end(so, sp, wb, h) <= src_len
        and frame_end(do, dp, wb, h) <= dst_len
    )
    if not fits:
        with pytest.raises(ValueError):
            copy_frame(src, so, sp, dst, do, dp, wb, h)
        assert dst == expected
        return
    for row in range(h):
        for i in range(wb):
            expected[do + row * dp + i] = src[so + row * sp + i]
    copy_frame(src, so, sp, dst, do, dp, wb, h)
    if sp == dp and wb > 0:  # one block: the bytes between rows come along too
        for row in range(h - 1):
            for i in range(wb, sp):
                expected[do + row * dp + i] = src[so + row * sp + i]
    assert dst == expected
