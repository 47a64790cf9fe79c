"""Xen's kbdif wire (``xen/include/public/io/kbdif.h``): input events, the shared page, nodes.

The para-virtual keyboard/pointer/touch protocol, sans-I/O like the rest of this package:
40-byte events packed and parsed, the backend's and the frontend's half of the shared page
over any writable 4096-byte buffer, the XenStore node names and their checked parsers. The
backend device that drives it is :mod:`displback.backend.vkbd`; the simulated guest that
plays Linux's ``xen-kbdfront`` is :mod:`displback.sim.guest.kbdfront`.

The shared page (allocated and zeroed by the frontend, granted to us as ``page-gref``)
-------------------------------------------------------------------------------------
==========  ======  ==================================================================
offset      size    what
==========  ======  ==================================================================
0           u32     ``in_cons``: frontend → backend, events it has read (hostile)
4           u32     ``in_prod``: backend → frontend, events we have written
8, 12       u32     ``out_cons``, ``out_prod``: the out ring, unused (no out events exist)
1024        2048    the in ring: 51 slots of 40 bytes (``XENKBD_IN_RING_LEN``)
3072        1024    the out ring (25 slots), unused
==========  ======  ==================================================================

Index ``n`` (free-running u32) lives in slot ``n mod 51``; both sides use that formula. As
2**32 = 1 (mod 51), the index after the wrap (0) lands on the slot of 2**32 - 1, so the
producer also refuses while the slot it is about to use still holds an unread event (only
possible right after the wrap; :class:`InEventProducer`). Linux's frontend reads every slot
from ``in_cons`` to ``in_prod`` without checking the distance, so a backend that wrote more
than 51 ahead would make it read overwritten slots: the producer never does, and a page
whose ``in_cons`` is not within 51 behind our ``in_prod`` is a :class:`ProtocolError`.

Events (every reserved byte written 0; offsets checked against the C header in
``tests/xen/test_layout.py``)
---------------------------------------------------------------------------------------
``MOTION`` (1): ``rel_x``, ``rel_y``, ``rel_z`` i32 at 4, 8, 12. ``KEY`` (3): ``pressed`` u8
at 1, ``keycode`` u32 at 4. ``POS`` (4): ``abs_x``, ``abs_y``, ``rel_z`` i32 at 4, 8, 12.
``MTOUCH`` (5): ``event_type`` u8 at 1, ``contact_id`` u8 at 2, then at 8 either ``abs_x``,
``abs_y`` i32 (DOWN 0, MOTION 2), ``major``, ``minor`` u32 (SHAPE 4) or ``orientation`` i16
(ORIENT 5); UP (1) and SYN (3) carry nothing more. ``rel_z`` is the wheel with Linux's sign
reversed: kbdfront reports ``REL_WHEEL = -rel_z``.

XenStore
--------
The backend directory is written by the toolstack and by us. libxl (``vkb=[...]`` in xl.cfg)
may have put the admin's ``feature-*``, ``width``/``height`` and ``multi-touch-*`` there;
whatever it gave is kept, we fill in what it left out (:func:`backend_feature_writes`)
*before* InitWait — Linux reads them once, when it probes the device. The frontend writes
``request-abs-pointer``/``request-multi-touch`` (also at probe), ``page-gref``, the obsolete
``page-ref`` (a frame number; Linux writes both) and ``event-channel``, then goes
Initialised. Values are strict canonical decimals (:func:`displback.protocol.layout.parse_u32`);
a feature request is any non-zero value, as Linux's ``xenbus_read_unsigned`` reads it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from displback.protocol.errors import ProtocolError
from displback.protocol.layout import parse_u32
from displback.protocol.ring import INDEX_MASK, Fence, Page, SharedPage, default_rw_fence

__all__ = [
    "BACKEND_CONFIG_NODES",
    "BACKEND_KINDS",
    "DEFAULT_NUM_CONTACTS",
    "FRONTEND_TRANSPORT_NODES",
    "KEY_CODES",
    "MAX_NUM_CONTACTS",
    "EVENT_SIZE",
    "FEATURE_ABS_POINTER",
    "FEATURE_DISABLE_KEYBOARD",
    "FEATURE_DISABLE_POINTER",
    "FEATURE_MULTI_TOUCH",
    "FEATURE_RAW_POINTER",
    "FRONTEND_KIND",
    "HEIGHT",
    "IN_CONS_OFS",
    "IN_PROD_OFS",
    "IN_RING_LEN",
    "IN_RING_OFS",
    "IN_RING_SIZE",
    "MT_HEIGHT",
    "MT_NUM_CONTACTS",
    "MT_WIDTH",
    "OUT_CONS_OFS",
    "OUT_PROD_OFS",
    "OUT_RING_OFS",
    "OUT_RING_SIZE",
    "PAGE_GREF",
    "PAGE_REF",
    "EVENT_CHANNEL",
    "REQUEST_ABS_POINTER",
    "REQUEST_MULTI_TOUCH",
    "REQUEST_RAW_POINTER",
    "WIDTH",
    "BackendConfig",
    "FrontendTransport",
    "InEvent",
    "InEventConsumer",
    "InEventProducer",
    "Key",
    "MtDown",
    "MtMotion",
    "MtOrient",
    "MtShape",
    "MtSyn",
    "MtUp",
    "Motion",
    "Position",
    "backend_dir",
    "backend_feature_writes",
    "backend_root",
    "frontend_dir",
    "in_slot_offset",
    "parse_backend_config",
    "parse_event",
    "parse_frontend_transport",
]

# --- page layout ----------------------------------------------------------------------------

EVENT_SIZE: Final = 40  # XENKBD_IN_EVENT_SIZE, XENKBD_OUT_EVENT_SIZE
IN_CONS_OFS: Final = 0
IN_PROD_OFS: Final = 4
OUT_CONS_OFS: Final = 8
OUT_PROD_OFS: Final = 12
IN_RING_OFS: Final = 1024  # XENKBD_IN_RING_OFFS
IN_RING_SIZE: Final = 2048  # XENKBD_IN_RING_SIZE
IN_RING_LEN: Final = IN_RING_SIZE // EVENT_SIZE  # 51
OUT_RING_OFS: Final = IN_RING_OFS + IN_RING_SIZE  # 3072
OUT_RING_SIZE: Final = 1024

# --- event codes ----------------------------------------------------------------------------

TYPE_MOTION: Final = 1
TYPE_KEY: Final = 3
TYPE_POS: Final = 4
TYPE_MTOUCH: Final = 5
MT_EV_DOWN: Final = 0
MT_EV_UP: Final = 1
MT_EV_MOTION: Final = 2
MT_EV_SYN: Final = 3
MT_EV_SHAPE: Final = 4
MT_EV_ORIENT: Final = 5

# --- XenStore -------------------------------------------------------------------------------

#: The frontend's device kind (``device/vkbd/<devid>``).
FRONTEND_KIND: Final = "vkbd"
#: Backend directories we serve: libxl puts a ``backend-type=linux`` vkb (any backend that is
#: not QEMU) under ``backend/vinput``; ``backend/vkbd`` is QEMU's.
BACKEND_KINDS: Final = ("vinput",)

FEATURE_DISABLE_KEYBOARD: Final = "feature-disable-keyboard"
FEATURE_DISABLE_POINTER: Final = "feature-disable-pointer"
FEATURE_ABS_POINTER: Final = "feature-abs-pointer"
FEATURE_RAW_POINTER: Final = "feature-raw-pointer"
FEATURE_MULTI_TOUCH: Final = "feature-multi-touch"
WIDTH: Final = "width"
HEIGHT: Final = "height"
MT_WIDTH: Final = "multi-touch-width"
MT_HEIGHT: Final = "multi-touch-height"
MT_NUM_CONTACTS: Final = "multi-touch-num-contacts"
REQUEST_ABS_POINTER: Final = "request-abs-pointer"
REQUEST_RAW_POINTER: Final = "request-raw-pointer"
REQUEST_MULTI_TOUCH: Final = "request-multi-touch"
PAGE_GREF: Final = "page-gref"
PAGE_REF: Final = "page-ref"  # obsolete: a frame number, not a grant
EVENT_CHANNEL: Final = "event-channel"

#: Key codes a frontend may be sent: Linux tests ``keycode`` against bitmaps of ``KEY_CNT``
#: (0x300) bits without a bound check, so a larger code reads past them in the guest's kernel.
KEY_CODES: Final = range(1, 0x300)

#: Contact slots offered when the toolstack did not say (a kbdif u8 id; Linux's default is 1).
DEFAULT_NUM_CONTACTS: Final = 10
#: Largest number of contacts we accept from the toolstack: ids are u8.
MAX_NUM_CONTACTS: Final = 256

# --- events ---------------------------------------------------------------------------------

_XYZ: Final = struct.Struct("<B3xiii")  # MOTION, POS
_KEY: Final = struct.Struct("<BB2xI")
_MT_HEAD: Final = struct.Struct("<BBB5x")
_MT_POS: Final = struct.Struct("<ii")
_MT_SHAPE: Final = struct.Struct("<II")
_MT_ORIENT: Final = struct.Struct("<h")
_PAD: Final = bytes(EVENT_SIZE)


def _event(body: bytes) -> bytes:
    return body + _PAD[len(body) :]


@dataclass(frozen=True, slots=True)
class Motion:
    """Relative pointer motion (``XENKBD_TYPE_MOTION``); ``rel_z`` is the wheel (kbdif sign)."""

    rel_x: int
    rel_y: int
    rel_z: int = 0

    def pack(self) -> bytes:
        return _event(_XYZ.pack(TYPE_MOTION, self.rel_x, self.rel_y, self.rel_z))


@dataclass(frozen=True, slots=True)
class Key:
    """A key or button (``XENKBD_TYPE_KEY``): Linux ``KEY_*``/``BTN_*`` code."""

    keycode: int
    pressed: bool

    def pack(self) -> bytes:
        return _event(_KEY.pack(TYPE_KEY, int(self.pressed), self.keycode))


@dataclass(frozen=True, slots=True)
class Position:
    """Absolute pointer position (``XENKBD_TYPE_POS``) in the range ``width``/``height``."""

    abs_x: int
    abs_y: int
    rel_z: int = 0

    def pack(self) -> bytes:
        return _event(_XYZ.pack(TYPE_POS, self.abs_x, self.abs_y, self.rel_z))


@dataclass(frozen=True, slots=True)
class MtDown:
    """A new contact at (abs_x, abs_y) of the multi-touch area."""

    contact_id: int
    abs_x: int
    abs_y: int

    def pack(self) -> bytes:
        return _mt(MT_EV_DOWN, self.contact_id, _MT_POS.pack(self.abs_x, self.abs_y))


@dataclass(frozen=True, slots=True)
class MtMotion:
    """Contact ``contact_id`` moved to (abs_x, abs_y)."""

    contact_id: int
    abs_x: int
    abs_y: int

    def pack(self) -> bytes:
        return _mt(MT_EV_MOTION, self.contact_id, _MT_POS.pack(self.abs_x, self.abs_y))


@dataclass(frozen=True, slots=True)
class MtUp:
    """Contact ``contact_id`` was lifted; its id may be reused."""

    contact_id: int

    def pack(self) -> bytes:
        return _mt(MT_EV_UP, self.contact_id, b"")


@dataclass(frozen=True, slots=True)
class MtSyn:
    """End of a group of multi-touch events (Linux: ``input_mt_sync_frame`` + sync)."""

    contact_id: int = 0

    def pack(self) -> bytes:
        return _mt(MT_EV_SYN, self.contact_id, b"")


@dataclass(frozen=True, slots=True)
class MtShape:
    """The contact's ellipse: ``major``/``minor`` axis lengths (pixels)."""

    contact_id: int
    major: int
    minor: int

    def pack(self) -> bytes:
        return _mt(MT_EV_SHAPE, self.contact_id, _MT_SHAPE.pack(self.major, self.minor))


