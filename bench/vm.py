"""``make bench-vm``: displback against the reference C++ backend in the nested Xen VM.

Issue 12 goal 0. One boot of the VM harness of ``tests/vm`` (Xen 4.17 under QEMU TCG, a PV
Dom0 running the host's root, PV guests running Linux 6.1's xen-drm-front). On that boot,
one backend after the other serves the same guest: drmtest (tests/vm/guest/drmtest.c) in its
benchmark mode, one 1024×768 connector whose unique-id is ``Virtual-1``, both buffers drawn
once, then flipping as fast as the flip events come back (``--flips``, of which the first
``--warmup`` are not timed):

* **displback, KMS** on QEMU's bochs-display (``--display kms --connector Virtual-1=…``);
* **displback, KMS, Python copies**: the same with ``DISPLBACK_COPY_THREADS=python`` (when the
  native copy threads are built: what they change);
* **displback, KMS, loop flips**: the same with ``DISPLBACK_COPY_THREADS=native-no-flip`` (the
  native threads copy, the loop flips after each copy: what the threads' own flips change);
* **displback, virtual** display (``--virtual-output Virtual-1=…@1000``: no snapshots, and a
  1000 Hz refresh so that the display's vblank does not pace the guest);
* **displ_be** (``--displ-be PREFIX``, built by :mod:`bench.displ_be`), copy mode on the
  same bochs card: ``displ_be -m DRM -d CARD -z``.

Per run: the guest's flip rate (its own clock over the timed flips) and the backend's CPU
(``utime + stime`` of the process, all threads) over the same window, read in Dom0 by
:mod:`bench.vm_sampler`; CPU per flip = CPU rate / flip rate. Dom0's busy time over all
vCPUs is reported beside it (it adds the kernel work done outside the process, and the
sampler's own polling). Then, for displback, a second guest on the same daemon is profiled
(cProfile in the daemon during its timed window, :mod:`bench.vm_daemon`); its rate is not
in the table (the profiler's cost is in it) and its top functions are printed.

Why here and not in tests/vm: this measures and asserts nothing (speed goals live in bench/,
docs/benchmarks.md); it imports the harness (tests.vm) for the kernel, images and boot.
TCG inflates every cost; compare the rows of one run, never runs of different boots.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import io
import json
import os
import pstats
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.displ_be import BuildError, DisplBe
from bench.report import machine_info
from displback.backend.copies import native_copies_built
from tests.vm.dom0 import Dom0

REPO = Path(__file__).resolve().parents[1]
SHARE = "/mnt"
CONNECTOR = "Virtual-1"


@dataclass(frozen=True)
class Backend:
    """One backend configuration: how to start it in Dom0."""

    key: str
    label: str
    kind: str  # "displback" or "displ_be"
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # NAME=value for displback's process


@dataclass
class Run:
    """One guest's timed flips on one backend."""

    backend: str
    guest: str
    flips: int = 0
    failed: int = 0
    fps: float = float("nan")
    cpu_ms_per_flip: float = float("nan")
    user_ms_per_flip: float = float("nan")
    sys_ms_per_flip: float = float("nan")
    dom0_busy_ms_per_flip: float = float("nan")
    dom0_steal_ms_per_flip: float = float("nan")
    backend_cpu_percent: float = float("nan")
    window_s: float = float("nan")
    profiled: bool = False
    #: A window under ``strace -c`` (not in the table: ptrace slows every call): system
    #: calls per flip, by name.
    syscalls_per_flip: dict[str, float] = field(default_factory=dict)
    #: CPU per flip of each thread that ran in the window ("tid name": ms).
    threads_ms_per_flip: dict[str, float] = field(default_factory=dict)
    error: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def _say(text: str) -> None:
    print(f"bench-vm: {text}", file=sys.stderr, flush=True)


