"""A simulated xenstored: the real xs_wire protocol on UNIX sockets, over the sans-I/O store.

Unmodified clients (pyxs, Debian's ``xenstore-*`` tools via ``XENSTORED_PATH``, our own trio
client) talk to it as to the C daemon. Each listening socket stands for one domain: connections
accepted on ``serve(path, domid=5)`` act as domain 5, which is how a simulated guest gets its
own view and permissions.

Per connection, one task reads and handles requests in order, and one task writes. Everything
outgoing goes through a bounded queue (:attr:`XenStored.queue_limit` packets). Replies wait for
room (a client that does not read only stalls itself); watch events caused by *other*
connections cannot wait, so a client whose queue is full when an event arrives is dropped —
the same remedy the C xenstored applies to a connection that stops consuming its output. A
header announcing more than 4096 bytes of payload also closes that connection (only that one).
"""

from __future__ import annotations

import argparse
import collections
import errno as _errno
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import trio

from displback.sim.xenstore_tree import (
    Session,
    WatchEvent,
    XenStoreTree,
    domain_path,
    parse_perms,
)
from displback.xenstore.wire import (
    MsgType,
    Packet,
    PacketReader,
    WireError,
    XenStoreError,
    split_strings,
)

__all__ = ["RunningXenStored", "XenStored", "main", "running_xenstored"]

log = logging.getLogger(__name__)

OK = b"OK\0"
QUEUE_LIMIT = 1024

_Handler = Callable[[Session, Packet], bytes]