@dataclass(frozen=True, slots=True)
class MtOrient:
    """The contact's orientation: clockwise angle of the major axis, degrees."""

    contact_id: int
    orientation: int

    def pack(self) -> bytes:
        return _mt(MT_EV_ORIENT, self.contact_id, _MT_ORIENT.pack(self.orientation))


def _mt(event_type: int, contact_id: int, payload: bytes) -> bytes:
    return _event(_MT_HEAD.pack(TYPE_MTOUCH, event_type, contact_id) + payload)


InEvent = Motion | Key | Position | MtDown | MtMotion | MtUp | MtSyn | MtShape | MtOrient


def parse_event(raw: bytes) -> InEvent | None:
    """The event in a 40-byte slot; None for a type (or multi-touch sub-type) we do not know,
    which a frontend ignores (kbdif: "Frontends should ignore unknown in events")."""
    if len(raw) != EVENT_SIZE:
        raise ValueError(f"a kbdif event is {EVENT_SIZE} bytes, got {len(raw)}")
    kind = raw[0]
    if kind in (TYPE_MOTION, TYPE_POS):
        _, a, b, c = _XYZ.unpack_from(raw)
        return Motion(a, b, c) if kind == TYPE_MOTION else Position(a, b, c)
    if kind == TYPE_KEY:
        _, pressed, keycode = _KEY.unpack_from(raw)
        return Key(keycode, bool(pressed))
    if kind != TYPE_MTOUCH:
        return None
    _, sub, contact = _MT_HEAD.unpack_from(raw)
    at = _MT_HEAD.size
    if sub in (MT_EV_DOWN, MT_EV_MOTION):
        x, y = _MT_POS.unpack_from(raw, at)
        return MtDown(contact, x, y) if sub == MT_EV_DOWN else MtMotion(contact, x, y)
    if sub == MT_EV_UP:
        return MtUp(contact)
    if sub == MT_EV_SYN:
        return MtSyn(contact)
    if sub == MT_EV_SHAPE:
        major, minor = _MT_SHAPE.unpack_from(raw, at)
        return MtShape(contact, major, minor)
    if sub == MT_EV_ORIENT:
        (orientation,) = _MT_ORIENT.unpack_from(raw, at)
        return MtOrient(contact, orientation)
    return None


