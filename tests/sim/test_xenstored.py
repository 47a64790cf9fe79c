"""The simulated xenstored on a real socket: pyxs 0.4.1 (an independent client) and raw xs_wire."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from pyxs import Client  # type: ignore[import-untyped]
from pyxs.exceptions import PyXSError  # type: ignore[import-untyped]

from displback.sim.xenstored import RunningXenStored, XenStored, running_xenstored
from displback.xenstore.wire import HEADER, MsgType, Packet, PacketReader

T = TypeVar("T")


async def in_thread(fn: Callable[[], T]) -> T:
    with trio.fail_after(10):
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


@pytest.fixture
async def xsd(tmp_path: Path) -> AsyncIterator[RunningXenStored]:
    async with running_xenstored(tmp_path, domains=(5,)) as running:
        yield running


class Raw:
    """A minimal xs_wire client for what pyxs cannot send (bad packets, odd types)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = PacketReader()
        self.pending: list[Packet] = []

    @classmethod
    async def open(cls, path: str) -> Raw:
        return cls(await trio.open_unix_socket(path))

    async def send(self, type_: int, payload: bytes, tx: int = 0, req: int = 7) -> None:
        await self.stream.send_all(Packet(type_, req, tx, payload).pack())

    async def receive(self) -> Packet:
        with trio.fail_after(5):
            while not self.pending:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError
                self.pending += self.reader.feed(data)
        return self.pending.pop(0)

    async def call(self, type_: int, payload: bytes, tx: int = 0) -> Packet:
        await self.send(type_, payload, tx)
        return await self.receive()


# -- pyxs --------------------------------------------------------------------------------


async def test_pyxs_write_read_list_and_delete(xsd: RunningXenStored) -> None:
    def work() -> tuple[Any, ...]:
        with Client(unix_socket_path=xsd.socket_path) as c:
            c.write(b"/test/a", b"hello")
            c.mkdir(b"/test/dir")
            listing = sorted(c.list(b"/test"))
            value = c.read(b"/test/a")
            c.delete(b"/test/a")
            return listing, value, c.exists(b"/test/a"), c.get_domain_path(5)

    listing, value, exists, dompath = await in_thread(work)
    assert listing == [b"a", b"dir"]
    assert value == b"hello"
    assert exists is False
    assert dompath == b"/local/domain/5"


async def test_pyxs_sees_errno_of_missing_node(xsd: RunningXenStored) -> None:
    def work() -> int:
        with Client(unix_socket_path=xsd.socket_path) as c:
            try:
                c.read(b"/missing")
            except PyXSError as exc:
                return int(exc.args[0])
            return 0

    assert await in_thread(work) == errno.ENOENT


async def test_pyxs_permissions_round_trip(xsd: RunningXenStored) -> None:
    def work() -> list[bytes]:
        with Client(unix_socket_path=xsd.socket_path) as c:
            c.write(b"/p", b"x")
            c.set_perms(b"/p", [b"n5", b"r0"])
            return list(c.get_perms(b"/p"))

    assert await in_thread(work) == [b"n5", b"r0"]


async def test_domain_socket_acts_as_that_domain(xsd: RunningXenStored) -> None:
    xsd.tree.session(0).write("/local/domain/0/backend/x", b"1")

    def work() -> tuple[bytes, int]:
        with Client(unix_socket_path=xsd.domain_sockets[5]) as c:
            home = c.get_domain_path(5)
            try:
                c.write(b"/local/domain/0/backend/x", b"forged")
            except PyXSError as exc:
                return home, int(exc.args[0])
            return home, 0

    assert await in_thread(work) == (b"/local/domain/5", errno.EACCES)
    assert xsd.tree.session(0).read("/local/domain/0/backend/x") == b"1"


async def test_pyxs_watch_gets_initial_event_then_changes(xsd: RunningXenStored) -> None:
    def work() -> list[tuple[bytes, bytes]]:
        with Client(unix_socket_path=xsd.socket_path) as c:
            m = c.monitor()
            m.watch(b"/w", b"tok")
            events = m.wait()
            got = [tuple(next(events))]
            with Client(unix_socket_path=xsd.socket_path) as other:
                other.write(b"/w/x", b"1")
            got.append(tuple(next(events)))
            m.close()
            return got

    assert await in_thread(work) == [(b"/w", b"tok"), (b"/w/x", b"tok")]


async def test_pyxs_transaction_commits_and_conflict_fails(xsd: RunningXenStored) -> None:
    def work() -> tuple[bool, bool, bytes]:
        with Client(unix_socket_path=xsd.socket_path) as c, \
                Client(unix_socket_path=xsd.socket_path) as other:
            c.write(b"/t/a", b"0")
            c.transaction()
            c.write(b"/t/a", b"1")
            first = c.commit()
            c.transaction()
            c.read(b"/t/a")
            c.write(b"/t/b", b"x")
            other.write(b"/t/a", b"2")
            second = c.commit()
            return first, second, c.read(b"/t/a")

    assert await in_thread(work) == (True, False, b"2")


# -- raw wire ----------------------------------------------------------------------------


