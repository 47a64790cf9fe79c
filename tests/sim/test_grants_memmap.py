"""Contiguous page mappings show exactly the requested frames, in order, as shared memory."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from displback.sim.memmap import PageMapping, runs_of

FRAMES = 16


@pytest.fixture(scope="module")
def ram() -> Iterator[int]:
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, FRAMES * 4096)
    for pfn in range(FRAMES):
        os.pwrite(fd, pfn.to_bytes(2, "little") * 2048, pfn * 4096)
    yield fd
    os.close(fd)


@settings(max_examples=60, deadline=None)
@given(pfns=st.lists(st.integers(0, FRAMES - 1), min_size=1, max_size=24))
def test_any_frame_list_maps_in_order(ram: int, pfns: list[int]) -> None:
    with PageMapping(ram, pfns, writable=False) as mapping:
        buf = mapping.buffer
        assert len(buf) == len(pfns) * 4096
        for index, pfn in enumerate(pfns):
            assert buf[index * 4096 : index * 4096 + 2] == pfn.to_bytes(2, "little")
            assert buf[index * 4096 + 4094 : index * 4096 + 4096] == pfn.to_bytes(2, "little")


@given(pfns=st.lists(st.integers(0, 1000), max_size=40))
def test_runs_cover_the_list_with_consecutive_frames(pfns: list[int]) -> None:
    rebuilt: list[int] = []
    for index, first, length in runs_of(pfns):
        assert index == len(rebuilt)
        rebuilt.extend(range(first, first + length))
    assert rebuilt == pfns


def test_writes_land_in_the_file_and_other_mappings(ram: int) -> None:
    with PageMapping(ram, [3, 9], writable=True) as a, PageMapping(ram, [9], writable=True) as b:
        a.buffer[4096 + 100] = 0xEE
        assert b.buffer[100] == 0xEE
        assert os.pread(ram, 1, 9 * 4096 + 100) == b"\xee"
        a.buffer[4096 + 100] = 9  # restore (frame 9 holds u16 9 repeated)


def test_empty_frame_list_is_einval(ram: int) -> None:
    with pytest.raises(OSError):
        PageMapping(ram, [], writable=True)


def test_closed_mapping_refuses_further_use(ram: int) -> None:
    mapping = PageMapping(ram, [0], writable=True)
    mapping.close()
    assert mapping.closed
    with pytest.raises(ValueError):
        _ = mapping.buffer
    mapping.close()  # idempotent
