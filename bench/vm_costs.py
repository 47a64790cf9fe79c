"""Runs in the nested Dom0 (bench.vm): what the pieces of a flip cost there, one by one.

``python -m bench.vm_costs [--calls N] [--json FILE]`` times, in CPU per call of this
process (``time.process_time``): an empty Python call, ``time.monotonic`` (a
``clock_gettime``), a bare system call (``os.getppid``), a ``threading.Lock`` acquire and
release, a socketpair send and receive (trio's ``run_sync_soon`` wake-up), an epoll modify
and poll (trio's ``wait_readable`` and run-loop pass), a round trip to another thread
through two ``queue.SimpleQueue`` (a copy handed to a worker thread and back), and a **bare
trio wake-up**: a trio task that waits until a pipe is readable, reads the byte another
process wrote and answers with a byte on a second pipe (an echo, as displback's reader wakes
on the guest's event channel and notifies it; the CPU of the trio process only). A flip of
displback's is two such wake-ups at least (the request's and the display's event), so twice
the echo is the floor of a trio backend's flip in that Dom0. Natively
each is well under a microsecond but the last; in a PV Dom0 under TCG a system call costs
about a hundred times more, and so does everything that makes one — which a flip of
displback's makes some sixty of per flip, displ_be's seven (bench.vm's system-call table).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import trio


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """CPU time of this process per call of ``fn``, in microseconds."""
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e6


def thread_round_trip_us(rounds: int) -> float:
    """CPU time (all threads) per round trip to a worker thread through two queues."""
    there: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    back: queue.SimpleQueue[int] = queue.SimpleQueue()

    def echo() -> None:
        while (item := there.get()) is not None:
            back.put(item)

    worker = threading.Thread(target=echo, daemon=True)
    worker.start()
    start = time.process_time()
    for i in range(rounds):
        there.put(i)
        back.get()
    spent = time.process_time() - start
    there.put(None)
    worker.join()
    return spent / rounds * 1e6


# The echo's other side: a plain loop in another process, so that its CPU is not counted.
_ECHO_PEER = """
import os, sys
ask, answer = int(sys.argv[1]), int(sys.argv[2])
for _ in range(int(sys.argv[3])):
    os.write(ask, b"x")
    os.read(answer, 1)
"""


def trio_echo_us(
    rounds: int, warmup: int = 20, work: Callable[[], object] | None = None
) -> float:
    """CPU time of a trio process per wake-up: wait for a pipe, read a byte, write one back
    (and call ``work`` in the wake-up: what it adds is its cost in a freshly woken process)."""
    ask_r, ask_w = os.pipe()
    answer_r, answer_w = os.pipe()
    os.set_blocking(ask_r, False)
    peer = subprocess.Popen(
        [sys.executable, "-c", _ECHO_PEER, str(ask_w), str(answer_r), str(warmup + rounds)],
        pass_fds=(ask_w, answer_r),
    )
    os.close(ask_w)
    os.close(answer_r)

    async def echo() -> float:
        start = 0.0
        for n in range(warmup + rounds):
            if n == warmup:
                start = time.process_time()
            await trio.lowlevel.wait_readable(ask_r)
            os.read(ask_r, 1)
            if work is not None:
                work()
            os.write(answer_w, b"x")
        return time.process_time() - start

    try:
        spent = trio.run(echo)
    finally:
        os.close(ask_r)
        os.close(answer_w)
        peer.wait(timeout=60)
    return spent / rounds * 1e6


class _Thing:
    def __init__(self, n: int) -> None:
        self.n = n
        self.pad = [n] * 8


def woken_costs(rounds: int, base: float) -> dict[str, float]:
    """What a piece costs inside a wake-up (the echo with it, less the bare echo, per piece):
    in a PV Dom0 under TCG the same code costs far more right after a wake-up than in a hot
    loop, so this says what to cut from a flip — system calls, Python calls or the memory
    touched. ``base``: the bare echo's µs per wake-up (:func:`trio_echo_us`)."""
    things = [_Thing(n) for n in range(20_000)]  # about 4 MiB of small objects
    stride = things[::20]  # 1000 of them, spread over the whole heap

    def syscalls() -> None:
        for _ in range(10):
            os.getppid()

    def calls() -> None:
        for _ in range(100):
            _empty()

    def touch() -> None:
        for thing in stride:
            thing.n  # noqa: B018 (the read is the point)

    def loop_only() -> None:
        for _ in stride:
            pass

    with_syscalls = trio_echo_us(rounds, work=syscalls)
    with_calls = trio_echo_us(rounds, work=calls)
    return {
        "in a wake-up: a bare system call (os.getppid)": (with_syscalls - base) / 10,
        "in a wake-up: an empty Python call": (with_calls - base) / 100,
        "in a wake-up: an attribute of one of 1000 objects spread over 4 MiB": (
            trio_echo_us(rounds, work=touch) - trio_echo_us(rounds, work=loop_only)
        ) / 1000,
    }


def _empty() -> None:
    pass


def measure(calls: int) -> dict[str, float]:
    """Microseconds of CPU per call of each piece (see the module docstring)."""
    lock = threading.Lock()
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    poller = select.epoll()
    oneshot = select.EPOLLIN | select.EPOLLONESHOT
    poller.register(reader.fileno(), oneshot)

    def lock_cycle() -> None:
        lock.acquire()
        lock.release()

    def socket_wakeup() -> None:
        writer.send(b"x")
        reader.recv(64)

    def epoll_pass() -> None:
        poller.modify(reader.fileno(), oneshot)
        poller.poll(0)

    rounds = max(1, calls // 10)
    try:
        echo = trio_echo_us(rounds)
        return {
            "empty Python call": per_call_us(_empty, calls),
            "time.monotonic (clock_gettime)": per_call_us(time.monotonic, calls),
            "os.getppid (a bare system call)": per_call_us(os.getppid, calls),
            "threading.Lock acquire + release": per_call_us(lock_cycle, calls),
            "socketpair send + recv": per_call_us(socket_wakeup, calls),
            "epoll modify + poll(0)": per_call_us(epoll_pass, calls),
            "round trip to a thread (2 SimpleQueues)": thread_round_trip_us(rounds),
            "bare trio wake-up (pipe echo with another process)": echo,
            **woken_costs(rounds, echo),
        }
    finally:
        poller.close()
        reader.close()
        writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vm_costs")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    costs = measure(args.calls)
    for name, us in costs.items():
        print(f"{name:42s} {us:9.2f} µs")
    if args.json is not None:
        args.json.write_text(json.dumps(costs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
