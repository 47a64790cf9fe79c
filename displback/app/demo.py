"""``displback demo``: the whole system on one machine, no Xen needed.

It starts the simulated machine (hypervisor, xenstored, toolstack, a virtual display), the
backend daemon exactly as it runs in Dom0, and two guests that behave like Linux's
xen-drm-front: guest 1 with guest-allocated buffers (zero-copy through dma-bufs), guest 2
with backend-allocated ones (``be-alloc=1``), two connectors each, drawing moving test
patterns. It prints a live status table (the one ``displback status`` prints), writes a PNG
of every output at the end, then shuts everything down the way a guest and an admin would
and checks that nothing leaked.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import trio

from displback.app.status import StatusModel, render_table, to_json
from displback.backend.device import BackendSettings
from displback.display.virtual import OutputConfig
from displback.sim.guest import SimGuest
from displback.sim.hypervisor import HypervisorThread, wait_for_no_leaks
from displback.sim.machine import SimMachine, sim_machine

__all__ = ["DemoGuest", "DEMO_GUESTS", "run_demo"]


@dataclass(frozen=True)
class DemoGuest:
    """One demo guest: its domain, its xl.cfg ``vdispl`` spec and its outputs' names."""

    domid: int
    spec: str
    resolutions: tuple[tuple[int, int], ...]

    def output_name(self, index: int) -> str:
        return f"guest{self.domid}-{index}"


DEMO_GUESTS = (
    DemoGuest(
        1,
        "backend=Domain-0,be-alloc=0,connectors=g1c0:800x600;g1c1:640x480",
        ((800, 600), (640, 480)),
    ),
    DemoGuest(
        2,
        "backend=Domain-0,be-alloc=1,connectors=g2c0:640x480;g2c1:480x360",
        ((640, 480), (480, 360)),
    ),
)


async def run_demo(
    *,
    seconds: float = 10.0,
    snapshots: Path | None = None,
    fps: float = 30.0,
    out: TextIO = sys.stdout,
    status_interval: float = 1.0,
) -> int:
    """Run the demo; return 0 when every flip completed and nothing leaked, else 1."""
    snapshot_dir = snapshots or Path(tempfile.mkdtemp(prefix="displback-demo-"))
    snapshot_dir.mkdir(parents=True, exist_ok=True)
    live = out.isatty()
    outputs = [
        OutputConfig(spec.output_name(i), w, h)
        for spec in DEMO_GUESTS
        for i, (w, h) in enumerate(spec.resolutions)
    ]
    assignments = {
        f"{spec.domid}/0/{i}": spec.output_name(i)
        for spec in DEMO_GUESTS
        for i in range(len(spec.resolutions))
    }
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="displback-sim-") as tmp:
        hv = HypervisorThread(str(Path(tmp) / "xen.sock"))
        try:
            async with sim_machine(
                hv, Path(tmp), outputs, settings=BackendSettings(), assignments=assignments
            ) as machine:
                print(
                    f"displback demo: {len(DEMO_GUESTS)} guests, {len(outputs)} outputs, "
                    f"{seconds:g} s at {fps:g} fps",
                    file=out,
                )
                guests: dict[int, SimGuest] = {}
                stop = trio.Event()
                async with trio.open_nursery() as nursery:
                    for spec in DEMO_GUESTS:
                        await machine.add_guest(spec.domid, spec.spec)
                        guests[spec.domid] = await nursery.start(
                            _run_guest, machine, spec, fps, stop
                        )
                    model = StatusModel(machine.backend, machine.display.outputs)
                    deadline = trio.current_time() + seconds
                    while trio.current_time() < deadline:
                        await trio.sleep(
                            min(status_interval, max(0.0, deadline - trio.current_time()))
                        )
                        table = render_table(to_json(model.report()))
                        if live:
                            out.write("\x1b[H\x1b[2J")
                        print(table, file=out, flush=True)
                        if not live:
                            print(file=out)
                    for spec in DEMO_GUESTS:
                        for i in range(len(spec.resolutions)):
                            path = snapshot_dir / f"{spec.output_name(i)}.png"
                            machine.display.outputs[spec.output_name(i)].write_png(path)
                    failures += _check_guests(guests)
                    stop.set()  # each guest unloads its driver, as on guest shutdown
                for spec in DEMO_GUESTS:
                    await machine.toolstack.remove_vdispl(spec.domid, 0)
        finally:
            leaks = await trio.to_thread.run_sync(wait_for_no_leaks, hv)
            await trio.to_thread.run_sync(hv.stop)
    print(f"snapshots: {snapshot_dir}/ ({', '.join(o.name + '.png' for o in outputs)})", file=out)
    if leaks:
        failures.append(f"leaked: {leaks}")
    for failure in failures:
        print(f"FAIL: {failure}", file=out)
    if not failures:
        print("all flips completed on time; nothing leaked", file=out)
    return 1 if failures else 0


async def _run_guest(
    machine: SimMachine, spec: DemoGuest, fps: float, stop: trio.Event, *, task_status: Any
) -> None:
    async with machine.guest(spec.domid) as guest:
        await guest.wait_connected()
        guest.start_drawing(fps=fps)
        task_status.started(guest)
        await stop.wait()


def _check_guests(guests: dict[int, SimGuest]) -> list[str]:
    failures = []
    for domid, guest in guests.items():
        for index in range(len(guest.resolutions)):
            stats = guest.connector_stats(index)
            if stats.flips_ok == 0:
                failures.append(f"dom{domid} connector {index} completed no flip")
            if stats.frame_done_timeouts or stats.flip_errors or stats.response_timeouts:
                failures.append(
                    f"dom{domid} connector {index}: {stats.frame_done_timeouts} frame-done "
                    f"timeouts, {stats.flip_errors} flip errors, "
                    f"{stats.response_timeouts} response timeouts"
                )
    return failures
