"""Grant mapping on the simulated hypervisor behaves like gntdev over Xen grant tables."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from displback.sim.hypervisor import FIRST_GREF, HypervisorThread
from displback.sim.platform import SimDomain, SimGrantDevice, SimPlatform
from displback.xen.interfaces import GNTDEV_MAX_GRANTS, GrantDevice, Platform

GUEST = 3


@pytest.fixture
def dom0(hypervisor: HypervisorThread) -> Iterator[SimPlatform]:
    with SimPlatform(hypervisor.socket_path, "/nonexistent/xenstore") as platform:
        yield platform


@pytest.fixture
def guest(hypervisor: HypervisorThread) -> Iterator[SimDomain]:
    with SimDomain(hypervisor.socket_path, GUEST) as dom:
        yield dom


@pytest.fixture
def gntdev(dom0: SimPlatform) -> Iterator[SimGrantDevice]:
    dev = dom0.open_grant_device()
    yield dev
    dev.close()


def test_sim_platform_satisfies_the_platform_protocols(
    dom0: SimPlatform, gntdev: SimGrantDevice
) -> None:
    assert isinstance(dom0, Platform)
    assert isinstance(gntdev, GrantDevice)
    assert dom0.domid == 0 and dom0.xenstore_path == "/nonexistent/xenstore"


def test_mapped_grants_share_memory_with_the_guest_in_order(
    guest: SimDomain, gntdev: SimGrantDevice
) -> None:
    pfns = guest.alloc_pages(3)
    refs = [guest.grant(pfn, 0) for pfn in reversed(pfns)]
    assert refs[0] >= FIRST_GREF
    with guest.map_pages(pfns) as own, gntdev.map_grants(GUEST, refs) as mapping:
        assert len(mapping.buffer) == 3 * 4096
        own.buffer[0] = 0xAA  # first page of pfns = last page of the mapping
        own.buffer[2 * 4096 + 5] = 0xBB
        assert mapping.buffer[2 * 4096] == 0xAA
        assert mapping.buffer[5] == 0xBB
        mapping.buffer[4096 + 7] = 0xCC
        assert own.buffer[4096 + 7] == 0xCC
    for ref in refs:
        guest.end_access(ref)
    guest.free_pages(pfns)


def test_allocated_pages_are_zeroed_even_when_reused(guest: SimDomain) -> None:
    [pfn] = guest.alloc_pages(1)
    with guest.map_pages([pfn]) as own:
        own.buffer[:4] = b"junk"
    guest.free_pages([pfn])
    [again] = guest.alloc_pages(1)
    assert again == pfn
    with guest.map_pages([again]) as own:
        assert bytes(own.buffer) == bytes(4096)
    guest.free_pages([again])


def test_unknown_gref_is_einval_and_maps_nothing(
    hypervisor: HypervisorThread, guest: SimDomain, gntdev: SimGrantDevice
) -> None:
    [pfn] = guest.alloc_pages(1)
    good = guest.grant(pfn, 0)
    with pytest.raises(OSError) as exc:
        gntdev.map_grants(GUEST, [good, 4242])
    assert exc.value.errno == errno.EINVAL
    assert hypervisor.counters()["domains"][0]["mappings"] == 0
    guest.end_access(good)  # not left mapped by the failed attempt
    guest.free_pages([pfn])


def test_grant_copy_returns_the_pages_bytes_as_they_were_and_maps_nothing(
    hypervisor: HypervisorThread, guest: SimDomain, gntdev: SimGrantDevice
) -> None:
    [pfn] = guest.alloc_pages(1)
    ref = guest.grant(pfn, 0, readonly=True)  # a copy only reads
    with guest.map_pages([pfn]) as own:
        own.buffer[:6] = b"chain:"
        copied = gntdev.copy_from_grant(GUEST, ref, 4096)
        own.buffer[:6] = b"later!"
    assert len(copied) == 4096 and copied[:6] == b"chain:"
    assert gntdev.copy_from_grant(GUEST, ref, 3) == b"lat"
    assert hypervisor.counters()["domains"][0]["mappings"] == 0
    guest.end_access(ref)  # not busy: nothing was mapped
    guest.free_pages([pfn])


@pytest.mark.parametrize("case", ["unknown", "revoked", "other domain", "length 0", "length 4097"])
def test_grant_copy_of_a_bad_grant_or_length_is_einval(
    guest: SimDomain, gntdev: SimGrantDevice, case: str
) -> None:
    [pfn] = guest.alloc_pages(1)
    ref = guest.grant(pfn, 7 if case == "other domain" else 0)
    if case == "revoked":
        guest.end_access(ref)
    length = {"length 0": 0, "length 4097": 4097}.get(case, 4096)
    with pytest.raises(OSError) as exc:
        gntdev.copy_from_grant(GUEST, 4242 if case == "unknown" else ref, length)
    assert exc.value.errno == errno.EINVAL
    if case != "revoked":
        guest.end_access(ref)
    guest.free_pages([pfn])


def test_revoked_gref_cannot_be_mapped(guest: SimDomain, gntdev: SimGrantDevice) -> None:
    [pfn] = guest.alloc_pages(1)
    ref = guest.grant(pfn, 0)
    guest.end_access(ref)
    with pytest.raises(OSError) as exc:
        gntdev.map_grants(GUEST, [ref])
    assert exc.value.errno == errno.EINVAL
    guest.free_pages([pfn])


def test_gref_granted_to_another_domain_is_einval(
    guest: SimDomain, gntdev: SimGrantDevice
) -> None:
    [pfn] = guest.alloc_pages(1)
    ref = guest.grant(pfn, 7)
    with pytest.raises(OSError) as exc:
        gntdev.map_grants(GUEST, [ref])
    assert exc.value.errno == errno.EINVAL
    guest.end_access(ref)
    guest.free_pages([pfn])


def test_grant_of_a_domain_that_does_not_exist_is_einval(gntdev: SimGrantDevice) -> None:
    with pytest.raises(OSError) as exc:
        gntdev.map_grants(999, [FIRST_GREF])
    assert exc.value.errno == errno.EINVAL


def test_readonly_grant_maps_readonly_but_not_writable(
    guest: SimDomain, gntdev: SimGrantDevice
) -> None:
    [pfn] = guest.alloc_pages(1)
    ref = guest.grant(pfn, 0, readonly=True)
    with pytest.raises(OSError) as exc:
        gntdev.map_grants(GUEST, [ref])
    assert exc.value.errno == errno.EINVAL
    with guest.map_pages([pfn]) as own, gntdev.map_grants(GUEST, [ref], writable=False) as m:
        own.buffer[9] = 9
        assert m.buffer.readonly
        assert m.buffer[9] == 9
        with pytest.raises(TypeError):
            m.buffer[0] = 1
    guest.end_access(ref)
    guest.free_pages([pfn])


@pytest.mark.parametrize("count", [0, GNTDEV_MAX_GRANTS + 1])
def test_grant_count_out_of_range_is_einval(gntdev: SimGrantDevice, count: int) -> None:
    with pytest.raises(OSError) as exc:
        gntdev.map_grants(GUEST, [FIRST_GREF] * count)
    assert exc.value.errno == errno.EINVAL


def test_ending_access_while_mapped_is_refused_until_unmapped(
    hypervisor: HypervisorThread, guest: SimDomain, gntdev: SimGrantDevice
) -> None:
    [pfn] = guest.alloc_pages(1)
    ref = guest.grant(pfn, 0)
    mapping = gntdev.map_grants(GUEST, [ref])
    counters = hypervisor.counters()["domains"]
    assert counters[0]["mappings"] == 1 and counters[GUEST]["grants"] == 1
    with pytest.raises(OSError) as exc:
        guest.end_access(ref)
    assert exc.value.errno == errno.EBUSY
    with pytest.raises(OSError) as busy:
        guest.free_pages([pfn])
    assert busy.value.errno == errno.EBUSY
    mapping.close()
    guest.end_access(ref)
    guest.free_pages([pfn])


def test_mapping_refuses_to_close_while_a_view_is_alive(
    guest: SimDomain, gntdev: SimGrantDevice
) -> None:
    [pfn] = guest.alloc_pages(1)
    ref = guest.grant(pfn, 0)
    mapping = gntdev.map_grants(GUEST, [ref])
    view = mapping.buffer[0:4]
    with pytest.raises(BufferError):
        mapping.close()
    assert mapping.buffer[0] == 0  # still mapped and usable
    view.release()
    mapping.close()
    guest.end_access(ref)
    guest.free_pages([pfn])


def test_mapping_outlives_the_closed_grant_device(
    dom0: SimPlatform, guest: SimDomain
) -> None:
    [pfn] = guest.alloc_pages(1)
    ref = guest.grant(pfn, 0)
    dev = dom0.open_grant_device()
    mapping = dev.map_grants(GUEST, [ref])
    dev.close()
    mapping.buffer[0] = 1
    with pytest.raises(OSError):
        guest.end_access(ref)
    mapping.close()
    guest.end_access(ref)
    guest.free_pages([pfn])


def test_guest_closing_revokes_grants_lazily_while_mapped(
    hypervisor: HypervisorThread, dom0: SimPlatform, gntdev: SimGrantDevice
) -> None:
    guest = SimDomain(hypervisor.socket_path, GUEST)
    [pfn] = guest.alloc_pages(1)
    ref = guest.grant(pfn, 0)
    mapping = gntdev.map_grants(GUEST, [ref])
    guest.close()
    counters = hypervisor.counters()["domains"][GUEST]
    assert counters == {"pages": 1, "grants": 1, "mappings": 0, "dmabufs": 0, "ports": 0}
    with pytest.raises(OSError) as exc:  # revoking: no new mappings
        gntdev.map_grants(GUEST, [ref])
    assert exc.value.errno == errno.EINVAL
    mapping.buffer[0] = 1  # the old mapping still works
    mapping.close()
    assert hypervisor.counters()["domains"][GUEST]["pages"] == 0


def test_guest_can_map_dom0_grants_of_an_allocated_dmabuf(
    dom0: SimPlatform, guest: SimDomain, gntdev: SimGrantDevice
) -> None:
    fd = dom0.alloc_dmabuf(2 * 4096)
    refs = gntdev.dmabuf_import_to_refs(fd, 2, GUEST)
    with dom0.open_dmabuf(fd) as display:
        display.buffer[4096] = 0x5A
        guest_dev = guest.open_grant_device()
        with guest_dev.map_grants(0, refs) as m:
            assert m.buffer[4096] == 0x5A
            m.buffer[1] = 0xA5
            assert display.buffer[1] == 0xA5
        guest_dev.close()
    gntdev.dmabuf_import_release(fd)
    os.close(fd)


def test_batch_grant_and_end_access_are_all_or_nothing(
    hypervisor: HypervisorThread, guest: SimDomain, gntdev: SimGrantDevice
) -> None:
    pfns = guest.alloc_pages(3)
    with pytest.raises(OSError) as exc:
        guest.grant_pages([*pfns, 999], 0)
    assert exc.value.errno == errno.EINVAL
    assert hypervisor.counters()["domains"][GUEST]["grants"] == 0
    refs = guest.grant_pages(pfns, 0)
    assert len(set(refs)) == 3
    mapping = gntdev.map_grants(GUEST, refs[1:2])
    with pytest.raises(OSError) as busy:
        guest.end_access_pages(refs)
    assert busy.value.errno == errno.EBUSY
    assert hypervisor.counters()["domains"][GUEST]["grants"] == 3
    mapping.close()
    guest.end_access_pages(refs)
    guest.free_pages(pfns)


def test_ended_grefs_are_reused_lowest_first(guest: SimDomain) -> None:
    pfns = guest.alloc_pages(3)
    refs = guest.grant_pages(pfns, 0)
    assert refs == [FIRST_GREF, FIRST_GREF + 1, FIRST_GREF + 2]
    guest.end_access(refs[1])
    guest.end_access(refs[0])
    assert guest.grant(pfns[0], 0) == FIRST_GREF
    guest.end_access_pages([FIRST_GREF, refs[2]])
    guest.free_pages(pfns)
