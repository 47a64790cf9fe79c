"""A Dom0 that boots systemd as PID 1, with Xen started as Debian ships it, and displback
installed by ``make install`` (issue 11, item 7).

* The install: ``make install DESTDIR=<stage>`` on the host, from this checkout, with the
  wheelhouse ``make test`` keeps (no network) — the documented install path, staged. The staged
  tree names its final paths (``/opt/displback``, ``/usr/bin/displback``,
  ``/etc/systemd/system/displback.service``, ``/etc/displback/displback.toml``), so it is
  exported read-only over 9p and laid **over** the host's root in Dom0: the overlay root is
  stage above host, with a tmpfs on top. Running ``make install`` inside Dom0 instead would
  build the venv under TCG (minutes of pip and compileall on 9p) and need the checkout inside;
  staging is the same script with the same result in ~20 s, and Dom0 sees exactly what a Dom0
  with the package installed sees.
* Xen: the host's ``/etc/rc?.d/S01xen`` makes systemd's sysv generator start Debian's
  ``/etc/init.d/xen`` as ``xen.service`` (xenstored, xen-init-dom0, xenconsoled, Dom0's qemu).
  Only ``/etc/default/xen`` is changed, as an admin would: xenconsoled logs guest consoles to
  the shared directory (the tests read them).
* The harness's shell on hvc0 is a unit of its own (``vmshell.service``, after
  ``xen.service``); the getty that would take hvc0 and services of the host that have no
  business in the VM (postgresql, timesyncd) are masked, and ``/etc/fstab`` is empty (the
  host's names its disks).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.vm.conftest import REPO, VMAssets, _place
from tests.vm.dom0 import SHARE, XEN_BIN, Dom0
from tests.vm.machine import XenVM

#: The wheels ``make test`` keeps beside its venv (``make wheelhouse``): install without PyPI.
WHEELHOUSE = Path(sys.prefix) / "wheelhouse"
#: systemd's messages on hvc0 (the harness's shell shares it): failures only.
SYSTEMD_ARGS = "systemd.show_status=error"
#: systemd's boot (xen.service alone ~40 s under TCG) took 80-225 s, the longest beside a
#: kernel build: more room than the plain Dom0's 240 s.
BOOT_TIMEOUT = 420.0
#: Units of the host that are not wanted in the VM's Dom0.
MASKED = (
    "serial-getty@hvc0.service",  # the harness's shell owns hvc0
    "console-getty.service",  # and the console is hvc0
    "getty@tty1.service",
    "postgresql.service",
    "systemd-timesyncd.service",
    "e2scrub_reap.service",
)

#: Under TCG the daemon's Python start-up takes 15-92 s (92 s beside a kernel build: systemd's
#: default 90 s start timeout failed the start), and the unit sets no TimeoutStartSec= (the
#: default is ample on a real Dom0): the VM's default is raised, not the unit's.
SYSTEM_CONF = """[Manager]
DefaultTimeoutStartSec=300
"""

VMSHELL_UNIT = f"""[Unit]
Description=displback VM tests: the harness's shell on hvc0
After=xen.service

[Service]
ExecStart=/bin/sh {SHARE}/dom0.sh
StandardInput=tty-force
StandardOutput=inherit
StandardError=inherit
TTYPath=/dev/hvc0
TTYReset=no
TTYVHangup=no
Environment=HOME=/tmp TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0

[Install]
WantedBy=multi-user.target
"""


def stage_install(destdir: Path) -> str:
    """``make install DESTDIR=destdir`` from this checkout; returns its output."""
    if not (WHEELHOUSE / ".complete").exists():
        raise FileNotFoundError(f"no wheelhouse in {WHEELHOUSE}: run `make wheelhouse`")
    done = subprocess.run(
        [
            "make", "-s", "-C", str(REPO), "install", f"DESTDIR={destdir}",
            f"WHEELHOUSE={WHEELHOUSE}",
            f"INSTALL_PYTHON={os.path.realpath('/usr/bin/python3')}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        output = done.stdout + done.stderr
        raise AssertionError(f"make install failed ({done.returncode}):\n{output}")
    return done.stdout + done.stderr


def write_rootfs(rootfs: Path) -> None:
    """The files the initramfs copies into the top layer of Dom0's root."""
    system = rootfs / "etc" / "systemd" / "system"
    (system / "multi-user.target.wants").mkdir(parents=True)
    (rootfs / "etc" / "fstab").write_text("# VM Dom0: the root is the initramfs's overlay\n")
    defaults = Path("/etc/default/xen")
    text = defaults.read_text() if defaults.exists() else ""
    text += (
        "\n# displback VM tests: guest consoles for the harness\n"
        f'XENCONSOLED_ARGS="--log=guest --log-dir={SHARE}/xenlog"\n'
    )
    (rootfs / "etc" / "default" / "xen").parent.mkdir(parents=True, exist_ok=True)
    (rootfs / "etc" / "default" / "xen").write_text(text)
    (rootfs / "etc" / "systemd" / "system.conf.d").mkdir()
    (rootfs / "etc" / "systemd" / "system.conf.d" / "displback-vm.conf").write_text(SYSTEM_CONF)
    (system / "vmshell.service").write_text(VMSHELL_UNIT)
    (system / "multi-user.target.wants" / "vmshell.service").symlink_to("../vmshell.service")
    for unit in MASKED:
        (system / unit).symlink_to("/dev/null")


