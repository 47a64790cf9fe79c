"""The real platform without Xen: ioctl arguments, results and errors through an injected ioctl.

A recording fake stands in for the kernel; a memfd stands in for gntdev where ``mmap`` is
needed and a socket pair for ``/dev/xen/evtchn``'s read/write side.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from displback.sim.xenstored import running_xenstored
from displback.xen import real
from displback.xen.interfaces import (
    GNTDEV_DMA_FLAG_COHERENT,
    GNTDEV_DMA_FLAG_WC,
    EventChannels,
    GrantDevice,
    Platform,
)
from displback.xen.ioctls import IOCTLS
from displback.xen.real import (
    DmaBufSupport,
    RealEventChannels,
    RealGrantDevice,
    RealPlatform,
    probe_dmabuf,
)
from displback.xenstore.client import Perm, open_xenstore

NAMES = {number: name for name, number in IOCTLS.items()}
PAGE = 4096


class FakeKernel:
    """Records ``(name, bytes(arg))`` per ioctl; a handler per name may fill the buffer."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes | int]] = []
        self.handlers: dict[str, Callable[[bytearray | int], int]] = {}

    def __call__(self, fd: int, request: int, arg: bytearray | int) -> int:
        name = NAMES[request]
        self.calls.append((name, arg if isinstance(arg, int) else bytes(arg)))
        handler = self.handlers.get(name)
        return handler(arg) if handler is not None else 0

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def fail(self, name: str, code: int) -> None:
        def handler(arg: bytearray | int) -> int:
            raise OSError(code, os.strerror(code))

        self.handlers[name] = handler


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("fake-gntdev", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * PAGE)
    yield fd
    os.close(fd)


# --- event channels -------------------------------------------------------------------------


