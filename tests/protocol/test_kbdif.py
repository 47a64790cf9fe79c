"""The kbdif wire against Xen's own kbdif.h (compiled at test time), and the in ring's rules.

The left side of every layout comparison is displback's code, the right side
``tests/golden/kbdif_golden.c`` built against ``/usr/include/xen/io/kbdif.h``; a missing
compiler or header fails (``make apt-deps``), never skips.
"""

from __future__ import annotations

import struct

import pytest

from displback.protocol import kbdif
from displback.protocol.errors import ProtocolError
from displback.protocol.kbdif import (
    InEventConsumer,
    InEventProducer,
    Key,
    Motion,
    MtDown,
    MtMotion,
    MtOrient,
    MtShape,
    MtSyn,
    MtUp,
    Position,
    backend_feature_writes,
    in_slot_offset,
    parse_backend_config,
    parse_event,
    parse_frontend_transport,
)
from tests.golden import kbdif_golden

SAMPLES = {
    "motion": Motion(-5, 7, -1),
    "key": Key(0x110, True),
    "pos": Position(1919, 1079, 2),
    "mt_down": MtDown(3, 100, 200),
    "mt_motion": MtMotion(3, -1, 65536),
    "mt_up": MtUp(9),
    "mt_syn": MtSyn(0),
    "mt_shape": MtShape(1, 40, 0xFFFFFFF0),
    "mt_orient": MtOrient(2, -90),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_event_packs_byte_for_byte_as_the_c_union_and_parses_back(name: str) -> None:
    expected = bytes.fromhex(kbdif_golden()["samples"][name])
    assert SAMPLES[name].pack() == expected
    assert parse_event(expected) == SAMPLES[name]


def test_page_geometry_and_constants_match_the_header() -> None:
    c = kbdif_golden()["constants"]
    offsets = kbdif_golden()["offsets"]
    assert kbdif.EVENT_SIZE == c["XENKBD_IN_EVENT_SIZE"] == offsets["sizeof.xenkbd_in_event"]
    assert c["XENKBD_IN_RING_OFFS"] == kbdif.IN_RING_OFS
    assert c["XENKBD_IN_RING_SIZE"] == kbdif.IN_RING_SIZE
    assert c["XENKBD_IN_RING_LEN"] == kbdif.IN_RING_LEN
    assert c["XENKBD_OUT_RING_OFFS"] == kbdif.OUT_RING_OFS
    assert c["XENKBD_OUT_RING_SIZE"] == kbdif.OUT_RING_SIZE
    assert offsets["xenkbd_page.in_cons"] == [kbdif.IN_CONS_OFS, 4]
    assert offsets["xenkbd_page.in_prod"] == [kbdif.IN_PROD_OFS, 4]
    assert offsets["xenkbd_page.out_cons"] == [kbdif.OUT_CONS_OFS, 4]
    assert offsets["xenkbd_page.out_prod"] == [kbdif.OUT_PROD_OFS, 4]
    for ours, theirs in (
        (kbdif.TYPE_MOTION, "XENKBD_TYPE_MOTION"),
        (kbdif.TYPE_KEY, "XENKBD_TYPE_KEY"),
        (kbdif.TYPE_POS, "XENKBD_TYPE_POS"),
        (kbdif.TYPE_MTOUCH, "XENKBD_TYPE_MTOUCH"),
        (kbdif.MT_EV_DOWN, "XENKBD_MT_EV_DOWN"),
        (kbdif.MT_EV_UP, "XENKBD_MT_EV_UP"),
        (kbdif.MT_EV_MOTION, "XENKBD_MT_EV_MOTION"),
        (kbdif.MT_EV_SYN, "XENKBD_MT_EV_SYN"),
        (kbdif.MT_EV_SHAPE, "XENKBD_MT_EV_SHAPE"),
        (kbdif.MT_EV_ORIENT, "XENKBD_MT_EV_ORIENT"),
    ):
        assert ours == c[theirs], theirs


def test_xenstore_node_names_match_the_header() -> None:
    fields = kbdif_golden()["fields"]
    assert fields["XENKBD_DRIVER_NAME"] == kbdif.FRONTEND_KIND
    for ours, theirs in (
        (kbdif.FEATURE_DISABLE_KEYBOARD, "XENKBD_FIELD_FEAT_DSBL_KEYBRD"),
        (kbdif.FEATURE_DISABLE_POINTER, "XENKBD_FIELD_FEAT_DSBL_POINTER"),
        (kbdif.FEATURE_ABS_POINTER, "XENKBD_FIELD_FEAT_ABS_POINTER"),
        (kbdif.FEATURE_RAW_POINTER, "XENKBD_FIELD_FEAT_RAW_POINTER"),
        (kbdif.FEATURE_MULTI_TOUCH, "XENKBD_FIELD_FEAT_MTOUCH"),
        (kbdif.REQUEST_ABS_POINTER, "XENKBD_FIELD_REQ_ABS_POINTER"),
        (kbdif.REQUEST_RAW_POINTER, "XENKBD_FIELD_REQ_RAW_POINTER"),
        (kbdif.REQUEST_MULTI_TOUCH, "XENKBD_FIELD_REQ_MTOUCH"),
        (kbdif.PAGE_GREF, "XENKBD_FIELD_RING_GREF"),
        (kbdif.PAGE_REF, "XENKBD_FIELD_RING_REF"),
        (kbdif.EVENT_CHANNEL, "XENKBD_FIELD_EVT_CHANNEL"),
        (kbdif.WIDTH, "XENKBD_FIELD_WIDTH"),
        (kbdif.HEIGHT, "XENKBD_FIELD_HEIGHT"),
        (kbdif.MT_WIDTH, "XENKBD_FIELD_MT_WIDTH"),
        (kbdif.MT_HEIGHT, "XENKBD_FIELD_MT_HEIGHT"),
        (kbdif.MT_NUM_CONTACTS, "XENKBD_FIELD_MT_NUM_CONTACTS"),
    ):
        assert ours == fields[theirs], theirs


def test_slot_of_an_index_is_the_headers_ring_ref_also_across_the_wrap() -> None:
    for index, offset in kbdif_golden()["slots"].items():
        assert in_slot_offset(int(index)) == offset, index


def test_unknown_types_and_sub_types_parse_as_nothing() -> None:
    assert parse_event(bytes([2]) + bytes(39)) is None  # XENKBD_TYPE_RESERVED
    assert parse_event(bytes([kbdif.TYPE_MTOUCH, 6]) + bytes(38)) is None


def _page(start: int = 0) -> bytearray:
    page = bytearray(4096)
    struct.pack_into("<II", page, 0, start, start)
    return page


def test_events_reach_the_consumer_in_order_and_in_cons_is_published() -> None:
    page = _page()
    producer, consumer = InEventProducer(page), InEventConsumer(page)
    events = [Key(30, True), Key(30, False), Position(5, 6)]
    assert producer.put(events) == 3
    assert struct.unpack_from("<I", page, 4)[0] == 3
    assert consumer.take() == events
    assert struct.unpack_from("<I", page, 0)[0] == 3


def test_a_full_ring_takes_51_events_and_refuses_the_rest_without_writing() -> None:
    page = _page()
    producer = InEventProducer(page)
    assert producer.put([Key(n, True) for n in range(60)]) == 51
    before = bytes(page)
    assert producer.put([Key(99, True)]) == 0
    assert bytes(page) == before
    consumer = InEventConsumer(page)
    assert [e.keycode for e in consumer.take() if isinstance(e, Key)] == list(range(51))
    assert producer.put([Key(99, True)]) == 1


@pytest.mark.parametrize("in_cons", [1, 52, 0x8000_0000])
def test_in_cons_past_in_prod_or_more_than_a_ring_behind_is_a_protocol_error(
    in_cons: int,
) -> None:
    page = _page()
    producer = InEventProducer(page)
    struct.pack_into("<I", page, 0, in_cons)
    with pytest.raises(ProtocolError):
        producer.put([Key(1, True)])


def test_across_the_u32_wrap_an_unread_slot_is_never_overwritten() -> None:
    start = 0xFFFF_FFF0
    page = _page(start)
    producer = InEventProducer(page, start=start)
    consumer = InEventConsumer(page)
    written = producer.put([Key(n, True) for n in range(60)])
    # 2**32 = 1 mod 51: index 0 would land on the slot of 2**32 - 1, still unread.
    assert written < 51
    got = consumer.take()
    assert [e.keycode for e in got if isinstance(e, Key)] == list(range(written))
    assert producer.put([Key(n, True) for n in range(60)]) > 0
    assert all(isinstance(e, Key) for e in consumer.take())


def test_resume_continues_from_the_pages_indexes_and_refuses_impossible_ones() -> None:
    page = _page(1000)
    producer = InEventProducer.resume(page)
    assert producer.in_prod == 1000
    struct.pack_into("<II", page, 0, 10, 1000)
    with pytest.raises(ProtocolError):
        InEventProducer.resume(page)


def test_feature_writes_fill_in_only_what_the_toolstack_left_out() -> None:
    writes = backend_feature_writes({}, (1024, 768))
    assert writes == {
        "feature-abs-pointer": b"1",
        "feature-multi-touch": b"1",
        "width": b"1024",
        "height": b"768",
        "multi-touch-width": b"1024",
        "multi-touch-height": b"768",
        "multi-touch-num-contacts": b"10",
    }
    given = {"feature-abs-pointer": b"0", "width": b"800", "height": b"600"}
    writes = backend_feature_writes(given, (1024, 768))
    assert "feature-abs-pointer" not in writes and "width" not in writes
    config = parse_backend_config({**given, **writes})
    assert (config.abs_pointer, config.width, config.height) == (False, 800, 600)
    assert (config.mt_width, config.contacts, config.keyboard) == (1024, 10, True)


@pytest.mark.parametrize(
    "node, value", [("width", b"-1"), ("multi-touch-num-contacts", b"300"), ("height", b"0x10")]
)
def test_a_toolstack_value_we_cannot_read_is_refused(node: str, value: bytes) -> None:
    with pytest.raises(ProtocolError) as error:
        backend_feature_writes({node: value}, (640, 480))
    assert error.value.what == node


def test_frontend_transport_is_parsed_strictly() -> None:
    transport = parse_frontend_transport(
        {
            "page-gref": b"8",
            "page-ref": b"123456",
            "event-channel": b"7",
            "request-abs-pointer": b"1",
        }
    )
    assert (transport.page_gref, transport.event_channel) == (8, 7)
    assert transport.abs_pointer and not transport.multi_touch
    legacy = parse_frontend_transport({"page-ref": b"5", "event-channel": b"3"})
    assert legacy.page_gref is None and legacy.page_ref == 5


@pytest.mark.parametrize(
    "read, what",
    [
        ({"event-channel": b"3"}, "page-gref"),
        ({"page-gref": b"0", "event-channel": b"3"}, "page-gref"),
        ({"page-gref": b"8"}, "event-channel"),
        ({"page-gref": b"8", "event-channel": b"0"}, "event-channel"),
        ({"page-gref": b" 8", "event-channel": b"3"}, "page-gref"),
        ({"page-gref": b"8", "event-channel": b"3", "request-multi-touch": b"yes"},
         "request-multi-touch"),
    ],
)
def test_bad_frontend_values_name_their_node(read: dict[str, bytes], what: str) -> None:
    with pytest.raises(ProtocolError) as error:
        parse_frontend_transport(read)
    assert error.value.what == what
