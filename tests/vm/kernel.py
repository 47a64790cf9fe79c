"""Builds and caches the one Linux kernel per architecture that the VM tests boot as Dom0 and DomU.

The kernel comes from Debian's ``linux-source-6.1`` package. On x86 it is configured as
x86_64_defconfig + kvm_guest.config + xen.config + the committed fragment
``tests/vm/kernel.config``; on arm64 (cross-built with ``aarch64-linux-gnu-gcc``) as
``allnoconfig`` + ``tests/vm/kernel-arm64.config``, a small base so that it builds in minutes.
The image is cached outside the work tree in ``~/.cache/displback/kernel-<hash>/bzImage``
(arm64: ``kernel-arm64-<hash>/Image``), where the hash covers the fragment, the source
package's version, this builder's recipe version and the architecture, so a change of any of
them builds anew and nothing else does.

Run ``python -m tests.vm.kernel [--arch arm64]`` to build (x86: about 13 minutes on 2 cores)
and print the path.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

FRAGMENT = Path(__file__).with_name("kernel.config")
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
RECIPE_VERSION = "1"
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "displback"


@dataclass(frozen=True)
class Arch:
    """How one architecture's kernel is configured and built."""

    name: str
    fragment: Path
    #: ``make`` target giving the base .config, then files merged on top (with the fragment).
    base: str
    merged: tuple[str, ...]
    #: Extra ``make`` variables (ARCH, CROSS_COMPILE for a cross build).
    make_vars: tuple[str, ...]
    target: str
    image: str
    #: Name of the cached image (and of the directory prefix).
    image_name: str
    prefix: str


X86 = Arch(
    name="x86",
    fragment=FRAGMENT,
    base="x86_64_defconfig",
    merged=("kernel/configs/kvm_guest.config", "kernel/configs/xen.config"),
    make_vars=(),
    target="bzImage",
    image="arch/x86/boot/bzImage",
    image_name="bzImage",
    prefix="kernel-",
)
ARM64 = Arch(
    name="arm64",
    fragment=Path(__file__).with_name("kernel-arm64.config"),
    base="allnoconfig",
    merged=(),
    make_vars=("ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"),
    target="Image",
    image="arch/arm64/boot/Image",
    image_name="Image",
    prefix="kernel-arm64-",
)
ARCHES = {a.name: a for a in (X86, ARM64)}


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


def cache_key(fragment: bytes, version: str, arch: Arch = X86) -> str:
    """Short hash of everything that decides the image's content.

    x86's key leaves the architecture out (it predates arm64: its caches stay valid).
    """
    digest = hashlib.sha256()
    parts = [RECIPE_VERSION.encode(), version.encode(), fragment]
    if arch is not X86:
        parts += [arch.name.encode(), arch.base.encode()]
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:16]


def cache_dir(arch: Arch = X86) -> Path:
    """Directory that holds (or will hold) the image for the current fragment and source."""
    key = cache_key(arch.fragment.read_bytes(), source_version(), arch)
    return CACHE_ROOT / f"{arch.prefix}{key}"


def cached_bzimage(arch: Arch = X86) -> Path | None:
    """The cached kernel image if it was built already, else None."""
    path = cache_dir(arch) / arch.image_name
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


def _run(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(
            cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise KernelBuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(tail))


def build(jobs: int | None = None, keep_tree: bool = False, arch: Arch = X86) -> Path:
    """Build the kernel unless cached; return the image's path."""
    done = cached_bzimage(arch)
    if done is not None:
        return done
    if not SOURCE_TARBALL.is_file():
        raise KernelBuildError(f"{SOURCE_TARBALL} missing (apt-get install {SOURCE_PACKAGE})")
    target = cache_dir(arch)
    work = target.with_name(target.name + ".build")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = work / "build.log"
    with tarfile.open(SOURCE_TARBALL) as tar:
        tar.extractall(work, filter="fully_trusted")
    tree = next(p for p in work.iterdir() if p.is_dir())
    fragment_text = arch.fragment.read_text()
    (tree / "displback.config").write_text(fragment_text)
    make = ["make", *arch.make_vars]
    _run([*make, arch.base], tree, log)
    merge = ["scripts/kconfig/merge_config.sh", "-m", ".config", *arch.merged, "displback.config"]
    # merge_config.sh runs no make itself with -m, but reads ARCH for the Kconfig it checks.
    env_vars = dict(v.split("=", 1) for v in arch.make_vars)
    _run(merge, tree, log, env_vars)
    _run([*make, "olddefconfig"], tree, log)
    config = wanted_options((tree / ".config").read_text())
    missing = {
        name: value
        for name, value in wanted_options(fragment_text).items()
        if config.get(name) != value
    }
    if missing:
        raise KernelBuildError(f"options not honoured by Kconfig: {sorted(missing)}")
    _run([*make, f"-j{jobs or os.cpu_count() or 2}", arch.target], tree, log)
    staging = target.with_name(target.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    shutil.copy2(tree / arch.image, staging / arch.image_name)
    shutil.copy2(tree / ".config", staging / "config")
    shutil.copy2(log, staging / "build.log")
    staging.rename(target)
    if not keep_tree:
        shutil.rmtree(work)
    return target / arch.image_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--keep-tree", action="store_true", help="keep the build tree")
    parser.add_argument("--print-path", action="store_true", help="only print the cache path")
    parser.add_argument("--arch", choices=sorted(ARCHES), default="x86")
    args = parser.parse_args(argv)
    arch = ARCHES[args.arch]
    if args.print_path:
        print(cache_dir(arch) / arch.image_name)
        return 0
    try:
        print(build(args.jobs, args.keep_tree, arch))
    except KernelBuildError as exc:
        print(f"kernel build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
