"""Fixtures for the simulated Xen: a fresh hypervisor per test and a leak check after it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from displback.sim.hypervisor import (
    HypervisorProcess,
    HypervisorThread,
    wait_for_no_leaks,
)
from displback.sim.platform import client_resources


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
