"""The connection to the compositor never blocks the event loop: not when the compositor
stops reading while events wait for us (a full socket), not when it goes away."""

from __future__ import annotations

import errno
import socket
import struct
import threading

import pytest
import trio

pytest.importorskip("pywayland", reason="the wayland extra (pywayland) is not installed")

from pywayland import ffi  # noqa: E402
from pywayland.client.display import Display  # noqa: E402

from displback.wayland.connection import ConnectionLost, WaylandConnection  # noqa: E402


def _stuck_compositor() -> tuple[WaylandConnection, socket.socket]:
    """A connection whose peer never reads: our socket is full, and one event waits."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    display = Display(ours.detach())
    display.connect()
    conn = WaylandConnection(display, "stuck")
    callbacks = []
    while True:
        callbacks += [display.sync() for _ in range(64)]
        if display.flush() < 0:
            assert int(ffi.errno) == errno.EAGAIN  # type: ignore[attr-defined]
            break
    conn._keep = callbacks  # type: ignore[attr-defined]
    # wl_display.delete_id(1234): object 1, opcode 1, 12 bytes.
    theirs.send(struct.pack("<IHHI", 1, 1, 12, 1234))
    return conn, theirs


def test_reading_events_while_our_socket_is_full_does_not_block() -> None:
    conn, theirs = _stuck_compositor()
    finished = threading.Event()

    def read() -> None:
        async def once() -> None:
            await conn._read_once()

        try:
            trio.run(once)
        finally:
            finished.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert finished.wait(5), "reading events blocked on the full socket"
    finally:
        theirs.setblocking(False)
        while not finished.is_set():  # unblock a stuck reader: drain what we sent
            try:
                theirs.recv(1 << 20)
            except BlockingIOError:
                finished.wait(0.01)
        reader.join()
        conn.close()
        theirs.close()


async def test_a_compositor_that_hangs_up_ends_the_pump_with_connection_lost() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    display = Display(ours.detach())
    display.connect()
    conn = WaylandConnection(display, "gone")
    theirs.close()
    with trio.fail_after(5), pytest.raises(ConnectionLost):
        await conn.pump()
    conn.close()