def _one_arg(payload: bytes) -> bytes:
    """The single NUL-terminated string a request carries (xenstored's onearg), else EINVAL."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise XenStoreError("EINVAL", "expected exactly one NUL-terminated argument")
    return payload[:-1]


def _args(payload: bytes, count: int) -> list[bytes]:
    """The first ``count`` NUL-terminated strings of ``payload``, else EINVAL."""
    if not payload.endswith(b"\0"):
        raise XenStoreError("EINVAL", "argument not NUL-terminated")
    items = split_strings(payload)
    if len(items) < count:
        raise XenStoreError("EINVAL", f"expected {count} arguments")
    return items


def _text(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise XenStoreError("EINVAL", "argument is not ASCII") from None


def _h_read(s: Session, p: Packet) -> bytes:
    return s.read(_one_arg(p.payload), p.tx_id)


def _h_write(s: Session, p: Packet) -> bytes:
    if b"\0" not in p.payload:
        raise XenStoreError("EINVAL", "WRITE without path terminator")
    path, value = p.payload.split(b"\0", 1)
    s.write(path, value, p.tx_id)
    return OK


def _h_mkdir(s: Session, p: Packet) -> bytes:
    s.mkdir(_one_arg(p.payload), p.tx_id)
    return OK


def _h_rm(s: Session, p: Packet) -> bytes:
    s.rm(_one_arg(p.payload), p.tx_id)
    return OK


def _h_directory(s: Session, p: Packet) -> bytes:
    return b"".join(c.encode() + b"\0" for c in s.directory(_one_arg(p.payload), p.tx_id))


def _h_directory_part(s: Session, p: Packet) -> bytes:
    path, offset = _args(p.payload, 2)[:2]
    if not offset.isdigit():
        raise XenStoreError("EINVAL", "bad DIRECTORY_PART offset")
    return s.directory_part(path, int(offset), p.tx_id)


def _h_get_perms(s: Session, p: Packet) -> bytes:
    return b"".join(str(perm).encode() + b"\0" for perm in s.get_perms(_one_arg(p.payload),
                                                                        p.tx_id))


def _h_set_perms(s: Session, p: Packet) -> bytes:
    items = _args(p.payload, 2)
    s.set_perms(items[0], parse_perms(items[1:]), p.tx_id)
    return OK


def _h_unwatch(s: Session, p: Packet) -> bytes:
    path, token = _args(p.payload, 2)[:2]
    s.unwatch(path, token)
    return OK


def _h_transaction_start(s: Session, p: Packet) -> bytes:
    if p.tx_id != 0:
        raise XenStoreError("EBUSY", "TRANSACTION_START inside a transaction")
    return str(s.transaction_start()).encode() + b"\0"


def _h_transaction_end(s: Session, p: Packet) -> bytes:
    arg = _one_arg(p.payload)
    if arg not in (b"T", b"F"):
        raise XenStoreError("EINVAL", "TRANSACTION_END takes T or F")
    if p.tx_id == 0:
        raise XenStoreError("ENOENT", "TRANSACTION_END outside a transaction")
    s.transaction_end(p.tx_id, arg == b"T")
    return OK


def _h_get_domain_path(s: Session, p: Packet) -> bytes:
    arg = _one_arg(p.payload)
    if not arg.isdigit() or int(arg) > 0xFFFF:
        raise XenStoreError("EINVAL", "bad domain id")
    return domain_path(int(arg)).encode() + b"\0"


def _h_reset_watches(s: Session, p: Packet) -> bytes:
    s.reset_watches()
    return OK


_HANDLERS: dict[int, _Handler] = {
    MsgType.READ: _h_read,
    MsgType.WRITE: _h_write,
    MsgType.MKDIR: _h_mkdir,
    MsgType.RM: _h_rm,
    MsgType.DIRECTORY: _h_directory,
    MsgType.DIRECTORY_PART: _h_directory_part,
    MsgType.GET_PERMS: _h_get_perms,
    MsgType.SET_PERMS: _h_set_perms,
    MsgType.UNWATCH: _h_unwatch,
    MsgType.TRANSACTION_START: _h_transaction_start,
    MsgType.TRANSACTION_END: _h_transaction_end,
    MsgType.GET_DOMAIN_PATH: _h_get_domain_path,
    MsgType.RESET_WATCHES: _h_reset_watches,
}


def handle_request(session: Session, request: Packet) -> list[Packet]:
    """The packets to send for one request, in order: the reply (or ERROR), and for WATCH the
    initial WATCH_EVENT after it. Pure: the store changes, nothing is sent."""
    try:
        if request.type == MsgType.WATCH:
            path, token = _args(request.payload, 2)[:2]
            initial = session.watch(path, token)
            return [Packet.reply(request, OK), Packet(MsgType.WATCH_EVENT, 0, 0,
                                                      initial.payload())]
        handler = _HANDLERS.get(request.type)
        if handler is None:
            raise XenStoreError("ENOSYS", f"message type {request.type}")
        return [Packet.reply(request, handler(session, request))]
    except XenStoreError as exc:
        return [Packet.error(request, exc.name)]


@dataclass
class _ClientConnection:
    session: Session
    outbox: trio.MemorySendChannel[Packet]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    dropped: str = ""


class XenStored:
    """A simulated xenstored owning one :class:`XenStoreTree`; serve it on any number of
    sockets, each acting as one domain. Domain 0's basics (``/local/domain/0/name`` =
    ``Domain-0``, ``domid`` = ``0``) exist from the start, as after ``xen-init-dom0``."""

    def __init__(self, *, queue_limit: int = QUEUE_LIMIT) -> None:
        self.tree = XenStoreTree()
        self.queue_limit = queue_limit
        self.connections: list[_ClientConnection] = []
        #: Requests answered on sockets, per domain the socket acts as: how much work a
        #: client (the daemon is domain 0's) asked of the store.
        self.requests_served: collections.Counter[int] = collections.Counter()
        dom0 = self.tree.session(0)
        dom0.write("/local/domain/0/name", b"Domain-0")
        dom0.write("/local/domain/0/domid", b"0")
        dom0.close()

    def session(
        self, domid: int = 0, on_event: Callable[[WatchEvent], None] | None = None
    ) -> Session:
        """An in-process client of the same store (close it when done)."""
        return self.tree.session(domid, on_event)

    async def serve(
        self,
        socket_path: str | os.PathLike[str],
        domid: int = 0,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on UNIX socket ``socket_path``; accepted connections act as ``domid``.
        Runs until cancelled, then removes the socket file."""
        path = os.fspath(socket_path)
        if os.path.exists(path):
            os.unlink(path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            sock.listen(64)
            listener = trio.SocketListener(sock)
        except BaseException:
            sock.close()
            raise
        try:
            async with listener, trio.open_nursery() as nursery:
                task_status.started(path)
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._serve_connection, stream, domid)
        finally:
            with suppress(FileNotFoundError):
                os.unlink(path)

    async def _serve_connection(self, stream: trio.SocketStream, domid: int) -> None:
        send, receive = trio.open_memory_channel[Packet](self.queue_limit)
        conn: _ClientConnection | None = None

        def on_event(event: WatchEvent) -> None:
            assert conn is not None
            if conn.dropped:
                return
            try:
                send.send_nowait(Packet(MsgType.WATCH_EVENT, 0, 0, event.payload()))
            except trio.WouldBlock:
                conn.dropped = "watch events overflowed the output queue"
                conn.scope.cancel()

        conn = _ClientConnection(self.tree.session(domid, on_event), send)
        self.connections.append(conn)
        try:
            with conn.scope:
                async with stream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop, conn, receive, stream)
                    await self._read_loop(conn, stream)
                    nursery.cancel_scope.cancel()
        except Exception:
            # A bug in handling one client's request must not take the daemon down.
            log.exception("xenstored: internal error on a domain %d connection", domid)
            conn.dropped = "internal error"
        finally:
            conn.session.close()
            self.connections.remove(conn)
            if conn.dropped:
                log.warning("xenstored: dropped domain %d connection: %s", domid, conn.dropped)

    async def _read_loop(self, conn: _ClientConnection, stream: trio.SocketStream) -> None:
        reader = PacketReader()
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            try:
                requests = list(reader.feed(data))
            except WireError as exc:
                # Packets before the bad header are still answered, like a stream parser would.
                conn.dropped = f"malformed packet: {exc}"
                return
            for request in requests:
                self.requests_served[conn.session.domid] += 1
                for packet in handle_request(conn.session, request):
                    await conn.outbox.send(packet)

    async def _write_loop(
        self,
        conn: _ClientConnection,
        receive: trio.MemoryReceiveChannel[Packet],
        stream: trio.SocketStream,
    ) -> None:
        async with receive:
            async for packet in receive:
                try:
                    await stream.send_all(packet.pack())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    conn.scope.cancel()
                    return

    def drop_connections(self, domid: int, reason: str) -> int:
        """Drop every socket connection acting as ``domid``, as a restarting or overloaded
        xenstored does; returns how many. The clients see end-of-file."""
        dropped = 0
        for conn in list(self.connections):
            if conn.session.domid == domid and not conn.dropped:
                conn.dropped = reason
                conn.scope.cancel()
                dropped += 1
        return dropped

    def introduce_domain(self, domid: int) -> None:
        self.tree.introduce_domain(domid)

    def release_domain(self, domid: int) -> None:
        self.tree.release_domain(domid)

    async def wait_for(
        self,
        path: str,
        predicate: Callable[[bytes | None], bool],
        *,
        timeout: float,
    ) -> bytes | None:
        """Wait (as domain 0, with a watch) until ``predicate(value)`` holds for the node at
        ``path`` (``None`` while it does not exist); return that value. ``trio.TooSlowError``
        after ``timeout`` seconds."""
        changed = trio.Event()

        def on_event(event: WatchEvent) -> None:
            changed.set()

        session = self.tree.session(0, on_event)
        try:
            session.watch(path, "wait_for")
            with trio.fail_after(timeout):
                while True:
                    try:
                        value: bytes | None = session.read(path)
                    except XenStoreError as exc:
                        if exc.errno != _errno.ENOENT:
                            raise
                        value = None
                    if predicate(value):
                        return value
                    await changed.wait()
                    changed = trio.Event()
        finally:
            session.close()


