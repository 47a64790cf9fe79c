"""A whole simulated machine: hypervisor, xenstored, toolstack, virtual display, the backend
daemon, and guests that behave like Linux's xen-drm-front (and xen-kbdfront).

``displback demo``, the benchmark and the backend tests all start the same machine, so what
the demo shows is what the tests prove. The hypervisor is passed in (a thread or a child
process) because its owner decides how leaks are checked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from displback.backend.daemon import Backend
from displback.backend.device import BackendSettings
from displback.backend.outputs import OutputMap, OutputProvider
from displback.display.virtual import OutputConfig, VirtualDisplay
from displback.sim.guest import SimGuest
from displback.sim.guest.kbdfront import SimKbdFront
from displback.sim.hypervisor import HypervisorProcess, HypervisorThread
from displback.sim.platform import SimPlatform
from displback.sim.toolstack import Toolstack
from displback.sim.xenstored import RunningXenStored, running_xenstored


@dataclass
class SimMachine:
    hv: HypervisorThread | HypervisorProcess
    xs: RunningXenStored
    toolstack: Toolstack
    display: Any  # a VirtualDisplay unless the machine was given another
    platform: SimPlatform
    backend: Backend
    nursery: trio.Nursery
    backend_scope: trio.CancelScope
    backend_exited: trio.Event

    def output(self, name: str) -> Any:
        return self.display.outputs[name]

    async def add_guest(self, domid: int, spec: str, *, devid: int = 0) -> None:
        """Create domain ``domid`` (if new) and its vdispl device, waiting for InitWait."""
        if domid not in self.xs.domain_sockets:
            self.toolstack.create_domain(domid, f"guest{domid}")
            await self.xs.add_domain_socket(domid)
        await self.toolstack.add_vdispl(domid, spec, devid=devid)

    async def add_vkb(self, domid: int, spec: str = "", *, devid: int | None = None) -> int:
        """Create domain ``domid`` (if new) and a vkb device (xl.cfg ``vkb`` ``spec``,
        ``backend-type=linux``), waiting for InitWait; returns its device id."""
        if domid not in self.xs.domain_sockets:
            self.toolstack.create_domain(domid, f"guest{domid}")
            await self.xs.add_domain_socket(domid)
        return await self.toolstack.add_vkb(domid, spec, devid=devid)

    @asynccontextmanager
    async def kbdfront(self, domid: int, **options: Any) -> AsyncIterator[SimKbdFront]:
        """The guest's xen-kbdfront (probe on entry, unload on exit)."""
        async with SimKbdFront.open(
            hypervisor_path=self.hv.socket_path,
            xenstore_path=self.xs.domain_sockets[domid],
            domid=domid,
            **options,
        ) as front:
            yield front

    @asynccontextmanager
    async def guest(self, domid: int, **options: Any) -> AsyncIterator[SimGuest]:
        options.setdefault("response_timeout", 3.0)
        options.setdefault("frame_done_timeout", 3.1)
        options.setdefault("end_access_retry", 0.05)
        async with SimGuest.open(
            hypervisor_path=self.hv.socket_path,
            xenstore_path=self.xs.domain_sockets[domid],
            domid=domid,
            **options,
        ) as guest:
            yield guest

    async def restart_backend(self, **backend_options: Any) -> None:
        """Kill the daemon (cancel it) and start a new one, as systemd would: once the old
        one has exited (a new process could not share the old one's outputs either).
        ``backend_options`` go to the new :class:`Backend` (``fdstore``, ``inherited``)."""
        self.backend_scope.cancel()
        await self.backend_exited.wait()
        self.backend = Backend(
            self.platform, self.backend.outputs, self.backend.settings, **backend_options
        )
        self.backend_exited = trio.Event()
        self.backend_scope = await self.nursery.start(
            _run_backend, self.backend, self.backend_exited
        )


async def _run_backend(backend: Backend, exited: trio.Event, *, task_status: Any) -> None:
    try:
        with trio.CancelScope() as scope:
            await backend.run(task_status=_Started(task_status, scope))
    finally:
        exited.set()


class _Started:
    def __init__(self, status: Any, scope: trio.CancelScope) -> None:
        self._status = status
        self._scope = scope

    def started(self, value: Any = None) -> None:
        self._status.started(self._scope)


@asynccontextmanager
async def sim_machine(
    hv: HypervisorThread | HypervisorProcess,
    tmp_path: Path,
    outputs: Sequence[OutputConfig] = (
        OutputConfig("A", 640, 480),
        OutputConfig("B", 320, 240),
        OutputConfig("C", 640, 480),
        OutputConfig("D", 320, 240),
    ),
    *,
    settings: BackendSettings | None = None,
    platform_options: dict[str, Any] | None = None,
    display_options: dict[str, Any] | None = None,
    assignments: dict[str, str] | None = None,
    backend_options: dict[str, Any] | None = None,
    open_display: Callable[[SimPlatform], AbstractAsyncContextManager[Any]] | None = None,
    output_provider: Callable[[Any], OutputProvider] | None = None,
) -> AsyncIterator[SimMachine]:
    """The machine with a virtual display of ``outputs``, or the display ``open_display``
    opens (a KMS display on a fake card, say) given the platform. Guest connectors get the
    display's outputs by ``assignments`` and in order, or what ``output_provider(display)``
    hands out (a Wayland display's windows)."""
    async with running_xenstored(str(tmp_path)) as xs:
        platform = SimPlatform(hv.socket_path, xs.socket_path, **(platform_options or {}))
        opened: AbstractAsyncContextManager[Any]
        if open_display is None:
            opened = VirtualDisplay.open(
                list(outputs), dmabuf_importer=platform.open_dmabuf, **(display_options or {})
            )
        else:
            opened = open_display(platform)
        try:
            async with opened as display:
                omap = (
                    OutputMap(display.outputs, assignments)
                    if output_provider is None
                    else output_provider(display)
                )
                backend = Backend(platform, omap, settings, **(backend_options or {}))
                toolstack = Toolstack(xs.xenstored, init_timeout=10.0, destroy_timeout=10.0)
                async with trio.open_nursery() as nursery:
                    exited = trio.Event()
                    scope = await nursery.start(_run_backend, backend, exited)
                    yield SimMachine(
                        hv, xs, toolstack, display, platform, backend, nursery, scope, exited
                    )
                    nursery.cancel_scope.cancel()
        finally:
            platform.close()
