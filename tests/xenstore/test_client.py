"""The trio XenStore client against a scripted in-test xenstored: matching, timeouts, drops,
reconnects, watch isolation and overflow, transactions, path and permission handling."""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from displback.sim.xenstored import RunningXenStored, XenStored, running_xenstored
from displback.xenstore.client import (
    Perm,
    Transaction,
    TransactionLost,
    XenStoreClient,
    XenStoreClosedError,
    XenStoreConnectionError,
    XenStoreTimeoutError,
    open_xenstore,
)
from displback.xenstore.transport import DeviceTransport, SocketTransport, open_transport
from displback.xenstore.wire import MsgType, Packet, PacketReader, XenStoreError, split_strings

# --------------------------------------------------------------------------- fake xenstored


class FakeConn:
    """One accepted client connection; the test reads its requests and writes replies."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = PacketReader()
        self.inbox: list[Packet] = []

    async def recv(self) -> Packet:
        with trio.fail_after(2):
            while not self.inbox:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("client closed")
                self.inbox.extend(self.reader.feed(data))
        return self.inbox.pop(0)

    async def send(self, packet: Packet) -> None:
        await self.stream.send_all(packet.pack())

    async def reply(self, request: Packet, payload: bytes) -> None:
        await self.send(Packet.reply(request, payload))

    async def event(self, path: str, token: str) -> None:
        await self.send(Packet(MsgType.WATCH_EVENT, 0, 0, f"{path}\0{token}\0".encode()))

    async def close(self) -> None:
        await self.stream.aclose()


class FakeXenstored:
    """A UNIX socket server handing each accepted connection to the test."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._send, self._recv = trio.open_memory_channel[FakeConn](math.inf)
        self._listener: trio.SocketListener | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(self.path)
        sock.listen()
        self._listener = listener = trio.SocketListener(sock)
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return
            await self._send.send(FakeConn(stream))

    async def accept(self) -> FakeConn:
        with trio.fail_after(3):
            return await self._recv.receive()

    async def stop(self) -> None:
        """Stop listening and remove the socket: reconnecting now fails."""
        assert self._listener is not None
        await self._listener.aclose()
        os.unlink(self.path)