def result_of(backend: str, guest: str, raw: dict[str, Any], *, profiled: bool) -> Run:
    """Turn the sampler's numbers into per-flip figures."""
    run = Run(backend, guest, profiled=profiled, raw=raw)
    if "error" in raw:
        run.error = str(raw["error"])
        return run
    start, end = raw["start"], raw["end"]
    run.flips, run.failed = int(raw["flips"]), int(raw["failed"])
    if "stacks" in raw:
        run.profiled = True  # (py-spy shares Dom0's CPUs with it)
    if "syscalls" in raw:
        run.profiled = True  # (its times are strace's, not the backend's)
        run.syscalls_per_flip = {
            name: round(calls / max(run.flips, 1), 2)
            for name, calls in sorted(raw["syscalls"].items(), key=lambda kv: -kv[1])
        }
    run.window_s = end["t"] - start["t"]
    guest_s = raw["guest_ns"] / 1e9
    ok = run.flips - run.failed
    if run.window_s <= 0 or guest_s <= 0 or ok <= 0:
        run.error = f"empty window: {raw}"
        return run
    run.fps = ok / guest_s

    def per_flip(key: str) -> float:
        # CPU rate over Dom0's window divided by the guest's flip rate (see the sampler).
        return float(end[key] - start[key]) / run.window_s / run.fps * 1e3

    run.user_ms_per_flip = per_flip("user_s")
    run.sys_ms_per_flip = per_flip("sys_s")
    run.cpu_ms_per_flip = run.user_ms_per_flip + run.sys_ms_per_flip
    run.dom0_busy_ms_per_flip = per_flip("dom0_busy_s")
    if "dom0_steal_s" in start:
        run.dom0_steal_ms_per_flip = per_flip("dom0_steal_s")
    run.backend_cpu_percent = run.cpu_ms_per_flip * run.fps / 10
    before, after = start.get("threads", {}), end.get("threads", {})
    run.threads_ms_per_flip = {
        name: round((cpu - before.get(name, 0.0)) / run.window_s / run.fps * 1e3, 3)
        for name, cpu in after.items()
        if cpu > before.get(name, 0.0)
    }
    return run


def top_functions(path: Path, flips: int, limit: int = 25) -> tuple[list[dict[str, Any]], str]:
    """The profile's top functions by own time, per flip; and pstats' own text."""
    stats = pstats.Stats(str(path))
    rows = []
    entries = stats.stats  # type: ignore[attr-defined]
    for (filename, line, name), (cc, nc, tt, ct, _) in entries.items():
        rows.append(
            {
                "function": f"{_short(filename)}:{line}({name})",
                "calls_per_flip": nc / max(flips, 1),
                "own_us_per_flip": tt / max(flips, 1) * 1e6,
                "cum_us_per_flip": ct / max(flips, 1) * 1e6,
                "primitive_calls": cc,
            }
        )
    rows.sort(key=lambda r: -float(r["own_us_per_flip"]))
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("cumulative").print_stats(30)
    return rows[:limit], text.getvalue()


def dom0_costs(dom0: Dom0, python: str) -> dict[str, float]:
    """What the pieces of a flip cost in this Dom0 (bench.vm_costs, run there)."""
    out = dom0.share / "dom0-costs.json"
    dom0.sh(
        f"cd {REPO} && PYTHONDONTWRITEBYTECODE=1 {python} -m bench.vm_costs "
        f"--json {SHARE}/{out.name} >/dev/null 2>&1",
        timeout=600,
    )
    costs: dict[str, float] = json.loads(out.read_text())
    return costs


