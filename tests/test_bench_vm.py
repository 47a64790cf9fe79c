"""bench-vm's pieces that run without the VM: the sampler, the per-flip arithmetic, the
displ_be build's checks (``make bench-vm`` itself boots the nested Xen; docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import vm_costs
from bench.displ_be import BuildError, DisplBe, cache_dir
from bench.vm import ECHO, Run, floor_rows, floor_table, result_of, syscall_table
from bench.vm_sampler import SyscallCounter, parse_strace_summary, watch


def test_cpu_per_flip_is_the_backend_cpu_rate_over_the_guest_flip_rate() -> None:
    raw = {
        "start": {"t": 10.0, "user_s": 1.0, "sys_s": 0.5, "dom0_busy_s": 3.0,
                  "threads": {"1 python": 1.0}},
        "end": {"t": 20.0, "user_s": 3.0, "sys_s": 1.5, "dom0_busy_s": 8.0,
                "threads": {"1 python": 3.5, "2 Trio thread": 0.5}},
        "flips": 100, "failed": 0, "guest_ns": 5_000_000_000,
    }  # fmt: skip
    run = result_of("displback-kms", "g", raw, profiled=False)
    assert run.fps == pytest.approx(20.0)
    # 3 s of backend CPU over a 10 s window = 30 % of a CPU, at 20 flips/s: 15 ms per flip.
    assert run.cpu_ms_per_flip == pytest.approx(15.0)
    assert run.user_ms_per_flip == pytest.approx(10.0)
    assert run.dom0_busy_ms_per_flip == pytest.approx(25.0)
    assert run.threads_ms_per_flip == {"1 python": 12.5, "2 Trio thread": 2.5}
    assert not run.error


def test_a_failed_guest_run_is_an_error_not_a_number() -> None:
    run = result_of("displ_be", "g", {"error": "DRMTEST FAIL SETCRTC"}, profiled=False)
    assert run.error == "DRMTEST FAIL SETCRTC"
    assert run.fps != run.fps  # NaN


def test_sampler_measures_between_the_guest_start_and_end_lines(tmp_path: Path) -> None:
    console = tmp_path / "guest.log"
    console.write_text(
        "DRMTEST SETCRTC 0 ok\nDRMTEST BENCH START 0\n"
        "DRMTEST BENCH 0 flips=950 ns=12500000000 failed=1\n"
    )
    result = watch(console, os.getpid(), profile=False, timeout=10)
    assert (result["flips"], result["guest_ns"], result["failed"]) == (950, 12_500_000_000, 1)
    assert result["end"]["t"] >= result["start"]["t"]
    assert result["end"]["user_s"] >= result["start"]["user_s"]
    assert all(name.split()[0].isdigit() for name in result["start"]["threads"])
    assert result["start"]["threads"]


def test_sampler_reports_the_guest_failure(tmp_path: Path) -> None:
    console = tmp_path / "guest.log"
    console.write_text("DRMTEST FAIL no card of that driver errno=2 (x)\n")
    result = watch(console, os.getpid(), profile=False, timeout=10)
    assert result["error"].startswith("DRMTEST FAIL no card")


def test_sampler_gives_up_when_the_window_never_comes(tmp_path: Path) -> None:
    result = watch(tmp_path / "absent.log", os.getpid(), profile=False, timeout=0.3)
    assert "no timed window" in result["error"]


def test_a_displ_be_prefix_without_the_binary_or_libxenbe_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="no bin/displ_be"):
        DisplBe.at(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "displ_be").write_text("")
    with pytest.raises(BuildError, match="libxenbe"):
        DisplBe.at(tmp_path / "bin" / "displ_be")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libxenbe.so").write_text("")
    assert DisplBe.at(tmp_path / "bin" / "displ_be").prefix == tmp_path


def test_the_build_lives_in_the_cache_not_the_checkout() -> None:
    assert "/.cache/displback/displ_be-" in str(cache_dir()) or os.environ.get("XDG_CACHE_HOME")
    assert not str(cache_dir()).startswith(str(Path(__file__).resolve().parents[1]))


def test_the_profiled_daemon_runs_displback_run_main() -> None:
    from bench import vm_daemon
    from displback.app.run import main

    assert vm_daemon.run_main is main


_STRACE_SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 45.12    0.012345          12      2000           ioctl
 20.00    0.005000           5      1000       500 read
  1.00    0.000100           1        10           epoll_wait
------ ----------- ----------- --------- --------- ----------------
100.00    0.017445           8      3010       500 total
"""


def test_strace_summary_becomes_calls_per_system_call_and_per_flip() -> None:
    calls = parse_strace_summary(_STRACE_SUMMARY)
    assert calls == {"ioctl": 2000, "read": 1000, "epoll_wait": 10}  # (errors column skipped)
    raw = {
        "start": {"t": 0.0, "user_s": 0.0, "sys_s": 0.0, "dom0_busy_s": 0.0, "threads": {}},
        "end": {"t": 10.0, "user_s": 1.0, "sys_s": 0.0, "dom0_busy_s": 1.0, "threads": {}},
        "flips": 1000, "failed": 0, "guest_ns": 10_000_000_000, "syscalls": calls,
    }  # fmt: skip
    run = result_of("displback-kms", "g", raw, profiled=False)
    assert run.syscalls_per_flip == {"ioctl": 2.0, "read": 1.0, "epoll_wait": 0.01}
    assert run.profiled  # strace's window is not one to time
    text = syscall_table({"displback-kms": run.syscalls_per_flip, "displ_be": {"ioctl": 1.0}},
                         {"displback-kms": "displback, KMS", "displ_be": "displ_be"})
    lines = text.splitlines()
    assert lines[2].split() == ["(all)", "3.0", "1.0"]
    assert lines[3].split() == ["ioctl", "2.00", "1.00"]
    assert "epoll_wait" not in text  # under 0.05 per flip in every column


