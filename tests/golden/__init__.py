"""Golden vectors from Xen's own C headers, so layout tests compare against the compiler, not a
table someone copied.

:func:`c_golden` compiles ``displif_golden.c`` against ``/usr/include/xen/io/displif.h`` (Debian
package libxen-dev; ``make test`` installs it together with gcc) once per test session, runs it
and returns its JSON: struct sizes and offsets, packet field spans, ring geometry, every
``XENDISPL_*`` constant, Xen errno values and packed sample packets (see the C file's header).
:func:`kbdif_golden` does the same for ``kbdif_golden.c`` against ``xen/io/kbdif.h`` (the vkbd
input protocol). :func:`header_macros` lists the object-like ``XENDISPL_*`` macros the
preprocessor sees, so a test can prove the C program reports all of them.

Missing tools are an error, not a skip: the tests that use these helpers must fail loudly with
a message saying what to install.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DISPLIF_HEADER",
    "KBDIF_HEADER",
    "GoldenUnavailable",
    "c_golden",
    "compile_and_run",
    "header_macros",
    "kbdif_golden",
]

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "displif_golden.c"
DISPLIF_HEADER = Path("/usr/include/xen/io/displif.h")
KBDIF_HEADER = Path("/usr/include/xen/io/kbdif.h")
KBDIF_SOURCE = HERE / "kbdif_golden.c"
_INSTALL_HINT = "run `make apt-deps` (installs gcc, libc6-dev and libxen-dev)"
_TIMEOUT_S = 120


class GoldenUnavailable(RuntimeError):
    """The C golden vectors cannot be produced (no compiler, no Xen headers, build failure)."""


def _compiler(headers: Sequence[Path] = (DISPLIF_HEADER,), hint: str = _INSTALL_HINT) -> list[str]:
    """``$CC`` (default gcc) as argv, if it and every one of ``headers`` are installed."""
    cc = shlex.split(os.environ.get("CC", "gcc")) or ["gcc"]
    if shutil.which(cc[0]) is None:
        raise GoldenUnavailable(f"C compiler {cc[0]!r} not found: {hint}")
    for header in headers:
        if not header.is_file():
            raise GoldenUnavailable(f"{header} is missing: {hint}")
    return cc


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


def compile_and_run(
    source: Path,
    *,
    what: str,
    cflags: Sequence[str],
    headers: Sequence[Path],
    hint: str,
) -> dict[str, Any] | GoldenUnavailable:
    """Compile the C program ``source`` (``what``, for messages) and return the JSON it prints.

    The failure is returned, not raised, so a ``functools.cache`` around the caller remembers
    it and a broken toolchain is reported once per test, with ``hint`` saying what to install.
    """
    try:
        cc = _compiler(headers, hint)
        with tempfile.TemporaryDirectory(prefix=f"{source.stem}-") as tmp:
            exe = Path(tmp) / source.stem
            _run([*cc, *cflags, "-o", str(exe), str(source)], f"compiling the {what}")
            out = _run([str(exe)], f"running the {what}")
        try:
            value: dict[str, Any] = json.loads(out)
        except ValueError as exc:
            raise GoldenUnavailable(f"{what} printed invalid JSON: {exc}") from exc
        return value
    except GoldenUnavailable as exc:
        return exc


@functools.cache
def _golden() -> dict[str, Any] | GoldenUnavailable:
    return compile_and_run(
        SOURCE,
        what="displif golden-vector program",
        cflags=["-std=c11", "-O0", "-Wall", "-Wextra"],
        headers=[DISPLIF_HEADER],
        hint=_INSTALL_HINT,
    )


def c_golden() -> dict[str, Any]:
    """The golden vectors as a dict (compiled and run once per session; treat as read-only)."""
    result = _golden()
    if isinstance(result, GoldenUnavailable):
        raise result
    return result


@functools.cache
def _kbdif() -> dict[str, Any] | GoldenUnavailable:
    return compile_and_run(
        KBDIF_SOURCE,
        what="kbdif golden-vector program",
        cflags=["-std=c11", "-O0", "-Wall", "-Wextra"],
        headers=[KBDIF_HEADER],
        hint=_INSTALL_HINT,
    )


def kbdif_golden() -> dict[str, Any]:
    """Offsets, constants, node names and sample events of Xen's kbdif.h (``kbdif_golden.c``)."""
    result = _kbdif()
    if isinstance(result, GoldenUnavailable):
        raise result
    return result


_MACRO = re.compile(r"^#define (XENDISPL_[A-Z0-9_]+) (.*)$")


@functools.cache
def _macros() -> dict[str, str] | GoldenUnavailable:
    try:
        cc = _compiler()
        with tempfile.TemporaryDirectory(prefix="displif-macros-") as tmp:
            src = Path(tmp) / "macros.c"
            src.write_text("#include <stdint.h>\n#include <xen/io/displif.h>\n")
            out = _run([*cc, "-std=c11", "-dM", "-E", str(src)], "preprocessing displif.h")
    except GoldenUnavailable as exc:
        return exc
    found: dict[str, str] = {}
    for line in out.splitlines():
        match = _MACRO.match(line)  # function-like macros have "(" right after the name
        if match:
            found[match.group(1)] = match.group(2)
    return found


def header_macros() -> dict[str, str]:
    """Object-like ``XENDISPL_*`` macros of displif.h (header guard excluded) → definition."""
    result = _macros()
    if isinstance(result, GoldenUnavailable):
        raise result
    return dict(result)
