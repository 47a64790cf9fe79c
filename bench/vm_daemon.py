"""Runs in the nested Dom0 (bench.vm): ``displback run`` with a cProfile switched by signals.

``python -m bench.vm_daemon PSTATS ARGS…`` runs ``displback.app.run.main(ARGS)`` unchanged, plus:
SIGUSR1 starts profiling the event loop's thread, SIGUSR2 stops it and writes the stats to
``PSTATS`` (bench.vm_sampler sends both around the guest's timed flips). Only the profiled
window pays the profiler's cost, so the same daemon serves the unprofiled measurement and
then the profiled one. The timer is the event loop thread's CPU time (``time.thread_time``),
not the wall clock: time spent waiting in epoll is not the flip path's cost. Worker threads
(copies) are not profiled: cProfile follows the thread that enabled it.
"""

from __future__ import annotations

import cProfile
import signal
import sys
import time
from types import FrameType

from displback.app.run import main as run_main


class SignalProfiler:
    """A cProfile turned on by SIGUSR1 and off (stats written) by SIGUSR2."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.profile = cProfile.Profile(time.thread_time)

    def install(self) -> None:
        signal.signal(signal.SIGUSR1, self._start)
        signal.signal(signal.SIGUSR2, self._stop)

    def _start(self, signum: int, frame: FrameType | None) -> None:
        self.profile = cProfile.Profile(time.thread_time)
        self.profile.enable()

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.profile.disable()
        self.profile.dump_stats(self.out)


def main(argv: list[str]) -> int:
    SignalProfiler(argv[0]).install()
    return run_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
