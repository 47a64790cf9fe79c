"""Fixtures every test directory may use: the simulated hypervisor with its leak checks, and
logging set back after each test (``displback run`` and ``check-config`` configure it)."""

import logging
from collections.abc import Iterator

import pytest
import structlog

from tests.sim.conftest import hypervisor, hypervisor_process

__all__ = ["hypervisor", "hypervisor_process"]


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    # A test's configure_logging would otherwise outlive it: a later test's capture_logs
    # misses the lines of loggers cached on first use.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
