"""XenStore paths match §1, and every malformed node value is refused with its node's name."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from displback.protocol.edid import EdidError, build_edid
from displback.protocol.errors import ProtocolError
from displback.protocol.layout import (
    BE_ALLOC,
    ConnectorConfig,
    ConnectorTransport,
    FrontendConfig,
    backend_dir,
    backend_root,
    backend_state_writes,
    connector_dir,
    frontend_config_nodes,
    frontend_dir,
    libxl_dir,
    parse_backend_path,
    parse_bool,
    parse_connector_transport,
    parse_domid,
    parse_frontend_config,
    parse_resolution,
    parse_transports,
    parse_u32,
    parse_unique_id,
    parse_version,
    transport_nodes,
)
from displback.protocol.trust import TrustRule, UntrustedNode
from displback.protocol.xenbus import XenbusState
from displback.xenstore.client import Perm

# --- paths ------------------------------------------------------------------------------------


def test_paths_are_those_of_the_reference() -> None:
    assert backend_root(0) == "/local/domain/0/backend/vdispl"
    assert backend_dir(0, 5, 0) == "/local/domain/0/backend/vdispl/5/0"
    assert frontend_dir(5, 0) == "/local/domain/5/device/vdispl/0"
    assert connector_dir(5, 0, 1) == "/local/domain/5/device/vdispl/0/1"
    assert libxl_dir(5, 0) == "/libxl/5/device/vdispl/0"
    assert backend_dir(3, 12, 2) == "/local/domain/3/backend/vdispl/12/2"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/local/domain/0/backend/vdispl/5/0", (5, 0, "")),
        ("/local/domain/0/backend/vdispl/5/0/state", (5, 0, "state")),
        ("/local/domain/0/backend/vdispl/32751/7/online", (32751, 7, "online")),
        ("/local/domain/0/backend/vdispl/5/1/a/b", (5, 1, "a/b")),
    ],
)
def test_backend_path_names_its_device(path: str, expected: tuple[int, int, str]) -> None:
    assert parse_backend_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/local/domain/0/backend/vdispl",
        "/local/domain/0/backend/vdispl/5",
        "/local/domain/0/backend/vdispl/5/",
        "/local/domain/0/backend/vdispl/5/0/",
        "/local/domain/0/backend/vdispl/x/0",
        "/local/domain/0/backend/vdispl/5/-1",
        "/local/domain/0/backend/vdispl/05/0",
        "/local/domain/0/backend/vdispl/32752/0",
        "/local/domain/0/backend/vdispl/5/4294967296",
        "/local/domain/0/backend/vdispl/٥/0",
        "/local/domain/0/backend/vdisplay/5/0",
        "/local/domain/1/backend/vdispl/5/0",
        "/local/domain/5/device/vdispl/0/state",
        "@releaseDomain",
    ],
)
def test_paths_outside_a_device_directory_give_none(path: str) -> None:
    assert parse_backend_path(path) is None


def test_backend_path_for_another_backend_domain() -> None:
    assert parse_backend_path("/local/domain/1/backend/vdispl/5/0/state", 1) == (5, 0, "state")


@given(
    f=st.integers(min_value=0, max_value=0x7FEF),
    d=st.integers(min_value=0, max_value=0xFFFFFFFF),
)
def test_backend_dir_and_parse_backend_path_round_trip(f: int, d: int) -> None:
    assert parse_backend_path(backend_dir(0, f, d) + "/state") == (f, d, "state")


# --- scalar values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"), [(b"0", 0), (b"1", 1), (b"4294967295", 0xFFFFFFFF), ("17", 17)]
)
def test_u32_accepts_canonical_decimal(raw: bytes | str, value: int) -> None:
    assert parse_u32(raw, what="x") == value


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"",
        b" 1",
        b"1 ",
        b"1\n",
        b"1\0",
        b"+1",
        b"-1",
        b"01",
        b"0x10",
        b"1e3",
        b"4294967296",
        b"99999999999",
        b"1" * 5000,
        b"\xff",
        "١",
        b"abc",
    ],
)
def test_u32_refuses_everything_else_naming_the_node(raw: bytes | str | None) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_u32(raw, what="0/req-ring-ref")
    assert exc.value.what == "0/req-ring-ref"


def test_domid_range_ends_below_domid_first_reserved() -> None:
    assert parse_domid(b"0") == 0
    assert parse_domid(b"32751") == 0x7FEF
    for bad in (b"32752", b"65535", b"-1"):
        with pytest.raises(ProtocolError) as exc:
            parse_domid(bad)
        assert exc.value.what == "frontend-id"


@pytest.mark.parametrize(("raw", "value"), [(b"0", False), (b"1", True), (b"2", True)])
def test_bool_is_any_non_zero_integer(raw: bytes, value: bool) -> None:
    assert parse_bool(raw) is value


@pytest.mark.parametrize("raw", [None, b"", b"yes", b"true", b"-1", b" 1"])
def test_bool_refuses_non_integers(raw: bytes | None) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_bool(raw)
    assert exc.value.what == BE_ALLOC


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"1920x1080", (1920, 1080)),
        (b"1x1", (1, 1)),
        (b"4095x2047", (4095, 2047)),
        (b"3840x2400", (3840, 2400)),
    ],
)
def test_resolution_parses_width_by_height(raw: bytes, value: tuple[int, int]) -> None:
    assert parse_resolution(raw) == value


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"",
        b"1920",
        b"1920x",
        b"x1080",
        b"1920X1080",
        b"1920*1080",
        b"0x1080",
        b"1920x0",
        b"-1920x1080",
        b"+1920x1080",
        b"1920x+1080",
        b" 1920x1080",
        b"1920 x 1080",
        b"1920x1080 ",
        b"1920x1080x32",
        b"01920x1080",
        b"16385x100",
        b"100x16385",
        b"4294967297x1",
    ],
)
def test_resolution_refuses_malformed_values(raw: bytes | None) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_resolution(raw, what="0/resolution")
    assert exc.value.what == "0/resolution"


@pytest.mark.parametrize("raw", [b"4096x2160", b"4095x4095", b"16384x16384", b"5000x100"])
def test_a_resolution_no_edid_can_describe_is_refused_where_it_enters(raw: bytes) -> None:
    # These used to pass here and then fail every connect (the EDID builder refused them).
    with pytest.raises(ProtocolError, match="cannot be described to a guest") as exc:
        parse_resolution(raw, what="0/resolution")
    assert exc.value.what == "0/resolution"
    width, height = (int(side) for side in raw.split(b"x"))
    with pytest.raises(EdidError):
        build_edid(width, height)


@given(st.integers(1, 4095), st.integers(1, 4095))
def test_every_resolution_accepted_gets_an_edid(width: int, height: int) -> None:
    try:
        size = parse_resolution(f"{width}x{height}".encode())
    except ProtocolError:
        return
    assert build_edid(*size)[:8] == bytes.fromhex("00ffffffffffff00")


@pytest.mark.parametrize("raw", [b"DP-1", b"0", b"a" * 255, b"HDMI_A.1"])
def test_unique_id_accepts_printable_ids(raw: bytes) -> None:
    assert parse_unique_id(raw) == raw.decode()


@pytest.mark.parametrize(
    "raw", [None, b"", b"a b", b"a,b", b"a;b", b"a:b", b"a\tb", b"\xc3\xa9", b"a" * 256, b"a\0"]
)
def test_unique_id_refuses_separators_and_odd_bytes(raw: bytes | None) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_unique_id(raw)
    assert exc.value.what == "unique-id"


def test_version_is_optional_but_must_be_offered() -> None:
    assert parse_version(None) is None
    assert parse_version(b"1") == 1
    assert parse_version(b"2") == 2
    for bad in (b"3", b"0", b"2,1", b""):
        with pytest.raises(ProtocolError):
            parse_version(bad)


def test_initwait_also_writes_versions_and_other_states_only_state() -> None:
    assert backend_state_writes(XenbusState.INIT_WAIT) == {"versions": b"1,2", "state": b"2"}
    assert backend_state_writes(XenbusState.CONNECTED) == {"state": b"4"}
    assert backend_state_writes(XenbusState.CLOSED) == {"state": b"6"}


@given(st.binary(max_size=24))
def test_scalar_parsers_raise_only_protocol_error(raw: bytes) -> None:
    for parser in (parse_u32, parse_domid, parse_bool, parse_resolution, parse_unique_id):
        try:
            parser(raw, what="n")
        except ProtocolError as exc:
            assert exc.what == "n"
    with contextlib.suppress(ProtocolError):
        parse_version(raw)


# --- frontend configuration -------------------------------------------------------------------

GUEST = 5
TRUST = TrustRule(backend_domid=0, guest_domid=GUEST)
LIBXL_RO = [Perm(0, "n"), Perm(GUEST, "r")]  # libxl's ro_frontend_perms
GUEST_OWNED = [Perm(GUEST, "n"), Perm(0, "r")]  # what the guest gets when it writes


def parse_config(read: dict[str, bytes | None], **options: int) -> FrontendConfig:
    """Parse nodes that all carry libxl's permissions."""
    perms = {node: LIBXL_RO for node in read}
    return parse_frontend_config(read, perms, TRUST, **options)


