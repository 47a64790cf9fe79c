"""systemd notifications reach $NOTIFY_SOCKET; without it nothing is sent."""

import os
import socket
from pathlib import Path

from displback.systemd.sdnotify import Notifier


def test_ready_status_watchdog_and_stopping_are_sent_as_systemd_reads_them(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        notifier = Notifier(environ={"NOTIFY_SOCKET": path})
        assert notifier.enabled
        assert notifier.ready("serving 2 devices")
        assert server.recv(4096) == b"READY=1\nSTATUS=serving 2 devices"
        assert notifier.watchdog() and server.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping() and server.recv(4096) == b"STOPPING=1"


def test_abstract_namespace_sockets_are_supported() -> None:
    name = f"displback-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(b"\0" + name.encode())
        assert Notifier(environ={"NOTIFY_SOCKET": "@" + name}).status("hi")
        assert server.recv(4096) == b"STATUS=hi"


def test_outside_systemd_nothing_is_sent() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled
    assert not notifier.ready()
    assert notifier.watchdog_s is None


def test_a_gone_socket_is_not_an_error(tmp_path: Path) -> None:
    assert not Notifier(environ={"NOTIFY_SOCKET": str(tmp_path / "missing")}).watchdog()


def test_watchdog_interval_is_ours_only_when_the_pid_matches() -> None:
    mine = {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(environ=mine).watchdog_s == 10.0
    theirs = {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}
    assert Notifier(environ=theirs).watchdog_s is None
    assert Notifier(environ={"WATCHDOG_USEC": "junk"}).watchdog_s is None


def test_fds_for_the_store_travel_with_their_message(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        notifier = Notifier(environ={"NOTIFY_SOCKET": path})
        read_end, write_end = os.pipe()
        try:
            assert notifier.send_fds([write_end], fdstore=1, fdname="x.1")
            data, fds, _flags, _addr = socket.recv_fds(server, 4096, 4)
            assert data == b"FDSTORE=1\nFDNAME=x.1" and len(fds) == 1
            os.write(fds[0], b"!")  # a duplicate of our pipe's write end
            assert os.read(read_end, 1) == b"!"
            os.close(fds[0])
        finally:
            os.close(read_end)
            os.close(write_end)
    assert not Notifier(environ={}).send_fds([0], fdstore=1)
