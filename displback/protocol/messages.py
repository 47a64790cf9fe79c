"""The displif v2 packets (requests, response, PG_FLIP event) as immutable values with exact
64-byte layouts, so the rest of displback never touches a byte offset.

Theory of operation
-------------------
Every packet is 64 bytes, little-endian, naturally aligned (reference §4–§6). Each class below
is declared by a *layout*: an ordered list of ``(field name, struct code)`` pairs from which one
precompiled :class:`struct.Struct` (padded with zero bytes to 64), the per-field byte offsets and
sizes (``FIELD_OFFSETS``, ``FIELD_SIZES``) and the value range of every field are all derived.
The golden-vector tests compare those derived offsets with ``offsetof`` from Xen's own C header,
so the tables here are checked code, not copied numbers.

* Construction checks every field against its C type (u8/u16/u32/u64/s32) and raises
  :class:`ProtocolError`; a constructed packet therefore always packs, and ``pack`` never raises.
* ``pack()`` returns a fresh 64-byte string built from zeroes; ``pack_into(buffer, offset)``
  writes all 64 bytes (reserved ones as zero) into a ring slot, so no stale byte leaks.
* ``parse(data)`` copies the input once (guest memory is hostile: validate the copy, never the
  shared page) and raises nothing but :class:`ProtocolError`, whatever the bytes are. Reserved
  bytes are ignored, never rejected (old frontends may leave them dirty).
* Semantic checks that need no connection state live in each request's ``validate()``; checks
  that need state (cookie tables, quotas, ``be-alloc``) belong to the backend.

A request the backend cannot decode must still be answered with its ``id`` and ``operation``
echoed (the Linux frontend matches on both): :meth:`RequestHeader.parse` reads just those, and
:meth:`Response.error` builds the answer from a header or a decoded request alike.
"""

from __future__ import annotations

import mmap
import operator
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Protocol, Self, TypeAlias

from displback.protocol.constants import (
    DBUF_FLG_REQ_ALLOC,
    EDID_MAX_SIZE,
    EINVAL,
    PACKET_SIZE,
    PAGE_SIZE,
    EventType,
    Op,
    PixelFormat,
    pages_for,
    pitch_for,
)
from displback.protocol.errors import ProtocolError

__all__ = [
    "Answerable",
    "BytesLike",
    "DbufCreateReq",
    "DbufDestroyReq",
    "Event",
    "FbAttachReq",
    "FbDetachReq",
    "GetEdidReq",
    "PgFlipEvent",
    "PgFlipReq",
    "REQUEST_TYPES",
    "Request",
    "RequestHeader",
    "Response",
    "SetConfigReq",
    "parse_event",
    "parse_request",
]

BytesLike: TypeAlias = bytes | bytearray | memoryview
"""Anything :func:`memoryview` accepts; ``parse`` copies it once before looking at it."""

# Value range of each struct code we use (the C type it stands for).
_RANGES: Mapping[str, tuple[int, int]] = {
    "B": (0, 0xFF),
    "H": (0, 0xFFFF),
    "I": (0, 0xFFFF_FFFF),
    "Q": (0, 0xFFFF_FFFF_FFFF_FFFF),
    "i": (-(2**31), 2**31 - 1),
}


@dataclass(frozen=True, slots=True)
class _Layout:
    """A 64-byte packet layout derived from ``(name, code)`` pairs; ``None`` names padding."""

    struct: struct.Struct
    names: tuple[str, ...]
    offsets: Mapping[str, int]
    sizes: Mapping[str, int]
    ranges: Mapping[str, tuple[int, int]]


def _layout(*fields: tuple[str | None, str]) -> _Layout:
    fmt = "<"
    offset = 0
    names: list[str] = []
    offsets: dict[str, int] = {}
    sizes: dict[str, int] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for name, code in fields:
        size = struct.calcsize("<" + code)
        if name is not None:
            # Natural alignment, as the C compiler lays the struct out: a misaligned entry
            # here would be a layout bug, not something to pad silently.
            assert offset % size == 0, (name, offset)
            names.append(name)
            offsets[name] = offset
            sizes[name] = size
            ranges[name] = _RANGES[code]
        fmt += code
        offset += size
    assert offset <= PACKET_SIZE, fmt
    if offset < PACKET_SIZE:
        fmt += f"{PACKET_SIZE - offset}x"
    compiled = struct.Struct(fmt)
    assert compiled.size == PACKET_SIZE
    return _Layout(
        struct=compiled,
        names=tuple(names),
        offsets=MappingProxyType(offsets),
        sizes=MappingProxyType(sizes),
        ranges=MappingProxyType(ranges),
    )


