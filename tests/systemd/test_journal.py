"""``log_format = "journal"``: records reach a (fake) journald socket as native-protocol
datagrams whose fields are the structlog context, so ``journalctl DOMID=3`` finds them."""

from __future__ import annotations

import array
import io
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from displback.app.logs import configure_logging, default_log_format
from displback.backend.throttle import LogThrottle
from displback.systemd.journal import encode_fields, field_name


def parse(payload: bytes) -> dict[str, str]:
    """A native-protocol datagram as journald reads it (both field forms)."""
    fields: dict[str, str] = {}
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
            assert payload[end + 9 + size : end + 10 + size] == b"\n"
            i = end + 10 + size
        fields[key.decode()] = value.decode()
    return fields


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[socket.socket]:
    """A fake journald: a datagram socket; logging goes there for the test, then back."""
    path = tmp_path / "journal.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("debug", fmt="journal", journal_socket=str(path))
    try:
        yield sock
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)
        sock.close()


def receive(sock: socket.socket) -> dict[str, str]:
    data, ancdata, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
    for level, kind, payload in ancdata:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            [fd] = array.array("i", payload[:4])
            with os.fdopen(fd, "rb") as memfd:
                return parse(memfd.read())
    return parse(data)


def test_bound_context_becomes_journal_fields(journal: socket.socket) -> None:
    log = structlog.get_logger("displback.device").bind(domid=3, devid=0)
    log.warning("request failed", connector=1, op="PG_FLIP", errno=22)
    fields = receive(journal)
    assert fields["DOMID"] == "3" and fields["DEVID"] == "0"
    assert (fields["CONNECTOR"], fields["OP"], fields["ERRNO"]) == ("1", "PG_FLIP", "22")
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "displback"
    assert fields["MESSAGE"].startswith("request failed ")
    assert "domid=3" in fields["MESSAGE"]  # readable in plain `journalctl -u displback`
    assert fields["CODE_FILE"] == __file__
    assert fields["CODE_FUNC"] == "test_bound_context_becomes_journal_fields"
    assert int(fields["CODE_LINE"]) > 0


def test_a_multi_line_message_uses_the_binary_safe_form(journal: socket.socket) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger().exception("device failed", domid=7)
    fields = receive(journal)
    assert fields["PRIORITY"] == "3" and fields["DOMID"] == "7"
    assert "Traceback" in fields["MESSAGE"] and "ValueError: boom" in fields["MESSAGE"]


def test_a_record_larger_than_a_datagram_goes_in_a_sealed_memfd(
    journal: socket.socket,
) -> None:
    structlog.get_logger().info("big", blob="x" * (4 << 20))
    fields = receive(journal)
    assert fields["BLOB"] == "x" * (4 << 20)


def test_stdlib_records_reach_the_journal_too(journal: socket.socket) -> None:
    logging.getLogger("displback.kms.display").info("output %s on %s", "HDMI-A-1", "card0")
    fields = receive(journal)
    assert fields["MESSAGE"] == "output HDMI-A-1 on card0"
    assert (fields["PRIORITY"], fields["LOGGER"]) == ("6", "displback.kms.display")


def test_without_journald_records_go_to_stderr(tmp_path: Path) -> None:
    out = io.StringIO()
    root = logging.getLogger()
    handlers = root.handlers[:]
    try:
        configure_logging("info", fmt="journal", stream=out, journal_socket=str(tmp_path / "no"))
        structlog.get_logger().warning("still seen", domid=1)
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
    assert out.getvalue() == "still seen domid=1\n"


def test_field_names_follow_journald_rules() -> None:
    assert field_name("domid") == "DOMID"
    assert field_name("zero-copy") == "ZERO_COPY"
    assert field_name("_private") == "PRIVATE"
    assert field_name("2d") == "D"
    assert field_name("message") == "DISPLBACK_MESSAGE"  # never overrides ours
    assert field_name("x" * 100) == "X" * 64
    assert encode_fields([("A", "1"), ("B", "two\nlines")]) == (
        b"A=1\nB\n" + struct.pack("<Q", 9) + b"two\nlines\n"
    )


def test_the_journal_is_the_default_only_under_systemd(tmp_path: Path) -> None:
    sock = tmp_path / "journal.sock"
    sock.touch()
    assert default_log_format({"INVOCATION_ID": "ab12"}, str(sock)) == "journal"
    assert default_log_format({"JOURNAL_STREAM": "8:1234"}, str(sock)) == "journal"
    assert default_log_format({}, str(sock)) == "console"
    assert default_log_format({"INVOCATION_ID": "ab12"}, str(tmp_path / "none")) == "console"


def test_a_throttled_line_says_how_many_were_not_logged() -> None:
    now = [0.0]
    throttle = LogThrottle(10.0, lambda: now[0])
    assert throttle.allow() == 0
    for _ in range(5):
        now[0] += 1.0
        assert throttle.allow() is None
    now[0] = 10.5
    assert throttle.allow() == 5
    assert throttle.allow() is None
