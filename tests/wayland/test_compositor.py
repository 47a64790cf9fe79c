"""displback as a client of a real compositor (weston, headless): two simulated guests, a
window each, checked pixel for pixel in weston's own screenshot; the compositor going away
and coming back while a guest flips."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import numpy as np
import trio

from displback.app.run import RunConfig, serve
from displback.backend.input import InputRouter
from displback.sim.guest import SimGuest
from displback.sim.guest_pattern import pattern_rgb
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import sim_machine
from displback.sim.platform import SimPlatform
from displback.sim.toolstack import Toolstack
from displback.sim.xenstored import running_xenstored
from displback.wayland.display import WaylandDisplay
from tests.backend.support import flip_frame, show, wait_until
from tests.wayland.weston import Weston, find_windows, load_rgb, start_weston

GUESTS = {
    1: ("backend=Domain-0,be-alloc=0,connectors=c0:320x240", (320, 240)),
    2: ("backend=Domain-0,be-alloc=1,connectors=c0:400x300", (400, 300)),
}
LAST_FRAME = 6


def _machine(hv: HypervisorThread, tmp_path: Path, socket: str):  # type: ignore[no-untyped-def]
    return sim_machine(
        hv,
        tmp_path,
        open_display=lambda _platform: WaylandDisplay.open(socket, reconnect_max_s=0.5),
        output_provider=lambda display: display,
    )


async def test_two_guests_are_two_windows_showing_their_frames_in_westons_screenshot(
    weston: Weston, hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async with _machine(hypervisor, tmp_path, weston.socket) as machine:
        display: WaylandDisplay = machine.display
        with trio.fail_after(20):
            await display.connected.wait()
            async with trio.open_nursery() as nursery:
                done = {domid: trio.Event() for domid in GUESTS}
                release = trio.Event()
                for domid, (spec, size) in GUESTS.items():
                    await machine.add_guest(domid, spec)
                    nursery.start_soon(_show_frames, machine, domid, size, done[domid], release)
                for event in done.values():
                    await event.wait()
                outputs = {o.spec.connector[0]: o for o in display.outputs.values()}  # type: ignore[index]
                assert sorted(outputs) == [1, 2]
                assert outputs[1].spec.title == "guest1: connector 0"
                assert outputs[2].spec.title == "guest2: connector 0"
                assert all(o.window_shown for o in outputs.values())
                shot_path = await trio.to_thread.run_sync(weston.screenshot, tmp_path / "shots")
                release.set()
        shot = load_rgb(shot_path)
        windows = {(w, h): (x, y) for x, y, w, h in find_windows(shot)}
        for _domid, (_spec, (w, h)) in GUESTS.items():
            assert (w, h) in windows, f"no {w}x{h} window in {shot_path}: {windows}"
            x, y = windows[(w, h)]
            shown = shot[y : y + h, x : x + w]
            assert np.array_equal(shown, pattern_rgb(w, h, 0, LAST_FRAME)), f"window at {x},{y}"
        # The evidence: the PNG, here and where $DISPLBACK_EVIDENCE_DIR says.
        evidence = [tmp_path / "wayland-two-guests.png"]
        if os.environ.get("DISPLBACK_EVIDENCE_DIR"):
            evidence.append(Path(os.environ["DISPLBACK_EVIDENCE_DIR"]) / "wayland-two-guests.png")
        for path in evidence:
            shutil.copyfile(shot_path, path)
        print(f"two guest windows: {', '.join(map(str, evidence))}")


async def _show_frames(machine, domid, size, done, release) -> None:  # type: ignore[no-untyped-def]
    w, h = size
    async with machine.guest(domid) as guest:
        await guest.wait_connected()
        bufs, fbs = await show(guest, 0, w, h, frame=1)
        for frame in range(2, LAST_FRAME + 1):
            await flip_frame(guest, 0, bufs[frame % 2], fbs[frame % 2], frame)
        stats = guest.connector_stats(0)
        assert stats.frame_done_timeouts == 0
        done.set()
        await release.wait()


async def test_guests_keep_flipping_while_the_compositor_is_gone_and_their_window_comes_back(
    weston: Weston, hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    spec, (w, h) = GUESTS[1]
    async with _machine(hypervisor, tmp_path, weston.socket) as machine:
        display: WaylandDisplay = machine.display
        with trio.fail_after(30):
            await display.connected.wait()
            await machine.add_guest(1, spec)
            async with machine.guest(1) as guest:
                await guest.wait_connected()
                bufs, fbs = await show(guest, 0, w, h, frame=1)
                output = next(iter(display.outputs.values()))
                await wait_until(lambda: output.window_shown)
                weston.stop()
                # No compositor: every flip still completes (the fallback timer), none late.
                for frame in range(2, 12):
                    await flip_frame(guest, 0, bufs[frame % 2], fbs[frame % 2], frame)
                assert display.connection is None
                assert output.timer_landings >= 10
                again = start_weston(weston.runtime_dir, name=weston.name)
                try:
                    await wait_until(lambda: display.connections == 2 and output.window_shown)
                    for frame in range(12, 15):
                        await flip_frame(guest, 0, bufs[frame % 2], fbs[frame % 2], frame)
                    shot = load_rgb(await trio.to_thread.run_sync(again.screenshot, tmp_path))
                finally:
                    again.stop()
                assert guest.connector_stats(0).frame_done_timeouts == 0
                ((x, y, fw, fh),) = find_windows(shot)
                assert (fw, fh) == (w, h)
                assert np.array_equal(shot[y : y + h, x : x + w], pattern_rgb(w, h, 0, 14))


async def test_a_minimised_windows_guest_flips_on_without_frame_callbacks(
    weston: Weston, hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    spec, (w, h) = GUESTS[1]
    async with _machine(hypervisor, tmp_path, weston.socket) as machine:
        display: WaylandDisplay = machine.display
        with trio.fail_after(30):
            await display.connected.wait()
            await machine.add_guest(1, spec)
            async with machine.guest(1) as guest:
                await guest.wait_connected()
                bufs, fbs = await show(guest, 0, w, h, frame=1)
                output = next(iter(display.outputs.values()))
                for frame in range(2, 5):  # shown: flips land on frame callbacks
                    await flip_frame(guest, 0, bufs[frame % 2], fbs[frame % 2], frame)
                assert output.timer_landings <= 1  # the first, before the window was mapped
                callbacks = output.stats.frames_shown
                assert callbacks >= 2
                window = output._window
                assert window is not None
                window.toplevel.set_minimized()  # weston's shell takes it off the output
                window.conn.flush()
                await trio.sleep(0.2)
                callbacks, timer = output.stats.frames_shown, output.timer_landings
                for frame in range(5, 25):
                    await flip_frame(guest, 0, bufs[frame % 2], fbs[frame % 2], frame)
                assert output.stats.frames_shown == callbacks
                assert output.timer_landings == timer + 20
                assert guest.connector_stats(0).frame_done_timeouts == 0


async def test_displback_run_with_display_wayland_shows_a_guest_in_a_window(
    weston: Weston, hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    spec, (w, h) = GUESTS[1]
    config = RunConfig(display="wayland", wayland_display=weston.socket, snapshot_dir=tmp_path)
    with trio.fail_after(30):
        async with running_xenstored(str(tmp_path)) as xs:
            platform = SimPlatform(hypervisor.socket_path, xs.socket_path)
            toolstack = Toolstack(xs.xenstored, init_timeout=10.0, destroy_timeout=10.0)
            try:
                async with trio.open_nursery() as nursery:
                    backend = await nursery.start(
                        functools.partial(serve, config, platform=platform)
                    )
                    toolstack.create_domain(1, "cluster")
                    await xs.add_domain_socket(1)
                    await toolstack.add_vdispl(1, spec)
                    async with SimGuest.open(
                        hypervisor_path=hypervisor.socket_path,
                        xenstore_path=xs.domain_sockets[1],
                        domid=1,
                    ) as guest:
                        await guest.wait_connected()
                        bufs, fbs = await show(guest, 0, w, h, frame=3)
                        await flip_frame(guest, 0, bufs[0], fbs[0], 4)
                        (output,) = backend.outputs.outputs.values()
                        assert output.spec.title == "cluster: connector 0"
                        # The windows' seat feeds the guests' vkbd devices through run's router.
                        assert isinstance(backend.outputs.seat.ports, InputRouter)
                        await wait_until(lambda: output.window_shown)
                        shot = load_rgb(await trio.to_thread.run_sync(weston.screenshot, tmp_path))
                        ((x, y, fw, fh),) = find_windows(shot)
                        assert (fw, fh) == (w, h)
                        assert np.array_equal(shot[y : y + h, x : x + w], pattern_rgb(w, h, 0, 4))
                    nursery.cancel_scope.cancel()
            finally:
                platform.close()


async def test_a_connector_assigned_to_a_compositor_output_is_fullscreen_on_it(
    weston: Weston, hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    spec, (w, h) = GUESTS[1]
    async with sim_machine(
        hypervisor,
        tmp_path,
        open_display=lambda _p: WaylandDisplay.open(
            weston.socket, fullscreen={"1/0/0": "headless"}
        ),
        output_provider=lambda display: display,
    ) as machine:
        display: WaylandDisplay = machine.display
        with trio.fail_after(30):
            await display.connected.wait()
            await machine.add_guest(1, spec)
            async with machine.guest(1) as guest:
                await guest.wait_connected()
                bufs, fbs = await show(guest, 0, w, h, frame=1)
                output = next(iter(display.outputs.values()))
                await wait_until(lambda: output.window_shown)
                for frame in range(2, 5):
                    await flip_frame(guest, 0, bufs[frame % 2], fbs[frame % 2], frame)
                assert output.fullscreen
                shot = load_rgb(await trio.to_thread.run_sync(weston.screenshot, tmp_path))
    # weston centres a smaller fullscreen window on black (no desktop background left).
    sh, sw = shot.shape[:2]
    x, y = (sw - w) // 2, (sh - h) // 2
    assert np.array_equal(shot[y : y + h, x : x + w], pattern_rgb(w, h, 0, 4))
    assert shot[0, 0].tolist() == [0, 0, 0] and shot[sh - 1, sw - 1].tolist() == [0, 0, 0]
