"""Builds and caches the one Linux kernel that the VM tests boot as Dom0 and as DomU.

The kernel comes from Debian's ``linux-source-6.1`` package, configured as
x86_64_defconfig + kvm_guest.config + xen.config + the committed fragment
``tests/vm/kernel.config``.  The bzImage is cached outside the work tree in
``~/.cache/displback/kernel-<hash>/bzImage``, where the hash covers the fragment, the
source package's version and this builder's recipe version, so a change of any of them
builds anew and nothing else does.

Run ``python -m tests.vm.kernel`` to build (about 13 minutes on 2 cores) and print the path.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

FRAGMENT = Path(__file__).with_name("kernel.config")
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
RECIPE_VERSION = "1"
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "displback"


class KernelBuildError(RuntimeError):
    """The kernel could not be configured or built; the message says which step failed."""


def source_version() -> str:
    """Version of the installed linux-source package (part of the cache key)."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise KernelBuildError(
            f"{SOURCE_PACKAGE} is not installed (apt-get install {SOURCE_PACKAGE})"
        ) from exc
    if not out:
        raise KernelBuildError(f"{SOURCE_PACKAGE} is not installed")
    return out


def cache_key(fragment: bytes, version: str) -> str:
    """Short hash of everything that decides the bzImage's content."""
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION.encode(), version.encode(), fragment):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Directory that holds (or will hold) the bzImage for the current fragment and source."""
    return CACHE_ROOT / f"kernel-{cache_key(FRAGMENT.read_bytes(), source_version())}"


def cached_bzimage() -> Path | None:
    """The cached bzImage if it was built already, else None."""
    path = cache_dir() / "bzImage"
    return path if path.is_file() else None


def wanted_options(fragment: str) -> dict[str, str]:
    """CONFIG_X=value lines of the fragment (comments and blanks ignored)."""
    options: dict[str, str] = {}
    for line in fragment.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            options[name] = value
    return options


def _run(cmd: list[str], cwd: Path, log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise KernelBuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(tail))


def build(jobs: int | None = None, keep_tree: bool = False) -> Path:
    """Build the kernel unless cached; return the bzImage path."""
    done = cached_bzimage()
    if done is not None:
        return done
    if not SOURCE_TARBALL.is_file():
        raise KernelBuildError(f"{SOURCE_TARBALL} missing (apt-get install {SOURCE_PACKAGE})")
    target = cache_dir()
    work = target.with_name(target.name + ".build")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = work / "build.log"
    with tarfile.open(SOURCE_TARBALL) as tar:
        tar.extractall(work, filter="fully_trusted")
    tree = next(p for p in work.iterdir() if p.is_dir())
    fragment_text = FRAGMENT.read_text()
    (tree / "displback.config").write_text(fragment_text)
    _run(["make", "x86_64_defconfig"], tree, log)
    _run(
        [
            "scripts/kconfig/merge_config.sh",
            "-m",
            ".config",
            "kernel/configs/kvm_guest.config",
            "kernel/configs/xen.config",
            "displback.config",
        ],
        tree,
        log,
    )
    _run(["make", "olddefconfig"], tree, log)
    config = wanted_options((tree / ".config").read_text())
    missing = {
        name: value
        for name, value in wanted_options(fragment_text).items()
        if config.get(name) != value
    }
    if missing:
        raise KernelBuildError(f"options not honoured by Kconfig: {sorted(missing)}")
    _run(["make", f"-j{jobs or os.cpu_count() or 2}", "bzImage"], tree, log)
    staging = target.with_name(target.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    shutil.copy2(tree / "arch/x86/boot/bzImage", staging / "bzImage")
    shutil.copy2(tree / ".config", staging / "config")
    shutil.copy2(log, staging / "build.log")
    staging.rename(target)
    if not keep_tree:
        shutil.rmtree(work)
    return target / "bzImage"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--keep-tree", action="store_true", help="keep the build tree")
    parser.add_argument("--print-path", action="store_true", help="only print the cache path")
    args = parser.parse_args(argv)
    if args.print_path:
        print(cache_dir() / "bzImage")
        return 0
    try:
        print(build(args.jobs, args.keep_tree))
    except KernelBuildError as exc:
        print(f"kernel build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
