"""kms-info against the fake cards; DrmDevice details (events, errors, two-call protocol)."""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import struct
from collections.abc import Iterator

import pytest

from displback.kms import uapi
from displback.kms.device import DrmDevice, DrmError, parse_events
from displback.kms.info import add_kms_info_parser, kms_info
from tests.kms.fake import FakeCard, bochs_card, vkms_card


@pytest.fixture
def cards() -> Iterator[dict[str, FakeCard]]:
    made = {"/dev/dri/card0": vkms_card(), "/dev/dri/card1": bochs_card()}
    yield made
    for card in made.values():
        card.close()


def test_kms_info_lists_connectors_modes_crtcs_and_planes(cards: dict[str, FakeCard]) -> None:
    out = io.StringIO()
    status = kms_info(list(cards), out=out, open_fn=lambda p: cards[p].device())
    text = out.getvalue()
    assert status == 0
    assert "vkms (Virtual Kernel Mode Setting)" in text
    assert "capabilities: dumb_buffer, prime_import, prime_export, atomic" in text
    assert "lacks prime_import, prime_export, atomic" in text  # bochs
    assert "Virtual-1 (id 36): connected" in text
    assert "1024x768@60*" in text and "800x600@60.32" in text
    assert "34: FB 99 at 1024x768@60.00" in text
    assert "31: primary, CRTCs 34, formats XR24 AR24" in text
    assert "formats XR24 RG16" in text


def test_kms_info_json_is_machine_readable(cards: dict[str, FakeCard]) -> None:
    out = io.StringIO()
    kms_info(["/dev/dri/card0"], as_json=True, out=out, open_fn=lambda p: cards[p].device())
    (card,) = json.loads(out.getvalue())["cards"]
    assert card["driver"] == "vkms" and card["caps"]["atomic"]
    (conn,) = card["connectors"]
    assert conn["name"] == "Virtual-1" and conn["status"] == "connected"
    assert {"name": "1024x768", "refresh_hz": 60.0, "preferred": True} in conn["modes"]


def test_kms_info_reports_cards_it_cannot_open(cards: dict[str, FakeCard]) -> None:
    def open_fn(path: str) -> object:
        raise PermissionError(errno.EACCES, "Permission denied")

    out = io.StringIO()
    assert kms_info(["/dev/dri/card9"], out=out, open_fn=open_fn) == 1  # type: ignore[arg-type]
    assert "error: /dev/dri/card9: Permission denied" in out.getvalue()


def test_kms_info_parser_registers_its_handler() -> None:
    parser = argparse.ArgumentParser()
    add_kms_info_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["kms-info", "--card", "/dev/dri/card1", "--json"])
    assert args.card == ["/dev/dri/card1"] and args.json
    assert args.func.__name__ == "run_kms_info"


def test_drm_error_names_the_ioctl_and_keeps_the_errno() -> None:
    card = vkms_card()
    try:
        dev = card.device()
        with pytest.raises(DrmError) as info:
            dev.crtc(77)
        assert info.value.errno == errno.ENOENT and info.value.ioctl == "MODE_GETCRTC"
        assert str(info.value) == (
            "DRM_IOCTL_MODE_GETCRTC failed: No such file or directory (errno 2); CRTC 77"
        )
        assert isinstance(info.value, OSError)
    finally:
        card.close()


def test_interrupted_ioctls_are_retried() -> None:
    card = vkms_card()
    try:
        card.fail("GET_CAP", errno.EINTR, times=3)
        assert card.device().get_cap(uapi.Cap.DUMB_BUFFER) == 1
        assert card.calls.count("GET_CAP") == 4
    finally:
        card.close()


def test_connector_is_read_without_probing_unless_asked() -> None:
    card = vkms_card()
    try:
        dev = card.device()
        conn = dev.connector(36)
        assert len(conn.modes) == 6 and conn.preferred_mode is not None
        card.unplug()
        gone = dev.connector(36, probe=True)
        assert not gone.connected and gone.modes == () and gone.preferred_mode is None
    finally:
        card.close()


def _event(kind: int, user_data: int, seq: int) -> bytes:
    return struct.pack("=IIQIIII", kind, 32, user_data, 12, 500000, seq, 34)


def test_events_are_split_and_unknown_kinds_skipped() -> None:
    data = (
        _event(uapi.DRM_EVENT_FLIP_COMPLETE, 7, 100)
        + struct.pack("=II", 0x80000000, 16)
        + bytes(8)
        + _event(uapi.DRM_EVENT_VBLANK, 8, 101)
    )
    first, second = parse_events(data)
    assert first.flip_complete and first.user_data == 7 and first.sequence == 100
    assert first.timestamp == pytest.approx(12.5) and first.crtc_id == 34
    assert not second.flip_complete and second.user_data == 8


@pytest.mark.parametrize(
    "data",
    [
        b"\x02\x00\x00",
        struct.pack("=II", 2, 4),
        struct.pack("=II", 2, 64) + bytes(24),
        struct.pack("=II", 2, 16) + bytes(8),
    ],
    ids=["short-header", "length-below-header", "length-past-end", "short-flip-event"],
)
def test_malformed_events_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_events(data)


def test_real_syscalls_reach_the_kernel_and_fail_on_a_non_drm_fd() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    dev = DrmDevice(fd)  # the default KernelSyscalls: fcntl.ioctl with the ctypes struct
    try:
        for call, name in ((dev.version, "VERSION"), (dev.set_master, "SET_MASTER")):
            with pytest.raises(DrmError) as info:
                call()
            assert (info.value.ioctl, info.value.errno) == (name, errno.ENOTTY)
    finally:
        dev.close()
    assert dev.closed
    with pytest.raises(DrmError, match="closed"):
        dev.get_cap(uapi.Cap.PRIME)
