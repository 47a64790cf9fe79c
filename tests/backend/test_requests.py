"""Every displif request against the daemon, from a simulated Linux guest, and its errors."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import numpy as np
import pytest
import trio

from displback.backend.buffers import BufferKind
from displback.protocol.constants import EEXIST, EINVAL, ENOENT, PAGE_SIZE, Op, PixelFormat
from displback.protocol.pagedir import dir_pages_for
from displback.sim.guest import GuestBuffer, GuestRequestError, RequestHook
from displback.sim.guest_pattern import pattern_rgb
from displback.sim.hypervisor import HypervisorThread
from tests.backend.support import (
    XRGB,
    connected_guest,
    flip_frame,
    new_guest_buffers,
    paint,
    release,
    rgb_of,
    show,
    shown,
    store_of,
)


@pytest.mark.parametrize("fmt", list(PixelFormat), ids=lambda f: f.name)
async def test_every_linux_pixel_format_reaches_the_output_zero_copy(
    hypervisor: HypervisorThread, tmp_path: Path, fmt: PixelFormat
) -> None:
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            bufs, fbs = await show(guest, 0, 320, 240, fmt, frame=7)
            assert store_of(w, 1).buffer_info(bufs[0].cookie).kind is BufferKind.ZERO_COPY
            assert shown(w.output("A"), 320, 240) == (0, 7)
            await flip_frame(guest, 0, bufs[1], fbs[1], 8)
            assert shown(w.output("A"), 320, 240) == (0, 8)
            await release(guest, 0, bufs, fbs)
            assert guest.pending_end_access == 0


async def test_biggest_linux_buffer_uses_nine_directory_pages_and_is_shown(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    width, height = 4095, 2047
    with trio.fail_after(30):
        async with connected_guest(hypervisor, tmp_path, "connectors=c0:640x480") as (w, guest):
            buf = await guest.create_dumb(width, height, 32)
            info = store_of(w, 1).buffer_info(buf.cookie)
            assert info.npages == -(-width * 4 * height // PAGE_SIZE) == len(buf.grefs)
            assert dir_pages_for(info.npages) == len(buf.dir_grefs) == 9
            fb = await guest.add_fb(buf, width, height, XRGB)
            paint(buf, fb, connector=0, frame=3)
            await guest.set_config(0, fb)
            expected = pattern_rgb(width, height, 0, 3)[:480, :640]
            assert np.array_equal(rgb_of(w.output("A")), expected)
            await guest.set_config(0, None)
            await guest.rm_fb(fb)
            await guest.destroy_dumb(buf)
            assert guest.pending_end_access == 0


@pytest.mark.parametrize("data_ofs", [0, 192])
async def test_pending_prime_buffer_takes_its_geometry_from_fb_attach(
    hypervisor: HypervisorThread, tmp_path: Path, data_ofs: int
) -> None:
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            fmt = PixelFormat.RGB565
            size = data_ofs + 320 * 240 * fmt.cpp
            buf = await guest.import_prime(size, data_ofs)
            info = store_of(w, 1).buffer_info(buf.cookie)
            assert (info.width, info.height, info.bpp) == (0, 0, 0)
            fb = await guest.add_fb(buf, 320, 240, fmt)
            paint(buf, fb, connector=0, frame=11, pitch=320 * fmt.cpp, offset=data_ofs)
            await guest.set_config(0, fb)
            assert shown(w.output("A"), 320, 240) == (0, 11)
            paint(buf, fb, connector=0, frame=12, pitch=320 * fmt.cpp, offset=data_ofs)
            assert await guest.page_flip(0, fb) is not None
            assert shown(w.output("A"), 320, 240) == (0, 12)
            await release(guest, 0, [buf], [fb])
            assert guest.pending_end_access == 0


async def test_backend_allocated_buffers_show_what_the_guest_renders_into_them(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with connected_guest(
            hypervisor, tmp_path, "be-alloc=1,connectors=c0:320x240;c1:160x120"
        ) as (w, guest):
            assert guest.be_alloc
            bufs, fbs = await show(guest, 0, 320, 240)
            store = store_of(w, 1)
            assert store.buffer_info(bufs[0].cookie).kind is BufferKind.BACKEND
            assert bufs[0].backend_refs and not bufs[0].grefs
            assert shown(w.output("A"), 320, 240) == (0, 1)
            for frame in range(2, 5):
                await flip_frame(guest, 0, bufs[frame % 2], fbs[frame % 2], frame)
                assert shown(w.output("A"), 320, 240) == (0, frame)
            # A PRIME buffer in be-alloc mode carries the flag too; the backend allocates.
            prime = await guest.import_prime(160 * 120 * 4)
            assert store.buffer_info(prime.cookie).kind is BufferKind.BACKEND
            pfb = await guest.add_fb(prime, 160, 120, XRGB)
            paint(prime, pfb, connector=1, frame=5, pitch=160 * 4, offset=0)
            await guest.set_config(1, pfb)
            assert shown(w.output("B"), 160, 120) == (1, 5)
            await release(guest, 1, [prime], [pfb])
            await release(guest, 0, bufs, fbs)
            assert store.stats.buffers == 0


async def test_detaching_and_destroying_the_on_screen_framebuffer_keeps_the_last_frame(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            bufs, fbs = await show(guest, 0, 320, 240)
            await flip_frame(guest, 0, bufs[1], fbs[1], 2)
            await guest.rm_fb(fbs[1])  # on screen
            assert w.output("A").enabled
            assert shown(w.output("A"), 320, 240) == (0, 2)
            await guest.destroy_dumb(bufs[1])
            bufs[0].buffer[:] = bytes(len(bufs[0].buffer))  # nothing shows the guest's
            assert shown(w.output("A"), 320, 240) == (0, 2)
            # The guest can go on from another framebuffer.
            await flip_frame(guest, 0, bufs[0], fbs[0], 3)
            assert shown(w.output("A"), 320, 240) == (0, 3)
            await release(guest, 0, bufs[:1], fbs[:1])
            assert guest.pending_end_access == 0


async def test_set_config_enables_and_disables_without_an_event(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            bufs, fbs = await new_guest_buffers(guest, 320, 240, count=1)
            output = w.output("A")
            for frame in range(3):
                paint(bufs[0], fbs[0], connector=0, frame=frame)
                await guest.set_config(0, fbs[0])
                assert output.enabled
                assert shown(output, 320, 240) == (0, frame)
                await guest.set_config(0, None)
                assert not output.enabled
            # Events come only from flips (the flip queue's frame_done): the backend sent
            # none and holds none back for room on the page, so none can arrive later.
            [status] = w.backend.statuses()
            connector = status.connectors[0]
            assert connector.stats.events_sent == 0 and connector.queued_events == 0
            stats = guest.connector_stats(0)
            assert stats.events == 0 and stats.events_unexpected == 0
            assert stats.set_config_errors == 0
            await release(guest, 0, bufs, fbs)


async def test_each_flip_gets_one_event_with_consecutive_ids_on_every_connector(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    flips = 40
    with trio.fail_after(30):
        async with connected_guest(
            hypervisor, tmp_path, "connectors=c0:320x240;c1:160x120"
        ) as (w, guest):

            async def run(connector: int, width: int, height: int) -> None:
                bufs, fbs = await show(guest, connector, width, height, frame=0)
                for frame in range(1, flips + 1):
                    await flip_frame(guest, connector, bufs[frame % 2], fbs[frame % 2],
                                     frame)
                output = w.output("AB"[connector])
                assert shown(output, width, height) == (connector, flips)
                await release(guest, connector, bufs, fbs)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, 0, 320, 240)
                nursery.start_soon(run, 1, 160, 120)
            for connector in (0, 1):
                stats = guest.connector_stats(connector)
                assert stats.flips_ok == stats.events == flips
                assert stats.events_skipped == 0 and stats.events_unexpected == 0
                assert stats.frame_done_timeouts == 0 and stats.flip_errors == 0


def _preferred_mode(edid: bytes) -> tuple[int, int]:
    dtd = edid[54:72]
    width = dtd[2] | (dtd[4] >> 4) << 8
    height = dtd[5] | (dtd[7] >> 4) << 8
    return width, height


async def test_get_edid_returns_a_valid_edid_with_the_connector_resolution_preferred(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with connected_guest(
            hypervisor, tmp_path, "connectors=c0:1024x768;c1:320x240"
        ) as (w, guest):
            for connector, mode in ((0, (1024, 768)), (1, (320, 240))):
                edid = await guest.get_edid(connector)
                assert len(edid) % 128 == 0 and edid
                assert edid[:8] == bytes.fromhex("00ffffffffffff00")
                for block in range(len(edid) // 128):
                    assert sum(edid[block * 128 : (block + 1) * 128]) % 256 == 0
                assert edid[18:20] == b"\x01\x04"  # EDID 1.4
                assert edid[24] & 0x02  # first detailed timing is the preferred mode
                assert _preferred_mode(edid) == mode
            # A buffer below the 32768 bytes the spec requires is refused; the guest goes on.
            with pytest.raises(GuestRequestError) as exc:
                await guest.get_edid(0, buffer_sz=64)
            assert exc.value.errno == EINVAL
            assert _preferred_mode(await guest.get_edid(0)) == (1024, 768)


@pytest.mark.parametrize("operation", [0x00, 0x0F, 0x17, 0xFF])
async def test_unknown_operation_gets_einval_echoing_id_and_operation(
    hypervisor: HypervisorThread, tmp_path: Path, operation: int
) -> None:
    with trio.fail_after(20):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            packet = bytes([0, 0, operation]) + bytes(range(61))
            for _ in range(3):  # a response the guest did not match would time out
                with pytest.raises(GuestRequestError) as exc:
                    await guest.hostile.raw_request(0, packet)
                assert exc.value.errno == EINVAL
            stats = guest.connector_stats(0)
            assert stats.response_timeouts == 0 and stats.responses_ignored == 0
            bufs, fbs = await show(guest, 0, 320, 240, count=1)
            await flip_frame(guest, 0, bufs[0], fbs[0], 2)
            await release(guest, 0, bufs, fbs)


async def test_request_errors_leave_the_guest_working(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with connected_guest(hypervisor, tmp_path) as (w, guest):
            bufs, fbs = await new_guest_buffers(guest, 320, 240, count=1)
            buf, fb = bufs[0], fbs[0]

            async def fails(errno: int, call: object) -> None:
                with pytest.raises(GuestRequestError) as exc:
                    await call  # type: ignore[misc]
                assert exc.value.errno == errno, exc.value

            # Duplicate cookies.
            await fails(EEXIST, guest.create_dumb(64, 64, 32, cookie=buf.cookie))
            await fails(EEXIST, guest.add_fb(buf, 320, 240, XRGB, cookie=fb.cookie))
            # Unknown cookies.
            ghost = await guest.create_dumb(64, 64, 32)
            await guest.destroy_dumb(ghost)
            await fails(ENOENT, guest.add_fb(_reborn(ghost), 64, 64, XRGB))
            gone = await guest.add_fb(buf, 320, 240, XRGB)
            await guest.rm_fb(gone)
            await fails(ENOENT, guest.rm_fb(gone))
            await fails(ENOENT, guest.page_flip(0, gone))
            await fails(ENOENT, guest.set_config(0, gone))
            await fails(ENOENT, guest.destroy_dumb(_reborn(ghost)))
            # Bad format.
            await fails(EINVAL, guest.add_fb(buf, 320, 240, 0x20203859))
            # Geometry: a framebuffer wider or taller than its buffer, and sizes whose
            # products overflow 32 bits.
            await fails(EINVAL, guest.add_fb(buf, 321, 240, XRGB))
            await fails(EINVAL, guest.add_fb(buf, 320, 241, XRGB))
            guest.hostile.set_request_hook(Op.DBUF_CREATE, _patch("<III", 16, 0x8000_0000, 2, 32))
            await fails(EINVAL, guest.create_dumb(64, 64, 32))
            guest.hostile.set_request_hook(Op.DBUF_CREATE, _patch("<III", 16, 1, 0xFFFF_FFFF, 32))
            await fails(EINVAL, guest.create_dumb(64, 64, 32))
            guest.hostile.set_request_hook(Op.DBUF_CREATE, None)
            prime = await guest.import_prime(4096)
            await fails(EINVAL, guest.add_fb(prime, 0x4000_0001, 4, XRGB))
            await fails(EINVAL, guest.add_fb(prime, 32, 33, XRGB))
            await guest.destroy_dumb(prime)
            assert store_of(w, 1).stats.buffers == 1
            # Still working.
            paint(buf, fb, connector=0, frame=1)
            await guest.set_config(0, fb)
            await flip_frame(guest, 0, buf, fb, 2)
            assert shown(w.output("A"), 320, 240) == (0, 2)
            assert guest.connector_stats(0).response_timeouts == 0
            await release(guest, 0, bufs, fbs)
            assert guest.pending_end_access == 0


def _reborn(buf: GuestBuffer) -> GuestBuffer:
    """A guest-side handle of a destroyed buffer that the guest would still send requests for
    (its cookie is unknown to the backend now)."""
    twin = GuestBuffer(buf.cookie, width=buf.width, height=buf.height, bpp=buf.bpp,
                      size=buf.size, data_ofs=0, be_alloc=False, generation=buf.generation)
    return twin


def _patch(fmt: str, offset: int, *values: int) -> RequestHook:
    def hook(raw: bytes) -> bytes:
        out = bytearray(raw)
        struct.pack_into(fmt, out, offset, *values)
        return bytes(out)

    return hook


async def test_an_unforeseen_failure_fails_only_that_request_with_eio(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from displback.backend.buffers import BufferStore

    async def broken(self: object, req: object, edid: bytes) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(BufferStore, "write_edid", broken)
    with trio.fail_after(30):
        async with connected_guest(hypervisor, tmp_path, "connectors=c0:640x480") as (w, guest):
            with pytest.raises(GuestRequestError) as exc:
                await guest.get_edid(0)
            assert exc.value.errno == errno.EIO
            buf = await guest.create_dumb(64, 64, 32)  # the device still serves
            await guest.destroy_dumb(buf)
