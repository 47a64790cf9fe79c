"""The daemon's TOML configuration file: the settings of ``displback run``, and ``[limits]``.

Keys are the field names of :class:`~displback.app.run.RunConfig` (``display``, ``card``,
``connectors``, ``zero_copy``, ``wait_free_ms``, …) plus an ``[assign]`` table mapping a
guest connector (``"<domid>/<devid>/<index>"`` or its ``unique-id``) to an output name, and a
``[limits]`` table of per-guest quotas (:class:`~displback.backend.quotas.LimitOverrides`)
with ``[limits.guest.<domid or name>]`` tables for single guests, and ``[[input]]`` tables
assigning Dom0 input devices to guests (:class:`~displback.evdev.source.InputAssignment`,
docs/input.md). A command-line option given explicitly wins over the file.

:func:`read_config` checks every key on its own — unknown keys (with the closest known one),
types, ranges, choices — and collects *every* problem with its dotted key and its line
(:mod:`displback.app.tomllines`), keeping the valid keys; checks across keys (an ``[assign]``
naming an output that does not exist, …) need the whole effective configuration and are
:func:`displback.app.run.config_problems`. See ``config/displback.toml`` for an annotated example.
"""

from __future__ import annotations

import argparse
import math
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from displback.app.logs import LOG_FORMATS, LOG_LEVELS
from displback.app.tomllines import KeyPath, dotted, key_lines
from displback.app.validators import (
    MAX_DOMID,
    choice,
    copy_workers,
    did_you_mean,
    domid,
    input_assignment,
    input_queue,
    input_size,
    is_int,
    non_empty_string,
    positive,
    refresh_hz,
    socket_path,
    wait_free_ms,
    wayland_socket,
)
from displback.backend.quotas import (
    DEFAULT_DOM0_GRANT_ENTRIES,
    DOM0_GRANT_KEY,
    LIMIT_NAMES,
    LimitOverrides,
    limit_problem,
)
from displback.display.virtual import OutputConfig
from displback.evdev.source import InputAssignment
from displback.protocol.edid import check_resolution

__all__ = [
    "DEFAULT_CONFIG",
    "KEYS",
    "LOG_FORMATS",
    "ConfigError",
    "ConfigFile",
    "Problem",
    "apply_config",
    "load_config",
    "option_name",
    "parse_connector_spec",
    "parse_output_spec",
    "read_config",
]

#: Where ``displback check-config`` looks without a FILE (and the unit's ``--config``).
DEFAULT_CONFIG = Path("/etc/displback/displback.toml")

_NAME = r"[A-Za-z0-9_.:-]+"
_OUTPUT_SPEC = re.compile(rf"^({_NAME})=(\d+)x(\d+)(?:@(\d+(?:\.\d+)?))?$")
_CONNECTOR_SPEC = re.compile(rf"^({_NAME})(?:=(.*))?$")


def parse_output_spec(text: str) -> OutputConfig:
    """``NAME=WxH`` or ``NAME=WxH@HZ`` → an output (``ValueError`` saying what is wrong).

    The resolution must be one a guest connector can be told in an EDID (the one limit,
    :func:`displback.protocol.edid.check_resolution`)."""
    match = _OUTPUT_SPEC.match(text)
    if match is None:
        raise ValueError(f"expected NAME=WIDTHxHEIGHT[@HZ], not {text!r}")
    name, width, height, hz = match.groups()
    check_resolution(int(width), int(height))
    rate = float(hz) if hz else 60.0
    if not 0 < rate < math.inf:
        raise ValueError(f"refresh rate must be positive: {text!r}")
    return OutputConfig(name, int(width), int(height), rate)


def parse_connector_spec(text: str) -> tuple[str, OutputConfig | None]:
    """``NAME`` or ``NAME=WxH[@HZ]`` (a KMS connector, with the mode wanted) → its name and
    the mode, None if not given (``ValueError`` if malformed)."""
    match = _CONNECTOR_SPEC.match(text)
    if match is None:
        raise ValueError(f"expected a connector NAME[=WIDTHxHEIGHT[@HZ]], not {text!r}")
    name, mode = match.groups()
    return name, (parse_output_spec(text) if mode is not None else None)


# -- checks of single values -------------------------------------------------------------

#: A check: the problems of one value, each with the sub-path it is about (``()``: itself).
Check = Callable[[Any], Iterator[tuple[KeyPath, str]]]


def _value(validate: Callable[[Any], object]) -> Check:
    """A validator of :mod:`displback.app.validators` as the check of one value."""

    def check(value: Any) -> Iterator[tuple[KeyPath, str]]:
        try:
            validate(value)
        except ValueError as exc:
            yield (), str(exc)

    return check


