"""The trust rule for toolstack-written XenStore nodes, decided from their permissions alone."""

from __future__ import annotations

import pytest

from displback.protocol.trust import TrustRule, UntrustedNode, access_of
from displback.xenstore.client import Perm

GUEST, BACKEND = 5, 0
RULE = TrustRule(backend_domid=BACKEND, guest_domid=GUEST)


def perms(*texts: str) -> list[Perm]:
    """A permission list as GET_PERMS answers it (``"n0"``, ``"r5"`` …)."""
    return [Perm.parse(t) for t in texts]


@pytest.mark.parametrize(
    ("texts", "domid", "access"),
    [
        (("n0", "r5"), 5, "r"),  # named
        (("n0", "r5"), 7, "n"),  # the owner entry's access is everyone's default
        (("r0",), 7, "r"),
        (("n5", "r0"), 5, "b"),  # the owner may do anything
        (("n0", "w5", "r5"), 5, "w"),  # the first entry naming the domain counts
        (("b0", "n5"), 5, "n"),  # an entry overrides the default
        ((), 5, "n"),
    ],
)
def test_access_follows_xenstored_perm_for_conn(texts: tuple[str, ...], domid: int,
                                                access: str) -> None:
    assert access_of(perms(*texts), domid) == access


@pytest.mark.parametrize(
    "texts",
    [
        ("n0", "r5"),  # libxl's ro_frontend_perms
        ("n0",),  # the guest cannot even read it: still the toolstack's
        ("r0", "r5"),  # everyone may read
        ("n0", "r5", "r7", "n9"),
    ],
)
def test_nodes_only_the_toolstack_can_write_are_trusted(texts: tuple[str, ...]) -> None:
    assert RULE.reason(perms(*texts)) is None
    RULE.check("be-alloc", perms(*texts))


def test_a_driver_domain_trusts_its_own_nodes_and_the_toolstacks() -> None:
    rule = TrustRule(backend_domid=3, guest_domid=GUEST)
    assert rule.reason(perms("n3", "r5")) is None  # libxl makes the backend the owner
    assert rule.reason(perms("n0", "r5")) is None  # only a privileged domain can do this
    assert rule.reason(perms("n7", "r5")) is not None


@pytest.mark.parametrize(
    ("texts", "why"),
    [
        (("n5", "r0"), "domain 5, the guest itself"),  # the guest wrote it
        (("n7", "r5"), "domain 7, neither the backend nor the toolstack"),  # a third domain
        (("n0", "b5"), "the guest (domain 5) may write it"),
        (("n0", "w5"), "the guest (domain 5) may write it"),
        (("w0",), "the guest (domain 5) may write it"),  # by default
        (("b0", "r5"), "every domain may write it"),
        (("n0", "r5", "w7"), "domain 7 may write it"),  # a colluding domain could
        ((), "permissions are unknown"),
    ],
)
def test_nodes_others_wrote_or_may_write_are_not_trusted(texts: tuple[str, ...],
                                                         why: str) -> None:
    reason = RULE.reason(perms(*texts))
    assert reason is not None and why in reason
    with pytest.raises(UntrustedNode) as exc:
        RULE.check("0/resolution", perms(*texts))
    assert exc.value.what == "0/resolution"
    assert str(exc.value).startswith("0/resolution: not written by the toolstack: ")


def test_a_guest_that_is_domain_zero_trusts_nothing() -> None:
    """A frontend in domain 0 (the toolstack's own domain) could have written anything."""
    rule = TrustRule(backend_domid=0, guest_domid=0)
    assert rule.trusted_owners == frozenset()
    assert rule.reason(perms("n0")) is not None
