"""The daemon's trio-native XenStore client: one connection, concurrent requests, watch streams.

Theory of operation
-------------------
A :class:`XenStoreClient` owns one transport (xenstored's UNIX socket or ``/dev/xen/xenbus``,
see ``transport.py``) and a nursery with one manager task. The manager runs a reader for the
current connection; the reader matches replies to requests by ``req_id`` (any order, from any
number of tasks) and hands ``WATCH_EVENT`` packets to the watch whose token they carry. Events
for tokens nobody holds are dropped, so one watch's events never leak into another's stream.

Every request has a deadline (the client's ``timeout``, or the call's). On expiry the caller
gets :class:`XenStoreTimeoutError` and forgets the ``req_id``; a late reply finds no owner and
is discarded.

When the connection drops (EOF, a reset, a broken packet stream), every request waiting on it
fails at once with :class:`XenStoreConnectionError`, or with :class:`TransactionLost` (EAGAIN)
if it belonged to a transaction, which xenstored forgets with the connection. The manager then
reconnects with exponential backoff, re-registers every live watch and puts one synthetic event
(the watched path) into each stream, since changes may have been missed. Requests issued while
disconnected wait for the reconnection within their own deadline.

Why not pyxs: measured here, pyxs 0.4.1 hangs a request forever when xenstored closes the
socket, its watch monitor spins on events for paths it does not watch, it refuses
``/dev/xen/xenbus``, and it needs a thread per client. It stays only as a test cross-check.
"""

from __future__ import annotations

import abc
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TypedDict, TypeVar, Unpack

import trio

