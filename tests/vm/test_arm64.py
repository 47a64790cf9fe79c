"""The backend on Xen for arm64 (QEMU virt, TCG): guest-allocated zero-copy on a real gntdev.

On arm64 Dom0 is auto-translated, so gntdev turns a guest's grants into a dma-buf
(``DMABUF_EXP_FROM_REFS``) — impossible on x86 with Linux 6.1 and Xen 4.17 (see
test_scenarios.py). Each test boots its own arm64 Dom0 (tests/vm/conftest.py ``arm64_dom0``)
with the same harness as x86; the guest is an arm64 PVH-style domain running the
cross-compiled ``drmtest`` against xen-drm-front. ``make test-vm-arm64``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.vm.dom0 import SHARE, Dom0, Guest, libxl_errors
from tests.vm.test_removal import leftovers, wait_domid
from tests.vm.test_scenarios import (
    GUEST_TIMEOUT,
    OUTPUTS,
    _buffers,
    events,
    wait_flips_done,
    wait_pixels,
    wait_screen,
)

pytestmark = [pytest.mark.vm, pytest.mark.arm64]


def log_lines(dom0: Dom0, needle: str) -> list[str]:
    """The daemon's log events whose text contains ``needle``."""
    return [str(e["event"]) for e in dom0.daemon_events() if needle in str(e.get("event", ""))]


