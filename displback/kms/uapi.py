"""The Linux DRM/KMS kernel interface as ctypes: structures, ioctl numbers and constants.

Everything here mirrors ``drm.h``/``drm_mode.h`` (x86-64, libdrm 2.4.114, reference §14) and
is checked against those headers by ``tests/kms/test_uapi_layout.py``, which compiles a C
program at test time. Structure and field names are the kernel's, so this module, the
headers and the reference read alike. Pointer fields the kernel fills through (``*_ptr``) are
``__u64`` addresses of ctypes arrays the caller keeps alive across the ioctl.

Written for displback from the public UAPI headers; nothing is copied from libdrm or Linux.
"""

from __future__ import annotations

import ctypes
import enum
from ctypes import c_char, c_int, c_int32, c_size_t, c_uint16, c_uint32, c_uint64, c_void_p

__all__ = [
    "CONNECTOR_TYPE_NAMES",
    "EVENT_VBLANK_SIZE",
    "IOCTL_NAMES",
    "IOCTLS",
    "STRUCTS",
    "Cap",
    "ClientCap",
    "ConnectorStatus",
    "ConnectorType",
    "EncoderType",
    "ObjectType",
    "PlaneType",
    "connector_name",
    "ioc",
]

# ---- _IOC: direction | size << 16 | type << 8 | nr (asm-generic/ioctl.h) ----------------

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
DRM_IOCTL_BASE = ord("d")


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """The ioctl request number ``_IOC(direction, type_, nr, size)``."""
    if not 0 <= size < 1 << 14:
        raise ValueError(f"ioctl argument size {size} does not fit 14 bits")
    return (
        direction << _IOC_DIRSHIFT
        | size << _IOC_SIZESHIFT
        | type_ << _IOC_TYPESHIFT
        | nr << _IOC_NRSHIFT
    )


def _io(nr: int) -> int:
    return ioc(IOC_NONE, DRM_IOCTL_BASE, nr, 0)


def _iow(nr: int, struct: type[ctypes.Structure] | type[c_uint32]) -> int:
    return ioc(IOC_WRITE, DRM_IOCTL_BASE, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type[ctypes.Structure] | type[c_uint32]) -> int:
    return ioc(IOC_READ | IOC_WRITE, DRM_IOCTL_BASE, nr, ctypes.sizeof(struct))


# ---- structures (drm.h) -------------------------------------------------------------------

DRM_DISPLAY_MODE_LEN = 32
DRM_PROP_NAME_LEN = 32


class drm_version(ctypes.Structure):
    _fields_ = [
        ("version_major", c_int),
        ("version_minor", c_int),
        ("version_patchlevel", c_int),
        ("name_len", c_size_t),
        ("name", c_void_p),
        ("date_len", c_size_t),
        ("date", c_void_p),
        ("desc_len", c_size_t),
        ("desc", c_void_p),
    ]


class drm_get_cap(ctypes.Structure):
    _fields_ = [("capability", c_uint64), ("value", c_uint64)]


class drm_set_client_cap(ctypes.Structure):
    _fields_ = [("capability", c_uint64), ("value", c_uint64)]


class drm_prime_handle(ctypes.Structure):
    _fields_ = [("handle", c_uint32), ("flags", c_uint32), ("fd", c_int32)]


class drm_gem_close(ctypes.Structure):
    _fields_ = [("handle", c_uint32), ("pad", c_uint32)]


class drm_event(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("length", c_uint32)]


class drm_event_vblank(ctypes.Structure):
    _fields_ = [
        ("base", drm_event),
        ("user_data", c_uint64),
        ("tv_sec", c_uint32),
        ("tv_usec", c_uint32),
        ("sequence", c_uint32),
        ("crtc_id", c_uint32),
    ]


# ---- structures (drm_mode.h) --------------------------------------------------------------


class drm_mode_modeinfo(ctypes.Structure):
    _fields_ = [
        ("clock", c_uint32),
        ("hdisplay", c_uint16),
        ("hsync_start", c_uint16),
        ("hsync_end", c_uint16),
        ("htotal", c_uint16),
        ("hskew", c_uint16),
        ("vdisplay", c_uint16),
        ("vsync_start", c_uint16),
        ("vsync_end", c_uint16),
        ("vtotal", c_uint16),
        ("vscan", c_uint16),
        ("vrefresh", c_uint32),
        ("flags", c_uint32),
        ("type", c_uint32),
        ("name", c_char * DRM_DISPLAY_MODE_LEN),
    ]


