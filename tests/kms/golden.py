"""Golden DRM/KMS layouts from Debian's libdrm-dev headers, compiled and run at test time.

:func:`drm_golden` compiles ``drm_golden.c`` against ``/usr/include/libdrm/drm.h`` and
``drm_mode.h`` once per session and returns its JSON (struct sizes and field spans, ioctl
numbers, constants). A missing compiler or header is an error with an install hint, never a
skip — the same rule as the displif golden vectors in :mod:`tests.golden`.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tests.golden import GoldenUnavailable

__all__ = ["DRM_HEADER", "drm_golden"]

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "drm_golden.c"
INCLUDE_DIR = Path("/usr/include/libdrm")
DRM_HEADER = INCLUDE_DIR / "drm_mode.h"
LIBDRM_HEADER = Path("/usr/include/xf86drmMode.h")
_INSTALL_HINT = "run `apt-get install -y gcc libc6-dev libdrm-dev` (Makefile APT_PACKAGES)"
_TIMEOUT_S = 120


def _run(argv: list[str], what: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except OSError as exc:
        raise GoldenUnavailable(f"{what}: cannot run {argv[0]}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise GoldenUnavailable(f"{what}: {argv[0]} timed out after {_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        raise GoldenUnavailable(
            f"{what} failed (exit {done.returncode}): {shlex.join(argv)}\n{done.stderr}"
        )
    return done.stdout


@functools.cache
def _golden() -> dict[str, Any] | GoldenUnavailable:
    try:
        cc = shlex.split(os.environ.get("CC", "gcc")) or ["gcc"]
        if shutil.which(cc[0]) is None:
            raise GoldenUnavailable(f"C compiler {cc[0]!r} not found: {_INSTALL_HINT}")
        for header in (INCLUDE_DIR / "drm.h", DRM_HEADER, LIBDRM_HEADER):
            if not header.is_file():
                raise GoldenUnavailable(f"{header} is missing: {_INSTALL_HINT}")
        with tempfile.TemporaryDirectory(prefix="drm-golden-") as tmp:
            exe = Path(tmp) / "drm_golden"
            _run(
                [
                    *cc,
                    "-std=gnu11",
                    "-O0",
                    "-Wall",
                    "-Wextra",
                    f"-I{INCLUDE_DIR}",
                    "-o",
                    str(exe),
                    str(SOURCE),
                ],
                "compiling the DRM golden-layout program",
            )
            out = _run([str(exe)], "running the DRM golden-layout program")
        try:
            value: dict[str, Any] = json.loads(out)
        except ValueError as exc:
            raise GoldenUnavailable(f"DRM golden program printed invalid JSON: {exc}") from exc
        return value
    except GoldenUnavailable as exc:
        return exc


def drm_golden() -> dict[str, Any]:
    """``{"structs": ..., "ioctls": ..., "constants": ...}`` as compiled by gcc (read-only)."""
    result = _golden()
    if isinstance(result, GoldenUnavailable):
        raise result
    return result