@dataclass
class RunningXenStored:
    """What :func:`running_xenstored` yields: the daemon and its socket paths."""

    xenstored: XenStored
    socket_path: str
    domain_sockets: dict[int, str]
    _nursery: trio.Nursery
    _directory: Path

    async def add_domain_socket(self, domid: int) -> str:
        """Start serving one more socket acting as ``domid``; returns its path."""
        path = str(self._directory / f"xenstored-dom{domid}.sock")
        await self._nursery.start(self.xenstored.serve, path, domid)
        self.domain_sockets[domid] = path
        return path

    @property
    def tree(self) -> XenStoreTree:
        return self.xenstored.tree


@asynccontextmanager
async def running_xenstored(
    directory: str | os.PathLike[str],
    domains: Sequence[int] = (),
    *,
    xenstored: XenStored | None = None,
) -> AsyncIterator[RunningXenStored]:
    """Serve a (new) :class:`XenStored` in-process: domain 0 on ``<directory>/xenstored.sock``
    and one socket per domid in ``domains``; stop when the block exits."""
    daemon = xenstored or XenStored()
    base = Path(directory)
    async with trio.open_nursery() as nursery:
        path = str(base / "xenstored.sock")
        await nursery.start(daemon.serve, path, 0)
        running = RunningXenStored(daemon, path, {}, nursery, base)
        for domid in domains:
            await running.add_domain_socket(domid)
        yield running
        nursery.cancel_scope.cancel()


def _parse_domain_socket(text: str) -> tuple[int, str]:
    domid, sep, path = text.partition(":")
    if not sep or not domid.isdigit() or not path or int(domid) > 0xFFFF:
        raise argparse.ArgumentTypeError(f"expected DOMID:PATH, got {text!r}")
    return int(domid), path


async def _run(socket_path: str, domain_sockets: list[tuple[int, str]]) -> None:
    daemon = XenStored()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve, socket_path, 0)
            for domid, path in domain_sockets:
                await nursery.start(daemon.serve, path, domid)
            log.info("xenstored: serving %s", socket_path)
            async for signum in signals:
                log.info("xenstored: %s, stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m displback.sim.xenstored",
        description="Simulated xenstored speaking xs_wire on UNIX sockets.",
    )
    parser.add_argument("--socket", required=True, help="socket path for domain 0")
    parser.add_argument(
        "--domain-socket", action="append", default=[], type=_parse_domain_socket,
        metavar="DOMID:PATH", help="extra socket whose connections act as DOMID",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    trio.run(_run, args.socket, args.domain_socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
