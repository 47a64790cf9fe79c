"""Flip-path benchmarks with guests in their own processes: the PG_FLIP → EVT_PG_FLIP round
trip and the backend's share of it, backend CPU time per flip, how many 60 fps connectors
the machine sustains, and what a hostile guest's copies cost an honest guest.

Each function starts its own simulated machine (:func:`bench.machine.bench_machine`): the
measuring process holds only the backend, the virtual display and xenstored, so its CPU time
(``time.process_time``, all threads) is the backend's.
"""

from __future__ import annotations

import cProfile
import io
import multiprocessing
import os
import pstats
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench.guestproc import FlipLog
from bench.machine import FlipProbe, FlipRecord, bench_machine, connector_spec
from bench.report import busy_percent, cpu_jiffies, percentile
from displback.backend.copies import CopyWorkers
from displback.display.virtual import OutputConfig
from displback.protocol.constants import PAGE_SIZE
from displback.sim.hypervisor import GRANT_ENTRIES, HypervisorProcess
from displback.sim.platform import SimDomain, SimEventChannels, SimPlatform

__all__ = [
    "TimedCopyWorkers", "capacity", "cpu_per_flip", "echo_round_trip", "fairness",
    "flip_round_trip", "largest_passing", "profile_text", "trio_two_wakeups_cost",
    "trio_wakeup_cost",
]


def _ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values]
    return {
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "mean_ms": sum(ms) / len(ms) if ms else float("nan"),
        "max_ms": max(ms) if ms else float("nan"),
    }


async def flip_round_trip(
    tmp: Path, *, flips: int = 1000, refresh_hz: float = 1000.0,
    size: tuple[int, int] = (1920, 1080), warmup: int = 50,
) -> dict[str, Any]:
    """Round trip of ``flips`` page flips as one guest process sees them, split into what the
    display waited for and what is left: the backend's overhead.

    Per flip, on one clock (``CLOCK_MONOTONIC`` in both processes): the guest sends PG_FLIP
    (``sent``), the backend calls ``Output.flip`` (``called``), the flip returns at its
    vblank (``returned``), the guest has its EVT_PG_FLIP (``done``). Round trip =
    ``done - sent``; overhead = ``(called - sent) + (done - returned)``: everything but the
    display's wait, i.e. ring, request handling, event page, both event channels and both
    processes' wake-ups.
    """
    width, height = size
    outputs = [OutputConfig("rt", width, height, refresh_hz=refresh_hz)]
    async with bench_machine(tmp, outputs) as machine:
        probe = FlipProbe(machine.output("rt"))
        guest = await machine.start_guest(1, connector_spec([size]))
        await guest.flip(warmup)
        probe.clear()
        (log,) = await guest.flip(flips, record=True)
        records = list(probe.records)
        probe.remove()
    return _split_round_trips(log, records, refresh_hz)


def _split_round_trips(
    log: FlipLog, records: list[FlipRecord], refresh_hz: float
) -> dict[str, Any]:
    if len(log.times) != len(records):
        raise RuntimeError(
            f"{len(log.times)} guest flips but {len(records)} display flips: cannot pair them"
        )
    round_trip, request_leg, event_leg, display, late = [], [], [], [], []
    for (sent, done), rec in zip(log.times, records, strict=True):
        if not sent <= rec.called <= rec.returned <= done:
            raise RuntimeError(f"flip times out of order: {sent}, {rec}, {done}")
        round_trip.append(done - sent)
        request_leg.append(rec.called - sent)
        event_leg.append(done - rec.returned)
        display.append(rec.returned - rec.called)
        late.append(rec.returned - rec.vblank)
    overhead = [a + b for a, b in zip(request_leg, event_leg, strict=True)]
    return {
        "flips": len(round_trip),
        "refresh_hz": refresh_hz,
        "not_done": log.not_done,
        "round_trip": _ms(round_trip),
        "overhead": _ms(overhead),
        "request_leg": _ms(request_leg),
        "event_leg": _ms(event_leg),
        "display_wait": _ms(display),
        "vblank_task_lateness": _ms(late),
    }