# --- the shared page ------------------------------------------------------------------------


def in_slot_offset(index: int) -> int:
    """Byte offset of the in-ring slot of free-running u32 index ``index`` (``n mod 51``)."""
    return IN_RING_OFS + EVENT_SIZE * ((index & INDEX_MASK) % IN_RING_LEN)


class InEventProducer(SharedPage):
    """The backend's half of the in ring: events written, never past the frontend's ``in_cons``.

    ``start`` is our private ``in_prod``: at connect it is read from the page (Linux zeroes
    its page when it allocates it, but keeps it across a backend's reconnect, where
    ``in_prod`` and ``in_cons`` hold where the last backend stopped), so the caller passes
    the page's ``in_prod`` after checking it against ``in_cons``.
    """

    def __init__(self, page: Page, *, start: int = 0, rw_fence: Fence | None = None) -> None:
        if not 0 <= start <= INDEX_MASK:
            raise ValueError(f"start must be a u32, got {start!r}")
        self._rw_fence = rw_fence if rw_fence is not None else default_rw_fence()
        super().__init__(page)
        self._in_prod = start

    @classmethod
    def resume(cls, page: Page, *, rw_fence: Fence | None = None) -> InEventProducer:
        """A producer continuing from the page's own ``in_prod`` (see the class docstring);
        :class:`ProtocolError` if the page's indexes are not within one ring of each other."""
        producer = cls(page, rw_fence=rw_fence)
        start = producer._load(IN_PROD_OFS)
        producer._in_prod = start
        try:
            producer.free()
        except ProtocolError:
            producer.release()
            raise
        return producer

    @property
    def in_prod(self) -> int:
        """Events written so far (free-running u32; also published on the page)."""
        return self._in_prod

    def free(self) -> int:
        """Slots :meth:`put` can fill now (reads the hostile ``in_cons``)."""
        in_cons = self._load(IN_CONS_OFS)
        self._rw_fence()
        unread = (self._in_prod - in_cons) & INDEX_MASK
        if unread > IN_RING_LEN:
            raise ProtocolError(
                f"in_cons {in_cons} is not within {IN_RING_LEN} events behind "
                f"in_prod {self._in_prod}",
                what="in_cons",
                value=in_cons,
            )
        free = IN_RING_LEN - unread
        if in_cons + IN_RING_LEN <= INDEX_MASK + 1:
            return free  # 51 consecutive indexes below 2**32 have 51 distinct slots
        # Across the u32 wrap the next indexes may share slots with unread ones, or with
        # each other (2**32 = 1 mod 51): count only the slots up to the first such collision.
        taken = {in_slot_offset(in_cons + k) for k in range(unread)}
        for n in range(free):
            slot = in_slot_offset(self._in_prod + n)
            if slot in taken:
                return n
            taken.add(slot)
        return free

    def put(self, events: list[InEvent] | tuple[InEvent, ...]) -> int:
        """Write as many of ``events`` as fit, in order; publish ``in_prod`` once; return how
        many were written (the caller keeps the rest and notifies the channel if any were).

        Raises :class:`ProtocolError` if the frontend's ``in_cons`` is impossible.
        """
        room = min(self.free(), len(events))
        for n in range(room):
            at = in_slot_offset(self._in_prod + n)
            self._bytes[at : at + EVENT_SIZE] = events[n].pack()
        if room:
            self._rw_fence()  # write barrier: the slots are visible before in_prod covers them
            self._in_prod = (self._in_prod + room) & INDEX_MASK
            self._store(IN_PROD_OFS, self._in_prod)
        return room