def syscall_table(syscalls: dict[str, dict[str, float]], labels: dict[str, str]) -> str:
    """System calls per flip, a column per backend (``strace -c`` windows)."""
    keys = list(syscalls)
    names = sorted(
        {n for counts in syscalls.values() for n in counts},
        key=lambda n: -max(c.get(n, 0.0) for c in syscalls.values()),
    )
    head = f"{'system calls per flip':<24}" + "".join(f"{labels.get(k, k)[:22]:>24}" for k in keys)
    lines = [head, "-" * len(head)]
    lines.append(
        f"{'(all)':<24}" + "".join(f"{sum(syscalls[k].values()):>24.1f}" for k in keys)
    )
    for name in names:
        if max(syscalls[k].get(name, 0.0) for k in keys) < 0.05:
            continue
        lines.append(f"{name:<24}" + "".join(f"{syscalls[k].get(name, 0.0):>24.2f}" for k in keys))
    return "\n".join(lines)


ECHO = "bare trio wake-up (pipe echo with another process)"


def loop_thread_ms(run: Run) -> float:
    """CPU per flip of the process's first thread (displback's event loop)."""
    if not run.threads_ms_per_flip:
        return float("nan")
    first = min(run.threads_ms_per_flip, key=lambda name: int(name.split()[0]))
    return run.threads_ms_per_flip[first]


def floor_rows(runs: list[Run], costs: dict[str, float]) -> list[dict[str, Any]]:
    """Each timed run against two bare trio wake-ups of the same boot (bench.vm_costs).

    A trio backend's flip is two wake-ups at least (the request's, the display's event), so
    ``2 × echo`` is its floor in this Dom0, and a ratio to it compares trees across boots
    where the milliseconds do not (TCG on a shared host moves them by a third)."""
    wake_us = costs.get(ECHO)
    if not wake_us:
        return []
    floor_ms = 2 * wake_us / 1000
    return [
        {
            "backend": run.backend, "floor_ms": round(floor_ms, 3),
            "cpu_ms_per_flip": round(run.cpu_ms_per_flip, 3),
            "cpu_per_floor": round(run.cpu_ms_per_flip / floor_ms, 2),
            "loop_ms_per_flip": round(loop_thread_ms(run), 3),
            "loop_per_floor": round(loop_thread_ms(run) / floor_ms, 2),
        }
        for run in runs
        if not run.profiled and not run.error
    ]  # fmt: skip


