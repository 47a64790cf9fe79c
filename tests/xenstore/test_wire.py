"""The xs_wire codec: header layout, stream reassembly, error names, string payloads."""

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from displback.xenstore.wire import (
    ERROR_NAMES,
    MAX_PAYLOAD,
    MsgType,
    Packet,
    PacketReader,
    WireError,
    XenStoreError,
    check_path,
    join_strings,
    split_strings,
)


def test_packet_header_is_four_little_endian_u32s() -> None:
    pkt = Packet(MsgType.READ, 0x01020304, 7, b"/local\0")
    raw = pkt.pack()
    assert raw[:16] == bytes.fromhex("02000000" "04030201" "07000000" "07000000")
    assert raw[16:] == b"/local\0"


packets = st.builds(
    Packet,
    type=st.sampled_from(list(MsgType)),
    req_id=st.integers(0, 2**32 - 1),
    tx_id=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=MAX_PAYLOAD),
)


@given(st.lists(packets, max_size=5), st.integers(1, 5000))
def test_reader_reassembles_packets_split_at_any_boundary(pkts: list[Packet], chunk: int) -> None:
    stream = b"".join(p.pack() for p in pkts)
    reader = PacketReader()
    out: list[Packet] = []
    for i in range(0, len(stream), chunk):
        out.extend(reader.feed(stream[i : i + chunk]))
    assert out == pkts
    assert reader.pending == 0


def test_reader_refuses_payload_over_4096_bytes() -> None:
    reader = PacketReader()
    header = Packet(MsgType.WRITE, 1, 0, b"").pack()[:12] + (4097).to_bytes(4, "little")
    with pytest.raises(WireError):
        list(reader.feed(header))


def test_oversized_packet_cannot_be_built() -> None:
    with pytest.raises(WireError):
        Packet(MsgType.WRITE, 1, 0, b"x" * (MAX_PAYLOAD + 1))


def test_error_reply_names_map_to_errno_numbers() -> None:
    request = Packet(MsgType.READ, 9, 3, b"/nope\0")
    reply = Packet.error(request, "ENOENT")
    assert (reply.type, reply.req_id, reply.tx_id) == (MsgType.ERROR, 9, 3)
    with pytest.raises(XenStoreError) as exc:
        reply.raise_for_error()
    assert exc.value.errno == errno.ENOENT and exc.value.name == "ENOENT"
    assert all(hasattr(errno, name) for name in ERROR_NAMES)


def test_unknown_error_name_becomes_eio() -> None:
    assert XenStoreError("EWHATEVER").errno == errno.EIO
    assert XenStoreError.from_errno(errno.EXDEV).name == "EIO"
    assert XenStoreError.from_errno(errno.EAGAIN).name == "EAGAIN"


def test_string_payload_helpers() -> None:
    assert join_strings("/a", "tok") == b"/a\0tok\0"
    assert join_strings("/a", b"value", terminate_last=False) == b"/a\0value"
    assert split_strings(b"a\0b\0") == [b"a", b"b"]
    assert split_strings(b"") == []
    assert split_strings(b"a\0\0") == [b"a", b""]


@pytest.mark.parametrize(
    "path",
    ["/", "/local/domain/5/device/vdispl/0", "device/vdispl/0", "/a-b_c@d", "/" + "a" * 3071],
)
def test_check_path_accepts_what_xenstored_accepts(path: str) -> None:
    assert check_path(path) == path
    assert check_path(path.encode()) == path


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "empty"),
        ("/a//b", "'//'"),
        ("/a/", "ends with '/'"),
        ("/a b", "invalid character ' '"),
        ("/a\0b", "invalid character"),
        ("/caf\u00e9", "invalid character"),
        (b"/caf\xc3\xa9", "not ASCII"),
        ("/" + "a" * 3072, "exceeds 3072"),
        ("a" * 2049, "exceeds 2048"),
        ("@releaseDomain", "only valid for a watch"),
    ],
)
def test_check_path_refuses_bad_paths_with_einval_saying_why(
    path: str | bytes, reason: str
) -> None:
    with pytest.raises(XenStoreError) as exc:
        check_path(path)
    assert exc.value.name == "EINVAL"
    assert reason in str(exc.value)


def test_check_path_allows_special_paths_only_for_watches() -> None:
    assert check_path("@introduceDomain", watch=True) == "@introduceDomain"
