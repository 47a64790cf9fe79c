"""The simulated store's semantics: paths, permissions as libxl sets them, transactions, watches."""

from __future__ import annotations

import pytest

from displback.sim.xenstore_tree import (
    RELEASE_DOMAIN,
    Session,
    WatchEvent,
    XenStoreTree,
    parse_perms,
)
from displback.xenstore.wire import Perm, XenStoreError

FE = "/local/domain/5/device/vdispl/0"
BE = "/local/domain/0/backend/vdispl/5/0"


def errname(excinfo: pytest.ExceptionInfo[XenStoreError]) -> str:
    return excinfo.value.name


@pytest.fixture
def tree() -> XenStoreTree:
    return XenStoreTree()


@pytest.fixture
def dom0(tree: XenStoreTree) -> Session:
    return tree.session(0)


@pytest.fixture
def guest(tree: XenStoreTree) -> Session:
    return tree.session(5)


def libxl_layout(dom0: Session) -> None:
    """The nodes and permissions libxl__device_generic_add gives a vdispl device."""
    dom0.mkdir("/local/domain/5")
    dom0.set_perms("/local/domain/5", parse_perms(["n0", "r5"]))
    dom0.mkdir("/local/domain/5/device")
    dom0.set_perms("/local/domain/5/device", parse_perms(["n5"]))
    dom0.mkdir(FE)
    dom0.set_perms(FE, parse_perms(["n5", "r0"]))
    dom0.write(f"{FE}/backend", BE.encode())
    dom0.write(f"{FE}/state", b"1")
    for node, value in (("be-alloc", b"0"), ("0/resolution", b"1024x768"),
                        ("0/unique-id", b"id0")):
        dom0.write(f"{FE}/{node}", value)
        dom0.set_perms(f"{FE}/{node}", parse_perms(["n0", "r5"]))
    dom0.mkdir(BE)
    dom0.set_perms(BE, parse_perms(["n0", "r5"]))
    dom0.write(f"{BE}/state", b"1")


# -- paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["", "a//b", "/a/", "/a b", "/é", "/a/./b", "@foo", "/" + "x" * 3072]
)
def test_bad_paths_are_einval(dom0: Session, path: str) -> None:
    with pytest.raises(XenStoreError) as exc:
        dom0.write(path, b"v")
    assert errname(exc) == "EINVAL"


def test_relative_path_resolves_against_domain_home(tree: XenStoreTree, dom0: Session) -> None:
    dom0.mkdir("/local/domain/5")
    dom0.set_perms("/local/domain/5", parse_perms(["n5"]))
    guest = tree.session(5)
    guest.write("data/x", b"1")
    assert dom0.read("/local/domain/5/data/x") == b"1"
    assert guest.read("data/x") == b"1"


def test_relative_part_below_domain_home_is_limited_to_2048(dom0: Session) -> None:
    dom0.write("/local/domain/7/" + "a" * 2048, b"")
    with pytest.raises(XenStoreError) as exc:
        dom0.write("/local/domain/7/" + "a" * 2049, b"")
    assert errname(exc) == "EINVAL"


# -- basic operations ------------------------------------------------------------------


def test_write_creates_parents_with_empty_values(dom0: Session) -> None:
    dom0.write("/a/b/c", b"v")
    assert dom0.read("/a") == b""
    assert dom0.read("/a/b") == b""
    assert dom0.directory("/a/b") == ["c"]


def test_directory_lists_children_in_creation_order(dom0: Session) -> None:
    for name in ("z", "a", "m"):
        dom0.write(f"/d/{name}", b"")
    assert dom0.directory("/d") == ["z", "a", "m"]


def test_read_of_missing_node_is_enoent(dom0: Session) -> None:
    with pytest.raises(XenStoreError) as exc:
        dom0.read("/nope")
    assert errname(exc) == "ENOENT"


def test_mkdir_of_existing_node_keeps_its_value(dom0: Session) -> None:
    dom0.write("/a", b"v")
    dom0.mkdir("/a")
    assert dom0.read("/a") == b"v"


def test_rm_removes_the_whole_subtree(dom0: Session) -> None:
    dom0.write("/a/b/c", b"v")
    dom0.rm("/a/b")
    assert dom0.directory("/a") == []
    assert not dom0.exists("/a/b/c")