@dataclass
class Store:
    """Just enough xenstored semantics to script behaviour-level tests."""

    data: dict[str, bytes] = field(default_factory=dict)
    perms: dict[str, list[str]] = field(default_factory=dict)
    watches: dict[str, str] = field(default_factory=dict)  # token -> path
    tx_end_replies: list[str] = field(default_factory=list)  # "OK" or an errno name
    next_tx: int = 1
    seen: list[Packet] = field(default_factory=list)

    def children(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted({k[len(prefix) :].split("/")[0] for k in self.data if k.startswith(prefix)})


async def serve_store(conn: FakeConn, store: Store) -> None:
    """Answer requests on ``conn`` from ``store`` until the client goes away."""
    while True:
        try:
            request = await conn.recv()
        except (EOFError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        store.seen.append(request)
        args = [a.decode() for a in split_strings(request.payload)]
        events: list[tuple[str, str]] = []
        payload = b"OK\0"
        error = None
        op = request.type
        if op == MsgType.READ:
            if args[0] in store.data:
                payload = store.data[args[0]]
            else:
                error = "ENOENT"
        elif op == MsgType.WRITE:
            path, _, value = request.payload.partition(b"\0")
            store.data[path.decode()] = value
            events = [(t, path.decode()) for t, w in store.watches.items()
                      if path.decode().startswith(w)]
        elif op == MsgType.MKDIR:
            store.data.setdefault(args[0], b"")
        elif op == MsgType.RM:
            for key in [k for k in store.data if k == args[0] or k.startswith(args[0] + "/")]:
                del store.data[key]
        elif op == MsgType.DIRECTORY:
            payload = b"".join(c.encode() + b"\0" for c in store.children(args[0]))
        elif op == MsgType.GET_PERMS:
            payload = b"".join(p.encode() + b"\0" for p in store.perms.get(args[0], ["n0"]))
        elif op == MsgType.SET_PERMS:
            store.perms[args[0]] = args[1:]
        elif op == MsgType.WATCH:
            store.watches[args[1]] = args[0]
            events = [(args[1], args[0])]
        elif op == MsgType.UNWATCH:
            store.watches.pop(args[1], None)
        elif op == MsgType.TRANSACTION_START:
            payload = f"{store.next_tx}\0".encode()
            store.next_tx += 1
        elif op == MsgType.TRANSACTION_END:
            outcome = store.tx_end_replies.pop(0) if store.tx_end_replies else "OK"
            if outcome != "OK":
                error = outcome
        elif op == MsgType.GET_DOMAIN_PATH:
            payload = f"/local/domain/{args[0]}\0".encode()
        else:
            error = "ENOSYS"
        try:
            if error is not None:
                await conn.send(Packet.error(request, error))
            else:
                await conn.reply(request, payload)
            for token, changed in events:
                await conn.event(changed, token)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="xs")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def fake(nursery: trio.Nursery, sock_dir: str) -> AsyncIterator[FakeXenstored]:
    server = FakeXenstored(os.path.join(sock_dir, "socket"))
    await nursery.start(server.run)
    yield server


def fast_client(path: str) -> AbstractAsyncContextManager[XenStoreClient]:
    return open_xenstore(path, timeout=0.5, backoff_initial=0.01, backoff_max=0.05)


async def wait_disconnected(xs: XenStoreClient) -> None:
    with trio.fail_after(2):
        while xs.connected:
            await trio.sleep(0.005)


# ------------------------------------------------------------------------ request matching


async def test_concurrent_requests_are_matched_to_out_of_order_replies(
    fake: FakeXenstored,
) -> None:
    async with fast_client(fake.path) as xs:
        conn = await fake.accept()
        results: dict[str, bytes] = {}

        async def read(path: str) -> None:
            results[path] = await xs.read(path)

        async with trio.open_nursery() as nursery:
            for name in ("/a", "/b", "/c"):
                nursery.start_soon(read, name)
            requests = [await conn.recv() for _ in range(3)]
            assert len({r.req_id for r in requests}) == 3
            for request in reversed(requests):
                await conn.reply(request, b"value of " + request.payload.rstrip(b"\0"))
        assert results == {p: b"value of " + p.encode() for p in ("/a", "/b", "/c")}


async def test_request_without_reply_times_out_and_its_late_reply_is_discarded(
    fake: FakeXenstored,
) -> None:
    async with fast_client(fake.path) as xs:
        conn = await fake.accept()
        with pytest.raises(XenStoreTimeoutError, match=r"READ /slow: no reply within 0.1s"):
            await xs.read("/slow", timeout=0.1)
        late = await conn.recv()
        await conn.reply(late, b"too late")
        async with trio.open_nursery() as nursery:
            result: list[bytes] = []

            async def read() -> None:
                result.append(await xs.read("/next"))

            nursery.start_soon(read)
            request = await conn.recv()
            assert request.req_id != late.req_id
            await conn.reply(request, b"fresh")
        assert result == [b"fresh"]
        assert isinstance(XenStoreTimeoutError("x"), TimeoutError)


async def test_client_default_timeout_applies_when_the_call_gives_none(
    fake: FakeXenstored,
) -> None:
    async with open_xenstore(fake.path, timeout=0.15) as xs:
        await fake.accept()
        start = trio.current_time()
        with pytest.raises(XenStoreTimeoutError):
            await xs.read("/never")
        assert 0.14 <= trio.current_time() - start < 0.5


async def test_error_reply_raises_xenstore_error_and_read_or_none_maps_enoent(
    fake: FakeXenstored, nursery: trio.Nursery
) -> None:
    store = Store(data={"/present": b"1"})
    async with fast_client(fake.path) as xs:
        nursery.start_soon(serve_store, await fake.accept(), store)
        with pytest.raises(XenStoreError) as exc:
            await xs.read("/missing")
        assert exc.value.name == "ENOENT" and "READ /missing" in str(exc.value)
        assert await xs.read_or_none("/missing") is None
        assert await xs.read_or_none("/present") == b"1"
        assert await xs.exists("/present") and not await xs.exists("/missing")
        with pytest.raises(XenStoreError) as exc:
            await xs.read_or_none("@releaseDomain")
        assert exc.value.name == "EINVAL"


async def test_operations_put_the_documented_payloads_on_the_wire(
    fake: FakeXenstored, nursery: trio.Nursery
) -> None:
    store = Store()
    async with fast_client(fake.path) as xs:
        nursery.start_soon(serve_store, await fake.accept(), store)
        await xs.write("/vm/5/name", "guest")
        await xs.write("/vm/5/raw", b"\x01\x02")
        await xs.mkdir("/vm/6")
        await xs.rm("/vm/6")
        assert await xs.directory("/vm/5") == ["name", "raw"]
        await xs.set_perms("/vm/5", [Perm(0, "n"), Perm(5, "r")])
        assert await xs.get_perms("/vm/5") == [Perm(0, "n"), Perm(5, "r")]
        assert await xs.get_domain_path(7) == "/local/domain/7"
    wire = [(MsgType(p.type), p.tx_id, p.payload) for p in store.seen]
    assert wire == [
        (MsgType.WRITE, 0, b"/vm/5/name\0guest"),
        (MsgType.WRITE, 0, b"/vm/5/raw\0\x01\x02"),
        (MsgType.MKDIR, 0, b"/vm/6\0"),
        (MsgType.RM, 0, b"/vm/6\0"),
        (MsgType.DIRECTORY, 0, b"/vm/5\0"),
        (MsgType.SET_PERMS, 0, b"/vm/5\0n0\0r5\0"),
        (MsgType.GET_PERMS, 0, b"/vm/5\0"),
        (MsgType.GET_DOMAIN_PATH, 0, b"7\0"),
    ]


async def test_get_perms_reads_the_whole_list_owner_first_also_in_a_transaction(
    fake: FakeXenstored, nursery: trio.Nursery
) -> None:
    """GET_PERMS answers NUL-terminated strings, the owner's entry first (C xenstored's
    perms_to_strings); an answer that is not such a list is EIO, never a guess."""
    store = Store(perms={"/n": ["n0", "r5", "b7"], "/bad": ["n0", "x5"], "/empty": []})
    async with fast_client(fake.path) as xs:
        nursery.start_soon(serve_store, await fake.accept(), store)
        assert await xs.get_perms("/n") == [Perm(0, "n"), Perm(5, "r"), Perm(7, "b")]
        async with xs.transaction() as tx:
            assert await tx.get_perms("/n") == [Perm(0, "n"), Perm(5, "r"), Perm(7, "b")]
        with pytest.raises(XenStoreError) as exc:
            await xs.get_perms("/bad")
        assert exc.value.name == "EIO" and "x5" in str(exc.value)
        assert await xs.get_perms("/empty") == []
    [in_tx] = [p for p in store.seen if p.type == MsgType.GET_PERMS and p.tx_id]
    assert in_tx.payload == b"/n\0"


async def test_directory_over_4096_bytes_is_read_in_directory_parts(fake: FakeXenstored) -> None:
    names = [f"child-{i:04d}-{'x' * 40}" for i in range(150)]
    blob = b"".join(n.encode() + b"\0" for n in names)
    async with fast_client(fake.path) as xs:
        conn = await fake.accept()

        async def server() -> None:
            request = await conn.recv()
            assert request.type == MsgType.DIRECTORY
            await conn.send(Packet.error(request, "E2BIG"))
            while True:
                request = await conn.recv()
                assert request.type == MsgType.DIRECTORY_PART
                path, offset = split_strings(request.payload)
                assert path == b"/big"
                start = int(offset)
                chunk = blob[start : start + 2000]
                cut = chunk.rfind(b"\0") + 1
                last = start + cut >= len(blob)
                await conn.reply(request, b"42\0" + chunk[:cut] + (b"\0" if last else b""))
                if last:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            assert await xs.directory("/big") == names


async def test_invalid_paths_are_refused_before_anything_is_sent(fake: FakeXenstored) -> None:
    async with fast_client(fake.path) as xs:
        conn = await fake.accept()
        for bad in ("", "/a//b", "/a/", "/sp ace", "/" + "a" * 3100, "@releaseDomain"):
            with pytest.raises(XenStoreError) as exc:
                await xs.write(bad, "v")
            assert exc.value.name == "EINVAL"
        with pytest.raises(XenStoreError, match="E2BIG"):
            await xs.write("/big", b"x" * 4096)
        with pytest.raises(XenStoreError, match="EINVAL"):
            await xs.get_domain_path(70000)
        assert conn.inbox == [] and conn.reader.pending == 0


# ------------------------------------------------------------------ drops and reconnects


async def test_dropped_connection_fails_every_pending_request_promptly(
    fake: FakeXenstored,
) -> None:
    async with open_xenstore(fake.path, timeout=5, reconnect=False) as xs:
        conn = await fake.accept()
        errors: list[BaseException] = []

        async def read(path: str) -> None:
            try:
                await xs.read(path)
            except XenStoreConnectionError as exc:
                errors.append(exc)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "/one")
            nursery.start_soon(read, "/two")
            await conn.recv()
            await conn.recv()
            await conn.close()
        assert trio.current_time() - start < 1
        assert len(errors) == 2
        assert all("closed the connection while waiting for READ" in str(e) for e in errors)
        with pytest.raises(XenStoreConnectionError, match="reconnect disabled"):
            await xs.read("/three")
        assert not xs.connected