class InEventConsumer(SharedPage):
    """The frontend's half, as Linux's ``xen-kbdfront`` reads it (for the simulated guest).

    Unlike Linux, an ``in_prod`` more than 51 ahead of ``in_cons`` (a backend overwriting
    unread slots) is a :class:`ProtocolError`: the simulated guest exists to catch that.
    Unknown event types are counted in :attr:`skipped`.
    """

    def __init__(self, page: Page, *, rw_fence: Fence | None = None) -> None:
        self._rw_fence = rw_fence if rw_fence is not None else default_rw_fence()
        super().__init__(page)
        self.skipped = 0

    def take(self) -> list[InEvent]:
        """Read every slot from ``in_cons`` to ``in_prod``; publish the new ``in_cons``."""
        in_prod = self._load(IN_PROD_OFS)
        self._rw_fence()
        in_cons = self._load(IN_CONS_OFS)
        count = (in_prod - in_cons) & INDEX_MASK
        if count > IN_RING_LEN:
            raise ProtocolError(
                f"in_prod {in_prod} is more than {IN_RING_LEN} events ahead of in_cons {in_cons}",
                what="in_prod",
                value=in_prod,
            )
        events: list[InEvent] = []
        for n in range(count):
            at = in_slot_offset(in_cons + n)
            event = parse_event(bytes(self._bytes[at : at + EVENT_SIZE]))
            if event is None:
                self.skipped += 1
            else:
                events.append(event)
        self._rw_fence()  # the slots were read before in_cons releases them
        self._store(IN_CONS_OFS, in_prod)
        return events


