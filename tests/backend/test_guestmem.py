"""Guest memory through gntdev: every platform failure is the guest's request answered with
one errno (and a line naming what failed), and a directory longer than the limit is refused
before any of it is read."""

from __future__ import annotations

import errno
from typing import Any, cast

import pytest

from displback.backend.errors import RequestError
from displback.backend.guestmem import (
    errno_for_os_error,
    fill_directory,
    map_buffer,
    read_directory,
)
from displback.protocol.constants import EINVAL, EIO, ENOMEM
from displback.xen.interfaces import GrantDevice


class FailingGrants:
    """A gntdev whose every map and copy fails with ``errno``; it records the attempts."""

    def __init__(self, errno_: int) -> None:
        self.errno = errno_
        self.calls: list[str] = []

    def map_grants(self, domid: int, refs: list[int], *, writable: bool) -> Any:
        self.calls.append("map")
        raise OSError(self.errno, "refused")

    def copy_from_grant(self, domid: int, gref: int, length: int) -> bytes:
        self.calls.append("copy")
        raise OSError(self.errno, "refused")


def grants(errno_: int = errno.EFAULT) -> tuple[FailingGrants, GrantDevice]:
    fake = FailingGrants(errno_)
    return fake, cast(GrantDevice, fake)


@pytest.mark.parametrize(
    ("platform", "answer"),
    [
        (errno.EINVAL, EINVAL),  # unknown, revoked or foreign grant
        (errno.ENOMEM, ENOMEM),  # out of mappings
        (errno.ENOSPC, ENOMEM),
        (errno.EFAULT, EIO),  # anything else
        (errno.EPERM, EIO),
    ],
)
def test_a_platform_failure_is_answered_with_one_errno(platform: int, answer: int) -> None:
    assert errno_for_os_error(OSError(platform, "x")) == answer
    _fake, device = grants(platform)
    with pytest.raises(RequestError) as info:
        map_buffer(device, 7, [1, 2], writable=False)
    assert info.value.errno == answer


def test_a_refused_mapping_says_what_whose_and_how_it_was_mapped() -> None:
    _fake, device = grants()
    with pytest.raises(RequestError) as info:
        map_buffer(device, 7, [1, 2, 3], writable=False)
    assert info.value.message.startswith("cannot map the buffer (3 grant(s) of dom7, read-only)")
    with pytest.raises(RequestError) as info:
        fill_directory(device, 7, 40, [1, 2])
    assert "cannot map a directory page (1 grant(s) of dom7, writable)" in info.value.message


def test_a_directory_page_that_cannot_be_read_names_its_gref_and_domain() -> None:
    _fake, device = grants(errno.ENOMEM)
    with pytest.raises(RequestError) as info:
        read_directory(device, 7, 40, 2)
    assert info.value.errno == ENOMEM
    assert info.value.message.startswith("cannot read directory page gref 40 of dom7")


def test_a_directory_longer_than_the_limit_is_refused_before_any_page_is_touched() -> None:
    fake, device = grants()
    with pytest.raises(RequestError) as info:
        read_directory(device, 7, 40, 11, max_refs=10)
    assert info.value.errno == EINVAL and "bad page directory" in info.value.message
    with pytest.raises(RequestError) as info:
        fill_directory(device, 7, 40, list(range(1, 12)), max_refs=10)
    assert info.value.errno == EINVAL and "bad page directory" in info.value.message
    assert fake.calls == []


def test_an_errno_of_zero_is_no_error() -> None:
    with pytest.raises(ValueError):
        RequestError(0, "success is not an error")
    error = RequestError(EIO, "the message")
    assert (error.errno, error.message, str(error)) == (EIO, "the message", "the message")
