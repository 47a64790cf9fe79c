"""The daemon's memory: what it holds with no guest, per connected guest and per connector
(issue 12 goal 6), and whether it grows while guests flip for a long time (``make soak``).

The measuring process holds the backend daemon, the virtual display, the simulated
xenstored and the idle toolstack (:mod:`bench.machine`); guests and the hypervisor are other
processes. Its memory is read from ``/proc/self/smaps_rollup`` as **RSS without shared
memory** (``Rss - RssShmem``, i.e. anonymous and file-backed pages): guest pixel buffers
reach the daemon as shared mappings of the guest's memory (a dma-buf import, or a grant
mapping in copy mode) and are shared memory, so they are excluded by construction; the
display's own copy buffers (copy mode) are the daemon's and are included.

``python -m bench.memory --soak SECONDS`` (``make soak``) is the soak; ``make bench`` runs
:func:`footprint` as its ``memory`` part.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from bench.machine import BenchMachine, bench_machine, connector_spec
from displback.display.virtual import OutputConfig

__all__ = [
    "GROWTH_TOLERANCE_MIB", "footprint", "footprint_in_child", "main", "rss_without_shmem", "soak",
]

MIB = 1 << 20
#: Growth of the daemon's memory over a soak (after its warm-up) that still passes: Python's
#: allocator keeps freed arenas and fragments; a leak of one small object per flip (32
#: connectors × 60 fps × 10 min = 1.15 million flips) grows far beyond it.
GROWTH_TOLERANCE_MIB = 2.0


def rss_without_shmem(pid: int | str = "self") -> int:
    """Bytes of ``pid``'s resident memory that are not shared memory (``Rss - RssShmem``)."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0]) * 1024
    return fields["Rss"] - fields.get("RssShmem", 0)


async def _settled(settle: float) -> tuple[int, int]:
    """RSS and the bytes traced by :mod:`tracemalloc` (0 when not tracing) after a pause
    and a collection, so that garbage of the last steps is gone."""
    await trio.sleep(settle)
    gc.collect()
    return rss_without_shmem(), tracemalloc.get_traced_memory()[0]


def _outputs(domids: Sequence[int], connectors: int, size: tuple[int, int]) -> tuple[
        list[OutputConfig], dict[str, str]]:
    names = {(d, i): f"m{d}c{i}" for d in domids for i in range(connectors)}
    outputs = [OutputConfig(name, *size) for name in names.values()]
    return outputs, {f"{d}/0/{i}": name for (d, i), name in names.items()}


async def footprint(
    tmp: Path, *, guests: int = 8, connectors: int = 4, size: tuple[int, int] = (1024, 768),
    settle: float = 1.0, guests_per_process: int = 4, trace: bool = False,
) -> dict[str, Any]:
    """The daemon's memory with no guest, per connected guest and per connector.

    Zero-copy, so that no pixel of a guest is held by the daemon (its buffers are shared
    mappings, excluded). One guest is connected first and left connected (warm-up: the
    first guest brings code paths and caches every later guest shares); then ``guests``
    guests with one connector each (Δ₁), then ``guests`` with ``connectors`` each (Δₙ); each
    shows its first frame on every connector. Per connector = (Δₙ − Δ₁) / (guests ×
    (connectors − 1)); per guest = Δ₁ / guests − one connector. Each is given twice: from
    RSS, which Python's allocator quantises (new objects first fill memory freed earlier, so
    small deltas can even come out negative), and, with ``trace``, from the bytes
    :mod:`tracemalloc` traces (every Python object and numpy array allocated, exact; not C
    memory outside them) — tracing costs memory of its own, so its RSS figures are not the
    ones to quote: measure twice.
    """
    one = list(range(2, 2 + guests))
    many = list(range(2 + guests, 2 + 2 * guests))
    outputs, assignments = _outputs([1, *one], 1, size)
    more, more_assignments = _outputs(many, connectors, size)
    async with bench_machine(tmp, outputs + more,
                             assignments=assignments | more_assignments) as machine:
        empty, _ = await _settled(settle)
        await machine.start_guest(1, connector_spec([size]))
        warm, _ = await _settled(settle)
        tracing = trace and not tracemalloc.is_tracing()
        if tracing:
            tracemalloc.start()
        try:
            _, heap0 = await _settled(0)
            await machine.start_guests(one, connector_spec([size]),
                                       per_process=guests_per_process)
            with_one, heap_one = await _settled(settle)
            await machine.start_guests(many, connector_spec([size] * connectors),
                                       per_process=guests_per_process)
            with_many, heap_many = await _settled(settle)
        finally:
            if tracing:
                tracemalloc.stop()
    rss = _split(with_one - warm, with_many - with_one, guests, connectors)
    heap = _split(heap_one - heap0, heap_many - heap_one, guests, connectors)
    return {
        "traced": trace,
        "guests": guests,
        "connectors": connectors,
        "size": list(size),
        "rss_no_guest_bytes": empty,
        "rss_first_guest_bytes": warm - empty,
        "rss_guests_1_connector_bytes": with_one - warm,
        "rss_guests_n_connectors_bytes": with_many - with_one,
        "per_guest_bytes": rss[0],
        "per_connector_bytes": rss[1],
        "heap_guests_1_connector_bytes": heap_one - heap0,
        "heap_guests_n_connectors_bytes": heap_many - heap_one,
        "heap_per_guest_bytes": heap[0],
        "heap_per_connector_bytes": heap[1],
    }


