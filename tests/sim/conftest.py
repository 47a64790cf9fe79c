"""Fixtures for the simulated Xen: a fresh hypervisor per test and a leak check after it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from displback.sim.hypervisor import HypervisorProcess, HypervisorThread
from displback.sim.platform import client_resources


def _leaks(counters: dict[str, Any]) -> dict[str, Any]:
    leaks: dict[str, Any] = {}
    if counters["connections"]:
        leaks["connections"] = counters["connections"]
    for domid, values in counters["domains"].items():
        live = {k: v for k, v in values.items() if v}
        if live:
            leaks[f"dom{domid}"] = live
    return leaks


class HasCounters(Protocol):
    def counters(self) -> dict[str, Any]: ...


def wait_for_no_leaks(
    hv: HasCounters, timeout: float = 5.0, *, expected: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Poll the hypervisor until only ``expected`` (default: nothing) is live, or the
    timeout; return what is live."""
    deadline = time.monotonic() + timeout
    while True:
        leaks = _leaks(hv.counters())
        if leaks == (expected or {}) or time.monotonic() > deadline:
            return leaks
        time.sleep(0.01)


@pytest.fixture
def hypervisor(tmp_path: Path) -> Iterator[HypervisorThread]:
    """An in-process simulated hypervisor; fails the test if anything is left behind."""
    before = client_resources()
    hv = HypervisorThread(str(tmp_path / "xen.sock"))
    try:
        yield hv
        assert wait_for_no_leaks(hv) == {}, "hypervisor resources leaked"
        assert client_resources() == before, "client-side resources leaked"
    finally:
        hv.stop()


@pytest.fixture
def hypervisor_process(tmp_path: Path) -> Iterator[HypervisorProcess]:
    """A simulated hypervisor in a child process (fd numbers as on a real machine)."""
    before = client_resources()
    hv = HypervisorProcess(str(tmp_path / "xen.sock"))
    try:
        yield hv
        assert wait_for_no_leaks(hv) == {}, "hypervisor resources leaked"
        assert client_resources() == before, "client-side resources leaked"
    finally:
        hv.stop()