def boot_script() -> str:
    """``/mnt/dom0.sh``, run by ``vmshell.service``: wait for the boot to finish, say how it
    went, then an interactive shell on hvc0."""
    return f"""export PATH={XEN_BIN}:/usr/sbin:/usr/bin:/sbin:/bin
echo "@@DOM0 USERSPACE@@"
state=$(timeout 200 systemctl is-system-running --wait)
{{ echo "system: $state"; systemctl --failed --no-legend; }} > {SHARE}/boot-state.txt 2>&1
systemctl show -p ActiveState,SubState,Result,After,Before,WantedBy,FragmentPath,SourcePath \\
    xen.service > {SHARE}/xen-service.txt 2>&1
ls /dev/xen /dev/dri > {SHARE}/devices.txt 2>&1
if systemctl -q is-active xen.service && xenstore-read /local/domain/0/name >/dev/null; then
    echo "@@DOM0 READY@@"
else
    echo "@@FAIL xen.service: $(systemctl is-active xen.service)@@"
fi
exec /bin/sh -i
"""


class SystemdDom0(Dom0):
    """:class:`Dom0` plus what systemd offers: units' properties and the journal."""

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show -p …`` as a dict (timestamps in µs since the epoch, UTC)."""
        text = self.output(
            f"systemctl show --timestamp=us+utc -p {','.join(properties)} {unit}", check=False
        )
        pairs = (line.partition("=") for line in text.splitlines() if "=" in line)
        return {key: value for key, _, value in pairs}

    def journal(self, *args: str) -> list[dict[str, Any]]:
        """``journalctl -o json ARGS``: one dict per record."""
        text = self.output(f"journalctl --no-pager -o json {' '.join(args)}", check=False)
        records = []
        for line in text.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
        return records

    def daemon_records(self) -> list[dict[str, Any]]:
        """The daemon's log records in the journal, as dicts: a JSON line's fields, or (with
        ``log_format = "journal"``) the record's journal fields in lower case plus ``event``
        (its MESSAGE without the ``key=value`` context); each with ``_pid`` and the journal's
        ``_ts`` (µs; journald stamps a datagram when the kernel queued it, SO_TIMESTAMP)."""
        out = []
        for entry in self.journal("-u", "displback.service"):
            message = entry.get("MESSAGE")
            if not isinstance(message, str) or entry.get("_PID") == "1":  # systemd's own
                continue
            record: dict[str, Any] = {}
            if message.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(message)
            if not record:  # log_format = "journal": MESSAGE is "event key=value ..."
                record = {k.lower(): v for k, v in entry.items() if not k.startswith("_")}
                keys = (message.find(f" {key}=") for key in record)
                record["event"] = message[: min((i for i in keys if i >= 0), default=None)]
            record["_ts"] = int(entry["__REALTIME_TIMESTAMP"])
            record["_pid"] = int(entry.get("_PID", 0))
            out.append(record)
        return out


@contextlib.contextmanager
def booted_systemd_dom0(assets: VMAssets, workdir: Path, initramfs: Path) -> Iterator[SystemdDom0]:
    """Stage ``make install``, boot Xen + the systemd Dom0; yields once the boot finished."""
    stage = workdir / "stage"
    print(stage_install(stage))
    share = workdir / "share"
    share.mkdir()
    (share / "xenlog").mkdir()
    _place(assets.bzimage, share / "bzImage")
    _place(assets.domu_initramfs, share / "domU.cpio")
    write_rootfs(share / "rootfs")
    (share / "dom0.sh").write_text(boot_script())
    vm = XenVM(
        workdir,
        xen=assets.xen,
        kernel=assets.bzimage,
        initramfs=initramfs,
        share=share,
        stage=stage,
        dom0_args=SYSTEMD_ARGS,
    )
    try:
        dom0 = SystemdDom0(vm, share, REPO)
        dom0.wait_ready(BOOT_TIMEOUT)
        yield dom0
        dom0.report()
    finally:
        vm.close()