async def test_oversized_header_from_server_drops_the_connection(fake: FakeXenstored) -> None:
    async with open_xenstore(fake.path, timeout=5, reconnect=False) as xs:
        conn = await fake.accept()
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                with pytest.raises(XenStoreConnectionError, match="broken packet stream"):
                    await xs.read("/x")

            nursery.start_soon(read)
            request = await conn.recv()
            header = Packet(MsgType.READ, request.req_id, 0, b"").pack()[:12]
            await conn.stream.send_all(header + (5000).to_bytes(4, "little"))


async def test_pending_requests_fail_on_drop_even_when_reconnecting_and_later_ones_succeed(
    fake: FakeXenstored, nursery: trio.Nursery
) -> None:
    store = Store(data={"/k": b"v"})
    async with fast_client(fake.path) as xs:
        conn = await fake.accept()
        async with trio.open_nursery() as inner:

            async def read() -> None:
                with pytest.raises(XenStoreConnectionError):
                    await xs.read("/k", timeout=5)

            inner.start_soon(read)
            await conn.recv()
            await conn.close()
        nursery.start_soon(serve_store, await fake.accept(), store)
        assert await xs.read("/k") == b"v"
        assert xs.generation == 2


async def test_requests_issued_while_disconnected_wait_for_the_reconnect(
    fake: FakeXenstored, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Store(data={"/k": b"v"})
    # Virtual seconds: the clock jumps whenever every task waits (even on a worker thread).
    async with open_xenstore(fake.path, timeout=3600, backoff_initial=0.01,
                             backoff_max=0.05) as xs:
        conn = await fake.accept()
        await fake.stop()
        await conn.close()
        await wait_disconnected(xs)
        result: list[bytes] = []

        async def read() -> None:
            result.append(await xs.read("/k"))

        async with trio.open_nursery() as inner:
            inner.start_soon(read)
            caplog.set_level(logging.INFO, "displback.xenstore.client")
            await trio.sleep(0.2)  # (mock clock) several failed reconnect attempts
            assert caplog.text.count("reconnect failed") >= 3
            assert result == []
            await nursery.start(fake.run)
            nursery.start_soon(serve_store, await fake.accept(), store)
        assert result == [b"v"]


async def test_request_while_disconnected_times_out_if_xenstored_stays_away(
    fake: FakeXenstored,
) -> None:
    async with fast_client(fake.path) as xs:
        conn = await fake.accept()
        await fake.stop()
        await conn.close()
        await wait_disconnected(xs)
        with pytest.raises(XenStoreTimeoutError, match="no connection to xenstored within"):
            await xs.read("/k", timeout=0.2)


async def test_reconnect_reregisters_watches_and_delivers_one_synthetic_event_each(
    fake: FakeXenstored, nursery: trio.Nursery
) -> None:
    first, second = Store(), Store()
    async with fast_client(fake.path) as xs:
        conn = await fake.accept()
        nursery.start_soon(serve_store, conn, first)
        async with xs.watch("/backend/vdispl") as a, xs.watch("/local/domain/5") as b:
            assert await a.__anext__() == "/backend/vdispl"
            assert await b.__anext__() == "/local/domain/5"
            await conn.close()
            nursery.start_soon(serve_store, await fake.accept(), second)
            with trio.fail_after(2):
                assert await a.__anext__() == "/backend/vdispl"
                assert await b.__anext__() == "/local/domain/5"
            assert sorted(second.watches.items()) == sorted(
                [(a.token, "/backend/vdispl"), (b.token, "/local/domain/5")]
            )
            await xs.write("/backend/vdispl/5/0/state", "1")
            with trio.fail_after(2):
                assert await a.__anext__() == "/backend/vdispl/5/0/state"
            assert b.pending == 0
        assert second.watches == {}


async def test_reconnect_gives_exactly_one_event_even_if_the_initial_one_precedes_the_ack(
    fake: FakeXenstored,
) -> None:
    # Via /dev/xen/xenbus the kernel may queue xenstored's initial event before its OK.
    async with fast_client(fake.path) as xs:
        conn = await fake.accept()
        async with trio.open_nursery() as nursery:

            async def ack_watch(c: FakeConn, event_first: bool) -> None:
                request = await c.recv()
                path, token = (s.decode() for s in split_strings(request.payload))
                if event_first:
                    await c.event(path, token)
                await c.reply(request, b"OK\0")
                if not event_first:
                    await c.event(path, token)

            nursery.start_soon(ack_watch, conn, False)
            async with xs.watch("/x") as events:
                assert await events.__anext__() == "/x"
                await conn.close()
                conn2 = await fake.accept()
                await ack_watch(conn2, True)
                with trio.fail_after(1):
                    assert await events.__anext__() == "/x"
                await conn2.event("/x/next", events.token)
                with trio.fail_after(1):
                    assert await events.__anext__() == "/x/next"

                async def ack_unwatch() -> None:
                    request = await conn2.recv()
                    assert request.type == MsgType.UNWATCH
                    await conn2.reply(request, b"OK\0")

                nursery.start_soon(ack_unwatch)


async def test_watch_that_xenstored_refuses_after_reconnect_raises_in_its_stream(
    fake: FakeXenstored,
) -> None:
    async with fast_client(fake.path) as xs:
        conn = await fake.accept()
        async with trio.open_nursery() as nursery:

            async def server1() -> None:
                request = await conn.recv()
                await conn.reply(request, b"OK\0")
                token = split_strings(request.payload)[1].decode()
                await conn.event("/x", token)

            nursery.start_soon(server1)
            async with xs.watch("/x") as events:
                assert await events.__anext__() == "/x"
                await conn.close()
                conn2 = await fake.accept()
                request = await conn2.recv()
                assert request.type == MsgType.WATCH
                await conn2.send(Packet.error(request, "EACCES"))
                with pytest.raises(XenStoreError, match="EACCES"):
                    with trio.fail_after(2):
                        await events.__anext__()


# ------------------------------------------------------------------------------- watches


async def test_watch_stream_gets_only_its_own_events(fake: FakeXenstored) -> None:
    async with fast_client(fake.path) as xs:
        conn = await fake.accept()
        tokens: list[str] = []

        async def answer_watch() -> None:
            request = await conn.recv()
            await conn.reply(request, b"OK\0")
            path, token = (s.decode() for s in split_strings(request.payload))
            tokens.append(token)
            await conn.event(path, token)

        async def answer_the_rest() -> None:
            try:
                while True:
                    request = await conn.recv()
                    assert request.type == MsgType.UNWATCH
                    await conn.reply(request, b"OK\0")
            except (EOFError, trio.TooSlowError):
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_watch)
            async with xs.watch("/a") as a:
                nursery.start_soon(answer_watch)
                async with xs.watch("/a") as b:  # same path, different token
                    assert tokens[0] != tokens[1]
                    assert await a.__anext__() == "/a"
                    assert await b.__anext__() == "/a"
                    await conn.event("/a/only-b", tokens[1])
                    await conn.event("/a/unknown", "someone-else")
                    await conn.event("/a/only-a", tokens[0])
                    with trio.fail_after(1):
                        assert await a.__anext__() == "/a/only-a"
                        assert await b.__anext__() == "/a/only-b"
                    assert a.pending == 0 and b.pending == 0
                    nursery.start_soon(answer_the_rest)
                await conn.event("/a/after-b-ended", tokens[1])
                await conn.event("/a/still-a", tokens[0])
                with trio.fail_after(1):
                    assert await a.__anext__() == "/a/still-a"
            nursery.cancel_scope.cancel()


