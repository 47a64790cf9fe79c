"""Where a vdispl device lives in XenStore (§1): node names, paths, and checked value parsers.

Sans-I/O like the rest of the protocol package: the caller reads nodes (the lists of relative
paths to read are provided here) and passes their raw values in a mapping; this module turns
them into validated dataclasses or raises :class:`ProtocolError` with ``what`` naming the node.

Who writes what (§1.1): the toolstack (libxl) writes ``be-alloc``, ``i/resolution``,
``i/unique-id``, ``online``, ``frontend``/``backend`` and the initial ``state`` nodes; the guest
writes its ``state`` and the four transport nodes per connector. Both kinds are parsed strictly
here: the guest is hostile, and a toolstack value we cannot parse is a configuration error the
device refuses loudly rather than guessing. The toolstack's nodes sit in a directory the guest
owns, so their *permissions* are checked too (:mod:`displback.protocol.trust`): a node the
guest (or anyone but the toolstack) wrote refuses the device.

Decisions recorded here:

* **Integers** are canonical decimal ASCII: digits only, no sign, no spaces, no leading zeros
  (Linux and libxl write ``%u``/``%d``), at most 10 digits, within u32. This keeps the value we
  act on identical to the text the writer meant.
* **be-alloc** is an integer, any non-zero value true (as xl and Linux read it); a missing node
  reads as false, like Linux's ``xenbus_read_unsigned(..., 0)`` default, so both ends agree.
* **resolution** ``<W>x<H>``: both canonical decimals, and a size every connector can be
  served at: :func:`displback.protocol.edid.check_resolution` (sides 1..4095, a 60 Hz pixel clock an
  EDID can hold) — the one resolution limit of the daemon, also applied to its own
  configuration, so that a value accepted here never fails a connect later. Linux's own
  framebuffer limit (4095 x 2047) is deliberately *not* applied: it limits guest
  framebuffers, not the connector.
* **Connectors**: like Linux, the list stops at the first index whose ``resolution`` node is
  missing, and at most ``LINUX_MAX_CONNECTORS`` are used. Every node read up to there must be
  the toolstack's: a connector the guest added (the first missing index filled in by the
  guest) or replaced (``i/`` removed and rewritten) refuses the *whole device*, not just that
  connector — the frontend reads the same nodes, so serving only the trusted ones would leave
  the two ends disagreeing on the connectors, and an honest guest never touches them. A gap
  ends the list at both ends alike; nodes after it are not read. A *present* but unparsable
  resolution is an error (Linux's lenient ``sscanf`` would use it or stop there; guessing
  which could make the two ends disagree on the number of connectors).
* **unique-id** is optional (libxl before Xen 4.11 did not write it); when present it must be
  1..255 printable ASCII characters other than space, ``,``, ``;`` and ``:`` (the xl syntax
  separators).
* **versions**: we write ``"1,2"`` together with InitWait (see :func:`backend_state_writes`).
  Linux neither reads ``versions`` nor writes ``version``, so this costs nothing, follows the
  spec, and tells a spec-following frontend that the v2 layout (``data_ofs``, ``GET_EDID``
  answered, possibly with an error status) is understood. A frontend ``version`` node, if ever
  written, must name one of these.
* **Transport**: grant refs and event-channel ports are non-zero u32; no grant ref or port may
  appear twice within one device (aliasing a ring page with an event page, or two connectors
  sharing a channel, is never legitimate).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from displback.protocol.constants import (
    DEVICE_TYPE,
    LINUX_MAX_CONNECTORS,
    LIST_SEPARATOR,
    PROTOCOL_VERSION_INT,
    RESOLUTION_SEPARATOR,
)
from displback.protocol.edid import EdidError, check_resolution
from displback.protocol.errors import ProtocolError
from displback.protocol.trust import PermEntry, TrustRule
from displback.protocol.xenbus import XenbusState

__all__ = [
    "BACKEND",
    "BACKEND_ID",
    "BACKEND_VERSIONS",
    "BE_ALLOC",
    "DOMID_FIRST_RESERVED",
    "EVT_EVENT_CHANNEL",
    "EVT_RING_REF",
    "FRONTEND",
    "FRONTEND_ID",
    "MAX_UNIQUE_ID_LENGTH",
    "ONLINE",
    "REQ_EVENT_CHANNEL",
    "REQ_RING_REF",
    "RESOLUTION",
    "STATE",
    "UNIQUE_ID",
    "VERSION",
    "VERSIONS",
    "ConnectorConfig",
    "ConnectorTransport",
    "FrontendConfig",
    "backend_dir",
    "backend_root",
    "backend_state_writes",
    "connector_dir",
    "frontend_config_nodes",
    "frontend_dir",
    "libxl_dir",
    "parse_backend_path",
    "parse_bool",
    "parse_connector_transport",
    "parse_domid",
    "parse_frontend_config",
    "parse_resolution",
    "parse_transports",
    "parse_u32",
    "parse_unique_id",
    "parse_version",
    "transport_nodes",
]

# --- node names -----------------------------------------------------------------------------

STATE: Final = "state"
ONLINE: Final = "online"
FRONTEND: Final = "frontend"
FRONTEND_ID: Final = "frontend-id"
BACKEND: Final = "backend"
BACKEND_ID: Final = "backend-id"
BE_ALLOC: Final = "be-alloc"
RESOLUTION: Final = "resolution"
UNIQUE_ID: Final = "unique-id"
REQ_RING_REF: Final = "req-ring-ref"
REQ_EVENT_CHANNEL: Final = "req-event-channel"
EVT_RING_REF: Final = "evt-ring-ref"
EVT_EVENT_CHANNEL: Final = "evt-event-channel"
VERSIONS: Final = "versions"
VERSION: Final = "version"

#: Protocol versions we accept, as written to our ``versions`` node.
BACKEND_VERSIONS: Final = (1, PROTOCOL_VERSION_INT)

#: Xen's ``DOMID_FIRST_RESERVED`` (xen.h): ids from here on are not ordinary domains.
DOMID_FIRST_RESERVED: Final = 0x7FF0
MAX_UNIQUE_ID_LENGTH: Final = 255

_U32_MAX: Final = 0xFFFFFFFF
_DECIMAL = re.compile(rb"(?:0|[1-9][0-9]{0,9})")
_UNIQUE_ID = re.compile(rb"[\x21-\x7e]+")
_UNIQUE_ID_FORBIDDEN = frozenset(b",;:")

# --- paths ----------------------------------------------------------------------------------


def backend_root(backend_domid: int) -> str:
    """``/local/domain/B/backend/vdispl``: the directory the daemon watches."""
    return f"/local/domain/{backend_domid}/backend/{DEVICE_TYPE}"


def backend_dir(backend_domid: int, frontend_domid: int, devid: int) -> str:
    """``/local/domain/B/backend/vdispl/F/D``."""
    return f"{backend_root(backend_domid)}/{frontend_domid}/{devid}"


def frontend_dir(frontend_domid: int, devid: int) -> str:
    """``/local/domain/F/device/vdispl/D``."""
    return f"/local/domain/{frontend_domid}/device/{DEVICE_TYPE}/{devid}"


def connector_dir(frontend_domid: int, devid: int, index: int) -> str:
    """``/local/domain/F/device/vdispl/D/i``."""
    return f"{frontend_dir(frontend_domid, devid)}/{index}"


def libxl_dir(frontend_domid: int, devid: int) -> str:
    """``/libxl/F/device/vdispl/D``: libxl's private copy of the device's paths."""
    return f"/libxl/{frontend_domid}/device/{DEVICE_TYPE}/{devid}"


def parse_backend_path(path: str, backend_domid: int = 0) -> tuple[int, int, str] | None:
    """Which device a watch event under :func:`backend_root` concerns.

    ``…/vdispl/F/D`` gives ``(F, D, "")`` and ``…/vdispl/F/D/state`` gives ``(F, D, "state")``
    (deeper paths keep their slashes in ``rest``). Anything that is not inside one device
    directory gives None: the root itself and ``…/vdispl/F`` (e.g. a whole guest's tree was
    removed — the caller should re-list the root), paths elsewhere, and ids that are not
    canonical decimals or not valid domain ids.
    """
    prefix = backend_root(backend_domid) + "/"
    if not path.startswith(prefix):
        return None
    parts = path[len(prefix) :].split("/", 2)
    if len(parts) < 2:
        return None
    try:
        frontend_domid = parse_domid(parts[0].encode("ascii"), what=FRONTEND_ID)
        devid = parse_u32(parts[1].encode("ascii"), what="devid")
    except (ProtocolError, UnicodeEncodeError):
        return None
    rest = parts[2] if len(parts) == 3 else ""
    if len(parts) == 3 and not rest:
        return None
    return frontend_domid, devid, rest


# --- scalar values --------------------------------------------------------------------------


def _raw(value: bytes | str | None, what: str) -> bytes:
    if value is None:
        raise ProtocolError(f"{what}: node missing", what=what, value=None)
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)


def parse_u32(value: bytes | str | None, *, what: str) -> int:
    """A canonical decimal u32 (``"0"`` … ``"4294967295"``)."""
    raw = _raw(value, what)
    if not _DECIMAL.fullmatch(raw):
        raise ProtocolError(f"{what}: not a decimal number: {raw!r}", what=what, value=raw)
    number = int(raw)
    if number > _U32_MAX:
        raise ProtocolError(f"{what}: {number} does not fit in 32 bits", what=what, value=raw)
    return number


def parse_domid(value: bytes | str | None, *, what: str = FRONTEND_ID) -> int:
    """A domain id of an ordinary domain: ``0 … DOMID_FIRST_RESERVED - 1`` (0x7FEF)."""
    number = parse_u32(value, what=what)
    if number >= DOMID_FIRST_RESERVED:
        raise ProtocolError(f"{what}: {number} is not a domain id", what=what, value=number)
    return number


def parse_bool(value: bytes | str | None, *, what: str = BE_ALLOC) -> bool:
    """An integer flag (``be-alloc``, ``online``): any non-zero value is true."""
    return parse_u32(value, what=what) != 0


def parse_resolution(value: bytes | str | None, *, what: str = RESOLUTION) -> tuple[int, int]:
    """``"1920x1080"`` → ``(1920, 1080)``: canonical decimals, a size a connector can have
    (:func:`displback.protocol.edid.check_resolution`)."""
    raw = _raw(value, what)
    width_raw, sep, height_raw = raw.partition(RESOLUTION_SEPARATOR.encode())
    if not sep:
        raise ProtocolError(f"{what}: expected <W>x<H>, got {raw!r}", what=what, value=raw)
    sizes = []
    for part in (width_raw, height_raw):
        if not _DECIMAL.fullmatch(part):
            raise ProtocolError(
                f"{what}: {raw!r} is not <W>x<H> in decimal", what=what, value=raw
            )
        sizes.append(int(part))
    try:
        check_resolution(sizes[0], sizes[1])
    except EdidError as exc:
        raise ProtocolError(f"{what}: {exc}", what=what, value=raw) from None
    return sizes[0], sizes[1]


def parse_unique_id(value: bytes | str | None, *, what: str = UNIQUE_ID) -> str:
    """A connector's ``unique-id``: 1..255 printable ASCII, no space, ``,``, ``;`` or ``:``."""
    raw = _raw(value, what)
    if (
        not _UNIQUE_ID.fullmatch(raw)
        or len(raw) > MAX_UNIQUE_ID_LENGTH
        or _UNIQUE_ID_FORBIDDEN.intersection(raw)
    ):
        raise ProtocolError(f"{what}: unusable id {raw!r}", what=what, value=raw)
    return raw.decode("ascii")