def floor_table(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    if not rows:
        return ""
    lines = [
        f"The floor: two bare trio wake-ups in this Dom0 = {rows[0]['floor_ms']:.2f} ms "
        "(a trio backend's flip is two at least)",
        f"{'backend':<30} {'CPU/flip':>9} {'/ floor':>8} {'first thread':>13} {'/ floor':>8}",
    ]
    for row in rows:
        lines.append(
            f"{labels.get(row['backend'], row['backend']):<30} {row['cpu_ms_per_flip']:>6.2f} ms "
            f"{row['cpu_per_floor']:>7.2f}× {row['loop_ms_per_flip']:>10.2f} ms "
            f"{row['loop_per_floor']:>7.2f}×"
        )
    return "\n".join(lines)


#: py-spy's samples per second (bench.vm_sampler.StackSampler's default).
STACK_RATE = 250


def _frame_name(frame: str) -> str:
    """``func (file:line)`` → ``func (file)``: a function's samples, whatever its line."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def stack_report(stacks: dict[str, int], rate: int, flips: int, limit: int = 30) -> dict[str, Any]:
    """Where the sampled CPU went, in ms per flip: per thread; per function where the
    sample was taken (self), with its line; and per displback function on the stack
    (inclusive), for the event loop's thread (the first)."""
    per_flip = 1000.0 / rate / max(flips, 1)
    threads: dict[str, int] = {}
    for stack, count in stacks.items():
        thread = stack.split(";", 1)[0]
        threads[thread] = threads.get(thread, 0) + count
    if not threads:
        return {"threads": {}, "self": [], "lines": [], "inclusive": []}
    loop = min(threads, key=lambda t: int(t.split("(")[1].split(")")[0]))
    own: dict[str, int] = {}
    lines: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    for stack, count in stacks.items():
        frames = stack.split(";")
        if frames[0] != loop or len(frames) < 2:
            continue
        leaf = frames[-1]
        own[_frame_name(leaf)] = own.get(_frame_name(leaf), 0) + count
        lines[leaf] = lines.get(leaf, 0) + count
        for name in {_frame_name(f) for f in frames[1:] if "displback/" in f}:
            inclusive[name] = inclusive.get(name, 0) + count

    def top(counts: dict[str, int]) -> list[list[Any]]:
        rows = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
        return [[name, round(count * per_flip, 3)] for name, count in rows]

    return {
        "threads": {t: round(c * per_flip, 3) for t, c in threads.items()},
        "loop_thread": loop,
        "self": top(own),
        "lines": top(lines),
        "inclusive": top(inclusive),
    }


def stack_text(report: dict[str, Any], limit: int = 20) -> str:
    out = ["  threads: " + ", ".join(f"{t} {ms:.2f}" for t, ms in report["threads"].items())]
    for title, key in (("self (where the sample was)", "self"), ("lines", "lines"),
                       ("inclusive (displback functions on the stack)", "inclusive")):
        out.append(f"  {title}:")
        out.extend(f"    {ms:7.3f}  {name}" for name, ms in report[key][:limit])
    return "\n".join(out)


def _short(filename: str) -> str:
    for marker in ("/displback/", "/site-packages/", "/lib/python3"):
        if marker in filename:
            return filename[filename.index(marker) + 1 :]
    return filename


class Bench:
    """The runs on one booted Dom0."""

    def __init__(self, dom0: Dom0, *, flips: int, warmup: int, size: str, python: str) -> None:
        self.dom0 = dom0
        self.flips = flips
        self.warmup = warmup
        self.size = size
        self.python = python
        self.pid: int | None = None
        self.guests = 0
        self.starts = 0

    def bochs_card(self) -> str:
        text = self.dom0.output(
            "for c in /sys/class/drm/card[0-9]; do echo $c $(readlink $c/device/driver); done"
        )
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].endswith("/bochs-drm"):
                return "/dev/dri/" + parts[0].rsplit("/", 1)[1]
        raise RuntimeError(f"no bochs card in Dom0:\n{text}")

    def start(self, backend: Backend, displ_be: DisplBe | None) -> None:
        self.starts += 1  # a log of its own per start: "ready" is looked for in this one
        name = f"{backend.key}-{self.starts}.log"
        log = f"{SHARE}/{name}"
        if backend.kind == "displback":
            argv = shlex.join(
                [
                    self.python, "-m", "bench.vm_daemon", f"{SHARE}/{backend.key}.pstats",
                    "--log-format", "json", "--log-level", "info", *backend.args,
                ]
            )  # fmt: skip
            env = shlex.join(["PYTHONDONTWRITEBYTECODE=1", *backend.env])
            command = f"cd {REPO} && {env} setsid {argv}"
            ready = '"event": "watching"'
        else:
            assert displ_be is not None
            command = f"cd / && setsid {shlex.join([str(displ_be.binary), *backend.args])}"
            ready = "libxenbe version"
        self.dom0.sh(f"{command} >>{log} 2>&1 </dev/null & echo $! > {SHARE}/backend.pid; cd /")
        self.pid = int((self.dom0.share / "backend.pid").read_text().strip())
        text = self.dom0.vm.wait_file(
            self.dom0.share / name,
            lambda t: ready in t or "cannot start" in t,
            300,
            what=f"{backend.label} ready",
        )
        if "cannot start" in text:
            raise RuntimeError(f"{backend.label} cannot start:\n{text[-2000:]}")
        time.sleep(2)  # displ_be: its XenStore watch is set up right after the version lines
        if self.dom0.sh(f"kill -0 {self.pid}", check=False) != 0:
            log_text = (self.dom0.share / name).read_text(errors="replace")
            raise RuntimeError(f"{backend.label} exited:\n{log_text[-2000:]}")

    def stop(self) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        self.dom0.sh(
            f"kill -TERM {pid}; i=0; while kill -0 {pid} 2>/dev/null && [ $i -lt 100 ]; do "
            f"sleep 0.2; i=$((i+1)); done; kill -KILL {pid} 2>/dev/null; true",
            timeout=60,
        )

    def measure(
        self, backend: Backend, *, profile: bool, syscalls: bool = False, stacks: str = ""
    ) -> Run:
        """One guest flipping on the running backend, measured by the sampler in Dom0."""
        assert self.pid is not None
        self.guests += 1
        name = f"{backend.key}-{self.guests}"
        console = f"{SHARE}/xenlog/guest-{name}.log"
        out = self.dom0.share / f"sample-{name}.json"
        ready = self.dom0.share / f"sampler-{name}.ready"
        sampler = shlex.join(
            [
                self.python, "-m", "bench.vm_sampler", "--pid", str(self.pid),
                "--console", console, "--out", f"{SHARE}/{out.name}",
                "--ready", f"{SHARE}/{ready.name}", *(["--profile"] if profile else []),
                *(["--syscalls", f"{SHARE}/strace-{name}.txt"] if syscalls else []),
                *(["--stacks", f"{SHARE}/stacks-{name}.txt", "--py-spy", stacks] if stacks else []),
            ]
        )  # fmt: skip
        self.dom0.sh(
            f"cd {REPO} && PYTHONDONTWRITEBYTECODE=1 {sampler} >{SHARE}/sampler-{name}.txt "
            f"2>&1 </dev/null & cd /"
        )
        self.dom0.vm.wait_file(ready, lambda _: True, 300, what="the sampler started")
        _say(f"{name}: xl create ({self.flips} flips, {self.warmup} untimed)")
        self.dom0.xl_create(
            name,
            connectors=f"{CONNECTOR}:{self.size}",
            draw="0",
            flips=self.flips,
            warmup=self.warmup,
            hold=3600,
        )
        try:
            text = self.dom0.vm.wait_file(out, lambda t: t.endswith("}"), 1200, what="flips")
        finally:
            self.dom0.sh(f"xl destroy {name}", check=False, timeout=120)
        run = result_of(backend.key, name, json.loads(text), profiled=profile)
        _say(
            f"{name}: {run.fps:.1f} fps, backend {run.cpu_ms_per_flip:.2f} ms CPU/flip"
            + (f" (error: {run.error})" if run.error else "")
            + f"; by thread: {run.threads_ms_per_flip}"
        )
        return run


