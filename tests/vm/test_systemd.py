"""The installed service under real systemd in the nested Xen (issue 11, item 7).

One Dom0 boot for the module (tests/vm/systemd_dom0.py): systemd is PID 1, Xen comes up as
Debian's ``xen.service`` (its init script through the sysv generator), displback is what
``make install`` put in ``/opt/displback``, ``/usr/bin`` and ``/etc/systemd/system``, its
config ``/etc/displback/displback.toml`` edited as an admin would (a virtual display, its
snapshots in the unit's runtime directory). The scenarios run in order on the same daemon
and guest: start (Type=notify), a guest's pattern, ``displback status``, the journal, the
watchdog, stop. Each one's wall time is printed (``-s``) with the boot's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from PIL import Image

from tests.vm import initramfs
from tests.vm.conftest import VMAssets
from tests.vm.dom0 import SHARE, Guest
from tests.vm.systemd_dom0 import SystemdDom0, booted_systemd_dom0
from tests.vm.test_scenarios import GUEST_TIMEOUT, SIZES, expected_rgb, wait_flips_done

pytestmark = pytest.mark.vm

UNIT = "displback.service"
RUNTIME = "/run/displback"
SNAPSHOTS = f"{RUNTIME}/snap"
#: systemctl start waits for READY=1: the daemon's start-up under TCG (15-30 s, more while
#: the boot settles) plus its XenStore walk; far below the unit's TimeoutStartSec (90 s).
START_TIMEOUT = 200.0
CONFIG = f"""# /etc/displback/displback.toml of the VM tests: a virtual display whose snapshots
# land in the unit's runtime directory (the only place the hardened unit lets it write);
# log_format is left to its default under systemd, the journal.
display = "virtual"
virtual_outputs = ["id0=1024x768", "id1=800x600"]
snapshot_dir = "{SNAPSHOTS}"
snapshot_interval_s = 0.5
log_level = "debug"
"""


@dataclass
class Run:
    """What the scenarios share: the Dom0, the guest, the daemon's pids, the wall times."""

    dom0: SystemdDom0
    guest: Guest | None = None
    pids: list[int] = field(default_factory=list)
    walls: dict[str, float] = field(default_factory=dict)

    def timed(self, name: str, started: float) -> None:
        self.walls[name] = round(time.monotonic() - started, 1)
        print(f"SYSTEMD {name}: {self.walls[name]} s")


