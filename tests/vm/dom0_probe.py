"""Run inside the nested Dom0: try ``DMABUF_EXP_FROM_REFS`` on one of a guest's grants.

``python -m tests.vm.dom0_probe DOMID REF`` prints one JSON object: for each gntdev dma-buf
flag set, whether exporting the grant worked or the errno it failed with, and whether a plain
``MAP_GRANT_REF`` + ``mmap`` of the same grant works. The VM tests record it to explain a
zero-copy refusal.
"""

from __future__ import annotations

import json
import os
import sys

from displback.xen.interfaces import GNTDEV_DMA_FLAG_COHERENT, GNTDEV_DMA_FLAG_WC
from displback.xen.real import RealPlatform


def main(argv: list[str]) -> int:
    domid, ref = int(argv[0]), int(argv[1])
    platform = RealPlatform("/run/xenstored/socket", 0)
    results: dict[str, object] = {"probe": platform.dmabuf_support.reason}
    device = platform.open_grant_device()
    try:
        for name, flags in (
            ("none", 0),
            ("wc", GNTDEV_DMA_FLAG_WC),
            ("coherent", GNTDEV_DMA_FLAG_COHERENT),
        ):
            try:
                fd = device.dmabuf_export(domid, [ref], flags=flags)
            except OSError as exc:
                results[f"export_{name}"] = f"errno {exc.errno} ({os.strerror(exc.errno or 0)})"
            else:
                size = os.lseek(fd, 0, os.SEEK_END)
                os.close(fd)
                results[f"export_{name}"] = f"ok, {size} bytes"
        try:
            with device.map_grants(domid, [ref], writable=True):
                results["map"] = "ok"
        except OSError as exc:
            results["map"] = f"errno {exc.errno}"
    finally:
        device.close()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
