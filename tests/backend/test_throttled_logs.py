"""Warnings a guest can cause over and over are logged once per interval, and the next one
says how many were not logged in between."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from displback.backend import connector as connector_module
from displback.backend.device import BackendSettings
from displback.backend.quotas import Limits
from displback.backend.throttle import LogThrottle
from displback.sim.hypervisor import HypervisorThread
from tests.backend.support import connected_guest


async def test_the_throttling_warning_counts_the_lines_it_held_back(
    hypervisor: HypervisorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connector_module, "REPEATED_WARNING_INTERVAL_S", 0.1)
    limits = Limits(
        max_buffers=4,
        max_pages_per_buffer=1100,
        max_total_pages=2000,
        max_dir_pages=2,
        requests_per_second=100.0,
        request_burst=2,
    )
    with trio.fail_after(20), capture_logs() as logs:
        async with connected_guest(
            hypervisor, tmp_path, settings=BackendSettings(limits=limits)
        ) as (_, guest):
            for _ in range(60):  # 0.6 s at 100/s: throttled all along
                await guest.get_edid(0)
    lines = [e for e in logs if e["event"] == "guest over its request rate: throttled"]
    assert lines[0]["suppressed"] == 0
    assert len(lines) >= 2 and all(e["suppressed"] > 0 for e in lines[1:])
    assert sum(e["suppressed"] for e in lines) + len(lines) == lines[-1]["throttled"]


def test_one_line_per_interval_and_the_next_says_how_many_were_held_back() -> None:
    now = [100.0]
    throttle = LogThrottle(2.0, clock=lambda: now[0])
    assert throttle.allow() == 0  # the first line passes
    now[0] = 101.0
    assert throttle.allow() is None and throttle.allow() is None
    now[0] = 102.0  # exactly one interval after the last line: the next may pass
    assert throttle.allow() == 2
    assert throttle.allow() is None
    now[0] = 110.0
    assert throttle.allow() == 1
