"""Log records to journald natively, with the structlog context as journal fields.

journald's native protocol (systemd.journal-fields(7), "Native Journal Protocol"): one
datagram per record on ``/run/systemd/journal/socket``, each field ``KEY=value\\n``, or
``KEY\\n`` + the value's length (64-bit little-endian) + the value + ``\\n`` when the value
holds a newline. A record too big for a datagram goes in a sealed memfd whose descriptor is
the only content of the datagram. We send it ourselves (no libsystemd binding to install):
a bound ``domid=3`` becomes ``DOMID=3``, so ``journalctl -u displback DOMID=3`` finds it.

Field names are what journald accepts: upper-case ASCII letters, digits and ``_``, not
starting with ``_`` or a digit, at most 64 characters. A context key that would collide with
a field we set (``MESSAGE``, ``PRIORITY``, ``CODE_*``, …) gets the prefix ``DISPLBACK_``.

A record that cannot be sent (journald gone, its socket full for longer than
:data:`SEND_TIMEOUT_S`) is written to stderr instead, which systemd also puts in the journal.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TextIO

__all__ = [
    "JOURNAL_SOCKET",
    "JournalHandler",
    "JournalLogger",
    "JournalSender",
    "encode_fields",
    "field_name",
    "render_for_journal",
    "under_systemd",
]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "displback"
#: How long one record may wait for room in journald's socket before it goes to stderr.
SEND_TIMEOUT_S = 0.2
#: syslog priorities of log levels (journald's ``PRIORITY``).
PRIORITIES = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
}
#: Fields this module sets itself; context keys of these names are prefixed.
_OWN_FIELDS = frozenset(
    {"MESSAGE", "PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC", "SYSLOG_IDENTIFIER", "LOGGER"}
)
#: Event-dict keys that are not context fields (structlog's own, or rendered otherwise).
_SKIPPED = frozenset({"event", "level", "timestamp", "exception", "logger", "_record"})
_INVALID = re.compile(r"[^A-Z0-9_]")


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """Whether systemd started us with the journal at hand (its stream or an invocation)."""
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def field_name(key: str) -> str:
    """``key`` as a journal field name (``domid`` → ``DOMID``, ``zero-copy`` → ``ZERO_COPY``)."""
    name = _INVALID.sub("_", key.upper()).lstrip("_0123456789")[:64]
    if not name or name in _OWN_FIELDS:
        name = f"DISPLBACK_{name}"[:64].rstrip("_")
    return name


def encode_fields(fields: Iterable[tuple[str, object]]) -> bytes:
    """The native-protocol datagram of ``fields`` (names already valid)."""
    out = bytearray()
    for name, value in fields:
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        key = name.encode("ascii")
        if b"\n" in data:
            out += key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


def render_for_journal(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> bytes:
    """structlog's last processor: the record as one journal datagram."""
    level = str(event_dict.get("level", method_name))
    context = [(k, v) for k, v in event_dict.items() if k not in _SKIPPED and v is not None]
    call_site = {"pathname", "lineno", "func_name"}
    text = " ".join(
        [str(event_dict.get("event", ""))] + [f"{k}={v}" for k, v in context if k not in call_site]
    )
    exception = event_dict.get("exception")
    if exception:
        text += "\n" + str(exception)
    fields: list[tuple[str, object]] = [
        ("MESSAGE", text),
        ("PRIORITY", PRIORITIES.get(level, 6)),
        ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
    ]
    if "pathname" in event_dict:
        fields += [
            ("CODE_FILE", event_dict["pathname"]),
            ("CODE_LINE", event_dict.get("lineno", 0)),
            ("CODE_FUNC", event_dict.get("func_name", "")),
        ]
    if event_dict.get("logger"):
        fields.append(("LOGGER", event_dict["logger"]))
    fields += [(field_name(k), v) for k, v in context if k not in call_site]
    return encode_fields(fields)


class JournalSender:
    """Sends datagrams to journald (or, failing that, their ``MESSAGE`` to ``fallback``)."""

    def __init__(self, path: str = JOURNAL_SOCKET, fallback: TextIO | None = None) -> None:
        self.path = path
        self._fallback = fallback
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(SEND_TIMEOUT_S)

    def send(self, payload: bytes) -> None:
        try:
            try:
                self._sock.sendto(payload, self.path)
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_memfd(payload)
        except OSError:
            self._to_fallback(payload)

    def _send_memfd(self, payload: bytes) -> None:
        """A record too large for a datagram: pass a sealed memfd holding it."""
        fd = os.memfd_create("journal-record", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            written = 0
            while written < len(payload):
                written += os.write(fd, payload[written:])
            os.lseek(fd, 0, os.SEEK_SET)
            fcntl.fcntl(
                fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL,
            )
            rights = array.array("i", [fd]).tobytes()
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, self.path)
        finally:
            os.close(fd)

    def _to_fallback(self, payload: bytes) -> None:
        out = self._fallback if self._fallback is not None else sys.stderr
        message = _message_of(payload)
        with contextlib.suppress(OSError, ValueError):
            print(message, file=out, flush=True)

    def close(self) -> None:
        self._sock.close()


def _message_of(payload: bytes) -> str:
    """The ``MESSAGE`` of a datagram (for the stderr fallback)."""
    i = 0
    while i < len(payload):
        end = payload.index(b"\n", i)
        line = payload[i:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = end + 1
        else:
            key = line
            (size,) = struct.unpack_from("<Q", payload, end + 1)
            value = payload[end + 9 : end + 9 + size]
            i = end + 9 + size + 1
        if key == b"MESSAGE":
            return value.decode("utf-8", "replace")
    return ""


class JournalLogger:
    """structlog's logger for the journal: every method sends the rendered datagram."""

    def __init__(self, sender: JournalSender) -> None:
        self._sender = sender

    def msg(self, payload: bytes) -> None:
        self._sender.send(payload)

    debug = info = warning = warn = error = err = critical = exception = fatal = log = msg


class JournalLoggerFactory:
    """Hands out :class:`JournalLogger` objects sharing one sender."""

    def __init__(self, sender: JournalSender) -> None:
        self._logger = JournalLogger(sender)

    def __call__(self, *args: Any) -> JournalLogger:
        return self._logger


class JournalHandler(logging.Handler):
    """stdlib ``logging`` records (libraries, the KMS display) to the journal."""

    def __init__(self, sender: JournalSender) -> None:
        super().__init__()
        self._sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            level = record.levelname.lower()
            payload = encode_fields(
                [
                    ("MESSAGE", text),
                    ("PRIORITY", PRIORITIES.get(level, 6)),
                    ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
                    ("CODE_FILE", record.pathname),
                    ("CODE_LINE", record.lineno),
                    ("CODE_FUNC", record.funcName),
                    ("LOGGER", record.name),
                ]
            )
            self._sender.send(payload)
        except Exception:
            self.handleError(record)