def _split(delta_one: int, delta_many: int, guests: int, connectors: int) -> tuple[
        float, float]:
    """(per guest, per connector) from ``guests`` guests with 1 connector each adding
    ``delta_one`` and as many with ``connectors`` each adding ``delta_many``."""
    per_connector = (delta_many - delta_one) / (guests * (connectors - 1))
    return delta_one / guests - per_connector, per_connector


async def footprint_in_child(tmp: Path, *, guests: int, trace: bool = False) -> dict[str, Any]:
    """:func:`footprint` in a fresh process: "no guest" must not include what earlier
    benchmarks in this process left on its heap (222 MiB after a whole ``make bench``)."""
    import json

    out = tmp / f"footprint-{'traced' if trace else 'rss'}.json"
    tmp.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "bench.memory", "--footprint", "--guests", str(guests),
               "--json", str(out)] + (["--trace"] if trace else [])
    await trio.run_process(command, cwd=Path(__file__).resolve().parent.parent)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


async def soak(
    tmp: Path, *, seconds: float = 600.0, guests: int = 16, connectors: int = 2,
    size: tuple[int, int] = (640, 480), copy: bool = True, interval: float = 10.0,
    warmup: float | None = None, guests_per_process: int = 4,
    say: Any = None,
) -> dict[str, Any]:
    """``guests`` guests flip ``connectors`` connectors each at 60 fps for ``seconds``; the
    daemon's memory (RSS without shared memory) is sampled every ``interval`` seconds.

    Copy mode by default (the usual case on x86, and the path that allocates per flip:
    copy jobs handed to worker threads, the display's copy buffers). Growth = the median of
    the last three samples − the median of the first three after ``warmup`` (default: a
    tenth of the run, at least one interval); it passes within
    :data:`GROWTH_TOLERANCE_MIB`. The slope over the samples after the warm-up (least
    squares) is reported too, as are the flips completed and any failed ones.
    """
    warmup = max(interval, seconds / 10) if warmup is None else warmup
    domids = list(range(1, guests + 1))
    outputs, assignments = _outputs(domids, connectors, size)
    samples: list[tuple[float, int]] = []
    async with bench_machine(tmp, outputs, assignments=assignments, copy=copy) as machine:
        started_guests = await machine.start_guests(
            domids, connector_spec([size] * connectors), per_process=guests_per_process)
        for guest in started_guests:
            await guest.start_flipping()
        start = time.perf_counter()
        flips0 = _flips(machine)
        while (elapsed := time.perf_counter() - start) < seconds:
            samples.append((elapsed, rss_without_shmem()))
            if say is not None:
                say(f"soak: {elapsed:.0f} s, RSS {samples[-1][1] / MIB:.1f} MiB")
            await trio.sleep(min(interval, seconds - elapsed))
        samples.append((time.perf_counter() - start, rss_without_shmem()))
        flips = _flips(machine) - flips0
        failed = 0
        for guest in started_guests:
            for stat in await guest.stats():
                failed += (stat["frame_done_timeouts"] + stat["flip_errors"]
                           + stat["response_timeouts"])
        wall = time.perf_counter() - start
    after = [(t, rss) for t, rss in samples if t >= warmup] or samples[-1:]
    first = statistics.median(rss for _, rss in after[:3])
    last = statistics.median(rss for _, rss in after[-3:])
    growth = (last - first) / MIB
    return {
        "seconds": wall,
        "guests": guests,
        "connectors_per_guest": connectors,
        "size": list(size),
        "mode": "copy" if copy else "zero-copy",
        "interval_s": interval,
        "warmup_s": warmup,
        "flips": flips,
        "fps_per_connector": flips / wall / (guests * connectors),
        "failed_flips": failed,
        "samples": [[round(t, 1), rss] for t, rss in samples],
        "rss_start_mib": samples[0][1] / MIB,
        "rss_after_warmup_mib": first / MIB,
        "rss_end_mib": last / MIB,
        "growth_mib": growth,
        "slope_mib_per_min": _slope(after) * 60 / MIB,
        "tolerance_mib": GROWTH_TOLERANCE_MIB,
        "passed": growth <= GROWTH_TOLERANCE_MIB and failed == 0,
    }


