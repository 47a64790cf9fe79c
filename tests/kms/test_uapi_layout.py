"""Our ctypes DRM structures, ioctl numbers and constants against libdrm's C headers.

Left side: :mod:`displback.kms.uapi`; right side: ``tests/kms/drm_golden.c`` compiled by gcc at
test time against ``/usr/include/libdrm``. A missing compiler or header fails the tests (with
what to install), it never skips them.
"""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from displback.kms import uapi
from tests.kms.golden import drm_golden

# Reference §14 (x86-64, libdrm 2.4.114), typed in by hand: a third opinion on the numbers.
REFERENCE_TABLE = {
    "GET_CAP": 0xC010640C,
    "SET_CLIENT_CAP": 0x4010640D,
    "SET_MASTER": 0x0000641E,
    "DROP_MASTER": 0x0000641F,
    "GEM_CLOSE": 0x40086409,
    "PRIME_HANDLE_TO_FD": 0xC00C642D,
    "PRIME_FD_TO_HANDLE": 0xC00C642E,
    "MODE_GETRESOURCES": 0xC04064A0,
    "MODE_GETCRTC": 0xC06864A1,
    "MODE_SETCRTC": 0xC06864A2,
    "MODE_GETENCODER": 0xC01464A6,
    "MODE_GETCONNECTOR": 0xC05064A7,
    "MODE_ADDFB2": 0xC06864B8,
    "MODE_RMFB": 0xC00464AF,
    "MODE_PAGE_FLIP": 0xC01864B0,
    "MODE_CREATE_DUMB": 0xC02064B2,
    "MODE_MAP_DUMB": 0xC01064B3,
    "MODE_DESTROY_DUMB": 0xC00464B4,
}


def c_structs() -> dict[str, Any]:
    result: dict[str, Any] = drm_golden()["structs"]
    return result


def test_golden_program_reports_every_structure_we_define() -> None:
    assert set(c_structs()) == set(uapi.STRUCTS)


@pytest.mark.parametrize("name", sorted(uapi.STRUCTS))
def test_structure_size_and_field_offsets_match_c(name: str) -> None:
    cls = uapi.STRUCTS[name]
    c = c_structs()[name]
    assert ctypes.sizeof(cls) == c["size"], "sizeof"
    ours = {
        field: [getattr(cls, field).offset, getattr(cls, field).size] for field, *_ in cls._fields_
    }
    assert ours == c["fields"]


def test_ioctl_numbers_match_c() -> None:
    assert drm_golden()["ioctls"] == uapi.IOCTLS


@pytest.mark.parametrize("name", sorted(REFERENCE_TABLE))
def test_ioctl_number_matches_reference_table(name: str) -> None:
    assert uapi.IOCTLS[name] == REFERENCE_TABLE[name]


def test_ioctl_names_map_back_to_numbers() -> None:
    assert {uapi.IOCTLS[name]: name for name in uapi.IOCTL_NAMES.values()} == uapi.IOCTL_NAMES
    assert len(uapi.IOCTL_NAMES) == len(uapi.IOCTLS)


def test_ioc_rejects_a_size_beyond_fourteen_bits() -> None:
    with pytest.raises(ValueError, match="14 bits"):
        uapi.ioc(uapi.IOC_READ, uapi.DRM_IOCTL_BASE, 0, 1 << 14)


def _ours(name: str) -> int:
    """Our value of the C constant ``name`` (module constant or enum member)."""
    prefixes = {
        "DRM_CAP_": uapi.Cap,
        "DRM_CLIENT_CAP_": uapi.ClientCap,
        "DRM_MODE_OBJECT_": uapi.ObjectType,
        "DRM_MODE_ENCODER_": uapi.EncoderType,
        "DRM_MODE_CONNECTOR_": uapi.ConnectorType,
    }
    statuses = {
        "DRM_MODE_CONNECTED": uapi.ConnectorStatus.CONNECTED,
        "DRM_MODE_DISCONNECTED": uapi.ConnectorStatus.DISCONNECTED,
        "DRM_MODE_UNKNOWNCONNECTION": uapi.ConnectorStatus.UNKNOWN,
    }
    if name in statuses:
        return int(statuses[name])
    if name == "DRM_MODE_CONNECTOR_9PinDIN":
        return int(uapi.ConnectorType.NinePinDIN)
    for prefix, enum_type in prefixes.items():
        if name.startswith(prefix):
            return int(enum_type[name.removeprefix(prefix)])
    return int(getattr(uapi, name))


def test_constants_match_c() -> None:
    c = drm_golden()["constants"]
    assert {name: _ours(name) for name in c} == c


def test_every_enum_member_is_checked_against_c() -> None:
    c = drm_golden()["constants"]
    for prefix, enum_type in (
        ("DRM_CAP_", uapi.Cap),
        ("DRM_CLIENT_CAP_", uapi.ClientCap),
        ("DRM_MODE_OBJECT_", uapi.ObjectType),
        ("DRM_MODE_ENCODER_", uapi.EncoderType),
    ):
        assert {m.name for m in enum_type} == {
            n.removeprefix(prefix) for n in c if n.startswith(prefix)
        }
    connectors = {n for n in c if n.startswith("DRM_MODE_CONNECTOR_")}
    assert len(connectors) == len(uapi.ConnectorType) == len(uapi.CONNECTOR_TYPE_NAMES)


def test_flip_event_is_thirty_two_bytes_as_the_reference_says() -> None:
    assert uapi.EVENT_VBLANK_SIZE == 32
    assert c_structs()["drm_event_vblank"]["size"] == 32


@pytest.mark.parametrize(
    ("ctype", "type_id", "name"),
    [
        (11, 1, "HDMI-A-1"),
        (15, 1, "Virtual-1"),
        (10, 2, "DP-2"),
        (1, 1, "VGA-1"),
        (99, 3, "Type99-3"),
    ],
)
def test_connector_names_follow_the_kernel_spelling(ctype: int, type_id: int, name: str) -> None:
    assert uapi.connector_name(ctype, type_id) == name
