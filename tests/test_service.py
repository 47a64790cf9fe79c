"""`displback run` as a systemd service: READY once serving, watchdog pings from the event
loop, STOPPING on SIGTERM; the shipped unit and config agree with the code."""

from __future__ import annotations

import functools
import os
import signal
import socket
from pathlib import Path

import pytest
import trio

from displback.display.virtual import OutputConfig
from displback.run import RunConfig, serve
from displback.sim.hypervisor import HypervisorThread
from displback.sim.platform import SimPlatform
from displback.sim.xenstored import running_xenstored

REPO = Path(__file__).resolve().parents[1]


async def test_the_daemon_tells_systemd_ready_pings_the_watchdog_and_says_stopping(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = tmp_path / "notify"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(notify))
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    config = RunConfig(virtual_outputs=[OutputConfig("left", 64, 64)])
    messages: list[bytes] = []
    with sock, trio.fail_after(15):
        async with running_xenstored(str(tmp_path)) as xs:
            platform = SimPlatform(hypervisor.socket_path, xs.socket_path)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(functools.partial(serve, config, platform=platform))
                    while not any(m.startswith(b"READY=1") for m in messages):
                        messages.append(await sock.recv(4096))
                    pings = 0
                    while pings < 2:
                        message = await sock.recv(4096)
                        pings += message.startswith(b"WATCHDOG=1")
                    os.kill(os.getpid(), signal.SIGTERM)
                    while b"STOPPING=1" not in messages:
                        messages.append(await sock.recv(4096))
            finally:
                platform.close()
    assert any(b"STATUS=" in m for m in messages)


def test_the_unit_starts_the_daemon_as_a_notify_service_with_a_watchdog() -> None:
    unit = (REPO / "systemd" / "displback.service").read_text()
    assert "Type=notify" in unit
    assert "WatchdogSec=" in unit
    assert "ExecStart=/usr/bin/displback run --config /etc/displback/displback.toml" in unit


def test_the_unit_keeps_be_alloc_memory_across_restarts_in_the_fd_store() -> None:
    unit = (REPO / "systemd" / "displback.service").read_text()
    store_max = next(
        int(line.split("=", 1)[1])
        for line in unit.splitlines()
        if line.startswith("FileDescriptorStoreMax=")
    )
    assert store_max >= 4096
    assert "FileDescriptorStorePreserve=yes" in unit
