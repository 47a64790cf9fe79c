"""Runs in the nested Dom0 (bench.vm): the backend's CPU time over the guest's timed flips.

``python -m bench.vm_sampler --pid PID --console LOG --out JSON [--profile]`` watches the
guest's console log (xenconsoled writes it) for drmtest's ``DRMTEST BENCH START`` and
``DRMTEST BENCH c flips=…`` lines and reads, at each, the backend's ``utime + stime`` from
``/proc/PID/stat`` (every thread, USER_HZ ticks) and Dom0's busy time from ``/proc/stat``
(all vCPUs: the kernel's grant, event-channel and DRM work outside the process shows there).
It polls every 0.1 s: both ends of the window lag their line by the same 0–0.1 s on average,
so the CPU *rate* over the window is unbiased; bench.vm divides it by the guest's own flip
rate. Why in Dom0: the host sees the console only through the serial line and 9p, seconds
late under TCG. ``--profile``: SIGUSR1 to the backend at the start, SIGUSR2 at the end
(bench.vm_daemon switches its cProfile with them). ``--syscalls FILE``: ``strace -c -f``
attached to the backend over the window, its summary (calls per system call, every thread)
parsed into the result: which calls a flip makes, each a trap through Xen in a PV Dom0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

USER_HZ = os.sysconf("SC_CLK_TCK")
_START = re.compile(rb"DRMTEST BENCH START (\d+)")
_END = re.compile(rb"DRMTEST BENCH (\d+) flips=(\d+) ns=(\d+) failed=(\d+)")
_FAIL = re.compile(rb"DRMTEST FAIL[^\n]*")
#: /proc/stat's cpu columns that are not busy time (idle, iowait, steal, guest time counted
#: twice: guest and guest_nice are already in user and nice).
_NOT_BUSY = {3, 4, 7, 8, 9}


def process_cpu(pid: int) -> tuple[float, float]:
    """The process's (user, system) CPU seconds, every thread included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) / USER_HZ, int(fields[12]) / USER_HZ


def dom0_cpu() -> tuple[float, float]:
    """Busy and stolen CPU seconds of all of Dom0's vCPUs since boot.

    Stolen: runnable while Xen ran another vCPU (the guest's, say). A process's CPU time
    (:func:`process_cpu`) is measured on Xen's clock and includes such stolen time when the
    kernel does not subtract it; ``/proc/stat`` counts it apart.
    """
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(v) for i, v in enumerate(first) if i not in _NOT_BUSY)
    return busy / USER_HZ, int(first[7]) / USER_HZ


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each live thread, keyed ``"tid name"``: whether the
    event loop or the copy threads spend it."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            head, _, rest = (task / "stat").read_text().rpartition(")")
        except OSError:  # the thread ended meanwhile
            continue
        fields = rest.split()
        name = head.partition("(")[2]
        found[f"{task.name} {name}"] = (int(fields[11]) + int(fields[12])) / USER_HZ
    return found


def sample(pid: int) -> dict[str, Any]:
    user, system = process_cpu(pid)
    busy, steal = dom0_cpu()
    return {
        "t": time.monotonic(),
        "user_s": user,
        "sys_s": system,
        "dom0_busy_s": busy,
        "dom0_steal_s": steal,
        "threads": thread_cpu(pid),
    }


_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def parse_strace_summary(text: str) -> dict[str, int]:
    """``{system call: calls}`` from ``strace -c``'s table (its total row left out)."""
    calls = {}
    for line in text.splitlines():
        row = _STRACE_ROW.match(line)
        if row is not None and row.group(3) != "total":
            calls[row.group(3)] = int(row.group(1))
    return calls


class SyscallCounter:
    """``strace -c -f`` attached to ``pid`` from :meth:`start` to :meth:`stop`."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["strace", "-c", "-f", "-qq", "-o", str(self.out), "-p", str(self.pid)],
            stdin=subprocess.DEVNULL,
        )

    def stop(self) -> dict[str, int]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)  # detaches and writes the summary
        self.proc.wait(timeout=120)
        return parse_strace_summary(self.out.read_text())


class StackSampler:
    """``py-spy record`` of ``pid`` from :meth:`start` to :meth:`stop`: the Python stacks of
    every thread, sampled ``rate`` times a second without stopping the backend
    (``--nonblocking``), idle samples (a thread waiting in a system call) left out. Unlike
    cProfile it adds nothing to the backend's own calls, whose clock reads are system calls
    in a PV Dom0. Read shares, not times: a runnable thread whose vCPU Xen preempted counts
    as busy, and under TCG py-spy keeps up with a fraction of its rate."""

    def __init__(self, pid: int, out: Path, py_spy: str, rate: int = 250) -> None:
        self.pid = pid
        self.out = out
        self.py_spy = py_spy
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.py_spy, "record", "--nonblocking", "--threads", "--format", "raw",
             "--rate", str(self.rate), "--output", str(self.out), "--pid", str(self.pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> dict[str, int]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)  # stops and writes the stacks
        self.proc.wait(timeout=300)
        return parse_collapsed(self.out.read_text()) if self.out.is_file() else {}


def parse_collapsed(text: str) -> dict[str, int]:
    """py-spy's raw (collapsed) stacks: ``frame;frame;… count`` lines → {stack: samples}."""
    stacks: dict[str, int] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] = stacks.get(stack, 0) + int(count)
    return stacks


def watch(
    console: Path,
    pid: int,
    *,
    profile: bool,
    timeout: float,
    syscalls: SyscallCounter | None = None,
    stacks: StackSampler | None = None,
) -> dict[str, Any]:
    """Wait for the timed window in ``console`` and measure the backend across it."""
    deadline = time.monotonic() + timeout
    text = b""
    offset = 0
    start: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        try:
            with console.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        text += chunk
        if start is None and _START.search(text):
            start = sample(pid)
            if profile:
                os.kill(pid, signal.SIGUSR1)
            if syscalls is not None:
                syscalls.start()
            if stacks is not None:
                stacks.start()
        end = _END.search(text)
        if start is not None and end is not None:
            stop = sample(pid)
            if profile:
                os.kill(pid, signal.SIGUSR2)
            result = {
                "start": start,
                "end": stop,
                "connector": int(end.group(1)),
                "flips": int(end.group(2)),
                "guest_ns": int(end.group(3)),
                "failed": int(end.group(4)),
            }
            if syscalls is not None:
                result["syscalls"] = syscalls.stop()
            if stacks is not None:
                result["stacks"] = stacks.stop()
            return result
        failed = _FAIL.search(text)
        if failed is not None:
            return {"error": failed.group(0).decode(errors="replace")}
        if not Path(f"/proc/{pid}").exists():
            return {"error": f"the backend (pid {pid}) exited"}
        time.sleep(0.1)
    return {"error": f"no timed window within {timeout:g} s (start seen: {start is not None})"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vm_sampler")
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--console", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ready", type=Path, required=True, help="touched once started")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--syscalls", type=Path, help="strace -c's summary goes here")
    parser.add_argument("--stacks", type=Path, help="py-spy's collapsed stacks go here")
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy binary, for --stacks")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    args.ready.touch()
    counter = None if args.syscalls is None else SyscallCounter(args.pid, args.syscalls)
    sampler = None if args.stacks is None else StackSampler(args.pid, args.stacks, args.py_spy)
    result = watch(
        args.console, args.pid, profile=args.profile, timeout=args.timeout, syscalls=counter,
        stacks=sampler,
    )
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.rename(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