def test_rm_of_missing_child_of_existing_node_is_ok_as_in_xenstored(dom0: Session) -> None:
    dom0.write("/a", b"v")
    dom0.rm("/a/missing")
    assert dom0.read("/a") == b"v" and dom0.directory("/a") == []


def test_rm_with_missing_parent_is_enoent(dom0: Session) -> None:
    with pytest.raises(XenStoreError) as exc:
        dom0.rm("/nope/child")
    assert errname(exc) == "ENOENT"


def test_rm_of_root_is_refused(dom0: Session) -> None:
    with pytest.raises(XenStoreError) as exc:
        dom0.rm("/")
    assert errname(exc) == "EINVAL"


def test_values_are_raw_bytes(dom0: Session) -> None:
    dom0.write("/bin", b"\x00\xff\x01")
    assert dom0.read("/bin") == b"\x00\xff\x01"


def test_directory_part_pages_a_long_list_and_marks_the_end(dom0: Session) -> None:
    names = [f"child-{i:04d}-" + "x" * 40 for i in range(200)]
    for name in names:
        dom0.write(f"/big/{name}", b"")
    seen: list[str] = []
    offset = 0
    while True:
        reply = dom0.directory_part("/big", offset)
        assert len(reply) <= 4096
        gen, rest = reply.split(b"\0", 1)
        assert gen.isdigit()
        chunk = rest.split(b"\0")
        finished = rest.endswith(b"\0\0") or rest == b"\0"
        items = [c.decode() for c in chunk if c]
        seen += items
        offset += sum(len(i) + 1 for i in items)
        if finished:
            break
    assert seen == names


# -- permissions -----------------------------------------------------------------------


def test_parse_perms_rejects_bad_entries() -> None:
    for bad in (["x5"], ["r"], ["r-1"], ["r99999"], []):
        with pytest.raises(XenStoreError) as exc:
            parse_perms(bad)
        assert errname(exc) == "EINVAL"
    assert parse_perms(["n5", "r0"]) == (Perm(5, "n"), Perm(0, "r"))


def test_guest_may_write_its_frontend_directory(dom0: Session, guest: Session) -> None:
    libxl_layout(dom0)
    guest.write(f"{FE}/state", b"3")
    guest.write(f"{FE}/0/req-ring-ref", b"8")
    assert dom0.read(f"{FE}/0/req-ring-ref") == b"8"


def test_guest_created_nodes_are_owned_by_the_guest(dom0: Session, guest: Session) -> None:
    libxl_layout(dom0)
    guest.write(f"{FE}/0/evt-ring-ref", b"9")
    assert dom0.get_perms(f"{FE}/0/evt-ring-ref") == (Perm(5, "n"), Perm(0, "r"))


def test_guest_cannot_forge_resolution_or_be_alloc(dom0: Session, guest: Session) -> None:
    libxl_layout(dom0)
    for node in ("be-alloc", "0/resolution", "0/unique-id"):
        assert guest.read(f"{FE}/{node}")  # readable
        with pytest.raises(XenStoreError) as exc:
            guest.write(f"{FE}/{node}", b"9999x9999")
        assert errname(exc) == "EACCES"
        with pytest.raises(XenStoreError) as exc:
            guest.set_perms(f"{FE}/{node}", parse_perms(["b5"]))
        assert errname(exc) == "EACCES"


def test_guest_cannot_write_backend_directory(dom0: Session, guest: Session) -> None:
    libxl_layout(dom0)
    assert guest.read(f"{BE}/state") == b"1"
    for path in (f"{BE}/state", f"{BE}/new-node"):
        with pytest.raises(XenStoreError) as exc:
            guest.write(path, b"4")
        assert errname(exc) == "EACCES"
    with pytest.raises(XenStoreError) as exc:
        guest.rm(BE)
    assert errname(exc) == "EACCES"


def test_missing_node_under_unreadable_parent_is_eacces_not_enoent(
    dom0: Session, guest: Session
) -> None:
    dom0.write("/secret/x", b"")
    with pytest.raises(XenStoreError) as exc:
        guest.read("/secret/missing")
    assert errname(exc) == "EACCES"
    with pytest.raises(XenStoreError) as exc:
        guest.read("/secret/x")
    assert errname(exc) == "EACCES"


