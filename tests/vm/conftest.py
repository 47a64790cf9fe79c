"""Fixtures of the VM tests: the cached kernel, the images, and a booted nested-Xen Dom0.

The tests here are marked ``vm`` and run only when selected (``pytest -m vm tests/vm``, i.e.
``make test-vm``): each boots Xen under QEMU TCG, which takes tens of seconds, and the first
run builds the kernel (~13 minutes on 2 cores, then cached in ``~/.cache/displback``).
Missing tools are failures, not skips, once the tests are selected.

The arm64 tests (marked ``vm`` and ``arm64``, ``make test-vm-arm64``) share all of this with
an arm64 kernel (``kernel.ARM64``), the arm64 Dom0 root of :mod:`tests.vm.arm64_root` and a
cross-compiled guest program.
"""

from __future__ import annotations

import compileall
import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.vm import arm64_root, initramfs, kernel
from tests.vm.dom0 import Dom0
from tests.vm.machine import ARM64, X86, VMArch, XenVM, xen_elf

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 240.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots a nested Xen under QEMU (slow; make test-vm)")
    config.addinivalue_line(
        "markers", "pvh_dom0: needs the PVH Dom0, unstable under TCG (make test-vm-pvh)"
    )
    config.addinivalue_line("markers", "arm64: boots Xen on arm64 under QEMU (make test-vm-arm64)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "vm" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="VM test: run with `make test-vm` (pytest -m vm tests/vm)")
    skip_arm64 = pytest.mark.skip(reason="arm64 VM test: run with `make test-vm-arm64`")
    for item in items:
        if item.get_closest_marker("vm") is not None:
            item.add_marker(skip_arm64 if item.get_closest_marker("arm64") else skip)


@dataclass(frozen=True)
class VMAssets:
    xen: Path
    bzimage: Path
    dom0_initramfs: Path
    domu_initramfs: Path
    arch: VMArch = X86
    #: The root Dom0 chroots into (exported over 9p as ``hostroot``).
    hostroot: Path = Path("/")


@pytest.fixture(scope="session")
def vm_assets(tmp_path_factory: pytest.TempPathFactory) -> VMAssets:
    started = time.monotonic()
    bzimage = kernel.build()  # cached after the first build
    print(f"kernel: {bzimage} ({time.monotonic() - started:.1f} s)")
    # Dom0 imports the daemon over 9p under TCG and writes no bytecode
    # (PYTHONDONTWRITEBYTECODE): compiled here once, its start-up reads .pyc files instead of
    # compiling every module at every start (start to "watching" took up to 112 s on a
    # busy host, past the 120 s limit, with a fresh clone's uncompiled sources).
    compileall.compile_dir(str(REPO / "displback"), quiet=1)
    work = tmp_path_factory.mktemp("vm-assets")
    drmtest = initramfs.compile_drmtest(work / "drmtest")
    return VMAssets(
        xen=xen_elf(kernel.CACHE_ROOT),
        bzimage=bzimage,
        dom0_initramfs=initramfs.build_dom0(work / "dom0.cpio"),
        domu_initramfs=initramfs.build_domu(
            work / "domU.cpio", drmtest, initramfs.compile_inputtest(work / "inputtest")
        ),
    )


@pytest.fixture(scope="session")
def arm64_assets(tmp_path_factory: pytest.TempPathFactory) -> VMAssets:
    started = time.monotonic()
    image = kernel.build(arch=kernel.ARM64)  # cached after the first build
    root = arm64_root.build()  # cached likewise
    print(f"arm64 kernel: {image}, root: {root} ({time.monotonic() - started:.1f} s)")
    compileall.compile_dir(str(REPO / "displback"), quiet=1)
    work = tmp_path_factory.mktemp("vm-arm64-assets")
    drmtest = initramfs.compile_drmtest(work / "drmtest", cc="aarch64-linux-gnu-gcc")
    busybox = root / "bin/busybox"
    return VMAssets(
        xen=root / arm64_root.XEN_IMAGE,
        bzimage=image,
        dom0_initramfs=initramfs.build_dom0(work / "dom0.cpio", busybox),
        domu_initramfs=initramfs.build_domu(work / "domU.cpio", drmtest, busybox=busybox),
        arch=ARM64,
        hostroot=root,
    )


def _place(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextlib.contextmanager
def booted_dom0(
    assets: VMAssets,
    tmp_path: Path,
    *,
    pvh: bool = False,
    display: bool | str = True,
    extra_devices: tuple[str, ...] = (),
    vkms: bool = False,
) -> Iterator[Dom0]:
    """Boot Xen + Dom0 in QEMU; Dom0's services are up when this yields."""
    share = tmp_path / "share"
    share.mkdir()
    arm = assets.arch is ARM64
    _place(assets.bzimage, share / assets.arch.kernel_name)
    _place(assets.domu_initramfs, share / "domU.cpio")
    # arm64: Dom0's root is not the host's, so the checkout is mounted at a path of its own,
    # and Python finds the daemon's dependencies in the root's PYTHONPATH directory.
    repo_in_dom0 = Path(arm64_root.REPO_MOUNT) if arm else REPO
    (share / "dom0.sh").write_text(Dom0.boot_script(repo_in_dom0, respawn_shell=arm))
    vm = XenVM(
        tmp_path,
        xen=assets.xen,
        kernel=assets.bzimage,
        initramfs=assets.dom0_initramfs,
        share=share,
        repo=REPO,
        pvh_dom0=pvh,
        arch=assets.arch,
        hostroot=assets.hostroot,
        memory_mb=2048 if arm else 3072,
        display=display,
        extra_devices=extra_devices,
        vkms=vkms,
    )
    try:
        dom0 = Dom0(vm, share, repo_in_dom0)
        if arm:
            dom0.python = f"env PYTHONPATH=/{arm64_root.PYTHON_DIR} python3.11"
        dom0.wait_ready(BOOT_TIMEOUT)
        yield dom0
        dom0.report()
    finally:
        vm.close()


@pytest.fixture
def dom0(vm_assets: VMAssets, tmp_path: Path) -> Iterator[Dom0]:
    """A freshly booted x86 PV Dom0 with xenstored, xen-init-dom0 and xenconsoled running."""
    with booted_dom0(vm_assets, tmp_path) as booted:
        yield booted


@pytest.fixture
def pvh_dom0(vm_assets: VMAssets, tmp_path: Path) -> Iterator[Dom0]:
    """The same with a PVH (auto-translated) Dom0 behind QEMU's AMD IOMMU."""
    with booted_dom0(vm_assets, tmp_path, pvh=True) as booted:
        yield booted


@pytest.fixture
def arm64_dom0(arm64_assets: VMAssets, tmp_path: Path) -> Iterator[Dom0]:
    """A freshly booted arm64 Dom0 (Xen on QEMU's virt board) with Xen's services running."""
    with booted_dom0(arm64_assets, tmp_path) as booted:
        yield booted


@pytest.fixture
def arm64_dom0_with_displays(arm64_assets: VMAssets, tmp_path: Path) -> Iterator[Dom0]:
    """The arm64 Dom0 with every display candidate: virtio-gpu (MMIO), bochs (PCI), vkms."""
    with booted_dom0(arm64_assets, tmp_path, extra_devices=("bochs-display",), vkms=True) as booted:
        yield booted
