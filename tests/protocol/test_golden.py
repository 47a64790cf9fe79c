"""Our packet layouts and constants against Xen's own displif.h, as compiled by gcc.

Every number on the left comes from displback code (struct formats, constants.py); every number
on the right from ``tests/golden/displif_golden.c`` compiled at test time. A missing compiler or
header makes these tests fail (``make apt-deps`` installs them), never skip.
"""

from __future__ import annotations

from typing import Any

import pytest

from displback.protocol import constants
from displback.protocol.constants import EventType, Op
from displback.protocol.messages import (
    REQUEST_TYPES,
    DbufCreateReq,
    DbufDestroyReq,
    FbAttachReq,
    FbDetachReq,
    GetEdidReq,
    PgFlipEvent,
    PgFlipReq,
    RequestHeader,
    Response,
    SetConfigReq,
    parse_event,
    parse_request,
)
from tests.golden import c_golden, header_macros

PACKET_CLASSES: dict[str, type[Any]] = {
    "DBUF_CREATE": DbufCreateReq,
    "DBUF_DESTROY": DbufDestroyReq,
    "FB_ATTACH": FbAttachReq,
    "FB_DETACH": FbDetachReq,
    "SET_CONFIG": SetConfigReq,
    "PG_FLIP": PgFlipReq,
    "GET_EDID": GetEdidReq,
    "RESPONSE": Response,
    "EVT_PG_FLIP": PgFlipEvent,
}

# Union members of struct xendispl_req → our class (their C offsets are relative to ``op``).
UNION_MEMBERS: dict[str, type[Any]] = {
    "xendispl_dbuf_create_req": DbufCreateReq,
    "xendispl_dbuf_destroy_req": DbufDestroyReq,
    "xendispl_fb_attach_req": FbAttachReq,
    "xendispl_fb_detach_req": FbDetachReq,
    "xendispl_set_config_req": SetConfigReq,
    "xendispl_page_flip_req": PgFlipReq,
    "xendispl_get_edid_req": GetEdidReq,
}


def golden() -> dict[str, Any]:
    return c_golden()


def structs() -> dict[str, Any]:
    result: dict[str, Any] = golden()["structs"]
    return result


def samples(kind: str) -> list[dict[str, Any]]:
    return [s for s in golden()["samples"] if s["kind"] == kind]


def test_golden_program_reports_every_xendispl_macro_of_the_header() -> None:
    reported = set(golden()["constants"])
    assert reported == set(header_macros())


def test_golden_program_reports_every_packet_kind_we_implement() -> None:
    assert set(golden()["packets"]) == set(PACKET_CLASSES)
    assert {cls.OPERATION.name for cls in REQUEST_TYPES.values()} == {
        name for name, cls in PACKET_CLASSES.items() if hasattr(cls, "OPERATION")
    }


@pytest.mark.parametrize("kind", sorted(PACKET_CLASSES))
def test_packet_field_offsets_and_sizes_match_c(kind: str) -> None:
    cls = PACKET_CLASSES[kind]
    packet = golden()["packets"][kind]
    assert cls.SIZE == packet["size"] == constants.PACKET_SIZE
    ours = {name: [cls.FIELD_OFFSETS[name], cls.FIELD_SIZES[name]] for name in cls.FIELD_OFFSETS}
    assert ours == packet["fields"]


@pytest.mark.parametrize("member", sorted(UNION_MEMBERS))
def test_request_union_member_layout_matches_c_struct(member: str) -> None:
    cls = UNION_MEMBERS[member]
    c_struct = structs()[member]
    union_ofs = structs()["xendispl_req"]["fields"]["op"][0]
    for name, (offset, size) in c_struct["fields"].items():
        assert cls.FIELD_OFFSETS[name] == union_ofs + offset, name
        assert cls.FIELD_SIZES[name] == size, name
    # The member fits in the union, and the union ends the 64-byte packet.
    assert union_ofs + c_struct["size"] <= constants.PACKET_SIZE
    assert structs()["xendispl_req"]["fields"]["op"] == [8, constants.PACKET_SIZE - 8]


def test_request_header_layout_matches_c() -> None:
    fields = structs()["xendispl_req"]["fields"]
    assert structs()["xendispl_req"]["size"] == constants.PACKET_SIZE
    assert [RequestHeader.FIELD_OFFSETS["id"], RequestHeader.FIELD_SIZES["id"]] == fields["id"]
    assert [
        RequestHeader.FIELD_OFFSETS["operation"],
        RequestHeader.FIELD_SIZES["operation"],
    ] == fields["operation"]
    # Reserved header bytes sit between operation and the payload union.
    assert fields["reserved"] == [3, 5]


