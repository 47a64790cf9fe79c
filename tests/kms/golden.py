"""Golden DRM/KMS layouts from Debian's libdrm-dev headers, compiled and run at test time.

:func:`drm_golden` compiles ``drm_golden.c`` against ``/usr/include/libdrm/drm.h`` and
``drm_mode.h`` once per session and returns its JSON (struct sizes and field spans, ioctl
numbers, constants). A missing compiler or header is an error with an install hint, never a
skip — the same rule as the displif golden vectors in :mod:`tests.golden`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from tests.golden import GoldenUnavailable, compile_and_run

__all__ = ["DRM_HEADER", "drm_golden"]

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "drm_golden.c"
INCLUDE_DIR = Path("/usr/include/libdrm")
DRM_HEADER = INCLUDE_DIR / "drm_mode.h"
LIBDRM_HEADER = Path("/usr/include/xf86drmMode.h")
_INSTALL_HINT = "run `apt-get install -y gcc libc6-dev libdrm-dev` (Makefile APT_PACKAGES)"


@functools.cache
def _golden() -> dict[str, Any] | GoldenUnavailable:
    return compile_and_run(
        SOURCE,
        what="DRM golden-layout program",
        cflags=["-std=gnu11", "-O0", "-Wall", "-Wextra", f"-I{INCLUDE_DIR}"],
        headers=[INCLUDE_DIR / "drm.h", DRM_HEADER, LIBDRM_HEADER],
        hint=_INSTALL_HINT,
    )


def drm_golden() -> dict[str, Any]:
    """``{"structs": ..., "ioctls": ..., "constants": ...}`` as compiled by gcc (read-only)."""
    result = _golden()
    if isinstance(result, GoldenUnavailable):
        raise result
    return result
