"""XenbusState values match xenbus.h and parsing turns anything odd into Unknown."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from displback.protocol.xenbus import XenbusState, parse_state

XENBUS_H = Path("/usr/include/xen/io/xenbus.h")


def test_values_are_those_of_enum_xenbus_state() -> None:
    assert [(s.name, int(s)) for s in XenbusState] == [
        ("UNKNOWN", 0),
        ("INITIALISING", 1),
        ("INIT_WAIT", 2),
        ("INITIALISED", 3),
        ("CONNECTED", 4),
        ("CLOSING", 5),
        ("CLOSED", 6),
        ("RECONFIGURING", 7),
        ("RECONFIGURED", 8),
    ]


def test_values_agree_with_the_installed_xen_header() -> None:
    # libxen-dev is one of the Makefile's APT_PACKAGES: a missing header fails, never skips.
    assert XENBUS_H.exists(), f"{XENBUS_H} missing: run `make apt-deps` (libxen-dev)"
    text = XENBUS_H.read_text()
    found = dict(re.findall(r"XenbusState(\w+)\s*=\s*(\d+)", text))
    camel = {s: "".join(p.capitalize() for p in s.name.split("_")) for s in XenbusState}
    for state, name in camel.items():
        assert int(found[name]) == state


@pytest.mark.parametrize("state", list(XenbusState))
def test_encode_then_parse_round_trips(state: XenbusState) -> None:
    assert parse_state(state.encode()) is state
    assert parse_state(state.encode().decode()) is state


def test_encode_is_plain_decimal() -> None:
    assert XenbusState.CONNECTED.encode() == b"4"


@pytest.mark.parametrize(
    "value",
    [None, b"", b"9", b"10", b"-1", b"+4", b" 4", b"4 ", b"4\0", b"04", b"four", b"\xff", "٤"],
)
def test_missing_or_garbage_reads_as_unknown(value: bytes | str | None) -> None:
    assert parse_state(value) is XenbusState.UNKNOWN


@given(st.one_of(st.none(), st.binary(max_size=12), st.text(max_size=12)))
def test_parse_state_never_raises(value: bytes | str | None) -> None:
    assert isinstance(parse_state(value), XenbusState)
