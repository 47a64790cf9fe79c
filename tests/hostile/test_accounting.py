"""Attacks on Dom0's resources: everything a guest makes Dom0 hold is charged to its domain's
account, bounded by limits an honest guest never reaches, and the guests beside it go on."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from displback.backend.buffers import ZeroCopyPolicy
from displback.backend.device import BackendSettings
from displback.backend.quotas import RESOURCES, LimitOverrides, Limits
from displback.backend.retained import fd_name
from displback.display.virtual import OutputConfig
from displback.protocol.constants import ENOMEM
from displback.protocol.messages import DbufDestroyReq
from displback.sim.guest import GuestBuffer, GuestRequestError, SimGuest
from displback.sim.hypervisor import HypervisorThread, query_counters
from displback.sim.machine import SimMachine, sim_machine
from displback.sim.platform import SimPlatform
from displback.systemd.fdstore import FdStore, inherited_fds
from displback.systemd.sdnotify import Notifier
from tests.backend.support import (
    XRGB,
    connected_guest,
    flip_frame,
    release,
    show,
    show_frames,
    wait_until,
)

ATTACKER, HONEST = 1, 2
#: The attacker's 1024x768 connector on A (one 3 MiB buffer fills it); the honest one on B.
OUTPUTS = (OutputConfig("A", 1024, 768), OutputConfig("B", 320, 240))


async def _honest_guest_still_shows(machine: SimMachine, first: int) -> None:
    async with machine.guest(HONEST) as honest:
        await honest.wait_connected()
        await show_frames(machine, honest, first, output="B")


async def _flood_framebuffers(guest: SimGuest, count: int) -> tuple[list[object], int]:
    buf = await guest.create_dumb(1024, 768, 32)  # 3 MiB
    fbs, refused = [], 0
    for _ in range(count):
        try:
            fbs.append(await guest.add_fb(buf, 1024, 768, XRGB))
        except GuestRequestError as exc:
            assert exc.errno == ENOMEM
            refused += 1
    return fbs, refused


async def test_framebuffers_shown_in_copy_mode_cost_the_guest_not_dom0(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    # Before: 60 framebuffers on one 3 MiB buffer, each shown twice, made the display hold
    # 360 MiB of copy buffers charged to nobody. Now: framebuffers are counted (32 with the
    # defaults of a 1024x768 connector) and copy buffers are charged (bytes and count).
    settings = BackendSettings(zero_copy=ZeroCopyPolicy.OFF)
    with trio.fail_after(60):
        async with sim_machine(hypervisor, tmp_path, OUTPUTS, settings=settings) as w:
            await w.add_guest(ATTACKER, "connectors=c0:1024x768")
            await w.add_guest(HONEST, "connectors=c0:320x240")
            async with w.guest(ATTACKER) as attacker:
                await attacker.wait_connected()
                account = w.backend.accounts[ATTACKER]
                fbs, refused = await _flood_framebuffers(attacker, 60)
                assert len(fbs) == account.limits.max_framebuffers == 32 and refused == 28
                config_refused = 0
                for fb in fbs:
                    try:
                        await attacker.set_config(0, fb)  # type: ignore[arg-type]
                    except GuestRequestError as exc:
                        assert exc.errno == ENOMEM
                        config_refused += 1
                    await attacker.page_flip(0, fb)  # type: ignore[arg-type]
                owned = w.output("A").owned_bytes
                assert owned == account.copy_bytes <= account.limits.max_copy_bytes
                assert owned < 90 * 2**20 and config_refused > 0
                assert account.display_fbs <= account.limits.max_display_fbs
                await _honest_guest_still_shows(w, 1)
            # The attacker's driver went away: everything it held is given back.
            await wait_until(lambda: account.idle)
            assert w.output("A").owned_bytes == 0


async def test_an_honest_guest_triple_buffering_in_copy_mode_stays_below_half_its_limits(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    settings = BackendSettings(zero_copy=ZeroCopyPolicy.OFF)
    with trio.fail_after(30):
        async with connected_guest(
            hypervisor, tmp_path, "connectors=c0:320x240", domid=HONEST, settings=settings
        ) as (w, guest):
            account = w.backend.accounts[HONEST]
            bufs, fbs = await show(guest, 0, 320, 240, count=3)
            for frame in range(2, 9):
                await flip_frame(guest, 0, bufs[frame % 3], fbs[frame % 3], frame)
            usage, lim = account.usage(), account.limits
            assert usage["copy_bytes"] == 6 * 320 * 240 * 4  # two copies of each of three
            for resource, limit in RESOURCES.items():
                assert usage[resource] <= getattr(lim, limit) // 2, resource
            await release(guest, 0, bufs, fbs)
            assert account.idle


async def test_imports_and_framebuffers_are_charged_and_given_back(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with connected_guest(hypervisor, tmp_path, domid=ATTACKER) as (w, guest):
            account = w.backend.accounts[ATTACKER]
            buf = await guest.create_dumb(320, 240, 32)
            fb = await guest.add_fb(buf, 320, 240, XRGB)
            await guest.set_config(0, fb)
            assert (account.buffers, account.framebuffers, account.display_fbs) == (1, 1, 1)
            assert account.copy_bytes == 0  # zero-copy: the output imports the guest's pages
            assert account.pages == buf.npages
            await guest.set_config(0, None)
            await guest.rm_fb(fb)
            await guest.destroy_dumb(buf)
            assert account.idle


async def test_a_guest_framebuffer_flood_is_refused_at_its_limit_and_it_goes_on(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    limits = Limits(16, 2000, 4000, 2, 2000.0, 400, max_framebuffers=5)
    with trio.fail_after(30):
        async with connected_guest(
            hypervisor, tmp_path, domid=ATTACKER, settings=BackendSettings(limits=limits)
        ) as (w, guest):
            buf = await guest.create_dumb(64, 64, 32)
            fbs = [await guest.add_fb(buf, 64, 64, XRGB) for _ in range(5)]
            with pytest.raises(GuestRequestError) as exc:
                await guest.add_fb(buf, 64, 64, XRGB)
            assert exc.value.errno == ENOMEM
            await guest.rm_fb(fbs.pop())
            fbs.append(await guest.add_fb(buf, 64, 64, XRGB))
            for fb in fbs:
                await guest.rm_fb(fb)
            await guest.destroy_dumb(buf)
            await show_frames(w, guest, 1)
            assert w.backend.accounts[ATTACKER].idle


async def test_two_devices_of_one_guest_share_one_account(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    # A guest cannot double its limits by asking for a second device: one account per domain,
    # whose limits are those of all its connectors together.
    limits = Limits(3, 2000, 4000, 2, 2000.0, 400)
    with trio.fail_after(30):
        async with sim_machine(
            hypervisor, tmp_path, settings=BackendSettings(limits=limits)
        ) as w:
            await w.add_guest(ATTACKER, "connectors=c0:320x240")
            await w.add_guest(ATTACKER, "connectors=c0:320x240", devid=1)
            async with w.guest(ATTACKER) as first, w.guest(ATTACKER, devid=1) as second:
                await first.wait_connected()
                await second.wait_connected()
                stores = [s.store for s in w.backend.statuses()]
                assert len(stores) == 2 and stores[0] is not None and stores[1] is not None
                assert stores[0].quota is stores[1].quota is w.backend.accounts[ATTACKER]
                bufs = [await first.create_dumb(64, 64, 32) for _ in range(2)]
                bufs.append(await second.create_dumb(64, 64, 32))
                for guest in (first, second):
                    with pytest.raises(GuestRequestError) as exc:
                        await guest.create_dumb(64, 64, 32)
                    assert exc.value.errno == ENOMEM
                await second.destroy_dumb(bufs.pop())
                bufs.append(await first.create_dumb(64, 64, 32))
                for buf in bufs:
                    await first.destroy_dumb(buf)
                assert w.backend.accounts[ATTACKER].idle


async def test_derived_limits_grow_with_every_connected_device_of_the_domain(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(ATTACKER, "connectors=c0:320x240")
            await w.add_guest(ATTACKER, "connectors=c0:640x480;c1:320x240", devid=1)
            async with w.guest(ATTACKER) as first:
                await first.wait_connected()
                account = w.backend.accounts[ATTACKER]
                assert account.limits == Limits.for_connectors([(320, 240)])
                async with w.guest(ATTACKER, devid=1) as second:
                    await second.wait_connected()
                    both = Limits.for_connectors([(320, 240), (640, 480), (320, 240)])
                    assert account.limits == both


async def test_a_resolution_no_edid_can_describe_is_refused_clearly_and_nothing_breaks(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    # Before: 5000x3000 passed the XenStore parser, then building the connector's EDID
    # raised on every connect ("connect failed unexpectedly", forever).
    with trio.fail_after(30), capture_logs() as logs:
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(ATTACKER, "connectors=c0:5000x3000")
            await w.add_guest(HONEST, "connectors=c0:320x240")
            async with w.guest(ATTACKER), w.guest(HONEST) as honest:
                await honest.wait_connected()
                await wait_until(
                    lambda: any("cannot be described" in str(e.get("error")) for e in logs)
                )
                await show_frames(w, honest, 1)
    assert not any(e["event"] == "connect failed unexpectedly" for e in logs)


# -- be-alloc memory a guest keeps mapped ------------------------------------------------------

BE_ALLOC = "be-alloc=1,connectors=c0:320x240"
BIG_ROWS = 8186  # 1024 px x 32 bpp rows: 8186 pages, ~32 MiB, the largest Linux buffer


def _dom0(hv: HypervisorThread, counter: str) -> int:
    return int(query_counters(hv.socket_path)["domains"]["0"][counter])


async def _destroy_keeping_the_mapping(guest: SimGuest, buf: GuestBuffer) -> None:
    """DBUF_DESTROY without unmapping first (Linux unmaps; a hostile guest need not)."""
    await guest.hostile.raw_request(0, DbufDestroyReq(id=0, dbuf_cookie=buf.cookie).pack())


async def test_be_alloc_memory_destroyed_while_mapped_stays_charged_and_is_reused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    # Before: 12 such destroys of ~32 MiB buffers pinned 384 MiB of Dom0 memory (11.7x the
    # guest's page limit) while the quota was given back each time.
    with trio.fail_after(60):
        async with connected_guest(hypervisor, tmp_path, BE_ALLOC, domid=ATTACKER) as (w, g):
            base = _dom0(hypervisor, "pages")
            account = w.backend.accounts[ATTACKER]
            for _ in range(12):
                buf = await g.create_dumb(1024, BIG_ROWS, 32)
                assert not bytes(buf.buffer[:4096]).strip(b"\0")  # reused memory is zeroed
                buf.buffer[:4] = b"mine"
                await _destroy_keeping_the_mapping(g, buf)
            assert _dom0(hypervisor, "pages") - base == BIG_ROWS  # one buffer, reused
            assert account.be_alloc_pages == BIG_ROWS and account.pages == 0
            assert w.backend.retained.pages(ATTACKER) == BIG_ROWS
            await show_frames(w, g, 1)


async def test_kept_be_alloc_memory_is_bounded_by_the_guest_limit(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with connected_guest(hypervisor, tmp_path, BE_ALLOC, domid=ATTACKER) as (w, g):
            base = _dom0(hypervisor, "pages")
            account = w.backend.accounts[ATTACKER]
            limit = account.limits.max_be_alloc_pages
            refused, rows = 0, 1000
            while refused == 0:
                try:
                    buf = await g.create_dumb(1024, rows, 32)  # growing: no reuse possible
                except GuestRequestError as exc:
                    assert exc.errno == ENOMEM
                    refused += 1
                    continue
                await _destroy_keeping_the_mapping(g, buf)
                rows += 1000
            pinned = _dom0(hypervisor, "pages") - base
            assert pinned == account.be_alloc_pages <= limit
            small = await g.create_dumb(64, 64, 32)  # what is kept still serves the guest
            await g.destroy_dumb(small)
            assert _dom0(hypervisor, "pages") - base == pinned
            # A guest beside it, also be-alloc, is not affected by the attacker's account.
            await w.add_guest(HONEST, BE_ALLOC)
            async with w.guest(HONEST) as honest:
                await honest.wait_connected()
                await show_frames(w, honest, 1, output="B")
                assert w.backend.accounts[HONEST].be_alloc_pages > 0


async def test_kept_be_alloc_memory_is_freed_when_the_domain_is_destroyed(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with sim_machine(hypervisor, tmp_path) as w:
            await w.add_guest(ATTACKER, BE_ALLOC)
            base = _dom0(hypervisor, "pages")
            async with w.guest(ATTACKER) as g:
                await g.wait_connected()
                buf = await g.create_dumb(320, 240, 32)
                await _destroy_keeping_the_mapping(g, buf)
                await g.create_dumb(640, 480, 32)  # live at teardown: kept too
            await wait_until(lambda: w.backend.retained.pages(ATTACKER) == 75 + 300)
            assert _dom0(hypervisor, "dmabufs") == 2
            await w.toolstack.destroy_domain(ATTACKER)
            await wait_until(lambda: _dom0(hypervisor, "dmabufs") == 0)
            assert _dom0(hypervisor, "pages") == base
            # Forgotten once the device is gone too (its task may end after the reap).
            await wait_until(lambda: ATTACKER not in w.backend.accounts)


class FakeSystemd:
    """A datagram socket standing in for $NOTIFY_SOCKET: receives messages and fds."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.store: dict[str, list[int]] = {}

    def receive(self) -> list[str]:
        """Apply every pending message as systemd's fd store would; return the messages."""
        messages = []
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 16)
            except BlockingIOError:
                return messages
            text = data.decode()
            fields = dict(line.split("=", 1) for line in text.splitlines())
            messages.append(text)
            if fields.get("FDSTORE") == "1":
                self.store.setdefault(fields["FDNAME"], []).extend(fds)
            elif fields.get("FDSTOREREMOVE") == "1":
                for fd in self.store.pop(fields["FDNAME"], []):
                    os.close(fd)

    def listen_env(self) -> tuple[dict[str, str], int]:
        """The environment and first fd number of a restart: copies of the stored fds made
        contiguous (systemd passes them from fd 3 on and keeps its own)."""
        names = sorted(self.store)
        first = fcntl.fcntl(self.store[names[0]][0], fcntl.F_DUPFD_CLOEXEC, 1000)
        for offset, name in enumerate(names[1:], 1):
            os.dup2(self.store[name][0], first + offset)
        env = {
            "LISTEN_FDS": str(len(names)),
            "LISTEN_PID": str(os.getpid()),
            "LISTEN_FDNAMES": ":".join(names),
        }
        return env, first

    def close(self) -> None:
        for fds in self.store.values():
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.sock.close()