# --- XenStore paths and nodes ---------------------------------------------------------------


def backend_root(backend_domid: int, kind: str = BACKEND_KINDS[0]) -> str:
    """``/local/domain/B/backend/vinput``: the directory the daemon watches for vkbd devices."""
    return f"/local/domain/{backend_domid}/backend/{kind}"


def backend_dir(
    backend_domid: int, frontend_domid: int, devid: int, kind: str = BACKEND_KINDS[0]
) -> str:
    """``/local/domain/B/backend/vinput/F/D``."""
    return f"{backend_root(backend_domid, kind)}/{frontend_domid}/{devid}"


def frontend_dir(frontend_domid: int, devid: int) -> str:
    """``/local/domain/F/device/vkbd/D``."""
    return f"/local/domain/{frontend_domid}/device/{FRONTEND_KIND}/{devid}"



@dataclass(frozen=True, slots=True)
class BackendConfig:
    """What the backend directory says the guest was told (after our own writes).

    ``width``/``height`` is the absolute pointer's range, ``mt_width``/``mt_height`` the touch
    area's, ``contacts`` the number of contact slots; the ``*_enabled`` flags are what we
    offer (``feature-*``) — the guest gets abs pointer and touch only if it also asks.
    """

    keyboard: bool
    pointer: bool
    abs_pointer: bool
    multi_touch: bool
    width: int
    height: int
    mt_width: int
    mt_height: int
    contacts: int


#: The backend-directory nodes :func:`parse_backend_config` reads.
BACKEND_CONFIG_NODES: Final = (
    FEATURE_DISABLE_KEYBOARD,
    FEATURE_DISABLE_POINTER,
    FEATURE_ABS_POINTER,
    FEATURE_MULTI_TOUCH,
    WIDTH,
    HEIGHT,
    MT_WIDTH,
    MT_HEIGHT,
    MT_NUM_CONTACTS,
)


def _given(read: Mapping[str, bytes | None], node: str) -> int | None:
    """A toolstack value, or None where it gave none (missing, or libxl's unset 0)."""
    value = read.get(node)
    if value is None:
        return None
    number = parse_u32(value, what=node)
    return number or None