async def test_watch_exit_sends_unwatch_with_its_own_token(
    fake: FakeXenstored, nursery: trio.Nursery
) -> None:
    store = Store()
    async with fast_client(fake.path) as xs:
        nursery.start_soon(serve_store, await fake.accept(), store)
        async with xs.watch("/w") as events:
            assert await events.__anext__() == "/w"
            token = events.token
            assert store.watches == {token: "/w"}
        assert store.watches == {}
        sent = [(MsgType(p.type), p.payload) for p in store.seen]
        assert sent == [
            (MsgType.WATCH, f"/w\0{token}\0".encode()),
            (MsgType.UNWATCH, f"/w\0{token}\0".encode()),
        ]
        async for _ in events:
            pytest.fail("a closed stream yields nothing")


async def test_watch_buffer_overflow_coalesces_to_the_watched_path(
    fake: FakeXenstored, nursery: trio.Nursery
) -> None:
    store = Store()
    async with fast_client(fake.path) as xs:
        conn = await fake.accept()
        nursery.start_soon(serve_store, conn, store)
        async with xs.watch("/w", buffer=4) as events:
            assert await events.__anext__() == "/w"
            for i in range(10):
                await conn.event(f"/w/{i}", events.token)
            await conn.event("/w/1", events.token)
            await xs.read_or_none("/sync")  # every event above has been read by now
            assert events.overflows >= 1
            assert events.pending <= 4
            got = []
            while events.pending:
                got.append(await events.__anext__())
            assert got[0] == "/w"
            assert len(got) == len(set(got))


