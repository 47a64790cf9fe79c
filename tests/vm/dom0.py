"""What a VM test does in the nested Dom0: start the daemon, create guests, inspect leftovers.

Dom0 runs the host's own root (read-only over 9p) chrooted, so the checkout and its .venv
are at the same path as on the host (an arm64 Dom0 runs the root of tests/vm/arm64_root.py
instead, with the checkout at ``/displback`` and the daemon's dependencies on its
``PYTHONPATH``); the per-test shared directory is ``/mnt`` in Dom0, and
everything Dom0 writes for the test to read (daemon log, snapshots, guest consoles, command
output) lands there. Step times are recorded in :attr:`Dom0.timings` and printed at the end.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.vm.machine import DOM0_SHARE, NO_VKMS, XenVM

XEN_BIN = "/usr/lib/xen-4.17/bin"
#: Guest kernel log level (4: errors only); DISPLBACK_VM_GUEST_LOGLEVEL=8 to debug a guest.
GUEST_LOGLEVEL = int(os.environ.get("DISPLBACK_VM_GUEST_LOGLEVEL", "4"))
SHARE = DOM0_SHARE
#: What libxl prints when a device removal went wrong (issue 10); ``xl`` still exits 0 then.
LIBXL_ERRORS = ("unable to remove device", "libxl__devices_destroy failed", "libxl: error")
#: /proc/<pid>/stat counts CPU time in USER_HZ ticks, 100 a second on x86.
USER_HZ = 100


@dataclass
class Guest:
    """A guest created with ``xl create``."""

    name: str
    domid: int
    console: Path
    #: Where this domain's output starts in ``console``: xenconsoled appends a rebooted
    #: guest's console to the log of the domain it replaces.
    console_from: int = 0


@dataclass(frozen=True)
class XlRun:
    """One ``xl`` command timed in Dom0, with the daemon's CPU time across it."""

    command: str
    rc: int
    wall_s: float
    daemon_cpu_s: float
    output: str

    @property
    def libxl_errors(self) -> list[str]:
        return libxl_errors(self.output)


def libxl_errors(text: str) -> list[str]:
    """The lines of ``xl`` output (or of its monitor's log) that report a failed removal."""
    return [line for line in text.splitlines() if any(e in line for e in LIBXL_ERRORS)]


def _cpu_ticks(stat: str) -> int:
    """utime + stime of a ``/proc/<pid>/stat`` line (fields 14 and 15)."""
    fields = stat.rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


