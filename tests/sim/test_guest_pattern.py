"""The guest's test pattern: deterministic, moving, and readable back in every format."""

from __future__ import annotations

import numpy as np
import pytest

from displback.display.pixels import to_rgb
from displback.protocol.constants import PixelFormat
from displback.sim.guest_pattern import (
    BOX_STEP,
    FRAME_BITS,
    decode_pattern,
    draw_pattern,
    pattern_rgb,
)


@pytest.mark.parametrize("fmt", list(PixelFormat))
def test_pattern_survives_every_format_and_decodes_to_connector_and_frame(
    fmt: PixelFormat,
) -> None:
    width, height, pitch = 96, 48, 96 * fmt.cpp + 12  # padded rows too
    memory = bytearray(pitch * height + 64)
    draw_pattern(memoryview(memory), width=width, height=height, pitch=pitch, fmt=fmt,
                 connector=2, frame=1234, offset=64)
    image = to_rgb(memory, width=width, height=height, pitch=pitch, offset=64, fourcc=fmt)
    rgb = np.frombuffer(image.rgb, dtype=np.uint8).reshape(height, width, 3)
    assert decode_pattern(rgb) == (2, 1234)
    if fmt is not PixelFormat.YUYV:  # exact for every RGB format (channels are 0 or 255)
        assert image.rgb == pattern_rgb(width, height, 2, 1234).tobytes()


def test_pattern_moves_and_is_deterministic() -> None:
    a, b = pattern_rgb(64, 32, 0, 10), pattern_rgb(64, 32, 0, 11)
    assert np.array_equal(a, pattern_rgb(64, 32, 0, 10))
    moved = np.argwhere((a != b).any(axis=2))
    assert moved.size and (moved[:, 0] >= 20).all()  # bars are static
    assert decode_pattern(pattern_rgb(64, 32, 1, 2**FRAME_BITS + 3)) == (1, 3)
    assert BOX_STEP > 0


def test_draw_refuses_a_frame_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        draw_pattern(memoryview(bytearray(100)), width=10, height=10, pitch=40,
                     fmt=PixelFormat.XRGB8888, connector=0, frame=0)
