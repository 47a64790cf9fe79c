"""Our ioctl numbers and struct layouts equal those of the kernel's uapi C headers.

A C program is compiled at test time against Debian's ``linux-libc-dev`` headers
(``xen/gntdev.h``, ``xen/evtchn.h``, ``linux/udmabuf.h``) and ``libdrm-dev``'s ``drm.h``;
it prints every ``sizeof``, ``offsetof`` and ioctl number we rely on. A missing compiler
or header is a failure, not a skip: these layouts are what the real platform sends the kernel.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from displback.xen.ioctls import IOCTLS, LAYOUTS

HEADERS = (
    Path("/usr/include/xen/gntdev.h"),
    Path("/usr/include/xen/evtchn.h"),
    Path("/usr/include/linux/udmabuf.h"),
    Path("/usr/include/libdrm/drm.h"),
    Path("/usr/include/libdrm/drm_mode.h"),
)


def _program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "#include <sys/ioctl.h>",
        "#include <linux/types.h>",
        "/* the uapi headers use Xen types they do not define */",
        "typedef uint16_t domid_t;",
        "typedef uint32_t grant_ref_t;",
        "#include <xen/gntdev.h>",
        "#include <xen/evtchn.h>",
        "#include <linux/udmabuf.h>",
        "#include <drm.h>",
        "#include <drm_mode.h>",
        "int main(void) {",
    ]
    for key, layout in LAYOUTS.items():
        lines.append(f'printf("size {key} %zu\\n", sizeof(struct {layout.c_name}));')
        for field in layout.fields:
            lines.append(
                f'printf("offset {key}.{field} %zu\\n", offsetof(struct {layout.c_name}, {field}));'
            )
    for name in IOCTLS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long)({name}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None, "no C compiler: apt-get install build-essential"
    for header in HEADERS:
        assert header.is_file(), f"{header} missing: apt-get install linux-libc-dev libdrm-dev"
    work = tmp_path_factory.mktemp("layout")
    source = work / "layout.c"
    source.write_text(_program())
    binary = work / "layout"
    build = subprocess.run(
        [
            compiler,
            "-std=c11",
            "-Wall",
            "-Werror",
            "-I/usr/include/libdrm",
            "-o",
            str(binary),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        kind, name, value = line.split()
        values[f"{kind} {name}"] = int(value)
    return values


@pytest.mark.parametrize("key", sorted(LAYOUTS))
def test_struct_size_and_offsets_match_the_kernel_header(
    key: str, c_values: dict[str, int]
) -> None:
    layout = LAYOUTS[key]
    assert c_values[f"size {key}"] == layout.size
    for field, offset in layout.fields.items():
        assert c_values[f"offset {key}.{field}"] == offset, field


@pytest.mark.parametrize("name", sorted(IOCTLS))
def test_ioctl_number_matches_the_kernel_header(name: str, c_values: dict[str, int]) -> None:
    assert c_values[f"ioctl {name}"] == IOCTLS[name], f"{name}: {IOCTLS[name]:#x}"


def test_reference_numbers_of_the_gntdev_dmabuf_ioctls() -> None:
    # The numbers written in displif-reference.md §11, independent of any header.
    assert IOCTLS["IOCTL_GNTDEV_MAP_GRANT_REF"] == 0x00184700
    assert IOCTLS["IOCTL_GNTDEV_UNMAP_GRANT_REF"] == 0x00104701
    assert IOCTLS["IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS"] == 0x00144709
    assert IOCTLS["IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED"] == 0x0008470A
    assert IOCTLS["IOCTL_GNTDEV_DMABUF_IMP_TO_REFS"] == 0x0014470B
    assert IOCTLS["IOCTL_GNTDEV_DMABUF_IMP_RELEASE"] == 0x0008470C
    assert IOCTLS["IOCTL_EVTCHN_BIND_INTERDOMAIN"] == 0x00084501
    assert IOCTLS["IOCTL_EVTCHN_RESET"] == 0x00004505
