"""The simulated guest in one process, the minimal test backend in another: handshake, a
request/response round trip and a flip event over real shared memory and event channels."""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection
from pathlib import Path

import trio

from displback.display.pixels import to_rgb
from displback.protocol.constants import Op, PixelFormat
from displback.protocol.xenbus import XenbusState
from displback.sim.guest import SimGuest
from displback.sim.guest_pattern import draw_pattern, pattern_rgb
from displback.sim.hypervisor import HypervisorProcess

from .test_guest import GUEST, world


async def _guest_session(hv_path: str, xs_path: str, pipe: Connection) -> None:
    async with SimGuest.open(
        hypervisor_path=hv_path, xenstore_path=xs_path, domid=GUEST,
        response_timeout=3.0, frame_done_timeout=3.1,
    ) as guest:
        await guest.wait_connected(timeout=10)
        buf = await guest.create_dumb(32, 16, 32)
        fb = await guest.add_fb(buf, 32, 16, PixelFormat.XRGB8888)
        draw_pattern(buf.buffer, width=32, height=16, pitch=buf.pitch,
                     fmt=PixelFormat.XRGB8888, connector=0, frame=5)
        await guest.set_config(0, fb)
        result = await guest.page_flip(0, fb)
        await guest.set_config(0, None)
        await guest.rm_fb(fb)
        await guest.destroy_dumb(buf)
        stats = guest.connector_stats(0)
        pipe.send((result.value, stats.flips_ok, stats.events, stats.response_timeouts))
    pipe.send(int(guest.state))


def _guest_process(hv_path: str, xs_path: str, pipe: Connection) -> None:
    trio.run(_guest_session, hv_path, xs_path, pipe)


async def _receive(pipe: Connection) -> object:
    assert await trio.to_thread.run_sync(pipe.poll, 20), "guest process said nothing"
    return pipe.recv()


async def test_guest_and_backend_in_two_processes_handshake_request_and_event(
    tmp_path: Path, hypervisor_process: HypervisorProcess
) -> None:
    async with world(tmp_path, hypervisor_process) as w:
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        child = ctx.Process(
            target=_guest_process, args=(hypervisor_process.socket_path, w.guest_xs_path, theirs)
        )
        child.start()
        try:
            assert await _receive(ours) == ("done", 1, 1, 0)
            assert await _receive(ours) == XenbusState.CLOSED
            await trio.to_thread.run_sync(child.join, 10)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()
            child.join()
        be = w.backend
        assert be.ops() == [Op.DBUF_CREATE, Op.FB_ATTACH, Op.SET_CONFIG, Op.PG_FLIP,
                            Op.SET_CONFIG, Op.FB_DETACH, Op.DBUF_DESTROY]
        # the pixels the other process drew, read through the backend's grant mapping
        _connector, _cookie, data = be.snapshots[-1]
        image = to_rgb(data, width=32, height=16, pitch=128, fourcc=PixelFormat.XRGB8888)
        assert image.rgb == pattern_rgb(32, 16, 0, 5).tobytes()
        assert be.connections == 1
        assert be.frontend_states[-2:] == [XenbusState.CLOSING, XenbusState.CLOSED]
