"""Fixtures every test directory may use: the simulated hypervisor with its leak checks, and
logging set back after each test (``displback run`` and ``check-config`` configure it)."""

import logging
from collections.abc import Iterator

import pytest
import structlog

from tests.sim.conftest import hypervisor, hypervisor_process

__all__ = ["hypervisor", "hypervisor_process"]


def _plain_tracebacks() -> None:
    """structlog's defaults, but a logged exception's traceback rendered as plain text, as
    the daemon renders it (displback.app.logs: ``format_exc_info``). The default renders it
    with rich when rich is installed (the dev extras bring it): ≈ 0.5 s per traceback on the
    test machines, on the event loop's thread — a sim daemon logging an internal error would
    stall every guest's flips that long, which the daemon configured as shipped never does
    (tests/hostile measure the honest guest's rate around such errors)."""
    structlog.reset_defaults()
    structlog.configure(
        processors=[
            *structlog.get_config()["processors"][:-1],
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            ),
        ]
    )


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    # A test's configure_logging would otherwise outlive it: a later test's capture_logs
    # misses the lines of loggers cached on first use.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    _plain_tracebacks()
    yield
    _plain_tracebacks()
    root.handlers[:] = handlers
    root.setLevel(level)