async def test_kept_memory_survives_a_daemon_restart_through_systemds_fd_store(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    systemd = FakeSystemd(tmp_path / "notify")
    fdstore = FdStore(Notifier(systemd.path))
    try:
        with trio.fail_after(30):
            async with sim_machine(
                hypervisor, tmp_path, backend_options={"fdstore": fdstore}
            ) as w:
                await w.add_guest(ATTACKER, BE_ALLOC)
                async with w.guest(ATTACKER) as g:
                    await g.wait_connected()
                    for rows in (64, 128):
                        buf = await g.create_dumb(1024, rows, 32)
                        await _destroy_keeping_the_mapping(g, buf)
                    stored = systemd.receive()
                    assert len(stored) == 2 and all("FDSTORE=1" in m for m in stored)
                    # Named with the domain's UUID, not only its domid.
                    uuid = _uuid_of(w, ATTACKER)
                    assert all(f".d{ATTACKER}.u{uuid}." in name for name in systemd.store)
                    assert sorted(int(n.split(".p")[1].split(".")[0]) for n in systemd.store) \
                        == [64, 128]
                    # The daemon restarts; systemd hands the stored fds to the new one.
                    env, first = systemd.listen_env()
                    inherited = inherited_fds(env, first_fd=first)
                    assert not env  # taken once, not left for children
                    await w.restart_backend(fdstore=fdstore, inherited=inherited)
                    assert _dom0(hypervisor, "dmabufs") == 2  # never freed meanwhile
                    account = w.backend.accounts[ATTACKER]
                    assert account.be_alloc_pages == 192 and account.be_alloc_buffers == 2
                    await wait_until(lambda: g.stats.handshakes == 2)
                    await g.wait_connected()
                    # The old run's grants died with its gntdev (revoked lazily): the first
                    # reuse grants the adopted memory once more, at most its kept pages ...
                    before = _dom0(hypervisor, "grants")
                    again = await g.create_dumb(1024, 100, 32)  # reuses the 128-page one
                    assert _dom0(hypervisor, "dmabufs") == 2
                    assert _dom0(hypervisor, "grants") - before == 128
                    assert any("FDSTOREREMOVE=1" in m for m in systemd.receive())
                    await _destroy_keeping_the_mapping(g, again)
                    # ... and from then on it is kept with its grants: no more entries.
                    granted = _dom0(hypervisor, "grants")
                    for _ in range(3):
                        again = await g.create_dumb(1024, 100, 32)
                        await _destroy_keeping_the_mapping(g, again)
                    assert _dom0(hypervisor, "grants") == granted
                await w.toolstack.destroy_domain(ATTACKER)
                await wait_until(lambda: not w.backend.retained.domains())
                systemd.receive()  # the daemon removes them from the store: systemd closes
                assert not systemd.store
                await wait_until(lambda: _dom0(hypervisor, "dmabufs") == 0)
    finally:
        systemd.close()


async def test_stored_memory_of_a_domain_gone_meanwhile_is_freed_at_start(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    systemd = FakeSystemd(tmp_path / "notify")
    fdstore = FdStore(Notifier(systemd.path))
    platform = SimPlatform(hypervisor.socket_path, "unused")
    try:
        gone = platform.alloc_dmabuf(4096)
        foreign = os.open(os.devnull, os.O_RDONLY)
        inherited = [(fd_name(7, 1), gone), ("some-other-fd", foreign)]
        with trio.fail_after(30):
            async with sim_machine(
                hypervisor,
                tmp_path,
                backend_options={"fdstore": fdstore, "inherited": inherited},
            ) as w:
                await wait_until(lambda: not w.backend.retained.domains())
                assert 7 not in w.backend.accounts
                removed = [m for m in systemd.receive() if "FDSTOREREMOVE=1" in m]
                assert len(removed) == 2
        for fd in (gone, foreign):
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        platform.close()
        systemd.close()


def _uuid_of(machine: SimMachine, domid: int) -> str:
    """The domain's UUID as the toolstack wrote it (``/vm/<uuid>``), 32 hex digits."""
    vm = machine.xs.xenstored.session(0).read(f"/local/domain/{domid}/vm").decode()
    return vm.removeprefix("/vm/").replace("-", "")


async def test_stored_memory_of_an_earlier_domain_with_the_same_domid_is_freed_not_reused(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """While the daemon was down, domain 1 died and a new domain got domid 1: what the old
    run kept for the old domain 1 is freed at start, before any device is served, and never
    granted to the new one (before, the fd-store name knew only the domid)."""
    systemd = FakeSystemd(tmp_path / "notify")
    fdstore = FdStore(Notifier(systemd.path))
    try:
        with trio.fail_after(30):
            async with sim_machine(
                hypervisor, tmp_path, backend_options={"fdstore": fdstore}
            ) as w:
                await w.add_guest(ATTACKER, BE_ALLOC)
                uuid = _uuid_of(w, ATTACKER)
                earlier = w.platform.alloc_dmabuf(75 * 4096)
                with w.platform.open_dmabuf(earlier) as mapping:
                    mapping.buffer[:6] = b"secret"
                inherited = [(fd_name(ATTACKER, 75, "0" * 32), earlier)]
                await w.restart_backend(fdstore=fdstore, inherited=inherited)
                assert not w.backend.retained.domains()
                assert w.backend.retained.uuid(ATTACKER) == uuid
                assert ATTACKER not in w.backend.accounts
                assert w.backend.grant_budget.held == 0
                with pytest.raises(OSError):
                    os.fstat(earlier)
                assert [m for m in systemd.receive() if "FDSTOREREMOVE=1" in m]
                async with w.guest(ATTACKER) as g:
                    await g.wait_connected()
                    buf = await g.create_dumb(320, 240, 32)  # new memory, zeroed
                    assert not bytes(buf.buffer[:4096]).strip(b"\0")
                    await g.destroy_dumb(buf)
                    systemd.receive()
                    assert [n for n in systemd.store if f".u{uuid}." in n]
                await w.toolstack.destroy_domain(ATTACKER)
                await wait_until(lambda: not w.backend.retained.domains())
                systemd.receive()
                assert not systemd.store
    finally:
        systemd.close()


async def test_be_alloc_guests_together_are_bounded_by_the_daemon_wide_grant_budget(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    """Each guest's quota bounds it alone; N guests together could still fill Dom0's one
    grant table. Once guest 1 holds the daemon-wide budget (300 entries here), guest 2's
    be-alloc buffer is refused (-ENOMEM, a log line naming the limit) with nothing granted;
    guest 1 goes on; when guest 1's domain dies, its entries come back and guest 2 is served."""
    settings = BackendSettings(limit_overrides=LimitOverrides(dom0_grant_entries=300))
    with trio.fail_after(60):
        async with sim_machine(hypervisor, tmp_path, settings=settings) as w:
            budget = w.backend.grant_budget
            await w.add_guest(ATTACKER, BE_ALLOC)
            await w.add_guest(HONEST, BE_ALLOC)
            async with w.guest(HONEST) as two:  # connected first: output A
                await two.wait_connected()
                async with w.guest(ATTACKER) as one:  # output B
                    await one.wait_connected()
                    held = [await one.create_dumb(320, 240, 32) for _ in range(4)]  # 4 x 75
                    assert budget.held == 300 == _dom0(hypervisor, "grants")
                    with capture_logs() as logs, pytest.raises(GuestRequestError) as exc:
                        await two.create_dumb(320, 240, 32)
                    assert exc.value.errno == ENOMEM
                    assert any("daemon-wide limit 300" in str(e["event"])
                               and "dom0_grant_entries" in str(e["event"]) for e in logs)
                    assert two.pending_end_access == 0
                    assert w.backend.accounts[HONEST].be_alloc_pages == 0
                    assert _dom0(hypervisor, "grants") == 300
                    # Guest 1 is not affected: its kept memory serves it again.
                    for buf in held[:2]:
                        await one.destroy_dumb(buf)
                    await show_frames(w, one, 1, output="B")
                    for buf in held[2:]:
                        await one.destroy_dumb(buf)
                    assert budget.held == 300
                await w.toolstack.destroy_domain(ATTACKER)
                await wait_until(lambda: budget.held == 0)
                assert _dom0(hypervisor, "grants") == 0
                await show_frames(w, two, 1, output="A")
                assert budget.held == w.backend.accounts[HONEST].be_alloc_pages == 150


def test_inherited_fds_are_ours_only_when_the_pid_matches() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "x"}
    assert inherited_fds(env) == [] and not env
