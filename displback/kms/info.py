"""``displback kms-info``: what the DRM cards offer, for an admin writing the output config.

Lists each card (driver, capabilities: dumb buffers, PRIME import/export, atomic, modifiers),
its connectors (kernel name such as ``HDMI-A-1`` — the name the KMS output config uses —
status, modes with the preferred one marked), encoders, CRTCs (what each scans out now) and
planes (type and pixel formats). Reading needs no DRM master, so it works next to a running
compositor; connectors are probed, which can take a moment per monitor (EDID).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from displback.kms import uapi
from displback.kms.cards import card_paths
from displback.kms.device import DrmDevice, DrmError, open_card
from displback.kms.uapi import ClientCap, ObjectType, PlaneType

__all__ = ["add_kms_info_parser", "describe_card", "format_card", "kms_info", "run_kms_info"]


def _fourcc_name(code: int) -> str:
    chars = bytes((code >> s) & 0xFF for s in (0, 8, 16, 24))
    text = chars.decode("ascii", "replace")
    return text if text.isprintable() else f"0x{code:08x}"


def _enum_name(enum_type: type[Any], value: int) -> str:
    try:
        return str(enum_type(value).name)
    except ValueError:
        return str(value)


def describe_card(dev: DrmDevice) -> dict[str, Any]:
    """Everything kms-info shows about one card, as JSON-ready values."""
    version = dev.version()
    prime = dev.has_cap(uapi.Cap.PRIME)
    atomic = True
    try:
        dev.set_client_cap(ClientCap.UNIVERSAL_PLANES, 1)
        dev.set_client_cap(ClientCap.ATOMIC, 1)
    except DrmError:
        atomic = False
    res = dev.resources()
    connectors = []
    for cid in res.connectors:
        conn = dev.connector(cid, probe=True)
        connectors.append(
            {
                "id": cid,
                "name": conn.name,
                "status": conn.status.name.lower(),
                "encoder": conn.encoder_id,
                "size_mm": [conn.mm_width, conn.mm_height],
                "modes": [
                    {
                        "name": f"{m.width}x{m.height}",
                        "refresh_hz": round(m.refresh_hz, 2),
                        "preferred": m.preferred,
                    }
                    for m in conn.modes
                ],
            }
        )
    encoders = []
    for eid in res.encoders:
        enc = dev.encoder(eid)
        encoders.append(
            {
                "id": eid,
                "type": _enum_name(uapi.EncoderType, enc.type),
                "crtc": enc.crtc_id,
                "possible_crtcs": [
                    c for i, c in enumerate(res.crtcs) if enc.possible_crtcs >> i & 1
                ],
            }
        )
    crtcs = []
    for crtc_id in res.crtcs:
        crtc = dev.crtc(crtc_id)
        crtcs.append(
            {
                "id": crtc_id,
                "fb": crtc.fb_id,
                "position": [crtc.x, crtc.y],
                "mode": None if crtc.mode is None else str(crtc.mode),
            }
        )
    planes = []
    for pid in dev.plane_ids():
        plane = dev.plane(pid)
        kind = dev.object_properties(pid, ObjectType.PLANE).get("type")
        planes.append(
            {
                "id": pid,
                "type": "unknown" if kind is None else _enum_name(PlaneType, kind.value).lower(),
                "crtc": plane.crtc_id,
                "fb": plane.fb_id,
                "possible_crtcs": [
                    c for i, c in enumerate(res.crtcs) if plane.possible_crtcs >> i & 1
                ],
                "formats": [_fourcc_name(f) for f in plane.formats],
            }
        )
    return {
        "path": dev.path,
        "driver": version.name,
        "description": version.desc,
        "version": f"{version.major}.{version.minor}.{version.patchlevel}",
        "caps": {
            "dumb_buffer": bool(dev.has_cap(uapi.Cap.DUMB_BUFFER)),
            "prime_import": bool(prime & uapi.DRM_PRIME_CAP_IMPORT),
            "prime_export": bool(prime & uapi.DRM_PRIME_CAP_EXPORT),
            "atomic": atomic,
            "addfb2_modifiers": bool(dev.has_cap(uapi.Cap.ADDFB2_MODIFIERS)),
        },
        "size_limits": [res.min_width, res.min_height, res.max_width, res.max_height],
        "connectors": connectors,
        "encoders": encoders,
        "crtcs": crtcs,
        "planes": planes,
    }


def format_card(card: dict[str, Any]) -> str:
    """The human-readable listing of one :func:`describe_card` result."""
    caps = card["caps"]
    yes = [name for name, on in caps.items() if on]
    no = [name for name, on in caps.items() if not on]
    lines = [
        f"{card['path']}: {card['driver']} ({card['description']}) {card['version']}",
        f"  capabilities: {', '.join(yes) or '-'}" + (f"; lacks {', '.join(no)}" if no else ""),
        "  framebuffer size {}x{} .. {}x{}".format(*card["size_limits"]),
        "  connectors:",
    ]
    for conn in card["connectors"]:
        lines.append(f"    {conn['name']} (id {conn['id']}): {conn['status']}")
        modes = [
            f"{m['name']}@{m['refresh_hz']:g}{'*' if m['preferred'] else ''}" for m in conn["modes"]
        ]
        lines.append(f"      modes: {' '.join(modes) if modes else '(none)'}")
    lines.append("  encoders:")
    for enc in card["encoders"]:
        crtcs = ",".join(map(str, enc["possible_crtcs"]))
        lines.append(f"    {enc['id']}: {enc['type']}, CRTC {enc['crtc']}, can use CRTCs {crtcs}")
    lines.append("  CRTCs:")
    for crtc in card["crtcs"]:
        state = f"FB {crtc['fb']} at {crtc['mode']}" if crtc["mode"] else "off"
        lines.append(f"    {crtc['id']}: {state}")
    lines.append("  planes:")
    for plane in card["planes"]:
        crtcs = ",".join(map(str, plane["possible_crtcs"]))
        formats = " ".join(plane["formats"])
        lines.append(f"    {plane['id']}: {plane['type']}, CRTCs {crtcs}, formats {formats}")
    return "\n".join(lines)


def kms_info(
    paths: Sequence[str],
    *,
    as_json: bool = False,
    out: TextIO | None = None,
    open_fn: Callable[[str], DrmDevice] = open_card,
) -> int:
    """Print every card of ``paths``; exit status 1 if none could be read."""
    out = out if out is not None else sys.stdout
    cards: list[dict[str, Any]] = []
    errors: list[str] = []
    for path in paths:
        try:
            dev = open_fn(path)
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")
            continue
        try:
            cards.append(describe_card(dev))
        except DrmError as exc:
            errors.append(f"{path}: {exc}")
        finally:
            dev.close()
    if as_json:
        json.dump({"cards": cards, "errors": errors}, out, indent=2)
        out.write("\n")
    else:
        for card in cards:
            out.write(format_card(card) + "\n")
        for error in errors:
            out.write(f"error: {error}\n")
        if not paths:
            out.write("no DRM cards (/dev/dri/card*)\n")
    return 0 if cards else 1


def add_kms_info_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``kms-info`` on an argparse ``add_subparsers()`` result."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "kms-info",
        help="list DRM cards, connectors, modes, CRTCs and planes",
        description="Show what each DRM card offers: connector names and modes for the KMS "
        "output configuration, capabilities (PRIME import decides zero-copy), CRTCs, planes.",
    )
    parser.add_argument(
        "--card",
        action="append",
        default=None,
        metavar="PATH",
        help="a card node such as /dev/dri/card0 (repeatable; default: every card)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run_kms_info)
    return parser


def run_kms_info(args: argparse.Namespace) -> int:
    """The ``kms-info`` handler: ``args.card`` (list or None) and ``args.json``."""
    paths = args.card if args.card else card_paths()
    return kms_info(paths, as_json=args.json)