def _list_of(parse: Callable[[str], object]) -> Check:
    def check(value: Any) -> Iterator[tuple[KeyPath, str]]:
        if not isinstance(value, list):
            yield (), f"must be a list of strings, not {value!r}"
            return
        for index, item in enumerate(value):
            if not isinstance(item, str):
                yield (index,), f"must be a string, not {item!r}"
                continue
            try:
                parse(item)
            except ValueError as exc:
                yield (index,), str(exc)

    return check


def _assign(value: Any) -> Iterator[tuple[KeyPath, str]]:
    if not isinstance(value, dict):
        yield (
            (),
            (
                'must be a table of "<domid>/<devid>/<index>" or unique-id = "OUTPUT", '
                f"not {value!r}"
            ),
        )
        return
    for key, output in value.items():
        if not key:
            yield (key,), "an empty connector name"
        if not isinstance(output, str) or not output:
            yield (key,), f"must be an output name (a non-empty string), not {output!r}"


def _limit_table(value: Any, *, guests: bool) -> Iterator[tuple[KeyPath, str]]:
    if not isinstance(value, dict):
        yield (), f"must be a table of limits, not {value!r}"
        return
    known = (*LIMIT_NAMES, "guest", DOM0_GRANT_KEY) if guests else LIMIT_NAMES
    for name, item in value.items():
        if name == "guest" and guests:
            yield from _guests(item)
        elif name == DOM0_GRANT_KEY and guests:
            if not is_int(item) or item < 1:
                yield (name,), f"must be an integer ≥ 1 (Dom0 grant entries), not {item!r}"
        elif name == DOM0_GRANT_KEY:
            yield (name,), "is one limit for all guests together: set it in [limits]"
        elif name not in known:
            yield (name,), f"unknown limit{did_you_mean(name, known)}"
        else:
            problem = limit_problem(name, item)
            if problem is not None:
                yield (name,), problem
    yield from _limit_consistency(value)


def _limit_consistency(value: Mapping[str, Any]) -> Iterator[tuple[KeyPath, str]]:
    per_buffer, total = value.get("max_pages_per_buffer"), value.get("max_total_pages")
    if isinstance(per_buffer, int) and isinstance(total, int) and per_buffer > total > 0:
        yield (
            ("max_pages_per_buffer",),
            (f"{per_buffer} pages a buffer is more than max_total_pages ({total}) ever allows"),
        )


def _guests(value: Any) -> Iterator[tuple[KeyPath, str]]:
    if not isinstance(value, dict):
        yield ("guest",), f'must be tables [limits.guest.<domid or "name">], not {value!r}'
        return
    for key, table in value.items():
        if key.isdigit() and not 1 <= int(key) <= MAX_DOMID:
            yield ("guest", key), f"a guest's domain id is from 1 to {MAX_DOMID}, not {key}"
        for sub, message in _limit_table(table, guests=False):
            yield ("guest", key, *sub), message


def _limits(value: Any) -> Iterator[tuple[KeyPath, str]]:
    yield from _limit_table(value, guests=True)


def _inputs(value: Any) -> Iterator[tuple[KeyPath, str]]:
    if not isinstance(value, list):
        yield (), f"must be [[input]] tables, not {value!r}"
        return
    devices: dict[str, int] = {}
    for index, item in enumerate(value):
        try:
            input_assignment(item)
        except ValueError as exc:
            yield (index,), str(exc)
            continue
        device = item.get("device") or f"name {item.get('name')!r}"
        if device in devices:
            yield (index,), f"{device} is already assigned by input entry {devices[device] + 1}"
        devices.setdefault(device, index)


#: Every key of the file and its check.
KEYS: Mapping[str, Check] = {
    "xenstore": _value(non_empty_string),
    "domid": _value(domid),
    "display": _value(choice("virtual", "kms", "wayland")),
    "virtual_outputs": _list_of(parse_output_spec),
    "snapshot_dir": _value(non_empty_string),
    "snapshot_interval_s": _value(positive),
    "card": _value(non_empty_string),
    "connectors": _list_of(parse_connector_spec),
    "wayland_display": _value(wayland_socket),
    "wayland_refresh_hz": _value(refresh_hz),
    "assign": _assign,
    "zero_copy": _value(choice("auto", "require", "off")),
    "wait_free_ms": _value(wait_free_ms),
    "copy_workers": _value(copy_workers),
    "log_level": _value(choice(*LOG_LEVELS)),
    "log_format": _value(choice(*LOG_FORMATS)),
    "limits": _limits,
    "status_socket": _value(socket_path),
    "input": _inputs,
    "input_queue": _value(input_queue),
    "input_size": _value(input_size),
}


# -- the file ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One mistake: the key it is about, its line in the file (None: not found), what."""

    key: KeyPath
    message: str
    line: int | None = None
    where: str = "file"  # "file", "unset" (not in the file), "option" (command line)

    def format(self, path: str | Path) -> str:
        key = dotted(self.key)
        if self.where == "option":
            return f"{option_name(self.key)} (command line): {self.message}"
        if not self.key:  # about the whole file
            line = "" if self.line is None else f"{self.line}:"
            return f"{path}:{line} {self.message}"
        if self.line is not None:
            return f"{path}:{self.line}: {key}: {self.message}"
        if self.where == "unset":
            return f"{path}: {key} (not set): {self.message}"
        return f"{path}: {key} (line not found): {self.message}"