async def echo_round_trip(tmp: Path, *, rounds: int = 1000, warmup: int = 50) -> dict[str, Any]:
    """The floor under the flip overhead: one notification answered with one notification.

    A process of its own plays the guest with trio, as the flip guests do: it binds an
    event channel to Dom0, then ``rounds`` times notifies and waits until the answer fires.
    This process answers as the backend's reader does — woken on the event-channel fd, it
    reads the pending port, notifies back and unmasks — on the same simulated hypervisor.
    The guest's send → answer times are the "echo"; a flip's overhead (request leg + event
    leg) is the same two notifications and wake-ups plus the backend's work.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    hv = HypervisorProcess(str(tmp / "xen.sock"))
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_echo_guest_main, args=(hv.socket_path, 1, rounds + warmup, theirs),
                       daemon=True, name="bench-echo-guest")
    try:
        with SimPlatform(hv.socket_path, str(tmp / "no-xenstore")) as platform:
            evtchn = platform.open_event_channels()
            try:
                proc.start()
                theirs.close()
                remote = await trio.to_thread.run_sync(_receive, ours, "port")
                port = evtchn.bind_interdomain(1, remote)
                evtchn.read_pending()  # a new binding starts pending once
                evtchn.unmask([port])
                ours.send(("go", None))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_answer_notifications, evtchn, port)
                    times = await trio.to_thread.run_sync(_receive, ours, "times")
                    nursery.cancel_scope.cancel()
            finally:
                evtchn.close()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        await trio.to_thread.run_sync(hv.stop)
    echo = [done - sent for sent, done in times[warmup:]]
    return {"rounds": len(echo), "echo": _ms(echo)}


def _receive(conn: Any, expected: str) -> Any:
    if not conn.poll(60):
        raise RuntimeError(f"the echo guest sent no {expected!r} within 60 s")
    kind, payload = conn.recv()
    if kind != expected:
        raise RuntimeError(f"the echo guest: expected {expected!r}, got {kind!r}: {payload}")
    return payload


async def _answer_notifications(evtchn: SimEventChannels, port: int) -> None:
    while True:
        await trio.lowlevel.wait_readable(evtchn.fileno())
        fired = evtchn.read_pending()
        if port in fired:
            evtchn.notify(port)
        evtchn.unmask(fired)


def _echo_guest_main(hv_path: str, domid: int, rounds: int, conn: Any) -> None:
    try:
        times = trio.run(_echo_guest, hv_path, domid, rounds, conn)
        conn.send(("times", times))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise


async def _echo_guest(
    hv_path: str, domid: int, rounds: int, conn: Any
) -> list[tuple[float, float]]:
    with SimDomain(hv_path, domid) as domain:
        evtchn = domain.open_event_channels()
        try:
            port = evtchn.bind_unbound_port(0)
            conn.send(("port", port))
            await trio.to_thread.run_sync(_receive, conn, "go")
            evtchn.unmask(evtchn.read_pending())  # anything the binding left pending
            times = []
            for _ in range(rounds):
                sent = time.perf_counter()
                evtchn.notify(port)
                fired: list[int] = []
                while port not in fired:
                    await trio.lowlevel.wait_readable(evtchn.fileno())
                    fired = evtchn.read_pending()
                    evtchn.unmask(fired)
                times.append((sent, time.perf_counter()))
            return times
        finally:
            evtchn.close()


@dataclass
class _Usage:
    """Process CPU (all threads) and wall time at one instant."""

    cpu: float
    user: float
    system: float
    wall: float

    @classmethod
    def now(cls) -> _Usage:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return cls(time.process_time(), ru.ru_utime, ru.ru_stime, time.perf_counter())

    def since(self, start: _Usage) -> dict[str, float]:
        return {
            "cpu_s": self.cpu - start.cpu,
            "user_s": self.user - start.user,
            "system_s": self.system - start.system,
            "wall_s": self.wall - start.wall,
        }


async def cpu_per_flip(
    tmp: Path, *, size: tuple[int, int], copy: bool, seconds: float = 4.0,
    warmup: float = 1.0, idle_seconds: float = 1.0, profile: cProfile.Profile | None = None,
) -> dict[str, Any]:
    """Backend CPU per flip while one guest process flips a ``size`` connector at 60 fps.

    ``copy``: Dom0 cannot export dma-bufs, so each flip also copies the frame. The idle
    cost (the guest connected and showing, not flipping) is measured first, for reference.
    ``profile``, if given, runs during the measured window.
    """
    width, height = size
    outputs = [OutputConfig("cpu", width, height)]
    async with bench_machine(tmp, outputs, copy=copy) as machine:
        output = machine.output("cpu")
        guest = await machine.start_guest(1, connector_spec([size]))
        store = machine.sim.backend.statuses()[0].store
        kinds = None if store is None else store.stats
        await trio.sleep(0.2)
        idle_start = _Usage.now()
        await trio.sleep(idle_seconds)
        idle = _Usage.now().since(idle_start)
        await guest.start_flipping()
        await trio.sleep(warmup)
        flips0, missed0 = output.stats.flips_completed, output.stats.missed_vblanks
        start = _Usage.now()
        if profile is not None:
            profile.enable()
        await trio.sleep(seconds)
        if profile is not None:
            profile.disable()
        used = _Usage.now().since(start)
        flips = output.stats.flips_completed - flips0
        missed = output.stats.missed_vblanks - missed0
        logs = await guest.stop()
        stats = await guest.stats()
    per_flip = used["cpu_s"] / flips if flips else float("nan")
    return {
        "width": width,
        "height": height,
        "mode": "copy" if copy else "zero-copy",
        "buffers": None if kinds is None else {"zero_copy": kinds.zero_copy, "copy": kinds.copy},
        "flips": flips,
        "fps": flips / used["wall_s"],
        "missed_vblanks": missed,
        "guest_not_done": sum(log.not_done for log in logs),
        "frame_done_timeouts": sum(s["frame_done_timeouts"] for s in stats),
        "window": used,
        "cpu_per_flip_us": per_flip * 1e6,
        "percent_of_core_per_60fps": per_flip * 60 * 100,
        "idle_percent_of_core": 100 * idle["cpu_s"] / idle["wall_s"],
    }


async def trio_wakeup_cost(*, seconds: float = 2.0, rate: float = 60.0) -> dict[str, Any]:
    """The floor this machine puts under any trio program: CPU of a bare task sleeping until
    the next tick ``rate`` times a second (one timer wake-up per tick, nothing else)."""
    start = _Usage.now()
    deadline = trio.current_time()
    wakeups = 0
    while wakeups < seconds * rate:
        deadline += 1.0 / rate
        await trio.sleep_until(deadline)
        wakeups += 1
    used = _Usage.now().since(start)
    return {
        "rate_hz": rate,
        "wakeups": wakeups,
        "window": used,
        "cpu_per_wakeup_us": 1e6 * used["cpu_s"] / wakeups,
        "percent_of_core": 100 * used["cpu_s"] / used["wall_s"],
    }


# The other side of trio_two_wakeups_cost: a pipe written ``gap`` s after each tick, from
# another process so that its CPU is not counted.
_LATE_WRITER = """
import os, sys, time
fd, start, rate, gap, count = sys.argv[1:]
fd, start, rate, gap, count = int(fd), float(start), float(rate), float(gap), int(count)
for k in range(1, count + 1):
    delay = start + k / rate + gap - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    os.write(fd, b"x")