def _request_layout(*payload: tuple[str | None, str]) -> _Layout:
    # Common request header (reference §4.0): id u16, operation u8, 5 reserved bytes.
    return _layout(("id", "H"), ("operation", "B"), (None, "5x"), *payload)


def _copy_packet(data: BytesLike, what: str) -> bytes:
    """Copy ``data`` out of (possibly shared) memory once and check it is one whole packet."""
    raw = memoryview(data).tobytes()
    if len(raw) != PACKET_SIZE:
        raise ProtocolError(
            f"{what}: expected {PACKET_SIZE} bytes, got {len(raw)}", what="length", value=len(raw)
        )
    return raw


class _Packet:
    """Shared machinery: range checks at construction, pack, pack_into, layout metadata."""

    __slots__ = ()

    _LAYOUT: ClassVar[_Layout]
    FIELD_OFFSETS: ClassVar[Mapping[str, int]]
    """Byte offset of every named field from the start of the 64-byte packet."""
    FIELD_SIZES: ClassVar[Mapping[str, int]]
    """Size in bytes of every named field."""
    SIZE: ClassVar[int] = PACKET_SIZE
    _FIXED: ClassVar[frozenset[str]] = frozenset()
    """Layout fields whose value the class fixes (a property, not a dataclass field)."""

    # Per class, from its layout: the range checks of the fields the class does not fix, and
    # one getter of every value in wire order (these run on every packet of the flip path).
    _CHECKS: ClassVar[tuple[tuple[str, int, int], ...]]
    _VALUES: ClassVar[operator.attrgetter[tuple[int, ...]]]

    def __init_subclass__(cls, layout: _Layout | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if layout is not None:
            cls._LAYOUT = layout
            cls.FIELD_OFFSETS = layout.offsets
            cls.FIELD_SIZES = layout.sizes
            cls._VALUES = operator.attrgetter(*layout.names)
        if hasattr(cls, "_LAYOUT"):
            cls._CHECKS = tuple(
                (name, low, high)
                for name, (low, high) in cls._LAYOUT.ranges.items()
                if name not in cls._FIXED
            )

    def __post_init__(self) -> None:
        for name, low, high in self._CHECKS:
            value = getattr(self, name)
            if type(value) is not int and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(
                    f"{type(self).__name__}.{name} must be an int, not {type(value).__name__}"
                )
            if not low <= value <= high:
                raise ProtocolError(
                    f"{type(self).__name__}.{name}={value} is outside [{low}, {high}]",
                    what=name,
                    value=value,
                    errno=EINVAL,
                )
            if type(value) is not int:  # IntEnum members etc.: store the plain number
                object.__setattr__(self, name, int(value))

    def _values(self) -> tuple[int, ...]:
        values: tuple[int, ...] = self._VALUES(self)
        return values

    def pack(self) -> bytes:
        """The 64 bytes of this packet; every reserved byte is zero."""
        return self._LAYOUT.struct.pack(*self._values())

    def pack_into(self, buffer: memoryview | bytearray | mmap.mmap, offset: int = 0) -> None:
        """Write all 64 bytes (reserved ones zeroed) into ``buffer`` at ``offset``."""
        self._LAYOUT.struct.pack_into(buffer, offset, *self._values())

    @classmethod
    def _unpack(cls, data: BytesLike) -> dict[str, int]:
        raw = _copy_packet(data, cls.__name__)
        return dict(zip(cls._LAYOUT.names, cls._LAYOUT.struct.unpack(raw), strict=True))


def _invalid(message: str, what: str, value: object) -> ProtocolError:
    return ProtocolError(message, what=what, value=value, errno=EINVAL)


# --------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True, slots=True)
class RequestHeader(_Packet, layout=_request_layout()):
    """The common request header (id, operation): enough to answer any 64-byte request."""

    id: int
    operation: int

    @classmethod
    def parse(cls, data: BytesLike) -> Self:
        """Read id and operation of any 64-byte request, known operation or not."""
        values = cls._unpack(data)
        return cls(id=values["id"], operation=values["operation"])

    @property
    def op(self) -> Op | None:
        """The operation as :class:`Op`, or ``None`` if the code is unknown."""
        try:
            return Op(self.operation)
        except ValueError:
            return None


class _Request(_Packet):
    """Base of the decoded requests: the operation is fixed by the class."""

    __slots__ = ()

    OPERATION: ClassVar[Op]
    _FIXED: ClassVar[frozenset[str]] = frozenset({"operation"})
    id: int

    @property
    def operation(self) -> Op:
        """The operation code, fixed by the class (``OPERATION``)."""
        return self.OPERATION

    @property
    def header(self) -> RequestHeader:
        """This request's id and operation."""
        return RequestHeader(id=self.id, operation=self.OPERATION)

    @classmethod
    def parse(cls, data: BytesLike) -> Self:
        """Decode this request: checks length and operation only (``validate`` does the rest)."""
        return cls(**cls._unpack_request(data))

    @classmethod
    def _decoded(cls, raw: bytes) -> Self:
        """:meth:`parse` of a copied 64-byte packet whose operation byte is this class's.

        The struct codes bound every value to its field's range, so the construction checks
        are skipped: this is the ring's path, once per request.
        """
        request = object.__new__(cls)
        for name, value in zip(cls._LAYOUT.names, cls._LAYOUT.struct.unpack(raw), strict=True):
            if name != "operation":
                object.__setattr__(request, name, value)
        return request

    def _require_nonzero(self, *names: str) -> None:
        """``ProtocolError(errno=EINVAL)`` for the first of the fields ``names`` that is 0."""
        for name in names:
            if getattr(self, name) == 0:
                raise _invalid(f"{self.OPERATION.name}: {name} 0 is invalid", name, 0)

    @classmethod
    def _unpack_request(cls, data: BytesLike) -> dict[str, int]:
        values = cls._unpack(data)
        if values["operation"] != cls.OPERATION:
            raise _invalid(
                f"{cls.__name__}: operation 0x{values['operation']:02x} is not "
                f"{cls.OPERATION.name} (0x{cls.OPERATION:02x})",
                "operation",
                values["operation"],
            )
        del values["operation"]
        return values


@dataclass(frozen=True, slots=True)
class DbufCreateReq(
    _Request,
    layout=_request_layout(
        ("dbuf_cookie", "Q"),
        ("width", "I"),
        ("height", "I"),
        ("bpp", "I"),
        ("buffer_sz", "I"),
        ("flags", "I"),
        ("gref_directory", "I"),
        ("data_ofs", "I"),
    ),
):
    """XENDISPL_OP_DBUF_CREATE (reference §4.1): create a display buffer."""

    OPERATION: ClassVar[Op] = Op.DBUF_CREATE

    id: int
    dbuf_cookie: int
    width: int
    height: int
    bpp: int
    buffer_sz: int
    flags: int
    gref_directory: int
    data_ofs: int = 0

    @property
    def be_alloc(self) -> bool:
        """Whether the backend must allocate the pages (``XENDISPL_DBUF_FLG_REQ_ALLOC``)."""
        return bool(self.flags & DBUF_FLG_REQ_ALLOC)

    @property
    def npages(self) -> int:
        """Number of 4 KiB pages of the buffer, ``ceil(buffer_sz / 4096)``."""
        return pages_for(self.buffer_sz)

    @property
    def has_geometry(self) -> bool:
        """False for PRIME-imported buffers, which arrive with width = height = bpp = 0."""
        return not (self.width == 0 and self.height == 0 and self.bpp == 0)

    def validate(self) -> None:
        """Reject what is wrong without any state; ``ProtocolError(errno=EINVAL)`` otherwise.

        Checks: non-zero cookie and directory, ``0 < buffer_sz``, ``data_ofs < buffer_sz``, no
        unknown flag bits, geometry all zero (imported buffer) or all non-zero, and
        ``data_ofs + ceil(width * bpp / 8) * height <= npages * 4096`` computed exactly (no
        32-bit wrap-around can make a huge buffer look small).
        """
        self._require_nonzero("dbuf_cookie", "gref_directory")
        if self.buffer_sz == 0:
            raise _invalid("DBUF_CREATE: buffer_sz is 0", "buffer_sz", 0)
        if self.data_ofs >= self.buffer_sz:
            raise _invalid(
                f"DBUF_CREATE: data_ofs {self.data_ofs} is not below buffer_sz {self.buffer_sz}",
                "data_ofs",
                self.data_ofs,
            )
        if self.flags & ~DBUF_FLG_REQ_ALLOC:
            raise _invalid(
                f"DBUF_CREATE: unknown flag bits 0x{self.flags & ~DBUF_FLG_REQ_ALLOC:x}",
                "flags",
                self.flags,
            )
        if not self.has_geometry:
            return
        if self.width == 0 or self.height == 0 or self.bpp == 0:
            raise _invalid(
                f"DBUF_CREATE: partial geometry {self.width}x{self.height}x{self.bpp}",
                "geometry",
                (self.width, self.height, self.bpp),
            )
        needed = self.data_ofs + pitch_for(self.width, self.bpp) * self.height
        if needed > self.npages * PAGE_SIZE:
            raise _invalid(
                f"DBUF_CREATE: {self.width}x{self.height}x{self.bpp} at offset {self.data_ofs} "
                f"needs {needed} bytes, buffer has {self.npages} pages",
                "buffer_sz",
                self.buffer_sz,
            )


@dataclass(frozen=True, slots=True)
class DbufDestroyReq(_Request, layout=_request_layout(("dbuf_cookie", "Q"))):
    """XENDISPL_OP_DBUF_DESTROY (reference §4.2): destroy a display buffer."""

    OPERATION: ClassVar[Op] = Op.DBUF_DESTROY

    id: int
    dbuf_cookie: int

    def validate(self) -> None:
        """Reject cookie 0 with ``ProtocolError(errno=EINVAL)``."""
        self._require_nonzero("dbuf_cookie")


@dataclass(frozen=True, slots=True)
class FbAttachReq(
    _Request,
    layout=_request_layout(
        ("dbuf_cookie", "Q"),
        ("fb_cookie", "Q"),
        ("width", "I"),
        ("height", "I"),
        ("pixel_format", "I"),
    ),
):
    """XENDISPL_OP_FB_ATTACH (reference §4.3): make a framebuffer from a display buffer."""

    OPERATION: ClassVar[Op] = Op.FB_ATTACH

    id: int
    dbuf_cookie: int
    fb_cookie: int
    width: int
    height: int
    pixel_format: int

    @property
    def format(self) -> PixelFormat:
        """The pixel format; ``ProtocolError(errno=EINVAL)`` for a fourcc we do not know."""
        try:
            return PixelFormat(self.pixel_format)
        except ValueError:
            raise _invalid(
                f"FB_ATTACH: unknown pixel format 0x{self.pixel_format:08x}",
                "pixel_format",
                self.pixel_format,
            ) from None

    def validate(self) -> None:
        """Reject zero cookies, an empty size or an unknown format (``errno=EINVAL``)."""
        self._require_nonzero("dbuf_cookie", "fb_cookie")
        if self.width == 0 or self.height == 0:
            raise _invalid(
                f"FB_ATTACH: empty framebuffer {self.width}x{self.height}",
                "geometry",
                (self.width, self.height),
            )
        self.format  # noqa: B018 - raises for an unknown fourcc


@dataclass(frozen=True, slots=True)
class FbDetachReq(_Request, layout=_request_layout(("fb_cookie", "Q"))):
    """XENDISPL_OP_FB_DETACH (reference §4.4): drop a framebuffer."""

    OPERATION: ClassVar[Op] = Op.FB_DETACH

    id: int
    fb_cookie: int

    def validate(self) -> None:
        """Reject cookie 0 with ``ProtocolError(errno=EINVAL)``."""
        self._require_nonzero("fb_cookie")


@dataclass(frozen=True, slots=True)
class SetConfigReq(
    _Request,
    layout=_request_layout(
        ("fb_cookie", "Q"),
        ("x", "I"),
        ("y", "I"),
        ("width", "I"),
        ("height", "I"),
        ("bpp", "I"),
    ),
):
    """XENDISPL_OP_SET_CONFIG (reference §4.5): show a framebuffer, or disable (all zero)."""

    OPERATION: ClassVar[Op] = Op.SET_CONFIG

    id: int
    fb_cookie: int
    x: int
    y: int
    width: int
    height: int
    bpp: int

    @classmethod
    def disable(cls, id: int) -> Self:
        """The all-zero request that switches the connector off."""
        return cls(id=id, fb_cookie=0, x=0, y=0, width=0, height=0, bpp=0)

    @property
    def is_disable(self) -> bool:
        """An all-zero payload resets/disables the connector."""
        return (self.fb_cookie, self.x, self.y, self.width, self.height, self.bpp) == (
            0,
            0,
            0,
            0,
            0,
            0,
        )

    def validate(self) -> None:
        """A non-disable request needs a cookie and a non-empty size and bpp (``EINVAL``)."""
        if self.is_disable:
            return
        if self.fb_cookie == 0:
            raise _invalid("SET_CONFIG: fb_cookie 0 with a non-zero payload", "fb_cookie", 0)
        if self.width == 0 or self.height == 0 or self.bpp == 0:
            raise _invalid(
                f"SET_CONFIG: empty mode {self.width}x{self.height}x{self.bpp}",
                "geometry",
                (self.width, self.height, self.bpp),
            )


@dataclass(frozen=True, slots=True)
class PgFlipReq(_Request, layout=_request_layout(("fb_cookie", "Q"))):
    """XENDISPL_OP_PG_FLIP (reference §4.6): show another framebuffer at the next vblank."""

    OPERATION: ClassVar[Op] = Op.PG_FLIP

    id: int
    fb_cookie: int

    def validate(self) -> None:
        """Reject cookie 0 with ``ProtocolError(errno=EINVAL)``."""
        self._require_nonzero("fb_cookie")


@dataclass(frozen=True, slots=True)
class GetEdidReq(_Request, layout=_request_layout(("buffer_sz", "I"), ("gref_directory", "I"))):
    """XENDISPL_OP_GET_EDID (reference §4.7, v2): fill the guest's buffer with an EDID."""

    OPERATION: ClassVar[Op] = Op.GET_EDID

    id: int
    buffer_sz: int
    gref_directory: int

    @property
    def npages(self) -> int:
        """Number of 4 KiB pages of the EDID buffer."""
        return pages_for(self.buffer_sz)

    def validate(self) -> None:
        """The buffer must hold the largest EDID (32768 bytes) and have a directory."""
        self._require_nonzero("gref_directory")
        if self.buffer_sz < EDID_MAX_SIZE:
            raise _invalid(
                f"GET_EDID: buffer_sz {self.buffer_sz} is below {EDID_MAX_SIZE}",
                "buffer_sz",
                self.buffer_sz,
            )


Request: TypeAlias = (
    DbufCreateReq
    | DbufDestroyReq
    | FbAttachReq
    | FbDetachReq
    | SetConfigReq
    | PgFlipReq
    | GetEdidReq
)
"""Any decoded request; dispatch with ``match`` or ``isinstance``."""

REQUEST_TYPES: Mapping[Op, type[Request]] = MappingProxyType(
    {
        cls.OPERATION: cls
        for cls in (
            DbufCreateReq,
            DbufDestroyReq,
            FbAttachReq,
            FbDetachReq,
            SetConfigReq,
            PgFlipReq,
            GetEdidReq,
        )
    }
)
"""The request class for each operation code."""

_REQUEST_BY_CODE: dict[int, type[Request]] = {int(op): cls for op, cls in REQUEST_TYPES.items()}


def parse_request(data: BytesLike) -> Request:
    """Decode one 64-byte request, dispatching on its operation byte.

    Raises :class:`ProtocolError` only: ``errno=None`` for a wrong length (not a ring slot),
    ``errno=EINVAL`` for an unknown operation (answer it via :meth:`RequestHeader.parse`).
    """
    raw = _copy_packet(data, "request")
    operation = raw[2]
    cls = _REQUEST_BY_CODE.get(operation)
    if cls is None:
        raise _invalid(f"unknown operation 0x{operation:02x}", "operation", operation)
    return cls._decoded(raw)


# --------------------------------------------------------------------------------------------
# Response


class Answerable(Protocol):
    """What a response needs from its request: the id and operation to echo."""

    @property
    def id(self) -> int: ...

    @property
    def operation(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Response(
    _Packet,
    layout=_layout(("id", "H"), ("operation", "B"), (None, "x"), ("status", "i"), ("edid_sz", "I")),
):
    """A response (reference §5): id and operation echoed, status 0 or -errno, GET_EDID size.

    A positive status, or an ``edid_sz`` on anything but a successful GET_EDID, is refused.
    """

    id: int
    operation: int
    status: int
    edid_sz: int = 0

    def __post_init__(self) -> None:
        _Packet.__post_init__(self)
        if self.status > 0:
            raise _invalid(
                f"response status {self.status} is positive (only 0 or -errno)",
                "status",
                self.status,
            )
        if self.edid_sz and (self.operation != Op.GET_EDID or self.status != 0):
            raise _invalid(
                f"edid_sz {self.edid_sz} on a response that is not a successful GET_EDID",
                "edid_sz",
                self.edid_sz,
            )

    @classmethod
    def parse(cls, data: BytesLike) -> Self:
        """Decode a response (the frontend's side; used by the simulated guest)."""
        return cls(**cls._unpack(data))

    @classmethod
    def ok(cls, request: Answerable, *, edid_sz: int = 0) -> Self:
        """Status 0 for ``request`` (a decoded request or a :class:`RequestHeader`)."""
        return cls(id=request.id, operation=request.operation, status=0, edid_sz=edid_sz)

    @classmethod
    def ok_packet(cls, request: Request) -> bytes:
        """``Response.ok(request).pack()`` for a decoded request, without building the
        response: its id and operation are in range by construction (the flip path's)."""
        return cls._LAYOUT.struct.pack(request.id, request.operation, 0, 0)

    @classmethod
    def error(cls, request: Answerable, errno: int) -> Self:
        """Status ``-errno`` for ``request``; ``errno`` is the positive errno value."""
        if isinstance(errno, bool) or not isinstance(errno, int) or not 0 < errno <= 2**31:
            raise _invalid(f"errno {errno!r} is not a positive errno value", "errno", errno)
        return cls(id=request.id, operation=request.operation, status=-errno)

    @property
    def is_ok(self) -> bool:
        """Whether the status is 0."""
        return self.status == 0

    @property
    def errno(self) -> int:
        """The positive errno carried (0 on success)."""
        return -self.status


# --------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class PgFlipEvent(
    _Packet,
    layout=_layout(("id", "H"), ("type", "B"), (None, "5x"), ("fb_cookie", "Q")),
):
    """XENDISPL_EVT_PG_FLIP (reference §6): a flip completed; ``id`` counts 0, 1, 2 … (u16)."""

    TYPE: ClassVar[EventType] = EventType.PG_FLIP
    _FIXED: ClassVar[frozenset[str]] = frozenset({"type"})

    id: int
    fb_cookie: int

    @property
    def type(self) -> EventType:
        """The event type, fixed by the class (``TYPE``)."""
        return self.TYPE

    @classmethod
    def parse(cls, data: BytesLike) -> Self:
        """Decode a PG_FLIP event; another type byte is a ``ProtocolError`` (errno None)."""
        values = cls._unpack(data)
        if values["type"] != cls.TYPE:
            raise ProtocolError(
                f"event type 0x{values['type']:02x} is not PG_FLIP",
                what="type",
                value=values["type"],
            )
        return cls(id=values["id"], fb_cookie=values["fb_cookie"])


Event: TypeAlias = PgFlipEvent
"""Any event (displif v2 defines only PG_FLIP)."""


def parse_event(data: BytesLike) -> Event:
    """Decode one 64-byte event slot; unknown type or wrong length → ``ProtocolError``."""
    raw = _copy_packet(data, "event")
    if raw[2] != EventType.PG_FLIP:
        raise ProtocolError(f"unknown event type 0x{raw[2]:02x}", what="type", value=raw[2])
    return PgFlipEvent.parse(raw)
