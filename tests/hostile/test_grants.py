"""Grant references a guest puts in its requests and directories: never granted, zero,
repeated, another buffer's, granted to another domain, another domain's numbers, read-only,
revoked before or while Dom0 maps them. A gref only ever names an entry of the requesting
guest's own grant table granted to Dom0; anything else is ``-EINVAL`` with nothing mapped."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from displback.protocol.constants import PAGE_SIZE, Op
from displback.protocol.layout import REQ_RING_REF, connector_dir
from displback.protocol.messages import DbufCreateReq, DbufDestroyReq, GetEdidReq
from displback.protocol.pagedir import build_directory
from displback.sim.guest import GuestBuffer, GuestRequestError, SimGuest
from displback.sim.hypervisor import (
    FIRST_GREF,
    MAPTRACK_ENTRIES,
    HypervisorThread,
    wait_for_no_leaks,
)
from displback.sim.platform import client_resources
from tests.backend.support import flip_frame, paint, release, show, shown, wait_until
from tests.hostile.support import HONEST, Arena, run_attack, set_field


def _rewrite_refs(g: SimGuest, refs_of: Callable[[GuestBuffer], list[int]]) -> None:
    """Before the next DBUF_CREATE, rewrite its whole directory to list ``refs_of(buf)``."""

    def rewrite(buf: GuestBuffer) -> None:
        dom = g.hostile.domain
        with dom.map_pages(buf.dir_pfns) as directory:
            for i, page in enumerate(build_directory(refs_of(buf), buf.dir_grefs)):
                directory.buffer[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = page

    g.hostile.on_directory = rewrite


async def _refused(a: Arena, g: SimGuest, expect: int | None = errno.EINVAL,
                   shape: tuple[int, int] = (320, 240)) -> None:
    """A DBUF_CREATE of ``shape`` is refused, nothing stays mapped or charged; then a
    320×240 one without the forgery is served and shown on output B."""
    with pytest.raises(GuestRequestError) as exc:
        await g.create_dumb(*shape, 32)
    if expect is not None:
        assert exc.value.errno == expect
    assert exc.value.errno != errno.ETIMEDOUT
    g.hostile.on_directory = None
    g.hostile.set_request_hook(Op.DBUF_CREATE, None)
    g.hostile.set_request_hook(Op.GET_EDID, None)
    assert g.pending_end_access == 0
    [store] = a.stores(g.domid)
    assert store.stats.buffers == 0 and store.quota.pages == 0
    bufs, fbs = await show(g, 0, 320, 240, frame=9)
    assert shown(a.machine.output("B"), 320, 240) == (0, 9)
    await release(g, 0, bufs, fbs)


@pytest.mark.parametrize("gref", [0, 0xFFFF_FFFE, 7], ids=["zero", "never-granted", "reserved"])
async def test_a_directory_ref_no_one_granted_is_refused(
    hypervisor: HypervisorThread, tmp_path: Path, gref: int
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        g.hostile.set_request_hook(Op.DBUF_CREATE, set_field(DbufCreateReq, "gref_directory", gref))
        await _refused(a, g)
        g.hostile.set_request_hook(Op.GET_EDID, set_field(GetEdidReq, "gref_directory", gref))
        with pytest.raises(GuestRequestError) as exc:
            await g.get_edid(0)
        assert exc.value.errno == errno.EINVAL

    await run_attack(hypervisor, tmp_path, attack)


async def _refused_with_pages_granted(a: Arena, g: SimGuest, *, to_domid: int,
                                      readonly: bool) -> None:
    """The next DBUF_CREATE names other pages of the guest, granted as given: refused."""
    dom = g.hostile.domain
    pfns = dom.alloc_pages(75)
    extra = dom.grant_pages(pfns, to_domid, readonly=readonly)
    _rewrite_refs(g, lambda buf: extra)
    await _refused(a, g)
    dom.end_access_pages(extra)
    dom.free_pages(pfns)


async def test_the_ring_page_as_a_directory_is_refused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """The ring page is granted to Dom0, but it holds indexes, not refs."""

    async def attack(a: Arena, g: SimGuest) -> None:
        ring = int(await g.xenstore.read(f"{connector_dir(g.domid, 0, 0)}/{REQ_RING_REF}"))
        g.hostile.set_request_hook(Op.DBUF_CREATE, set_field(DbufCreateReq, "gref_directory", ring))
        await _refused(a, g, expect=None)

    await run_attack(hypervisor, tmp_path, attack)


async def test_all_buffer_refs_zero_are_refused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def attack(a: Arena, g: SimGuest) -> None:
        _rewrite_refs(g, lambda buf: [0] * buf.npages)
        await _refused(a, g)

    await run_attack(hypervisor, tmp_path, attack)


async def test_refs_granted_to_another_domain_are_refused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """The attacker grants pages to the honest guest and names them to Dom0."""

    async def attack(a: Arena, g: SimGuest) -> None:
        await _refused_with_pages_granted(a, g, to_domid=HONEST, readonly=False)

    await run_attack(hypervisor, tmp_path, attack)


async def test_another_guests_gref_numbers_resolve_in_the_attackers_own_table(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """The honest guest's buffer refs, named by the attacker, are looked up in the
    attacker's grant table, where nothing has those numbers: refused, and the honest
    guest's memory is never mapped for the attacker."""

    async def attack(a: Arena, g: SimGuest) -> None:
        theirs = sorted({gref for b in a.honest.buffers.live for gref in b.grefs})

        def stolen(buf: GuestBuffer) -> list[int]:
            # After the attacker granted this buffer: numbers above all of its own grants.
            refs = [gref for gref in theirs if gref > max(buf.grefs + buf.dir_grefs)]
            assert len(refs) >= buf.npages
            return refs[: buf.npages]

        _rewrite_refs(g, stolen)
        await _refused(a, g, shape=(64, 64))  # 4 pages

    await run_attack(hypervisor, tmp_path, attack)


