"""A nested Xen under QEMU (TCG) for the VM tests: boot, serial console, HMP monitor.

:class:`XenVM` starts ``qemu-system-x86_64`` with Xen as the multiboot kernel, our bzImage
and Dom0 initramfs as modules, the host root exported read-only over 9p and a per-test
shared directory read-write (Dom0 sees it at ``/mnt``). With ``arch=ARM64`` it starts
``qemu-system-aarch64 -M virt,virtualization=on`` instead: Xen's arm64 Image as the kernel,
the Dom0 kernel and initramfs handed over by QEMU's ``guest-loader`` devices (Xen finds them
in the device tree), the arm64 root of :mod:`tests.vm.arm64_root` as ``hostroot`` and virtio
over MMIO. The serial line (Xen's com1, which
also carries Dom0's hvc0) is read by a thread into memory and ``console.log``; the HMP
monitor is a UNIX socket. Every wait has a timeout, and a failure raises :class:`VMError`
with the console's tail.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

XEN_GZ = Path("/boot/xen-4.17-amd64.gz")
QEMU = "qemu-system-x86_64"
XEN_ARGS = "console=com1 dom0_mem=1536M noreboot loglvl=all guest_loglvl=all"
# vkms is built in (for zero-copy import tests on an auto-translated Dom0) but its vblank
# hrtimer overruns constantly under TCG, costing CPU and flooding the console: keep it off.
NO_VKMS = "initcall_blacklist=vkms_init"
#: Dom0 kernel log level (4: errors only); DISPLBACK_VM_DOM0_LOGLEVEL=8 to debug Dom0.
DOM0_LOGLEVEL = int(os.environ.get("DISPLBACK_VM_DOM0_LOGLEVEL", "4"))
# +svm,+npt: QEMU's TCG emulates AMD nested paging, so Xen gets HAP and can run PVH guests
# (Debian's Xen has no shadow paging: without HAP, `xl create` of a PVH guest fails).
CPU = os.environ.get("DISPLBACK_VM_CPU", "qemu64,+x2apic,+sse4.1,+sse4.2,+popcnt,+ssse3,+svm,+npt")
_RC = re.compile(rb"@@RC=(\d+)@@")
#: Where Dom0 mounts the shared directory (tests/vm/initramfs.py's Dom0 /init).
DOM0_SHARE = "/mnt"


@dataclass(frozen=True)
class VMArch:
    """What differs between the x86 and the arm64 nested Xen."""

    name: str
    qemu: str
    qemu_package: str
    #: Xen's command line and Dom0's (without rdinit/loglevel, added by XenVM).
    xen_args: str
    dom0_console: str
    #: virtio transport suffix of QEMU device names: "pci" (x86) or "device" (MMIO, arm64).
    virtio: str
    #: The file name the kernel image has in the shared directory (the guest boots it).
    kernel_name: str
    #: xl.cfg ``type`` of the test guests (Arm has only PVH-like guests).
    guest_type: str
    #: Display device for KMS/screendump tests.
    display_device: str


X86 = VMArch(
    name="x86",
    qemu=QEMU,
    qemu_package="qemu-system-x86",
    xen_args=XEN_ARGS,
    dom0_console="console=hvc0 earlyprintk=xen",
    virtio="pci",
    kernel_name="bzImage",
    guest_type="pv",
    display_device="bochs-display",
)
# dtuart: Xen's console on the device tree's stdout-path (the PL011); earlycon=xen: Dom0's
# early messages through Xen's console hypercall.
ARM64 = VMArch(
    name="arm64",
    qemu="qemu-system-aarch64",
    qemu_package="qemu-system-arm",
    xen_args="console=dtuart dom0_mem=1024M noreboot loglvl=all guest_loglvl=all",
    dom0_console="console=hvc0 earlycon=xen",
    virtio="device",
    kernel_name="Image",
    guest_type="pvh",
    display_device="virtio-gpu-device",
)
#: Guest-physical addresses QEMU's guest-loader puts the Dom0 kernel and initramfs at (clear
#: of Xen at the start of RAM and of the device tree QEMU places 128 MiB into RAM).
ARM64_DOM0_KERNEL_ADDR = "0x42000000"
ARM64_DOM0_INITRD_ADDR = "0x47000000"


class VMError(AssertionError):
    """A VM step failed or timed out; carries the console's tail."""


