"""The VM harness's own pieces that need no VM: cpio archives and the kernel cache key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.vm import arm64_root, dom0, initramfs, kernel


def test_newc_archive_lists_and_extracts_with_cpio(tmp_path: Path) -> None:
    archive = initramfs._newc(
        [initramfs._dir("bin"), initramfs._file("bin/tool", b"#!/bin/sh\necho hi\n")]
    )
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == ["bin", "bin/tool"]
    subprocess.run(
        ["cpio", "-id", "--quiet"], input=archive, cwd=tmp_path, check=True, capture_output=True
    )
    tool = tmp_path / "bin" / "tool"
    assert tool.read_bytes() == b"#!/bin/sh\necho hi\n"
    assert tool.stat().st_mode & 0o777 == 0o755


def test_kernel_cache_key_changes_with_fragment_and_source_version() -> None:
    base = kernel.cache_key(b"CONFIG_XEN=y\n", "6.1.1-1")
    assert kernel.cache_key(b"CONFIG_XEN=y\n", "6.1.1-1") == base
    assert kernel.cache_key(b"CONFIG_XEN=y\nCONFIG_DRM=y\n", "6.1.1-1") != base
    assert kernel.cache_key(b"CONFIG_XEN=y\n", "6.1.1-2") != base


def test_arm64_kernel_has_its_own_cache_key_and_x86s_is_unchanged() -> None:
    fragment = b"CONFIG_XEN=y\n"
    x86 = kernel.cache_key(fragment, "6.1.1-1")
    assert kernel.cache_key(fragment, "6.1.1-1", kernel.X86) == x86
    assert kernel.cache_key(fragment, "6.1.1-1", kernel.ARM64) != x86
    # x86's caches predate arm64: its key is still the recipe, version and fragment alone.
    assert x86 == "8f093288e087a738"


def test_fragment_options_are_parsed_without_comments() -> None:
    options = kernel.wanted_options('# comment\n\nCONFIG_XEN=y\nCONFIG_X="a=b"\n')
    assert options == {"CONFIG_XEN": "y", "CONFIG_X": '"a=b"'}


def test_committed_fragment_has_what_the_backend_needs() -> None:
    options = kernel.wanted_options(kernel.FRAGMENT.read_text())
    for name in (
        "XEN_GNTDEV_DMABUF",
        "XEN_GRANT_DMA_ALLOC",
        "DRM_XEN_FRONTEND",
        "UDMABUF",
        "XEN_DEV_EVTCHN",
        "XEN_DOM0",
        "9P_FS",
        "INPUT_XEN_KBDDEV_FRONTEND",
        "INPUT_UINPUT",
        "INPUT_EVDEV",
    ):
        assert options[f"CONFIG_{name}"] == "y", name


def test_committed_arm64_fragment_has_what_dom0_guest_and_zero_copy_need() -> None:
    options = kernel.wanted_options(kernel.ARM64.fragment.read_text())
    for name in (
        "XEN",
        "XEN_GNTDEV_DMABUF",
        "XEN_GRANT_DMA_ALLOC",
        "DRM_XEN_FRONTEND",
        "XEN_DEV_EVTCHN",
        "XENFS",
        "HVC_XEN",
        "VIRTIO_MMIO",
        "9P_FS",
        "SERIAL_AMBA_PL011",
        "BLK_DEV_INITRD",
    ):
        assert options[f"CONFIG_{name}"] == "y", name


def test_arm64_root_cache_key_covers_packages_and_requirements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = arm64_root.cache_key()
    monkeypatch.setattr(arm64_root, "PACKAGES", (*arm64_root.PACKAGES, "strace"))
    assert arm64_root.cache_key() != base
    monkeypatch.undo()
    monkeypatch.setattr(arm64_root, "REQUIREMENTS", ("trio>=0.30",))
    assert arm64_root.cache_key() != base


def test_domu_image_runs_the_input_test_when_the_command_line_asks(tmp_path: Path) -> None:
    drmtest, inputtest = tmp_path / "drmtest", tmp_path / "inputtest"
    drmtest.write_bytes(b"\x7fELF")
    inputtest.write_bytes(b"\x7fELF input")
    archive = initramfs.build_domu(tmp_path / "domU.cpio", drmtest, inputtest).read_bytes()
    subprocess.run(
        ["cpio", "-id", "--quiet"], input=archive, cwd=tmp_path, check=True, capture_output=True
    )
    assert (tmp_path / "bin" / "inputtest").read_bytes() == b"\x7fELF input"
    assert '/bin/inputtest "$input" &' in (tmp_path / "init").read_text()
    assert initramfs.compile_inputtest(tmp_path / "built").stat().st_size > 0


def test_domu_image_has_the_programs_the_kernel_runs_on_xl_shutdown_and_reboot(
    tmp_path: Path,
) -> None:
    drmtest = tmp_path / "drmtest"
    drmtest.write_bytes(b"\x7fELF")
    archive = initramfs.build_domu(tmp_path / "domU.cpio", drmtest).read_bytes()
    subprocess.run(
        ["cpio", "-id", "--quiet"], input=archive, cwd=tmp_path, check=True, capture_output=True
    )
    for applet in ("poweroff", "reboot"):
        script = tmp_path / "sbin" / applet
        assert script.stat().st_mode & 0o111, applet
        assert script.read_text().splitlines()[-1] == f"exec /bin/busybox {applet} -f"


def test_cpu_ticks_are_read_past_a_process_name_with_spaces_and_parens() -> None:
    stat = "812 (py (x) y) S 1 812 812 0 -1 4194560 900 0 0 0 250 37 0 0 20 0 3 0 1234"
    assert dom0._cpu_ticks(stat) == 287


def test_libxl_removal_errors_are_found_in_xl_output() -> None:
    output = (
        "Parsing config from /mnt/g.cfg\n"
        "libxl: error: libxl_device.c:1111:device_backend_callback: Domain 3:unable to remove "
        "device with path /local/domain/0/backend/vdispl/3/0\n"
        "libxl: error: libxl_domain.c:1530:devices_destroy_cb: Domain 3:libxl__devices_destroy"
        " failed\n"
    )
    assert len(dom0.libxl_errors(output)) == 2
    assert dom0.libxl_errors("Parsing config from /mnt/g.cfg\n") == []