async def test_read_only_grants_are_refused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """Pages granted read-only cannot back a buffer Dom0 maps writable (dma-buf export)."""

    async def attack(a: Arena, g: SimGuest) -> None:
        await _refused_with_pages_granted(a, g, to_domid=0, readonly=True)

    await run_attack(hypervisor, tmp_path, attack)


async def test_refs_revoked_before_the_request_are_refused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """The guest grants half its pages afresh under new numbers and ends the old grants
    after writing the directory: the directory names grants that no longer exist."""

    async def attack(a: Arena, g: SimGuest) -> None:
        dom = g.hostile.domain

        def revoke(buf: GuestBuffer) -> None:
            old = buf.grefs[::2]
            buf.grefs[::2] = dom.grant_pages(buf.pfns[::2], 0)
            dom.end_access_pages(old)

        g.hostile.on_directory = revoke
        await _refused(a, g)

    await run_attack(hypervisor, tmp_path, attack)


async def test_refs_revoked_while_mapped_cannot_pull_pages_from_under_dom0(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """Ending access to a buffer Dom0 maps is refused by Xen (EBUSY); the buffer keeps
    working, and the guest's later destroy releases it."""

    async def attack(a: Arena, g: SimGuest) -> None:
        bufs, fbs = await show(g, 0, 320, 240, frame=3)
        dom = g.hostile.domain
        for buf in bufs:
            with pytest.raises(OSError) as exc:
                dom.end_access_pages(buf.grefs)
            assert exc.value.errno == errno.EBUSY
        for frame in (4, 5):
            await flip_frame(g, 0, bufs[frame % 2], fbs[frame % 2], frame)
            assert shown(a.machine.output("B"), 320, 240) == (0, frame)
        await release(g, 0, bufs, fbs)

    await run_attack(hypervisor, tmp_path, attack)


@pytest.mark.parametrize("where", ["everywhere", "last"])
async def test_a_ref_repeated_within_a_buffer_is_refused(
    hypervisor: HypervisorThread, tmp_path: Path, where: str
) -> None:
    """A directory naming one granted page twice (aliasing: two pixels rows would share
    memory) is refused, however far apart the two entries are."""

    def repeated(buf: GuestBuffer) -> list[int]:
        if where == "everywhere":
            return [buf.grefs[0]] * buf.npages
        return buf.grefs[:-1] + [buf.grefs[0]]

    async def attack(a: Arena, g: SimGuest) -> None:
        _rewrite_refs(g, repeated)
        await _refused(a, g)

    await run_attack(hypervisor, tmp_path, attack)


async def test_refs_of_another_buffer_share_pages_and_both_release(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """Buffer B's directory names buffer A's pages: B shows A's pixels (the guest's own
    memory); destroying A first leaves its grants ending late (B still maps them), and all
    is released once B goes too."""

    async def attack(a: Arena, g: SimGuest) -> None:
        first = await g.create_dumb(320, 240, 32)
        _rewrite_refs(g, lambda buf: list(first.grefs))
        second = await g.create_dumb(320, 240, 32)
        g.hostile.on_directory = None
        fb_first = await g.add_fb(first, 320, 240)
        fb_second = await g.add_fb(second, 320, 240)
        paint(first, fb_first, connector=0, frame=11)
        await g.set_config(0, fb_second)
        assert shown(a.machine.output("B"), 320, 240) == (0, 11)
        await g.set_config(0, None)
        await g.rm_fb(fb_first)
        await g.rm_fb(fb_second)
        await g.destroy_dumb(first)
        await g.destroy_dumb(second)
        await wait_until(lambda: g.pending_end_access == 0)

    await run_attack(hypervisor, tmp_path, attack)


def _small_hypervisor(tmp_path: Path, maptrack_entries: int) -> Iterator[HypervisorThread]:
    """A hypervisor whose grant tables hold 600 entries, with the ``hypervisor`` fixture's
    leak checks."""
    before = client_resources()
    hv = HypervisorThread(str(tmp_path / "xen.sock"), grant_entries=FIRST_GREF + 600,
                          maptrack_entries=maptrack_entries)
    try:
        yield hv
        assert wait_for_no_leaks(hv) == {}, "hypervisor resources leaked"
        assert client_resources() == before, "client-side resources leaked"
    finally:
        hv.stop()


@pytest.fixture
def small_tables(tmp_path: Path) -> Iterator[HypervisorThread]:
    """Grant tables of 600 entries and maptracks of 600 mappings (Xen's defaults: 32768 and
    262144)."""
    yield from _small_hypervisor(tmp_path, 600)


@pytest.fixture
def small_grant_tables(tmp_path: Path) -> Iterator[HypervisorThread]:
    """Grant tables of 600 entries, maptracks of Xen's default size (a guest that keeps its
    mappings fills its own maptrack, not Dom0's grant table)."""
    yield from _small_hypervisor(tmp_path, MAPTRACK_ENTRIES)


async def _create_until_refused(g: SimGuest) -> tuple[list[GuestBuffer], int]:
    bufs: list[GuestBuffer] = []
    while True:
        try:
            bufs.append(await g.create_dumb(320, 240, 32))  # 75 pages
        except GuestRequestError as exc:
            return bufs, exc.errno or 0
        assert len(bufs) < 100


async def test_dom0s_maptrack_exhausted_refuses_new_buffers_only(
    small_tables: HypervisorThread, tmp_path: Path
) -> None:
    """Dom0 maps every guest's buffers with one maptrack: once the attacker has filled it,
    its next DBUF_CREATE is refused (the map fails: ``-EINVAL``), nothing half-made stays
    mapped, the honest guest's buffers go on flipping, and a destroy makes room again."""

    async def attack(a: Arena, g: SimGuest) -> None:
        bufs, err = await _create_until_refused(g)
        assert err == errno.EINVAL and len(bufs) < 8  # 600 mappings, not the page quota
        [store] = a.stores(g.domid)
        assert store.stats.buffers == len(bufs)
        await g.destroy_dumb(bufs.pop())
        bufs.append(await g.create_dumb(320, 240, 32))
        for buf in bufs:
            await g.destroy_dumb(buf)

    await run_attack(small_tables, tmp_path, attack)


async def test_dom0s_grant_table_exhausted_by_be_alloc_refuses_new_buffers_only(
    small_tables: HypervisorThread, tmp_path: Path
) -> None:
    """be-alloc: Dom0 grants its own pages to the guest from Dom0's one grant table. Once the
    attacker's buffers fill it, the next is refused with ``-ENOSPC`` (or the quota's
    ``-ENOMEM``) and nothing half-made stays granted; the grants go with the domain."""

    async def attack(a: Arena, g: SimGuest) -> None:
        assert g.be_alloc
        bufs, err = await _create_until_refused(g)
        assert err in (errno.ENOSPC, errno.ENOMEM) and 0 < len(bufs) < 9
        counters = await trio.to_thread.run_sync(a.machine.hv.counters)
        assert counters["domains"][0]["grants"] <= 600
        for buf in bufs:
            await g.destroy_dumb(buf)

    await run_attack(small_tables, tmp_path, attack, spec="be-alloc=1,connectors=c0:320x240")


async def test_be_alloc_reuse_by_a_guest_keeping_its_mappings_costs_no_grant_entries(
    small_grant_tables: HypervisorThread, tmp_path: Path
) -> None:
    """Twelve create/destroy rounds of one 75-page be-alloc buffer, destroyed without
    unmapping (Linux unmaps first; a hostile guest need not): the kept memory is reused with
    its grants (the same refs every time), so Dom0's 600-entry grant table must not run out:
    Dom0 holds the buffer's 75 entries, all charged to the guest. Before, every reuse granted
    the memory afresh while the old grants stayed in use (gntdev revokes lazily)."""

    async def attack(a: Arena, g: SimGuest) -> None:
        refs = set()
        for _ in range(12):
            buf = await g.create_dumb(320, 240, 32)
            refs.add(tuple(buf.backend_refs))
            await g.hostile.raw_request(0, DbufDestroyReq(id=0, dbuf_cookie=buf.cookie).pack())
        assert len(refs) == 1
        counters = await trio.to_thread.run_sync(a.machine.hv.counters)
        account = a.machine.backend.accounts[g.domid]
        assert counters["domains"][0]["grants"] == account.be_alloc_pages == 75

    await run_attack(small_grant_tables, tmp_path, attack,
                     spec="be-alloc=1,connectors=c0:320x240")