async def test_watch_of_an_invalid_path_is_refused(fake: FakeXenstored) -> None:
    async with fast_client(fake.path) as xs:
        await fake.accept()
        with pytest.raises(XenStoreError, match="EINVAL"):
            async with xs.watch("/bad/"):
                pass


# -------------------------------------------------------------------------- transactions


async def test_run_transaction_retries_the_whole_function_on_eagain(
    fake: FakeXenstored, nursery: trio.Nursery
) -> None:
    store = Store(data={"/counter": b"0"}, tx_end_replies=["EAGAIN", "EAGAIN", "OK"])
    calls = 0

    async def bump(tx: Transaction) -> int:
        nonlocal calls
        calls += 1
        value = int(await tx.read("/counter")) + 1
        await tx.write("/counter", str(value))
        return value

    async with fast_client(fake.path) as xs:
        nursery.start_soon(serve_store, await fake.accept(), store)
        assert await xs.run_transaction(bump) == 3
    assert calls == 3
    ends = [p for p in store.seen if p.type == MsgType.TRANSACTION_END]
    assert [p.payload for p in ends] == [b"T\0"] * 3
    tx_ids = {p.tx_id for p in store.seen if p.type in (MsgType.READ, MsgType.WRITE)}
    assert tx_ids == {1, 2, 3}