def backend_feature_writes(
    read: Mapping[str, bytes | None], size: tuple[int, int]
) -> dict[str, bytes]:
    """Our writes to the backend directory before InitWait: every feature and size the
    toolstack left out; ``size`` is the guest connector's resolution the pointer maps to.

    ``read`` holds the current values of :data:`BACKEND_CONFIG_NODES`. A toolstack value
    that is not a canonical decimal is a :class:`ProtocolError` (a broken configuration is
    refused loudly rather than overwritten)."""
    width, height = size
    writes: dict[str, bytes] = {}
    for node in (FEATURE_DISABLE_KEYBOARD, FEATURE_DISABLE_POINTER):
        _given(read, node)  # checked only: absent means enabled, as Linux reads it
    if read.get(FEATURE_ABS_POINTER) is None:
        writes[FEATURE_ABS_POINTER] = b"1"
    else:
        _given(read, FEATURE_ABS_POINTER)
    if read.get(FEATURE_MULTI_TOUCH) is None:
        writes[FEATURE_MULTI_TOUCH] = b"1"
    else:
        _given(read, FEATURE_MULTI_TOUCH)
    defaults = {
        WIDTH: width,
        HEIGHT: height,
        MT_WIDTH: width,
        MT_HEIGHT: height,
        MT_NUM_CONTACTS: DEFAULT_NUM_CONTACTS,
    }
    for node, default in defaults.items():
        if _given(read, node) is None:
            writes[node] = str(default).encode("ascii")
    contacts = _given(read, MT_NUM_CONTACTS)
    if contacts is not None and contacts > MAX_NUM_CONTACTS:
        raise ProtocolError(
            f"{MT_NUM_CONTACTS} {contacts} is more than kbdif's u8 contact ids allow "
            f"({MAX_NUM_CONTACTS})",
            what=MT_NUM_CONTACTS,
            value=contacts,
        )
    return writes


def parse_backend_config(read: Mapping[str, bytes | None]) -> BackendConfig:
    """The backend directory's configuration once :func:`backend_feature_writes` are in."""

    def required(node: str) -> int:
        value = _given(read, node)
        if value is None:
            raise ProtocolError(f"{node} is missing or 0", what=node, value=read.get(node))
        return value

    contacts = required(MT_NUM_CONTACTS)
    if contacts > MAX_NUM_CONTACTS:
        raise ProtocolError(
            f"{MT_NUM_CONTACTS} {contacts} is more than {MAX_NUM_CONTACTS}",
            what=MT_NUM_CONTACTS,
            value=contacts,
        )
    return BackendConfig(
        keyboard=not _given(read, FEATURE_DISABLE_KEYBOARD),
        pointer=not _given(read, FEATURE_DISABLE_POINTER),
        abs_pointer=bool(_given(read, FEATURE_ABS_POINTER)),
        multi_touch=bool(_given(read, FEATURE_MULTI_TOUCH)),
        width=required(WIDTH),
        height=required(HEIGHT),
        mt_width=required(MT_WIDTH),
        mt_height=required(MT_HEIGHT),
        contacts=contacts,
    )


@dataclass(frozen=True, slots=True)
class FrontendTransport:
    """What the frontend published: its page (grant, or only the obsolete frame number), its
    event channel, and the features it asked for."""

    page_gref: int | None
    page_ref: int | None
    event_channel: int
    abs_pointer: bool
    multi_touch: bool
    raw_pointer: bool


#: The frontend-directory nodes :func:`parse_frontend_transport` reads.
FRONTEND_TRANSPORT_NODES: Final = (
    PAGE_GREF,
    PAGE_REF,
    EVENT_CHANNEL,
    REQUEST_ABS_POINTER,
    REQUEST_MULTI_TOUCH,
    REQUEST_RAW_POINTER,
)


def parse_frontend_transport(read: Mapping[str, bytes | None]) -> FrontendTransport:
    """The guest's nodes, strictly (:class:`ProtocolError` naming the node): ``event-channel``
    a non-zero u32; ``page-gref`` a non-zero u32 if present (else ``page-ref`` must be);
    ``request-*`` u32, absent meaning 0."""

    def optional(node: str) -> int | None:
        value = read.get(node)
        return None if value is None else parse_u32(value, what=node)

    gref = optional(PAGE_GREF)
    if gref == 0:
        raise ProtocolError(f"{PAGE_GREF} 0 is not a grant reference", what=PAGE_GREF, value=0)
    ref = optional(PAGE_REF)
    if gref is None and ref is None:
        raise ProtocolError(f"neither {PAGE_GREF} nor {PAGE_REF} is written", what=PAGE_GREF)
    port = optional(EVENT_CHANNEL)
    if not port:
        raise ProtocolError(
            f"{EVENT_CHANNEL} is missing or 0", what=EVENT_CHANNEL, value=read.get(EVENT_CHANNEL)
        )
    return FrontendTransport(
        page_gref=gref,
        page_ref=ref,
        event_channel=port,
        abs_pointer=bool(optional(REQUEST_ABS_POINTER)),
        multi_touch=bool(optional(REQUEST_MULTI_TOUCH)),
        raw_pointer=bool(optional(REQUEST_RAW_POINTER)),
    )
