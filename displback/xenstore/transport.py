"""Byte pipes to xenstored: a UNIX socket or the kernel's ``/dev/xen/xenbus`` device.

The client (``client.py``) speaks xs_wire over whichever of these :func:`open_transport`
picks; a transport only moves bytes. It sends one whole packet per :meth:`Transport.send`
because the xenbus device insists on that (a packet split across two ``write(2)`` calls is
refused), and it returns ``b""`` from :meth:`Transport.receive` at end of stream.
"""

from __future__ import annotations

import os
import stat
from typing import Protocol

import trio

__all__ = ["DeviceTransport", "SocketTransport", "Transport", "open_transport"]

_READ_SIZE = 65536


class Transport(Protocol):
    """What the client needs from a connection: whole packets out, bytes in, close."""

    @property
    def name(self) -> str: ...

    async def send(self, packet: bytes) -> None:
        """Send one whole packet; raise ``ConnectionError`` if the peer is gone."""

    async def receive(self) -> bytes:
        """Return the next bytes received (any amount); ``b""`` at end of stream."""

    async def aclose(self) -> None:
        """Close; a task blocked in :meth:`receive` or :meth:`send` then fails promptly."""


class SocketTransport:
    """xenstored's UNIX socket (``/run/xenstored/socket``) or a simulated xenstored's."""

    def __init__(self, stream: trio.SocketStream, name: str) -> None:
        self._stream = stream
        self.name = name

    @classmethod
    async def open(cls, path: str) -> SocketTransport:
        return cls(await trio.open_unix_socket(path), path)

    async def send(self, packet: bytes) -> None:
        try:
            await self._stream.send_all(packet)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionResetError(f"{self.name}: connection lost while sending") from exc

    async def receive(self) -> bytes:
        try:
            return bytes(await self._stream.receive_some(_READ_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionResetError(f"{self.name}: connection lost while receiving") from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


class DeviceTransport:
    """The xenbus character device, read and written with ``os.read``/``os.write``.

    The device is opened non-blocking and trio is told about readiness with
    ``wait_readable``/``wait_writable``; every ``os.write`` carries exactly one packet.
    """

    def __init__(self, fd: int, name: str) -> None:
        self._fd: int | None = fd
        self.name = name

    @classmethod
    async def open(cls, path: str) -> DeviceTransport:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        return cls(fd, path)

    def _live_fd(self) -> int:
        if self._fd is None:
            raise ConnectionResetError(f"{self.name}: device closed")
        return self._fd

    async def send(self, packet: bytes) -> None:
        while True:
            fd = self._live_fd()
            try:
                written = os.write(fd, packet)
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_writable, fd)
                continue
            except OSError as exc:
                raise ConnectionResetError(f"{self.name}: write failed: {exc}") from exc
            if written != len(packet):
                raise ConnectionResetError(
                    f"{self.name}: device took {written} of {len(packet)} bytes of a packet"
                )
            return

    async def receive(self) -> bytes:
        while True:
            fd = self._live_fd()
            try:
                return os.read(fd, _READ_SIZE)
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_readable, fd)
            except OSError as exc:
                raise ConnectionResetError(f"{self.name}: read failed: {exc}") from exc

    async def _wait(self, waiter: _FdWaiter, fd: int) -> None:
        try:
            await waiter(fd)
        except trio.ClosedResourceError as exc:
            raise ConnectionResetError(f"{self.name}: device closed") from exc

    async def aclose(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        await trio.lowlevel.checkpoint()


class _FdWaiter(Protocol):
    async def __call__(self, fd: int, /) -> None: ...


async def open_transport(path: str) -> SocketTransport | DeviceTransport:
    """Open ``path``: a character device (``/dev/xen/xenbus``) or else a UNIX socket.

    Raises ``ConnectionRefusedError``/``FileNotFoundError`` (``OSError``) if nothing is there.
    """
    if stat.S_ISCHR(os.stat(path).st_mode):
        return await DeviceTransport.open(path)
    return await SocketTransport.open(path)