async def test_run_transaction_gives_up_after_its_attempts(
    fake: FakeXenstored, nursery: trio.Nursery
) -> None:
    store = Store(tx_end_replies=["EAGAIN"] * 5)

    async def noop(tx: Transaction) -> None:
        await tx.write("/x", "1")

    async with fast_client(fake.path) as xs:
        nursery.start_soon(serve_store, await fake.accept(), store)
        with pytest.raises(XenStoreError) as exc:
            await xs.run_transaction(noop, attempts=3)
    assert exc.value.name == "EAGAIN"
    assert "gave up after 3 attempts" in "".join(exc.value.__notes__)
    assert len([p for p in store.seen if p.type == MsgType.TRANSACTION_START]) == 3


async def test_transaction_block_aborts_on_exception_and_other_errors_are_not_retried(
    fake: FakeXenstored, nursery: trio.Nursery
) -> None:
    store = Store()
    async with fast_client(fake.path) as xs:
        nursery.start_soon(serve_store, await fake.accept(), store)
        with pytest.raises(KeyError):
            async with xs.transaction() as tx:
                await tx.write("/x", "1")
                raise KeyError("boom")
        with pytest.raises(RuntimeError, match="already ended"):
            await tx.read("/x")

        async def fails(tx: Transaction) -> None:
            await tx.read("/missing")

        with pytest.raises(XenStoreError, match="ENOENT"):
            await xs.run_transaction(fails)
    ends = [(p.tx_id, p.payload) for p in store.seen if p.type == MsgType.TRANSACTION_END]
    assert ends == [(1, b"F\0"), (2, b"F\0")]