def test_acl_entry_overrides_default_and_owner_has_all_rights(
    tree: XenStoreTree, dom0: Session
) -> None:
    dom0.write("/n", b"v")
    dom0.set_perms("/n", parse_perms(["r7", "n5", "w6"]))
    assert tree.session(9).read("/n") == b"v"  # default r
    with pytest.raises(XenStoreError):
        tree.session(5).read("/n")  # explicit n
    tree.session(6).write("/n", b"w")  # explicit w
    with pytest.raises(XenStoreError):
        tree.session(6).read("/n")
    owner = tree.session(7)
    owner.write("/n", b"o")
    owner.set_perms("/n", parse_perms(["n7"]))


def test_unprivileged_owner_cannot_give_node_away(tree: XenStoreTree, dom0: Session) -> None:
    dom0.write("/n", b"")
    dom0.set_perms("/n", parse_perms(["n5"]))
    with pytest.raises(XenStoreError) as exc:
        tree.session(5).set_perms("/n", parse_perms(["n6"]))
    assert errname(exc) == "EPERM"


def test_get_perms_needs_read_permission(dom0: Session, guest: Session) -> None:
    dom0.write("/n", b"")
    with pytest.raises(XenStoreError) as exc:
        guest.get_perms("/n")
    assert errname(exc) == "EACCES"


# -- transactions ----------------------------------------------------------------------


def test_transaction_sees_its_own_writes_and_others_do_not(dom0: Session) -> None:
    tx = dom0.transaction_start()
    dom0.write("/t/a", b"1", tx)
    assert dom0.read("/t/a", tx) == b"1"
    assert not dom0.exists("/t/a")
    dom0.transaction_end(tx, commit=True)
    assert dom0.read("/t/a") == b"1"


def test_aborted_transaction_changes_nothing(dom0: Session) -> None:
    tx = dom0.transaction_start()
    dom0.write("/t/a", b"1", tx)
    dom0.transaction_end(tx, commit=False)
    assert not dom0.exists("/t")


def test_conflicting_write_makes_commit_fail_with_eagain(tree: XenStoreTree, dom0: Session) -> None:
    dom0.write("/t/a", b"0")
    other = tree.session(0)
    tx = dom0.transaction_start()
    assert dom0.read("/t/a", tx) == b"0"
    dom0.write("/t/b", b"1", tx)
    other.write("/t/a", b"changed")
    with pytest.raises(XenStoreError) as exc:
        dom0.transaction_end(tx, commit=True)
    assert errname(exc) == "EAGAIN"
    assert not dom0.exists("/t/b")


def test_node_created_by_someone_else_after_a_miss_conflicts(
    tree: XenStoreTree, dom0: Session
) -> None:
    tx = dom0.transaction_start()
    assert not dom0.exists("/t/x", tx)
    tree.session(0).write("/t/x", b"1")
    with pytest.raises(XenStoreError) as exc:
        dom0.transaction_end(tx, commit=True)
    assert errname(exc) == "EAGAIN"


def test_untouched_nodes_changed_meanwhile_do_not_conflict(
    tree: XenStoreTree, dom0: Session
) -> None:
    dom0.write("/t/a", b"0")
    dom0.write("/u/b", b"0")
    tx = dom0.transaction_start()
    dom0.write("/t/a", b"1", tx)
    tree.session(0).write("/u/b", b"2")
    dom0.transaction_end(tx, commit=True)
    assert dom0.read("/t/a") == b"1"


def test_unknown_transaction_id_is_enoent(dom0: Session, tree: XenStoreTree) -> None:
    tx = tree.session(0).transaction_start()
    for op in (lambda: dom0.read("/", 99), lambda: dom0.read("/", tx),
               lambda: dom0.transaction_end(tx, True)):
        with pytest.raises(XenStoreError) as exc:
            op()
        assert errname(exc) == "ENOENT"


def test_unprivileged_domain_has_a_transaction_quota(guest: Session) -> None:
    for _ in range(10):
        guest.transaction_start()
    with pytest.raises(XenStoreError) as exc:
        guest.transaction_start()
    assert errname(exc) == "ENOSPC"


# -- watches ---------------------------------------------------------------------------


