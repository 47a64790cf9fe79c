"""Run inside the nested Dom0: hold the daemon's dma-bufs like a display that keeps them.

``python -m tests.vm.dom0_hold PID RELEASE_FILE`` takes a reference to every dma-buf the
process ``PID`` has open (``pidfd_getfd``: a new fd of this process for the same file, as a
compositor or KMS driver that imported the buffer would have), prints ``HOLDING n``, waits
until ``RELEASE_FILE`` exists, closes them, prints ``RELEASED n`` and stays (see the end of
:func:`main`) until the VM ends. The arm64 VM tests use
it to make ``DMABUF_EXP_WAIT_RELEASED`` time out on a real gntdev: the virtual display cannot
keep a reference itself, as gntdev's dma-bufs cannot be mmap'ed.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path

# Generic syscall numbers (the same on x86_64 and arm64).
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438


def _syscall(number: int, *args: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result = int(libc.syscall(number, *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def dmabuf_fds(pid: int) -> list[int]:
    """The fd numbers of ``pid`` that refer to dma-bufs."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if "dmabuf" in target:
            found.append(int(name))
    return sorted(found)


def main(argv: list[str]) -> int:
    pid, release = int(argv[0]), Path(argv[1])
    pidfd = _syscall(SYS_PIDFD_OPEN, pid, 0)
    held = [_syscall(SYS_PIDFD_GETFD, pidfd, fd, 0) for fd in dmabuf_fds(pid)]
    os.close(pidfd)
    print(f"HOLDING {len(held)}", flush=True)
    while not release.exists():
        time.sleep(0.2)
    for fd in held:
        os.close(fd)
    print(f"RELEASED {len(held)}", flush=True)
    # Measured: when this process exits, Dom0's busybox shell (PID 1 of the harness's Dom0)
    # exits too and Dom0 panics ("Attempted to kill init"), while its closes alone are fine.
    # So it lingers until the VM ends.
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
