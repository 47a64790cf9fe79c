"""The arena every hostile-guest test runs in: an honest guest flipping steadily beside an
attacker guest on one simulated machine, and the invariants every attack must leave intact.

An attack is an ``async def attack(arena, guest)`` doing its worst with the attacker's
:class:`SimGuest`; :func:`run_attack` runs it and then checks what Dom0 promises:

* **the daemon keeps serving** — it never exits, the honest guest never disconnects, none of
  its flips fails or times out, and its output shows exactly the frames it flips;
* **the honest guest keeps its rate** — flips completed in a window beside the attacker are
  at least 90 % of those in a window of the same length alone (less one frame: a window
  catches whole vblanks only). The honest output refreshes at :data:`HONEST_HZ`, so the
  rate alone is the display's rate, and a shortfall means the attacker delayed the honest
  guest's requests past a vblank (:meth:`Arena.assert_rate_kept`: on a busy machine);
* **no quota is exceeded** — sampled all along, every resource of every guest domain's
  account (:class:`~displback.backend.quotas.Quota`) within its limit;
* **nothing leaks** — once the attacker's domain is destroyed, the hypervisor holds nothing
  of it (pages, grants, ports — a grant Dom0 still maps stays alive, so this also proves
  Dom0 unmapped everything) and its account is gone while the daemon still runs; the
  ``hypervisor`` fixture checks the rest after teardown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from displback.backend.buffers import BufferStore
from displback.backend.device import BackendSettings, DeviceStatus
from displback.backend.quotas import RESOURCES, Quota
from displback.display.virtual import OutputConfig
from displback.protocol.messages import Request
from displback.sim.guest import RequestHook, SimGuest
from displback.sim.hypervisor import HypervisorProcess, HypervisorThread, live_resources
from displback.sim.machine import SimMachine, sim_machine
from tests.backend.support import SPEC, show_frames, shown, wait_until

__all__ = [
    "ATTACKER",
    "Arena",
    "Attack",
    "HONEST",
    "HONEST_HZ",
    "WINDOW",
    "arena",
    "quota_violations",
    "reset_and_back",
    "rounds",
    "starved",
    "run_attack",
    "set_field",
]

HONEST = 1
ATTACKER = 2
#: The honest guest's output refresh rate: its flips complete once per vblank. The simulated
#: attacker runs in the daemon's process and event loop (its hypervisor calls block): at
#: 10 Hz a frame has 100 ms of slack, more than the attacker's heaviest own step (granting a
#: 3000-page buffer), so a lost frame still means Dom0 delayed the honest guest.
HONEST_HZ = 10.0
#: Seconds per measuring window (alone, then beside the attacker): 15 frames.
WINDOW = 1.5
#: Allowed loss of honest flips beside an attacker (the issue's 10 %).
RATE_TOLERANCE = 0.10

OUTPUTS = (
    OutputConfig("A", 320, 240, refresh_hz=HONEST_HZ),  # the honest guest's
    OutputConfig("B", 640, 480),
    OutputConfig("C", 640, 480),
    OutputConfig("D", 320, 240),
)

Attack = Callable[["Arena", SimGuest], Awaitable[None]]


def starved() -> float:
    """Seconds the calling thread has spent runnable but not running (waiting for a CPU
    other processes held): ``run_delay`` of ``/proc/thread-self/schedstat``; 0 if unknown.

    Blocking Dom0's loop (on-CPU work, or waiting for the GIL or a socket) is not counted:
    that is what the rate check is there to see."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def quota_violations(quota: Quota) -> list[str]:
    """Every resource of ``quota`` held beyond its limit."""
    usage = quota.usage()
    over = []
    for resource, limit_name in RESOURCES.items():
        limit = getattr(quota.limits, limit_name)
        if usage[resource] > limit:
            over.append(f"{resource} = {usage[resource]} > {limit}")
    return over


