"""What a VM test does in the nested Dom0: start the daemon, create guests, inspect leftovers.

Dom0 runs the host's own root (read-only over 9p) chrooted, so the checkout and its .venv
are at the same path as on the host; the per-test shared directory is ``/mnt`` in Dom0, and
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

from tests.vm.machine import NO_VKMS, XenVM

XEN_BIN = "/usr/lib/xen-4.17/bin"
#: Guest kernel log level (4: errors only); DISPLBACK_VM_GUEST_LOGLEVEL=8 to debug a guest.
GUEST_LOGLEVEL = int(os.environ.get("DISPLBACK_VM_GUEST_LOGLEVEL", "4"))
SHARE = "/mnt"


@dataclass
class Guest:
    """A guest created with ``xl create``."""

    name: str
    domid: int
    console: Path


@dataclass
class Dom0:
    vm: XenVM
    share: Path
    repo: Path
    timings: dict[str, float] = field(default_factory=dict)
    daemon_pid: int | None = None

    @staticmethod
    def boot_script(repo: Path) -> str:
        """``/mnt/dom0.sh``: Xen's Dom0 services, then an interactive shell on hvc0.

        The checkout (with its ``.venv``) is exported on its own (9p tag ``repo``) and
        mounted at its own path: a clone under ``/tmp`` (CI's, say) would otherwise be hidden
        by Dom0's tmpfs there.
        """
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
exec /bin/sh -i
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

    def start_daemon(self, *args: str, wait: bool = True, timeout: float = 120.0) -> None:
        """Start ``displback run`` in the background, logging JSON to ``/mnt/daemon.log``."""
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
                "0.5",
                *args,
            ]
        )
        self.sh(
            f"cd {self.repo} && PYTHONDONTWRITEBYTECODE=1 setsid .venv/bin/python -m "
            f"displback.run {argv} >>{log} 2>&1 </dev/null & echo $! > {SHARE}/daemon.pid; cd /"
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
        """The devices in the daemon's ``status.json`` (displback.status), each with its
        guest's ``domid``."""
        path = self.share / "snap" / "status.json"
        try:
            doc = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return []
        return [
            {**device, "domid": guest["domid"]}
            for guest in doc["guests"]
            for device in guest["devices"]
        ]

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
        guest_type: str = "pv",
    ) -> Path:
        extra = (
            f"console=hvc0 rdinit=/init loglevel={GUEST_LOGLEVEL} {NO_VKMS} "
            f"drmtest.flips={flips} drmtest.hold={hold} "
            f"drmtest.connectors={draw} drmtest.then={then}"
        )
        text = f"""name = "{name}"
type = "{guest_type}"
kernel = "{SHARE}/bzImage"
ramdisk = "{SHARE}/domU.cpio"
extra = "{extra}"
memory = 256
maxmem = {maxmem}
vcpus = 1
on_reboot = "restart"
vdispl = [ 'backend=Domain-0,be-alloc={int(be_alloc)},connectors={connectors}' ]
"""
        path = self.share / f"{name}.cfg"
        path.write_text(text)
        return path

    def xl_create(self, name: str, timeout: float = 120.0, **config: Any) -> Guest:
        self.write_guest_config(name, **config)
        started = time.monotonic()
        rc = self.sh(
            f"xl create {SHARE}/{name}.cfg > {SHARE}/xl-{name}.txt 2>&1", timeout, check=False
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
        regex = re.compile(pattern)
        return self.vm.wait_file(
            guest.console, lambda t: regex.search(t) is not None, timeout, what=what
        )

    def xenstore_read(self, path: str) -> str:
        return self.output(f"xenstore-read {path}").strip()

    def daemon_resources(self) -> dict[str, Any]:
        """What the daemon process holds: Xen/DRM/dma-buf fds and grant mappings."""
        pid = self.daemon_pid
        text = self.output(f"ls -l /proc/{pid}/fd; echo @@MAPS; cat /proc/{pid}/maps", check=False)
        fds, _, maps = text.partition("@@MAPS")
        return {
            "gntdev_maps": sum(1 for line in maps.splitlines() if "/dev/xen/gntdev" in line),
            "dmabuf_maps": sum(1 for line in maps.splitlines() if "dmabuf" in line),
            "dmabuf_fds": sum(1 for line in fds.splitlines() if "dmabuf" in line),
            "evtchn_fds": sum(1 for line in fds.splitlines() if "/dev/xen/evtchn" in line),
            "gntdev_fds": sum(1 for line in fds.splitlines() if "/dev/xen/gntdev" in line),
        }

    def report(self) -> None:
        print("timings (s):", json.dumps(self.timings))
