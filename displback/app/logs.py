"""Logging set-up: structlog records to stderr (human or JSON) or to journald, at a level.

Modules log through ``structlog.get_logger(...)`` and bind what identifies their object
(``domid``, ``devid``, ``connector``); this module decides where it goes and how it looks.
The stdlib ``logging`` records of libraries (and of our XenStore client) go the same way.
Under systemd the default is the journal (:mod:`displback.systemd.journal`), where bound keys become
fields (``DOMID=3``); elsewhere human-readable lines.
May touch: :mod:`displback.systemd.journal`; nothing of the daemon (the backend logs through
structlog and never imports this).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Literal

import structlog

from displback.systemd.journal import (
    JOURNAL_SOCKET,
    JournalHandler,
    JournalLoggerFactory,
    JournalSender,
    render_for_journal,
    under_systemd,
)

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "LogFormat",
    "configure_logging",
    "default_log_format",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("console", "json", "journal")
LogFormat = Literal["console", "json", "journal"]


def default_log_format(
    environ: Mapping[str, str] | None = None, journal_socket: str = JOURNAL_SOCKET
) -> LogFormat:
    """``journal`` when systemd started us and journald listens, else ``console``."""
    if under_systemd(environ) and os.path.exists(journal_socket):
        return "journal"
    return "console"


def configure_logging(
    level: str = "info",
    *,
    fmt: LogFormat = "console",
    stream: object = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr) or the journal."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    numeric = getattr(logging, level.upper())
    out = stream if stream is not None else sys.stderr
    if fmt == "journal":
        _configure_journal(numeric, JournalSender(journal_socket, fallback=out))  # type: ignore[arg-type]
        return
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)  # type: ignore[arg-type]
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name],
            processors=[
                *shared[1:],
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


def _configure_journal(numeric: int, sender: JournalSender) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.CallsiteParameterAdder(
                {
                    structlog.processors.CallsiteParameter.PATHNAME,
                    structlog.processors.CallsiteParameter.LINENO,
                    structlog.processors.CallsiteParameter.FUNC_NAME,
                }
            ),
            structlog.processors.format_exc_info,
            render_for_journal,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=JournalLoggerFactory(sender),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers[:] = [JournalHandler(sender)]
    root.setLevel(numeric)