from displback.xenstore.transport import Transport, open_transport
from displback.xenstore.wire import (
    MAX_DOMID,
    MAX_PAYLOAD,
    MsgType,
    Packet,
    PacketReader,
    Perm,
    WireError,
    XenStoreError,
    check_path,
    join_strings,
    split_strings,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "ClientOptions",
    "Perm",
    "Transaction",
    "TransactionLost",
    "WatchStream",
    "XenStoreClient",
    "XenStoreClosedError",
    "XenStoreConnectionError",
    "XenStoreError",
    "XenStoreTimeoutError",
    "open_xenstore",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Opener = Callable[[str], Awaitable[Transport]]

DEFAULT_TIMEOUT = 5.0
DEFAULT_WATCH_BUFFER = 256
DEFAULT_TX_ATTEMPTS = 8


class ClientOptions(TypedDict, total=False):
    """The keyword options of :class:`XenStoreClient` (defaults there), passed on as given."""

    timeout: float
    reconnect: bool
    backoff_initial: float
    backoff_max: float
    watch_buffer: int
    opener: Opener


class XenStoreTimeoutError(TimeoutError):
    """No reply within the deadline (or no connection came back within it)."""


class XenStoreConnectionError(ConnectionError):
    """The connection to xenstored is gone; the request's outcome is unknown."""


class XenStoreClosedError(XenStoreConnectionError):
    """The client was closed."""


class TransactionLost(XenStoreError, XenStoreConnectionError):
    """The connection dropped during a transaction: xenstored forgot it. EAGAIN, so retry."""

    def __init__(self, detail: str) -> None:
        XenStoreError.__init__(self, "EAGAIN", detail)


class WatchStream:
    """Paths reported by one watch, as an async iterator of ``str``.

    Buffered up to ``maxlen`` distinct paths; a path already waiting is not queued twice. On
    overflow the buffer collapses to the watched path itself ("something under here changed,
    re-read it all"), ``overflows`` counts it and a warning is logged: the reader never blocks
    and memory never grows.
    """

    def __init__(self, path: str, token: str, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError("a watch buffer must hold at least one path")
        self.path = path
        self.token = token
        self.maxlen = maxlen
        self.overflows = 0
        self._queue: dict[str, None] = {}
        self._wakeup = trio.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._swallow_initial = False

    def _push(self, path: str) -> None:
        if self._swallow_initial:
            # xenstored's initial event after a re-registration: the synthetic one stands in.
            self._swallow_initial = False
            if path == self.path:
                return
        self._enqueue(path)

    def _enqueue(self, path: str) -> None:
        if self._closed or self._error is not None or path in self._queue:
            return
        if len(self._queue) >= self.maxlen:
            self._queue.clear()
            self._queue[self.path] = None
            self.overflows += 1
            log.warning(
                "xenstore watch %s overflowed (%d paths): coalesced to one event",
                self.path,
                self.maxlen,
            )
        else:
            self._queue[path] = None
        self._wakeup.set()

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._closed:
            self._error = error
            self._wakeup.set()

    def _close(self) -> None:
        self._closed = True
        self._queue.clear()
        self._wakeup.set()

    @property
    def pending(self) -> int:
        """Events buffered and not yet taken."""
        return len(self._queue)

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> str:
        while True:
            while not self._queue:
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise StopAsyncIteration
                await self._wakeup.wait()
                self._wakeup = trio.Event()
            await trio.lowlevel.checkpoint()
            if self._queue:  # it may have been closed while we yielded
                path = next(iter(self._queue))
                del self._queue[path]
                return path


class _LiveConnection:
    """One live transport and what belongs to it."""

    def __init__(self, transport: Transport, generation: int) -> None:
        self.transport = transport
        self.generation = generation
        self.reader = PacketReader()
        self.send_lock = trio.Lock()
        self.scope = trio.CancelScope()
        self.lost = False
        self.started = trio.current_time()


class _PendingReply:
    __slots__ = ("conn", "done", "error", "op", "path", "reply", "tx_id")

    def __init__(self, conn: _LiveConnection, op: MsgType, path: str, tx_id: int) -> None:
        self.conn = conn
        self.op = op
        self.path = path
        self.tx_id = tx_id
        self.done = trio.Event()
        self.reply: Packet | None = None
        self.error: BaseException | None = None


def _ok(op: MsgType, path: str, reply: Packet) -> None:
    if reply.payload.rstrip(b"\0") != b"OK":
        log.debug("xenstore %s %s: reply %r instead of OK", op.name, path, reply.payload)


def _text(item: bytes) -> str:
    return item.decode("ascii", "replace")


class _Operations(abc.ABC):
    """The node operations, shared by the client and a transaction (which binds a tx_id)."""

    @abc.abstractmethod
    async def _call(
        self, op: MsgType, payload: bytes, path: str, timeout: float | None
    ) -> Packet:
        """Send one request (in this object's transaction, if any) and return its reply."""

    async def read(self, path: str, *, timeout: float | None = None) -> bytes:
        """The node's value; ``XenStoreError`` (``ENOENT`` if it does not exist)."""
        path = check_path(path)
        reply = await self._call(MsgType.READ, join_strings(path), path, timeout)
        return reply.payload

    async def read_or_none(self, path: str, *, timeout: float | None = None) -> bytes | None:
        """The node's value, or ``None`` if it does not exist."""
        try:
            return await self.read(path, timeout=timeout)
        except XenStoreError as exc:
            if exc.name == "ENOENT" and not isinstance(exc, TransactionLost):
                return None
            raise

    async def exists(self, path: str, *, timeout: float | None = None) -> bool:
        return await self.read_or_none(path, timeout=timeout) is not None

    async def write(self, path: str, value: bytes | str, *, timeout: float | None = None) -> None:
        """Set the value (``str`` is UTF-8 encoded), creating missing parents."""
        path = check_path(path)
        data = value.encode() if isinstance(value, str) else bytes(value)
        payload = join_strings(path, data, terminate_last=False)
        _ok(MsgType.WRITE, path, await self._call(MsgType.WRITE, payload, path, timeout))

    async def mkdir(self, path: str, *, timeout: float | None = None) -> None:
        path = check_path(path)
        _ok(MsgType.MKDIR, path, await self._call(MsgType.MKDIR, join_strings(path), path, timeout))

    async def rm(self, path: str, *, timeout: float | None = None) -> None:
        """Remove the node and its subtree."""
        path = check_path(path)
        _ok(MsgType.RM, path, await self._call(MsgType.RM, join_strings(path), path, timeout))

    async def directory(self, path: str, *, timeout: float | None = None) -> list[str]:
        """Names of the node's children (falls back to DIRECTORY_PART past 4096 bytes)."""
        path = check_path(path)
        try:
            reply = await self._call(MsgType.DIRECTORY, join_strings(path), path, timeout)
        except XenStoreError as exc:
            if exc.name != "E2BIG" or isinstance(exc, TransactionLost):
                raise
            return await self._directory_parts(path, timeout)
        return [_text(name) for name in split_strings(reply.payload)]

    async def _directory_parts(self, path: str, timeout: float | None) -> list[str]:
        for _ in range(DEFAULT_TX_ATTEMPTS):
            names: list[str] = []
            generation: bytes | None = None
            offset = 0
            while True:
                payload = join_strings(path, str(offset))
                reply = await self._call(MsgType.DIRECTORY_PART, payload, path, timeout)
                gen, sep, rest = reply.payload.partition(b"\0")
                if not sep:
                    raise XenStoreError("EIO", f"DIRECTORY_PART {path}: reply lacks gencnt")
                if generation is None:
                    generation = gen
                elif gen != generation:
                    break  # the directory changed between parts: start again
                if rest in (b"", b"\0"):
                    return names
                done = rest.endswith(b"\0\0")
                chunk = rest[:-1] if done else rest
                names.extend(_text(n) for n in split_strings(chunk))
                offset += len(chunk)
                if done:
                    return names
        raise XenStoreError("EAGAIN", f"DIRECTORY_PART {path}: directory kept changing")

    async def get_perms(self, path: str, *, timeout: float | None = None) -> list[Perm]:
        """The node's permissions; the first entry is the owner (and everyone's default)."""
        path = check_path(path)
        reply = await self._call(MsgType.GET_PERMS, join_strings(path), path, timeout)
        try:
            return [Perm.parse(item) for item in split_strings(reply.payload)]
        except ValueError as exc:
            raise XenStoreError("EIO", f"GET_PERMS {path}: {exc}") from None

    async def set_perms(
        self, path: str, perms: Sequence[Perm], *, timeout: float | None = None
    ) -> None:
        """Replace the node's permissions; ``perms[0]`` is the owner."""
        path = check_path(path)
        if not perms:
            raise XenStoreError("EINVAL", f"SET_PERMS {path}: needs at least the owner entry")
        payload = join_strings(path, *(str(p) for p in perms))
        _ok(MsgType.SET_PERMS, path, await self._call(MsgType.SET_PERMS, payload, path, timeout))


class Transaction(_Operations):
    """Node operations bound to one transaction; made by :meth:`XenStoreClient.transaction`."""

    def __init__(self, client: XenStoreClient, tx_id: int, conn: _LiveConnection) -> None:
        self._client = client
        self.tx_id = tx_id
        self._conn = conn
        self._ended = False

    async def _call(
        self, op: MsgType, payload: bytes, path: str, timeout: float | None
    ) -> Packet:
        if self._ended:
            raise RuntimeError(f"transaction {self.tx_id} has already ended")
        return await self._client._request(op, payload, path, timeout, tx=self)

    async def _end(self, commit: bool, timeout: float | None) -> None:
        payload = b"T\0" if commit else b"F\0"
        try:
            reply = await self._client._request(
                MsgType.TRANSACTION_END, payload, "", timeout, tx=self
            )
        finally:
            self._ended = True
        _ok(MsgType.TRANSACTION_END, "", reply)


class XenStoreClient(_Operations):
    """A XenStore connection; create it with :meth:`connect` (or :func:`open_xenstore`)."""

    def __init__(
        self,
        path: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        reconnect: bool = True,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        watch_buffer: int = DEFAULT_WATCH_BUFFER,
        opener: Opener = open_transport,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.path = path
        self.timeout = timeout
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.watch_buffer = watch_buffer
        self._opener = opener
        self._pending: dict[int, _PendingReply] = {}
        self._watches: dict[str, WatchStream] = {}
        self._live: _LiveConnection | None = None
        self._conn: _LiveConnection | None = None
        self._ready = trio.Event()
        self._broken: XenStoreConnectionError | None = None
        self._closed = False
        self._next_req_id = 0
        self._next_token = 0
        self.generation = 0

    # ----------------------------------------------------------------- lifetime

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, path: str, **options: Unpack[ClientOptions]
    ) -> AsyncIterator[XenStoreClient]:
        """Connect to ``path`` (socket or xenbus device) and run the client inside the block.

        The first connection must succeed (``XenStoreConnectionError`` otherwise); later
        drops are reconnected if ``reconnect``.
        """
        client = cls(path, **options)
        transport = await client._open()
        body_error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._manage, transport)
            try:
                yield client
            except BaseException as exc:
                # Re-raised below, outside the nursery, so the caller sees its own exception
                # rather than an ExceptionGroup around it.
                body_error = exc
            finally:
                client._shutdown()
                nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error

    @property
    def connected(self) -> bool:
        return self._live is not None

    async def _open(self) -> Transport:
        try:
            with trio.fail_after(self.timeout):
                return await self._opener(self.path)
        except (OSError, trio.TooSlowError) as exc:
            raise XenStoreConnectionError(
                f"cannot connect to xenstored at {self.path}: {exc!r}"
            ) from exc

    def _shutdown(self) -> None:
        self._closed = True
        error = XenStoreClosedError("the XenStore client was closed")
        for pending in list(self._pending.values()):
            self._finish(pending, error)
        for stream in list(self._watches.values()):
            stream._fail(error)
        if self._conn is not None:
            self._conn.scope.cancel()
        self._ready.set()

    async def _manage(self, transport: Transport) -> None:
        delay = self.backoff_initial
        while True:
            self.generation += 1
            conn = _LiveConnection(transport, self.generation)
            self._conn = conn
            try:
                with conn.scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._read_loop, conn)
                        if conn.generation == 1:
                            self._set_live(conn)
                        else:
                            nursery.start_soon(self._restore, conn)
            finally:
                if not conn.lost:
                    # Cancelled from outside (the client's owner is going away): the
                    # connection ends here, and nothing may be sent on it any more.
                    self._lose(conn, "client cancelled", quiet=True)
                with trio.CancelScope(shield=True):
                    await conn.transport.aclose()
            if self._closed or not self.reconnect:
                return
            if trio.current_time() - conn.started >= self.backoff_max:
                delay = self.backoff_initial
            while True:
                await trio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                try:
                    transport = await self._open()
                    break
                except XenStoreConnectionError as exc:
                    log.info("xenstore: reconnect failed (%s), retrying in %.2fs", exc, delay)

    def _set_live(self, conn: _LiveConnection) -> None:
        self._live = conn
        self._ready.set()

    def _lose(self, conn: _LiveConnection, reason: str, *, quiet: bool = False) -> None:
        """Forget ``conn``: fail everything waiting on it and let the manager reconnect."""
        if conn.lost:
            return
        conn.lost = True
        conn.scope.cancel()
        if self._live is conn:
            self._live = None
        if self._ready.is_set() and not self._closed:
            self._ready = trio.Event()
        for pending in list(self._pending.values()):
            if pending.conn is not conn:
                continue
            what = f"{pending.op.name} {pending.path}".rstrip()
            if pending.tx_id:
                error: BaseException = TransactionLost(f"{reason} during {what}")
            else:
                error = XenStoreConnectionError(f"{reason} while waiting for {what}")
            self._finish(pending, error)
        if self._closed or quiet:
            return
        if self.reconnect:
            log.warning("xenstore: %s; reconnecting", reason)
        else:
            self._broken = XenStoreConnectionError(f"{reason} (reconnect disabled)")
            for stream in list(self._watches.values()):
                stream._fail(self._broken)
            self._ready.set()

    @staticmethod
    def _finish(pending: _PendingReply, error: BaseException) -> None:
        if not pending.done.is_set():
            pending.error = error
            pending.done.set()

    # ------------------------------------------------------------------ reading

    async def _read_loop(self, conn: _LiveConnection) -> None:
        try:
            while True:
                data = await conn.transport.receive()
                if not data:
                    self._lose(conn, f"xenstored at {self.path} closed the connection")
                    return
                for packet in conn.reader.feed(data):
                    self._dispatch(packet)
        except WireError as exc:
            self._lose(conn, f"broken packet stream from xenstored at {self.path}: {exc}")
        except OSError as exc:
            self._lose(conn, f"connection to xenstored at {self.path} lost: {exc}")

    def _dispatch(self, packet: Packet) -> None:
        if packet.type == MsgType.WATCH_EVENT:
            parts = split_strings(packet.payload)
            if len(parts) < 2:
                log.debug("xenstore: malformed WATCH_EVENT %r dropped", packet.payload)
                return
            path, token = _text(parts[0]), _text(parts[1])
            stream = self._watches.get(token)
            if stream is None:
                log.debug("xenstore: event for unknown watch token %r dropped", token)
                return
            stream._push(path)
            return
        pending = self._pending.pop(packet.req_id, None)
        if pending is None:
            log.debug("xenstore: late or unknown reply (req_id %d) discarded", packet.req_id)
            return
        pending.reply = packet
        pending.done.set()

    # ---------------------------------------------------------------- requesting

    def _allocate_req_id(self) -> int:
        while True:
            self._next_req_id = (self._next_req_id + 1) & 0xFFFFFFFF
            if self._next_req_id not in self._pending:
                return self._next_req_id

    async def _wait_live(self) -> _LiveConnection:
        while True:
            if self._closed:
                raise XenStoreClosedError("the XenStore client was closed")
            if self._broken is not None:
                raise self._broken
            if self._live is not None:
                return self._live
            await self._ready.wait()

    async def _call(
        self, op: MsgType, payload: bytes, path: str, timeout: float | None
    ) -> Packet:
        return await self._request(op, payload, path, timeout)

    async def _request(
        self,
        op: MsgType,
        payload: bytes,
        path: str,
        timeout: float | None,
        *,
        tx: Transaction | None = None,
        conn: _LiveConnection | None = None,
    ) -> Packet:
        reply, _ = await self._exchange(op, payload, path, timeout, tx=tx, conn=conn)
        return reply

    async def _exchange(
        self,
        op: MsgType,
        payload: bytes,
        path: str,
        timeout: float | None,
        *,
        tx: Transaction | None = None,
        conn: _LiveConnection | None = None,
    ) -> tuple[Packet, _LiveConnection]:
        """Send one request and wait for its reply: the reply and the connection it came on."""
        what = f"{op.name} {path}".rstrip()
        if len(payload) > MAX_PAYLOAD:
            raise XenStoreError("E2BIG", f"{what}: payload of {len(payload)} bytes > {MAX_PAYLOAD}")
        limit = self.timeout if timeout is None else timeout
        pending: _PendingReply | None = None
        req_id = 0
        with trio.move_on_after(limit):
            try:
                if tx is not None:
                    conn = tx._conn
                elif conn is None:
                    conn = await self._wait_live()
                if conn.lost:  # checked with no await before registering: _lose sees it
                    if tx is not None:
                        raise TransactionLost(f"connection lost before {what}")
                    raise XenStoreConnectionError(f"connection lost before {what}")
                req_id = self._allocate_req_id()
                pending = _PendingReply(conn, op, path, tx.tx_id if tx is not None else 0)
                self._pending[req_id] = pending
                await self._send(conn, Packet(op, req_id, pending.tx_id, payload))
                await pending.done.wait()
            finally:
                if pending is not None and self._pending.get(req_id) is pending:
                    del self._pending[req_id]
        if pending is None or not pending.done.is_set():
            state = "no reply" if pending is not None else "no connection to xenstored"
            raise XenStoreTimeoutError(f"{what}: {state} within {limit:g}s")
        if pending.error is not None:
            raise pending.error
        reply = pending.reply
        assert reply is not None
        if reply.type == MsgType.ERROR:
            raise XenStoreError(reply.error_name or "EIO", what)
        if reply.type != op:
            raise XenStoreError("EIO", f"{what}: reply of type {reply.type}")
        return reply, pending.conn

    async def _send(self, conn: _LiveConnection, packet: Packet) -> None:
        data = packet.pack()
        async with conn.send_lock:
            if conn.lost:
                return  # _lose already failed the pending request
            # A half-sent packet would corrupt the stream, so the send is not cancelled by the
            # caller's deadline; a send stalled past the client timeout drops the connection.
            with trio.CancelScope(shield=True) as shield:
                shield.deadline = trio.current_time() + self.timeout
                try:
                    await conn.transport.send(data)
                except OSError as exc:
                    self._lose(conn, f"sending to xenstored at {self.path} failed: {exc}")
            if shield.cancelled_caught:
                self._lose(conn, f"sending to xenstored at {self.path} stalled")

    # ----------------------------------------------------------------- domain

    async def get_domain_path(self, domid: int, *, timeout: float | None = None) -> str:
        """``/local/domain/<domid>`` as xenstored says it."""
        if isinstance(domid, bool) or not 0 <= domid <= MAX_DOMID:
            raise XenStoreError("EINVAL", f"domid {domid!r} is not in 0..{MAX_DOMID}")
        reply = await self._call(MsgType.GET_DOMAIN_PATH, join_strings(str(domid)), "", timeout)
        return _text(reply.payload.rstrip(b"\0"))

    # ---------------------------------------------------------------- watches

    @asynccontextmanager
    async def watch(
        self, path: str, *, buffer: int | None = None, timeout: float | None = None
    ) -> AsyncIterator[WatchStream]:
        """Watch ``path`` (and its subtree); yields a :class:`WatchStream` of changed paths.

        The first event is xenstored's initial one for ``path``. The watch is removed
        (UNWATCH) when the block exits.
        """
        path = check_path(path, watch=True)
        self._next_token += 1
        token = f"displback-w{self._next_token}"
        stream = WatchStream(path, token, self.watch_buffer if buffer is None else buffer)
        self._watches[token] = stream
        try:
            await self._request(MsgType.WATCH, join_strings(path, token), path, timeout)
        except BaseException:
            self._watches.pop(token, None)
            raise
        try:
            yield stream
        finally:
            self._watches.pop(token, None)
            refused = stream._error is not None  # re-registration refused: nothing to remove
            stream._close()
            if self._live is not None and not refused:
                await self._unwatch(self._live, path, token)

    async def _unwatch(self, conn: _LiveConnection, path: str, token: str) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self._request(
                    MsgType.UNWATCH, join_strings(path, token), path, None, conn=conn
                )
            except (XenStoreError, XenStoreConnectionError, XenStoreTimeoutError) as exc:
                log.debug("xenstore: UNWATCH %s failed: %s", path, exc)

    async def _restore(self, conn: _LiveConnection) -> None:
        """After a reconnect: re-register every watch, then go live and wake the streams."""
        for token, stream in list(self._watches.items()):
            if self._watches.get(token) is not stream:
                continue
            payload = join_strings(stream.path, token)
            stream._swallow_initial = True
            try:
                await self._request(MsgType.WATCH, payload, stream.path, None, conn=conn)
            except XenStoreError as exc:
                stream._swallow_initial = False
                stream._fail(exc)
            except (XenStoreConnectionError, XenStoreTimeoutError) as exc:
                self._lose(conn, f"re-registering watches failed: {exc}")
                return
            if self._watches.get(token) is not stream:  # unwatched meanwhile
                await self._unwatch(conn, stream.path, token)
        self._set_live(conn)
        log.info("xenstore: reconnected to %s, %d watches restored", self.path, len(self._watches))
        for stream in list(self._watches.values()):
            stream._enqueue(stream.path)

    # ----------------------------------------------------------- transactions

    @asynccontextmanager
    async def transaction(self, *, timeout: float | None = None) -> AsyncIterator[Transaction]:
        """Start a transaction; commit when the block ends, abort if it raises.

        A conflicting commit raises ``XenStoreError`` with ``name == "EAGAIN"``; so does any
        operation after the connection dropped (:class:`TransactionLost`).
        """
        reply, conn = await self._exchange(MsgType.TRANSACTION_START, b"\0", "", timeout)
        digits = reply.payload.rstrip(b"\0")
        if not digits.isdigit() or not 0 < int(digits) <= 0xFFFFFFFF:
            raise XenStoreError("EIO", f"TRANSACTION_START: bad transaction id {digits!r}")
        tx = Transaction(self, int(digits), conn)
        try:
            yield tx
        except BaseException:
            if not tx._ended and not conn.lost:
                with trio.CancelScope(shield=True):
                    try:
                        await tx._end(False, timeout)
                    except (XenStoreError, XenStoreConnectionError, XenStoreTimeoutError) as exc:
                        log.debug("xenstore: aborting transaction %d failed: %s", tx.tx_id, exc)
            raise
        if not tx._ended:
            await tx._end(True, timeout)

    async def run_transaction(
        self,
        fn: Callable[[Transaction], Awaitable[T]],
        *,
        attempts: int = DEFAULT_TX_ATTEMPTS,
        timeout: float | None = None,
    ) -> T:
        """Run ``await fn(tx)`` in a transaction and commit; on EAGAIN run it all again.

        Gives up after ``attempts`` tries by re-raising the last EAGAIN error.
        """
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        for attempt in range(1, attempts + 1):
            try:
                async with self.transaction(timeout=timeout) as tx:
                    result = await fn(tx)
                return result
            except XenStoreError as exc:
                if exc.name != "EAGAIN":
                    raise
                if attempt == attempts:
                    exc.add_note(f"transaction gave up after {attempts} attempts")
                    raise
                log.debug("xenstore: transaction attempt %d got EAGAIN, retrying", attempt)
                await trio.sleep(random.uniform(0, 0.002 * attempt))
        raise AssertionError("unreachable")


def open_xenstore(
    path: str, **options: Unpack[ClientOptions]
) -> AbstractAsyncContextManager[XenStoreClient]:
    """``async with open_xenstore(path) as xs:`` — the same as :meth:`XenStoreClient.connect`."""
    return XenStoreClient.connect(path, **options)