def wait_log(dom0: Dom0, needle: str, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(found := log_lines(dom0, needle)) < count:
        if time.monotonic() > deadline:
            raise dom0.vm.fail(
                f"the daemon logged {len(found)} of {count} '{needle}':\n"
                + dom0.daemon_log_text()[-3000:]
            )
        time.sleep(0.5)
    return found


def exported(dom0: Dom0, guest: Guest, flips: int) -> dict[str, Any]:
    """Wait until ``guest`` has flipped ``flips`` frames on both connectors from its four
    buffers, all exported (zero-copy), with the right pixels; what the daemon holds then."""
    wait_flips_done(dom0, guest, (0, 1), flips)
    dom0.wait_status(
        lambda s: _buffers(zero_copy=4)(s) and s[0]["domid"] == guest.domid,
        30,
        what=f"4 exported buffers of domain {guest.domid}",
    )
    wait_pixels(dom0, "id0", 0, flips)
    wait_pixels(dom0, "id1", 1, flips)
    held = dom0.daemon_resources()
    assert held["dmabuf_fds"] == 4, held
    return held


def destroy_leaves_nothing(dom0: Dom0, name: str) -> None:
    """``xl destroy name``: no grant map, dma-buf, event channel or backend directory left."""
    dom0.sh(f"xl destroy {name}")
    dom0.wait_no_guest_resources()
    assert dom0.vdispl_backends() == set()


def test_arm64_dom0_probe_reports_that_gntdev_exports_guest_grants(arm64_dom0: Dom0) -> None:
    dom0 = arm64_dom0
    print("Dom0 devices:", (dom0.share / "devices.txt").read_text().split())
    dom0.start_daemon(*OUTPUTS, "--zero-copy", "require")  # would refuse to start otherwise
    [platform] = events(dom0, "platform")
    assert platform["dmabuf_export"] is True, platform
    assert platform["dmabuf_import"] is True, platform
    assert "zero-copy possible" in str(platform["detail"]), platform


def test_arm64_guest_connects_and_every_buffer_is_exported_zero_copy(arm64_dom0: Dom0) -> None:
    dom0 = arm64_dom0
    dom0.start_daemon(*OUTPUTS, "--zero-copy", "auto")
    started = time.monotonic()
    guest = dom0.xl_create("guest1", flips=10)
    dom0.wait_guest(
        guest, r"DRMTEST RESOURCES crtcs=2 connectors=2", GUEST_TIMEOUT, what="the guest's card"
    )
    dom0.timings["guest: card with 2 connectors"] = round(time.monotonic() - started, 1)
    assert [e["state"] for e in events(dom0, "state") if e.get("domid") == guest.domid][:2] == [
        "INIT_WAIT",
        "CONNECTED",
    ]
    wait_flips_done(dom0, guest, (0, 1), 10)
    dom0.timings["guest: 2x10 flips"] = round(time.monotonic() - started, 1)
    # gntdev's dma-bufs have no mmap: the virtual display refuses the import and the frames
    # are copied from a CPU mapping of the same grants — the pixels must still be right.
    wait_pixels(dom0, "id0", 0, 10)
    wait_pixels(dom0, "id1", 1, 10)
    [status] = dom0.wait_status(_buffers(zero_copy=4, copy=0), 30, what="4 exported buffers")
    assert status["export_supported"] is True, status
    assert log_lines(dom0, "guest buffers are exported as dma-bufs (zero-copy)"), (
        dom0.daemon_log_text()[-3000:]
    )
    refusals = log_lines(dom0, "refuses to import buffer")
    print("virtual display's import refusal:", refusals[:1])
    assert refusals, dom0.daemon_log_text()[-3000:]


def test_arm64_destroy_while_held_times_out_then_the_deferred_release_completes(
    arm64_dom0: Dom0,
) -> None:
    dom0 = arm64_dom0
    dom0.start_daemon(*OUTPUTS, "--zero-copy", "auto", "--wait-free-ms", "300")
    # drmtest keeps its last frame 25 s, then exits: the FBs are detached and DBUF_DESTROY
    # sent for its four buffers while another Dom0 process still holds their dma-bufs.
    guest = dom0.xl_create("guest1", flips=3, hold=25)
    wait_flips_done(dom0, guest, (0, 1), 3)
    dom0.wait_status(_buffers(zero_copy=4), 30, what="4 exported buffers")
    dom0.sh(
        f"cd {dom0.repo} && setsid {dom0.python} -m tests.vm.dom0_hold {dom0.daemon_pid} "
        f"/mnt/release > /mnt/hold.log 2>&1 < /dev/null & cd /"
    )
    dom0.vm.wait_file(dom0.share / "hold.log", lambda t: "HOLDING" in t, 60, what="the holder")
    assert "HOLDING 4" in (dom0.share / "hold.log").read_text()
    deferred = wait_log(dom0, "still imported after DBUF_DESTROY", 4, GUEST_TIMEOUT)
    print("deferred:", *deferred, sep="\n  ")
    # The responses went out after the 300 ms wait: the guest's destroys did not time out.
    text = dom0.wait_guest(guest, r"DOMU DRMTEST rc=\d+", GUEST_TIMEOUT, what="drmtest's exit")
    assert "DOMU DRMTEST rc=0" in text and "timeout" not in text.lower(), text[-2000:]
    [status] = dom0.wait_status(_buffers(buffers=0), 30, what="no live buffers")
    (dom0.share / "release").touch()
    released = wait_log(dom0, "released after", 4, 60)
    print("released:", *released, sep="\n  ")
    dom0.sh("xl destroy guest1")
    dom0.wait_no_guest_resources()


def test_arm64_xl_destroy_with_exported_buffers_leaves_nothing_in_dom0(arm64_dom0: Dom0) -> None:
    dom0 = arm64_dom0
    dom0.start_daemon(*OUTPUTS, "--zero-copy", "auto")
    exported(dom0, dom0.xl_create("guest1", flips=3), 3)
    destroy_leaves_nothing(dom0, "guest1")


def test_arm64_xl_reboot_with_exported_buffers_frees_the_old_domain_and_exports_the_new(
    arm64_dom0: Dom0,
) -> None:
    dom0 = arm64_dom0
    # Its first start took ~110 s under TCG on a loaded host, over start_daemon's 120 s default.
    dom0.start_daemon(*OUTPUTS, "--zero-copy", "auto", timeout=300)
    old = dom0.xl_create("guest1", flips=3)
    held = exported(dom0, old, 3)
    print(f"domain {old.domid} holds in the daemon: {held}")
    # The rebooted domain draws 5 frames: the virtual output keeps showing a released frame,
    # so the old domain's last one (3) must not pass for the new domain's pixels. xl creates
    # the new domain from the configuration stored by `xl config-update`.
    dom0.write_guest_config("guest1", flips=5)
    dom0.sh(f"xl config-update guest1 {SHARE}/guest1.cfg")
    console_from = len(old.console.read_text(errors="replace"))
    # -ww: until the old domain is destroyed (arm64's busybox `date` has no %N for xl_timed).
    rc = dom0.sh(f"xl reboot -ww guest1 > {SHARE}/xl-reboot.txt 2>&1", 300, check=False)
    output = (dom0.share / "xl-reboot.txt").read_text(errors="replace")
    print(f"`xl reboot -ww guest1`: rc {rc}\n{output}")
    problems = [*libxl_errors(output), *libxl_errors(dom0.xl_monitor_log("guest1"))]
    if rc != 0:
        problems.append(f"xl reboot exited {rc}:\n{output}")
    problems += leftovers(dom0, old.domid)  # its backend directory, its device forgotten
    assert not problems, "\n".join(problems)
    print(
        f"domain {old.domid}'s teardown:",
        *[e["event"] for e in dom0.daemon_events() if e.get("domid") == old.domid][-12:],
        sep="\n  ",
    )
    reborn = Guest("guest1", wait_domid(dom0, "guest1"), old.console, console_from)
    assert reborn.domid != old.domid
    # The new domain holds what the old one held, no more: the old domain's grant maps,
    # dma-bufs and event channels are gone, not merely outnumbered.
    assert exported(dom0, reborn, 5) == held
    assert [e["state"] for e in events(dom0, "state") if e.get("domid") == reborn.domid][:2] == [
        "INIT_WAIT",
        "CONNECTED",
    ]
    destroy_leaves_nothing(dom0, "guest1")


def test_arm64_no_dom0_drm_driver_imports_the_dmabuf_and_kms_copies_to_virtio_gpu(
    arm64_dom0_with_displays: Dom0,
) -> None:
    dom0 = arm64_dom0_with_displays
    dom0.start_daemon(*OUTPUTS)
    guest = dom0.xl_create("guest1", flips=2)
    wait_flips_done(dom0, guest, (0, 1), 2)
    ref = dom0.xenstore_read(f"/local/domain/{guest.domid}/device/vdispl/0/0/req-ring-ref")
    probe = json.loads(
        dom0.output(
            f"cd {dom0.repo} && PYTHONDONTWRITEBYTECODE=1 {dom0.python} -m "
            f"tests.vm.dom0_import {guest.domid} {ref}"
        )
    )
    print("import probe:", json.dumps(probe, indent=1))
    assert probe["export"] == "ok", probe
    assert probe["mmap"].startswith("errno 22"), probe  # gntdev's dma-bufs have no mmap
    drivers = {card["driver"]: card for card in probe["cards"].values()}
    # Measured with Linux 6.1: virtio-gpu imports no foreign dma-buf (ENODEV), bochs (VRAM
    # helpers) has no PRIME import (ENOSYS); vkms attaches it and makes a framebuffer, but
    # composes with the CPU through a vmap gntdev's dma-bufs do not offer.
    assert drivers["virtio_gpu"]["import"].startswith("errno 19"), drivers
    assert drivers["bochs-drm"]["import"].startswith("errno 38"), drivers
    assert drivers["vkms"]["import"] == "ok" and drivers["vkms"]["addfb"] == "ok", drivers
    dom0.sh("xl destroy guest1")
    dom0.wait_no_guest_resources()
    # The copy fallback on a real scanout: virtio-gpu refuses the import, the daemon copies
    # into a dumb buffer, and QEMU's screendump shows the guest's frame bit for bit.
    [card] = [path for path, c in probe["cards"].items() if c.get("driver") == "virtio_gpu"]
    pid = dom0.daemon_pid
    dom0.sh(f"kill -TERM {pid}; while kill -0 {pid} 2>/dev/null; do sleep 0.2; done", 60)
    (dom0.share / "daemon.log").rename(dom0.share / "daemon-virtual.log")
    # Connector names are numbered across cards (virtio-gpu's is Virtual-2 beside vkms).
    name = card.rsplit("/", 1)[1]
    [connector] = [
        entry.split("-", 1)[1]
        for entry in dom0.output("ls /sys/class/drm").split()
        if entry.startswith(f"{name}-")
    ]
    dom0.start_daemon("--display", "kms", "--card", card, "--connector", f"{connector}=1024x768")
    guest = dom0.xl_create("guest2", connectors="id0:1024x768", flips=6, draw="0")
    wait_flips_done(dom0, guest, (0,), 6)
    wait_screen(dom0, 6)
    refusals = log_lines(dom0, "refuses to import buffer")
    print("virtio-gpu's import refusal:", refusals[:1])
    assert refusals, dom0.daemon_log_text()[-3000:]