@pytest.fixture
def evtchn_pair(kernel: FakeKernel) -> Iterator[tuple[RealEventChannels, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    fd = os.dup(ours.fileno())
    ours.close()
    os.set_blocking(fd, False)
    channels = RealEventChannels(fd, ioctl=kernel)
    yield channels, theirs
    channels.close()
    theirs.close()


def test_bind_interdomain_packs_domid_and_port_and_returns_the_local_port(
    kernel: FakeKernel, evtchn_pair: tuple[RealEventChannels, socket.socket]
) -> None:
    channels, _ = evtchn_pair
    kernel.handlers["IOCTL_EVTCHN_BIND_INTERDOMAIN"] = lambda arg: 17
    assert channels.bind_interdomain(5, 42) == 17
    assert kernel.calls == [("IOCTL_EVTCHN_BIND_INTERDOMAIN", struct.pack("=II", 5, 42))]
    assert channels.bound_ports == {17}


def test_notify_and_unbind_pass_the_local_port_and_raise_the_kernels_errno(
    kernel: FakeKernel, evtchn_pair: tuple[RealEventChannels, socket.socket]
) -> None:
    channels, _ = evtchn_pair
    kernel.handlers["IOCTL_EVTCHN_BIND_INTERDOMAIN"] = lambda arg: 9
    channels.bind_interdomain(1, 3)
    channels.notify(9)
    channels.unbind(9)
    assert kernel.calls[1:] == [
        ("IOCTL_EVTCHN_NOTIFY", struct.pack("=I", 9)),
        ("IOCTL_EVTCHN_UNBIND", struct.pack("=I", 9)),
    ]
    assert channels.bound_ports == frozenset()
    kernel.fail("IOCTL_EVTCHN_NOTIFY", errno.ENOTCONN)
    with pytest.raises(OSError) as info:
        channels.notify(9)
    assert info.value.errno == errno.ENOTCONN


def test_restrict_domid_sends_a_u16(
    kernel: FakeKernel, evtchn_pair: tuple[RealEventChannels, socket.socket]
) -> None:
    channels, _ = evtchn_pair
    channels.restrict_domid(7)
    assert kernel.calls == [("IOCTL_EVTCHN_RESTRICT_DOMID", struct.pack("=H", 7))]


def test_read_pending_returns_the_u32_ports_and_nothing_when_empty(
    evtchn_pair: tuple[RealEventChannels, socket.socket],
) -> None:
    channels, kernel_side = evtchn_pair
    assert channels.read_pending() == []
    kernel_side.send(struct.pack("=3I", 4, 8, 1023))
    assert channels.read_pending() == [4, 8, 1023]
    assert channels.read_pending() == []


def test_unmask_writes_the_ports_back_as_u32s(
    evtchn_pair: tuple[RealEventChannels, socket.socket],
) -> None:
    channels, kernel_side = evtchn_pair
    channels.unmask([3, 70000])
    assert kernel_side.recv(64) == struct.pack("=2I", 3, 70000)
    channels.unmask([])  # no empty write
    kernel_side.setblocking(False)
    with pytest.raises(BlockingIOError):
        kernel_side.recv(64)


def test_queue_overflow_resets_and_reports_every_bound_port(kernel: FakeKernel) -> None:
    def overflowing_read(fd: int, size: int) -> bytes:
        raise OSError(errno.EFBIG, "overflow")

    ports = iter([5, 6])
    kernel.handlers["IOCTL_EVTCHN_BIND_INTERDOMAIN"] = lambda arg: next(ports)
    fd = os.open("/dev/null", os.O_RDWR)
    channels = RealEventChannels(fd, ioctl=kernel, read=overflowing_read)
    try:
        channels.bind_interdomain(1, 10)
        channels.bind_interdomain(1, 11)
        assert channels.read_pending() == [5, 6]
        assert kernel.names()[-1] == "IOCTL_EVTCHN_RESET"
        assert channels.overflows == 1
    finally:
        channels.close()


def test_reset_passes_no_argument(
    kernel: FakeKernel, evtchn_pair: tuple[RealEventChannels, socket.socket]
) -> None:
    channels, _ = evtchn_pair
    channels.reset()
    assert kernel.calls == [("IOCTL_EVTCHN_RESET", 0)]


def test_closed_event_channels_refuse_with_ebadf(kernel: FakeKernel) -> None:
    channels = RealEventChannels(os.open("/dev/null", os.O_RDWR), ioctl=kernel)
    channels.close()
    channels.close()
    for call in (lambda: channels.notify(1), channels.read_pending, lambda: channels.unmask([1])):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF
    assert kernel.calls == []


# --- grant mapping --------------------------------------------------------------------------


def _device(
    kernel: FakeKernel, memfd: int, support: DmaBufSupport | None = None
) -> RealGrantDevice:
    return RealGrantDevice(os.dup(memfd), ioctl=kernel, support=support)


def _index_at(offset: int) -> Callable[[bytearray | int], int]:
    def handler(arg: bytearray | int) -> int:
        assert isinstance(arg, bytearray)
        struct.pack_into("=Q", arg, 8, offset)
        return 0

    return handler


def test_map_grants_packs_domid_ref_pairs_and_maps_at_the_returned_index(
    kernel: FakeKernel, memfd: int
) -> None:
    os.pwrite(memfd, b"guest pixels", 2 * PAGE)
    kernel.handlers["IOCTL_GNTDEV_MAP_GRANT_REF"] = _index_at(2 * PAGE)
    device = _device(kernel, memfd)
    mapping = device.map_grants(3, [100, 101, 102])
    assert kernel.calls[0] == (
        "IOCTL_GNTDEV_MAP_GRANT_REF",
        struct.pack("=IIQ6I", 3, 0, 0, 3, 100, 3, 101, 3, 102),
    )
    assert len(mapping.buffer) == 3 * PAGE
    assert bytes(mapping.buffer[:12]) == b"guest pixels"
    mapping.buffer[0:5] = b"BACKD"
    assert os.pread(memfd, 5, 2 * PAGE) == b"BACKD"
    mapping.close()
    assert kernel.calls[1] == ("IOCTL_GNTDEV_UNMAP_GRANT_REF", struct.pack("=QII", 2 * PAGE, 3, 0))
    mapping.close()  # once only
    assert len(kernel.calls) == 2
    device.close()


def _grant_copy_writing(data: bytes, status: int = 0) -> Callable[[bytearray | int], int]:
    """A GRANT_COPY handler acting as Xen: per segment, copy ``data`` to ``dest.virt`` and
    write ``status``."""

    def handler(arg: bytearray | int) -> int:
        assert isinstance(arg, bytearray)
        count, segments = struct.unpack("=I4xQ", arg)
        for i in range(count):
            segment = (ctypes.c_char * 24).from_address(segments + 24 * i)
            ref, offset, domid, dest, length, flags, _ = struct.unpack("=IHHQHHh2x", segment)
            assert (offset, flags) == (0, 1)  # from offset 0 of a grant ref (GNTCOPY_source_gref)
            ctypes.memmove(dest, data, min(length, len(data)))
            struct.pack_into("=h", segment, 20, status)
        return 0

    return handler


def test_grant_copy_sends_one_segment_and_returns_what_xen_copied(
    kernel: FakeKernel, memfd: int
) -> None:
    kernel.handlers["IOCTL_GNTDEV_GRANT_COPY"] = _grant_copy_writing(b"directory page")
    device = _device(kernel, memfd)
    assert device.copy_from_grant(5, 77, 9) == b"directory"
    ((name, arg),) = kernel.calls
    assert name == "IOCTL_GNTDEV_GRANT_COPY" and isinstance(arg, bytes)
    assert struct.unpack("=I4xQ", arg)[0] == 1
    device.close()


def test_grant_copy_refused_by_xen_is_einval(kernel: FakeKernel, memfd: int) -> None:
    kernel.handlers["IOCTL_GNTDEV_GRANT_COPY"] = _grant_copy_writing(b"", status=-4)
    device = _device(kernel, memfd)
    with pytest.raises(OSError) as info:
        device.copy_from_grant(5, 77, 4096)
    assert info.value.errno == errno.EINVAL and "GNTST -4" in str(info.value)
    with pytest.raises(OSError) as info:
        device.copy_from_grant(5, 77, 4097)  # more than a page: refused before the ioctl
    assert info.value.errno == errno.EINVAL and len(kernel.calls) == 1
    device.close()


def test_read_only_mapping_gives_a_read_only_buffer(kernel: FakeKernel, memfd: int) -> None:
    device = _device(kernel, memfd)
    with device.map_grants(1, [7], writable=False) as mapping:
        assert mapping.buffer.readonly
    device.close()


def test_mapping_with_live_views_refuses_to_close_and_stays_usable(
    kernel: FakeKernel, memfd: int
) -> None:
    device = _device(kernel, memfd)
    mapping = device.map_grants(1, [7])
    view = mapping.buffer[10:20]
    with pytest.raises(BufferError):
        mapping.close()
    mapping.buffer[0] = 0x55
    assert "IOCTL_GNTDEV_UNMAP_GRANT_REF" not in kernel.names()
    view.release()
    mapping.close()
    assert kernel.names()[-1] == "IOCTL_GNTDEV_UNMAP_GRANT_REF"
    device.close()


def test_failed_mmap_undoes_the_registration(kernel: FakeKernel, memfd: int) -> None:
    kernel.handlers["IOCTL_GNTDEV_MAP_GRANT_REF"] = _index_at(123)  # not page aligned
    device = _device(kernel, memfd)
    with pytest.raises(OSError):
        device.map_grants(1, [7, 8])
    assert kernel.calls[-1] == ("IOCTL_GNTDEV_UNMAP_GRANT_REF", struct.pack("=QII", 123, 2, 0))
    device.close()


@pytest.mark.parametrize("count", [0, 65537])
def test_grant_counts_outside_gntdevs_limit_are_einval_without_an_ioctl(
    kernel: FakeKernel, memfd: int, count: int
) -> None:
    device = _device(kernel, memfd)
    for call in (
        lambda: device.map_grants(1, list(range(count))),
        lambda: device.dmabuf_export(1, list(range(count))),
        lambda: device.dmabuf_import_to_refs(5, count, 1),
    ):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EINVAL
    assert kernel.calls == []
    device.close()


def test_bad_grant_is_the_kernels_einval(kernel: FakeKernel, memfd: int) -> None:
    kernel.fail("IOCTL_GNTDEV_MAP_GRANT_REF", errno.EINVAL)
    device = _device(kernel, memfd)
    with pytest.raises(OSError) as info:
        device.map_grants(1, [7])
    assert info.value.errno == errno.EINVAL
    device.close()


def test_device_close_waits_for_the_last_mapping(kernel: FakeKernel, memfd: int) -> None:
    device = _device(kernel, memfd)
    fd = device.fileno()
    mapping = device.map_grants(1, [7])
    device.close()
    os.fstat(fd)  # still open: the mapping needs it for UNMAP_GRANT_REF
    with pytest.raises(OSError):
        device.map_grants(1, [8])
    mapping.close()
    assert kernel.names()[-1] == "IOCTL_GNTDEV_UNMAP_GRANT_REF"
    with pytest.raises(OSError):
        os.fstat(fd)


# --- dma-buf ioctls -------------------------------------------------------------------------


def test_dmabuf_export_packs_flags_count_domid_refs_and_returns_the_fd(
    kernel: FakeKernel, memfd: int
) -> None:
    def handler(arg: bytearray | int) -> int:
        assert isinstance(arg, bytearray)
        struct.pack_into("=I", arg, 8, 33)
        return 0

    kernel.handlers["IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS"] = handler
    device = _device(kernel, memfd)
    assert device.dmabuf_export(4, [9, 10], flags=GNTDEV_DMA_FLAG_WC) == 33
    assert kernel.calls == [
        ("IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS", struct.pack("=6I", 1, 2, 0, 4, 9, 10))
    ]
    with pytest.raises(OSError) as info:
        device.dmabuf_export(4, [9], flags=GNTDEV_DMA_FLAG_WC | GNTDEV_DMA_FLAG_COHERENT)
    assert info.value.errno == errno.EINVAL
    device.close()


@pytest.mark.parametrize(
    ("code", "expected"), [(None, True), (errno.ENOENT, True), (errno.ETIMEDOUT, False)]
)
def test_wait_released_maps_enoent_to_released_and_etimedout_to_false(
    kernel: FakeKernel, memfd: int, code: int | None, expected: bool
) -> None:
    if code is not None:
        kernel.fail("IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED", code)
    device = _device(kernel, memfd)
    assert device.dmabuf_wait_released(12, 2000) is expected
    assert kernel.calls == [("IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED", struct.pack("=II", 12, 2000))]
    device.close()


def test_wait_released_raises_other_errors(kernel: FakeKernel, memfd: int) -> None:
    kernel.fail("IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED", errno.ENOTTY)
    device = _device(kernel, memfd)
    with pytest.raises(OSError) as info:
        device.dmabuf_wait_released(12, 10)
    assert info.value.errno == errno.ENOTTY
    device.close()


def test_import_returns_the_refs_and_close_releases_what_is_left(
    kernel: FakeKernel, memfd: int
) -> None:
    def handler(arg: bytearray | int) -> int:
        assert isinstance(arg, bytearray)
        struct.pack_into("=3I", arg, 16, 501, 502, 503)
        return 0

    kernel.handlers["IOCTL_GNTDEV_DMABUF_IMP_TO_REFS"] = handler
    device = _device(kernel, memfd)
    assert device.dmabuf_import_to_refs(40, 3, 6) == [501, 502, 503]
    assert kernel.calls[0] == (
        "IOCTL_GNTDEV_DMABUF_IMP_TO_REFS",
        struct.pack("=7I", 40, 3, 6, 0, 0, 0, 0),
    )
    device.dmabuf_import_to_refs(41, 3, 6)
    device.dmabuf_import_release(40)
    assert kernel.calls[-1] == ("IOCTL_GNTDEV_DMABUF_IMP_RELEASE", struct.pack("=II", 40, 0))
    device.close()
    assert kernel.calls[-1] == ("IOCTL_GNTDEV_DMABUF_IMP_RELEASE", struct.pack("=II", 41, 0))


def test_release_of_an_unknown_import_is_the_kernels_enoent(kernel: FakeKernel, memfd: int) -> None:
    kernel.fail("IOCTL_GNTDEV_DMABUF_IMP_RELEASE", errno.ENOENT)
    device = _device(kernel, memfd)
    with pytest.raises(OSError) as info:
        device.dmabuf_import_release(99)
    assert info.value.errno == errno.ENOENT
    device.close()


# --- probing what gntdev can do ---------------------------------------------------------------


def test_probe_of_a_kernel_without_gntdev_dmabuf_says_enotty(kernel: FakeKernel) -> None:
    for name in IOCTLS:
        kernel.fail(name, errno.ENOTTY)
    support = probe_dmabuf(0, kernel)
    assert (support.export_errno, support.import_errno) == (errno.ENOTTY, errno.ENOTTY)
    assert "CONFIG_XEN_GNTDEV_DMABUF" in support.reason
    # NULL argument: the probe cannot corrupt anything.
    assert kernel.calls == [
        ("IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS", 0),
        ("IOCTL_GNTDEV_DMABUF_IMP_TO_REFS", 0),
    ]


def test_probe_of_an_x86_pv_dom0_refuses_export_but_allows_import(kernel: FakeKernel) -> None:
    kernel.fail("IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS", errno.EINVAL)
    kernel.fail("IOCTL_GNTDEV_DMABUF_IMP_TO_REFS", errno.EFAULT)
    support = probe_dmabuf(0, kernel)
    assert not support.export_supported
    assert support.import_supported
    assert "x86 PV" in support.reason


def test_probe_of_an_auto_translated_dom0_supports_both(kernel: FakeKernel) -> None:
    kernel.fail("IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS", errno.EFAULT)
    kernel.fail("IOCTL_GNTDEV_DMABUF_IMP_TO_REFS", errno.EFAULT)
    support = probe_dmabuf(0, kernel)
    assert support.export_supported and support.import_supported


def test_probed_refusal_fails_at_once_with_the_reason(kernel: FakeKernel, memfd: int) -> None:
    support = DmaBufSupport(errno.EINVAL, None, "x86 PV Dom0 cannot export")
    device = _device(kernel, memfd, support)
    with pytest.raises(OSError) as info:
        device.dmabuf_export(1, [2])
    assert info.value.errno == errno.EINVAL
    assert "x86 PV" in str(info.value)
    assert kernel.calls == []
    device.close()


# --- Dom0 dma-bufs --------------------------------------------------------------------------


def test_open_dmabuf_maps_the_whole_buffer_and_outlives_the_callers_fd(memfd: int) -> None:
    os.pwrite(memfd, b"\x01\x02", 0)
    fd = os.dup(memfd)
    before = len(os.listdir("/proc/self/fd"))
    mapping = real.open_dmabuf(fd)
    os.close(fd)
    assert len(mapping.buffer) == 64 * PAGE
    assert bytes(mapping.buffer[:2]) == b"\x01\x02"
    mapping.buffer[2] = 3
    assert os.pread(memfd, 3, 0) == b"\x01\x02\x03"
    mapping.close()
    assert mapping.closed
    assert len(os.listdir("/proc/self/fd")) == before - 1


def test_open_dmabuf_of_an_empty_file_is_einval(tmp_path: Path) -> None:
    with open(tmp_path / "empty", "wb") as empty, pytest.raises(OSError) as info:
        real.open_dmabuf(empty.fileno())
    assert info.value.errno == errno.EINVAL


def test_alloc_dmabuf_gives_udmabuf_a_sealed_memfd_of_whole_pages(kernel: FakeKernel) -> None:
    seen: dict[str, int] = {}

    def create(arg: bytearray | int) -> int:
        assert isinstance(arg, bytearray)
        memfd, flags, offset, size = struct.unpack("=IIQQ", arg)
        seen.update(flags=flags, offset=offset, size=size)
        seen["seals"] = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
        seen["fsize"] = os.fstat(memfd).st_size
        return os.dup(memfd)

    kernel.handlers["UDMABUF_CREATE"] = create
    platform = RealPlatform("/nonexistent", 0, udmabuf_path="/dev/null", ioctl=kernel)
    fd = platform.alloc_dmabuf(PAGE + 1)
    try:
        assert seen["size"] == seen["fsize"] == 2 * PAGE
        assert seen["offset"] == 0 and seen["flags"] == 1  # UDMABUF_FLAGS_CLOEXEC
        assert seen["seals"] & fcntl.F_SEAL_SHRINK
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        platform.alloc_dmabuf(0)
    assert info.value.errno == errno.EINVAL


def test_alloc_dmabuf_on_a_card_exports_a_dumb_buffer_and_closes_the_handle(
    kernel: FakeKernel,
) -> None:
    def create_dumb(arg: bytearray | int) -> int:
        assert isinstance(arg, bytearray)
        height, width, bpp = struct.unpack_from("=III", arg)
        struct.pack_into("=IIQ", arg, 16, 77, width * bpp // 8, height * width * bpp // 8)
        return 0

    def prime(arg: bytearray | int) -> int:
        assert isinstance(arg, bytearray)
        assert struct.unpack_from("=I", arg)[0] == 77
        struct.pack_into("=i", arg, 8, 55)
        return 0

    kernel.handlers["DRM_IOCTL_MODE_CREATE_DUMB"] = create_dumb
    kernel.handlers["DRM_IOCTL_PRIME_HANDLE_TO_FD"] = prime
    with RealPlatform("/nonexistent", 0, card="/dev/null", ioctl=kernel) as platform:
        assert platform.alloc_dmabuf(3 * PAGE) == 55
    height, width, bpp = struct.unpack_from("=III", kernel.calls[0][1])  # type: ignore[arg-type]
    assert height * width * bpp // 8 == 3 * PAGE
    assert kernel.names() == [
        "DRM_IOCTL_MODE_CREATE_DUMB",
        "DRM_IOCTL_PRIME_HANDLE_TO_FD",
        "DRM_IOCTL_GEM_CLOSE",
    ]
    assert kernel.calls[2][1] == struct.pack("=II", 77, 0)


# --- the platform -------------------------------------------------------------------------


def test_real_platform_objects_implement_the_interfaces(kernel: FakeKernel, memfd: int) -> None:
    platform = RealPlatform("/x", 3, ioctl=kernel)
    assert isinstance(platform, Platform)
    assert (platform.domid, platform.xenstore_path) == (3, "/x")
    channels = RealEventChannels(os.open("/dev/null", os.O_RDWR), ioctl=kernel)
    assert isinstance(channels, EventChannels)
    channels.close()
    device = _device(kernel, memfd)
    assert isinstance(device, GrantDevice)
    device.close()


def test_default_xenstore_path_prefers_the_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os.path, "exists", lambda p: p == real.DEFAULT_XENSTORED_SOCKET)
    assert real.default_xenstore_path() == "/run/xenstored/socket"
    monkeypatch.setattr(os.path, "exists", lambda p: False)
    assert real.default_xenstore_path() == "/dev/xen/xenbus"


async def test_own_domid_is_read_from_xenstore_or_is_zero(tmp_path: Path) -> None:
    async with running_xenstored(str(tmp_path)) as xs:
        assert await real.read_own_domid(xs.socket_path) == 0
        guest_socket = await xs.add_domain_socket(5)
        async with open_xenstore(xs.socket_path) as client:
            await client.write("/local/domain/5/domid", "5")
            await client.set_perms("/local/domain/5/domid", [Perm(0, "n"), Perm(5, "r")])
        assert await real.read_own_domid(guest_socket) == 5
        platform = await RealPlatform.create(guest_socket)
        assert (platform.domid, platform.xenstore_path) == (5, guest_socket)
        async with open_xenstore(xs.socket_path) as client:
            await client.write("/local/domain/5/domid", "five")
        with pytest.raises(ValueError, match="not a domain id"):
            await real.read_own_domid(guest_socket)


def test_export_einval_on_x86_says_xen_may_refuse_the_device_mapping(
    kernel: FakeKernel, memfd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(real, "_X86", True)
    kernel.fail("IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS", errno.EINVAL)
    device = _device(kernel, memfd)
    with pytest.raises(OSError) as info:
        device.dmabuf_export(1, [2])
    assert info.value.errno == errno.EINVAL
    assert "device mapping" in str(info.value)
    device.close()


def test_probe_on_x86_warns_that_a_permitted_export_will_still_fail(
    kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(real, "_X86", True)
    kernel.fail("IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS", errno.EFAULT)
    kernel.fail("IOCTL_GNTDEV_DMABUF_IMP_TO_REFS", errno.EFAULT)
    support = probe_dmabuf(0, kernel)
    assert support.export_supported
    assert "expect EINVAL" in support.reason