@dataclass
class Arena:
    """The machine, the honest guest and what was measured; handed to every attack."""

    machine: SimMachine
    honest: SimGuest
    checks: int = 0  # invariant checks that passed
    baseline: int = 0  # honest flips in one window alone
    beside: float = 0.0  # honest flips per window beside the attacker
    after: int | None = None  # honest flips in one window alone after it, if measured
    starved: float = 0.0  # seconds the daemon's thread waited for a CPU beside the attacker

    @property
    def honest_flips(self) -> int:
        return self.honest.connector_stats(0).flips_ok

    def stores(self, domid: int | None = None) -> list[BufferStore]:
        """The buffer stores of connected devices (of ``domid`` only, if given)."""
        return [s.store for s in self.machine.backend.statuses()
                if s.store is not None and (domid is None or s.domid == domid)]

    def status(self, domid: int = ATTACKER) -> DeviceStatus:
        """The daemon's status of guest ``domid``'s device 0."""
        [status] = [s for s in self.machine.backend.statuses() if s.domid == domid]
        return status

    def check(self) -> None:
        """The invariants that hold at every moment: daemon up, honest guest unharmed and
        showing its own pattern, no quota exceeded."""
        m = self.machine
        assert not m.backend_exited.is_set(), "the daemon exited"
        stats = self.honest.connector_stats(0)
        assert self.honest.stats.disconnects == 0, "the honest guest was disconnected"
        assert stats.flip_errors == 0 and stats.frame_done_timeouts == 0, stats
        assert stats.response_timeouts == 0 and stats.set_config_errors == 0, stats
        if m.output("A").current_fb is not None:
            connector, _frame = shown(m.output("A"))
            assert connector == 0, "output A shows something not drawn by the honest guest"
        for domid, account in m.backend.accounts.items():
            over = quota_violations(account)
            assert not over, f"dom{domid} over quota: {over}"
        self.checks += 1

    async def flips_in(self, seconds: float) -> int:
        """Honest flips completed in the next ``seconds``, checking invariants meanwhile."""
        start = self.honest_flips
        deadline = trio.current_time() + seconds
        while trio.current_time() < deadline:
            await trio.sleep(min(0.05, max(0.0, deadline - trio.current_time())))
            self.check()
        return self.honest_flips - start

    async def assert_rate_kept(self, flips: int, seconds: float, starved: float = 0.0
                               ) -> None:
        """Beside the attacker (gone by now) the honest guest completed ``flips`` in
        ``seconds``: at least 90 % of its rate alone, less one frame.

        The cores are shared (CI, other jobs), so two allowances keep a busy machine from
        passing for an attacker: the vblanks of the ``starved`` seconds the daemon's thread
        waited for a CPU held by other processes (:func:`starved`) are not counted against
        it; and should the rate still fall short, the rate alone is measured once more, now
        that the attacker has left, and the lower of the two baselines counts. A slowdown the
        attacker caused shows in neither."""
        self.beside = flips * WINDOW / seconds
        self.starved = starved
        excused = starved * HONEST_HZ * WINDOW / seconds
        baseline = self.baseline
        if self.beside + excused < (1 - RATE_TOLERANCE) * baseline - 1:
            self.after = await self.flips_in(WINDOW)
            baseline = min(baseline, self.after)
        floor = (1 - RATE_TOLERANCE) * baseline - 1
        assert self.beside + excused >= floor, (
            f"honest flips per {WINDOW} s: {self.baseline} alone before, {self.after} "
            f"after, {self.beside:.1f} beside the attacker, {excused:.1f} excused for "
            f"{starved:.3f} s without a CPU (at least {floor:.1f} expected)"
        )

    async def attacker_gone(self, domid: int = ATTACKER) -> None:
        """Destroy the attacker's domain, then require the daemon to have dropped its
        device and the hypervisor to hold nothing of the domain."""
        m = self.machine
        if domid in m.xs.domain_sockets:
            await m.toolstack.destroy_domain(domid)
        await wait_until(lambda: all(s.domid != domid for s in m.backend.statuses()))
        await wait_until(lambda: domid not in m.backend.accounts)  # nothing left charged
        # Dom0 grants only with be-alloc, which the honest guest does not use: none may be
        # left to the attacker (a be-alloc page it still maps would keep its grant alive).
        while (await trio.to_thread.run_sync(m.hv.counters))["domains"][0]["grants"]:
            await trio.sleep(0.05)
        while f"dom{domid}" in live_resources(await trio.to_thread.run_sync(m.hv.counters)):
            await trio.sleep(0.05)  # the caller's fail_after bounds the wait
        self.check()


