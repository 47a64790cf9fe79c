"""EDID 1.4 blocks describing a guest connector, for GET_EDID and the virtual display.

A guest that asks for an EDID learns its connector's resolution from it (the spec says its
modes take precedence over XenStore's ``resolution``), so the preferred detailed timing must
be exactly that resolution at 60 Hz. Timings follow VESA CVT reduced blanking (v1), which
every modern sink and ``edid-decode`` accept; pure computation, no I/O.
"""

from __future__ import annotations

import math
import struct

__all__ = [
    "MAX_HEIGHT",
    "MAX_PIXEL_CLOCK_KHZ",
    "MAX_WIDTH",
    "EdidError",
    "build_edid",
    "check_resolution",
    "cvt_rb_timing",
]

EDID_HEADER = bytes((0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00))
# Detailed timing descriptors hold 12-bit active sizes.
MAX_WIDTH = 4095
MAX_HEIGHT = 4095
# Pixel clock in a DTD is a u16 in 10 kHz units.
MAX_PIXEL_CLOCK_KHZ = 0xFFFF * 10
_MAX_CLOCK_KHZ = MAX_PIXEL_CLOCK_KHZ
_MIN_CLOCK_KHZ = 10_000
_MAX_BLANK = 4095
_REFRESH_HZ = 60
_PIXEL_PITCH_MM = 0.2646  # 96 dpi: the physical size a guest derives its DPI from

# sRGB chromaticity (red, green, blue, white x/y), 10-bit fractions of 1024.
_SRGB = ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060), (0.3127, 0.3290))


class EdidError(ValueError):
    """A resolution that cannot be described by an EDID 1.4 detailed timing."""


class Timing:
    """One video timing: active/blanking/sync sizes and the pixel clock."""

    __slots__ = (
        "clock_khz",
        "h_active",
        "h_blank",
        "h_front",
        "h_sync",
        "v_active",
        "v_blank",
        "v_front",
        "v_sync",
    )

    def __init__(
        self,
        *,
        clock_khz: int,
        h_active: int,
        h_blank: int,
        h_front: int,
        h_sync: int,
        v_active: int,
        v_blank: int,
        v_front: int,
        v_sync: int,
    ) -> None:
        self.clock_khz = clock_khz
        self.h_active = h_active
        self.h_blank = h_blank
        self.h_front = h_front
        self.h_sync = h_sync
        self.v_active = v_active
        self.v_blank = v_blank
        self.v_front = v_front
        self.v_sync = v_sync

    @property
    def refresh_hz(self) -> float:
        total = (self.h_active + self.h_blank) * (self.v_active + self.v_blank)
        return self.clock_khz * 1000 / total

    @property
    def h_freq_khz(self) -> float:
        return self.clock_khz / (self.h_active + self.h_blank)


def _vsync_lines(width: int, height: int) -> int:
    """CVT's vertical sync width encodes the aspect ratio (4:3 → 4 … 15:9 → 7, else 10)."""
    for (num, den), lines in (((4, 3), 4), ((16, 9), 5), ((16, 10), 6), ((5, 4), 7), ((15, 9), 7)):
        if width * den == height * num:
            return lines
    return 10