class drm_mode_card_res(ctypes.Structure):
    _fields_ = [
        ("fb_id_ptr", c_uint64),
        ("crtc_id_ptr", c_uint64),
        ("connector_id_ptr", c_uint64),
        ("encoder_id_ptr", c_uint64),
        ("count_fbs", c_uint32),
        ("count_crtcs", c_uint32),
        ("count_connectors", c_uint32),
        ("count_encoders", c_uint32),
        ("min_width", c_uint32),
        ("max_width", c_uint32),
        ("min_height", c_uint32),
        ("max_height", c_uint32),
    ]


class drm_mode_crtc(ctypes.Structure):
    _fields_ = [
        ("set_connectors_ptr", c_uint64),
        ("count_connectors", c_uint32),
        ("crtc_id", c_uint32),
        ("fb_id", c_uint32),
        ("x", c_uint32),
        ("y", c_uint32),
        ("gamma_size", c_uint32),
        ("mode_valid", c_uint32),
        ("mode", drm_mode_modeinfo),
    ]


class drm_mode_get_encoder(ctypes.Structure):
    _fields_ = [
        ("encoder_id", c_uint32),
        ("encoder_type", c_uint32),
        ("crtc_id", c_uint32),
        ("possible_crtcs", c_uint32),
        ("possible_clones", c_uint32),
    ]


class drm_mode_get_connector(ctypes.Structure):
    _fields_ = [
        ("encoders_ptr", c_uint64),
        ("modes_ptr", c_uint64),
        ("props_ptr", c_uint64),
        ("prop_values_ptr", c_uint64),
        ("count_modes", c_uint32),
        ("count_props", c_uint32),
        ("count_encoders", c_uint32),
        ("encoder_id", c_uint32),
        ("connector_id", c_uint32),
        ("connector_type", c_uint32),
        ("connector_type_id", c_uint32),
        ("connection", c_uint32),
        ("mm_width", c_uint32),
        ("mm_height", c_uint32),
        ("subpixel", c_uint32),
        ("pad", c_uint32),
    ]


class drm_mode_get_plane_res(ctypes.Structure):
    _fields_ = [("plane_id_ptr", c_uint64), ("count_planes", c_uint32)]


class drm_mode_get_plane(ctypes.Structure):
    _fields_ = [
        ("plane_id", c_uint32),
        ("crtc_id", c_uint32),
        ("fb_id", c_uint32),
        ("possible_crtcs", c_uint32),
        ("gamma_size", c_uint32),
        ("count_format_types", c_uint32),
        ("format_type_ptr", c_uint64),
    ]


class drm_mode_obj_get_properties(ctypes.Structure):
    _fields_ = [
        ("props_ptr", c_uint64),
        ("prop_values_ptr", c_uint64),
        ("count_props", c_uint32),
        ("obj_id", c_uint32),
        ("obj_type", c_uint32),
    ]


class drm_mode_get_property(ctypes.Structure):
    _fields_ = [
        ("values_ptr", c_uint64),
        ("enum_blob_ptr", c_uint64),
        ("prop_id", c_uint32),
        ("flags", c_uint32),
        ("name", c_char * DRM_PROP_NAME_LEN),
        ("count_values", c_uint32),
        ("count_enum_blobs", c_uint32),
    ]


class drm_mode_property_enum(ctypes.Structure):
    _fields_ = [("value", c_uint64), ("name", c_char * DRM_PROP_NAME_LEN)]


class drm_mode_create_dumb(ctypes.Structure):
    _fields_ = [
        ("height", c_uint32),
        ("width", c_uint32),
        ("bpp", c_uint32),
        ("flags", c_uint32),
        ("handle", c_uint32),
        ("pitch", c_uint32),
        ("size", c_uint64),
    ]


class drm_mode_map_dumb(ctypes.Structure):
    _fields_ = [("handle", c_uint32), ("pad", c_uint32), ("offset", c_uint64)]