def backends(card: str, size: str, displ_be: DisplBe | None) -> list[Backend]:
    found = [
        Backend(
            "displback-kms", "displback, KMS (bochs)", "displback",
            ("--display", "kms", "--card", card, "--connector", f"{CONNECTOR}={size}"),
        ),
        Backend(
            "displback-virtual", "displback, virtual display", "displback",
            ("--display", "virtual", "--virtual-output", f"{CONNECTOR}={size}@1000"),
        ),
    ]  # fmt: skip
    if native_copies_built():
        # The same KMS run with the frame copies in Python threads: what the native copy
        # threads (displback/backend/_copythreads.c) change, on the same boot.
        found.insert(1, Backend(
            "displback-kms-pycopy", "displback, KMS, Python copies", "displback",
            found[0].args, ("DISPLBACK_COPY_THREADS=python",),
        ))  # fmt: skip
        # And with the native threads copying but the loop flipping after each copy: what
        # the threads' own flips (KmsOutput.native_flip) change.
        found.insert(2, Backend(
            "displback-kms-loopflip", "displback, KMS, loop flips", "displback",
            found[0].args, ("DISPLBACK_COPY_THREADS=native-no-flip",),
        ))  # fmt: skip
    if displ_be is not None:
        found.append(
            Backend("displ_be", "displ_be, DRM copy (bochs)", "displ_be",
                    ("-m", "DRM", "-d", card, "-z"))
        )  # fmt: skip
    return found