async def test_transaction_in_flight_at_a_drop_fails_with_eagain_and_is_redone(
    fake: FakeXenstored, nursery: trio.Nursery
) -> None:
    store = Store(data={"/k": b"old"})
    attempts = 0
    async with fast_client(fake.path) as xs:
        conn = await fake.accept()

        async def first_server() -> None:
            start = await conn.recv()
            await conn.reply(start, b"9\0")
            read = await conn.recv()
            assert read.tx_id == 9
            await conn.close()  # the read never gets its reply

        nursery.start_soon(first_server)

        async def body(tx: Transaction) -> bytes:
            nonlocal attempts
            attempts += 1
            value = await tx.read("/k")
            await tx.write("/k", "new")
            return value

        async def later_server() -> None:
            nursery.start_soon(serve_store, await fake.accept(), store)

        nursery.start_soon(later_server)
        assert await xs.run_transaction(body) == b"old"
    assert attempts == 2
    assert store.data["/k"] == b"new"
    assert issubclass(TransactionLost, XenStoreError)
    assert issubclass(TransactionLost, ConnectionError)


# --------------------------------------------------------------- lifetime and transports


async def test_connect_to_nothing_raises_a_connection_error(sock_dir: str) -> None:
    with pytest.raises(XenStoreConnectionError, match="cannot connect"):
        async with open_xenstore(os.path.join(sock_dir, "absent")):
            pytest.fail("connected to nothing")


async def test_closing_the_client_fails_its_waiters(fake: FakeXenstored) -> None:
    errors: list[BaseException] = []
    async with (
        trio.open_nursery() as nursery,
        XenStoreClient.connect(fake.path, timeout=0.5) as xs,
    ):

        async def read() -> None:
            try:
                await xs.read("/x", timeout=5)
            except XenStoreClosedError as exc:
                errors.append(exc)

        conn = await fake.accept()
        nursery.start_soon(read)
        await conn.recv()  # the read waits for its reply as the block ends
    assert len(errors) == 1


async def test_open_transport_picks_the_socket_for_a_socket_path(fake: FakeXenstored) -> None:
    transport = await open_transport(fake.path)
    assert isinstance(transport, SocketTransport)
    await transport.aclose()


async def test_device_transport_carries_the_protocol_over_a_raw_fd() -> None:
    # The xenbus device cannot be opened here; a socketpair fd stands in for it.
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    server = trio.socket.from_stdlib_socket(theirs)

    async def opener(path: str) -> DeviceTransport:
        return DeviceTransport(ours.detach(), path)

    async def serve() -> None:
        reader = PacketReader()
        while True:
            data = await server.recv(65536)
            if not data:
                return
            for request in reader.feed(data):
                await server.send(Packet.reply(request, b"dev:" + request.payload[:-1]).pack())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        async with open_xenstore("/dev/xen/xenbus", opener=opener, timeout=1) as xs:
            assert await xs.read("/local/domain/0/name") == b"dev:/local/domain/0/name"
        server.close()


# ------------------------------------------------------------------------------ perms


@pytest.mark.parametrize(
    ("text", "perm"), [("b0", Perm(0, "b")), ("r5", Perm(5, "r")), ("n65535", Perm(65535, "n"))]
)
def test_perm_parses_and_formats_xenstore_strings(text: str, perm: Perm) -> None:
    assert Perm.parse(text) == perm and Perm.parse(text.encode()) == perm
    assert str(perm) == text


@pytest.mark.parametrize("text", ["", "b", "x0", "r-1", "r65536", "r 1", "0r", "r1.0", "r\u0661"])
def test_perm_parse_refuses_malformed_strings(text: str) -> None:
    with pytest.raises(ValueError):
        Perm.parse(text)


@given(st.integers(0, 0xFFFF), st.sampled_from(["r", "w", "b", "n"]))
def test_perm_round_trips(domid: int, access: str) -> None:
    perm = Perm.parse(f"{access}{domid}")
    assert Perm.parse(str(perm)) == perm


# ------------------------------------------------ against the simulated xenstored (sim)


@pytest.fixture
async def sim(sock_dir: str) -> AsyncIterator[RunningXenStored]:
    async with running_xenstored(sock_dir, domains=(5,)) as running:
        yield running