def parse_version(value: bytes | str | None, *, what: str = VERSION) -> int | None:
    """The frontend's optional ``version`` node: None when missing, else one we offered."""
    if value is None:
        return None
    version = parse_u32(value, what=what)
    if version not in BACKEND_VERSIONS:
        raise ProtocolError(f"{what}: version {version} was not offered", what=what, value=version)
    return version


def backend_state_writes(state: XenbusState) -> dict[str, bytes]:
    """The backend nodes (relative to :func:`backend_dir`) to write, in one transaction, when
    switching to ``state``: always ``state``; with InitWait also ``versions`` (``b"1,2"``)."""
    writes = {STATE: state.encode()}
    if state is XenbusState.INIT_WAIT:
        writes = {
            VERSIONS: LIST_SEPARATOR.join(str(v) for v in BACKEND_VERSIONS).encode(),
            **writes,
        }
    return writes


# --- the frontend's configuration (toolstack-written) ----------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    """One connector as the toolstack configured it: index ``i``, resolution, optional id."""

    index: int
    width: int
    height: int
    unique_id: str | None


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    """The device configuration: buffer allocation mode and 1..4 connectors in index order."""

    be_alloc: bool
    connectors: tuple[ConnectorConfig, ...]


def frontend_config_nodes(max_connectors: int = LINUX_MAX_CONNECTORS) -> tuple[str, ...]:
    """Node paths relative to :func:`frontend_dir` that :func:`parse_frontend_config` reads."""
    nodes = [BE_ALLOC]
    for i in range(max_connectors):
        nodes += [f"{i}/{RESOLUTION}", f"{i}/{UNIQUE_ID}"]
    return tuple(nodes)