def test_the_syscall_counter_counts_what_the_process_calls_while_attached(
    tmp_path: Path,
) -> None:
    stop = tmp_path / "stop"
    child = subprocess.Popen([
        sys.executable, "-c",
        "import os, sys, time\n"
        "while not os.path.exists(sys.argv[1]):\n    os.getppid(); time.sleep(0.005)\n",
        str(stop),
    ])  # fmt: skip
    try:
        counter = SyscallCounter(child.pid, tmp_path / "strace.txt")
        counter.start()
        time.sleep(1.0)
        calls = counter.stop()
    finally:
        stop.touch()
        child.wait(timeout=30)
    assert calls.get("getppid", 0) > 10


def test_the_micro_costs_time_every_piece_of_a_flip_and_write_them(tmp_path: Path) -> None:
    out = tmp_path / "costs.json"
    assert vm_costs.main(["--calls", "50", "--json", str(out)]) == 0
    costs = json.loads(out.read_text())
    assert set(costs) == {
        "empty Python call", "time.monotonic (clock_gettime)", "os.getppid (a bare system call)",
        "threading.Lock acquire + release", "socketpair send + recv", "epoll modify + poll(0)",
        "round trip to a thread (2 SimpleQueues)", ECHO,
        "in a wake-up: a bare system call (os.getppid)", "in a wake-up: an empty Python call",
        "in a wake-up: an attribute of one of 1000 objects spread over 4 MiB",
    }  # fmt: skip
    woken = {name for name in costs if name.startswith("in a wake-up")}
    # (differences of two timings: natively they may come out below zero)
    assert all(value >= 0 for name, value in costs.items() if name not in woken)
    assert costs["round trip to a thread (2 SimpleQueues)"] > 0  # two threads, really
    assert costs[ECHO] > 0  # the trio process woke and answered


def test_the_floor_rows_put_each_timed_run_against_two_bare_trio_wake_ups() -> None:
    timed = Run("displback-kms", "g", cpu_ms_per_flip=12.0,
                threads_ms_per_flip={"142 python": 3.0, "130 python": 9.0})
    profiled = Run("displback-kms", "g2", cpu_ms_per_flip=50.0, profiled=True)
    failed = Run("displ_be", "g3", error="no card")
    rows = floor_rows([timed, profiled, failed], {ECHO: 1500.0})
    assert rows == [{
        "backend": "displback-kms", "floor_ms": 3.0, "cpu_ms_per_flip": 12.0,
        "cpu_per_floor": 4.0, "loop_ms_per_flip": 9.0, "loop_per_floor": 3.0,
    }]  # fmt: skip
    assert "3.00 ms" in floor_table(rows, {"displback-kms": "displback, KMS"})
    assert "displback, KMS" in floor_table(rows, {"displback-kms": "displback, KMS"})
    assert floor_rows([timed], {}) == []  # an older Dom0 cost table has no echo


def test_the_stack_report_charges_the_loop_threads_samples_per_flip() -> None:
    from bench.vm import stack_report, stack_text
    from bench.vm_sampler import parse_collapsed

    raw = (
        "thread (130): MainThread;run (trio/_core/_run.py:2532);"
        "Connector.kick (displback/backend/connector.py:240);"
        "BackRing.take_requests (displback/protocol/ring.py:330) 30\n"
        "thread (130): MainThread;run (trio/_core/_run.py:2532);"
        "Connector.kick (displback/backend/connector.py:241) 10\n"
        "thread (130): MainThread;run (trio/_core/_run.py:2532);"
        "Connector.kick (displback/backend/connector.py:240);"
        "BackRing.take_requests (displback/protocol/ring.py:331) 10\n"
        "thread (142): copy;copy (?) 25\n"
        "garbage\n"
    )
    stacks = parse_collapsed(raw)
    assert sum(stacks.values()) == 75
    report = stack_report(stacks, rate=100, flips=100)  # a sample: 10 ms / 100 flips
    assert report["threads"] == {"thread (130): MainThread": 5.0, "thread (142): copy": 2.5}
    assert report["loop_thread"] == "thread (130): MainThread"
    assert report["self"][0] == ["BackRing.take_requests (displback/protocol/ring.py)", 4.0]
    assert report["lines"][0] == ["BackRing.take_requests (displback/protocol/ring.py:330)", 3.0]
    assert ["Connector.kick (displback/backend/connector.py)", 5.0] in report["inclusive"]
    assert all("trio/" not in name for name, _ in report["inclusive"])
    assert "BackRing.take_requests" in stack_text(report)
    raw_run = {
        "start": {"t": 0.0, "user_s": 0.0, "sys_s": 0.0, "dom0_busy_s": 0.0, "threads": {}},
        "end": {"t": 10.0, "user_s": 1.0, "sys_s": 0.0, "dom0_busy_s": 1.0, "threads": {}},
        "flips": 1000, "failed": 0, "guest_ns": 10_000_000_000, "stacks": stacks,
    }  # fmt: skip
    assert result_of("displback-kms", "g", raw_run, profiled=False).profiled  # (not timed)