def test_watch_returns_initial_event_with_the_watched_path(dom0: Session) -> None:
    assert dom0.watch("/w", "tok") == WatchEvent("/w", "tok")
    assert not dom0.events  # the initial event is the caller's to send, after its reply


def test_watch_fires_for_path_and_descendants_but_not_siblings(
    tree: XenStoreTree, dom0: Session
) -> None:
    watcher = tree.session(0)
    watcher.watch("/w", "t")
    dom0.write("/w/a/b", b"1")
    dom0.write("/w", b"2")
    dom0.write("/wx", b"3")
    dom0.write("/other", b"4")
    assert list(watcher.events) == [WatchEvent("/w/a/b", "t"), WatchEvent("/w", "t")]


def test_removing_an_ancestor_reports_the_watched_path(tree: XenStoreTree, dom0: Session) -> None:
    dom0.write("/r/a/b", b"1")
    watcher = tree.session(0)
    watcher.watch("/r/a/b", "deep")
    watcher.watch("/r", "top")
    dom0.rm("/r/a")
    assert set(watcher.events) == {WatchEvent("/r/a/b", "deep"), WatchEvent("/r/a", "top")}


def test_relative_watch_gets_relative_event_paths(tree: XenStoreTree, dom0: Session) -> None:
    dom0.mkdir("/local/domain/5")
    dom0.set_perms("/local/domain/5", parse_perms(["n5"]))
    guest = tree.session(5)
    assert guest.watch("device", "t") == WatchEvent("device", "t")
    dom0.write("/local/domain/5/device/vdispl/0/state", b"1")
    assert list(guest.events) == [WatchEvent("device/vdispl/0/state", "t")]


def test_watch_does_not_fire_for_nodes_the_watcher_cannot_read(
    dom0: Session, guest: Session
) -> None:
    dom0.write("/hidden", b"")
    guest.watch("/hidden", "t")
    dom0.write("/hidden/x", b"1")
    assert not guest.events


def test_losing_read_permission_still_reports_the_change(dom0: Session, guest: Session) -> None:
    dom0.write("/n", b"")
    dom0.set_perms("/n", parse_perms(["n0", "r5"]))
    guest.watch("/n", "t")
    dom0.set_perms("/n", parse_perms(["n0"]))
    assert list(guest.events) == [WatchEvent("/n", "t")]


def test_transaction_events_fire_on_commit_only(tree: XenStoreTree, dom0: Session) -> None:
    watcher = tree.session(0)
    watcher.watch("/t", "t")
    tx = dom0.transaction_start()
    dom0.write("/t/a", b"1", tx)
    assert not watcher.events
    dom0.transaction_end(tx, commit=True)
    assert list(watcher.events) == [WatchEvent("/t/a", "t")]
    tx = dom0.transaction_start()
    dom0.write("/t/b", b"1", tx)
    dom0.transaction_end(tx, commit=False)
    assert len(watcher.events) == 1


def test_duplicate_watch_is_eexist_and_unknown_unwatch_is_enoent(dom0: Session) -> None:
    dom0.watch("/w", "t")
    with pytest.raises(XenStoreError) as exc:
        dom0.watch("/w", "t")
    assert errname(exc) == "EEXIST"
    dom0.unwatch("/w", "t")
    with pytest.raises(XenStoreError) as exc:
        dom0.unwatch("/w", "t")
    assert errname(exc) == "ENOENT"


def test_release_domain_fires_for_privileged_watchers_only(
    tree: XenStoreTree, dom0: Session, guest: Session
) -> None:
    dom0.watch(RELEASE_DOMAIN, "rel")
    guest.watch(RELEASE_DOMAIN, "rel")
    tree.release_domain(5)
    assert list(dom0.events) == [WatchEvent(RELEASE_DOMAIN, "rel")]
    assert not guest.events


def test_closed_session_gets_no_more_events(tree: XenStoreTree, dom0: Session) -> None:
    watcher = tree.session(0)
    watcher.watch("/w", "t")
    watcher.close()
    dom0.write("/w", b"")
    assert not watcher.events


def test_reset_watches_drops_watches_and_transactions(dom0: Session) -> None:
    dom0.watch("/w", "t")
    tx = dom0.transaction_start()
    dom0.reset_watches()
    assert dom0.watches == []
    with pytest.raises(XenStoreError):
        dom0.transaction_end(tx, True)
