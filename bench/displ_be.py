"""Build the reference C++ backend, displ_be (and its libxenbe), into the cache for bench-vm.

``python -m bench.displ_be [--displ-be-src SRC] [--libxenbe-src SRC]`` prints the prefix of
the build: ``<prefix>/bin/displ_be`` and ``<prefix>/lib/libxenbe.so``. That prefix is what
``make bench-vm DISPL_BE=...`` takes. Nothing lands in the checkout: sources are cloned and
built under ``~/.cache/displback/displ_be-<hash>/`` (the hash covers both commits, the cmake
flags and this recipe), and a finished build is reused.

Why a recipe of its own: displ_be is the peer issue 12 measures displback against, built
from its public source (github.com/xen-troops) against Debian 12's libxen 4.17, libdrm and
libudev (``libudev-dev`` must be installed). Two quirks of that source on Debian:

* ``drm_edid.h`` includes ``<drm/drm_mode.h>``, and Debian has no ``/usr/include/drm``
  (libdrm-dev puts that header in ``/usr/include/libdrm``): the build puts an include
  directory first in which ``drm`` is a link to ``/usr/include/libdrm``;
* libxenbe's tests need a mock library; they are not built (``-DWITH_TEST=OFF``).

The Dom0 of the VM (the host's own root over 9p) has the runtime libraries already:
libxen* 4.17 (``libxen-dev``'s runtime packages), ``libdrm2``, ``libudev1`` — the same files
the build linked against; ``libxenbe.so`` is found through the binary's RPATH (the cache is
at the same path in Dom0).

Sources: ``--*-src`` is anything ``git clone`` takes (a URL or a local repository); the
defaults are the public GitHub repositories. The commits are pinned (the ones measured).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "displback"
DISPL_BE_URL = "https://github.com/xen-troops/displ_be"
LIBXENBE_URL = "https://github.com/xen-troops/libxenbe"
#: The commits measured (heads of the public repositories in November 2026).
DISPL_BE_COMMIT = "b218acf44e71c4a77082944e3878e1859a352fba"
LIBXENBE_COMMIT = "bbe8f24f62d8f769b512a35164b9df9e59d0f9a7"
#: The flags of issue 12: DRM only, copy and zero-copy code built, release.
DISPL_BE_FLAGS = (
    "-DWITH_WAYLAND=OFF",
    "-DWITH_INPUT=OFF",
    "-DWITH_DRM=ON",
    "-DWITH_ZCOPY=ON",
    "-DCMAKE_BUILD_TYPE=Release",
)
LIBXENBE_FLAGS = ("-DWITH_TEST=OFF", "-DWITH_DOC=OFF", "-DCMAKE_BUILD_TYPE=Release")
#: Bump when the recipe below changes what is built.
RECIPE = 1
LIBDRM_INCLUDE = Path("/usr/include/libdrm")


class BuildError(RuntimeError):
    """displ_be cannot be built here; the message says which step and why."""


@dataclass(frozen=True)
class DisplBe:
    """A displ_be build: the binary and the directory of its libxenbe."""

    prefix: Path

    @property
    def binary(self) -> Path:
        return self.prefix / "bin" / "displ_be"

    @property
    def libdir(self) -> Path:
        return self.prefix / "lib"

    @classmethod
    def at(cls, path: Path) -> DisplBe:
        """The build at ``path``: its prefix, or the ``bin/displ_be`` binary inside it."""
        prefix = path.parent.parent if path.is_file() else path
        build = cls(prefix)
        if not build.binary.is_file():
            raise BuildError(f"{path}: no bin/displ_be there (python -m bench.displ_be builds one)")
        if not (build.libdir / "libxenbe.so").exists():
            raise BuildError(f"{path}: no lib/libxenbe.so beside bin/displ_be")
        return build


def cache_dir() -> Path:
    key = "\n".join(
        [DISPL_BE_COMMIT, LIBXENBE_COMMIT, *DISPL_BE_FLAGS, *LIBXENBE_FLAGS, str(RECIPE)]
    )
    return CACHE_ROOT / f"displ_be-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _run(step: str, argv: list[str], cwd: Path | None = None) -> None:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as error:
        raise BuildError(f"{step}: {argv[0]} missing ({error})") from error
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise BuildError(f"{step} failed ({done.returncode}): {' '.join(argv)}\n{tail}")


def _checkout(step: str, source: str, commit: str, into: Path) -> None:
    if into.exists():
        shutil.rmtree(into)
    _run(f"{step}: clone {source}", ["git", "clone", "--quiet", "--no-checkout", source, str(into)])
    _run(f"{step}: checkout {commit}", ["git", "-C", str(into), "checkout", "--quiet", commit])


def _check_tools() -> None:
    for tool in ("git", "cmake", "make", "c++", "pkg-config"):
        if shutil.which(tool) is None:
            raise BuildError(
                f"{tool} missing: apt-get install git cmake build-essential pkg-config"
            )
    for package in ("libudev", "libdrm"):
        if subprocess.run(["pkg-config", "--exists", package]).returncode != 0:
            raise BuildError(f"{package} development files missing: apt-get install {package}-dev")
    if not Path("/usr/include/xenctrl.h").is_file():
        raise BuildError("Xen's headers missing: apt-get install libxen-dev")
    if not (LIBDRM_INCLUDE / "drm_mode.h").is_file():
        raise BuildError(f"{LIBDRM_INCLUDE}/drm_mode.h missing: apt-get install libdrm-dev")


def build(
    displ_be_src: str = DISPL_BE_URL, libxenbe_src: str = LIBXENBE_URL, *, jobs: int = 2
) -> DisplBe:
    """Build (or reuse) libxenbe + displ_be in the cache; return the build."""
    out = cache_dir()
    done = DisplBe(out / "prefix")
    if done.binary.is_file() and (done.libdir / "libxenbe.so").exists():
        return done
    _check_tools()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    prefix = out / "prefix"
    _checkout("libxenbe", libxenbe_src, LIBXENBE_COMMIT, work / "libxenbe")
    _checkout("displ_be", displ_be_src, DISPL_BE_COMMIT, work / "displ_be")
    include = work / "include"
    include.mkdir(exist_ok=True)
    link = include / "drm"
    if not link.is_symlink():
        link.symlink_to(LIBDRM_INCLUDE)
    cmake = ["cmake", "-Wno-dev", f"-DCMAKE_INSTALL_PREFIX={prefix}"]
    make = ["make", f"-j{jobs}", "install"]
    xenbe_build = work / "libxenbe-build"
    xenbe_build.mkdir(exist_ok=True)
    _run("libxenbe: cmake", [*cmake, *LIBXENBE_FLAGS, str(work / "libxenbe")], xenbe_build)
    _run("libxenbe: make", make, xenbe_build)
    be_build = work / "displ_be-build"
    be_build.mkdir(exist_ok=True)
    _run(
        "displ_be: cmake",
        [
            *cmake,
            *DISPL_BE_FLAGS,
            f"-DCMAKE_CXX_FLAGS=-I{include}",
            f"-DXENBE_INCLUDE_PATH={prefix / 'include'}",
            f"-DXENBE_LIB_PATH={prefix / 'lib'}",
            f"-DCMAKE_INSTALL_RPATH={prefix / 'lib'}",
            str(work / "displ_be"),
        ],
        be_build,
    )
    _run("displ_be: make", make, be_build)
    if not done.binary.is_file():
        raise BuildError(f"displ_be: make install left no {done.binary}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.displ_be", description=__doc__)
    parser.add_argument("--displ-be-src", default=DISPL_BE_URL, help="git URL or repository")
    parser.add_argument("--libxenbe-src", default=LIBXENBE_URL, help="git URL or repository")
    args = parser.parse_args(argv)
    try:
        built = build(args.displ_be_src, args.libxenbe_src)
    except BuildError as error:
        print(f"displ_be cannot be built: {error}", file=sys.stderr)
        return 1
    print(built.prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
