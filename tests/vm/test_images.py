"""The VM harness's own pieces that need no VM: cpio archives and the kernel cache key."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.vm import initramfs, kernel


def test_newc_archive_lists_and_extracts_with_cpio(tmp_path: Path) -> None:
    archive = initramfs._newc(
        [initramfs._dir("bin"), initramfs._file("bin/tool", b"#!/bin/sh\necho hi\n")]
    )
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == ["bin", "bin/tool"]
    subprocess.run(
        ["cpio", "-id", "--quiet"], input=archive, cwd=tmp_path, check=True, capture_output=True
    )
    tool = tmp_path / "bin" / "tool"
    assert tool.read_bytes() == b"#!/bin/sh\necho hi\n"
    assert tool.stat().st_mode & 0o777 == 0o755


def test_kernel_cache_key_changes_with_fragment_and_source_version() -> None:
    base = kernel.cache_key(b"CONFIG_XEN=y\n", "6.1.1-1")
    assert kernel.cache_key(b"CONFIG_XEN=y\n", "6.1.1-1") == base
    assert kernel.cache_key(b"CONFIG_XEN=y\nCONFIG_DRM=y\n", "6.1.1-1") != base
    assert kernel.cache_key(b"CONFIG_XEN=y\n", "6.1.1-2") != base


def test_fragment_options_are_parsed_without_comments() -> None:
    options = kernel.wanted_options('# comment\n\nCONFIG_XEN=y\nCONFIG_X="a=b"\n')
    assert options == {"CONFIG_XEN": "y", "CONFIG_X": '"a=b"'}


def test_committed_fragment_has_what_the_backend_needs() -> None:
    options = kernel.wanted_options(kernel.FRAGMENT.read_text())
    for name in (
        "XEN_GNTDEV_DMABUF",
        "XEN_GRANT_DMA_ALLOC",
        "DRM_XEN_FRONTEND",
        "UDMABUF",
        "XEN_DEV_EVTCHN",
        "XEN_DOM0",
        "9P_FS",
    ):
        assert options[f"CONFIG_{name}"] == "y", name
