"""Run a command under the unit's system-call filter and memory-deny-write-execute, built as
systemd builds them (so the tests can prove the daemon works inside them without systemd as
PID 1).

``python -m tests.unit_sandbox ALLOWED_FILE -- PROGRAM ARGS...`` loads two seccomp filters
with libseccomp, then ``execve``\\ s PROGRAM (filters stay across ``execve``):

* ``SystemCallFilter=`` + ``SystemCallErrorNumber=EPERM``: every system call not named in
  ALLOWED_FILE (one name a line: the unit's sets expanded by ``systemd-analyze
  syscall-filter``) fails with EPERM;
* ``MemoryDenyWriteExecute=yes`` as systemd 252 implements it (``seccomp_memory_deny_write_
  execute``): ``mmap`` with PROT_WRITE and PROT_EXEC, ``mprotect``/``pkey_mprotect`` with
  PROT_EXEC, ``shmat`` with SHM_EXEC fail with EPERM.

Like ``NoNewPrivileges=yes``, loading sets no_new_privs. Exit 77: libseccomp is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
SHM_EXEC = 0o100000


def scmp_act_errno(value: int) -> int:
    return 0x00050000 | (value & 0xFFFF)


class ScmpArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
        ctypes.POINTER(ScmpArgCmp),
    ]  # fmt: skip
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def _load(lib: ctypes.CDLL, default: int, rules: list[tuple[int, str, list[ScmpArgCmp]]]) -> None:
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        for action, name, cmps in rules:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a system call of this architecture
                continue
            array = (ScmpArgCmp * len(cmps))(*cmps) if cmps else None
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
            if rc < 0:
                raise OSError(-rc, f"seccomp_rule_add {name}: {os.strerror(-rc)}")
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)


def confine(allowed: list[str]) -> None:
    lib = _libseccomp()
    eperm = scmp_act_errno(errno.EPERM)
    wx = mmap.PROT_WRITE | mmap.PROT_EXEC
    x = mmap.PROT_EXEC
    # MemoryDenyWriteExecute first: loading the allow-list after it needs seccomp(2), which
    # the allow-list itself may not allow.
    _load(
        lib,
        SCMP_ACT_ALLOW,
        [
            (eperm, "mmap", [ScmpArgCmp(2, SCMP_CMP_MASKED_EQ, wx, wx)]),
            (eperm, "mprotect", [ScmpArgCmp(2, SCMP_CMP_MASKED_EQ, x, x)]),
            (eperm, "pkey_mprotect", [ScmpArgCmp(2, SCMP_CMP_MASKED_EQ, x, x)]),
            (eperm, "shmat", [ScmpArgCmp(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
        ],
    )
    _load(lib, eperm, [(SCMP_ACT_ALLOW, name, []) for name in allowed])


def main() -> None:
    allowed_file, sep, *argv = sys.argv[1:]
    assert sep == "--" and argv, __doc__
    with open(allowed_file) as f:
        allowed = [line.strip() for line in f if line.strip()]
    try:
        confine(allowed)
    except OSError as exc:
        if "libseccomp" in str(exc) or isinstance(exc, FileNotFoundError):
            sys.exit(77)
        raise
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