@pytest.fixture(scope="module")
def run(vm_assets: VMAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    work = tmp_path_factory.mktemp("systemd")
    dom0_cpio = initramfs.build_dom0_systemd(work / "dom0-systemd.cpio")
    started = time.monotonic()
    with booted_systemd_dom0(vm_assets, work, dom0_cpio) as dom0:
        state = Run(dom0)
        state.timed("install + boot to a shell", started)
        print((dom0.share / "boot-state.txt").read_text(errors="replace"))
        print((dom0.share / "xen-service.txt").read_text(errors="replace"))
        yield state
        print("systemd scenario wall times (s):", state.walls)


def _usec(timestamp: str) -> int:
    """``systemctl show --timestamp=us+utc``'s "Mon 2026-11-30 21:20:01.123456 UTC" in µs."""
    parsed = datetime.strptime(timestamp, "%a %Y-%m-%d %H:%M:%S.%f UTC")
    return int(parsed.replace(tzinfo=UTC).timestamp() * 1_000_000)


def _events(records: list[dict[str, Any]], name: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if r.get("event") == name and all(str(r.get(k)) == str(v) for k, v in fields.items())
    ]


def _unit_failure(dom0: SystemdDom0) -> str:
    return dom0.output(
        f"systemctl status --no-pager -l {UNIT}; journalctl --no-pager -u {UNIT} | tail -n 60",
        check=False,
    )


def _backend_state(dom0: SystemdDom0, guest: Guest) -> str:
    return dom0.output(
        f"xenstore-read /local/domain/0/backend/vdispl/{guest.domid}/0/state", check=False
    ).strip()


def _wait_backend_state(dom0: SystemdDom0, guest: Guest, want: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = _backend_state(dom0, guest)
    while state != want:
        if time.monotonic() > deadline:
            raise dom0.vm.fail(f"backend state {state!r}, wanted {want}:\n{_unit_failure(dom0)}")
        time.sleep(1)
        state = _backend_state(dom0, guest)


def _wait_pixels(dom0: SystemdDom0, output: str, connector: int, frame: int) -> None:
    """The daemon's snapshot of ``output`` (copied out of its runtime directory) equals
    drmtest's pattern of ``frame``."""
    width, height = SIZES[connector]
    want = expected_rgb(width, height, frame, connector)
    local = dom0.share / "snap" / f"{output}.png"
    deadline = time.monotonic() + 60
    got = b""
    while time.monotonic() < deadline:
        dom0.sh(f"mkdir -p {SHARE}/snap; cp {SNAPSHOTS}/{output}.png {SHARE}/snap/", check=False)
        try:
            got = Image.open(local).convert("RGB").tobytes()
        except (OSError, SyntaxError):
            got = b""
        if got == want:
            return
        time.sleep(1)
    wrong = sum(
        1 for i in range(0, min(len(got), len(want)), 3) if got[i : i + 3] != want[i : i + 3]
    )
    raise AssertionError(f"{output}: {wrong} of {len(want) // 3} pixels differ from frame {frame}")


def test_systemctl_start_is_active_only_once_xenstore_is_watched(run: Run) -> None:
    dom0 = run.dom0
    (dom0.share / "displback.toml").write_text(CONFIG)
    dom0.sh(f"cp {SHARE}/displback.toml /etc/displback/displback.toml")
    before = dom0.show(UNIT, "ActiveState", "FragmentPath", "Type", "WatchdogUSec", "After")
    assert before["ActiveState"] == "inactive", before
    assert before["FragmentPath"] == "/etc/systemd/system/displback.service", before
    assert before["Type"] == "notify", before
    assert "xen.service" in before["After"].split(), before
    started = time.monotonic()
    rc = dom0.sh(f"systemctl start {UNIT}", START_TIMEOUT, check=False)
    run.timed("a) systemctl start to active", started)
    if rc != 0:
        raise dom0.vm.fail(f"systemctl start {UNIT} exited {rc}:\n{_unit_failure(dom0)}")
    props = dom0.show(
        UNIT,
        "ActiveState",
        "SubState",
        "NRestarts",
        "MainPID",
        "ExecMainStartTimestamp",
        "ActiveEnterTimestamp",
    )
    assert (props["ActiveState"], props["SubState"], props["NRestarts"]) == (
        "active",
        "running",
        "0",
    ), props
    run.pids.append(int(props["MainPID"]))
    # The unit's DeviceAllow= list is enforced here (cgroup v2: a BPF program systemd attaches;
    # a kernel without BPF gets none, silently), so the daemon serving guests below proves the
    # list covers what it opens: the same policy on a transient unit opens an allowed node and
    # is refused another.
    rc = dom0.sh(
        "systemd-run --wait --quiet -p DevicePolicy=closed -p 'DeviceAllow=/dev/xen/evtchn rw' "
        "/bin/sh -c '( : <>/dev/xen/evtchn ) || exit 10; ( : <>/dev/xen/privcmd ) && exit 11; "
        "exit 0'",
        check=False,
    )
    assert rc == 0, (
        f"device policy not enforced in this Dom0 (rc {rc}; 10: allowed node refused, "
        "11: another node opened)"
    )
    # systemd applied every other directive (it says when it cannot, or does not know a key).
    said = [str(r.get("MESSAGE", "")) for r in dom0.journal("-u", UNIT, "_PID=1")]
    unapplied = [m for m in said if re.search(r"bpf|not supported|cannot|failed to", m, re.I)]
    assert not unapplied, unapplied
    records = dom0.daemon_records()
    watching = _events(records, "watching")
    assert watching, f"no 'watching' record in the journal: {records[-20:]}"
    # Logged after exec and before systemd took READY=1: journald's stamp is when the kernel
    # queued the record's datagram, and the daemon sends READY=1 after it.
    at = int(watching[0]["_ts"])
    assert _usec(props["ExecMainStartTimestamp"]) < at <= _usec(props["ActiveEnterTimestamp"]), (
        props,
        watching[0],
    )


def test_a_guest_connects_and_its_pattern_is_shown(run: Run) -> None:
    dom0 = run.dom0
    started = time.monotonic()
    guest = dom0.xl_create("guest1", flips=10)  # fails unless InitWait came within libxl's 10 s
    run.guest = guest
    wait_flips_done(dom0, guest, (0, 1), 10)
    _wait_backend_state(dom0, guest, "4", 30)
    _wait_pixels(dom0, "id0", 0, 10)
    _wait_pixels(dom0, "id1", 1, 10)
    run.timed("b) xl create to the pattern on both outputs", started)


def test_displback_status_shows_the_guest(run: Run) -> None:
    dom0, guest = run.dom0, run.guest
    assert guest is not None
    started = time.monotonic()
    table = dom0.output("displback status", 120)
    run.timed("c) displback status", started)
    # One row per connector: "<domid> <name>  <dev> <conn> <state> <frontend> <output> ..."
    rows = [line.split() for line in table.splitlines()]
    mine = [row for row in rows if row[:2] == [str(guest.domid), guest.name]]
    assert [row[3:7] for row in mine] == [
        ["0", "connected", "CONNECTED", "id0"],
        ["1", "connected", "CONNECTED", "id1"],
    ], table


def test_the_journal_finds_the_guests_records_by_domid(run: Run) -> None:
    dom0, guest = run.dom0, run.guest
    assert guest is not None
    started = time.monotonic()
    records = dom0.journal("-u", UNIT, f"DOMID={guest.domid}")
    run.timed("d) journalctl -u displback DOMID=", started)
    assert records and all(r.get("DOMID") == str(guest.domid) for r in records), records[-5:]
    messages = [str(r.get("MESSAGE")) for r in records]
    assert any(m.startswith("connected ") for m in messages), messages


def test_a_frozen_daemon_is_killed_by_the_watchdog_and_the_guest_reconnects(run: Run) -> None:
    dom0, guest = run.dom0, run.guest
    assert guest is not None
    started = time.monotonic()
    dom0.sh(f"systemctl kill -s SIGSTOP {UNIT}")
    deadline = time.monotonic() + 120
    props = dom0.show(UNIT, "ActiveState", "SubState", "NRestarts", "MainPID")
    while not (props["NRestarts"] == "1" and props["SubState"] == "running"):
        if time.monotonic() > deadline:
            raise dom0.vm.fail(f"no restart after SIGSTOP: {props}\n{_unit_failure(dom0)}")
        time.sleep(2)
        props = dom0.show(UNIT, "ActiveState", "SubState", "NRestarts", "MainPID")
    pid = int(props["MainPID"])
    assert pid not in run.pids
    run.pids.append(pid)
    said = [r.get("MESSAGE", "") for r in dom0.journal("-u", UNIT, "_PID=1")]
    assert any("Watchdog timeout" in m for m in said), said[-20:]
    # The new daemon finds the guest's device and the guest's frontend re-handshakes.
    deadline = time.monotonic() + GUEST_TIMEOUT
    while not _events([r for r in dom0.daemon_records() if r["_pid"] == pid], "connected"):
        if time.monotonic() > deadline:
            raise dom0.vm.fail(f"the guest did not reconnect:\n{_unit_failure(dom0)}")
        time.sleep(2)
    _wait_backend_state(dom0, guest, "4", 60)
    run.timed("e) SIGSTOP to the guest connected again", started)


def test_systemctl_stop_tells_the_guest_closed_and_leaves_nothing(run: Run) -> None:
    dom0, guest = run.dom0, run.guest
    assert guest is not None
    dom0.daemon_pid = run.pids[-1]
    held = dom0.daemon_resources()
    assert held["evtchn_fds"] > 0, held  # it served the guest: there was something to release
    started = time.monotonic()
    dom0.sh(f"systemctl stop {UNIT}", 60)
    run.timed("f) systemctl stop", started)
    assert _backend_state(dom0, guest) == "6"
    props = dom0.show(UNIT, "ActiveState", "Result", "MainPID", "NFileDescriptorStore")
    assert (props["ActiveState"], props["Result"], props["MainPID"]) == (
        "inactive",
        "success",
        "0",
    ), props
    assert props.get("NFileDescriptorStore", "0") == "0", props
    gone = dom0.output(
        f"ls -d /proc/{run.pids[-1]} /sys/fs/cgroup/system.slice/{UNIT} 2>&1; ls {RUNTIME} 2>&1",
        check=False,
    )
    assert gone.count("No such file or directory") == 3, gone
    closed = _events(dom0.daemon_records(), "state", domid=guest.domid, state="CLOSED")
    assert closed, "the daemon did not log Closed for the guest"
