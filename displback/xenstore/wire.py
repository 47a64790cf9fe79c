"""The xs_wire protocol as bytes in, packets out: no sockets, no trio (reference §13).

Both ends use this codec: our trio client in the daemon and the simulated xenstored. A
message is a 16-byte header (type, req_id, tx_id, len, all u32 little-endian) and at most
4096 bytes of payload; errors travel as an ERROR reply whose payload is an errno name.
"""

from __future__ import annotations

import enum
import errno as _errno
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, cast

__all__ = [
    "ERROR_NAMES",
    "HEADER",
    "MAX_PAYLOAD",
    "MAX_ABS_PATH",
    "MAX_REL_PATH",
    "MsgType",
    "Packet",
    "PacketReader",
    "Access",
    "MAX_DOMID",
    "Perm",
    "WireError",
    "XenStoreError",
    "check_path",
    "join_strings",
    "split_strings",
]

HEADER = struct.Struct("<IIII")
MAX_PAYLOAD = 4096
MAX_ABS_PATH = 3072
MAX_REL_PATH = 2048
#: A domid as XenStore carries it (permissions, INTRODUCE): 16 bits.
MAX_DOMID = 0xFFFF

Access = Literal["r", "w", "b", "n"]


class MsgType(enum.IntEnum):
    """``XS_*`` message types (xs_wire.h ``enum xsd_sockmsg_type``)."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26
    INVALID = 0xFFFF


# xs_wire.h's xsd_errors table, in its order; the wire carries the names.
ERROR_NAMES: tuple[str, ...] = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)


class WireError(ValueError):
    """The byte stream itself is broken (oversized or malformed packet): drop the connection."""


class XenStoreError(OSError):
    """An ERROR reply: ``errno`` is the number, ``name`` the errno name on the wire."""

    def __init__(self, name: str, detail: str = "") -> None:
        number = getattr(_errno, name, _errno.EIO) if name in ERROR_NAMES else _errno.EIO
        message = f"{name}: {detail}" if detail else name
        super().__init__(number, message)
        self.name = name if name in ERROR_NAMES else "EIO"

    @classmethod
    def from_errno(cls, number: int, detail: str = "") -> XenStoreError:
        name = _errno.errorcode.get(number, "EIO")
        return cls(name if name in ERROR_NAMES else "EIO", detail)


@dataclass(frozen=True, slots=True)
class Packet:
    """One xs_wire message: header fields and raw payload."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def __post_init__(self) -> None:
        if len(self.payload) > MAX_PAYLOAD:
            raise WireError(f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")
        for name in ("type", "req_id", "tx_id"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFFFFFF:
                raise WireError(f"{name} {value} does not fit in u32")

    def pack(self) -> bytes:
        return HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload

    @property
    def error_name(self) -> str | None:
        """The errno name of an ERROR packet, else ``None``."""
        if self.type != MsgType.ERROR:
            return None
        return self.payload.split(b"\0", 1)[0].decode("ascii", "replace")

    def raise_for_error(self) -> None:
        """Raise :class:`XenStoreError` if this is an ERROR reply."""
        name = self.error_name
        if name is not None:
            raise XenStoreError(name)

    @classmethod
    def error(cls, request: Packet, name: str) -> Packet:
        """The ERROR reply to ``request`` carrying errno ``name``."""
        return cls(MsgType.ERROR, request.req_id, request.tx_id, name.encode("ascii") + b"\0")

    @classmethod
    def reply(cls, request: Packet, payload: bytes) -> Packet:
        """A successful reply to ``request``: same type, ids echoed."""
        return cls(request.type, request.req_id, request.tx_id, payload)


class PacketReader:
    """Reassembles packets from a byte stream fed in arbitrary chunks.

    A header announcing more than 4096 bytes of payload is a broken peer: xenstored drops
    such a connection, and :meth:`feed` raises :class:`WireError` so the caller can too.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[Packet]:
        """Add ``data``; yield every packet that is now complete."""
        self._buf += data
        while len(self._buf) >= HEADER.size:
            type_, req_id, tx_id, length = HEADER.unpack_from(self._buf)
            if length > MAX_PAYLOAD:
                raise WireError(f"announced payload of {length} bytes exceeds {MAX_PAYLOAD}")
            end = HEADER.size + length
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[HEADER.size : end])
            del self._buf[:end]
            yield Packet(type_, req_id, tx_id, payload)

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole packet."""
        return len(self._buf)


def join_strings(*parts: str | bytes, terminate_last: bool = True) -> bytes:
    """NUL-join ``parts``; the last one is NUL-terminated unless ``terminate_last`` is false
    (WRITE carries its value raw, after ``path\\0``)."""
    encoded = [p.encode() if isinstance(p, str) else p for p in parts]
    out = b"\0".join(encoded)
    return out + b"\0" if terminate_last else out


def split_strings(payload: bytes) -> list[bytes]:
    """Split a payload of NUL-terminated strings (DIRECTORY, GET_PERMS, WATCH_EVENT)."""
    if not payload:
        return []
    items = payload.split(b"\0")
    if items[-1] == b"":
        items.pop()
    return items


_PATH_CHARS = re.compile(r"[A-Za-z0-9\-/_@]*")


def check_path(path: str | bytes, *, watch: bool = False) -> str:
    """Return ``path`` as text if xenstored would accept it, else raise ``XenStoreError(EINVAL)``.

    Absolute paths start with ``/`` (at most 3072 bytes), relative ones are under the
    connection's domain home (at most 2048); characters ``[A-Za-z0-9-/_@]``, no ``//``, no
    trailing ``/`` except the root itself. ``@``-paths (``@releaseDomain``) only when ``watch``.
    """
    if isinstance(path, bytes):
        try:
            path = path.decode("ascii")
        except UnicodeDecodeError:
            raise XenStoreError("EINVAL", f"path {path!r} is not ASCII") from None
    if not path:
        raise XenStoreError("EINVAL", "empty path")
    if path.startswith("@") and not watch:
        raise XenStoreError("EINVAL", f"special path {path!r} is only valid for a watch")
    if _PATH_CHARS.fullmatch(path) is None:
        bad = next(c for c in path if _PATH_CHARS.fullmatch(c) is None)
        raise XenStoreError("EINVAL", f"path {path!r} contains invalid character {bad!r}")
    if "//" in path:
        raise XenStoreError("EINVAL", f"path {path!r} contains '//'")
    if path.endswith("/") and path != "/":
        raise XenStoreError("EINVAL", f"path {path!r} ends with '/'")
    limit = MAX_ABS_PATH if path.startswith("/") else MAX_REL_PATH
    if len(path) > limit:
        raise XenStoreError("EINVAL", f"path of {len(path)} bytes exceeds {limit}")
    return path


@dataclass(frozen=True, slots=True)
class Perm:
    """One permission entry: ``access`` (``r``/``w``/``b``/``n``) for domain ``domid``.

    In a list, the first entry names the owner and the access everyone else gets.
    """

    domid: int
    access: Access

    def __post_init__(self) -> None:
        if self.access not in ("r", "w", "b", "n"):
            raise ValueError(f"permission access {self.access!r} is not one of r, w, b, n")
        if isinstance(self.domid, bool) or not 0 <= self.domid <= MAX_DOMID:
            raise ValueError(f"permission domid {self.domid!r} is not in 0..{MAX_DOMID}")

    @classmethod
    def parse(cls, text: str | bytes) -> Perm:
        """Parse ``"b0"``, ``"r5"``…; ``ValueError`` saying what is wrong otherwise."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        access, digits = text[:1], text[1:]
        if not digits.isascii() or not digits.isdigit() or len(digits) > 5:
            raise ValueError(f"permission {text!r} does not end in a decimal domid")
        if access not in ("r", "w", "b", "n"):
            raise ValueError(f"permission {text!r} does not start with r, w, b or n")
        return cls(int(digits), cast(Access, access))

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"