"""


async def trio_two_wakeups_cost(
    *, seconds: float = 2.0, rate: float = 60.0, gap: float = 0.0003
) -> dict[str, Any]:
    """The floor of a flip whose request and display event come at different times: CPU of a
    bare trio task woken twice per tick, ``rate`` times a second — by its timer (the
    vblank), then by a pipe another process writes ``gap`` s later (the guest's next
    request, which it sends once the previous flip's event came: 0.2–0.5 ms later in the
    bench's guests). Nothing else is done but reading the byte."""
    count = max(3, int(seconds * rate))
    reader, writer = os.pipe()
    os.set_blocking(reader, False)
    start = time.monotonic() + 0.2  # (the writer's interpreter starts meanwhile)
    peer = subprocess.Popen(
        [sys.executable, "-c", _LATE_WRITER, str(writer), repr(start), repr(rate), repr(gap),
         str(count)],
        pass_fds=(writer,),
    )  # fmt: skip
    os.close(writer)
    # trio's clock is CLOCK_MONOTONIC (perf_counter) plus an offset.
    offset = trio.current_time() - time.monotonic()
    begin: _Usage | None = None
    try:
        # (A writer that died would leave the pipe silent: fail rather than wait forever.)
        with trio.fail_after(0.2 + count / rate + 30):
            for k in range(1, count + 1):
                await trio.sleep_until(start + k / rate + offset)
                if k == 2:  # the first tick warmed up
                    begin = _Usage.now()
                await trio.lowlevel.wait_readable(reader)
                os.read(reader, 64)
        assert begin is not None
        used = _Usage.now().since(begin)
    finally:
        os.close(reader)
        peer.wait(timeout=60)
    ticks = count - 1
    return {
        "rate_hz": rate,
        "gap_ms": gap * 1000,
        "ticks": ticks,
        "window": used,
        "cpu_per_tick_us": 1e6 * used["cpu_s"] / ticks,
        "percent_of_core": 100 * used["cpu_s"] / used["wall_s"],
    }


#: The capacity run's outputs are spread over this many vblank phases (quarter periods): out
#: of step like a real multi-head card's heads, while the virtual display's clock and each
#: guest process wake at most 4 times and once a period (a phase per output would cost a
#: timer wake-up per output, in the backend and in the guest processes).
CAPACITY_PHASES = 4


async def capacity(
    tmp: Path, *, copy: bool = False, max_connectors: int = 64, connectors_per_guest: int = 2,
    size: tuple[int, int] = (1024, 768), stride: int = 8, window: float = 3.0,
    settle: float = 1.5, min_fps: float = 59.5, attempts: int = 2, guests_per_process: int = 4,
    phases: int = CAPACITY_PHASES, profile: cProfile.Profile | None = None,
) -> dict[str, Any]:
    """The largest number of ``size`` connectors held at 60 fps, found by stepping up and
    then bisecting.

    The outputs are heads out of step, as on a real multi-head card: the outputs of the
    ``k``-th guest process have vblank phase ``(k mod phases) / phases`` (``phases=1``: all
    in phase, every connector's flips and copies in the same millisecond after the one
    vblank). The guests of one process share a phase so that the process still wakes once
    a period, as each guest of a real host would on its own vCPUs.

    Guest processes (``connectors_per_guest`` connectors each, pre-drawn buffers flipped as
    each flip's event arrives; zero-copy, or ``copy`` when Dom0 cannot export) are added
    ``stride`` connectors at a time while every step passes, up to ``max_connectors``; after
    the first failing step the count is bisected between the last passing and the failing
    one, stopping or adding guests. A step passes when, over one ``window`` of seconds, every
    connector achieved ``min_fps``, no output missed a vblank and no guest saw a frame-done
    timeout, a failed flip or a response timeout; a step gets up to ``attempts`` windows, so
    one disturbance from outside (the machine is shared) does not decide it. Each step also
    records the CPU of the backend, the guest processes and the hypervisor process.
    ``profile``, if given, runs during the windows of the largest count tried.
    """
    max_guests = max_connectors // connectors_per_guest
    guest_stride = max(1, stride // connectors_per_guest)
    names = {
        (domid, i): f"g{domid}c{i}"
        for domid in range(1, max_guests + 1) for i in range(connectors_per_guest)
    }
    outputs = [
        OutputConfig(name, *size, phase=((domid - 1) // guests_per_process % phases) / phases)
        for (domid, _i), name in names.items()
    ]
    assignments = {f"{domid}/0/{i}": name for (domid, i), name in names.items()}
    steps: list[dict[str, Any]] = []
    busy0 = cpu_jiffies()
    await trio.sleep(min(1.0, window))
    before = busy_percent(busy0, cpu_jiffies())
    started = time.perf_counter()
    spec = connector_spec([size] * connectors_per_guest)
    async with bench_machine(tmp, outputs, assignments=assignments, copy=copy) as machine:

        async def measure(guests: int) -> bool:
            running = sorted(machine.guests)
            for domid in running[guests:][::-1]:
                await machine.stop_guest(domid)
            new = list(range(len(running) + 1, guests + 1))
            for guest in await machine.start_guests(new, spec, per_process=guests_per_process):
                await guest.start_flipping()
            await trio.sleep(settle)
            active = [name for (d, _i), name in names.items() if d <= guests]
            use_profile = profile if guests == max_guests else None
            tries = []
            for _ in range(attempts):
                tries.append(await _measure_step(machine, active, window, min_fps, use_profile))
                if tries[-1]["passed"]:
                    break
            steps.append({**tries[-1], "windows": len(tries), "earlier_windows": tries[:-1]})
            passed: bool = tries[-1]["passed"]
            return passed

        low = await largest_passing(measure, max_guests, guest_stride)
    return {
        "mode": "copy" if copy else "zero-copy",
        "size": list(size),
        "connectors_per_guest": connectors_per_guest,
        "guests_per_process": guests_per_process,
        "vblank_phases": phases,
        "max_connectors_tried": max_guests * connectors_per_guest,
        "stride_connectors": guest_stride * connectors_per_guest,
        "fps_required": min_fps,
        "window_s": window,
        "attempts_per_step": attempts,
        "machine_busy_percent_before": before,
        "largest_passing_connectors": low * connectors_per_guest,
        "cap_reached": low == max_guests,
        "seconds": time.perf_counter() - started,
        "steps": steps,
    }


async def largest_passing(
    measure: Callable[[int], Awaitable[bool]], most: int, stride: int
) -> int:
    """The largest ``n`` in 0..``most`` for which ``measure(n)`` passes, assuming that
    passing is monotonic: ``n`` = stride, 2·stride, … while they pass (``most`` last), then
    bisection between the last passing and the first failing ``n``."""
    low, high = 0, most + 1  # low passes (nothing to hold), high fails
    n = min(stride, most)
    while n < high:
        if not await measure(n):
            high = n
            break
        low = n
        n = min(n + stride, most) if n < most else high
    while high - low > 1:
        middle = (low + high) // 2
        if await measure(middle):
            low = middle
        else:
            high = middle
    return low


def _process_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (``/proc/PID/stat``)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


async def _measure_step(
    machine: Any, active: list[str], window: float, min_fps: float,
    profile: cProfile.Profile | None = None,
) -> dict[str, Any]:
    outputs = [machine.output(name) for name in active]
    guests = list(machine.guests.values())
    guest_pids = sorted({g.pid for g in guests})
    before_stats = [await g.stats() for g in guests]
    flips0 = [o.stats.flips_completed for o in outputs]
    missed0 = [o.stats.missed_vblanks for o in outputs]
    busy0 = cpu_jiffies()
    guests0, hv0 = _process_cpu_s(guest_pids), _process_cpu_s([machine.hv.pid])
    start = _Usage.now()
    if profile is not None:
        profile.enable()
    await trio.sleep(window)
    if profile is not None:
        profile.disable()
    used = _Usage.now().since(start)
    guests_cpu = _process_cpu_s(guest_pids) - guests0
    hv_cpu = _process_cpu_s([machine.hv.pid]) - hv0
    busy = busy_percent(busy0, cpu_jiffies())
    fps = [
        (o.stats.flips_completed - f0) / used["wall_s"]
        for o, f0 in zip(outputs, flips0, strict=True)
    ]
    missed = sum(o.stats.missed_vblanks - m0 for o, m0 in zip(outputs, missed0, strict=True))
    after_stats = [await g.stats() for g in guests]
    failures = 0
    for before, after in zip(before_stats, after_stats, strict=True):
        for b, a in zip(before, after, strict=True):
            for key in ("frame_done_timeouts", "flip_errors", "response_timeouts"):
                failures += a[key] - b[key]
    passed = min(fps) >= min_fps and missed == 0 and failures == 0
    return {
        "guests": len(guests),
        "connectors": len(outputs),
        "min_fps": min(fps),
        "mean_fps": sum(fps) / len(fps),
        "missed_vblanks": missed,
        "failed_flips": failures,
        "backend_percent_of_core": 100 * used["cpu_s"] / used["wall_s"],
        "guests_percent_of_core": 100 * guests_cpu / used["wall_s"],
        "hypervisor_percent_of_core": 100 * hv_cpu / used["wall_s"],
        "machine_busy_percent": busy,
        "loadavg": os.getloadavg()[0],
        "passed": passed,
    }


class TimedCopyWorkers(CopyWorkers):
    """The daemon's copy workers, also timing, per guest domain, how long each copy waited for
    a thread and how long it took until the loop had it back (native copies run no Python
    to time them in their thread), and the most copies that ran at once for one guest: the
    per-guest fair share made visible."""

    def __init__(self, total: int | None = None) -> None:
        super().__init__(total)
        self.waits: dict[int, list[float]] = {}
        self.copy_times: dict[int, list[float]] = {}
        self._asked: dict[object, float] = {}  # by the job's done callback
        self._began: dict[object, float] = {}  # by job

    def clear(self) -> None:
        self.waits.clear()
        self.copy_times.clear()

    def _put(self, domid: int, copy: Callable[[], Any], done: Callable[[Any], object],
             skip: Callable[[], bool] | None, flip: Callable[[], Any] | None = None) -> Any:
        def timed_done(result: Any) -> object:
            return done(result)

        self._asked[timed_done] = time.perf_counter()
        try:
            return super()._put(domid, copy, timed_done, skip, flip)
        except BaseException:
            self._asked.pop(timed_done, None)
            raise

    def _start(self, job: Any) -> None:
        super()._start(job)
        began = time.perf_counter()
        self.waits.setdefault(job.domid, []).append(began - self._asked.pop(job.done, began))
        self._began[job] = began

    def _finished(self, job: Any, result: Any) -> None:
        began = self._began.pop(job, None)
        if began is not None:
            self.copy_times.setdefault(job.domid, []).append(time.perf_counter() - began)
        super()._finished(job, result)

    def summary(self) -> dict[str, Any]:
        return {
            "threads": self.total,
            "per_guest": self.per_guest,
            "most_running": self.stats.most_running,
            "most_running_per_guest": self.stats.most_running_per_guest,
            "wait_by_domid": {str(d): {"copies": len(w), **_ms(w)} for d, w in self.waits.items()},
            "copy_by_domid": {str(d): {"copies": len(c), **_ms(c)}
                              for d, c in self.copy_times.items()},
        }


def profile_text(profile: cProfile.Profile, limit: int = 25) -> str:
    """The top of a profile by internal time, as text."""
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    return out.getvalue()


async def fairness(
    tmp: Path, *, honest_size: tuple[int, int] = (1920, 1080), honest_refresh_hz: float = 60.0,
    hostile_size: tuple[int, int] = (4095, 2047), hostile_connectors: int = 4,
    hostile_refresh_hz: float = 1000.0, window: float = 4.0, warmup: float = 1.0,
    hostile_mode: str = "copy", copy: bool = True,
) -> dict[str, Any]:
    """An honest guest's flips alone, then beside a hostile guest doing maximum-size copies.

    Copy mode (Dom0 cannot export dma-bufs, as on x86). The honest guest (one
    ``honest_size`` connector on an output at ``honest_refresh_hz``) flips as soon as each
    flip's event arrives; its flip rate and flip latency (PG_FLIP sent → EVT_PG_FLIP
    received) are measured over one ``window`` alone, then again while a second guest flips
    ``hostile_connectors`` connectors of ``hostile_size`` (4095×2047×32 bpp is the largest
    framebuffer Linux makes: 32 MiB copied per flip and connector) as fast as its events
    allow, on outputs at ``hostile_refresh_hz`` so that copying, not the vblank, limits it.

    ``hostile_mode="churn"``: the hostile guest instead creates, attaches, flips, detaches and
    destroys buffers of ``hostile_size`` on every connector as fast as it is answered (Dom0
    reads its directories, maps or exports its pages, shows and releases them); with
    ``copy=False`` in zero-copy mode, where releasing a frame on screen makes the output keep
    a copy of it.
    """
    outputs = [OutputConfig("honest", *honest_size, refresh_hz=honest_refresh_hz)] + [
        OutputConfig(f"hostile{i}", *hostile_size, refresh_hz=hostile_refresh_hz)
        for i in range(hostile_connectors)
    ]
    assignments = {"1/0/0": "honest"} | {
        f"2/0/{i}": f"hostile{i}" for i in range(hostile_connectors)
    }
    # Four maximum-size connectors with a few buffers each need more grant entries than Xen's
    # default table (32768): as an admin would raise the guest's xl.cfg max_grant_frames.
    pages = -(-hostile_size[0] * hostile_size[1] * 4 // PAGE_SIZE)
    grant_entries = max(GRANT_ENTRIES, 4 * hostile_connectors * (pages + 16) + 1024)
    async with bench_machine(
        tmp, outputs, assignments=assignments, copy=copy, grant_entries=grant_entries
    ) as machine:
        # The daemon's copy workers, timed; its devices (none yet) take them when found.
        workers = TimedCopyWorkers(machine.sim.backend.copies.total)
        machine.sim.backend.copies = workers
        honest = await machine.start_guest(1, connector_spec([honest_size]))
        alone = await _honest_window(machine, honest, window, warmup)
        copies_alone = workers.summary()
        workers.clear()
        hostile = await machine.start_guest(2, connector_spec([hostile_size] * hostile_connectors))
        hostile_outputs = [machine.output(f"hostile{i}") for i in range(hostile_connectors)]
        if hostile_mode == "churn":
            await hostile.start_churning(*hostile_size)
        else:
            await hostile.start_flipping()
        await trio.sleep(warmup)
        hostile0 = sum(o.stats.flips_completed for o in hostile_outputs)
        beside = await _honest_window(machine, honest, window, 0.0)
        hostile_fps = (sum(o.stats.flips_completed for o in hostile_outputs) - hostile0) / (
            beside["window_s"])
        copies = workers.summary()
        await hostile.stop()
    return {
        "honest_size": list(honest_size),
        "honest_refresh_hz": honest_refresh_hz,
        "hostile_size": list(hostile_size),
        "hostile_connectors": hostile_connectors,
        "hostile_refresh_hz": hostile_refresh_hz,
        "hostile_mode": hostile_mode,
        "copy": copy,
        "alone": alone,
        "beside_hostile": beside,
        "hostile_frames_per_s": hostile_fps,
        "copy_workers_alone": copies_alone,
        "copy_workers": copies,
        "fps_ratio": beside["fps"] / alone["fps"],
        "p99_ratio": beside["latency"]["p99_ms"] / alone["latency"]["p99_ms"],
    }


async def _honest_window(
    machine: Any, guest: Any, window: float, warmup: float
) -> dict[str, Any]:
    """The honest guest's flips over ``window`` seconds (after ``warmup``): rate, latency."""
    output = machine.output("honest")
    await guest.start_flipping(record=True)
    await trio.sleep(warmup)
    start = time.perf_counter()
    flips0, missed0 = output.stats.flips_completed, output.stats.missed_vblanks
    await trio.sleep(window)
    end = time.perf_counter()
    flips = output.stats.flips_completed - flips0
    missed = output.stats.missed_vblanks - missed0
    (log,) = await guest.stop()
    latencies = [done - sent for sent, done in log.times if start <= sent and done <= end]
    return {
        "window_s": end - start,
        "flips": flips,
        "fps": flips / (end - start),
        "missed_vblanks": missed,
        "not_done": log.not_done,
        "latency": _ms(latencies),
    }
