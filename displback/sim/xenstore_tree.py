"""The simulated xenstored's store, with no I/O: nodes, permissions, transactions, watches.

Theory of operation
-------------------
The store is a flat map from absolute path to an immutable :class:`Node` (value, permissions,
ordered child names, generation). Every client — a socket connection of the simulated
xenstored, or an in-process helper such as the toolstack — is a :class:`Session` bound to a
domain id; all operations go through a session, so every permission decision knows who asks.

Semantics follow Xen's C xenstored (tools/xenstored, 4.17):

* **Permissions.** Domain 0 is privileged and may do anything. For everyone else the first
  permission entry names the owner (full rights) and the default for other domains; later
  entries grant ``r``/``w``/``b``/``n`` to one domain each. A missing node reports ``EACCES``
  rather than ``ENOENT`` when the caller could not read (or, for writes, write) its nearest
  existing ancestor, so unprivileged domains cannot probe for hidden nodes.
* **Creation.** WRITE and MKDIR create missing parents with empty values. A new node inherits
  its parent's permissions; when an unprivileged domain creates it, that domain becomes the
  owner. Creating needs write permission on the nearest existing ancestor.
* **RM** removes a subtree. A missing node whose parent exists is fine (``OK``, as xenstored
  does); a missing parent is ``ENOENT``; removing ``/`` is ``EINVAL``.
* **Generations.** Every stored change gives the node a fresh number from one global counter;
  adding or removing a child changes the parent too. A transaction records the generation of
  every node it reads or writes the first time it touches it (``None`` for "absent"); commit
  fails with ``EAGAIN`` if any of them changed meanwhile, else applies its private overlay.
  Reads inside a transaction see the transaction's own writes.
* **Watches.** A watch on ``P`` fires for a change of ``P`` or any descendant. Removing a
  subtree fires the watches on the removed root and its ancestors (reporting the root) and the
  watches placed exactly on each removed descendant (reporting that node). A watch fires only if
  the watcher may read the node (before or after the change) or its parent. Watches registered
  with a relative path get relative event paths. Changes made in a transaction fire on commit,
  never before, and not at all on abort. ``@introduceDomain`` / ``@releaseDomain`` fire through
  :meth:`XenStoreTree.introduce_domain` / :meth:`XenStoreTree.release_domain`; they are
  readable by domain 0 only unless their permissions are changed with SET_PERMS.

Errors are :class:`~displback.xenstore.wire.XenStoreError` carrying the errno name xenstored
would put on the wire.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from displback.xenstore.wire import MAX_PAYLOAD, MAX_REL_PATH, Perm, XenStoreError, check_path

__all__ = [
    "INTRODUCE_DOMAIN",
    "RELEASE_DOMAIN",
    "Node",
    "Session",
    "WatchEvent",
    "XenStoreTree",
    "domain_path",
    "format_perms",
    "parse_perms",
]

INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_PATHS = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)

# Quotas of the C xenstored's defaults, applied to unprivileged domains only.
MAX_TRANSACTIONS = 10
MAX_WATCHES = 128

_READ, _WRITE, _OWNER = 1, 2, 4
_ACCESS_BITS = {"n": 0, "r": _READ, "w": _WRITE, "b": _READ | _WRITE}
_DOMAIN_PREFIX_RE = re.compile(r"/local/domain/[0-9]{1,5}/")


def domain_path(domid: int) -> str:
    """The home directory of domain ``domid`` (what GET_DOMAIN_PATH answers)."""
    return f"/local/domain/{domid}"


def parse_perms(entries: Iterable[str | bytes]) -> tuple[Perm, ...]:
    """Parse a permission list (owner entry first); an empty list is ``EINVAL``."""
    try:
        perms = tuple(Perm.parse(e) for e in entries)
    except ValueError as exc:
        raise XenStoreError("EINVAL", f"bad permission: {exc}") from None
    if not perms:
        raise XenStoreError("EINVAL", "empty permission list")
    return perms


def format_perms(perms: Iterable[Perm]) -> list[str]:
    return [str(p) for p in perms]


def _rights(domid: int, perms: tuple[Perm, ...]) -> int:
    """The access bits ``domid`` has on a node with ``perms`` (xenstored's perm_for_conn)."""
    if domid == 0 or perms[0].domid == domid:
        return _READ | _WRITE | _OWNER
    for perm in perms[1:]:
        if perm.domid == domid:
            return _ACCESS_BITS[perm.access]
    return _ACCESS_BITS[perms[0].access]


def _parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[1]


def _join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def _is_within(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it (xenstored's is_child)."""
    return top == "/" or path == top or path.startswith(top + "/")


@dataclass(frozen=True, slots=True)
class Node:
    """One stored node. Immutable: every change stores a new one with a new generation."""

    value: bytes
    perms: tuple[Perm, ...]
    children: tuple[str, ...] = ()
    generation: int = 0


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A WATCH_EVENT to deliver: the path as the watcher should see it, and its token."""

    path: str
    token: str

    def payload(self) -> bytes:
        return self.path.encode() + b"\0" + self.token.encode() + b"\0"


@dataclass(frozen=True, slots=True)
class _Watch:
    path: str  # canonical (absolute or special)
    token: str
    prefix: str  # "" or the domain home a relative watch was resolved against

    def event(self, changed: str) -> WatchEvent:
        if self.prefix and changed.startswith(self.prefix + "/"):
            return WatchEvent(changed[len(self.prefix) + 1 :], self.token)
        return WatchEvent(changed, self.token)


@dataclass(frozen=True, slots=True)
class _Change:
    """A change to report: ``exact`` matches only watches on ``path`` itself; ``perms`` are the
    permission sets under which a watcher may learn of it (node before/after, parent)."""

    path: str
    exact: bool
    perms: tuple[tuple[Perm, ...], ...]


@dataclass
class _Transaction:
    id: int
    session: Session
    overlay: dict[str, Node | None] = field(default_factory=dict)
    seen: dict[str, int | None] = field(default_factory=dict)
    changes: list[_Change] = field(default_factory=list)


class _Access:
    """One operation's view of the store: direct, or through a transaction's overlay."""

    def __init__(self, tree: XenStoreTree, txn: _Transaction | None) -> None:
        self._tree = tree
        self._txn = txn
        self.changes: list[_Change] = []

    def _note(self, path: str) -> None:
        txn = self._txn
        if txn is not None and path not in txn.seen:
            node = self._tree._nodes.get(path)
            txn.seen[path] = None if node is None else node.generation

    def get(self, path: str) -> Node | None:
        txn = self._txn
        if txn is not None:
            self._note(path)
            if path in txn.overlay:
                return txn.overlay[path]
        return self._tree._nodes.get(path)

    def put(self, path: str, node: Node) -> None:
        if self._txn is not None:
            self._note(path)
            self._txn.overlay[path] = node
        else:
            self._tree._store(path, node)

    def delete(self, path: str) -> None:
        if self._txn is not None:
            self._note(path)
            self._txn.overlay[path] = None
        else:
            self._tree._nodes.pop(path, None)

    def finish(self) -> None:
        """Fire the collected changes now, or keep them for the transaction's commit."""
        if self._txn is not None:
            self._txn.changes.extend(self.changes)
        else:
            self._tree._fire(self.changes)
        self.changes = []


class Session:
    """One client of the store (a connection), acting as domain ``domid``.

    Watch events go to ``on_event`` (default: appended to :attr:`events`). Every data operation
    takes ``tx``: 0 for none, else an id from :meth:`transaction_start` of this session.
    """

    def __init__(
        self,
        tree: XenStoreTree,
        domid: int,
        on_event: Callable[[WatchEvent], None] | None = None,
    ) -> None:
        self.tree = tree
        self.domid = domid
        self.events: deque[WatchEvent] = deque()
        self.on_event: Callable[[WatchEvent], None] = on_event or self.events.append
        self._watches: list[_Watch] = []
        self._transactions: dict[int, _Transaction] = {}
        self.closed = False

    @property
    def privileged(self) -> bool:
        return self.domid == 0

    # -- paths and permissions -------------------------------------------------------

    def resolve(self, path: str | bytes, *, special: bool = False) -> str:
        """Canonical absolute path for ``path`` (relative ones live under the domain home)."""
        text = check_path(path, watch=special)
        if text.startswith("@"):
            if text not in SPECIAL_PATHS:
                raise XenStoreError("EINVAL", f"unknown special path {text!r}")
            return text
        if not text.startswith("/"):
            text = f"{domain_path(self.domid)}/{text}"
        match = _DOMAIN_PREFIX_RE.match(text)
        if match is not None and len(text) - match.end() > MAX_REL_PATH:
            raise XenStoreError("EINVAL", f"path below {match.group(0)} exceeds {MAX_REL_PATH}")
        check_path(text)
        return text

    def _get(self, acc: _Access, path: str, need: int) -> Node:
        """The node at ``path`` if the caller has ``need`` on it; ENOENT/EACCES as xenstored."""
        node = acc.get(path)
        if node is not None:
            if _rights(self.domid, node.perms) & need != need:
                raise XenStoreError("EACCES", path)
            return node
        ancestor = path
        while ancestor != "/":
            ancestor = _parent(ancestor)
            parent = acc.get(ancestor)
            if parent is not None:
                if _rights(self.domid, parent.perms) & need:
                    raise XenStoreError("ENOENT", path)
                raise XenStoreError("EACCES", path)
        raise XenStoreError("ENOENT", path)

    def _access(self, tx: int) -> _Access:
        if self.closed:
            raise XenStoreError("EINVAL", "session closed")
        if tx == 0:
            return _Access(self.tree, None)
        txn = self._transactions.get(tx)
        if txn is None:
            raise XenStoreError("ENOENT", f"no transaction {tx}")
        return _Access(self.tree, txn)

    # -- data operations ---------------------------------------------------------------

    def read(self, path: str | bytes, tx: int = 0) -> bytes:
        acc = self._access(tx)
        return self._get(acc, self.resolve(path), _READ).value

    def exists(self, path: str | bytes, tx: int = 0) -> bool:
        """Whether ``path`` exists and is readable (a READ that does not raise ENOENT)."""
        try:
            self.read(path, tx)
        except XenStoreError as exc:
            if exc.name == "ENOENT":
                return False
            raise
        return True

    def write(self, path: str | bytes, value: bytes, tx: int = 0) -> None:
        acc = self._access(tx)
        self._store_value(acc, self.resolve(path), value, replace=True)
        acc.finish()

    def mkdir(self, path: str | bytes, tx: int = 0) -> None:
        acc = self._access(tx)
        self._store_value(acc, self.resolve(path), b"", replace=False)
        acc.finish()

    def _store_value(self, acc: _Access, path: str, value: bytes, *, replace: bool) -> None:
        try:
            node = self._get(acc, path, _WRITE)
        except XenStoreError as exc:
            if exc.name != "ENOENT":
                raise
            self._create(acc, path, value)
            return
        if replace:
            acc.put(path, dataclasses.replace(node, value=value))
            acc.changes.append(_Change(path, False, (node.perms,)))

    def _create(self, acc: _Access, path: str, value: bytes) -> None:
        missing = [path]
        parent_path = _parent(path)
        parent = acc.get(parent_path)
        while parent is None:
            missing.append(parent_path)
            parent_path = _parent(parent_path)
            parent = acc.get(parent_path)
        parent_perms = parent.perms  # of the final node's parent, for the watch check
        for index, new_path in enumerate(reversed(missing)):
            parent_perms = parent.perms
            perms = parent.perms
            if not self.privileged:
                perms = (Perm(self.domid, perms[0].access), *perms[1:])
            acc.put(parent_path, dataclasses.replace(
                parent, children=(*parent.children, _basename(new_path))))
            node = Node(value if index == len(missing) - 1 else b"", perms)
            acc.put(new_path, node)
            parent_path, parent = new_path, node
        acc.changes.append(_Change(path, False, (parent.perms, parent_perms)))

    def rm(self, path: str | bytes, tx: int = 0) -> None:
        acc = self._access(tx)
        target = self.resolve(path)
        if target == "/":
            raise XenStoreError("EINVAL", "cannot remove /")
        try:
            node = self._get(acc, target, _WRITE)
        except XenStoreError as exc:
            if exc.name == "ENOENT" and acc.get(_parent(target)) is not None:
                return  # xenstored: removing a missing child of an existing node is fine
            raise
        parent_path = _parent(target)
        parent = acc.get(parent_path)
        assert parent is not None
        removed: list[tuple[str, Node, Node]] = []
        self._collect(acc, target, node, parent, removed)
        for sub_path, sub_node, sub_parent in removed:
            acc.delete(sub_path)
            if sub_path != target:
                acc.changes.append(_Change(sub_path, True, (sub_node.perms, sub_parent.perms)))
        name = _basename(target)
        acc.put(parent_path, dataclasses.replace(
            parent, children=tuple(c for c in parent.children if c != name)))
        acc.changes.append(_Change(target, False, (node.perms, parent.perms)))
        acc.finish()

    def _collect(
        self, acc: _Access, path: str, node: Node, parent: Node,
        out: list[tuple[str, Node, Node]],
    ) -> None:
        """``out`` gets (path, node, parent) for the subtree at ``path``, deepest first."""
        for child in node.children:
            child_path = _join(path, child)
            child_node = acc.get(child_path)
            if child_node is not None:
                self._collect(acc, child_path, child_node, node, out)
        out.append((path, node, parent))

    def directory(self, path: str | bytes, tx: int = 0) -> list[str]:
        acc = self._access(tx)
        return list(self._get(acc, self.resolve(path), _READ).children)

    def directory_part(self, path: str | bytes, offset: int, tx: int = 0) -> bytes:
        """DIRECTORY_PART reply: ``gen\\0`` then the NUL-terminated child names starting at
        byte ``offset`` of the full list, as many as fit; a final empty name marks the end."""
        acc = self._access(tx)
        node = self._get(acc, self.resolve(path), _READ)
        names = b"".join(c.encode() + b"\0" for c in node.children)
        gen = str(node.generation).encode() + b"\0"
        if offset >= len(names):
            return gen + b"\0"
        room = MAX_PAYLOAD - len(gen) - 1
        end = offset
        while end < len(names):
            step = names.index(b"\0", end) + 1 - end
            if end - offset + step > room:
                break
            end += step
        tail = b"\0" if end == len(names) else b""
        return gen + names[offset:end] + tail

    def get_perms(self, path: str | bytes, tx: int = 0) -> tuple[Perm, ...]:
        target = self.resolve(path, special=True)
        if target in SPECIAL_PATHS:
            return self.tree._special[target]
        acc = self._access(tx)
        return self._get(acc, target, _READ).perms

    def set_perms(self, path: str | bytes, perms: Iterable[Perm], tx: int = 0) -> None:
        new = tuple(perms)
        if not new:
            raise XenStoreError("EINVAL", "empty permission list")
        target = self.resolve(path, special=True)
        if target in SPECIAL_PATHS:
            if not self.privileged:
                raise XenStoreError("EACCES", target)
            self.tree._special[target] = new
            return
        acc = self._access(tx)
        node = self._get(acc, target, _WRITE | _OWNER)
        if not self.privileged and new[0].domid != node.perms[0].domid:
            raise XenStoreError("EPERM", f"domain {self.domid} may not change the owner")
        acc.put(target, dataclasses.replace(node, perms=new))
        acc.changes.append(_Change(target, False, (node.perms, new)))
        acc.finish()

    # -- transactions ----------------------------------------------------------------

    def transaction_start(self) -> int:
        if self.closed:
            raise XenStoreError("EINVAL", "session closed")
        if not self.privileged and len(self._transactions) >= MAX_TRANSACTIONS:
            raise XenStoreError("ENOSPC", "too many open transactions")
        txn = _Transaction(self.tree._next_tx_id(), self)
        self._transactions[txn.id] = txn
        return txn.id

    def transaction_end(self, tx: int, commit: bool) -> None:
        """Commit (or abort) transaction ``tx``; ``EAGAIN`` if a node it used changed."""
        txn = self._transactions.pop(tx, None)
        if txn is None:
            raise XenStoreError("ENOENT", f"no transaction {tx}")
        if commit:
            self.tree._commit(txn)

    # -- watches ---------------------------------------------------------------------

    def watch(self, path: str | bytes, token: str | bytes) -> WatchEvent:
        """Register a watch. Returns the initial event, which the caller delivers after its
        reply (xenstored sends ``OK`` first, then the event)."""
        if self.closed:
            raise XenStoreError("EINVAL", "session closed")
        token_text = token.decode("ascii", "replace") if isinstance(token, bytes) else token
        watch = self._make_watch(path, token_text)
        if any(w.path == watch.path and w.token == watch.token for w in self._watches):
            raise XenStoreError("EEXIST", f"watch {watch.path} {token_text!r}")
        if not self.privileged and len(self._watches) >= MAX_WATCHES:
            raise XenStoreError("E2BIG", "too many watches")
        self._watches.append(watch)
        return watch.event(watch.path)

    def unwatch(self, path: str | bytes, token: str | bytes) -> None:
        token_text = token.decode("ascii", "replace") if isinstance(token, bytes) else token
        watch = self._make_watch(path, token_text)
        for index, existing in enumerate(self._watches):
            if existing.path == watch.path and existing.token == watch.token:
                del self._watches[index]
                return
        raise XenStoreError("ENOENT", f"no watch {watch.path} {token_text!r}")

    def _make_watch(self, path: str | bytes, token: str) -> _Watch:
        text = check_path(path, watch=True)
        canonical = self.resolve(text, special=True)
        prefix = "" if text.startswith(("/", "@")) else domain_path(self.domid)
        return _Watch(canonical, token, prefix)

    def reset_watches(self) -> None:
        """RESET_WATCHES: drop every watch and transaction of this session."""
        self._watches.clear()
        self._transactions.clear()

    @property
    def watches(self) -> list[tuple[str, str]]:
        """Registered watches as (canonical path, token)."""
        return [(w.path, w.token) for w in self._watches]

    def close(self) -> None:
        """The connection went away: forget its watches and transactions."""
        self.reset_watches()
        self.closed = True
        self.tree._sessions.pop(self, None)

    def _deliver(self, change: _Change) -> None:
        for watch in self._watches:
            hit = watch.path == change.path if change.exact else _is_within(
                change.path, watch.path)
            if hit and any(_rights(self.domid, p) & _READ for p in change.perms):
                event = watch.event(change.path)
                if len(event.payload()) <= MAX_PAYLOAD:
                    self.on_event(event)


class XenStoreTree:
    """The store shared by all sessions; see the module docstring for the rules."""

    def __init__(self) -> None:
        root_perms = (Perm(0, "n"),)
        self._generation = 0
        self._tx_counter = 0
        self._tx_started = 0
        self._nodes: dict[str, Node] = {}
        self._sessions: dict[Session, None] = {}  # insertion order = event delivery order
        self._special: dict[str, tuple[Perm, ...]] = {p: root_perms for p in SPECIAL_PATHS}
        self._store("/", Node(b"", root_perms, ("local", "tool")))
        self._store("/local", Node(b"", root_perms, ("domain",)))
        self._store("/local/domain", Node(b"", root_perms))
        self._store("/tool", Node(b"", root_perms, ("xenstored",)))
        self._store("/tool/xenstored", Node(b"", root_perms))

    def session(
        self, domid: int, on_event: Callable[[WatchEvent], None] | None = None
    ) -> Session:
        """Open a session acting as ``domid`` (privileged if 0)."""
        if not 0 <= domid <= 0xFFFF:
            raise ValueError(f"domain id {domid} out of range")
        session = Session(self, domid, on_event)
        self._sessions[session] = None
        return session

    @property
    def transactions_started(self) -> int:
        """How many transactions have been started so far (for tests and diagnostics)."""
        return self._tx_started

    def node(self, path: str) -> Node | None:
        """The committed node at absolute ``path`` (no permission check; for inspection)."""
        return self._nodes.get(path)

    def paths(self) -> Iterator[str]:
        """All committed node paths, sorted."""
        return iter(sorted(self._nodes))

    def introduce_domain(self, domid: int) -> None:
        """A domain appeared: fire ``@introduceDomain``."""
        self._fire([_Change(INTRODUCE_DOMAIN, True, (self._special[INTRODUCE_DOMAIN],))])

    def release_domain(self, domid: int) -> None:
        """A domain died: fire ``@releaseDomain``."""
        self._fire([_Change(RELEASE_DOMAIN, True, (self._special[RELEASE_DOMAIN],))])

    # -- internals -------------------------------------------------------------------

    def _store(self, path: str, node: Node) -> None:
        self._generation += 1
        self._nodes[path] = dataclasses.replace(node, generation=self._generation)

    def _next_tx_id(self) -> int:
        self._tx_started += 1
        self._tx_counter = self._tx_counter % 0xFFFFFFFE + 1
        return self._tx_counter

    def _commit(self, txn: _Transaction) -> None:
        for path, generation in txn.seen.items():
            node = self._nodes.get(path)
            if (None if node is None else node.generation) != generation:
                raise XenStoreError("EAGAIN", f"{path} changed during transaction {txn.id}")
        for path, new in txn.overlay.items():
            if new is None:
                self._nodes.pop(path, None)
            else:
                self._store(path, new)
        self._fire(txn.changes)

    def _fire(self, changes: list[_Change]) -> None:
        for change in changes:
            for session in list(self._sessions):
                if not session.closed:
                    session._deliver(change)

