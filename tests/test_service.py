"""`displback run` as a systemd service: READY once serving, watchdog pings from the event
loop, STOPPING on SIGTERM; the shipped unit and config agree with the code; the unit is
hardened (systemd-analyze rates it <= 2.5) and the daemon still works inside it."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from displback.app.run import RunConfig, serve
from displback.display.virtual import OutputConfig
from displback.sim.hypervisor import HypervisorThread
from displback.sim.platform import SimPlatform
from displback.sim.xenstored import running_xenstored
from displback.xen import real

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "displback.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def systemd_analyze() -> str:
    """``make apt-deps`` installs systemd: a missing systemd-analyze fails, it does not skip."""
    assert SYSTEMD_ANALYZE is not None, "systemd-analyze missing (make apt-deps installs systemd)"
    return SYSTEMD_ANALYZE


async def test_the_daemon_tells_systemd_ready_pings_the_watchdog_and_says_stopping(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = tmp_path / "notify"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(notify))
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    config = RunConfig(virtual_outputs=[OutputConfig("left", 64, 64)])
    messages: list[bytes] = []
    with sock, trio.fail_after(15):
        async with running_xenstored(str(tmp_path)) as xs:
            platform = SimPlatform(hypervisor.socket_path, xs.socket_path)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(functools.partial(serve, config, platform=platform))
                    while not any(m.startswith(b"READY=1") for m in messages):
                        messages.append(await sock.recv(4096))
                    pings = 0
                    while pings < 2:
                        message = await sock.recv(4096)
                        pings += message.startswith(b"WATCHDOG=1")
                    os.kill(os.getpid(), signal.SIGTERM)
                    while b"STOPPING=1" not in messages:
                        messages.append(await sock.recv(4096))
            finally:
                platform.close()
    assert any(b"STATUS=" in m for m in messages)


def test_the_unit_starts_the_daemon_as_a_notify_service_with_a_watchdog() -> None:
    unit = (REPO / "systemd" / "displback.service").read_text()
    assert "Type=notify" in unit
    assert "WatchdogSec=" in unit
    assert "ExecStart=/usr/bin/displback run --config /etc/displback/displback.toml" in unit


def test_the_unit_keeps_be_alloc_memory_across_restarts_in_the_fd_store() -> None:
    unit = (REPO / "systemd" / "displback.service").read_text()
    store_max = next(
        int(line.split("=", 1)[1])
        for line in unit.splitlines()
        if line.startswith("FileDescriptorStoreMax=")
    )
    assert store_max >= 4096
    assert "FileDescriptorStorePreserve=yes" in unit


def _directives(name: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{name}=")
    ]


def _systemd_version() -> int:
    out = subprocess.run([systemd_analyze(), "--version"], capture_output=True, text=True).stdout
    match = re.match(r"systemd (\d+)", out)
    assert match, out
    return int(match.group(1))


def verify_unit(unit_text: str, directory: Path) -> None:
    """``systemd-analyze verify`` passes with nothing to say but what this systemd lacks."""
    unit = directory / "displback.service"
    unit.write_text(unit_text)
    done = subprocess.run(
        [systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    said = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if _systemd_version() < 254:  # FileDescriptorStorePreserve= came with systemd 254
        said = [line for line in said if "Unknown key 'FileDescriptorStorePreserve'" not in line]
    assert done.returncode == 0 and not said, said


def test_systemd_analyze_security_rates_the_unit_at_most_2_5() -> None:
    done = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for displback.service: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.5, done.stdout


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify also checks that ExecStart's program exists: point it at one that does (the
    # installed path is checked by tests/test_install.py).
    program = tmp_path / "displback"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    text = UNIT.read_text().replace("ExecStart=/usr/bin/displback ", f"ExecStart={program} ")
    assert str(program) in text
    verify_unit(text, tmp_path)


def test_the_unit_allows_exactly_the_devices_the_real_platform_opens() -> None:
    opened = {real.DEFAULT_EVTCHN, real.DEFAULT_GNTDEV, real.DEFAULT_XENBUS, real.DEFAULT_UDMABUF}
    allowed = [entry.split() for entry in _directives("DeviceAllow")]
    assert _directives("DevicePolicy") == ["closed"]
    assert all(mode == "rw" for _, mode in allowed)
    # DRM cards (/dev/dri/cardN, any N) by their device class.
    assert {path for path, _ in allowed} == opened | {"char-drm"}


def test_the_unit_gives_no_capability_and_no_address_family_but_unix() -> None:
    assert _directives("CapabilityBoundingSet") == [""]
    assert _directives("AmbientCapabilities") == [""]
    assert _directives("RestrictAddressFamilies") == ["AF_UNIX"]
    assert _directives("PrivateNetwork") == ["yes"]
    assert _directives("MemoryDenyWriteExecute") == ["yes"]


def _expand(group: str) -> set[str]:
    """A ``@group`` of ``systemd-analyze syscall-filter`` as system call names."""
    out = subprocess.run(
        [systemd_analyze(), "syscall-filter", group], capture_output=True, text=True, check=True
    ).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        entry = line.strip()
        if entry.startswith("@"):
            names |= _expand(entry)
        elif entry and not entry.startswith("#"):
            names.add(entry)
    return names


def unit_allowed_syscalls() -> set[str]:
    """The unit's SystemCallFilter= lines, applied in order as systemd does."""
    allowed: set[str] = set()
    for value in _directives("SystemCallFilter"):
        deny = value.startswith("~")
        names: set[str] = set()
        for entry in value.lstrip("~").split():
            names |= _expand(entry) if entry.startswith("@") else {entry}
        allowed = allowed - names if deny else allowed | names
    return allowed


_CONFINED = """
import ctypes, errno, mmap, os
# MemoryDenyWriteExecute=yes: no W+X mapping, no making memory executable.
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    raise SystemExit("a W+X mapping was allowed")
libc = ctypes.CDLL(None, use_errno=True)
page = mmap.mmap(-1, 4096)
address = ctypes.addressof(ctypes.c_char.from_buffer(page))
if libc.mprotect(ctypes.c_void_p(address), 4096, mmap.PROT_READ | mmap.PROT_EXEC) == 0:
    raise SystemExit("mprotect to PROT_EXEC was allowed")
# SystemCallFilter=~@privileged: chroot(2) fails with EPERM even for root.
try:
    os.chroot("/")
except PermissionError:
    pass
else:
    raise SystemExit("chroot was allowed")
# ctypes callbacks (libffi closures) need no W+X page with Debian 12's libffi.
assert ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)() == 7
print("confined")
"""


def _run_confined(*argv: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    allowed = tmp_path / "allowed-syscalls"
    allowed.write_text("\n".join(sorted(unit_allowed_syscalls())) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "tests.unit_sandbox", str(allowed), "--", sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    # 77: libseccomp is missing; systemd (make apt-deps) depends on it: a failure, not a skip.
    assert done.returncode != 77, "libseccomp missing (make apt-deps installs systemd)"
    return done


def test_the_daemon_serves_guests_under_the_units_syscall_filter_and_mdwe(
    tmp_path: Path,
) -> None:
    check = _run_confined("-c", _CONFINED, tmp_path=tmp_path)
    assert check.returncode == 0 and "confined" in check.stdout, check.stdout + check.stderr
    # The whole daemon against the simulated Xen: numpy, pillow, ctypes (libatomic fences),
    # trio, threads. The demo fails if a flip was late or anything leaked.
    done = _run_confined(
        "-m", "displback", "demo", "--seconds", "1", "--snapshots", str(tmp_path / "png"),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing leaked" in done.stdout
