"""What a valid setting of ``displback run`` is, once for the command line and the file.

Each validator takes a value as the TOML file gives it (a command-line option's text is
first read as the number it should be) and returns it, or raises :class:`ValueError` with a
message that reads after the setting's name (``must be a positive number, not -1``). The
command line wraps them with :func:`option` (argparse's error), the configuration file
(:mod:`displback.app.config`) with its own check that files each problem under its key and
line. May touch: :mod:`displback.protocol` (its limits); no I/O.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from displback.protocol.constants import LINUX_RESPONSE_TIMEOUT_MS
from displback.protocol.edid import EdidError, check_resolution

__all__ = [
    "MAX_COPY_WORKERS",
    "MAX_DOMID",
    "SOCKET_PATH_MAX",
    "choice",
    "copy_workers",
    "did_you_mean",
    "domid",
    "input_assignment",
    "input_queue",
    "input_size",
    "int_range",
    "is_int",
    "non_empty_string",
    "option",
    "positive",
    "refresh_hz",
    "socket_path",
    "wait_free_ms",
    "wayland_socket",
]

T = TypeVar("T")

#: Domain ids a guest can have (DOMID_FIRST_RESERVED is 0x7FF0).
MAX_DOMID = 0x7FEF
#: Most copy worker threads (more than cores only share memory bandwidth worse).
MAX_COPY_WORKERS = 256
#: The longest UNIX socket path (``sun_path`` holds 108 bytes with the NUL).
SOCKET_PATH_MAX = 107


def is_int(value: Any) -> bool:
    """An integer, and not a bool (TOML ``true`` is no number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def did_you_mean(value: Any, known: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known``, or nothing."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def non_empty_string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, not {value!r}")
    return value


def socket_path(value: Any) -> str:
    """A path that fits ``sun_path``; ``""`` means no socket."""
    if not isinstance(value, str):
        raise ValueError(f'must be a path ("" for no status socket), not {value!r}')
    if len(os.fsencode(value)) > SOCKET_PATH_MAX:
        raise ValueError(
            f"must be at most {SOCKET_PATH_MAX} bytes long (a UNIX socket path), not {value!r}"
        )
    return value


def wayland_socket(value: Any) -> str:
    """A Wayland display: a socket name in ``$XDG_RUNTIME_DIR`` (``wayland-0``) or an
    absolute path, that fits ``sun_path``."""
    if not isinstance(value, str) or not value:
        raise ValueError(f'must be a socket name ("wayland-0") or an absolute path, not {value!r}')
    if "/" in value and not value.startswith("/"):
        raise ValueError(f"must be a name without '/' or an absolute path, not {value!r}")
    if len(os.fsencode(value)) > SOCKET_PATH_MAX:
        raise ValueError(f"must be at most {SOCKET_PATH_MAX} bytes long, not {value!r}")
    return value


def refresh_hz(value: Any) -> float:
    """A refresh rate from 1 to 1000 Hz."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= 1000:
        raise ValueError(f"must be a refresh rate from 1 to 1000 Hz, not {value!r}")
    return float(value)


def choice(*allowed: str) -> Callable[[Any], str]:
    """One of ``allowed``."""

    def check(value: Any) -> str:
        if value not in allowed:
            names = [repr(a) for a in allowed]
            options = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
            raise ValueError(f"must be {options}, not {value!r}{did_you_mean(value, allowed)}")
        return str(value)

    return check


def int_range(low: int, high: int, why: str = "") -> Callable[[Any], int]:
    """An integer from ``low`` to ``high``; ``why`` says where the bound comes from."""

    def check(value: Any) -> int:
        if not is_int(value) or not low <= value <= high:
            raise ValueError(f"must be an integer from {low} to {high}{why}, not {value!r}")
        return int(value)

    return check


def positive(value: Any) -> float:
    """A finite number above 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"must be a positive number, not {value!r}")
    return float(value)


domid = int_range(0, MAX_DOMID)
copy_workers = int_range(1, MAX_COPY_WORKERS)
wait_free_ms = int_range(
    1,
    LINUX_RESPONSE_TIMEOUT_MS - 1,
    f" (below the guest's {LINUX_RESPONSE_TIMEOUT_MS} ms request timeout)",
)


#: Input events waiting for a guest that does not read its page (backend/vkbd.py): at
#: least the page's 51 slots' worth, at most what a second of a fast mouse gives.
input_queue = int_range(64, 4096)


def input_size(value: Any) -> tuple[int, int]:
    """``"WxH"``: the pointer's space for a vkbd with no connector (a connector's size)."""
    if isinstance(value, tuple):
        return value  # already read (a default)
    if not isinstance(value, str):
        raise ValueError(f'must be "WIDTHxHEIGHT", not {value!r}')
    width, sep, height = value.partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ValueError(f'must be "WIDTHxHEIGHT", not {value!r}')
    try:
        check_resolution(int(width), int(height))
    except EdidError as exc:
        raise ValueError(f"{value!r}: {exc}") from None
    return int(width), int(height)


#: The keys of one ``[[input]]`` table and what each must be.
INPUT_KEYS = ("device", "name", "guest", "devid", "connector", "grab")


def input_assignment(value: Any) -> dict[str, Any]:
    """One ``[[input]]`` table: a Dom0 input device (``device`` path under ``/dev/input``,
    or its evdev ``name``) for a guest (``guest``: domain name or id) and its connector
    (``devid``, ``connector``; default 0 and 0), grabbed unless ``grab = false``."""
    if not isinstance(value, dict):
        raise ValueError(f"must be a table (an [[input]] entry), not {value!r}")
    unknown = [k for k in value if k not in INPUT_KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}{did_you_mean(unknown[0], INPUT_KEYS)}")
    has_device, has_name = "device" in value, "name" in value
    if has_device == has_name:
        raise ValueError('needs either device = "/dev/input/…" or name = "<evdev name>"')
    if has_device:
        device = value["device"]
        if not isinstance(device, str) or not device.startswith("/dev/input/"):
            raise ValueError(f"device must be a path under /dev/input/, not {device!r}")
    elif not isinstance(value["name"], str) or not value["name"]:
        raise ValueError(f"name must be a device's evdev name, not {value['name']!r}")
    guest = value.get("guest")
    if isinstance(guest, int) and not isinstance(guest, bool):
        if not 1 <= guest <= MAX_DOMID:
            raise ValueError(f"guest domain id must be from 1 to {MAX_DOMID}, not {guest}")
    elif not isinstance(guest, str) or not guest:
        raise ValueError(f"guest must be a domain name or id, not {guest!r}")
    for key in ("devid", "connector"):
        if key in value and (not is_int(value[key]) or not 0 <= value[key] <= 0xFFFF):
            raise ValueError(f"{key} must be an integer from 0 to 65535, not {value[key]!r}")
    if "grab" in value and not isinstance(value["grab"], bool):
        raise ValueError(f"grab must be true or false, not {value['grab']!r}")
    return value


def option(check: Callable[[Any], T], read: Callable[[str], Any] = str) -> Callable[[str], T]:
    """``check`` as an argparse ``type=``: the option's text ``read`` (``int``, ``float``),
    then checked; either failing is argparse's error with the validator's message."""

    def parse(text: str) -> T:
        try:
            value = read(text)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(read, "valid")  # type: ignore[call-overload]
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = getattr(check, "__name__", "value")  # argparse names it in errors
    return parse
