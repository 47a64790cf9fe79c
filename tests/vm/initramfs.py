"""The two busybox initramfs images of the VM tests (Dom0 and DomU), written as newc cpio.

Nothing is downloaded: busybox comes from Debian's ``busybox-static``, the guest's test
program is compiled here with ``gcc -static`` from ``tests/vm/guest/drmtest.c``. For arm64
(``make test-vm-arm64``) busybox is the arm64 one of :mod:`tests.vm.arm64_root` and the
program is cross-compiled with ``aarch64-linux-gnu-gcc -static``.

* Dom0: ``/init`` mounts proc, sys, devtmpfs, the host's root read-only over 9p
  (``hostroot``) and the test's shared directory read-write (``share``, at ``/mnt`` inside),
  puts tmpfs on the host's ``/run``, ``/tmp``, ``/var/lib/xen``, ``/var/log``, mounts xenfs
  and chroots into the host root to run ``/mnt/dom0.sh`` (written by the harness).
* Dom0 with systemd (``build_dom0_systemd``, tests/vm/systemd_dom0.py): an overlay of a staged
  ``make install`` over the host's root, then ``switch_root`` to systemd.
* DomU: ``/init`` runs ``drmtest`` on xen-drm-front's card (driver ``xendrm-du``) with the
  arguments found on the kernel command line
  (``drmtest.flips=``, ``drmtest.hold=``, ``drmtest.connectors=0,1``, ``drmtest.then=``
  ``halt``/``reboot``/``stay``; ``drmtest.warmup=W``: benchmark mode, see drmtest.c), and
  has ``/sbin/poweroff`` and ``/sbin/reboot`` for the kernel to run on ``xl shutdown``/``xl
  reboot``. With ``inputtest.seconds=N`` it first starts ``inputtest`` (``guest/inputtest.c``)
  in the background: xen-kbdfront's devices and every event they report for N seconds.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
GUEST_SOURCE = Path(__file__).with_name("guest") / "drmtest.c"
INPUT_SOURCE = Path(__file__).with_name("guest") / "inputtest.c"
DRM_HEADERS = Path("/usr/include/libdrm")


@dataclass(frozen=True)
class _Entry:
    name: str
    mode: int
    data: bytes = b""


def _newc(entries: list[_Entry]) -> bytes:
    """A newc ("070701") cpio archive of ``entries`` (uid/gid 0, mtime 0)."""
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate([*entries, _Entry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        fields = [ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, 0, 0, len(name), 0]
        out += b"070701" + b"".join(f"{f:08X}".encode() for f in fields)
        out += name
        pad4()
        out += entry.data
        pad4()
    return bytes(out)


def _dir(name: str) -> _Entry:
    return _Entry(name, 0o040755)


def _file(name: str, data: bytes, mode: int = 0o755) -> _Entry:
    return _Entry(name, 0o100000 | mode, data)


def _base(init: str, busybox: Path = BUSYBOX) -> list[_Entry]:
    if not busybox.is_file():
        raise FileNotFoundError(f"{busybox} missing: apt-get install busybox-static")
    return [
        *(_dir(d) for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "host")),
        _file("bin/busybox", busybox.read_bytes()),
        _file("init", init.encode()),
    ]


DOM0_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "@@INITRAMFS DOM0@@"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /host || {
    echo "@@FAIL mount hostroot@@"; exec sh; }
for d in run tmp var/lib/xen var/log; do mount -t tmpfs -o mode=0755 tmpfs /host/$d; done
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mount -t xenfs xenfs /host/proc/xen || echo "@@FAIL mount xenfs@@"
mount -t debugfs debugfs /host/sys/kernel/debug
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none share /host/mnt || {
    echo "@@FAIL mount share@@"; exec sh; }
echo "@@CHROOT@@"
exec chroot /host /bin/sh /mnt/dom0.sh
"""

# Dom0 with systemd as PID 1 (tests/vm/test_systemd.py): the host root read-only over 9p under
# an overlay, with the staged `make install` tree (9p tag ``stage``) as the layer above it and
# a tmpfs as the writable top; the harness's files for this Dom0 (``share/rootfs``: fstab, the
# console shell's unit, masks, Xen's defaults) are copied into the top layer, the share is
# mounted at /mnt, then systemd takes over.
DOM0_SYSTEMD_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "@@INITRAMFS DOM0@@"
fail() { echo "@@FAIL $1@@"; exec sh; }
mkdir -p /lower /stage /rw /newroot
ninep="-t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000"
mount $ninep hostroot /lower || fail "mount hostroot"
mount $ninep stage /stage || fail "mount stage"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/stage:/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "mount overlay"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none share /newroot/mnt \
    || fail "mount share"