def parse_frontend_config(
    read: Mapping[str, bytes | None],
    perms: Mapping[str, Sequence[PermEntry]],
    trust: TrustRule,
    max_connectors: int = LINUX_MAX_CONNECTORS,
) -> FrontendConfig:
    """Validate the values of :func:`frontend_config_nodes` (missing nodes: absent or None)
    and, for every node present, its permissions (``perms``, as GET_PERMS answered) against
    ``trust``: a node the toolstack did not write raises :class:`~displback.protocol.trust.
    UntrustedNode` before its value is even looked at."""

    def trusted(node: str) -> bytes | None:
        value = read.get(node)
        if value is not None:
            trust.check(node, perms.get(node))
        return value

    be_alloc_raw = trusted(BE_ALLOC)
    be_alloc = False if be_alloc_raw is None else parse_bool(be_alloc_raw, what=BE_ALLOC)
    connectors = []
    for i in range(max_connectors):
        resolution = trusted(f"{i}/{RESOLUTION}")
        if resolution is None:
            break
        width, height = parse_resolution(resolution, what=f"{i}/{RESOLUTION}")
        uid_raw = trusted(f"{i}/{UNIQUE_ID}")
        uid = None if uid_raw is None else parse_unique_id(uid_raw, what=f"{i}/{UNIQUE_ID}")
        connectors.append(ConnectorConfig(i, width, height, uid))
    if not connectors:
        raise ProtocolError(f"no connector configured (0/{RESOLUTION} missing)", what=RESOLUTION)
    return FrontendConfig(be_alloc, tuple(connectors))