class drm_mode_destroy_dumb(ctypes.Structure):
    _fields_ = [("handle", c_uint32)]


class drm_mode_fb_cmd2(ctypes.Structure):
    _fields_ = [
        ("fb_id", c_uint32),
        ("width", c_uint32),
        ("height", c_uint32),
        ("pixel_format", c_uint32),
        ("flags", c_uint32),
        ("handles", c_uint32 * 4),
        ("pitches", c_uint32 * 4),
        ("offsets", c_uint32 * 4),
        ("modifier", c_uint64 * 4),
    ]


class drm_mode_crtc_page_flip(ctypes.Structure):
    _fields_ = [
        ("crtc_id", c_uint32),
        ("fb_id", c_uint32),
        ("flags", c_uint32),
        ("reserved", c_uint32),
        ("user_data", c_uint64),
    ]


class drm_mode_atomic(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("count_objs", c_uint32),
        ("objs_ptr", c_uint64),
        ("count_props_ptr", c_uint64),
        ("props_ptr", c_uint64),
        ("prop_values_ptr", c_uint64),
        ("reserved", c_uint64),
        ("user_data", c_uint64),
    ]


class drm_mode_create_blob(ctypes.Structure):
    _fields_ = [("data", c_uint64), ("length", c_uint32), ("blob_id", c_uint32)]


class drm_mode_destroy_blob(ctypes.Structure):
    _fields_ = [("blob_id", c_uint32)]


STRUCTS: dict[str, type[ctypes.Structure]] = {
    cls.__name__: cls
    for cls in (
        drm_version,
        drm_get_cap,
        drm_set_client_cap,
        drm_prime_handle,
        drm_gem_close,
        drm_event,
        drm_event_vblank,
        drm_mode_modeinfo,
        drm_mode_card_res,
        drm_mode_crtc,
        drm_mode_get_encoder,
        drm_mode_get_connector,
        drm_mode_get_plane_res,
        drm_mode_get_plane,
        drm_mode_obj_get_properties,
        drm_mode_get_property,
        drm_mode_property_enum,
        drm_mode_create_dumb,
        drm_mode_map_dumb,
        drm_mode_destroy_dumb,
        drm_mode_fb_cmd2,
        drm_mode_crtc_page_flip,
        drm_mode_atomic,
        drm_mode_create_blob,
        drm_mode_destroy_blob,
    )
}
"""Every structure by its C name (the layout test walks this)."""

# ---- ioctl numbers (drm.h: DRM_IO/DRM_IOW/DRM_IOWR with type 'd') -------------------------

DRM_IOCTL_VERSION = _iowr(0x00, drm_version)
DRM_IOCTL_GEM_CLOSE = _iow(0x09, drm_gem_close)
DRM_IOCTL_GET_CAP = _iowr(0x0C, drm_get_cap)
DRM_IOCTL_SET_CLIENT_CAP = _iow(0x0D, drm_set_client_cap)
DRM_IOCTL_SET_MASTER = _io(0x1E)
DRM_IOCTL_DROP_MASTER = _io(0x1F)
DRM_IOCTL_PRIME_HANDLE_TO_FD = _iowr(0x2D, drm_prime_handle)
DRM_IOCTL_PRIME_FD_TO_HANDLE = _iowr(0x2E, drm_prime_handle)
DRM_IOCTL_MODE_GETRESOURCES = _iowr(0xA0, drm_mode_card_res)
DRM_IOCTL_MODE_GETCRTC = _iowr(0xA1, drm_mode_crtc)
DRM_IOCTL_MODE_SETCRTC = _iowr(0xA2, drm_mode_crtc)
DRM_IOCTL_MODE_GETENCODER = _iowr(0xA6, drm_mode_get_encoder)
DRM_IOCTL_MODE_GETCONNECTOR = _iowr(0xA7, drm_mode_get_connector)
DRM_IOCTL_MODE_GETPROPERTY = _iowr(0xAA, drm_mode_get_property)
DRM_IOCTL_MODE_RMFB = _iowr(0xAF, c_uint32)
DRM_IOCTL_MODE_PAGE_FLIP = _iowr(0xB0, drm_mode_crtc_page_flip)
DRM_IOCTL_MODE_CREATE_DUMB = _iowr(0xB2, drm_mode_create_dumb)
DRM_IOCTL_MODE_MAP_DUMB = _iowr(0xB3, drm_mode_map_dumb)
DRM_IOCTL_MODE_DESTROY_DUMB = _iowr(0xB4, drm_mode_destroy_dumb)
DRM_IOCTL_MODE_GETPLANERESOURCES = _iowr(0xB5, drm_mode_get_plane_res)
DRM_IOCTL_MODE_GETPLANE = _iowr(0xB6, drm_mode_get_plane)
DRM_IOCTL_MODE_ADDFB2 = _iowr(0xB8, drm_mode_fb_cmd2)
DRM_IOCTL_MODE_OBJ_GETPROPERTIES = _iowr(0xB9, drm_mode_obj_get_properties)
DRM_IOCTL_MODE_ATOMIC = _iowr(0xBC, drm_mode_atomic)
DRM_IOCTL_MODE_CREATEPROPBLOB = _iowr(0xBD, drm_mode_create_blob)
DRM_IOCTL_MODE_DESTROYPROPBLOB = _iowr(0xBE, drm_mode_destroy_blob)

