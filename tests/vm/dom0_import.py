"""Run inside the nested Dom0: can a DRM driver here import a dma-buf of a guest's grants?

``python -m tests.vm.dom0_import DOMID REF`` exports the guest's grant ``REF`` (one page) as a
dma-buf with gntdev (``DMABUF_EXP_FROM_REFS``), then for every ``/dev/dri/card*`` tries what
a zero-copy scanout needs — ``PRIME_FD_TO_HANDLE`` (the driver attaches and maps the
dma-buf) and ``ADDFB2`` of a 32x32 XRGB8888 framebuffer on it (one page; vkms refuses sizes under
20x20) — and also a CPU ``mmap`` of
the dma-buf. It prints one JSON object: ``{"export": ..., "mmap": ..., "cards": {path:
{"driver": ..., "import": ..., "addfb": ...}}}`` with "ok" or the errno of each step. The
arm64 VM tests record it (docs/testing.md: which import fails where).
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import sys

from displback.kms.device import DrmError, open_card
from displback.xen.real import RealPlatform

XRGB8888 = 0x34325258


def _errno(exc: OSError) -> str:
    return f"errno {exc.errno} ({os.strerror(exc.errno or 0)})"


def probe_card(path: str, dmabuf: int) -> dict[str, str]:
    result: dict[str, str] = {}
    dev = open_card(path)
    try:
        result["driver"] = dev.version().name
        try:
            handle = dev.prime_fd_to_handle(dmabuf)
        except DrmError as exc:
            result["import"] = _errno(exc)
            return result
        result["import"] = "ok"
        try:
            fb = dev.add_fb2(32, 32, XRGB8888, [handle], [128], [0])
        except DrmError as exc:
            result["addfb"] = _errno(exc)
        else:
            result["addfb"] = "ok"
            dev.rm_fb(fb)
        dev.gem_close(handle)
    finally:
        dev.close()
    return result


def main(argv: list[str]) -> int:
    domid, ref = int(argv[0]), int(argv[1])
    platform = RealPlatform("/run/xenstored/socket", 0)
    results: dict[str, object] = {}
    device = platform.open_grant_device()
    try:
        try:
            fd = device.dmabuf_export(domid, [ref])
        except OSError as exc:
            results["export"] = _errno(exc)
            print(json.dumps(results))
            return 0
        results["export"] = "ok"
        try:
            mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ).close()
            results["mmap"] = "ok"
        except OSError as exc:
            results["mmap"] = _errno(exc)
        cards: dict[str, dict[str, str]] = {}
        for path in sorted(glob.glob("/dev/dri/card*")):
            try:
                cards[path] = probe_card(path, fd)
            except OSError as exc:
                cards[path] = {"open": _errno(exc)}
        results["cards"] = cards
        os.close(fd)
    finally:
        device.close()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
