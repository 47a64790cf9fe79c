"""The daemon's TOML configuration file: the same settings as ``displback run``'s options.

Keys are the field names of :class:`~displback.run.RunConfig` (``display``, ``card``,
``connectors``, ``zero_copy``, ``wait_free_ms``, …) plus an ``[assign]`` table mapping a
guest connector (``"<domid>/<devid>/<index>"`` or its ``unique-id``) to an output name. A
command-line option given explicitly wins over the file. Every mistake — an unknown key, a
wrong type, a bad value — is refused at start with the file, the key and what was expected.
See ``config/displback.toml`` for an annotated example.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "load_config"]


class ConfigError(ValueError):
    """The configuration file cannot be used; the message names the file and the key."""


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("a non-empty string")
    return value


def _choice(*allowed: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in allowed:
            raise ValueError(" or ".join(repr(a) for a in allowed))
        return str(value)

    return check


def _int(minimum: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"an integer ≥ {minimum}")
        return value

    return check


def _positive(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError("a positive number")
    return float(value)


def _strings(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("a list of non-empty strings")
    return list(value)


def _assign(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()
    ):
        raise ValueError('a table of "<domid>/<devid>/<index>" or unique-id = "OUTPUT"')
    return dict(value)


# key -> (check, the argparse destination it sets)
_KEYS: Mapping[str, Callable[[str, Any], Any]] = {
    "xenstore": _string,
    "domid": _int(0),
    "display": _choice("virtual", "kms"),
    "virtual_outputs": _strings,
    "snapshot_dir": _string,
    "snapshot_interval_s": _positive,
    "card": _string,
    "connectors": _strings,
    "assign": _assign,
    "zero_copy": _choice("auto", "require", "off"),
    "wait_free_ms": _int(0),
    "log_level": _choice("debug", "info", "warning", "error"),
    "log_format": _choice("console", "json", "journal"),
    "status_socket": _string,
}


def load_config(path: str | Path) -> dict[str, Any]:
    """The settings in the TOML file at ``path``, by key, validated (``ConfigError``)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    settings: dict[str, Any] = {}
    for key, value in data.items():
        check = _KEYS.get(key)
        if check is None:
            known = ", ".join(sorted(_KEYS))
            raise ConfigError(f"{path}: unknown key {key!r} (known keys: {known})")
        try:
            settings[key] = check(key, value)
        except ValueError as exc:
            raise ConfigError(f"{path}: {key} must be {exc}, not {value!r}") from None
    return settings


def apply_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, settings: Mapping[str, Any]
) -> argparse.Namespace:
    """``args`` with every option the command line left at its default taken from the file.

    File values go through the same parsing as command-line values (``type=`` of the
    option), so ``"kms"`` or ``"DP-1=1920x1080"`` mean the same in both places.
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