def test_response_and_event_structs_match_c() -> None:
    resp = structs()["xendispl_resp"]
    assert resp["size"] == Response.SIZE
    assert resp["fields"]["status"] == [Response.FIELD_OFFSETS["status"], 4]
    assert (
        resp["fields"]["op"][0] + structs()["xendispl_get_edid_resp"]["fields"]["edid_sz"][0]
        == Response.FIELD_OFFSETS["edid_sz"]
    )
    evt = structs()["xendispl_evt"]
    assert evt["size"] == PgFlipEvent.SIZE
    assert (
        evt["fields"]["op"][0] + structs()["xendispl_pg_flip_evt"]["fields"]["fb_cookie"][0]
        == PgFlipEvent.FIELD_OFFSETS["fb_cookie"]
    )


def test_ring_geometry_and_index_offsets_match_c() -> None:
    sring = structs()["xen_displif_sring"]["fields"]
    assert sring["req_prod"] == [constants.RING_REQ_PROD_OFS, 4]
    assert sring["req_event"] == [constants.RING_REQ_EVENT_OFS, 4]
    assert sring["rsp_prod"] == [constants.RING_RSP_PROD_OFS, 4]
    assert sring["rsp_event"] == [constants.RING_RSP_EVENT_OFS, 4]
    assert sring["ring"][0] == constants.RING_HEADER_SIZE
    assert sring["ring[1]"][0] - sring["ring[0]"][0] == constants.PACKET_SIZE
    ring = golden()["ring"]
    assert ring["ring_size_one_page"] == constants.RING_SIZE
    assert ring["header_size"] == constants.RING_HEADER_SIZE
    assert ring["entry_size"] == constants.PACKET_SIZE
    assert structs()["xen_displif_sring_entry"]["size"] == constants.PACKET_SIZE


def test_event_page_geometry_matches_c() -> None:
    page = structs()["xendispl_event_page"]
    assert page["fields"]["in_cons"] == [constants.EVT_IN_CONS_OFS, 4]
    assert page["fields"]["in_prod"] == [constants.EVT_IN_PROD_OFS, 4]
    c = golden()["constants"]
    assert c["XENDISPL_EVENT_PAGE_SIZE"] == constants.PAGE_SIZE
    assert c["XENDISPL_IN_RING_OFFS"] == constants.EVT_PAGE_HEADER_SIZE == page["size"]
    assert c["XENDISPL_IN_RING_LEN"] == constants.EVT_PAGE_SLOTS
    assert c["XENDISPL_IN_RING_SIZE"] == constants.EVT_PAGE_SLOTS * constants.PACKET_SIZE


def test_page_directory_geometry_matches_c() -> None:
    directory = structs()["xendispl_page_directory"]["fields"]
    assert directory["gref_dir_next_page"] == [0, 4]
    assert directory["gref[0]"] == [4, 4]
    assert golden()["ring"]["grefs_per_dir_page"] == constants.GREFS_PER_DIR_PAGE


def test_operation_and_event_codes_match_c() -> None:
    c = golden()["constants"]
    ops = {n.removeprefix("XENDISPL_OP_"): v for n, v in c.items() if n.startswith("XENDISPL_OP_")}
    assert ops == {op.name: op.value for op in Op}
    evts = {
        n.removeprefix("XENDISPL_EVT_"): v for n, v in c.items() if n.startswith("XENDISPL_EVT_")
    }
    assert evts == {evt.name: evt.value for evt in EventType}


def test_scalar_constants_match_c() -> None:
    c = golden()["constants"]
    assert c["XENDISPL_PROTOCOL_VERSION"] == constants.PROTOCOL_VERSION
    assert c["XENDISPL_PROTOCOL_VERSION_INT"] == constants.PROTOCOL_VERSION_INT
    assert c["XENDISPL_DRIVER_NAME"] == constants.DEVICE_TYPE
    assert c["XENDISPL_LIST_SEPARATOR"] == constants.LIST_SEPARATOR
    assert c["XENDISPL_RESOLUTION_SEPARATOR"] == constants.RESOLUTION_SEPARATOR
    assert c["XENDISPL_DBUF_FLG_REQ_ALLOC"] == constants.DBUF_FLG_REQ_ALLOC
    assert c["XENDISPL_EDID_BLOCK_SIZE"] == constants.EDID_BLOCK_SIZE
    assert c["XENDISPL_EDID_BLOCK_COUNT"] == constants.EDID_MAX_BLOCKS
    assert c["XENDISPL_EDID_MAX_SIZE"] == constants.EDID_MAX_SIZE


def test_errno_values_match_xen() -> None:
    for name, value in golden()["errno"].items():
        assert getattr(constants, name) == value, name


# ---- sample packets, both directions ----------------------------------------------------


def sample_ids(kind: str) -> list[str]:
    return [s["name"] for s in samples(kind)]


def sample(kind: str, name: str) -> dict[str, Any]:
    (found,) = [s for s in samples(kind) if s["name"] == name]
    return found