async def test_unsupported_type_is_enosys_and_bad_payload_einval(xsd: RunningXenStored) -> None:
    raw = await Raw.open(xsd.socket_path)
    for type_ in (MsgType.INTRODUCE, MsgType.CONTROL, MsgType.WATCH_EVENT, 0xFFFF, 99):
        reply = await raw.call(type_, b"x\0")
        assert (reply.type, reply.payload, reply.req_id) == (MsgType.ERROR, b"ENOSYS\0", 7)
    assert (await raw.call(MsgType.READ, b"/local")).error_name == "EINVAL"  # no NUL
    assert (await raw.call(MsgType.READ, b"/a\0/b\0")).error_name == "EINVAL"
    assert (await raw.call(MsgType.WRITE, b"/novalue")).error_name == "EINVAL"
    assert (await raw.call(MsgType.GET_DOMAIN_PATH, b"x\0")).error_name == "EINVAL"


async def test_replies_carry_wire_payload_formats(xsd: RunningXenStored) -> None:
    raw = await Raw.open(xsd.socket_path)
    assert (await raw.call(MsgType.WRITE, b"/f/v\0raw")).payload == b"OK\0"
    assert (await raw.call(MsgType.READ, b"/f/v\0")).payload == b"raw"
    assert (await raw.call(MsgType.DIRECTORY, b"/f\0")).payload == b"v\0"
    assert (await raw.call(MsgType.GET_PERMS, b"/f\0")).payload == b"n0\0"
    part = (await raw.call(MsgType.DIRECTORY_PART, b"/f\x000\0")).payload
    assert part.split(b"\0")[1:] == [b"v", b"", b""]
    assert (await raw.call(MsgType.GET_DOMAIN_PATH, b"3\0")).payload == b"/local/domain/3\0"
    tx = await raw.call(MsgType.TRANSACTION_START, b"\0")
    tx_id = int(tx.payload.rstrip(b"\0"))
    assert (await raw.call(MsgType.TRANSACTION_START, b"\0", tx=tx_id)).error_name == "EBUSY"
    assert (await raw.call(MsgType.TRANSACTION_END, b"X\0", tx=tx_id)).error_name == "EINVAL"
    assert (await raw.call(MsgType.TRANSACTION_END, b"T\0", tx=tx_id)).payload == b"OK\0"
    assert (await raw.call(MsgType.READ, b"/f/v\0", tx=tx_id)).error_name == "ENOENT"


async def test_watch_reply_precedes_initial_event_and_reset_clears(xsd: RunningXenStored) -> None:
    raw = await Raw.open(xsd.socket_path)
    await raw.send(MsgType.WATCH, b"/w\0tk\0")
    ok, event = await raw.receive(), await raw.receive()
    assert (ok.type, ok.payload) == (MsgType.WATCH, b"OK\0")
    assert (event.type, event.req_id, event.tx_id, event.payload) == (
        MsgType.WATCH_EVENT, 0, 0, b"/w\0tk\0")
    assert (await raw.call(MsgType.RESET_WATCHES, b"\0")).payload == b"OK\0"
    assert (await raw.call(MsgType.UNWATCH, b"/w\0tk\0")).error_name == "ENOENT"


async def test_oversized_packet_closes_only_that_connection(xsd: RunningXenStored) -> None:
    bad = await Raw.open(xsd.socket_path)
    good = await Raw.open(xsd.socket_path)
    await bad.stream.send_all(HEADER.pack(MsgType.READ, 1, 0, 4097) + b"x" * 100)
    with pytest.raises((EOFError, trio.BrokenResourceError)):
        await bad.receive()
    assert (await good.call(MsgType.GET_DOMAIN_PATH, b"0\0")).payload == b"/local/domain/0\0"


async def test_client_that_stops_reading_is_dropped_without_blocking_others(
    tmp_path: Path,
) -> None:
    daemon = XenStored(queue_limit=8)
    async with running_xenstored(tmp_path, xenstored=daemon) as xsd:
        lazy = await Raw.open(xsd.socket_path)
        await lazy.send(MsgType.WATCH, b"/flood\0t\0")
        with trio.fail_after(5):
            while not any(c.session.watches for c in daemon.connections):
                await trio.sleep(0.01)
        writer = await Raw.open(xsd.socket_path)
        big = b"v" * 3000
        with trio.fail_after(5):
            for i in range(2000):  # far more than queue + socket buffers hold
                reply = await writer.call(MsgType.WRITE, b"/flood/%d\0" % (i % 50) + big)
                assert reply.payload == b"OK\0"
                if len(daemon.connections) == 1:
                    break
        assert len(daemon.connections) == 1  # the lazy one is gone, the writer is served


async def test_standalone_daemon_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "xs.sock"
    dom_sock = tmp_path / "xs5.sock"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "displback.sim.xenstored", "--socket", str(sock),
         "--domain-socket", f"5:{dom_sock}"],
        env=env, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not dom_sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            await trio.sleep(0.05)
        raw = await Raw.open(str(dom_sock))
        reply = await raw.call(MsgType.WRITE, b"/local/domain/0/x\0v")
        assert reply.error_name == "EACCES"
        proc.send_signal(signal.SIGTERM)
        assert await in_thread(lambda: proc.wait(timeout=5)) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
