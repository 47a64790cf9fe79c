"""The arm64 Dom0's root file system, assembled from Debian's arm64 packages (tests/vm).

On x86 the Dom0 chroots into the host's own root over 9p; an arm64 Dom0 cannot run the
host's binaries, so it gets a root of its own: Debian bookworm's arm64 packages for Xen
(hypervisor image, xen-utils, xenstored), Python 3.11 and busybox, resolved by ``apt-get``
with a private state directory (the host's dpkg is not touched, no foreign architecture is
added) and unpacked with ``dpkg-deb -x`` (no maintainer scripts run, no emulation). The
daemon's Python dependencies are pip-installed for ``manylinux2014_aarch64``/cp311 into
``/opt/displback-python``. The result is cached in ``~/.cache/displback/arm64-root-<hash>``,
keyed by the package list, the requirements and this recipe's version.

Run ``python -m tests.vm.arm64_root`` to build it (about a minute with a fast mirror) and
print its path.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from tests.vm.kernel import CACHE_ROOT

RECIPE_VERSION = "2"
PACKAGES = (
    "xen-hypervisor-4.17-arm64",
    "xen-utils-4.17",
    "xenstore-utils",
    "python3.11",
    "busybox-static",
    # The ring's full memory fence (displback/protocol/ring.py) is libatomic's.
    "libatomic1",
)
#: The daemon's runtime dependencies (pyproject.toml's ``dependencies``).
REQUIREMENTS = ("trio>=0.25", "structlog>=24.1", "pillow>=10", "numpy>=1.26")
PYTHON_DIR = "opt/displback-python"
#: Where Dom0 mounts the checkout (9p tag ``repo``): the root is read-only, so the mount
#: point is made here.
REPO_MOUNT = "/displback"
XEN_IMAGE = "boot/xen-4.17-arm64"
#: Directories the Dom0 /init mounts over (tests/vm/initramfs.py) or that the tools expect.
DIRS = ("proc", "sys", "dev", "mnt", "run", "tmp", "var/lib/xen", "var/log", "root", "etc/xen")


class RootBuildError(RuntimeError):
    """A step of the root's assembly failed; the message says which."""


def cache_key() -> str:
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION, *PACKAGES, "--", *REQUIREMENTS):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    return CACHE_ROOT / f"arm64-root-{cache_key()}"


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd="/")
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise RootBuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(tail))


def _apt_options(state: Path) -> list[str]:
    """apt-get options for a private arm64-only package database under ``state``."""
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "status").touch()  # nothing installed: the whole dependency closure is fetched
    return [
        "-o", f"Dir::State={state}",
        "-o", f"Dir::State::Lists={state}/lists",
        "-o", f"Dir::State::status={state}/status",
        "-o", f"Dir::Cache={state}/cache",
        "-o", "APT::Architecture=arm64",
        "-o", "APT::Architectures::=arm64",
        "-o", "Debug::NoLocking=1",
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip


def _busybox_links(root: Path) -> None:
    """``/bin/<applet>`` -> busybox for each applet no package provides (sh, mount, ...)."""
    listing = subprocess.run(
        ["/bin/busybox", "--list-full"], check=True, capture_output=True, text=True
    ).stdout
    for applet in listing.split():
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def build() -> Path:
    """Assemble the root unless cached; return its path."""
    target = cache_dir()
    if (target / XEN_IMAGE).is_file():
        return target
    if shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None:
        raise RootBuildError("apt-get and dpkg-deb are needed (a Debian host)")
    work = target.with_name(target.name + ".build")
    if work.exists():
        shutil.rmtree(work)
    root = work / "root"
    root.mkdir(parents=True)
    log = work / "build.log"
    apt = ["apt-get", *_apt_options(work / "apt")]
    _run([*apt, "update"], log)
    _run([*apt, "install", "-y", "--download-only", "--no-install-recommends", *PACKAGES], log)
    debs = sorted((work / "apt/cache/archives").glob("*.deb"))
    if not debs:
        raise RootBuildError("apt-get downloaded no packages")
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)], log)
    _run(
        [
            sys.executable, "-m", "pip", "install", "--quiet",
            "--platform", "manylinux2014_aarch64", "--python-version", "3.11",
            "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:",
            "--target", str(root / PYTHON_DIR), *REQUIREMENTS,
        ],
        log,
    )  # fmt: skip
    _busybox_links(root)
    for sub in (*DIRS, REPO_MOUNT.lstrip("/")):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # base-files' links, which the Xen tools' /var/run/... paths go through.
    for link, to in (("var/run", "/run"), ("var/lock", "/run/lock")):
        if not (root / link).is_symlink():
            (root / link).symlink_to(to)
    if not (root / XEN_IMAGE).is_file():
        raise RootBuildError(f"{XEN_IMAGE} missing after unpacking {len(debs)} packages")
    (root / "etc/debian-packages.txt").write_text("\n".join(d.name for d in debs) + "\n")
    shutil.copy2(log, root / "etc/displback-root-build.log")
    shutil.rmtree(work / "apt")
    if target.exists():
        shutil.rmtree(target)
    root.rename(target)
    shutil.rmtree(work)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-path", action="store_true", help="only print the cache path")
    args = parser.parse_args(argv)
    if args.print_path:
        print(cache_dir())
        return 0
    try:
        print(build())
    except RootBuildError as exc:
        print(f"arm64 root build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
