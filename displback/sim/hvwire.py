"""Framing of the simulated hypervisor's socket protocol: JSON messages with fds attached.

Each message on the UNIX stream socket is a 4-byte little-endian length, then that many bytes
of UTF-8 JSON (an object). File descriptors travel as ``SCM_RIGHTS`` ancillary data on the
first byte of the length prefix, so the receiver collects them with the prefix. Requests are
``{"op": name, ...arguments}``; replies are ``{...results}`` or ``{"errno": n, "message": s}``.
The client side is blocking (the platform devices mirror blocking ioctls); the server side is
trio.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
from typing import Any

import trio

__all__ = [
    "MAX_FDS",
    "MAX_MESSAGE",
    "Message",
    "decode",
    "encode",
    "recv_message",
    "send_message",
    "trio_recv_message",
    "trio_send_message",
]

Message = dict[str, Any]

MAX_FDS = 8
MAX_MESSAGE = 16 << 20
_HEADER = struct.Struct("<I")
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def encode(message: Message) -> bytes:
    """The framed bytes of ``message``."""
    body = json.dumps(message, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> Message:
    """Parse one message body; ``ConnectionError`` for anything that is not a JSON object."""
    try:
        message = json.loads(body)
    except ValueError as exc:
        raise ConnectionError(f"malformed hypervisor message: {exc}") from None
    if not isinstance(message, dict):
        raise ConnectionError("hypervisor message is not an object")
    return message


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


def _length_of(header: bytes) -> int:
    (length,) = _HEADER.unpack(header)
    if length > MAX_MESSAGE:
        raise ConnectionError(f"hypervisor message of {length} bytes is too long")
    return int(length)


def send_message(sock: socket.socket, message: Message, fds: list[int] | None = None) -> None:
    """Send one message (blocking), with ``fds`` attached."""
    data = encode(message)
    ancdata = _rights(fds)
    sent = sock.sendmsg([data], ancdata)
    if sent < len(data):
        sock.sendall(data[sent:])


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < count:
        chunk = sock.recv(count - len(chunks))
        if not chunk:
            raise ConnectionError("hypervisor connection closed mid-message")
        chunks += chunk
    return bytes(chunks)


def recv_message(sock: socket.socket) -> tuple[Message, list[int]]:
    """Receive one message (blocking) and the fds attached to it (close-on-exec)."""
    header, ancdata, _flags, _addr = sock.recvmsg(_HEADER.size, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
    fds = _fds_of(ancdata)
    try:
        if not header:
            raise ConnectionError("hypervisor connection closed")
        header += _recv_exactly(sock, _HEADER.size - len(header))
        return decode(_recv_exactly(sock, _length_of(header))), fds
    except BaseException:
        for fd in fds:
            _close_quietly(fd)
        raise


async def trio_send_message(
    sock: trio.socket.SocketType, message: Message, fds: list[int] | None = None
) -> None:
    """Send one message from the trio server, with ``fds`` attached."""
    data = encode(message)
    ancdata = _rights(fds)
    sent = await sock.sendmsg([data], ancdata)
    while sent < len(data):
        sent += await sock.send(data[sent:])


async def _trio_recv_exactly(sock: trio.socket.SocketType, count: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < count:
        chunk = await sock.recv(count - len(chunks))
        if not chunk:
            raise ConnectionError("client closed mid-message")
        chunks += chunk
    return bytes(chunks)


async def trio_recv_message(sock: trio.socket.SocketType) -> tuple[Message, list[int]] | None:
    """Receive one message in the trio server; None at a clean end of stream."""
    header, ancdata, _flags, _addr = await sock.recvmsg(
        _HEADER.size, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC
    )
    fds = _fds_of(ancdata)
    try:
        if not header:
            return None
        header += await _trio_recv_exactly(sock, _HEADER.size - len(header))
        return decode(await _trio_recv_exactly(sock, _length_of(header))), fds
    except BaseException:
        for fd in fds:
            _close_quietly(fd)
        raise


def _rights(fds: list[int] | None) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