IOCTLS: dict[str, int] = {
    name.removeprefix("DRM_IOCTL_"): value
    for name, value in globals().items()
    if name.startswith("DRM_IOCTL_") and name != "DRM_IOCTL_BASE"
}
"""Request number by short name (``"MODE_ADDFB2"``); error messages and tests use these."""

IOCTL_NAMES: dict[int, str] = {value: name for name, value in IOCTLS.items()}
"""Short name by request number."""

# ---- capabilities and flags ---------------------------------------------------------------


class Cap(enum.IntEnum):
    """``DRM_CAP_*``: what GET_CAP reports about the driver."""

    DUMB_BUFFER = 0x1
    VBLANK_HIGH_CRTC = 0x2
    DUMB_PREFERRED_DEPTH = 0x3
    DUMB_PREFER_SHADOW = 0x4
    PRIME = 0x5
    TIMESTAMP_MONOTONIC = 0x6
    ASYNC_PAGE_FLIP = 0x7
    CURSOR_WIDTH = 0x8
    CURSOR_HEIGHT = 0x9
    ADDFB2_MODIFIERS = 0x10
    PAGE_FLIP_TARGET = 0x11
    CRTC_IN_VBLANK_EVENT = 0x12


class ClientCap(enum.IntEnum):
    """``DRM_CLIENT_CAP_*``: what a client opts into with SET_CLIENT_CAP."""

    STEREO_3D = 1
    UNIVERSAL_PLANES = 2
    ATOMIC = 3
    ASPECT_RATIO = 4
    WRITEBACK_CONNECTORS = 5


DRM_CAP_DUMB_BUFFER = Cap.DUMB_BUFFER
DRM_CAP_PRIME = Cap.PRIME
DRM_CAP_ADDFB2_MODIFIERS = Cap.ADDFB2_MODIFIERS
DRM_CLIENT_CAP_UNIVERSAL_PLANES = ClientCap.UNIVERSAL_PLANES
DRM_CLIENT_CAP_ATOMIC = ClientCap.ATOMIC

DRM_PRIME_CAP_IMPORT = 0x1
DRM_PRIME_CAP_EXPORT = 0x2
DRM_CLOEXEC = 0o2000000  # O_CLOEXEC on x86-64
DRM_RDWR = 0o2  # O_RDWR

DRM_MODE_PAGE_FLIP_EVENT = 0x01
DRM_MODE_PAGE_FLIP_ASYNC = 0x02
DRM_MODE_ATOMIC_TEST_ONLY = 0x0100
DRM_MODE_ATOMIC_NONBLOCK = 0x0200
DRM_MODE_ATOMIC_ALLOW_MODESET = 0x0400
DRM_MODE_FB_MODIFIERS = 1 << 1

DRM_EVENT_VBLANK = 0x01
DRM_EVENT_FLIP_COMPLETE = 0x02
EVENT_VBLANK_SIZE = ctypes.sizeof(drm_event_vblank)