async def _draw(guest: SimGuest, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await guest.draw(0, fps=1000.0)  # as fast as the vblanks let it


@asynccontextmanager
async def arena(
    hypervisor: HypervisorThread | HypervisorProcess,
    tmp_path: Path,
    *,
    settings: BackendSettings | None = None,
    **machine_options: Any,
) -> AsyncIterator[Arena]:
    """A machine whose honest guest (domain 1, output A) flips as fast as output A's vblanks
    allow; the block gets the arena once the baseline (flips per window alone) is known.

    On leaving: the honest guest stops drawing and shows three more frames, each checked
    on output A."""
    async with sim_machine(hypervisor, tmp_path, OUTPUTS, settings=settings,
                           assignments={f"{HONEST}/0/0": "A"}, **machine_options) as m:
        await m.add_guest(HONEST, SPEC)
        async with m.guest(HONEST) as honest, trio.open_nursery() as nursery:
            await honest.wait_connected()
            scope = await nursery.start(_draw, honest)
            a = Arena(m, honest)
            await wait_until(lambda: a.honest_flips >= 3)
            a.baseline = await a.flips_in(WINDOW)
            assert a.baseline >= 0.5 * HONEST_HZ * WINDOW, f"baseline {a.baseline}"
            yield a
            a.check()
            scope.cancel()
            await wait_until(lambda: m.output("A").current_fb is None)
            await show_frames(m, honest, 1000, count=3, output="A")
            a.check()


async def run_attack(
    hypervisor: HypervisorThread | HypervisorProcess,
    tmp_path: Path,
    attack: Attack,
    *,
    spec: str = SPEC,
    crash: bool = False,
    timeout: float = 60.0,
    settings: BackendSettings | None = None,
    machine_options: dict[str, Any] | None = None,
    before: Callable[[Arena], None] | None = None,
    **guest_options: Any,
) -> Arena:
    """Run ``attack`` with the attacker (domain 2, vdispl ``spec``, connected) beside the
    honest guest, measuring the honest rate over at least one window; then the attacker
    leaves (crashes if ``crash``, else unloads its driver), its domain is destroyed, and
    every invariant is checked. ``before(arena)`` runs once the baseline is measured, before
    the attacker's device exists. Returns the arena for attack-specific assertions."""
    with trio.fail_after(timeout):
        async with arena(hypervisor, tmp_path, settings=settings,
                         **(machine_options or {})) as a:
            m = a.machine
            if before is not None:
                before(a)
            await m.add_guest(ATTACKER, spec)
            start_flips, start, start_starved = a.honest_flips, trio.current_time(), starved()
            async with m.guest(ATTACKER, **guest_options) as bad:
                await bad.wait_connected()
                async with trio.open_nursery() as nursery:
                    done = trio.Event()

                    async def watch() -> None:
                        while not done.is_set():
                            a.check()
                            await trio.sleep(0.05)

                    nursery.start_soon(watch)
                    await attack(a, bad)
                    done.set()
                rest = start + WINDOW - trio.current_time()
                if rest > 0:
                    await a.flips_in(rest)
                elapsed = trio.current_time() - start
                flips = a.honest_flips - start_flips
                starving = starved() - start_starved
                if crash:
                    bad.crash()
            await a.attacker_gone()
            await a.assert_rate_kept(flips, elapsed, starving)
    return a


async def reset_and_back(a: Arena, g: SimGuest, *, resets: int = 1) -> None:
    """The attacker's device was reset for a protocol violation; after the back-off it
    serves the attacker again (frames checked on output B)."""
    await wait_until(lambda: g.stats.disconnects >= resets)
    assert a.status(g.domid).violations >= resets
    await g.wait_connected()
    await show_frames(a.machine, g, 50, count=2, output="B")


def set_field(cls: type[Request], name: str, value: int) -> RequestHook:
    """A request hook writing ``value`` into field ``name`` of every ``cls`` request."""
    offset, size = cls._LAYOUT.offsets[name], cls._LAYOUT.sizes[name]

    def hook(raw: bytes) -> bytes:
        out = bytearray(raw)
        out[offset : offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        return bytes(out)

    return hook


def rounds(seconds: float) -> Callable[[], bool]:
    """A predicate true until ``seconds`` have passed: ``while more(): ...`` in floods."""
    deadline = trio.current_time() + seconds
    return lambda: trio.current_time() < deadline

