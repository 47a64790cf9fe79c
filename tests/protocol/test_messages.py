"""Behaviour of the displif packets: round trips, hostile input, range and semantic checks."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from displback.protocol.constants import (
    EDID_MAX_SIZE,
    EINVAL,
    ENOENT,
    PACKET_SIZE,
    EventType,
    Op,
    PixelFormat,
)
from displback.protocol.errors import ProtocolError
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

REQUEST_CLASSES: list[type[Any]] = list(REQUEST_TYPES.values())
ALL_CLASSES: list[type[Any]] = [*REQUEST_CLASSES, RequestHeader, Response, PgFlipEvent]

# Reference §15, byte for byte.
REF_DBUF_CREATE = bytes.fromhex(
    "05 00 10 00 00 00 00 00 00 56 34 12 80 88 ff ff"
    "80 07 00 00 38 04 00 00 20 00 00 00 00 90 7e 00"
    "00 00 00 00 10 0b 00 00 00 00 00 00 00 00 00 00"
    "00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00"
)
REF_ERROR_RESPONSE_HEAD = bytes.fromhex("05 00 10 00 ea ff ff ff 00 00 00 00 00 00 00 00")
REF_EVENT_HEAD = bytes.fromhex("00 00 00 00 00 00 00 00 00 22 11 11 80 88 ff ff")


def ref_dbuf_create(**changes: int) -> DbufCreateReq:
    fields: dict[str, int] = {
        "id": 5,
        "dbuf_cookie": 0xFFFF888012345600,
        "width": 1920,
        "height": 1080,
        "bpp": 32,
        "buffer_sz": 8_294_400,
        "flags": 0,
        "gref_directory": 0xB10,
        "data_ofs": 0,
    }
    fields.update(changes)
    return DbufCreateReq(**fields)


def unsigned(size: int) -> st.SearchStrategy[int]:
    return st.integers(0, 2 ** (8 * size) - 1)


def value_fields(cls: type[Any]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def packets_of(cls: type[Any]) -> st.SearchStrategy[Any]:
    """Any valid-by-type instance of ``cls`` (every field over its whole C range)."""
    if cls is Response:
        return st.one_of(
            st.builds(
                Response,
                id=unsigned(2),
                operation=unsigned(1),
                status=st.integers(-(2**31), 0),
            ),
            st.builds(
                Response,
                id=unsigned(2),
                operation=st.just(Op.GET_EDID),
                status=st.just(0),
                edid_sz=unsigned(4),
            ),
        )
    return st.builds(cls, **{name: unsigned(cls.FIELD_SIZES[name]) for name in value_fields(cls)})


def named_bytes(cls: type[Any]) -> set[int]:
    """Offsets of the bytes that belong to a named field of ``cls`` (the rest is reserved)."""
    return {
        i
        for name, ofs in cls.FIELD_OFFSETS.items()
        for i in range(ofs, ofs + cls.FIELD_SIZES[name])
    }


def zero_reserved(cls: type[Any], raw: bytes) -> bytes:
    keep = named_bytes(cls)
    return bytes(b if i in keep else 0 for i, b in enumerate(raw))


# ---- worked examples of the reference (§15) ---------------------------------------------


def test_reference_dbuf_create_packs_byte_exact() -> None:
    assert ref_dbuf_create().pack() == REF_DBUF_CREATE


def test_reference_dbuf_create_parses_to_its_fields() -> None:
    assert parse_request(REF_DBUF_CREATE) == ref_dbuf_create()


def test_reference_error_response_packs_byte_exact() -> None:
    packed = Response.error(ref_dbuf_create(), EINVAL).pack()
    assert packed == REF_ERROR_RESPONSE_HEAD + bytes(48)
    assert Response.parse(packed) == Response(id=5, operation=Op.DBUF_CREATE, status=-22)


def test_reference_pg_flip_event_packs_byte_exact() -> None:
    packed = PgFlipEvent(id=0, fb_cookie=0xFFFF888011112200).pack()
    assert packed == REF_EVENT_HEAD + bytes(48)
    assert parse_event(packed) == PgFlipEvent(0, 0xFFFF888011112200)


# ---- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@given(data=st.data())
def test_pack_then_parse_gives_the_same_packet(cls: type[Any], data: st.DataObject) -> None:
    packet = data.draw(packets_of(cls))
    raw = packet.pack()
    assert len(raw) == PACKET_SIZE
    assert cls.parse(raw) == packet
    if cls in REQUEST_CLASSES:
        assert parse_request(raw) == packet
    if cls is PgFlipEvent:
        assert parse_event(raw) == packet


@pytest.mark.parametrize("cls", REQUEST_CLASSES, ids=lambda c: c.__name__)
@given(raw=st.binary(min_size=PACKET_SIZE, max_size=PACKET_SIZE))
def test_parse_then_pack_gives_the_bytes_back_with_reserved_zeroed(
    cls: type[Any], raw: bytes
) -> None:
    raw = raw[:2] + bytes([cls.OPERATION]) + raw[3:]
    request = parse_request(raw)
    assert type(request) is cls
    assert request.pack() == zero_reserved(cls, raw)


@given(raw=st.binary(min_size=PACKET_SIZE, max_size=PACKET_SIZE), status=st.integers(-(2**31), 0))
def test_response_parse_then_pack_gives_the_bytes_back_with_reserved_zeroed(
    raw: bytes, status: int
) -> None:
    raw = raw[:3] + bytes([raw[3]]) + struct.pack("<i", status) + bytes(4) + raw[12:]
    assert Response.parse(raw).pack() == zero_reserved(Response, raw)


@given(raw=st.binary(min_size=PACKET_SIZE, max_size=PACKET_SIZE))
def test_event_parse_then_pack_gives_the_bytes_back_with_reserved_zeroed(raw: bytes) -> None:
    raw = raw[:2] + bytes([EventType.PG_FLIP]) + raw[3:]
    assert parse_event(raw).pack() == zero_reserved(PgFlipEvent, raw)


def test_reserved_request_bytes_are_not_rejected() -> None:
    dirty = bytearray(REF_DBUF_CREATE)
    dirty[3:8] = b"\xff" * 5
    dirty[44:64] = b"\xaa" * 20
    assert parse_request(bytes(dirty)) == ref_dbuf_create()


# ---- hostile input -----------------------------------------------------------------------

PARSERS = {
    "parse_request": parse_request,
    "RequestHeader.parse": RequestHeader.parse,
    "Response.parse": Response.parse,
    "PgFlipEvent.parse": PgFlipEvent.parse,
    "parse_event": parse_event,
    **{f"{cls.__name__}.parse": cls.parse for cls in REQUEST_CLASSES},
}


@pytest.mark.parametrize("parse", PARSERS.values(), ids=list(PARSERS))
@given(raw=st.one_of(st.binary(min_size=PACKET_SIZE, max_size=PACKET_SIZE), st.binary()))
def test_parsing_any_bytes_gives_a_packet_or_protocol_error(parse: Any, raw: bytes) -> None:
    for data in (raw, bytearray(raw), memoryview(raw)):
        try:
            packet = parse(data)
        except ProtocolError:
            continue
        assert len(raw) == PACKET_SIZE
        assert packet.pack() == zero_reserved(type(packet), raw)


@pytest.mark.parametrize("size", [0, 1, 3, 8, 63, 65, 128, 4096])
def test_wrong_length_is_a_protocol_error_without_errno(size: int) -> None:
    raw = (REF_DBUF_CREATE * 64)[:size]
    for parse in PARSERS.values():
        with pytest.raises(ProtocolError) as info:
            parse(raw)
        assert info.value.errno is None
        assert info.value.what == "length"


def test_parse_counts_bytes_not_memoryview_elements() -> None:
    words = memoryview(bytearray(REF_DBUF_CREATE)).cast("I")
    assert len(words) == 16
    assert parse_request(words) == ref_dbuf_create()


def test_parse_copies_the_packet_out_of_shared_memory_once() -> None:
    shared = bytearray(REF_DBUF_CREATE)
    request = parse_request(memoryview(shared))
    shared[:] = bytes(PACKET_SIZE)  # the guest rewrites the slot afterwards
    assert request == ref_dbuf_create()


@pytest.mark.parametrize("operation", [0x00, 0x0F, 0x17, 0x80, 0xFF])
def test_unknown_operation_is_einval_but_still_answerable(operation: int) -> None:
    raw = bytearray(REF_DBUF_CREATE)
    raw[0:2] = b"\x34\x12"
    raw[2] = operation
    with pytest.raises(ProtocolError) as info:
        parse_request(bytes(raw))
    assert info.value.errno == EINVAL
    assert info.value.value == operation
    header = RequestHeader.parse(bytes(raw))
    assert header == RequestHeader(id=0x1234, operation=operation)
    assert header.op is None
    answer = Response.error(header, info.value.errno).pack()
    assert answer[:8] == bytes([0x34, 0x12, operation, 0]) + struct.pack("<i", -EINVAL)
    assert answer[8:] == bytes(56)


@pytest.mark.parametrize("cls", REQUEST_CLASSES, ids=lambda c: c.__name__)
def test_class_parse_refuses_another_operation(cls: type[Any]) -> None:
    other = next(c for c in REQUEST_CLASSES if c is not cls)
    raw = other.parse(bytes([1, 0, other.OPERATION]) + bytes(61)).pack()
    with pytest.raises(ProtocolError) as info:
        cls.parse(raw)
    assert info.value.errno == EINVAL


@pytest.mark.parametrize("event_type", [0x01, 0x10, 0xFF])
def test_unknown_event_type_is_a_protocol_error(event_type: int) -> None:
    raw = bytearray(PgFlipEvent(7, 1).pack())
    raw[2] = event_type
    for parse in (parse_event, PgFlipEvent.parse):
        with pytest.raises(ProtocolError) as info:
            parse(bytes(raw))
        assert info.value.what == "type"


def test_response_with_positive_status_on_the_wire_is_refused() -> None:
    raw = bytearray(Response(id=1, operation=Op.PG_FLIP, status=0).pack())
    raw[4:8] = struct.pack("<i", 5)
    with pytest.raises(ProtocolError):
        Response.parse(bytes(raw))


# ---- construction ranges ------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_out_of_range_fields_are_refused_at_construction(cls: type[Any]) -> None:
    names = value_fields(cls)
    for name in names:
        size = cls.FIELD_SIZES[name]
        low, high = (-(2**31), 0) if name == "status" else (0, 2 ** (8 * size) - 1)
        for bad in (low - 1, high + 1, -(2**70), 2**70):
            fields = dict.fromkeys(names, 0)
            fields[name] = bad
            with pytest.raises(ProtocolError) as info:
                cls(**fields)
            assert info.value.what == name
            assert info.value.value == bad


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_non_integer_fields_are_a_type_error(cls: type[Any]) -> None:
    names = value_fields(cls)
    for bad in (1.0, "1", None, True):
        fields: dict[str, object] = dict.fromkeys(names, 0)
        fields[names[-1]] = bad
        with pytest.raises(TypeError):
            cls(**fields)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_packets_are_frozen_and_slotted(cls: type[Any]) -> None:
    packet = cls(**dict.fromkeys(value_fields(cls), 0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        packet.id = 1
    assert not hasattr(packet, "__dict__")


def test_enum_field_values_are_stored_as_plain_ints() -> None:
    response = Response(id=1, operation=Op.PG_FLIP, status=0)
    assert type(response.operation) is int
    fb = FbAttachReq(1, 2, 3, 4, 5, PixelFormat.XRGB8888)
    assert type(fb.pixel_format) is int


def test_pack_into_writes_exactly_one_zero_padded_slot() -> None:
    page = bytearray(b"\xcc" * 256)
    view = memoryview(page)
    Response(id=9, operation=Op.FB_DETACH, status=-ENOENT).pack_into(view, 64)
    assert page[:64] == b"\xcc" * 64
    assert page[128:] == b"\xcc" * 128
    assert Response.parse(view[64:128]) == Response(9, Op.FB_DETACH, -ENOENT)
    assert page[72:128] == bytes(56)


# ---- responses ------------------------------------------------------------------------------


def test_response_ok_and_error_echo_id_and_operation() -> None:
    flip = PgFlipReq(id=0xBEEF, fb_cookie=7)
    assert Response.ok(flip) == Response(id=0xBEEF, operation=Op.PG_FLIP, status=0)
    assert Response.error(flip, ENOENT) == Response(0xBEEF, Op.PG_FLIP, -ENOENT)
    assert Response.error(flip.header, ENOENT) == Response.error(flip, ENOENT)
    assert Response.error(flip, ENOENT).errno == ENOENT
    assert Response.ok(flip).is_ok and not Response.error(flip, ENOENT).is_ok


@pytest.mark.parametrize("cls", REQUEST_CLASSES, ids=lambda c: c.__name__)
@given(data=st.data())
def test_ok_packet_is_the_packed_ok_response(cls: type[Any], data: st.DataObject) -> None:
    request = parse_request(data.draw(packets_of(cls)).pack())
    assert Response.ok_packet(request) == Response.ok(request).pack()


def test_positive_status_is_refused() -> None:
    with pytest.raises(ProtocolError):
        Response(id=1, operation=Op.PG_FLIP, status=1)


@pytest.mark.parametrize("errno", [0, -22, 2**31 + 1, True])
def test_error_needs_a_positive_errno(errno: int) -> None:
    with pytest.raises(ProtocolError):
        Response.error(PgFlipReq(1, 1), errno)


def test_edid_size_only_on_a_successful_get_edid() -> None:
    edid = GetEdidReq(id=3, buffer_sz=EDID_MAX_SIZE, gref_directory=9)
    assert Response.ok(edid, edid_sz=256).pack()[8:12] == struct.pack("<I", 256)
    with pytest.raises(ProtocolError):
        Response.ok(PgFlipReq(1, 1), edid_sz=256)
    with pytest.raises(ProtocolError):
        Response(id=3, operation=Op.GET_EDID, status=-EINVAL, edid_sz=256)


# ---- request semantics ----------------------------------------------------------------------


def test_request_operation_and_header_come_from_the_class() -> None:
    assert {cls.OPERATION for cls in REQUEST_CLASSES} == set(Op)
    for op, cls in REQUEST_TYPES.items():
        request = cls(**dict.fromkeys(value_fields(cls), 0) | {"id": 77})
        assert request.operation is op
        assert request.header == RequestHeader(77, op)
        assert RequestHeader.parse(request.pack()).op is op


def test_dbuf_create_reference_request_is_valid() -> None:
    request = ref_dbuf_create()
    request.validate()
    assert request.npages == 2025
    assert not request.be_alloc
    assert ref_dbuf_create(flags=1).be_alloc


def test_dbuf_create_buffer_exactly_filled_is_valid_and_one_byte_more_is_not() -> None:
    # 100 x 10 x 24 bpp: pitch 300, 3000 bytes; data_ofs pushes it to the page end.
    ref_dbuf_create(width=100, height=10, bpp=24, buffer_sz=4096, data_ofs=1096).validate()
    with pytest.raises(ProtocolError) as info:
        ref_dbuf_create(width=100, height=10, bpp=24, buffer_sz=4096, data_ofs=1097).validate()
    assert info.value.errno == EINVAL


def test_dbuf_create_size_is_checked_against_whole_pages() -> None:
    # buffer_sz 1 still maps one whole page, as the C side computes it.
    ref_dbuf_create(width=1024, height=1, bpp=32, buffer_sz=1).validate()
    with pytest.raises(ProtocolError):
        ref_dbuf_create(width=1025, height=1, bpp=32, buffer_sz=1).validate()


def test_dbuf_create_geometry_that_wraps_32_bits_is_rejected() -> None:
    # pitch = 2**30 * 32 / 8 = 2**32: a u32 computation would see 0 bytes.
    with pytest.raises(ProtocolError) as info:
        ref_dbuf_create(width=2**30, height=1, bpp=32, buffer_sz=4096).validate()
    assert info.value.errno == EINVAL
    with pytest.raises(ProtocolError):
        ref_dbuf_create(
            width=0xFFFF_FFFF, height=0xFFFF_FFFF, bpp=0xFFFF_FFFF, buffer_sz=0xFFFF_FFFF
        ).validate()


def test_dbuf_create_imported_buffer_without_geometry_is_valid() -> None:
    imported = ref_dbuf_create(width=0, height=0, bpp=0, buffer_sz=12_288, data_ofs=4100)
    assert not imported.has_geometry
    imported.validate()


@pytest.mark.parametrize(
    ("changes", "what", "value"),
    [
        ({"dbuf_cookie": 0}, "dbuf_cookie", 0),
        ({"gref_directory": 0}, "gref_directory", 0),
        ({"buffer_sz": 0}, "buffer_sz", 0),
        ({"data_ofs": 8_294_400}, "data_ofs", 8_294_400),
        ({"flags": 2}, "flags", 2),
        ({"flags": 0x8000_0001}, "flags", 0x8000_0001),
        ({"bpp": 0}, "geometry", (1920, 1080, 0)),
        ({"height": 0}, "geometry", (1920, 0, 32)),
        ({"width": 0}, "geometry", (0, 1080, 32)),
        ({"width": 0, "height": 0}, "geometry", (0, 0, 32)),
        ({"buffer_sz": 8_294_400 - 4096}, "buffer_sz", 8_294_400 - 4096),
        ({"data_ofs": 4096}, "buffer_sz", 8_294_400),
    ],
)
def test_dbuf_create_invalid_requests_are_einval_naming_the_field_and_value(
    changes: dict[str, int], what: str, value: object
) -> None:
    with pytest.raises(ProtocolError) as info:
        ref_dbuf_create(**changes).validate()
    assert info.value.errno == EINVAL
    assert (info.value.what, info.value.value) == (what, value)


def test_dbuf_create_of_a_one_pixel_wide_buffer_is_valid() -> None:
    ref_dbuf_create(width=1, height=1, bpp=8, buffer_sz=1).validate()
    ref_dbuf_create(width=1, height=4096, bpp=32, buffer_sz=16384).validate()


@given(
    width=unsigned(4),
    height=unsigned(4),
    bpp=unsigned(4),
    buffer_sz=unsigned(4),
    data_ofs=unsigned(4),
    flags=st.sampled_from([0, 1]),
)
def test_dbuf_create_that_validates_fits_its_pages(
    width: int, height: int, bpp: int, buffer_sz: int, data_ofs: int, flags: int
) -> None:
    request = ref_dbuf_create(
        width=width, height=height, bpp=bpp, buffer_sz=buffer_sz, data_ofs=data_ofs, flags=flags
    )
    try:
        request.validate()
    except ProtocolError as exc:
        assert exc.errno == EINVAL
        return
    assert data_ofs < buffer_sz <= request.npages * 4096
    assert data_ofs + (width * bpp + 7) // 8 * height <= request.npages * 4096


def test_fb_attach_format_is_known_or_einval() -> None:
    fb = FbAttachReq(
        1, dbuf_cookie=2, fb_cookie=3, width=640, height=480, pixel_format=PixelFormat.RGB565
    )
    assert fb.format is PixelFormat.RGB565
    fb.validate()
    unknown = dataclasses.replace(fb, pixel_format=0x20203859)  # 'Y8  '
    with pytest.raises(ProtocolError) as info:
        unknown.format  # noqa: B018
    assert info.value.errno == EINVAL
    with pytest.raises(ProtocolError):
        unknown.validate()


@pytest.mark.parametrize("field", ["dbuf_cookie", "fb_cookie", "width", "height"])
def test_fb_attach_with_a_zero_field_is_einval(field: str) -> None:
    fb = FbAttachReq(1, 2, 3, 640, 480, PixelFormat.XRGB8888)
    with pytest.raises(ProtocolError) as info:
        dataclasses.replace(fb, **{field: 0}).validate()
    assert info.value.errno == EINVAL


@pytest.mark.parametrize("cls", [DbufDestroyReq, FbDetachReq, PgFlipReq])
def test_cookie_zero_is_einval(cls: type[Any]) -> None:
    cls(1, 1).validate()
    with pytest.raises(ProtocolError) as info:
        cls(1, 0).validate()
    assert info.value.errno == EINVAL


def test_set_config_all_zero_payload_is_a_disable() -> None:
    disable = SetConfigReq.disable(id=4)
    assert disable.is_disable
    assert disable.pack()[8:] == bytes(56)
    disable.validate()
    assert not SetConfigReq(4, 1, 0, 0, 1024, 768, 32).is_disable
    assert not SetConfigReq(4, 0, 1, 0, 0, 0, 0).is_disable


@pytest.mark.parametrize(
    "fields",
    [
        {"fb_cookie": 0, "x": 1, "y": 0, "width": 0, "height": 0, "bpp": 0},
        {"fb_cookie": 7, "x": 0, "y": 0, "width": 0, "height": 768, "bpp": 32},
        {"fb_cookie": 7, "x": 0, "y": 0, "width": 1024, "height": 768, "bpp": 0},
    ],
)
def test_set_config_half_filled_is_einval(fields: dict[str, int]) -> None:
    with pytest.raises(ProtocolError) as info:
        SetConfigReq(id=1, **fields).validate()
    assert info.value.errno == EINVAL


def test_set_config_enable_is_valid() -> None:
    req = SetConfigReq(id=1, fb_cookie=7, x=0, y=0, width=1024, height=768, bpp=32)
    req.validate()  # raises on anything invalid
    assert not req.is_disable
    assert SetConfigReq.disable(2).is_disable


def test_get_edid_needs_a_full_size_buffer_and_a_directory() -> None:
    GetEdidReq(1, buffer_sz=EDID_MAX_SIZE, gref_directory=5).validate()
    assert GetEdidReq(1, EDID_MAX_SIZE, 5).npages == 8
    for bad in (GetEdidReq(1, EDID_MAX_SIZE - 1, 5), GetEdidReq(1, EDID_MAX_SIZE, 0)):
        with pytest.raises(ProtocolError) as info:
            bad.validate()
        assert info.value.errno == EINVAL