def test_config_nodes_cover_be_alloc_and_four_connectors() -> None:
    nodes = frontend_config_nodes()
    assert nodes[0] == "be-alloc"
    assert "3/resolution" in nodes and "3/unique-id" in nodes
    assert "4/resolution" not in nodes
    assert frontend_config_nodes(1) == ("be-alloc", "0/resolution", "0/unique-id")


def test_config_with_two_connectors() -> None:
    read = {
        "be-alloc": b"1",
        "0/resolution": b"1920x1080",
        "0/unique-id": b"DP-1",
        "1/resolution": b"800x600",
        "2/unique-id": b"ignored-without-resolution",
        "3/resolution": b"640x480",
    }
    assert parse_config(read) == FrontendConfig(
        True,
        (ConnectorConfig(0, 1920, 1080, "DP-1"), ConnectorConfig(1, 800, 600, None)),
    )


def test_config_missing_be_alloc_means_frontend_allocates_like_linux() -> None:
    config = parse_config({"0/resolution": b"1024x768", "be-alloc": None})
    assert config.be_alloc is False
    assert config.connectors == (ConnectorConfig(0, 1024, 768, None),)


def test_config_uses_at_most_max_connectors() -> None:
    read = {f"{i}/resolution": b"640x480" for i in range(6)}
    assert len(parse_config(read).connectors) == 4
    assert len(parse_config(read, max_connectors=2).connectors) == 2