def _flips(machine: BenchMachine) -> int:
    return sum(o.stats.flips_completed for o in machine.sim.display.outputs.values())


def _slope(samples: Sequence[tuple[float, int]]) -> float:
    """Least-squares bytes per second; 0 with fewer than two samples."""
    if len(samples) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in samples)
    mean_r = statistics.fmean(r for _, r in samples)
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    cov = sum((t - mean_t) * (r - mean_r) for t, r in samples)
    return cov / var if var else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    """``make soak``: run :func:`soak`, print the verdict, write the JSON."""
    import json

    from displback.app.logs import configure_logging

    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--soak", type=float, default=600.0, metavar="SECONDS",
                        help="how long the guests flip (default: %(default)s)")
    parser.add_argument("--guests", type=int, default=16)
    parser.add_argument("--zero-copy", action="store_true",
                        help="Dom0 exports guest buffers (default: copy mode)")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="seconds between samples (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=Path("soak-results.json"))
    parser.add_argument("--footprint", action="store_true",
                        help="instead of the soak: footprint() of --guests guests (with "
                             "--trace under tracemalloc) into --json")
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args(argv)
    configure_logging("error")
    if args.footprint:
        async def measure() -> dict[str, Any]:
            with tempfile.TemporaryDirectory(prefix="displback-memory-") as tmp:
                return await footprint(Path(tmp), guests=args.guests, trace=args.trace)

        args.json.write_text(json.dumps(trio.run(measure)) + "\n")
        return 0

    def say(text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    load = os.getloadavg()

    async def run() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="displback-soak-") as tmp:
            return await soak(Path(tmp), seconds=args.soak, guests=args.guests,
                              copy=not args.zero_copy, interval=args.interval, say=say)

    result = trio.run(run)
    result["loadavg_before"] = load
    result["loadavg_after"] = os.getloadavg()
    verdict = "PASS" if result["passed"] else "MISS"
    print(f"soak: {result['guests']} guests × {result['connectors_per_guest']} connectors "
          f"{result['size'][0]}x{result['size'][1]} {result['mode']}, {result['seconds']:.0f} s, "
          f"{result['flips']} flips ({result['fps_per_connector']:.1f} fps per connector, "
          f"{result['failed_flips']} failed)")
    print(f"daemon RSS without shared memory: {result['rss_start_mib']:.1f} MiB at the start, "
          f"{result['rss_after_warmup_mib']:.1f} MiB after the {result['warmup_s']:.0f} s "
          f"warm-up, {result['rss_end_mib']:.1f} MiB at the end")
    print(f"growth after warm-up {result['growth_mib']:+.2f} MiB "
          f"(slope {result['slope_mib_per_min']:+.3f} MiB/min), tolerance "
          f"{GROWTH_TOLERANCE_MIB:g} MiB: {verdict}")
    print(f"load average before {load[0]:.2f}, after {result['loadavg_after'][0]:.2f}; "
          f"results in {args.json}")
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