DRM_MODE_TYPE_PREFERRED = 1 << 3
DRM_MODE_TYPE_DRIVER = 1 << 6
DRM_MODE_FLAG_INTERLACE = 1 << 4
DRM_MODE_FLAG_DBLSCAN = 1 << 5

DRM_MODE_PROP_RANGE = 1 << 1
DRM_MODE_PROP_IMMUTABLE = 1 << 2
DRM_MODE_PROP_ENUM = 1 << 3
DRM_MODE_PROP_BLOB = 1 << 4
DRM_MODE_PROP_BITMASK = 1 << 5
DRM_MODE_PROP_EXTENDED_TYPE = 0x0000FFC0
DRM_MODE_PROP_OBJECT = 1 << 6
DRM_MODE_PROP_SIGNED_RANGE = 2 << 6
DRM_MODE_PROP_ATOMIC = 0x80000000

DRM_FORMAT_MOD_LINEAR = 0


class ObjectType(enum.IntEnum):
    """``DRM_MODE_OBJECT_*``: the kind of a KMS object (OBJ_GETPROPERTIES)."""

    CRTC = 0xCCCCCCCC
    CONNECTOR = 0xC0C0C0C0
    ENCODER = 0xE0E0E0E0
    MODE = 0xDEDEDEDE
    PROPERTY = 0xB0B0B0B0
    FB = 0xFBFBFBFB
    BLOB = 0xBBBBBBBB
    PLANE = 0xEEEEEEEE
    ANY = 0


class ConnectorStatus(enum.IntEnum):
    """``drm_mode_get_connector.connection`` (libdrm's ``drmModeConnection``)."""

    CONNECTED = 1
    DISCONNECTED = 2
    UNKNOWN = 3


class PlaneType(enum.IntEnum):
    """Values of a plane's immutable ``type`` enum property."""

    OVERLAY = 0
    PRIMARY = 1
    CURSOR = 2


class EncoderType(enum.IntEnum):
    """``DRM_MODE_ENCODER_*``."""

    NONE = 0
    DAC = 1
    TMDS = 2
    LVDS = 3
    TVDAC = 4
    VIRTUAL = 5
    DSI = 6
    DPMST = 7
    DPI = 8


class ConnectorType(enum.IntEnum):
    """``DRM_MODE_CONNECTOR_*``."""

    Unknown = 0
    VGA = 1
    DVII = 2
    DVID = 3
    DVIA = 4
    Composite = 5
    SVIDEO = 6
    LVDS = 7
    Component = 8
    NinePinDIN = 9
    DisplayPort = 10
    HDMIA = 11
    HDMIB = 12
    TV = 13
    eDP = 14
    VIRTUAL = 15
    DSI = 16
    DPI = 17
    WRITEBACK = 18
    SPI = 19
    USB = 20


CONNECTOR_TYPE_NAMES: dict[int, str] = {
    ConnectorType.Unknown: "Unknown",
    ConnectorType.VGA: "VGA",
    ConnectorType.DVII: "DVI-I",
    ConnectorType.DVID: "DVI-D",
    ConnectorType.DVIA: "DVI-A",
    ConnectorType.Composite: "Composite",
    ConnectorType.SVIDEO: "SVIDEO",
    ConnectorType.LVDS: "LVDS",
    ConnectorType.Component: "Component",
    ConnectorType.NinePinDIN: "DIN",
    ConnectorType.DisplayPort: "DP",
    ConnectorType.HDMIA: "HDMI-A",
    ConnectorType.HDMIB: "HDMI-B",
    ConnectorType.TV: "TV",
    ConnectorType.eDP: "eDP",
    ConnectorType.VIRTUAL: "Virtual",
    ConnectorType.DSI: "DSI",
    ConnectorType.DPI: "DPI",
    ConnectorType.WRITEBACK: "Writeback",
    ConnectorType.SPI: "SPI",
    ConnectorType.USB: "USB",
}
"""The names the kernel gives connector types (as in sysfs ``card0-HDMI-A-1``, xrandr)."""


def connector_name(connector_type: int, connector_type_id: int) -> str:
    """``HDMI-A-1``-style name of a connector, as the kernel and compositors spell it."""
    kind = CONNECTOR_TYPE_NAMES.get(connector_type, f"Type{connector_type}")
    return f"{kind}-{connector_type_id}"