def xen_elf(cache: Path) -> Path:
    """Xen's ELF image (QEMU's multiboot loader takes it, not the gzip)."""
    if not XEN_GZ.is_file():
        raise FileNotFoundError(f"{XEN_GZ} missing: apt-get install xen-hypervisor-4.17-amd64")
    out = cache / "xen-4.17.elf"
    if not out.is_file() or out.stat().st_mtime < XEN_GZ.stat().st_mtime:
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(gzip.decompress(XEN_GZ.read_bytes()))
        tmp.rename(out)
    return out


class XenVM:
    """One QEMU process running Xen + our Dom0; use as a context manager."""

    def __init__(
        self,
        workdir: Path,
        *,
        xen: Path,
        kernel: Path,
        initramfs: Path,
        share: Path,
        repo: Path | None = None,
        memory_mb: int = 3072,
        display: bool | str = True,
        pvh_dom0: bool = False,
        stage: Path | None = None,
        dom0_args: str = "",
        arch: VMArch = X86,
        hostroot: Path = Path("/"),
        extra_devices: tuple[str, ...] = (),
        vkms: bool = False,
    ) -> None:
        self.workdir = workdir
        self.share = share
        self.console_log = workdir / "console.log"
        self.monitor_path = workdir / "monitor.sock"
        self._buffer = bytearray()
        self._cursor = 0
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self.started = time.monotonic()
        self.arch = arch
        if shutil.which(arch.qemu) is None:
            raise FileNotFoundError(f"{arch.qemu} missing: apt-get install {arch.qemu_package}")
        dom0_cmdline = (
            f"{arch.dom0_console} rdinit=/init loglevel={DOM0_LOGLEVEL} "
            f"{'' if vkms else NO_VKMS} {dom0_args}"
        ).strip()
        # A PVH Dom0 (auto-translated: gntdev can export dma-bufs) needs an IOMMU, and the
        # virtio devices must go through it (iommu_platform) since Dom0's physical addresses
        # are not the machine's.
        xen_args = f"{arch.xen_args} dom0=pvh iommu=1" if pvh_dom0 else arch.xen_args
        virtio = ",iommu_platform=on,disable-legacy=on" if pvh_dom0 else ""
        ninep = f"virtio-9p-{arch.virtio}"
        if arch is ARM64:
            boot = [
                "-machine", "virt,virtualization=on,gic-version=3",
                "-cpu", "cortex-a57",
                # Modern virtio over MMIO: virtio-gpu's driver refuses a legacy device (it
                # stayed unbound with QEMU's default, force-legacy=true).
                "-global", "virtio-mmio.force-legacy=false",
                "-kernel", str(xen),
                "-append", xen_args,
                "-device",
                f"guest-loader,addr={ARM64_DOM0_KERNEL_ADDR},kernel={kernel},"
                f"bootargs={dom0_cmdline}",
                "-device", f"guest-loader,addr={ARM64_DOM0_INITRD_ADDR},initrd={initramfs}",
            ]  # fmt: skip
        else:
            boot = [
                *(["-machine", "q35,kernel-irqchip=split"] if pvh_dom0 else []),
                *(["-device", "amd-iommu,intremap=on"] if pvh_dom0 else []),
                "-cpu", CPU,
                "-kernel", str(xen),
                "-append", xen_args,
                "-initrd", f"{kernel} {dom0_cmdline},{initramfs}",
            ]  # fmt: skip
        cmd = [
            arch.qemu,
            *boot,
            "-accel", "tcg,thread=multi",
            "-m", str(memory_mb),
            "-smp", "2",
            "-no-reboot",
            "-display", "none",
            "-vga", "none",
            "-serial", "stdio",
            "-monitor", f"unix:{self.monitor_path},server=on,wait=off",
            "-fsdev", f"local,id=fs0,path={hostroot},security_model=none,readonly=on",
            "-device", f"{ninep},fsdev=fs0,mount_tag=hostroot{virtio}",
            "-fsdev", f"local,id=fs1,path={share},security_model=none",
            "-device", f"{ninep},fsdev=fs1,mount_tag=share{virtio}",
            *(
                [
                    "-fsdev", f"local,id=fs2,path={repo},security_model=none,readonly=on",
                    "-device", f"{ninep},fsdev=fs2,mount_tag=repo{virtio}",
                ]
                if repo is not None
                else []
            ),
            # A staged `make install` tree (DESTDIR), the systemd Dom0's layer above the host.
            *(
                [
                    "-fsdev", f"local,id=fs3,path={stage},security_model=none,readonly=on",
                    "-device", f"{ninep},fsdev=fs3,mount_tag=stage{virtio}",
                ]
                if stage is not None
                else []
            ),
            "-net", "none",
        ]  # fmt: skip
        if display:
            cmd += ["-device", arch.display_device if display is True else display]
        for device in extra_devices:
            cmd += ["-device", device]
        self.command = cmd
        (workdir / "qemu-command.txt").write_text(" ".join(f"'{a}'" for a in cmd) + "\n")
        self._log = self.console_log.open("wb")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # --- console ---------------------------------------------------------------------------

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._changed:
                if chunk:
                    self._buffer += chunk
                    self._log.write(chunk)
                    self._log.flush()
                self._changed.notify_all()
            if not chunk:
                return

    def tail(self, lines: int = 60) -> str:
        """The console's last ``lines`` lines."""
        with self._lock:
            text = self._buffer.decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, message: str) -> VMError:
        elapsed = time.monotonic() - self.started
        return VMError(
            f"{message} (after {elapsed:.1f} s; console log {self.console_log})\n"
            f"--- console tail ---\n{self.tail()}"
        )

    def expect(
        self, pattern: str | bytes | re.Pattern[bytes], timeout: float, *, what: str = ""
    ) -> re.Match[bytes]:
        """Wait for ``pattern`` in console output after the last match; return the match."""
        if isinstance(pattern, re.Pattern):
            regex = pattern
        else:
            regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        label = what or repr(regex.pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = regex.search(self._buffer, self._cursor)
                if match is not None:
                    self._cursor = match.end()
                    return match
                if self.proc.poll() is not None:
                    raise self.fail(f"QEMU exited ({self.proc.returncode}) waiting for {label}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self.fail(f"timed out after {timeout:g} s waiting for {label}")
                self._changed.wait(min(left, 1.0))

    def send(self, text: str) -> None:
        """Type ``text`` on the serial line, in small chunks (Xen's input ring is small)."""
        assert self.proc.stdin is not None
        data = text.encode()
        for i in range(0, len(data), 32):
            self.proc.stdin.write(data[i : i + 32])
            self.proc.stdin.flush()
            time.sleep(0.02)

    def sh(self, command: str, timeout: float = 60.0, *, check: bool = True) -> int:
        """Run ``command`` in Dom0's shell; return its exit status (``check``: must be 0).

        The command is written to the shared directory and only ``. /mnt/.cmd`` is typed:
        under load the serial line drops typed characters (seen: a 170-character command lost
        some and the shell sat at its continuation prompt). Every command is appended to
        ``commands.log`` there, for the post-mortem.
        """
        (self.share / ".cmd").write_text(command + "\n")
        with (self.share / "commands.log").open("a") as log:
            log.write(command + "\n")
        self.send(f'. {DOM0_SHARE}/.cmd; echo "@@""RC=$?@@"\n')
        match = self.expect(_RC, timeout, what=f"end of `{command}`")
        rc = int(match.group(1))
        if check and rc != 0:
            raise self.fail(f"`{command}` exited {rc}")
        return rc

    # --- monitor ---------------------------------------------------------------------------

    def monitor(self, command: str, timeout: float = 30.0) -> str:
        """Run one HMP command and return its output."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.monitor_path))
            out = b""
            while b"(qemu)" not in out:
                out += sock.recv(4096)
            sock.sendall(command.encode() + b"\n")
            out = b""
            while out.count(b"(qemu)") < 1 or not out.rstrip().endswith(b"(qemu)"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                out += chunk
        return out.decode("utf-8", "replace")

    def screendump(self, path: Path) -> Path:
        """HMP ``screendump`` of the bochs display to a PPM file."""
        self.monitor(f"screendump {path}")
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return path

    # --- lifetime --------------------------------------------------------------------------

    def wait_file(
        self, path: Path, predicate: Callable[[str], bool], timeout: float, *, what: str
    ) -> str:
        """Poll a file in the shared directory until ``predicate(text)``; return the text."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            if path.exists():
                text = path.read_text(errors="replace")
                if predicate(text):
                    return text
            if self.proc.poll() is not None:
                break
            time.sleep(0.25)
        tail = "\n".join(text.splitlines()[-30:])
        raise self.fail(f"timed out after {timeout:g} s waiting for {what} in {path}:\n{tail}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        self._log.close()

    def __enter__(self) -> XenVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