async def test_sim_read_write_mkdir_rm_directory_round_trip(sim: RunningXenStored) -> None:
    async with fast_client(sim.socket_path) as xs:
        await xs.write("/vm/5/name", "guest")
        await xs.mkdir("/vm/5/empty")
        assert await xs.read("/vm/5/name") == b"guest"
        assert await xs.read("/vm/5/empty") == b""
        assert sorted(await xs.directory("/vm/5")) == ["empty", "name"]
        await xs.rm("/vm/5")
        assert await xs.read_or_none("/vm/5/name") is None
        with pytest.raises(XenStoreError, match="ENOENT"):
            await xs.directory("/vm/5")
        assert await xs.read("/local/domain/0/name") == b"Domain-0"
        assert await xs.get_domain_path(5) == "/local/domain/5"


async def test_sim_permissions_decide_what_a_guest_connection_may_do(
    sim: RunningXenStored,
) -> None:
    guest_socket = sim.domain_sockets[5]
    async with fast_client(sim.socket_path) as dom0, fast_client(guest_socket) as guest:
        await dom0.write("/local/domain/5/device/vdispl/0/state", "1")
        await dom0.write("/secret", "x")
        await dom0.set_perms("/local/domain/5/device/vdispl/0/state", [Perm(5, "n"), Perm(0, "r")])
        assert await dom0.get_perms("/local/domain/5/device/vdispl/0/state") == [
            Perm(5, "n"),
            Perm(0, "r"),
        ]
        await dom0.set_perms("/secret", [Perm(0, "n")])
        await guest.write("/local/domain/5/device/vdispl/0/state", "3")
        assert await dom0.read("/local/domain/5/device/vdispl/0/state") == b"3"
        with pytest.raises(XenStoreError) as exc:
            await guest.read("/secret")
        assert exc.value.name == "EACCES"
        with pytest.raises(XenStoreError, match="EACCES"):
            await guest.write("/secret", "mine")


async def test_sim_watch_streams_see_their_own_changes_only(sim: RunningXenStored) -> None:
    async with fast_client(sim.socket_path) as xs, fast_client(sim.socket_path) as other:
        async with xs.watch("/backend/vdispl") as backend, xs.watch("/frontend") as front:
            with trio.fail_after(2):
                assert await backend.__anext__() == "/backend/vdispl"
                assert await front.__anext__() == "/frontend"
                await other.write("/backend/vdispl/5/0/state", "2")
                assert await backend.__anext__() == "/backend/vdispl/5/0/state"
                await other.write("/frontend/x", "1")
                assert await front.__anext__() == "/frontend/x"
            assert backend.pending == 0 and front.pending == 0
        assert [c.session.watches for c in sim.xenstored.connections] == [[], []]


async def test_sim_concurrent_transactions_retry_until_every_increment_lands(
    sim: RunningXenStored,
) -> None:
    async def bump(tx: Transaction) -> None:
        value = int(await tx.read("/counter"))
        await trio.sleep(0.001)  # let the others interleave and conflict
        await tx.write("/counter", str(value + 1))

    async with fast_client(sim.socket_path) as a, fast_client(sim.socket_path) as b:
        await a.write("/counter", "0")
        async with trio.open_nursery() as nursery:
            for client in (a, b) * 4:
                nursery.start_soon(partial(client.run_transaction, bump, attempts=50))
        assert await a.read("/counter") == b"8"
        assert sim.tree.transactions_started > 8  # conflicts did happen and were retried
        with pytest.raises(ZeroDivisionError):
            async with a.transaction() as tx:
                await tx.write("/counter", "999")
                raise ZeroDivisionError
        assert await b.read("/counter") == b"8"


async def test_sim_restart_reconnects_and_restores_watches(sock_dir: str) -> None:
    daemon = XenStored()
    path = os.path.join(sock_dir, "xenstored.sock")
    async with trio.open_nursery() as nursery:
        first = trio.CancelScope()

        async def serve_until_cancelled(task_status: trio.TaskStatus[str]) -> None:
            with first:
                await daemon.serve(path, 0, task_status=task_status)

        await nursery.start(serve_until_cancelled)
        async with fast_client(path) as xs:
            async with xs.watch("/backend") as events:
                assert await events.__anext__() == "/backend"
                first.cancel()  # xenstored goes away, with our connection
                await wait_disconnected(xs)
                await nursery.start(daemon.serve, path, 0)
                with trio.fail_after(2):
                    assert await events.__anext__() == "/backend"  # the one synthetic event
                session = daemon.session(0)
                session.write("/backend/new", b"1")
                session.close()
                with trio.fail_after(2):
                    assert await events.__anext__() == "/backend/new"
            assert xs.generation == 2
        nursery.cancel_scope.cancel()