@dataclass
class Dom0:
    vm: XenVM
    share: Path
    repo: Path
    timings: dict[str, float] = field(default_factory=dict)
    daemon_pid: int | None = None
    #: How Dom0 runs the checkout's Python (from the checkout's directory).
    python: str = ".venv/bin/python"

    @staticmethod
    def boot_script(repo: Path, *, respawn_shell: bool = False) -> str:
        """``/mnt/dom0.sh``: Xen's Dom0 services, then an interactive shell on hvc0.

        The checkout (with its ``.venv``) is exported on its own (9p tag ``repo``) and
        mounted at its own path: a clone under ``/tmp`` (CI's, say) would otherwise be hidden
        by Dom0's tmpfs there.

        ``respawn_shell`` (the arm64 Dom0, whose ``/bin/sh`` is busybox ash, not the host's
        dash): measured there, the interactive shell exits (status 0) when one of its
        background children exits — the daemon after SIGTERM, a helper — and as PID 1 that
        panicked Dom0. So PID 1 stays a plain loop that starts the interactive shell again.
        """
        shell = (
            'while :; do stty -echo; PS1="# " /bin/sh -i; echo "@@DOM0 SHELL RESTARTED@@"; done'
            if respawn_shell
            else "exec /bin/sh -i"
        )
        return f"""export PATH={XEN_BIN}:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp
mkdir -p /run/xen /run/xenstored /var/lib/xen /var/log/xen {SHARE}/xenlog
mkdir -p {repo} 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 repo {repo} \\
    || echo "@@FAIL mount repo@@"
echo "@@DOM0 USERSPACE@@"
{XEN_BIN}/xenstored --pid-file /run/xenstored.pid || echo "@@FAIL xenstored@@"
{XEN_BIN}/xen-init-dom0 || echo "@@FAIL xen-init-dom0@@"
{XEN_BIN}/xenconsoled --log=guest --log-dir={SHARE}/xenlog || echo "@@FAIL xenconsoled@@"
ls /dev/xen /dev/dri > {SHARE}/devices.txt 2>&1
echo "@@DOM0 READY@@"
{shell}
"""

    # --- steps ------------------------------------------------------------------------------

    def _step(self, name: str, started: float) -> None:
        self.timings[name] = round(time.monotonic() - started, 1)

    def wait_ready(self, timeout: float) -> None:
        started = self.vm.started
        self.vm.expect(r"@@INITRAMFS DOM0@@", timeout, what="Dom0 initramfs /init")
        self._step("boot: Dom0 /init", started)
        self.vm.expect(r"@@DOM0 USERSPACE@@|@@FAIL [^@]*@@", timeout, what="chroot into host root")
        self._step("boot: chroot", started)
        match = self.vm.expect(r"@@DOM0 READY@@|@@FAIL [^@]*@@", timeout, what="xenstored etc.")
        if match.group(0) != b"@@DOM0 READY@@":
            raise self.vm.fail(f"Dom0 start-up failed: {match.group(0).decode()}")
        self._step("boot: Dom0 services ready", started)
        self.sh("stty -echo; PS1='# '", timeout=30)

    def sh(self, command: str, timeout: float = 60.0, *, check: bool = True) -> int:
        return self.vm.sh(command, timeout, check=check)

    def output(self, command: str, timeout: float = 60.0, *, check: bool = True) -> str:
        """Run ``command`` in Dom0 and return what it printed (via the shared directory)."""
        self.sh(f"({command}) > {SHARE}/.out 2>&1", timeout, check=check)
        return (self.share / ".out").read_text(errors="replace")

    def start_daemon(
        self,
        *args: str,
        wait: bool = True,
        timeout: float = 120.0,
        snapshot_interval: float = 0.5,
    ) -> None:
        """Start ``displback run`` in the background, logging JSON to ``/mnt/daemon.log``.

        A long ``snapshot_interval`` keeps PNG encoding out of measurements of the daemon's
        CPU time (the snapshots and ``status.json`` are then written once, at start).
        """
        started = time.monotonic()
        log = f"{SHARE}/daemon.log"
        argv = " ".join(
            [
                "--log-format",
                "json",
                "--log-level",
                "debug",
                "--snapshot-dir",
                f"{SHARE}/snap",
                "--snapshot-interval",
                str(snapshot_interval),
                *args,
            ]
        )
        self.sh(
            f"cd {self.repo} && PYTHONDONTWRITEBYTECODE=1 setsid {self.python} -m "
            f"displback.app.run {argv} >>{log} 2>&1 </dev/null & echo $! > {SHARE}/daemon.pid; cd /"
        )
        self.daemon_pid = int((self.share / "daemon.pid").read_text().strip())
        if wait:
            self.vm.wait_file(
                self.share / "daemon.log",
                lambda text: '"event": "watching"' in text or '"cannot start"' in text,
                timeout,
                what="the daemon watching XenStore",
            )
            if '"cannot start"' in self.daemon_log_text():
                raise self.vm.fail("daemon cannot start:\n" + self.daemon_log_text()[-3000:])
            self._step("daemon: start to watching", started)

    def daemon_log_text(self) -> str:
        path = self.share / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def daemon_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.daemon_log_text().splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return events

    def wait_status(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float, *, what: str
    ) -> list[dict[str, Any]]:
        """Poll the daemon's ``status.json`` until ``predicate`` holds; return it."""
        deadline = time.monotonic() + timeout
        status = self.status()
        while not predicate(status):
            if time.monotonic() > deadline:
                raise self.vm.fail(f"daemon status never showed {what}: {status}")
            time.sleep(0.5)
            status = self.status()
        return status

    def status(self) -> list[dict[str, Any]]:
        """The devices in the daemon's ``status.json`` (displback.app.status), each with its
        guest's ``domid``."""
        doc = self.status_document()
        return [
            {**device, "domid": guest["domid"]}
            for guest in doc.get("guests", ())
            for device in guest["devices"]
        ]

    def status_document(self) -> dict[str, Any]:
        """The daemon's whole ``status.json`` ({} before it is written)."""
        path = self.share / "snap" / "status.json"
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return doc

    def write_guest_config(
        self,
        name: str,
        *,
        connectors: str = "id0:1024x768;id1:800x600",
        be_alloc: bool = False,
        flips: int = 10,
        hold: int = 600,
        draw: str = "0,1",
        then: str = "stay",
        maxmem: int = 256,
        guest_type: str | None = None,
        vdispl: bool = True,
        warmup: int | None = None,
        vkb: bool = False,
        inputtest: int | None = None,
    ) -> Path:
        """``/mnt/<name>.cfg``; ``vdispl=False``: the same guest without a display (baselines);
        ``warmup``: drmtest's benchmark mode (flips only, timed after ``warmup`` flips);
        ``vkb``: a vkbd device served by displback; ``inputtest``: run inputtest that long."""
        extra = (
            f"console=hvc0 rdinit=/init loglevel={GUEST_LOGLEVEL} {NO_VKMS} "
            f"drmtest.flips={flips} drmtest.hold={hold} "
            f"drmtest.connectors={draw} drmtest.then={then}"
        )
        if warmup is not None:
            extra += f" drmtest.warmup={warmup}"
        if inputtest is not None:
            extra += f" inputtest.seconds={inputtest}"
        arch = self.vm.arch
        text = f"""name = "{name}"
type = "{guest_type or arch.guest_type}"
kernel = "{SHARE}/{arch.kernel_name}"
ramdisk = "{SHARE}/domU.cpio"
extra = "{extra}"
memory = 256
maxmem = {maxmem}
vcpus = 1
on_reboot = "restart"
"""
        if vdispl:
            spec = f"backend=Domain-0,be-alloc={int(be_alloc)},connectors={connectors}"
            text += f"vdispl = [ '{spec}' ]\n"
        if vkb:
            text += "vkb = [ 'backend-type=linux' ]\n"
        path = self.share / f"{name}.cfg"
        path.write_text(text)
        return path

    def xl_create(
        self, name: str, timeout: float = 120.0, *, paused: bool = False, **config: Any
    ) -> Guest:
        self.write_guest_config(name, **config)
        started = time.monotonic()
        flags = "-p " if paused else ""
        rc = self.sh(
            f"xl create {flags}{SHARE}/{name}.cfg > {SHARE}/xl-{name}.txt 2>&1",
            timeout,
            check=False,
        )
        self._step(f"xl create {name}", started)
        if rc != 0:
            raise self.vm.fail(
                f"xl create {name} failed ({rc}):\n"
                + (self.share / f"xl-{name}.txt").read_text(errors="replace")
                + "\n--- daemon log tail ---\n"
                + self.daemon_log_text()[-3000:]
            )
        domid = int(self.output(f"xl domid {name}").strip())
        return Guest(name, domid, self.share / "xenlog" / f"guest-{name}.log")

    def wait_guest(self, guest: Guest, pattern: str, timeout: float, *, what: str) -> str:
        """The guest's console text (from ``guest.console_from``) once it matches ``pattern``."""
        regex = re.compile(pattern)
        start = guest.console_from
        text = self.vm.wait_file(
            guest.console, lambda t: regex.search(t[start:]) is not None, timeout, what=what
        )
        return text[start:]

    def xl_timed(self, args: str, timeout: float = 120.0) -> XlRun:
        """Run ``xl ARGS`` in Dom0: its wall time (taken in Dom0, so the serial line's typing
        is not in it), its stdout+stderr, and the daemon's utime+stime before and after."""
        if self.daemon_pid is None:
            raise self.vm.fail("xl_timed needs the daemon running (its CPU time is measured)")
        stat = f"/proc/{self.daemon_pid}/stat"
        self.sh(
            f"cat {stat} > {SHARE}/.cpu0; s=$(date +%s%N); xl {args} > {SHARE}/.xl 2>&1; "
            f"rc=$?; e=$(date +%s%N); cat {stat} > {SHARE}/.cpu1; "
            f"echo $rc $s $e > {SHARE}/.xlrun",
            timeout,
        )
        rc, start_ns, end_ns = (int(f) for f in (self.share / ".xlrun").read_text().split())
        stats = [(self.share / f".cpu{i}").read_text() for i in (0, 1)]
        if not all(stats):
            raise self.vm.fail(f"the daemon (pid {self.daemon_pid}) died around `xl {args}`")
        ticks = [_cpu_ticks(stat) for stat in stats]
        run = XlRun(
            command=f"xl {args}",
            rc=rc,
            wall_s=(end_ns - start_ns) / 1e9,
            daemon_cpu_s=(ticks[1] - ticks[0]) / USER_HZ,
            output=(self.share / ".xl").read_text(errors="replace"),
        )
        with (self.share / "xl-timed.log").open("a") as log:  # every run, for the post-mortem
            log.write(f"$ {run.command}  # rc {rc}, {run.wall_s:.2f} s\n{run.output}\n")
        return run

    def xl_monitor_log(self, name: str) -> str:
        """The log of the ``xl create`` process that stays to watch guest ``name``: it, not
        the ``xl shutdown``/``reboot`` command, destroys the domain and its devices."""
        return self.output(f"cat /var/log/xen/xl-{name}.log", check=False)

    def vdispl_backends(self) -> set[tuple[int, int]]:
        """The (domid, devid) of every vdispl device directory in Dom0's backend tree."""
        root = "/local/domain/0/backend/vdispl"
        text = self.output(
            f"for d in $(xenstore-list {root}); do for v in $(xenstore-list {root}/$d); do "
            "echo $d/$v; done; done",
            check=False,
        )
        pairs = (line.strip().partition("/") for line in text.splitlines())
        return {(int(d), int(v)) for d, _, v in pairs if d.isdigit() and v.isdigit()}

    def xenstore_read(self, path: str) -> str:
        return self.output(f"xenstore-read {path}").strip()

    def daemon_resources(self) -> dict[str, Any]:
        """What the daemon process holds: Xen/DRM/dma-buf fds and grant mappings."""
        pid = self.daemon_pid
        text = self.output(f"ls -l /proc/{pid}/fd; echo @@MAPS; cat /proc/{pid}/maps", check=False)
        fds, _, maps = text.partition("@@MAPS")
        if not maps.strip():  # a dead daemon would hold nothing, and prove nothing
            raise self.vm.fail(f"the daemon (pid {pid}) is not running:\n{text[-1000:]}")
        return {
            "gntdev_maps": sum(1 for line in maps.splitlines() if "/dev/xen/gntdev" in line),
            "dmabuf_maps": sum(1 for line in maps.splitlines() if "dmabuf" in line),
            "dmabuf_fds": sum(1 for line in fds.splitlines() if "dmabuf" in line),
            "evtchn_fds": sum(1 for line in fds.splitlines() if "/dev/xen/evtchn" in line),
            "gntdev_fds": sum(1 for line in fds.splitlines() if "/dev/xen/gntdev" in line),
        }

    def wait_no_guest_resources(self, timeout: float = 30.0) -> None:
        """Wait until the daemon holds no guest's grant maps, dma-bufs or event channels."""
        deadline = time.monotonic() + timeout
        held = self.daemon_resources()
        while time.monotonic() < deadline:
            held = self.daemon_resources()
            if held["gntdev_maps"] == held["dmabuf_fds"] == held["evtchn_fds"] == 0:
                return
            time.sleep(1)
        raise AssertionError(f"the daemon still holds guest resources: {held}")

    def report(self) -> None:
        print("timings (s):", json.dumps(self.timings))
