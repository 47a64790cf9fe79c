"""``python -m bench.wayland_pacing``: a guest that flips as fast as it can, in a window of a
real compositor (weston, headless, 60 Hz), shown and then hidden.

Issue 14's goal: with the window shown the guest gets about as many ``EVT_PG_FLIP`` a second
as the compositor shows frames (its flips land on ``wl_surface.frame`` callbacks), and with
the window hidden its flips still complete — on the display's fallback timer at
``wayland_refresh_hz`` — with no frame-done timeout in the guest. Three phases of
``--seconds`` each on one weston and one simulated guest (one 640x480 connector, copy mode):

* **shown**: the window on screen;
* **minimised**: the window minimised (``xdg_toplevel.set_minimized``): weston's desktop
  shell takes it off every output, so no frame callbacks;
* **output asleep**: weston's idle timeout (``idle-time``) put its output to sleep (a second
  weston, started with ``idle-time=1``, and the phase begins once it slept): nothing is
  repainted, no frame callbacks for any window.

Printed per phase: guest events per second, frames the compositor called back per second,
flips landed by the fallback timer, the guest's frame-done timeouts; ``--json`` writes them.
The numbers depend on the machine's load (printed): quote them with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from displback.app.logs import configure_logging
from displback.sim.hypervisor import HypervisorThread
from displback.sim.machine import sim_machine
from displback.wayland.display import WaylandDisplay
from displback.wayland.window import WaylandOutput
from tests.wayland.weston import running_weston

SPEC = "backend=Domain-0,be-alloc=0,connectors=c0:640x480"


async def _phase(name: str, output: WaylandOutput, guest: Any, seconds: float) -> dict[str, Any]:
    stats = guest.connector_stats(0)
    flips, timeouts = stats.flips_ok, stats.frame_done_timeouts
    frames, timer = output.stats.frames_shown, output.timer_landings
    start = trio.current_time()
    await trio.sleep(seconds)
    elapsed = trio.current_time() - start
    return {
        "phase": name,
        "seconds": round(elapsed, 2),
        "events_per_s": round((stats.flips_ok - flips) / elapsed, 1),
        "frame_callbacks_per_s": round((output.stats.frames_shown - frames) / elapsed, 1),
        "timer_landings": output.timer_landings - timer,
        "frame_done_timeouts": stats.frame_done_timeouts - timeouts,
    }


async def _until_no_callbacks(output: WaylandOutput, quiet: float = 0.5) -> None:
    """Wait (at most 20 s) until the compositor has called no frame back for ``quiet`` s."""
    with trio.fail_after(20):
        while True:
            frames = output.stats.frames_shown
            await trio.sleep(quiet)
            if output.stats.frames_shown == frames:
                return


async def _measure(
    weston_socket: str, phases: Sequence[str], seconds: float
) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="displback-pacing-") as tmp:
        hv = HypervisorThread(str(Path(tmp) / "xen.sock"))
        try:
            async with sim_machine(
                hv,
                Path(tmp),
                open_display=lambda _p: WaylandDisplay.open(weston_socket),
                output_provider=lambda display: display,
            ) as machine:
                display: WaylandDisplay = machine.display
                with trio.fail_after(20):
                    await display.connected.wait()
                await machine.add_guest(1, SPEC)
                async with machine.guest(1) as guest:
                    await guest.wait_connected()
                    guest.start_drawing(fps=0)  # flip as fast as the events come
                    output = next(iter(display.outputs.values()))
                    with trio.fail_after(20):
                        while not output.window_shown:
                            await trio.sleep(0.05)
                    await trio.sleep(1.0)  # settle
                    for phase in phases:
                        if phase == "minimised":
                            window = output._window
                            assert window is not None
                            window.toplevel.set_minimized()
                            window.conn.flush()
                            await trio.sleep(0.5)
                        if phase == "output asleep":
                            await _until_no_callbacks(output)
                        results.append(await _phase(phase, output, guest, seconds))
        finally:
            await trio.to_thread.run_sync(hv.stop)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wayland_pacing", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase (5)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    configure_logging("warning")
    load = os.getloadavg()
    results = []
    with running_weston() as weston:
        results += trio.run(_measure, weston.socket, ("shown", "minimised"), args.seconds)
    with running_weston(idle_time=1) as weston:
        results += trio.run(_measure, weston.socket, ("output asleep",), args.seconds)
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (before the run)")
    print(f"{'phase':<15}{'events/s':>10}{'callbacks/s':>13}{'timer':>8}{'timeouts':>10}")
    for r in results:
        print(
            f"{r['phase']:<15}{r['events_per_s']:>10}{r['frame_callbacks_per_s']:>13}"
            f"{r['timer_landings']:>8}{r['frame_done_timeouts']:>10}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"load": load, "phases": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