cp -a /newroot/mnt/rootfs/. /newroot/ || fail "copy rootfs"
# The host's /tmp is not Dom0's: systemd-tmpfiles would empty it at boot (`D /tmp`), one
# whiteout at a time over 9p.
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
echo "@@SWITCH ROOT@@"
umount /proc /sys /dev
exec switch_root /newroot /lib/systemd/systemd
"""

DOMU_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
flips=10; hold=600; conns=0; then=stay; input=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        inputtest.seconds=*) input=${arg#*=} ;;
        drmtest.flips=*) flips=${arg#*=} ;;
        drmtest.hold=*) hold=${arg#*=} ;;
        drmtest.connectors=*) conns=$(echo ${arg#*=} | tr , ' ') ;;
        drmtest.then=*) then=${arg#*=} ;;
        drmtest.warmup=*) export DRMTEST_WARMUP=${arg#*=} ;;
    esac
done
echo "DOMU INIT flips=$flips hold=$hold connectors=$conns then=$then"
[ -n "$input" ] && /bin/inputtest "$input" &
/bin/drmtest xendrm-du $flips $hold $conns
echo "DOMU DRMTEST rc=$?"
case "$then" in
    halt) poweroff -f ;;
    reboot) reboot -f ;;
esac
exec sh
"""


# `xl shutdown` / `xl reboot` reach a PV guest's kernel, which runs /sbin/poweroff or
# /sbin/reboot (orderly_poweroff; without the program a poweroff request is dropped).
# busybox's own applets would only signal init, which here is the script above: go straight
# to the kernel (-f), whose device shutdown still closes the frontends first (each waits for
# its backend's Closed). The line on the console shows the guest took the request.
def _power_script(applet: str) -> str:
    return f"""#!/bin/sh
echo "DOMU {applet.upper()}" > /dev/console
exec /bin/busybox {applet} -f
"""


def compile_inputtest(out: Path) -> Path:
    """``gcc -static`` the guest's input test program (``guest/inputtest.c``) into ``out``."""
    compiler = shutil.which("gcc")
    if compiler is None:
        raise FileNotFoundError("gcc missing: apt-get install build-essential")
    subprocess.run(
        [compiler, "-static", "-O2", "-Wall", "-Werror", "-o", str(out), str(INPUT_SOURCE)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


def compile_drmtest(out: Path, cc: str = "gcc") -> Path:
    """``gcc -static`` (or ``cc``, a cross compiler) the guest's DRM test program into ``out``."""
    compiler = shutil.which(cc)
    if compiler is None:
        package = "build-essential" if cc == "gcc" else "gcc-aarch64-linux-gnu"
        raise FileNotFoundError(f"{cc} missing: apt-get install {package}")
    if not (DRM_HEADERS / "drm_mode.h").is_file():
        raise FileNotFoundError(f"{DRM_HEADERS}/drm_mode.h missing: apt-get install libdrm-dev")
    subprocess.run(
        [
            compiler,
            "-static",
            "-O2",
            "-Wall",
            "-Werror",
            f"-I{DRM_HEADERS}",
            "-o",
            str(out),
            str(GUEST_SOURCE),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


def build_dom0(path: Path, busybox: Path = BUSYBOX) -> Path:
    """Write the Dom0 initramfs to ``path``."""
    path.write_bytes(_newc(_base(DOM0_INIT, busybox)))
    return path


def build_dom0_systemd(path: Path) -> Path:
    """Write the initramfs of the systemd Dom0 (overlay root, then systemd) to ``path``."""
    path.write_bytes(_newc(_base(DOM0_SYSTEMD_INIT)))
    return path


def build_domu(
    path: Path, drmtest: Path, inputtest: Path | None = None, busybox: Path = BUSYBOX
) -> Path:
    """Write the DomU initramfs (with the compiled ``drmtest``, and ``inputtest`` if given)
    to ``path``."""
    entries = [
        *_base(DOMU_INIT, busybox),
        _file("bin/drmtest", drmtest.read_bytes()),
        *([_file("bin/inputtest", inputtest.read_bytes())] if inputtest is not None else []),
        _file("sbin/poweroff", _power_script("poweroff").encode()),
        _file("sbin/reboot", _power_script("reboot").encode()),
    ]
    path.write_bytes(_newc(entries))
    return path
