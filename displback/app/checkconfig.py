"""``displback check-config [FILE]``: check a configuration without touching Xen or a display.

It runs the very check ``displback run --config FILE`` runs at start
(:func:`displback.app.run.effective_config`) and prints every problem, one a line, as
``FILE:LINE: KEY: what is wrong`` (exit 1), or ``FILE: OK`` (exit 0). With ``--show`` it
prints instead the effective settings — the file's, with every default filled in — as TOML
that the check accepts again.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from displback.app.config import DEFAULT_CONFIG, ConfigError
from displback.app.run import RunConfig, add_run_parser, effective_config
from displback.backend.quotas import DOM0_GRANT_KEY, LIMIT_NAMES, LimitOverrides
from displback.display.virtual import OutputConfig
from displback.evdev.source import InputAssignment

__all__ = ["add_check_config_parser", "check_config_command", "show_config"]

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def add_check_config_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``check-config`` subcommand to ``subparsers``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "check-config",
        help="check a configuration file (every mistake, with its line) without starting",
        description="Check FILE as `displback run --config FILE` would at start, and list "
        "every mistake with its key and line. Exit 0 if it is valid, 1 if not.",
    )
    parser.add_argument(
        "file",
        metavar="FILE",
        nargs="?",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"the configuration ({DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--show",
        action="store_true",
        help="print the effective settings, defaults filled in, as TOML",
    )
    parser.set_defaults(func=check_config_command)
    return parser


def check_config_command(args: argparse.Namespace) -> int:
    """Handler of ``displback check-config``: 0 if the file is valid, 1 if not."""
    parser = argparse.ArgumentParser(prog="displback")
    add_run_parser(parser.add_subparsers(dest="command"))
    run_args = parser.parse_args(["run", "--config", str(args.file)])
    try:
        config = effective_config(run_args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem.format(exc.path), file=sys.stderr)
        count = len(exc.problems)
        print(f"{exc.path}: {count} error{'s' if count != 1 else ''}", file=sys.stderr)
        return 1
    if args.show:
        print(show_config(config), end="")
    else:
        print(f"{args.file}: OK")
    return 0


def show_config(config: RunConfig) -> str:
    """``config`` as a TOML configuration file (unset optional keys as comments)."""
    lines = [
        "# displback: effective configuration (defaults filled in)",
        _optional(
            "xenstore", config.xenstore, "/run/xenstored/socket if it exists, else /dev/xen/xenbus"
        ),
        _optional("domid", config.domid, 'read from XenStore ("domid") at start'),
        _pair("display", config.display),
        _pair("virtual_outputs", [_output_spec(o) for o in config.virtual_outputs]),
        _optional("snapshot_dir", config.snapshot_dir, "no snapshots"),
        _pair("snapshot_interval_s", float(config.snapshot_interval_s)),
        _optional("card", config.card, "the first /dev/dri/cardN with the connectors"),
        _pair("connectors", list(config.connectors)),
        _optional(
            "wayland_display", config.wayland_display, "$WAYLAND_DISPLAY, else wayland-0"
        ),
        _pair("wayland_refresh_hz", float(config.wayland_refresh_hz)),
        _pair("zero_copy", config.zero_copy.value),
        _pair("wait_free_ms", config.wait_free_ms),
        _pair("log_level", config.log_level),
        _optional(
            "log_format", config.log_format, "journal when started by systemd, else console"
        ),
        _pair("status_socket", config.status_socket or ""),
        _pair("input_queue", config.input_queue),
        _pair("input_size", f"{config.input_size[0]}x{config.input_size[1]}"),
        "",
        "[assign]",
        *(_pair(k, v) for k, v in config.assign.items()),
        "",
        *_limits(config.limits),
        *_inputs(config.input),
    ]
    return "\n".join(lines) + "\n"


def _inputs(inputs: list[InputAssignment]) -> list[str]:
    out: list[str] = []
    for entry in inputs:
        out += ["", "[[input]]"]
        if entry.device is not None:
            out.append(_pair("device", entry.device))
        else:
            out.append(_pair("name", entry.name))
        out += [
            _pair("guest", entry.guest),
            _pair("devid", entry.devid),
            _pair("connector", entry.connector),
            _pair("grab", entry.grab),
        ]
    return out


def _limits(limits: LimitOverrides) -> list[str]:
    out = ["[limits]"]
    out += [_pair(k, v) for k, v in limits.common.items()]
    out += [_pair(DOM0_GRANT_KEY, limits.dom0_grant_entries) + "  # all guests together"]
    derived = [name for name in LIMIT_NAMES if name not in limits.common]
    if derived:
        text = "derived from each guest's connectors: " + ", ".join(derived)
        out += textwrap.wrap(text, 90, initial_indent="# ", subsequent_indent="#   ")
    guests: list[tuple[str, dict[str, float]]] = [
        *((str(domid), dict(v)) for domid, v in limits.by_domid.items()),
        *((name, dict(v)) for name, v in limits.by_name.items()),
    ]
    for key, table in guests:
        out += ["", f"[limits.guest.{_key(key)}]", *(_pair(k, v) for k, v in table.items())]
    return out


def _output_spec(output: OutputConfig) -> str:
    return f"{output.name}={output.width}x{output.height}@{output.refresh_hz:g}"


def _optional(key: str, value: Any, default: str) -> str:
    if value is None:
        return f"# {key}: not set ({default})"
    return _pair(key, str(value) if isinstance(value, Path) else value)


def _pair(key: str, value: Any) -> str:
    return f"{_key(key)} = {_value(value)}"


def _key(key: str) -> str:
    return key if _BARE.fullmatch(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _string(text: str) -> str:
    # A JSON string is a TOML basic string (same escapes; non-ASCII kept as is).
    return json.dumps(text, ensure_ascii=False)