# --- the guest's transport nodes ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectorTransport:
    """Where connector ``i``'s request ring and event page live and how to signal them.

    Grant refs and ports are as the guest wrote them (guest side port numbers).
    """

    req_ring_ref: int
    req_evtchn: int
    evt_ring_ref: int
    evt_evtchn: int


_TRANSPORT_FIELDS: Final = (REQ_RING_REF, REQ_EVENT_CHANNEL, EVT_RING_REF, EVT_EVENT_CHANNEL)


def transport_nodes(count: int) -> tuple[str, ...]:
    """Node paths relative to :func:`frontend_dir` holding ``count`` connectors' transports."""
    return tuple(f"{i}/{field}" for i in range(count) for field in _TRANSPORT_FIELDS)


def parse_connector_transport(read: Mapping[str, bytes | None], index: int) -> ConnectorTransport:
    """Connector ``index``'s four transport nodes (keys relative to the frontend directory)."""
    values = []
    for field in _TRANSPORT_FIELDS:
        what = f"{index}/{field}"
        number = parse_u32(read.get(what), what=what)
        if number == 0:
            raise ProtocolError(f"{what}: 0 is not a valid grant ref or port", what=what, value=0)
        values.append(number)
    req_ring_ref, req_evtchn, evt_ring_ref, evt_evtchn = values
    if req_ring_ref == evt_ring_ref:
        what = f"{index}/{EVT_RING_REF}"
        raise ProtocolError(f"{what}: same page as the request ring", what=what, value=evt_ring_ref)
    if req_evtchn == evt_evtchn:
        what = f"{index}/{EVT_EVENT_CHANNEL}"
        raise ProtocolError(
            f"{what}: same port as the request channel", what=what, value=evt_evtchn
        )
    return ConnectorTransport(req_ring_ref, req_evtchn, evt_ring_ref, evt_evtchn)


def parse_transports(
    read: Mapping[str, bytes | None], count: int
) -> tuple[ConnectorTransport, ...]:
    """All ``count`` connectors' transports; no grant ref or port may be shared between them."""
    transports = tuple(parse_connector_transport(read, i) for i in range(count))
    refs: set[int] = set()
    ports: set[int] = set()
    for i, t in enumerate(transports):
        for field, value, seen in (
            (REQ_RING_REF, t.req_ring_ref, refs),
            (EVT_RING_REF, t.evt_ring_ref, refs),
            (REQ_EVENT_CHANNEL, t.req_evtchn, ports),
            (EVT_EVENT_CHANNEL, t.evt_evtchn, ports),
        ):
            if value in seen:
                what = f"{i}/{field}"
                raise ProtocolError(
                    f"{what}: {value} used by another connector", what=what, value=value
                )
            seen.add(value)
    return transports
