"""EDID blocks for guest connectors: conformant to edid-decode, preferred mode exact."""

import re
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from displback.protocol.edid import EdidError, build_edid, cvt_rb_timing

EDID_DECODE = shutil.which("edid-decode")


def decode(edid: bytes) -> str:
    assert EDID_DECODE, "edid-decode is missing: `make test` installs the Debian package"
    proc = subprocess.run(
        [EDID_DECODE, "--check", "-"], input=edid, capture_output=True, timeout=30
    )
    return proc.stdout.decode() + proc.stderr.decode()


def test_1080p_timing_is_the_standard_cvt_reduced_blanking_mode() -> None:
    t = cvt_rb_timing(1920, 1080)
    assert (t.h_blank, t.h_front, t.h_sync, t.v_front, t.v_sync) == (160, 48, 32, 3, 5)
    assert t.clock_khz == 138_500  # VESA CVT-RB 1920x1080@60: 138.5 MHz
    assert 59.9 < t.refresh_hz < 60.1


def test_block_is_128_bytes_with_header_version_and_checksum() -> None:
    edid = build_edid(1024, 768)
    assert len(edid) == 128
    assert edid[:8] == bytes.fromhex("00ffffffffffff00")
    assert edid[18:20] == b"\x01\x04"
    assert sum(edid) % 256 == 0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4095), st.integers(1, 2047))
def test_every_guest_resolution_gives_a_conformant_edid(width: int, height: int) -> None:
    report = decode(build_edid(width, height))
    assert "EDID conformity: PASS" in report, report
    match = re.search(r"DTD 1:\s+(\d+)x(\d+)\s+([\d.]+) Hz", report)
    assert match, report
    assert (int(match[1]), int(match[2])) == (width, height)
    assert 59.0 < float(match[3]) < 61.0


@pytest.mark.parametrize("size", [(0, 600), (800, 0), (4096, 600), (800, 4096)])
def test_resolutions_a_timing_cannot_hold_are_refused(size: tuple[int, int]) -> None:
    with pytest.raises(EdidError):
        build_edid(*size)
