"""Which XenStore nodes the backend may believe: the trust rule for toolstack-written nodes.

libxl writes a vdispl device's configuration (``be-alloc``, ``i/resolution``,
``i/unique-id``) into the guest's *frontend* directory, owned by the backend's domain and
read-only for the guest (``libxl__device_generic_add``: ``ro_frontend_perms``). But the guest
owns that directory and every connector directory ``i/``, and C xenstored lets the owner of a
directory remove it with everything in it. So the guest can remove ``i/`` and write new
nodes there, or add connectors: those nodes are then *its own*. What tells the two apart is
the node's permission list (XS_GET_PERMS), which only a privileged domain can set for another
owner: an unprivileged domain owns whatever it creates and may not hand a node to anyone else.

The rule (sans-I/O: the caller passes the permissions xenstored answered):

    A configuration node is trusted only if its owner — the first entry of its permissions —
    is the backend's domain or domain 0 (the toolstack), not the guest, and no domain but the
    owner may write it (the guest may read it, nothing more).

"May write" follows C xenstored's ``perm_for_conn``: the owner may do anything; another
domain gets the access of its own entry (the first one naming it), else the owner entry's
access, which is everyone's default. Checking every entry and the default — not only the
guest's — also refuses a node the guest could have another, colluding domain rewrite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from displback.protocol.errors import ProtocolError

__all__ = ["PermEntry", "TrustRule", "UntrustedNode", "access_of"]

_WRITING = frozenset("wb")


class PermEntry(Protocol):
    """One entry of a node's permission list as GET_PERMS answers it (``"r5"``: ``access``
    ``r`` for ``domid`` 5); the client's and the simulation's ``Perm`` both fit."""

    @property
    def domid(self) -> int: ...

    @property
    def access(self) -> str: ...


class UntrustedNode(ProtocolError):
    """A configuration node that the toolstack did not write (or that others may rewrite)."""


def access_of(perms: Sequence[PermEntry], domid: int) -> str:
    """The access (``n``, ``r``, ``w`` or ``b``) unprivileged domain ``domid`` has on a node
    with ``perms``, as C xenstored computes it (``perm_for_conn``)."""
    if not perms:
        return "n"
    if perms[0].domid == domid:
        return "b"
    for perm in perms[1:]:
        if perm.domid == domid:
            return perm.access
    return perms[0].access


@dataclass(frozen=True, slots=True)
class TrustRule:
    """The rule for one device: nodes the guest ``guest_domid`` must not have written, for the
    backend running in ``backend_domid``."""

    backend_domid: int
    guest_domid: int

    @property
    def trusted_owners(self) -> frozenset[int]:
        """The backend's domain and the toolstack's (domain 0) — never the guest itself."""
        return frozenset({self.backend_domid, 0}) - {self.guest_domid}

    def reason(self, perms: Sequence[PermEntry] | None) -> str | None:
        """Why a node with ``perms`` is not to be believed, or None if it is."""
        if not perms:
            return "its permissions are unknown"
        owner = perms[0].domid
        if owner == self.guest_domid:
            return f"it belongs to domain {owner}, the guest itself"
        if owner not in self.trusted_owners:
            return f"it belongs to domain {owner}, neither the backend nor the toolstack"
        if access_of(perms, self.guest_domid) in _WRITING:
            return f"the guest (domain {self.guest_domid}) may write it"
        if perms[0].access in _WRITING:
            return "every domain may write it"
        writers = sorted({p.domid for p in perms[1:] if p.access in _WRITING} - {owner})
        if writers:
            return f"domain {', '.join(str(d) for d in writers)} may write it"
        return None

    def check(self, what: str, perms: Sequence[PermEntry] | None) -> None:
        """Raise :class:`UntrustedNode` naming node ``what`` unless ``perms`` are trusted."""
        reason = self.reason(perms)
        if reason is not None:
            raise UntrustedNode(
                f"{what}: not written by the toolstack: {reason} "
                f"(permissions {_format(perms)}); the guest changed its configuration",
                what=what,
                value=_format(perms),
            )


def _format(perms: Sequence[PermEntry] | None) -> str:
    return " ".join(f"{p.access}{p.domid}" for p in perms or ())