def cvt_rb_timing(width: int, height: int, refresh_hz: int = _REFRESH_HZ) -> Timing:
    """VESA CVT reduced-blanking (v1) timing for ``width`` × ``height`` at ``refresh_hz``."""
    if not (1 <= width <= MAX_WIDTH and 1 <= height <= MAX_HEIGHT):
        raise EdidError(f"resolution {width}x{height} outside 1x1..{MAX_WIDTH}x{MAX_HEIGHT}")
    h_active = width  # CVT rounds to 8-pixel cells; a guest needs its exact width
    rb_min_vblank_us = 460.0
    v_front, v_back_min = 3, 6
    v_sync = _vsync_lines(width, height)
    h_period_us = (1_000_000.0 / refresh_hz - rb_min_vblank_us) / height
    vbi_lines = math.ceil(rb_min_vblank_us / h_period_us) if h_period_us > 0 else height
    v_blank = max(vbi_lines, v_front + v_sync + v_back_min)
    h_blank, h_sync = 160, 32
    h_front = 48
    # EDID cannot describe pixel clocks under 10 MHz: small modes get a longer back porch
    # (and, if that is not enough, more blank lines) rather than an invalid timing.
    min_total = math.ceil(_MIN_CLOCK_KHZ * 1000 / refresh_hz)
    if (h_active + h_blank) * (height + v_blank) < min_total:
        wanted = math.ceil(min_total / (height + v_blank)) - h_active
        h_blank = min(_MAX_BLANK, max(h_blank, wanted))
        if (h_active + h_blank) * (height + v_blank) < min_total:
            v_blank = min(_MAX_BLANK, math.ceil(min_total / (h_active + h_blank)) - height)
    total_pixels = (h_active + h_blank) * (height + v_blank)
    # CVT rounds the clock down to 0.25 MHz steps; never below what the refresh needs - 1 %.
    exact_khz = refresh_hz * total_pixels / 1000
    clock_khz = int(exact_khz // 250 * 250)
    if clock_khz < exact_khz * 0.995:  # small modes: 10 kHz steps keep the refresh near 60 Hz
        clock_khz = int(exact_khz // 10 * 10)
    clock_khz = max(_MIN_CLOCK_KHZ, clock_khz)
    if clock_khz > _MAX_CLOCK_KHZ:
        raise EdidError(f"pixel clock {clock_khz} kHz for {width}x{height} exceeds EDID's limit")
    return Timing(
        clock_khz=clock_khz,
        h_active=h_active,
        h_blank=h_blank,
        h_front=h_front,
        h_sync=h_sync,
        v_active=height,
        v_blank=v_blank,
        v_front=v_front,
        v_sync=v_sync,
    )


def check_resolution(width: int, height: int) -> None:
    """Raise :class:`EdidError` unless a connector of ``width`` × ``height`` can be served.

    This is the one limit on connector and output resolutions (checked where a value enters:
    the toolstack's ``resolution`` node, the daemon's configuration), because every connector
    answers GET_EDID with a 60 Hz mode of exactly its resolution: sides 1..4095 (a detailed
    timing holds 12 bits) and a pixel clock of at most 655.35 MHz. Every size up to Linux's
    own limit (4095×2047) fits, and 3840×2400 too; 4096×2160 and 4095×4095 do not.
    """
    try:
        cvt_rb_timing(width, height)
    except EdidError as exc:
        raise EdidError(
            f"{width}x{height} cannot be described to a guest: {exc} (sides 1..{MAX_WIDTH} x "
            f"1..{MAX_HEIGHT}, pixel clock at 60 Hz at most {MAX_PIXEL_CLOCK_KHZ / 1000:g} MHz)"
        ) from None


def _manufacturer_id(letters: str) -> bytes:
    """Three letters A–Z packed five bits each, big-endian (PNP ID)."""
    value = 0
    for ch in letters:
        value = (value << 5) | (ord(ch) - ord("A") + 1)
    return struct.pack(">H", value)


def _detailed_timing(t: Timing, width_mm: int, height_mm: int) -> bytes:
    h_back = t.h_blank - t.h_front - t.h_sync
    assert h_back > 0
    flags = 0x18 | 0x02  # digital separate sync; CVT-RB: hsync +, vsync −
    return bytes(
        (
            (t.clock_khz // 10) & 0xFF,
            (t.clock_khz // 10) >> 8,
            t.h_active & 0xFF,
            t.h_blank & 0xFF,
            ((t.h_active >> 8) << 4) | (t.h_blank >> 8),
            t.v_active & 0xFF,
            t.v_blank & 0xFF,
            ((t.v_active >> 8) << 4) | (t.v_blank >> 8),
            t.h_front & 0xFF,
            t.h_sync & 0xFF,
            ((t.v_front & 0xF) << 4) | (t.v_sync & 0xF),
            ((t.h_front >> 8) << 6)
            | ((t.h_sync >> 8) << 4)
            | ((t.v_front >> 4) << 2)
            | (t.v_sync >> 4),
            width_mm & 0xFF,
            height_mm & 0xFF,
            ((width_mm >> 8) << 4) | (height_mm >> 8),
            0,
            0,
            flags,
        )
    )


def _text_descriptor(tag: int, text: str) -> bytes:
    body = text.encode("ascii", "replace")[:13]
    if len(body) < 13:
        body += b"\n" + b" " * (12 - len(body))
    return bytes((0, 0, 0, tag, 0)) + body


def _range_limits(t: Timing) -> bytes:
    v_min, v_max = 50, 75
    h_khz = t.h_freq_khz
    h_min = max(1, math.floor(h_khz * v_min / _REFRESH_HZ))
    h_max = min(255, math.ceil(h_khz * v_max / _REFRESH_HZ))
    max_clock_10mhz = min(255, math.ceil(t.clock_khz * v_max / _REFRESH_HZ / 10_000))
    body = bytes((v_min, v_max, h_min, h_max, max_clock_10mhz, 0x01)) + b"\n" + b" " * 6
    return bytes((0, 0, 0, 0xFD, 0)) + body


def _chromaticity() -> bytes:
    vals = [(round(x * 1024), round(y * 1024)) for x, y in _SRGB]
    (rx, ry), (gx, gy), (bx, by), (wx, wy) = vals
    lo1 = ((rx & 3) << 6) | ((ry & 3) << 4) | ((gx & 3) << 2) | (gy & 3)
    lo2 = ((bx & 3) << 6) | ((by & 3) << 4) | ((wx & 3) << 2) | (wy & 3)
    return bytes((lo1, lo2, rx >> 2, ry >> 2, gx >> 2, gy >> 2, bx >> 2, by >> 2, wx >> 2, wy >> 2))


def build_edid(
    width: int,
    height: int,
    *,
    name: str = "displback",
    serial: int = 0,
    product: int = 0x0001,
    year: int = 2026,
) -> bytes:
    """A 128-byte EDID 1.4 base block whose preferred mode is ``width``×``height`` @ 60 Hz."""
    timing = cvt_rb_timing(width, height)
    # Square pixels at 96 dpi, but never under 10 cm a side (sinks take that for bogus) and
    # within what the cm fields hold; the DTD's mm size must agree with the cm size.
    pitch = max(_PIXEL_PITCH_MM, 100 / width, 100 / height)
    width_mm = min(2550, max(100, round(width * pitch)))
    height_mm = min(2550, max(100, round(height * pitch)))
    out = bytearray(EDID_HEADER)
    out += _manufacturer_id("XDB")
    out += struct.pack("<HI", product & 0xFFFF, serial & 0xFFFFFFFF)
    out += bytes((0, max(0, min(255, year - 1990)), 1, 4))
    out += bytes((0xA5,))  # digital, 8 bits per colour, DisplayPort-like interface
    out += bytes((round(width_mm / 10), round(height_mm / 10)))
    out += bytes((120,))  # gamma 2.2
    out += bytes((0x06,))  # RGB 4:4:4, sRGB default colour space, preferred mode is native
    out += _chromaticity()
    out += bytes(3)  # no established timings
    out += b"\x01\x01" * 8  # no standard timings
    out += _detailed_timing(timing, width_mm, height_mm)
    out += _range_limits(timing)
    out += _text_descriptor(0xFC, name)
    out += _text_descriptor(0xFF, f"{serial:08d}")
    out += bytes((0,))  # no extension blocks
    out.append((-sum(out)) & 0xFF)
    assert len(out) == 128
    return bytes(out)
