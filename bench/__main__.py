"""``python -m bench``: run every benchmark once, print the table, write the JSON.

``--quick`` is a smoke run of about half a minute (fewer flips, shorter windows, 1080p only,
at most two capacity steps); its numbers are noisier and are not the ones to quote.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench import buffers, flips, memory
from bench.report import Goal, Metric, Report, Target, busy_percent, cpu_jiffies
from displback.app.logs import configure_logging

PARTS = ("roundtrip", "cpu", "dbuf", "copy", "capacity", "fairness", "memory")


@dataclass(frozen=True)
class Plan:
    """How much of each benchmark one run does."""

    rt_flips: int
    cpu_sizes: tuple[tuple[int, int], ...]
    cpu_seconds: float
    cpu_warmup: float
    dbuf_runs: int
    memcpy_bytes: int
    copy_sizes: tuple[tuple[int, int], ...]
    copy_repeats: int
    capacity_connectors: int
    capacity_stride: int
    capacity_window: float
    capacity_settle: float
    fairness_window: float
    fairness_hostile: int
    memory_guests: int
    scaling_window: float
    scaling_rounds: int


FULL = Plan(
    rt_flips=2000, cpu_sizes=((1920, 1080), (2560, 1600)), cpu_seconds=4.0, cpu_warmup=1.0,
    dbuf_runs=7, memcpy_bytes=64 << 20, copy_sizes=((1920, 1080), (2560, 1600)),
    copy_repeats=20, capacity_connectors=64, capacity_stride=8, capacity_window=3.0,
    capacity_settle=1.5,
    fairness_window=4.0, fairness_hostile=4, memory_guests=16, scaling_window=1.5,
    scaling_rounds=3,
)
QUICK = Plan(
    rt_flips=500, cpu_sizes=((1920, 1080),), cpu_seconds=1.0, cpu_warmup=0.5,
    dbuf_runs=3, memcpy_bytes=16 << 20, copy_sizes=((1920, 1080),), copy_repeats=5,
    capacity_connectors=8, capacity_stride=4, capacity_window=1.0, capacity_settle=0.5,
    fairness_window=1.5, fairness_hostile=2, memory_guests=2, scaling_window=0.5,
    scaling_rounds=1,
)


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


async def _roundtrip(report: Report, plan: Plan, tmp: Path, _: Any) -> None:
    rt = await flips.flip_round_trip(tmp / "rt", flips=plan.rt_flips)
    report.details["flip_round_trip"] = rt
    hz = f"{rt['refresh_hz']:g} Hz output, {rt['flips']} flips"
    report.add(Metric("flip_rt_p50_ms", f"PG_FLIP→EVT round trip p50 ({hz})",
                      rt["round_trip"]["p50_ms"], "ms"))
    report.add(Metric("flip_rt_p99_ms", "PG_FLIP→EVT round trip p99",
                      rt["round_trip"]["p99_ms"], "ms"))
    report.add(Metric("flip_overhead_p50_ms", "flip overhead p50 (round trip − display wait)",
                      rt["overhead"]["p50_ms"], "ms"))
    report.add(Metric("flip_overhead_p99_ms", "flip overhead p99",
                      rt["overhead"]["p99_ms"], "ms", Target("<=", 0.3)))
    echo = await flips.echo_round_trip(tmp / "echo", rounds=plan.rt_flips)
    report.details["echo_round_trip"] = echo
    report.add(Metric("echo_p99_ms", "floor: event-channel echo p99 (notify → answer)",
                      echo["echo"]["p99_ms"], "ms",
                      note=f"p50 {echo['echo']['p50_ms']:.3f} ms over {echo['rounds']} rounds"))
    ratio = rt["overhead"]["p99_ms"] / echo["echo"]["p99_ms"]
    report.add(Metric("goal2_overhead_over_echo", "goal 2: flip overhead p99 / echo p99",
                      ratio, "", Target("<=", 1.5)))
    report.add_goal(Goal(2, "flip overhead p99 / event-channel echo p99", ratio, "×",
                         Target("<=", 1.5),
                         note=f"{rt['overhead']['p99_ms']:.3f} ms / "
                              f"{echo['echo']['p99_ms']:.4f} ms"))


async def _cpu(report: Report, plan: Plan, tmp: Path, profile: cProfile.Profile | None) -> None:
    floor = await flips.trio_wakeup_cost(seconds=min(2.0, plan.cpu_seconds))
    report.details["trio_wakeup_cost"] = floor
    report.add(Metric("trio_60hz_loop_percent",
                      "reference: bare trio task waking 60×/s, % of one core",
                      floor["percent_of_core"], "%",
                      note=f"{floor['cpu_per_wakeup_us']:.0f} µs per wake-up"))
    # A flip is two wake-ups here (the vblank's, then the guest's next request): their floor.
    floor2 = await flips.trio_two_wakeups_cost(seconds=min(2.0, plan.cpu_seconds))
    report.details["trio_two_wakeups_cost"] = floor2
    report.add(Metric("trio_two_wakeups_over_one",
                      f"reference: woken twice per tick (timer, then a pipe "
                      f"{floor2['gap_ms']:.1f} ms later) / once",
                      floor2["cpu_per_tick_us"] / floor["cpu_per_wakeup_us"], "",
                      note=f"{floor2['cpu_per_tick_us']:.0f} µs per tick"))
    results = []
    for copy in (False, True):
        for width, height in plan.cpu_sizes:
            mode = "copy" if copy else "zero-copy"
            _say(f"  cpu: {mode} {width}x{height}")
            use_profile = profile if (not copy and (width, height) == (1920, 1080)) else None
            result = await flips.cpu_per_flip(
                tmp / f"cpu-{mode}-{width}", size=(width, height), copy=copy,
                seconds=plan.cpu_seconds, warmup=plan.cpu_warmup,
                idle_seconds=min(1.0, plan.cpu_seconds), profile=use_profile,
            )
            results.append(result)
            key = f"{'copy' if copy else 'zc'}_{width}x{height}"
            target = Target("<=", 1.0) if not copy and (width, height) == (1920, 1080) else None
            report.add(Metric(f"cpu_{key}_us_per_flip",
                              f"backend CPU per flip, {mode} {width}x{height}",
                              result["cpu_per_flip_us"], "µs"))
            report.add(Metric(f"cpu_{key}_percent",
                              f"  = % of one core per 60 fps connector ({result['fps']:.1f} fps)",
                              result["percent_of_core_per_60fps"], "%", target))
            if not copy and (width, height) == (1920, 1080):
                ratio = result["cpu_per_flip_us"] / floor["cpu_per_wakeup_us"]
                inflated = ("measured under cProfile (--profile): inflated"
                            if use_profile is not None else "")
                report.add(Metric("goal1_flip_over_wakeup",
                                  "goal 1: zero-copy 1080p CPU per flip / bare trio wake-up",
                                  ratio, "", Target("<=", 1.2), note=inflated))
                report.add_goal(Goal(
                    1, "zero-copy 1080p CPU per flip / one bare trio wake-up", ratio, "×",
                    Target("<=", 1.2),
                    note=f"{result['cpu_per_flip_us']:.0f} µs / "
                         f"{floor['cpu_per_wakeup_us']:.0f} µs {inflated}".strip()))
                report.add_goal(Goal(
                    1, "zero-copy 1080p CPU per flip / two bare wake-ups (timer, then a pipe)",
                    result["cpu_per_flip_us"] / floor2["cpu_per_tick_us"], "×",
                    note=f"the two alone are {floor2['cpu_per_tick_us']:.0f} µs = "
                         f"{floor2['cpu_per_tick_us'] / floor['cpu_per_wakeup_us']:.2f} × one "
                         f"{inflated}".strip()))
    report.details["cpu_per_flip"] = results


async def _dbuf(report: Report, plan: Plan, tmp: Path, _: Any) -> None:
    results = {}
    for copy in (False, True):
        mode = "copy" if copy else "zero-copy"
        result = await buffers.dbuf_create_time(tmp / f"dbuf-{mode}", copy=copy,
                                                runs=plan.dbuf_runs)
        results[mode] = result
        key = "copy" if copy else "zc"
        report.add(Metric(
            f"dbuf_create_{key}_p50_ms",
            f"DBUF_CREATE {result['width']}x{result['height']}x32 p50, {mode} "
            f"({result['pages']} grefs, {result['directory_pages']} dir pages)",
            result["create_s"]["p50"] * 1000, "ms"))
        report.add(Metric(
            f"dbuf_create_{key}_over_map", f"  / bare map of the {result['pages']} grefs "
            f"in one call ({result['bare_map_s']['p50'] * 1000:.2f} ms p50)",
            result["create_over_map"], "", Target("<=", 1.5)))
        report.add_goal(Goal(
            3, f"DBUF_CREATE of {result['pages']} grefs / bare map, {mode}",
            result["create_over_map"], "×", Target("<=", 1.5),
            note=f"{result['create_s']['p50'] * 1000:.2f} ms / "
                 f"{result['bare_map_s']['p50'] * 1000:.2f} ms p50"))
    report.details["dbuf_create"] = results


async def _copy(report: Report, plan: Plan, tmp: Path, _: Any) -> None:
    memcpy = buffers.memcpy_bandwidth(plan.memcpy_bytes)
    mib = plan.memcpy_bytes >> 20
    report.add(Metric("memcpy_numpy_gbps", f"memcpy bandwidth, numpy copyto {mib} MiB",
                      memcpy["numpy"]["median_bps"] / 1e9, "GB/s"))
    report.add(Metric("memcpy_memoryview_gbps", f"memcpy bandwidth, memoryview slice {mib} MiB",
                      memcpy["memoryview"]["median_bps"] / 1e9, "GB/s"))
    baseline = memcpy["baseline_bps"]
    copies = await buffers.copy_bandwidth(tmp / "copy", list(plan.copy_sizes),
                                          repeats=plan.copy_repeats)
    for name, result in copies.items():
        report.add(Metric(f"copy_{name}_gbps", f"copy-mode bandwidth {name} (present_on)",
                          result["median_bps"] / 1e9, "GB/s",
                          note=f"{result['median_s'] * 1000:.2f} ms per frame"))
        report.add(Metric(f"copy_{name}_percent", "  = % of memcpy of the same size",
                          result["percent_of_same_size_memcpy"], "%", Target(">=", 70.0)))
        report.add(Metric(f"copy_{name}_percent_large", f"  = % of memcpy of {mib} MiB",
                          100 * result["median_bps"] / baseline, "%"))
    odd = buffers.copy_frame_bandwidth(1366, 768, repeats=plan.copy_repeats)
    report.add(Metric("copy_frame_1366x768_percent",
                      "copy_frame 1366x768, pitch 5464→5504 (row by row), % of same-size memcpy",
                      odd["percent_of_same_size_memcpy"], "%"))
    report.details["memcpy"] = memcpy
    report.details["copy_bandwidth"] = {"present_on": copies, "copy_frame_1366x768": odd}
    _say("  copy: frames per second with every core's worker thread, and with one")
    scaling = await buffers.copy_scaling(tmp / "scaling", window=plan.scaling_window,
                                         rounds=plan.scaling_rounds)
    report.details["copy_scaling"] = scaling
    w, h = scaling["size"]
    many = scaling["workers"]
    report.add(Metric("copy_fps_1_worker",
                      f"copy-mode frames/s {w}x{h}, {scaling['guests']} guests, 1 copy thread",
                      scaling["fps_one"], "fps",
                      note=f"= {scaling['fps_one'] / 60:.0f} connectors at 60 fps; the process "
                           f"used {scaling['cores_used_one']:.2f} cores"))
    report.add(Metric("copy_fps_all_workers", f"  with {many} copy threads (one per core)",
                      scaling["fps_all"], "fps",
                      note=f"the process used {scaling['cores_used_all']:.2f} cores"))
    report.add(Metric("copy_workers_ratio", f"  = {many} threads / 1 thread",
                      scaling["ratio"], "", Target(">=", 1.7)))
    report.add_goal(Goal(4, f"copy-mode frames/s, {many} copy threads / 1", scaling["ratio"],
                         "×", Target(">=", 1.7),
                         note=f"{scaling['fps_all']:.0f} / {scaling['fps_one']:.0f} fps; "
                              f"{scaling['cores_used_all']:.2f} cores used; loop "
                              f"{scaling['loop_cpu_per_frame_us']:.0f} µs per frame; load "
                              f"{scaling['loadavg']:.1f}, machine {scaling['busy_percent']:.0f} "
                              "% busy"))


async def _capacity(report: Report, plan: Plan, tmp: Path, _: Any) -> None:
    from bench.report import machine_info

    cores = machine_info()["cpus_usable"]
    results = {}
    for copy in (False, True):
        mode = "copy" if copy else "zero-copy"
        _say(f"  capacity: {mode}, up to {plan.capacity_connectors} connectors")
        result = await flips.capacity(
            tmp / mode, copy=copy, max_connectors=plan.capacity_connectors,
            stride=plan.capacity_stride, window=plan.capacity_window,
            settle=plan.capacity_settle,
        )
        results[mode] = result
        cap = result["max_connectors_tried"]
        largest = result["largest_passing_connectors"]
        last = next((s for s in reversed(result["steps"])
                     if s["connectors"] == largest), None)
        share = ("" if last is None else
                 f"; at {largest}: backend {last['backend_percent_of_core']:.0f} %, guests "
                 f"{last['guests_percent_of_core']:.0f} % of a core")
        note = (f"cap {cap}" + (" reached" if result["cap_reached"] else "")
                + f", {result['vblank_phases']} vblank phases"
                + f", {len(result['steps'])} steps in {result['seconds']:.0f} s; machine "
                f"{result['machine_busy_percent_before']:.0f} % busy before{share}")
        key = "copy" if copy else "zc"
        report.add(Metric(f"capacity_{key}_connectors",
                          f"60 fps 1024x768 connectors sustained on {cores} cores, {mode} "
                          f"(2 per guest, cap {cap})", largest, "", note=note))
        report.add_goal(Goal(5, f"60 fps 1024x768 connectors, no late flip, {mode} (cap {cap})",
                             largest, "", Target(">=", 32), note=note))
    report.details["capacity"] = results


async def _fairness(report: Report, plan: Plan, tmp: Path, _: Any) -> None:
    results = {}
    for key, hz in (("fair60", 60.0), ("fairmax", 1000.0)):
        _say(f"  fairness: honest guest at {hz:g} Hz")
        result = await flips.fairness(tmp / key, honest_refresh_hz=hz,
                                      hostile_connectors=plan.fairness_hostile,
                                      window=plan.fairness_window)
        results[key] = result
        alone, beside = result["alone"], result["beside_hostile"]
        hw, hh = result["honest_size"]
        xw, xh = result["hostile_size"]
        hostile = f"{result['hostile_connectors']}×{xw}x{xh}"
        paced = "60 Hz" if hz == 60.0 else "unpaced (1000 Hz output)"
        report.add(Metric(f"{key}_alone_fps",
                          f"honest guest alone, copy {hw}x{hh}, {paced}: flip rate",
                          alone["fps"], "fps"))
        report.add(Metric(f"{key}_alone_p99_ms", "  flip latency p99 (PG_FLIP → EVT)",
                          alone["latency"]["p99_ms"], "ms"))
        report.add(Metric(f"{key}_beside_fps",
                          f"  beside a hostile guest flipping {hostile}: flip rate",
                          beside["fps"], "fps",
                          note=f"{paced} run: the hostile guest made "
                               f"{result['hostile_frames_per_s']:.0f} frames/s"))
        report.add(Metric(f"{key}_beside_p99_ms", "  flip latency p99",
                          beside["latency"]["p99_ms"], "ms"))
        report.add(Metric(f"{key}_fps_ratio", "  flip rate beside / alone", result["fps_ratio"],
                          "", Target(">=", 0.9)))
        report.add_goal(Goal(7, f"honest flip rate beside {hostile} flipping / alone "
                                f"(copy, {'60 Hz' if hz == 60.0 else 'unpaced'})",
                             result["fps_ratio"], "", Target(">=", 0.9)))
        report.add(Metric(f"{key}_p99_ratio", "  p99 latency beside / alone",
                          result["p99_ratio"], ""))
        _copy_share(report, key, result)
    for key, copy in (("churncopy", True), ("churnzc", False)):
        mode = "copy" if copy else "zero-copy"
        _say(f"  fairness: hostile guest churning its largest buffers ({mode})")
        result = await flips.fairness(tmp / key, hostile_connectors=plan.fairness_hostile,
                                      window=plan.fairness_window, hostile_mode="churn",
                                      copy=copy)
        results[key] = result
        xw, xh = result["hostile_size"]
        report.add(Metric(
            f"{key}_fps_ratio",
            f"honest guest ({mode}, 60 Hz) beside one creating, showing, detaching and "
            f"destroying {result['hostile_connectors']}×{xw}x{xh} buffers: flip rate / alone",
            result["fps_ratio"], "", Target(">=", 0.9)))
        report.add_goal(Goal(7, f"honest flip rate beside {result['hostile_connectors']}×"
                                f"{xw}x{xh} churning / alone ({mode}, 60 Hz)",
                             result["fps_ratio"], "", Target(">=", 0.9)))
        report.add(Metric(f"{key}_p99_ratio", "  p99 latency beside / alone",
                          result["p99_ratio"], ""))
    report.details["fairness"] = results


def _copy_share(report: Report, key: str, result: dict[str, Any]) -> None:
    """The copy workers' per-guest share: how long the honest guest's copies waited for a
    thread beside the hostile guest, and the most copies one guest ran at once."""
    workers = result["copy_workers"]
    honest = workers["wait_by_domid"].get("1")
    if honest is None:
        return
    hostile = workers["copy_by_domid"].get("2", {})
    report.add(Metric(
        f"{key}_honest_copy_wait_p99_ms", "  honest copy's wait for a worker thread p99",
        honest["p99_ms"], "ms",
        note=f"most copies at once for one guest {workers['most_running_per_guest']} (of "
             f"{workers['threads']} threads); a hostile copy takes "
             f"{hostile.get('p50_ms', float('nan')):.1f} ms p50"))


async def _memory(report: Report, plan: Plan, tmp: Path, _: Any) -> None:
    result = await memory.footprint_in_child(tmp, guests=plan.memory_guests)
    traced = await memory.footprint_in_child(tmp, guests=plan.memory_guests, trace=True)
    for key in ("heap_guests_1_connector_bytes", "heap_guests_n_connectors_bytes",
                "heap_per_guest_bytes", "heap_per_connector_bytes"):
        result[key] = traced[key]
    report.details["memory"] = {"rss": result, "traced": traced}
    mib, kib = 1 << 20, 1 << 10
    report.add(Metric("rss_no_guest_mib", "daemon RSS without shared memory, no guest "
                      "(+ simulated xenstored and toolstack)", result["rss_no_guest_bytes"] / mib,
                      "MiB"))
    report.add(Metric("rss_per_guest_kib", "  per connected guest, excluding its connectors",
                      result["per_guest_bytes"] / kib, "KiB",
                      note=f"{result['rss_first_guest_bytes'] / kib:.0f} KiB more for the first "
                           f"guest (code paths and caches loaded once)"))
    report.add(Metric("rss_per_connector_kib", "  per connector, excluding pixel buffers",
                      result["per_connector_bytes"] / kib, "KiB"))
    report.add(Metric("heap_per_guest_kib", "  Python heap per connected guest (tracemalloc)",
                      result["heap_per_guest_bytes"] / kib, "KiB"))
    report.add(Metric("heap_per_connector_kib", "  Python heap per connector (tracemalloc)",
                      result["heap_per_connector_bytes"] / kib, "KiB"))
    report.add_goal(Goal(6, "daemon RSS with no guest", result["rss_no_guest_bytes"] / mib,
                         "MiB"))
    report.add_goal(Goal(6, "per connected guest, its connectors excluded (RSS; heap)",
                         result["per_guest_bytes"] / kib, "KiB",
                         note=f"Python heap (tracemalloc) "
                              f"{result['heap_per_guest_bytes'] / kib:.0f} KiB per guest"))
    report.add_goal(Goal(6, "per connector, pixel buffers excluded (RSS; heap)",
                         result["per_connector_bytes"] / kib, "KiB",
                         note=f"Python heap (tracemalloc) "
                              f"{result['heap_per_connector_bytes'] / kib:.0f} KiB per "
                              f"connector; growth over a soak: make soak"))


RUNNERS: dict[str, Callable[[Report, Plan, Path, Any], Awaitable[None]]] = {
    "roundtrip": _roundtrip,
    "cpu": _cpu,
    "dbuf": _dbuf,
    "copy": _copy,
    "capacity": _capacity,
    "fairness": _fairness,
    "memory": _memory,
}


async def run(
    plan: Plan, parts: Sequence[str], *, mode: str, profile: cProfile.Profile | None = None
) -> Report:
    """Run ``parts`` of the benchmark; a part that fails is recorded, the others still run."""
    report = Report(mode)
    jiffies = cpu_jiffies()
    await trio.sleep(1.0)
    report.busy_before = busy_percent(jiffies, cpu_jiffies())
    _say(f"the machine was {report.busy_before:.0f} % busy before the run (all CPUs)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="displback-bench-") as tmp:
        for part in parts:
            _say(f"{part} ...")
            part_start = time.perf_counter()
            try:
                await RUNNERS[part](report, plan, Path(tmp) / part, profile)
            except Exception as exc:  # report it, go on with the next part
                report.errors.append(f"{part}: {type(exc).__name__}: {exc}")
                _say(f"{part} FAILED: {exc!r}")
            _say(f"{part} done in {time.perf_counter() - part_start:.1f} s")
    report.seconds = time.perf_counter() - started
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"),
                        help="where to write the results (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default: all of {','.join(PARTS)})")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the backend during the zero-copy 1080p CPU window and "
                             "print the top functions to stderr")
    args = parser.parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s): {', '.join(unknown)}")
    configure_logging("error")
    plan = QUICK if args.quick else FULL
    profile = cProfile.Profile() if args.profile else None
    report = trio.run(lambda: run(plan, parts, mode="quick" if args.quick else "full",
                                  profile=profile))
    if profile is not None:
        print(flips.profile_text(profile), file=sys.stderr)
    print(report.table())
    print()
    print(report.goal_table())
    print()
    print(f"{report.summary()}; {report.seconds:.0f} s; results in {args.json}")
    if report.busy_before > 10:
        print(f"NOTE: other work kept the machine {report.busy_before:.0f} % busy just before "
              "the run; latency, CPU and capacity numbers are pessimistic")
    for error in report.errors:
        print(f"ERROR: {error}")
    report.write_json(args.json)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
