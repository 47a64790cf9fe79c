"""``python -m bench.flipcost``: what one flip costs the backend in counts, not seconds.

Timings on a shared machine move with the neighbours; counts do not. One guest process flips
one connector of the simulated machine (as ``bench.flips.cpu_per_flip``) and, over a window
of flips, this counts per flip

* trio's run-loop passes (``before_io_wait``), of which *blocking* ones (a timeout > 0: the
  process may sleep, so one more process wake-up), task steps and reschedules, and which tasks
  were stepped — with a :class:`trio.abc.Instrument`;
* with ``--callgrind``, the instructions the whole backend process executed (every thread),
  the process re-run under ``valgrind --tool=callgrind`` with instrumentation switched on
  only for the window (``callgrind_control -i on|off``, each window dumped to its own part;
  the guest and hypervisor processes are not traced), and the same for a bare trio task
  waking at 60 Hz (``bench.flips.trio_wakeup_cost``'s floor) once the machine is gone: goal 1
  of issue 12 in instructions. Runs of one tree agree within about ±5 % even on a loaded
  machine (the timers' extra passes move a little with the load), where CPU times move by
  a factor of two: take the median of three to compare trees. Needs ``valgrind``.

The counting instrument costs CPU itself, so the instruction window is a separate one, run
after the counting window, without the instrument.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from bench.machine import bench_machine, connector_spec
from displback.app.logs import configure_logging
from displback.display.virtual import OutputConfig

__all__ = ["FlipCounter", "callgrind_total", "flip_cost"]

_CALLGRIND_ENV = "DISPLBACK_FLIPCOST_CALLGRIND"


class FlipCounter(trio.abc.Instrument):
    """Counts run-loop passes, blocking waits, task steps and reschedules, per task name."""

    def __init__(self) -> None:
        self.passes = 0
        self.blocking = 0
        self.steps = 0
        self.scheduled = 0
        self.by_task: collections.Counter[str] = collections.Counter()
        #: The measuring task (its polls are not the backend's work).
        self.ignore = trio.lowlevel.current_task()

    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1
        if timeout > 0:
            self.blocking += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += task is not self.ignore
        if task is not self.ignore:
            self.by_task[".".join(task.name.split(".")[-2:])] += 1

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        self.scheduled += task is not self.ignore

    def per_flip(self, flips: int) -> dict[str, Any]:
        return {
            "loop_passes": self.passes / flips,
            "blocking_waits": self.blocking / flips,
            "task_steps": self.steps / flips,
            "reschedules": self.scheduled / flips,
            "steps_by_task": {
                name: count / flips for name, count in self.by_task.most_common()
            },
        }


async def _wait_flips(output: Any, count: int) -> int:
    """Sleep until ``count`` more flips completed on ``output``; the number seen."""
    start = output.stats.flips_completed
    while output.stats.flips_completed - start < count:
        await trio.sleep(0.5)  # rarely: the poll's own wake-ups count as loop passes
    return int(output.stats.flips_completed - start)


def _callgrind(*args: str) -> None:
    subprocess.run(
        ["callgrind_control", *args, str(os.getpid())],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


async def _bare_wakeups(count: int, rate: float) -> None:
    """What ``bench.flips.trio_wakeup_cost`` measures: a task sleeping until the next tick."""
    deadline = trio.current_time()
    for _ in range(count):
        deadline += 1.0 / rate
        await trio.sleep_until(deadline)


async def flip_cost(
    tmp: Path, *, size: tuple[int, int], copy: bool, refresh_hz: float, flips: int,
    warmup: int, callgrind: bool = False, profile: bool = False, pstats_file: Path | None = None,
) -> dict[str, Any]:
    """Counts per flip over ``flips`` flips (after ``warmup``); with ``callgrind`` (this
    process under callgrind with instrumentation off) also an instruction window; with
    ``profile`` a cProfile window (its stats also written to ``pstats_file``)."""
    width, height = size
    outputs = [OutputConfig("cost", width, height, refresh_hz=refresh_hz)]
    result: dict[str, Any] = {
        "width": width, "height": height, "mode": "copy" if copy else "zero-copy",
        "refresh_hz": refresh_hz,
    }
    async with bench_machine(tmp, outputs, copy=copy) as machine:
        output = machine.output("cost")
        guest = await machine.start_guest(1, connector_spec([size]))
        await guest.start_flipping()
        await _wait_flips(output, warmup)
        counter = FlipCounter()
        trio.lowlevel.add_instrument(counter)
        wall = time.perf_counter()
        seen = await _wait_flips(output, flips)
        trio.lowlevel.remove_instrument(counter)
        result["count_window"] = {
            "flips": seen, "fps": seen / (time.perf_counter() - wall), **counter.per_flip(seen)
        }
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            seen = await _wait_flips(output, flips)
            profiler.disable()
            result["profile_window"] = {"flips": seen, "top": _profile_top(profiler, seen)}
            if pstats_file is not None:
                profiler.dump_stats(pstats_file)
        if callgrind:
            # Each window is dumped to its own part file (callgrind.out.1, .2, .3).
            start = output.stats.flips_completed
            _callgrind("-i", "on")
            await _wait_flips(output, flips)
            end = output.stats.flips_completed
            _callgrind("-i", "off")
            _callgrind("-d")
            result["instruction_window"] = {"flips": int(end - start)}
        await guest.stop()
    if callgrind:
        _callgrind("-i", "on")
        await _bare_wakeups(flips, 60.0)
        _callgrind("-i", "off")
        _callgrind("-d")
        result["bare_wakeup_window"] = {"wakeups": flips}
        _callgrind("-i", "on")
        _callgrind("-i", "off")
        _callgrind("-d")
    return result


def _profile_top(profiler: cProfile.Profile, flips: int, limit: int = 30) -> list[str]:
    """The functions with the most own time: calls and µs (profiled) per flip, and the
    Python calls per flip in all (generator resumptions included)."""
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    total_calls = sum(v[1] for _, v in rows)
    lines = [f"{total_calls / flips:.0f} calls per flip"]
    for (file, line, name), (_, calls, own, cum, _) in rows[:limit]:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        lines.append(
            f"{calls / flips:6.1f} calls {1e6 * own / flips:7.1f} µs own "
            f"{1e6 * cum / flips:7.1f} µs cum  {name} ({where})"
        )
    return lines


def callgrind_total(path: Path) -> int:
    """The total ``Ir`` of a callgrind output file (all its parts)."""
    total = 0
    for line in path.read_text().splitlines():
        match = re.match(r"(?:summary|totals):\s+(\d+)", line)
        if match:
            total = max(total, int(match.group(1)))
    return total


def _parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flipcost", description=__doc__)
    parser.add_argument("--size", type=_parse_size, default=(1920, 1080))
    parser.add_argument("--copy", action="store_true", help="copy mode (no dma-buf export)")
    parser.add_argument("--hz", type=float, default=60.0, help="the output's refresh rate")
    parser.add_argument("--flips", type=int, default=300, help="flips per window")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--callgrind", action="store_true",
                        help="also count instructions per flip under valgrind's callgrind")
    parser.add_argument("--profile", action="store_true",
                        help="also a cProfile window: top functions per flip")
    parser.add_argument("--pstats", type=Path, help="with --profile: write the stats here")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    configure_logging(level="warning")
    if args.callgrind and os.environ.get(_CALLGRIND_ENV) is None:
        return _run_under_callgrind(args, argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="flipcost-") as tmp:
        result = trio.run(lambda: flip_cost(
            Path(tmp), size=args.size, copy=args.copy, refresh_hz=args.hz, flips=args.flips,
            warmup=args.warmup, callgrind=os.environ.get(_CALLGRIND_ENV) is not None,
            profile=args.profile, pstats_file=args.pstats,
        ))
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return 0


def _run_under_callgrind(args: argparse.Namespace, argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="flipcost-cg-") as tmp:
        out = Path(tmp) / "callgrind.out"
        child_json = Path(tmp) / "result.json"
        rest = [a for a in argv if a != "--callgrind"]
        if "--json" in rest:
            i = rest.index("--json")
            del rest[i:i + 2]
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}", sys.executable, "-m", "bench.flipcost",
            "--callgrind", "--json", str(child_json), *rest,
        ]
        env = dict(os.environ, **{_CALLGRIND_ENV: "1"})
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        result = json.loads(child_json.read_text())
        flips_ir, bare_ir, empty_ir = (
            callgrind_total(Path(f"{out}.{part}")) for part in (1, 2, 3)
        )
        window = result["instruction_window"]
        window["instructions"] = flips_ir
        window["toggle_overhead"] = empty_ir
        window["instructions_per_flip"] = (flips_ir - empty_ir) / window["flips"]
        bare = result["bare_wakeup_window"]
        bare["instructions"] = bare_ir
        bare["instructions_per_wakeup"] = (bare_ir - empty_ir) / bare["wakeups"]
        result["goal1_flip_over_wakeup_instructions"] = (
            window["instructions_per_flip"] / bare["instructions_per_wakeup"]
        )
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