def test_config_without_connector_zero_is_refused() -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_config({"be-alloc": b"0", "1/resolution": b"640x480"})
    assert exc.value.what == "resolution"


@pytest.mark.parametrize(
    ("read", "what"),
    [
        ({"be-alloc": b"on", "0/resolution": b"640x480"}, "be-alloc"),
        ({"0/resolution": b"640"}, "0/resolution"),
        ({"0/resolution": b"640x480", "1/resolution": b"0x0"}, "1/resolution"),
        ({"0/resolution": b"640x480", "0/unique-id": b""}, "0/unique-id"),
    ],
)
def test_config_names_the_bad_node(read: dict[str, bytes | None], what: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_config(read)
    assert exc.value.what == what


TWO_CONNECTORS = {
    "be-alloc": b"0",
    "0/resolution": b"640x480",
    "0/unique-id": b"a0",
    "1/resolution": b"800x600",
    "1/unique-id": b"a1",
}


@pytest.mark.parametrize("node", sorted(TWO_CONNECTORS))
def test_config_refuses_any_node_the_guest_wrote(node: str) -> None:
    perms = {n: LIBXL_RO for n in TWO_CONNECTORS} | {node: GUEST_OWNED}
    with pytest.raises(UntrustedNode) as exc:
        parse_frontend_config(TWO_CONNECTORS, perms, TRUST)
    assert exc.value.what == node
    assert "domain 5, the guest itself" in str(exc.value)


def test_config_checks_the_owner_before_the_value() -> None:
    read = {"0/resolution": b"640x480", "1/resolution": b"banana"}
    perms = {"0/resolution": LIBXL_RO, "1/resolution": GUEST_OWNED}
    with pytest.raises(UntrustedNode) as exc:
        parse_frontend_config(read, perms, TRUST)
    assert exc.value.what == "1/resolution"


def test_config_refuses_a_present_node_without_permissions() -> None:
    with pytest.raises(UntrustedNode, match="permissions are unknown"):
        parse_frontend_config({"0/resolution": b"640x480"}, {}, TRUST)


def test_config_ignores_what_lies_after_the_last_connector() -> None:
    """Nodes after a gap are neither used nor checked (Linux stops there too)."""
    read = {"0/resolution": b"640x480", "2/resolution": b"800x600", "2/unique-id": b"x"}
    perms = {"0/resolution": LIBXL_RO, "2/resolution": GUEST_OWNED}
    config = parse_frontend_config(read, perms, TRUST)
    assert config.connectors == (ConnectorConfig(0, 640, 480, None),)


# --- transports -------------------------------------------------------------------------------


def transport_read(count: int) -> dict[str, bytes | None]:
    read: dict[str, bytes | None] = {}
    for i in range(count):
        read[f"{i}/req-ring-ref"] = str(100 + 10 * i).encode()
        read[f"{i}/req-event-channel"] = str(20 + 2 * i).encode()
        read[f"{i}/evt-ring-ref"] = str(101 + 10 * i).encode()
        read[f"{i}/evt-event-channel"] = str(21 + 2 * i).encode()
    return read


def test_transport_nodes_per_connector() -> None:
    assert transport_nodes(1) == (
        "0/req-ring-ref",
        "0/req-event-channel",
        "0/evt-ring-ref",
        "0/evt-event-channel",
    )
    assert len(transport_nodes(4)) == 16


def test_transport_of_each_connector() -> None:
    read = transport_read(2)
    assert parse_connector_transport(read, 1) == ConnectorTransport(110, 22, 111, 23)
    assert parse_transports(read, 2) == (
        ConnectorTransport(100, 20, 101, 21),
        ConnectorTransport(110, 22, 111, 23),
    )


@pytest.mark.parametrize(
    ("node", "value"),
    [
        ("0/req-ring-ref", None),
        ("0/req-ring-ref", b"0"),
        ("0/req-event-channel", b"0"),
        ("0/evt-ring-ref", b"-5"),
        ("0/evt-event-channel", b"4294967296"),
        ("0/evt-ring-ref", b""),
        ("0/req-ring-ref", b" 100"),
    ],
)
def test_transport_refuses_missing_zero_and_malformed_values(
    node: str, value: bytes | None
) -> None:
    read = transport_read(1)
    read[node] = value
    with pytest.raises(ProtocolError) as exc:
        parse_connector_transport(read, 0)
    assert exc.value.what == node


def test_transport_refuses_ring_and_event_page_on_one_grant() -> None:
    read = transport_read(1)
    read["0/evt-ring-ref"] = read["0/req-ring-ref"]
    with pytest.raises(ProtocolError) as exc:
        parse_connector_transport(read, 0)
    assert exc.value.what == "0/evt-ring-ref"


def test_transport_refuses_one_port_for_both_channels() -> None:
    read = transport_read(1)
    read["0/evt-event-channel"] = read["0/req-event-channel"]
    with pytest.raises(ProtocolError) as exc:
        parse_connector_transport(read, 0)
    assert exc.value.what == "0/evt-event-channel"


def test_transports_refuse_grants_or_ports_shared_between_connectors() -> None:
    read = transport_read(2)
    read["1/req-ring-ref"] = read["0/evt-ring-ref"]
    with pytest.raises(ProtocolError) as exc:
        parse_transports(read, 2)
    assert exc.value.what == "1/req-ring-ref"
    read = transport_read(2)
    read["1/evt-event-channel"] = read["0/req-event-channel"]
    with pytest.raises(ProtocolError) as exc:
        parse_transports(read, 2)
    assert exc.value.what == "1/evt-event-channel"


def _transport(**changes: bytes | None) -> dict[str, bytes | None]:
    nodes: dict[str, bytes | None] = {
        "0/req-ring-ref": b"8", "0/req-event-channel": b"5",
        "0/evt-ring-ref": b"9", "0/evt-event-channel": b"6",
    }
    nodes.update({f"0/{k.replace('_', '-')}": v for k, v in changes.items()})
    return nodes


@pytest.mark.parametrize(
    ("parse", "what", "value"),
    [
        (lambda: parse_u32(None, what="x"), "x", None),
        (lambda: parse_domid(b"32752"), "frontend-id", 32752),
        (lambda: parse_bool(b"yes"), BE_ALLOC, b"yes"),
        (lambda: parse_resolution(b"1024"), "resolution", b"1024"),
        (lambda: parse_resolution(b"1024x+7"), "resolution", b"1024x+7"),
        (lambda: parse_resolution(b"0x768"), "resolution", b"0x768"),
        (lambda: parse_unique_id(b"a b"), "unique-id", b"a b"),
        (lambda: parse_connector_transport(_transport(req_ring_ref=b"0"), 0),
         "0/req-ring-ref", 0),
        (lambda: parse_connector_transport(_transport(evt_ring_ref=b"8"), 0),
         "0/evt-ring-ref", 8),
        (lambda: parse_connector_transport(_transport(evt_event_channel=b"5"), 0),
         "0/evt-event-channel", 5),
    ],
    ids=["missing", "reserved-domid", "bool", "no-x", "sign", "zero-width", "unique-id",
         "zero-ref", "same-page", "same-port"],
)
def test_a_refused_node_is_named_with_what_was_read(
    parse: Any, what: str, value: object
) -> None:
    """The log line of a refused XenStore node says which node and what it held."""
    with pytest.raises(ProtocolError) as info:
        parse()
    assert (info.value.what, info.value.value) == (what, value)
    assert what in str(info.value)
