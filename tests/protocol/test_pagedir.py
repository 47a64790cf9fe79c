"""Directory reader, filler and builder agree; every bad chain becomes a ProtocolError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from displback.protocol.constants import EINVAL, GREFS_PER_DIR_PAGE, PAGE_SIZE
from displback.protocol.errors import ProtocolError
from displback.protocol.pagedir import (
    DEFAULT_MAX_REFS,
    DirectoryFiller,
    DirectoryReader,
    build_directory,
    dir_pages_for,
)

SIZES = [0, 1, 1022, 1023, 1024, 2025, 8100]


def make_grefs(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def chain(npages: int, start: int = 10) -> list[int]:
    return list(range(start, start + npages))


def read_all(reader: DirectoryReader, pages: dict[int, bytes]) -> tuple[int, ...]:
    while (gref := reader.next_page_gref) is not None:
        reader.feed(pages[gref])
    return reader.refs


def directory(n: int) -> tuple[list[int], list[int], dict[int, bytes]]:
    refs = make_grefs(n)
    dirs = chain(dir_pages_for(n))
    return refs, dirs, dict(zip(dirs, build_directory(refs, dirs), strict=True))


def set_u32(page: bytes, offset: int, value: int) -> bytes:
    buf = bytearray(page)
    struct.pack_into("<I", buf, offset, value)
    return bytes(buf)


# --- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("npages", "expected"),
    [(0, 0), (1, 1), (1022, 1), (1023, 1), (1024, 2), (2025, 2), (8100, 8), (65536, 65)],
)
def test_dir_pages_for_is_ceil_of_1023(npages: int, expected: int) -> None:
    assert dir_pages_for(npages) == expected


def test_1080p_buffer_needs_two_directory_pages_as_in_the_reference() -> None:
    assert dir_pages_for(8_294_400 // PAGE_SIZE + (8_294_400 % PAGE_SIZE > 0)) == 2


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_build_then_read_returns_the_same_refs(n: int) -> None:
    refs, dirs, pages = directory(n)
    assert len(pages) == dir_pages_for(n)
    assert all(len(p) == PAGE_SIZE for p in pages.values())
    reader = DirectoryReader(dirs[0] if dirs else 0, n)
    assert read_all(reader, pages) == tuple(refs)
    assert reader.dir_grefs == frozenset(dirs)


def test_last_page_links_to_zero_and_others_link_onwards() -> None:
    dirs = [7, 9, 11]
    pages = build_directory(make_grefs(2100), dirs)
    nexts = [struct.unpack_from("<I", p, 0)[0] for p in pages]
    assert nexts == [9, 11, 0]


def test_reader_maps_pages_in_chain_order() -> None:
    refs, dirs, pages = directory(3000)
    reader = DirectoryReader(dirs[0], 3000)
    order = []
    while (gref := reader.next_page_gref) is not None:
        order.append(gref)
        reader.feed(memoryview(pages[gref]))
    assert order == dirs


@pytest.mark.parametrize("n", SIZES)
def test_filler_then_reader_agree(n: int) -> None:
    dirs = chain(dir_pages_for(n))
    # Backend-allocated mode: the guest wrote only the chain.
    guest_pages = {
        g: bytearray(p) for g, p in zip(dirs, build_directory([0] * n, dirs), strict=True)
    }
    ours = make_grefs(n, start=50_000)
    filler = DirectoryFiller(dirs[0] if dirs else 0, ours)
    while (gref := filler.next_page_gref) is not None:
        filler.fill(guest_pages[gref])
    assert filler.done
    reader = DirectoryReader(dirs[0] if dirs else 0, n)
    assert read_all(reader, {g: bytes(p) for g, p in guest_pages.items()}) == tuple(ours)


def test_filler_writes_only_the_needed_slots_and_never_the_link() -> None:
    page = bytearray(PAGE_SIZE)
    page[:] = b"\xaa" * PAGE_SIZE
    struct.pack_into("<I", page, 0, 0)
    filler = DirectoryFiller(5, [1, 2, 3])
    filler.fill(page)
    assert struct.unpack_from("<4I", page, 0) == (0, 1, 2, 3)
    assert page[16:] == b"\xaa" * (PAGE_SIZE - 16)


@given(
    n=st.integers(min_value=0, max_value=5000),
    data=st.data(),
)
@settings(max_examples=40, deadline=None)
def test_round_trip_for_random_sizes_and_grefs(n: int, data: st.DataObject) -> None:
    npages = dir_pages_for(n)
    grefs = data.draw(
        st.lists(
            st.integers(min_value=1, max_value=0xFFFFFFFF),
            min_size=n + npages,
            max_size=n + npages,
            unique=True,
        )
    )
    dirs, refs = grefs[:npages], grefs[npages:]
    pages = dict(zip(dirs, build_directory(refs, dirs), strict=True))
    assert read_all(DirectoryReader(dirs[0] if dirs else 0, n), pages) == tuple(refs)


# --- rejected chains --------------------------------------------------------------------------


def expect_einval(reader: DirectoryReader, pages: dict[int, bytes], what: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        read_all(reader, pages)
    assert exc.value.errno == EINVAL
    assert exc.value.what == what
    assert reader.next_page_gref is None
    assert not reader.done


def test_first_gref_zero_is_rejected() -> None:
    with pytest.raises(ProtocolError) as exc:
        DirectoryReader(0, 1)
    assert exc.value.what == "gref_directory"
    assert exc.value.errno == EINVAL


def test_empty_directory_needs_no_page_and_ignores_first_gref() -> None:
    reader = DirectoryReader(0, 0)
    assert reader.next_page_gref is None
    assert reader.refs == ()


def test_premature_end_of_chain_is_rejected() -> None:
    refs, dirs, pages = directory(2025)
    pages[dirs[0]] = set_u32(pages[dirs[0]], 0, 0)
    expect_einval(DirectoryReader(dirs[0], 2025), pages, "gref_dir_next_page")


def test_nonzero_link_on_last_page_is_rejected() -> None:
    refs, dirs, pages = directory(1024)
    pages[dirs[1]] = set_u32(pages[dirs[1]], 0, 77)
    pages[77] = build_directory([5], [77])[0]
    expect_einval(DirectoryReader(dirs[0], 1024), pages, "gref_dir_next_page")


def test_single_page_linking_to_itself_is_rejected() -> None:
    refs, dirs, pages = directory(5)
    pages[dirs[0]] = set_u32(pages[dirs[0]], 0, dirs[0])
    expect_einval(DirectoryReader(dirs[0], 5), pages, "gref_dir_next_page")


def test_loop_back_to_an_earlier_directory_page_is_rejected() -> None:
    refs, dirs, pages = directory(8100)
    pages[dirs[3]] = set_u32(pages[dirs[3]], 0, dirs[1])
    expect_einval(DirectoryReader(dirs[0], 8100), pages, "gref_dir_next_page")


def test_directory_page_that_is_also_a_buffer_page_is_rejected() -> None:
    refs, dirs, pages = directory(2025)
    pages[dirs[0]] = set_u32(pages[dirs[0]], 0, refs[5])
    expect_einval(DirectoryReader(dirs[0], 2025), pages, "gref_dir_next_page")


def test_buffer_gref_naming_the_directory_page_is_rejected() -> None:
    refs, dirs, pages = directory(3)
    pages[dirs[0]] = set_u32(pages[dirs[0]], 4 + 4 * 2, dirs[0])
    expect_einval(DirectoryReader(dirs[0], 3), pages, "gref")


def test_buffer_gref_zero_is_rejected() -> None:
    refs, dirs, pages = directory(2025)
    pages[dirs[1]] = set_u32(pages[dirs[1]], 4 + 4 * 10, 0)
    expect_einval(DirectoryReader(dirs[0], 2025), pages, "gref")


def test_repeated_buffer_gref_within_a_page_is_rejected() -> None:
    refs, dirs, pages = directory(10)
    pages[dirs[0]] = set_u32(pages[dirs[0]], 4 + 4 * 9, refs[0])
    expect_einval(DirectoryReader(dirs[0], 10), pages, "gref")


def test_repeated_buffer_gref_across_pages_is_rejected() -> None:
    refs, dirs, pages = directory(2025)
    pages[dirs[1]] = set_u32(pages[dirs[1]], 4, refs[0])
    expect_einval(DirectoryReader(dirs[0], 2025), pages, "gref")


@pytest.mark.parametrize("length", [0, 4, PAGE_SIZE - 1, PAGE_SIZE + 1])
def test_page_of_wrong_length_is_rejected(length: int) -> None:
    refs, dirs, pages = directory(1)
    pages[dirs[0]] = (pages[dirs[0]] * 2)[:length]
    expect_einval(DirectoryReader(dirs[0], 1), pages, "directory page")


def test_more_refs_than_the_limit_is_rejected() -> None:
    with pytest.raises(ProtocolError) as exc:
        DirectoryReader(5, 2026, max_refs=2025)
    assert exc.value.what == "nrefs"
    assert exc.value.errno == EINVAL
    DirectoryReader(5, 2025, max_refs=2025)
    with pytest.raises(ProtocolError):
        DirectoryReader(5, DEFAULT_MAX_REFS + 1)


def test_spent_reader_refuses_more_pages_and_has_no_refs() -> None:
    refs, dirs, pages = directory(5)
    reader = DirectoryReader(dirs[0], 5)
    with pytest.raises(ProtocolError):
        reader.feed(b"short")
    with pytest.raises(RuntimeError):
        reader.feed(pages[dirs[0]])
    with pytest.raises(RuntimeError):
        _ = reader.refs


def test_each_page_is_read_once_so_later_guest_writes_do_not_matter() -> None:
    refs, dirs, pages = directory(1024)
    first = bytearray(pages[dirs[0]])
    reader = DirectoryReader(dirs[0], 1024)
    reader.feed(first)
    first[:] = bytes(PAGE_SIZE)  # the guest scribbles after we validated
    reader.feed(pages[dirs[1]])
    assert reader.refs == tuple(refs)


def test_filler_rejects_bad_chain_before_writing() -> None:
    page = bytearray(build_directory([0] * 2000, [3, 4])[0])
    struct.pack_into("<I", page, 0, 3)  # links to itself
    before = bytes(page)
    filler = DirectoryFiller(3, make_grefs(2000))
    with pytest.raises(ProtocolError) as exc:
        filler.fill(page)
    assert exc.value.what == "gref_dir_next_page"
    assert bytes(page) == before
    assert filler.next_page_gref is None


def test_filler_rejects_nonzero_link_on_last_page() -> None:
    page = bytearray(PAGE_SIZE)
    struct.pack_into("<I", page, 0, 99)
    with pytest.raises(ProtocolError):
        DirectoryFiller(3, [1]).fill(page)


def test_filler_refuses_invalid_backend_refs_as_a_local_bug() -> None:
    with pytest.raises(ValueError) as exc:
        DirectoryFiller(3, [1, 1])
    assert not isinstance(exc.value, ProtocolError)
    with pytest.raises(ValueError):
        DirectoryFiller(3, [0])


def test_build_directory_refuses_wrong_number_of_directory_grefs() -> None:
    with pytest.raises(ValueError):
        build_directory(make_grefs(1024), [1])


# --- hostile pages ----------------------------------------------------------------------------


@given(
    n=st.sampled_from([1, 1023, 1024, 2025]),
    victim=st.integers(min_value=0, max_value=1),
    garbage=st.binary(min_size=0, max_size=PAGE_SIZE + 8),
    pad=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_arbitrary_bytes_in_a_directory_page_give_valid_refs_or_protocol_error(
    n: int, victim: int, garbage: bytes, pad: bool
) -> None:
    refs, dirs, pages = directory(n)
    target = dirs[min(victim, len(dirs) - 1)]
    page = (
        garbage + bytes(PAGE_SIZE - len(garbage)) if pad and len(garbage) < PAGE_SIZE else garbage
    )
    pages[target] = page
    reader = DirectoryReader(dirs[0], n)
    try:
        while (gref := reader.next_page_gref) is not None:
            reader.feed(pages.get(gref, bytes(PAGE_SIZE)))
    except ProtocolError as exc:
        assert exc.errno == EINVAL
        return
    got = reader.refs
    assert len(got) == n
    assert 0 not in got
    assert len(set(got) | set(reader.dir_grefs)) == n + dir_pages_for(n)


@given(
    words=st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=40),
    n=st.integers(min_value=1, max_value=3 * GREFS_PER_DIR_PAGE),
)
@settings(max_examples=150, deadline=None)
def test_chains_over_a_small_gref_space_terminate_with_refs_or_error(
    words: list[int], n: int
) -> None:
    # Every directory page links into a tiny gref space so loops and aliasing are frequent.
    pages: dict[int, bytes] = {}
    for own in range(1, 13):
        page = bytearray(PAGE_SIZE)
        struct.pack_into("<I", page, 0, words[own % len(words)])
        for k in range(GREFS_PER_DIR_PAGE):
            struct.pack_into("<I", page, 4 + 4 * k, 100_000 * own + k + 1)
        pages[own] = bytes(page)
    reader = DirectoryReader(1, n)
    fed = 0
    try:
        while (gref := reader.next_page_gref) is not None:
            reader.feed(pages.get(gref, bytes(PAGE_SIZE)))
            fed += 1
    except ProtocolError:
        assert fed < dir_pages_for(n)
        return
    assert fed == dir_pages_for(n)
    assert len(set(reader.refs)) == n


def test_a_backend_allocated_directory_may_reuse_numbers_of_its_own_pages() -> None:
    # The guest's directory pages are the guest's grants; the refs in them are the backend's.
    pages = build_directory([12, 13], [12])
    same = DirectoryReader(12, 2)
    with pytest.raises(ProtocolError):
        same.feed(pages[0])
    foreign = DirectoryReader(12, 2, same_grant_table=False)
    foreign.feed(pages[0])
    assert foreign.refs == (12, 13)


def test_repeated_buffer_gref_two_pages_apart_is_rejected() -> None:
    """Every page's refs are checked against all earlier pages, not only the previous one."""
    refs, dirs, pages = directory(8100)
    pages[dirs[4]] = set_u32(pages[dirs[4]], 4 + 4 * 7, refs[3])
    expect_einval(DirectoryReader(dirs[0], 8100), pages, "gref")


def test_the_largest_u32_is_a_valid_grant_ref() -> None:
    top = 0xFFFFFFFF
    refs = [top - 1, top]
    pages = dict(zip([top - 2], build_directory(refs, [top - 2]), strict=True))
    assert read_all(DirectoryReader(top - 2, 2), pages) == tuple(refs)
    assert read_all(DirectoryReader(top, 1), {top: build_directory([5], [top])[0]}) == (5,)
