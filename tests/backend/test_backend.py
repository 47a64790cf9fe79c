"""The backend daemon against simulated guests: handshake, every request, flips and events."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio

from displback.protocol.constants import PixelFormat
from displback.protocol.xenbus import XenbusState
from displback.sim.guest import FlipOutcome, GuestRequestError
from displback.sim.guest_pattern import decode_pattern, draw_pattern
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import sim_machine

XRGB = PixelFormat.XRGB8888


def shown(output: object) -> tuple[int, int]:
    image = output.snapshot()  # type: ignore[attr-defined]
    rgb = np.frombuffer(image.rgb, np.uint8).reshape(image.height, image.width, 3)
    return decode_pattern(rgb)


async def test_guest_connects_flips_and_its_frames_reach_the_output(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(1, "connectors=c0:640x480;c1:320x240")
            async with w.guest(1) as guest:
                await guest.wait_connected()
                assert guest.state == XenbusState.CONNECTED
                bufs = [await guest.create_dumb(640, 480, 32) for _ in range(2)]
                fbs = [await guest.add_fb(b, 640, 480, XRGB) for b in bufs]
                draw_pattern(bufs[0].buffer, width=640, height=480, pitch=bufs[0].pitch,
                             fmt=XRGB, connector=0, frame=1)
                await guest.set_config(0, fbs[0])
                assert shown(w.output("A")) == (0, 1)
                for frame in range(2, 6):
                    buf = bufs[frame % 2]
                    draw_pattern(buf.buffer, width=640, height=480, pitch=buf.pitch,
                                 fmt=XRGB, connector=0, frame=frame)
                    assert await guest.page_flip(0, fbs[frame % 2]) == FlipOutcome.DONE
                    assert shown(w.output("A")) == (0, frame)
                stats = guest.connector_stats(0)
                assert stats.flips_ok == 4 and stats.frame_done_timeouts == 0
                edid = await guest.get_edid(1)
                assert edid[:8] == bytes.fromhex("00ffffffffffff00")
                await guest.set_config(0, None)
                for fb in fbs:
                    await guest.rm_fb(fb)
                for buf in bufs:
                    await guest.destroy_dumb(buf)
                assert guest.pending_end_access == 0


async def test_unknown_cookies_get_enoent_and_the_guest_keeps_working(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(1, "connectors=c0:640x480")
            async with w.guest(1) as guest:
                await guest.wait_connected()
                buf = await guest.create_dumb(64, 64, 32)
                fb = await guest.add_fb(buf, 64, 64, XRGB)
                await guest.rm_fb(fb)
                with pytest.raises(GuestRequestError) as exc:
                    await guest.rm_fb(fb)
                assert exc.value.errno == 2
                fb = await guest.add_fb(buf, 64, 64, XRGB)
                await guest.set_config(0, fb)
                assert await guest.page_flip(0, fb) == FlipOutcome.DONE
                await guest.set_config(0, None)
                await guest.rm_fb(fb)
                await guest.destroy_dumb(buf)