_OPTIONS = {
    "virtual_outputs": "--virtual-output",
    "connectors": "--connector",
    "snapshot_interval_s": "--snapshot-interval",
}


def option_name(key: KeyPath) -> str:
    """The ``displback run`` option that sets the top-level key of ``key``."""
    name = str(key[0])
    return _OPTIONS.get(name, "--" + name.replace("_", "-"))


class ConfigError(ValueError):
    """The configuration cannot be used; ``problems`` are all its mistakes."""

    def __init__(self, path: str | Path, problems: Sequence[Problem]) -> None:
        self.path = Path(path)
        # In the file's order; problems without a line (not set, command line) last.
        self.problems = sorted(problems, key=lambda p: (p.line is None, p.line or 0))
        super().__init__("\n".join(p.format(path) for p in self.problems))


@dataclass
class ConfigFile:
    """A read configuration file: its valid settings (converted), and its problems."""

    path: Path
    data: dict[str, Any]
    lines: dict[KeyPath, int]
    settings: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def problem(self, key: KeyPath, message: str) -> Problem:
        """A :class:`Problem` about ``key``, with its line if the file has it."""
        line = self.lines.get(key)
        where = "file" if self.has(key) else "unset"
        return Problem(key, message, line, where)

    def has(self, key: KeyPath) -> bool:
        """Whether the file sets ``key`` (a path into its tables and arrays)."""
        node: Any = self.data
        for part in key:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return False
        return True


def read_config(path: str | Path) -> ConfigFile:
    """The file at ``path`` with every key checked; ``ConfigError`` only if it cannot be
    read or is not TOML (one problem: the parser stops at the first syntax error)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode()
    except OSError as exc:
        raise ConfigError(path, [Problem((), f"cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [Problem((), f"not UTF-8 text: {exc}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(match.group(1)) if match else None
        if "(at end of document)" in str(exc):
            line = text.count("\n") + (0 if text.endswith("\n") else 1)
        raise ConfigError(path, [Problem((), f"not valid TOML: {exc}", line)]) from None
    config = ConfigFile(path, data, key_lines(text))
    for key, value in data.items():
        check = KEYS.get(key)
        if check is None:
            config.problems.append(
                config.problem((key,), f"unknown key{did_you_mean(key, list(KEYS))}")
            )
            continue
        found = [config.problem((key, *sub), message) for sub, message in check(value)]
        if found:
            config.problems.extend(found)
        else:
            config.settings[key] = _converted(key, value)
    return config


def load_config(path: str | Path) -> dict[str, Any]:
    """The settings of the file at ``path``, if it has no mistake (else ``ConfigError``)."""
    config = read_config(path)
    if config.problems:
        raise ConfigError(config.path, config.problems)
    return config.settings


def _converted(key: str, value: Any) -> Any:
    if key == "limits":
        guests = value.get("guest", {})
        return LimitOverrides(
            common={k: v for k, v in value.items() if k not in ("guest", DOM0_GRANT_KEY)},
            by_domid={int(k): dict(v) for k, v in guests.items() if k.isdigit()},
            by_name={k: dict(v) for k, v in guests.items() if not k.isdigit()},
            dom0_grant_entries=value.get(DOM0_GRANT_KEY, DEFAULT_DOM0_GRANT_ENTRIES),
        )
    if key in ("snapshot_interval_s", "wayland_refresh_hz"):
        return float(value)
    if key == "input":
        return [
            InputAssignment(
                guest=item["guest"],
                device=item.get("device"),
                name=item.get("name"),
                devid=item.get("devid", 0),
                connector=item.get("connector", 0),
                grab=item.get("grab", True),
            )
            for item in value
        ]
    return value


def apply_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, settings: Mapping[str, Any]
) -> argparse.Namespace:
    """``args`` with every option the command line left at its default taken from the file.

    File values go through the same parsing as command-line values (``type=`` of the
    option), so ``"kms"`` or ``"DP-1=1920x1080"`` mean the same in both places. Keys that
    are not options (``limits``) are left to the caller.
    """
    actions = {a.dest: a for a in parser._actions}
    merged = argparse.Namespace(**vars(args))
    for key, value in settings.items():
        action = actions.get(key)
        if action is None:
            continue
        if getattr(args, key) != action.default:
            continue  # given on the command line: it wins
        merged_value = _convert(action, key, value)
        setattr(merged, key, merged_value)
    return merged


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    convert = action.type if callable(action.type) else None
    if key == "assign":
        return dict(value)
    if isinstance(value, list):
        return [convert(v) if convert else v for v in value]
    if convert is not None and isinstance(value, str):
        return convert(value)
    return value