def request_from_fields(fields: dict[str, int]) -> Any:
    payload = dict(fields)
    cls = REQUEST_TYPES[Op(payload.pop("operation"))]
    return cls(**payload)


# Sample names are fixed in the C program; listing them here keeps test ids readable and
# test_every_sample_is_checked proves the lists are complete.
REQUEST_SAMPLES = [
    "reference_dbuf_create",
    "dbuf_create_all_fields",
    "dbuf_create_dirty_reserved",
    "dbuf_create_max",
    "dbuf_destroy",
    "dbuf_destroy_dirty_reserved",
    "fb_attach",
    "fb_attach_dirty_reserved",
    "fb_detach",
    "set_config",
    "set_config_dirty_reserved",
    "set_config_disable",
    "pg_flip",
    "pg_flip_dirty_reserved",
    "get_edid",
    "get_edid_dirty_reserved",
]
RESPONSE_SAMPLES = [
    "reference_error",
    "pg_flip_ok",
    "get_edid_ok",
    "get_edid_ok_dirty_reserved",
    "get_edid_ok_max",
    "unknown_operation_int32_min",
    "fb_attach_eopnotsupp",
]
EVENT_SAMPLES = [
    "reference_pg_flip",
    "pg_flip_all_fields",
    "pg_flip_dirty_reserved",
    "pg_flip_max",
]


def test_every_sample_is_checked() -> None:
    assert sample_ids("request") == REQUEST_SAMPLES
    assert sample_ids("response") == RESPONSE_SAMPLES
    assert sample_ids("event") == EVENT_SAMPLES
    assert len(golden()["samples"]) == len(REQUEST_SAMPLES + RESPONSE_SAMPLES + EVENT_SAMPLES)
    assert {Op(s["fields"]["operation"]) for s in samples("request")} == set(Op)


@pytest.mark.parametrize("name", REQUEST_SAMPLES)
def test_request_sample_packs_to_c_bytes(name: str) -> None:
    s = sample("request", name)
    assert request_from_fields(s["fields"]).pack() == bytes.fromhex(s["clean_hex"])


@pytest.mark.parametrize("name", REQUEST_SAMPLES)
def test_request_sample_from_c_parses_to_its_fields(name: str) -> None:
    s = sample("request", name)
    raw = bytes.fromhex(s["hex"])
    request = parse_request(raw)
    assert request == request_from_fields(s["fields"])
    assert request.operation == s["fields"]["operation"]
    assert RequestHeader.parse(raw) == RequestHeader(s["fields"]["id"], s["fields"]["operation"])
    # Dirty reserved bytes are ignored on input and zeroed on output.
    assert request.pack() == bytes.fromhex(s["clean_hex"])
    assert (raw != request.pack()) == s["dirty"]


@pytest.mark.parametrize("name", RESPONSE_SAMPLES)
def test_response_sample_packs_to_c_bytes(name: str) -> None:
    s = sample("response", name)
    assert Response(**s["fields"]).pack() == bytes.fromhex(s["clean_hex"])


@pytest.mark.parametrize("name", RESPONSE_SAMPLES)
def test_response_sample_from_c_parses_to_its_fields(name: str) -> None:
    s = sample("response", name)
    response = Response.parse(bytes.fromhex(s["hex"]))
    assert response == Response(**s["fields"])
    assert response.pack() == bytes.fromhex(s["clean_hex"])


@pytest.mark.parametrize("name", EVENT_SAMPLES)
def test_event_sample_packs_to_c_bytes(name: str) -> None:
    s = sample("event", name)
    fields = dict(s["fields"])
    assert fields.pop("type") == EventType.PG_FLIP
    assert PgFlipEvent(**fields).pack() == bytes.fromhex(s["clean_hex"])


@pytest.mark.parametrize("name", EVENT_SAMPLES)
def test_event_sample_from_c_parses_to_its_fields(name: str) -> None:
    s = sample("event", name)
    raw = bytes.fromhex(s["hex"])
    event = parse_event(raw)
    assert event == PgFlipEvent.parse(raw)
    assert (event.id, event.type, event.fb_cookie) == (
        s["fields"]["id"],
        s["fields"]["type"],
        s["fields"]["fb_cookie"],
    )
    assert event.pack() == bytes.fromhex(s["clean_hex"])


def test_response_pack_into_a_dirty_ring_slot_matches_c_bytes() -> None:
    s = sample("response", "reference_error")
    slot = bytearray(b"\xee" * 3 * constants.PACKET_SIZE)
    Response(**s["fields"]).pack_into(slot, constants.PACKET_SIZE)
    assert slot[constants.PACKET_SIZE : 2 * constants.PACKET_SIZE] == bytes.fromhex(s["clean_hex"])
    assert slot[: constants.PACKET_SIZE] == b"\xee" * constants.PACKET_SIZE
    assert slot[2 * constants.PACKET_SIZE :] == b"\xee" * constants.PACKET_SIZE
