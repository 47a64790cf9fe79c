"""The machine a benchmark runs on: the simulated Xen with the hypervisor in a child process,
the backend and virtual display in this process, guests in their own processes.

:func:`bench_machine` starts :func:`displback.sim.machine.sim_machine` around a
:class:`~displback.sim.hypervisor.HypervisorProcess`, so the only things running in the
measuring process are the backend daemon, the virtual display and xenstored (plus the idle
toolstack). On the way out it checks that the hypervisor holds nothing any more.

:class:`FlipProbe` times the backend's flips from outside: it wraps ``flip`` and ``start_flip``
of one output object (instance attributes; the display's code is untouched) and keeps, per
flip, when the backend asked, when the flip returned (or called back) and the vblank it landed
at.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.guestproc import GuestHost, GuestProcess
from displback.backend.device import BackendSettings
from displback.display.interface import FlipResult, Framebuffer, LandedCallback
from displback.display.virtual import OutputConfig
from displback.sim.hypervisor import GRANT_ENTRIES, HypervisorProcess, wait_for_no_leaks
from displback.sim.machine import SimMachine, sim_machine

__all__ = ["BenchMachine", "FlipProbe", "FlipRecord", "bench_machine"]


@dataclass(frozen=True, slots=True)
class FlipRecord:
    """One ``Output.flip`` by the backend, on ``time.perf_counter``'s clock.

    ``called``: the backend asked for the flip; ``returned``: the flip call returned to the
    backend; ``vblank``: the time of the vblank the frame landed at.
    """

    called: float
    returned: float
    vblank: float


class FlipProbe:
    """Records every flip of one output (see the module docstring); :meth:`remove` undoes."""

    def __init__(self, output: Any) -> None:
        self.output = output
        self.records: list[FlipRecord] = []
        original: Callable[[Framebuffer], Awaitable[FlipResult]] = output.flip

        async def flip(fb: Framebuffer) -> FlipResult:
            called = time.perf_counter()
            result = await original(fb)
            returned = time.perf_counter()
            # trio's clock is perf_counter plus a per-run offset; FlipResult is on trio's.
            offset = trio.current_time() - time.perf_counter()
            self.records.append(FlipRecord(called, returned, result.timestamp - offset))
            return result

        setattr(output, "flip", flip)  # noqa: B010 - an instance attribute, on purpose
        start_flip: Callable[[Framebuffer, LandedCallback], bool] = output.start_flip

        def start(fb: Framebuffer, on_landed: LandedCallback) -> bool:
            called = time.perf_counter()

            def landed(result: FlipResult | None) -> None:
                returned = time.perf_counter()
                if result is not None:
                    offset = trio.current_time() - time.perf_counter()
                    self.records.append(FlipRecord(called, returned, result.timestamp - offset))
                on_landed(result)

            return start_flip(fb, landed)

        setattr(output, "start_flip", start)  # noqa: B010

    def clear(self) -> None:
        self.records.clear()

    def remove(self) -> None:
        for name in ("flip", "start_flip"):
            if name in vars(self.output):
                delattr(self.output, name)


@dataclass
class BenchMachine:
    """A running simulated machine and the guest processes started on it."""

    sim: SimMachine
    hv: HypervisorProcess
    guests: dict[int, GuestProcess] = field(default_factory=dict)

    def output(self, name: str) -> Any:
        return self.sim.display.outputs[name]

    async def start_guest(self, domid: int, spec: str) -> GuestProcess:
        """Create domain ``domid`` with vdispl ``spec``, start its guest process and wait
        until it shows its first frames on every connector."""
        await self.sim.add_guest(domid, spec)
        guest = GuestProcess.alone(self.hv.socket_path, self.sim.xs.domain_sockets[domid], domid)
        self.guests[domid] = guest
        await guest.ready()
        return guest

    async def start_guests(
        self, domids: Sequence[int], spec: str, *, per_process: int = 1
    ) -> list[GuestProcess]:
        """:meth:`start_guest` for several domains, ``per_process`` guests in each process
        (:class:`~bench.guestproc.GuestHost`), the processes starting side by side."""
        for domid in domids:
            await self.sim.add_guest(domid, spec)
        started = []
        host = None
        for i, domid in enumerate(domids):
            if i % per_process == 0:
                host = GuestHost(self.hv.socket_path)
            assert host is not None
            guest = host.add(self.sim.xs.domain_sockets[domid], domid)
            self.guests[domid] = guest
            started.append(guest)
        for guest in started:
            await guest.ready()
        return started

    async def stop_guest(self, domid: int) -> dict[str, Any]:
        """Unload the guest's driver, end its process and detach its vdispl device."""
        guest = self.guests.pop(domid)
        try:
            bye = await guest.quit()
        finally:
            guest.kill()
        await self.sim.toolstack.remove_vdispl(domid, 0)
        return bye


def connector_spec(resolutions: Sequence[tuple[int, int]], *, prefix: str = "c") -> str:
    """An xl.cfg ``vdispl`` spec for guest-allocated buffers with these connectors."""
    connectors = ";".join(f"{prefix}{i}:{w}x{h}" for i, (w, h) in enumerate(resolutions))
    return f"backend=Domain-0,be-alloc=0,connectors={connectors}"


@asynccontextmanager
async def hypervisor_process(
    tmp: Path, *, check_leaks: bool = True, grant_entries: int = GRANT_ENTRIES
) -> AsyncIterator[HypervisorProcess]:
    """A simulated hypervisor in a child process, socket in ``tmp``, stopped on the way out.

    With ``check_leaks``, raises RuntimeError on a clean exit if it still holds anything.
    ``grant_entries`` is every domain's grant table size (xl.cfg ``max_grant_frames`` × 512).
    """
    tmp.mkdir(parents=True, exist_ok=True)
    hv = HypervisorProcess(str(tmp / "xen.sock"), grant_entries=grant_entries)
    leaks: dict[str, Any] = {}
    try:
        yield hv
        if check_leaks:
            leaks = await trio.to_thread.run_sync(wait_for_no_leaks, hv)
    finally:
        await trio.to_thread.run_sync(hv.stop)
    if leaks:
        raise RuntimeError(f"the simulated hypervisor still holds resources: {leaks}")


@asynccontextmanager
async def bench_machine(
    tmp: Path,
    outputs: Sequence[OutputConfig],
    *,
    assignments: dict[str, str] | None = None,
    copy: bool = False,
    grant_entries: int = GRANT_ENTRIES,
) -> AsyncIterator[BenchMachine]:
    """A simulated machine with these outputs; ``copy`` makes Dom0 unable to export dma-bufs
    (the backend then maps guest buffers and copies every frame into dumb buffers).
    ``grant_entries``: each domain's grant table, Xen's default unless a guest needs more.

    Raises RuntimeError on the way out if the hypervisor still holds anything.
    """
    platform_options = {"dmabuf_export_supported": False} if copy else None
    async with (
        hypervisor_process(tmp, grant_entries=grant_entries) as hv,
        sim_machine(
            hv, tmp, outputs, settings=BackendSettings(), assignments=assignments,
            platform_options=platform_options,
        ) as sim,
    ):
        machine = BenchMachine(sim, hv)
        try:
            yield machine
        finally:
            with trio.CancelScope(shield=True):
                for domid in list(machine.guests):
                    await machine.stop_guest(domid)