def table(runs: list[Run], labels: dict[str, str]) -> str:
    head = (
        f"{'backend':<30} {'CPU/flip':>9} {'user':>7} {'sys':>7} {'Dom0 busy':>10} "
        f"{'steal':>7} {'fps':>6} {'flips':>6} {'failed':>6}"
    )
    lines = [head, "-" * len(head)]
    for run in runs:
        if run.profiled:
            continue
        label = labels.get(run.backend, run.backend)
        if run.error:
            lines.append(f"{label:<30} ERROR {run.error}")
            continue
        lines.append(
            f"{label:<30} {run.cpu_ms_per_flip:>6.2f} ms {run.user_ms_per_flip:>7.2f} "
            f"{run.sys_ms_per_flip:>7.2f} {run.dom0_busy_ms_per_flip:>7.2f} ms "
            f"{run.dom0_steal_ms_per_flip:>7.2f} {run.fps:>6.1f} {run.flips:>6} {run.failed:>6}"
        )
    return "\n".join(lines)


def boot_assets(work: Path) -> Any:
    """The kernel (cached), Xen, and both initramfs images, as tests/vm/conftest.py builds them."""
    from tests.vm import initramfs, kernel
    from tests.vm.conftest import VMAssets
    from tests.vm.machine import xen_elf

    compileall.compile_dir(str(REPO / "displback"), quiet=1)
    compileall.compile_dir(str(REPO / "bench"), quiet=1)
    drmtest = initramfs.compile_drmtest(work / "drmtest")
    return VMAssets(
        xen=xen_elf(kernel.CACHE_ROOT),
        bzimage=kernel.build(),
        dom0_initramfs=initramfs.build_dom0(work / "dom0.cpio"),
        domu_initramfs=initramfs.build_domu(work / "domU.cpio", drmtest),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vm", description=__doc__)
    parser.add_argument("--displ-be", type=Path, help="prefix (or binary) of a displ_be build")
    parser.add_argument("--flips", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--size", default="1024x768")
    parser.add_argument("--rounds", type=int, default=1, help="measure every backend N times")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument(
        "--no-syscalls", action="store_true", help="skip the strace -c window of each backend"
    )
    parser.add_argument(
        "--stacks", action="store_true",
        help="one more window of each displback backend sampled by py-spy (pip install py-spy)",
    )  # fmt: skip
    parser.add_argument("--only", default="", help="comma-separated backend keys")
    parser.add_argument("--json", type=Path, default=Path("bench-vm-results.json"))
    parser.add_argument("--workdir", type=Path, help="kept for post-mortems (default: a tmp dir)")
    args = parser.parse_args(argv)
    displ_be = None
    if args.displ_be is not None:
        try:
            displ_be = DisplBe.at(args.displ_be)
        except BuildError as error:
            _say(str(error))
            return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-vm-"))
    work.mkdir(parents=True, exist_ok=True)
    _say(f"work directory {work}")
    machine = machine_info()
    assets = boot_assets(work)
    from tests.vm.conftest import booted_dom0  # the harness's boot, unchanged

    runs: list[Run] = []
    costs: dict[str, float] = {}
    profiles: dict[str, Any] = {}
    syscalls: dict[str, dict[str, float]] = {}
    stack_reports: dict[str, dict[str, Any]] = {}
    py_spy = ""
    if args.stacks:
        found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(found).is_file():
            parser.error("--stacks needs py-spy (pip install py-spy)")
        py_spy = found
    labels: dict[str, str] = {}
    errors: list[str] = []
    started = time.monotonic()
    with booted_dom0(assets, work) as dom0:
        bench = Bench(
            dom0, flips=args.flips, warmup=args.warmup, size=args.size, python=sys.executable
        )
        card = bench.bochs_card()
        chosen = backends(card, args.size, displ_be)
        if args.only:
            keep = set(args.only.split(","))
            chosen = [b for b in chosen if b.key in keep]
        labels = {b.key: b.label for b in chosen}
        try:
            costs = dom0_costs(dom0, sys.executable)
        except Exception as error:  # the backends' rows matter more
            errors.append(f"Dom0 micro-costs: {error}")
        for round_ in range(args.rounds):
            # Every other round in reverse: no backend is always measured right after the
            # same other one (the host's state after a run moves the next run's numbers).
            for backend in chosen if round_ % 2 == 0 else chosen[::-1]:
                _say(f"round {round_ + 1}: {backend.label}")
                try:
                    bench.start(backend, displ_be)
                    runs.append(bench.measure(backend, profile=False))
                    if backend.kind == "displback" and round_ == 0 and not args.no_profile:
                        profiled = bench.measure(backend, profile=True)
                        runs.append(profiled)
                        path = dom0.share / f"{backend.key}.pstats"
                        if path.is_file() and not profiled.error:
                            rows, text = top_functions(path, profiled.flips)
                            profiles[backend.key] = {"flips": profiled.flips, "top": rows}
                            print(f"\n--- profile: {backend.label} ---\n{text}", file=sys.stderr)
                    if backend.kind == "displback" and round_ == 0 and py_spy:
                        sampled = bench.measure(backend, profile=False, stacks=py_spy)
                        runs.append(sampled)
                        if not sampled.error and sampled.raw.get("stacks"):
                            stack_reports[backend.key] = stack_report(
                                sampled.raw["stacks"], STACK_RATE, sampled.flips)
                    if round_ == 0 and not args.no_syscalls:
                        counted = bench.measure(backend, profile=False, syscalls=True)
                        runs.append(counted)
                        if not counted.error:
                            syscalls[backend.key] = counted.syscalls_per_flip
                except Exception as error:  # one backend failing must not lose the others
                    errors.append(f"{backend.key}: {error}")
                    _say(f"{backend.label} failed: {error}")
                finally:
                    with contextlib.suppress(Exception):
                        bench.stop()
    print(table(runs, labels))
    for key, profile in profiles.items():
        print(f"\nprofile, {labels[key]}: top functions by own time (µs per flip under TCG)")
        for row in profile["top"][:15]:
            print(
                f"  {row['own_us_per_flip']:8.1f} own {row['cum_us_per_flip']:9.1f} cum "
                f"{row['calls_per_flip']:6.1f} calls  {row['function']}"
            )
    for key, report in stack_reports.items():
        print(f"\nsampled stacks, {labels[key]} (py-spy, ms of CPU per flip):")
        print(stack_text(report))
    if syscalls:
        print("\n" + syscall_table(syscalls, labels))
    if costs:
        print("\nDom0 micro-costs, CPU per call (bench.vm_costs; natively ≲ 1 µs but the last):")
        for name, us in costs.items():
            print(f"  {name:42s} {us:9.2f} µs")
    floors = floor_rows(runs, costs)
    if floors:
        print("\n" + floor_table(floors, labels))
    for problem in errors:
        print(f"ERROR: {problem}")
    document = {
        "machine": machine,
        "loadavg_after": os.getloadavg(),
        "wall_s": round(time.monotonic() - started, 1),
        "settings": {
            "flips": args.flips, "warmup": args.warmup, "size": args.size,
            "rounds": args.rounds, "displ_be": str(displ_be.prefix) if displ_be else None,
        },
        "runs": [asdict(r) for r in runs],
        "profiles": profiles,
        "syscalls_per_flip": syscalls,
        "stacks": stack_reports,
        "dom0_costs_us": costs,
        "floor": floors,
        "errors": errors,
        "workdir": str(work),
    }  # fmt: skip
    args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    _say(f"wrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
