"""Our evdev/uinput numbers and layouts against Linux's uapi headers, compiled at test time
(a missing compiler or header fails: `make apt-deps` installs them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from displback.evdev import uapi
from tests.golden import GoldenUnavailable, compile_and_run

SOURCE = Path(__file__).resolve().parents[1] / "golden" / "evdev_golden.c"
HEADERS = [Path("/usr/include/linux/input.h"), Path("/usr/include/linux/uinput.h")]


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    result = compile_and_run(
        SOURCE,
        what="evdev golden-vector program",
        cflags=["-std=c11", "-Wall", "-Wextra"],
        headers=HEADERS,
        hint="run `make apt-deps` (installs gcc and linux-libc-dev)",
    )
    if isinstance(result, GoldenUnavailable):
        raise result
    return result


def test_struct_sizes_match_the_header(golden: dict[str, Any]) -> None:
    assert golden["sizes"] == uapi.SIZES


@pytest.mark.parametrize("name", sorted(uapi.IOCTLS))
def test_ioctl_numbers_match_the_header(name: str, golden: dict[str, Any]) -> None:
    assert golden["ioctls"][name] == uapi.IOCTLS[name]


def test_event_codes_match_the_header(golden: dict[str, Any]) -> None:
    for name, value in golden["codes"].items():
        assert getattr(uapi, name) == value, name


def test_a_read_yields_whole_events_only() -> None:
    data = uapi.pack_event(uapi.EV_KEY, 30, 1) + uapi.pack_event(uapi.EV_SYN, 0, 0)
    assert uapi.parse_events(data + data[:10]) == [(uapi.EV_KEY, 30, 1), (uapi.EV_SYN, 0, 0)]
